"""inVAE's module: :class:`InVAEModule`, the generative model and its losses, assembled from the
parts in :mod:`scinv.nn` (layers, Gaussian and NB kernels, priors, predictor). Every name of those
parts is re-exported here, so ``from scinv.module import ...`` is the one import path.

Notation: B cells in a minibatch, G genes, D = D_inv + D_spur latent dimensions, K labels.
The latent is z = [z_inv | z_spur]. z_inv has the prior p(z_inv | y) with y = (label, biological
covariates); z_spur has the prior p(z_spur | e) with e = (batch, technical covariates). The
decoder sees z only, so technical variation must flow through z_spur.

Differences from the reference implementation (theislab/inVAE 0.1.0), each deliberate:
- the encoder sees the counts only, never the labels (no label leakage into query latents);
- no dropout/batch norm after final layers (including prior log-variances), one linear map
  before the softmax;
- cells with unknown labels get the label-marginal prior: a mixture of the label-conditional
  priors (Monte-Carlo KL), instead of a fake label; its weights are uniform unless
  `label_frequencies` are given.

``SCINV_PLAIN_MATH=1`` runs every fused kernel and speed trick as plain torch autograd math
(:func:`plain_math`, read at every call; see :mod:`scinv.nn.fastmath`).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from .nn.fastmath import PLAIN_MATH_ENV, clamp, plain_math, transcendental
from .nn.gaussian import (
    LOG_2PI,
    _GaussianLatent,
    gaussian_kl,
    gaussian_kl_terms,
    gaussian_latent,
    gaussian_latent_plain,
    gaussian_log_prob,
    posterior_variance,
)
from .nn.layers import CountDecoder, Dropout, GaussianEncoder, HiddenStack, WideLinear, mlp
from .nn.nb import (
    _CountLgammaSum,
    _NBFromLogits,
    count_lgamma_sum,
    count_lgamma_sum_plain,
    nb_log_prob_dense,
    nb_log_prob_dense_plain,
    negative_binomial_log_prob,
)
from .nn.predictor import InvariantClassifier, environment_risks, invariant_risk
from .nn.priors import PRIOR_FAMILIES, PRIOR_MODES, ConditionalPrior, ExponentialFamilyPrior, score_matching_loss

DISPERSIONS = ("gene", "gene-batch")  # NB inverse dispersion per gene, or per gene and batch (scVI's names)

INVARIANCE_KERNELS = ("mean", "mmd")  # InVAEModule.batch_invariance, InVAEModule.batch_invariance_mmd

__all__ = [
    "INVARIANCE_KERNELS",
    "PLAIN_MATH_ENV",
    "PRIOR_FAMILIES",
    "PRIOR_MODES",
    "ConditionalPrior",
    "CountDecoder",
    "Dropout",
    "ExponentialFamilyPrior",
    "GaussianEncoder",
    "HiddenStack",
    "InVAEModule",
    "InvariantClassifier",
    "WideLinear",
    "clamp",
    "count_lgamma_sum",
    "count_lgamma_sum_plain",
    "environment_risks",
    "gaussian_kl",
    "gaussian_kl_terms",
    "gaussian_latent",
    "gaussian_latent_plain",
    "gaussian_log_prob",
    "invariant_risk",
    "mlp",
    "nb_log_prob_dense",
    "nb_log_prob_dense_plain",
    "negative_binomial_log_prob",
    "plain_math",
    "posterior_variance",
    "score_matching_loss",
    "transcendental",
    # the fused kernels themselves, for tests and benchmarks
    "_CountLgammaSum",
    "_GaussianLatent",
    "_NBFromLogits",
]


class InVAEModule(nn.Module):
    """Generative model and losses of inVAE.

    Inputs per minibatch: x (B, G) raw counts, inv (B, C_inv) biological covariates other than
    the label, label (B,) label codes with -1 for unknown, spur (B, C_spur) technical covariates.
    """

    def __init__(
        self,
        n_genes: int,
        n_labels: int,
        n_inv_covariates: int,
        n_spur_covariates: int,
        n_latent_inv: int = 20,
        n_latent_spur: int = 5,
        n_hidden: int = 128,
        n_layers: int = 2,
        dropout: float = 0.1,
        batch_norm: bool = True,
        prior_mode: str = "mean",
        prior_hidden: int = 64,
        kl_estimator: str = "analytic",
        kl_inv_weight: float = 1.0,
        kl_spur_weight: float = 1.0,
        tc_weight: float = 0.0,
        label_frequencies: torch.Tensor | None = None,
        encode_covariates: bool = False,
        covariate_dropout: float = 0.2,
        classifier_weight: float = 0.0,
        invariance_weight: float = 0.0,
        invariance_on_unlabelled: bool = False,
        invariance_confidence: float = 0.0,
        invariance_kernel: str = "mean",
        prior_family: str = "gaussian",
        input_thinning: float = 0.0,
        dispersion: str = "gene",
        n_batches: int = 0,
    ):
        super().__init__()
        if kl_estimator not in ("analytic", "sample"):
            raise ValueError("kl_estimator must be 'analytic' or 'sample'")
        if invariance_kernel not in INVARIANCE_KERNELS:
            raise ValueError(f"invariance_kernel must be one of {INVARIANCE_KERNELS}, got {invariance_kernel!r}")
        if dispersion not in DISPERSIONS:
            raise ValueError(f"dispersion must be one of {DISPERSIONS}, got {dispersion!r}")
        if dispersion == "gene-batch" and n_batches < 1:
            raise ValueError("dispersion 'gene-batch' needs n_batches >= 1")
        if prior_family not in PRIOR_FAMILIES:
            raise ValueError(f"prior_family must be one of {PRIOR_FAMILIES}, got {prior_family!r}")
        self.prior_family = prior_family
        self.input_thinning = input_thinning
        self.n_genes, self.n_labels = n_genes, n_labels
        self.n_latent_inv, self.n_latent_spur = n_latent_inv, n_latent_spur
        self.kl_estimator, self.tc_weight = kl_estimator, tc_weight
        self.kl_inv_weight, self.kl_spur_weight = kl_inv_weight, kl_spur_weight
        n_latent = n_latent_inv + n_latent_spur
        self.covariate_dropout = covariate_dropout
        self.classifier_weight = classifier_weight
        self.invariance_weight, self.invariance_on_unlabelled = invariance_weight, invariance_on_unlabelled
        self.invariance_confidence, self.invariance_kernel = invariance_confidence, invariance_kernel
        # scANVI-style auxiliary classifier: labels as targets of z_inv (never as encoder inputs)
        # keep the invariant latent label-informative where the counts carry weak type signal
        self.classifier = InvariantClassifier(n_latent_inv, n_labels, 0) if (classifier_weight > 0 and n_labels > 1) else None
        n_enc_cov = n_spur_covariates if encode_covariates else 0
        self.encoder = GaussianEncoder(n_genes, n_enc_cov, n_latent, n_hidden, n_layers, dropout, batch_norm)
        self.decoder = CountDecoder(n_latent, n_genes, n_hidden, n_layers, dropout, batch_norm)
        self.log_theta = nn.Parameter(torch.zeros(n_genes))
        # 'gene-batch': each batch's log theta is the gene's plus an offset; the batch one-hot is spur's first n_batches columns
        self.n_batches = n_batches
        self.log_theta_batch = nn.Parameter(torch.zeros(n_batches, n_genes)) if dispersion == "gene-batch" else None
        if prior_family == "nf":
            self.prior_inv = ExponentialFamilyPrior(n_labels + n_inv_covariates, n_latent_inv, n_hidden=prior_hidden)
        else:
            self.prior_inv = ConditionalPrior(n_labels + n_inv_covariates, n_latent_inv, prior_mode, prior_hidden)
        self.prior_spur = ConditionalPrior(n_spur_covariates, n_latent_spur, prior_mode, prior_hidden)
        freq = torch.full((max(n_labels, 1),), 1.0 / max(n_labels, 1)) if label_frequencies is None else label_frequencies
        self.register_buffer("label_log_freq", torch.log(freq.clamp_min(1e-8) / freq.sum()))

    @contextlib.contextmanager
    def wide_layers_in(self, dtype: torch.dtype | None):
        """Run the gene-wide matmuls (:class:`WideLinear`) in `dtype` (bf16 mixed precision) inside
        the block; None leaves everything fp32."""
        wide = [m for m in self.modules() if isinstance(m, WideLinear)]
        for m in wide:
            m.compute_dtype = dtype
        try:
            yield
        finally:
            for m in wide:
                m.compute_dtype = None

    # -- inference ----------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, spur: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, G) counts and technical covariates (B, C_spur; zeros or None = unknown batch)
        -> posterior mean and variance (B, D). Labels are never an input."""
        return self.encoder(torch.log1p(x), spur)

    def _encoder_covariates(self, spur: torch.Tensor) -> torch.Tensor:
        """During training, hide the covariates of a random fraction of cells, so that the encoder
        also learns to encode cells of unknown (e.g. new) batches from their counts alone."""
        if not self.training or self.covariate_dropout <= 0 or spur.shape[1] == 0 or self.encoder.covariates is None:
            return spur
        keep = torch.rand(spur.shape[0], 1, device=spur.device) >= self.covariate_dropout
        return spur * keep

    def _inv_prior_input(self, label: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
        """label (B,), inv (B, C_inv) -> the input of p(z_inv | y): [one-hot label | inv] (B, K + C_inv)."""
        if self.n_labels == 0:
            return inv
        onehot = F.one_hot(label.clamp_min(0), self.n_labels).to(inv.dtype)
        if self.prior_family == "nf":  # an unknown label is an all-zero one-hot: the label-free prior
            onehot = onehot * (label >= 0).unsqueeze(-1).to(inv.dtype)
        return torch.cat([onehot, inv], dim=-1)

    def nf_kl_and_score_matching(self, z, qm, qv, label, inv) -> tuple[torch.Tensor, torch.Tensor]:
        """NFinVAE: (log q(z_inv | x) - log p~(z_inv | y), score-matching loss), each per cell (B,),
        from z, qm, qv (B, D), label (B,) and inv (B, C_inv).

        The ELBO term sees the prior with its parameters detached (its normaliser depends only on
        them, so the encoder's gradient is exact); the prior learns from score matching alone, on
        detached posterior samples. The first term is a KL up to the constant log Z(y).
        """
        z, qm, qv = (t[..., : self.n_latent_inv] for t in (z, qm, qv))
        c = self._inv_prior_input(label, inv)
        frozen = {k: v.detach() for k, v in self.prior_inv.named_parameters()}
        log_p = torch.func.functional_call(self.prior_inv, frozen, (z, c))
        kl = gaussian_log_prob(z, qm, qv) - log_p
        sm = score_matching_loss(lambda zz: self.prior_inv.log_density(zz, c), z) if self.training else torch.zeros_like(kl)
        return kl, sm

    @property
    def _fused_latent(self) -> bool:
        """Whether forward can use :meth:`latent_and_kl` (the default model: analytic KL to
        Gaussian priors with unit variance)."""
        return self.prior_family == "gaussian" and self.kl_estimator == "analytic" and self.prior_inv.unit_variance and self.prior_spur.unit_variance

    def latent_and_kl(self, x_log, encoder_covariates, label, inv, spur):
        """Encode, sample (training) and score against the priors: x_log (B, G), encoder_covariates
        (B, C_spur) or None, label (B,), inv (B, C_inv), spur (B, C_spur) -> z, qm, qv (B, D),
        kl_inv (B,), kl_spur (B,); the same quantities as encoder + kl_invariant + kl_spurious, in
        one fused kernel (:func:`gaussian_latent`)."""
        heads = self.encoder.raw(x_log, encoder_covariates)
        prior_mean = torch.cat([self.prior_inv.mean(self._inv_prior_input(label, inv)), self.prior_spur.mean(spur)], dim=-1)
        noise = torch.randn_like(prior_mean) if self.training else None
        z, qm, qv, kl_inv, kl_spur = gaussian_latent(heads, prior_mean, noise, self.n_latent_inv)
        return z, qm, qv, self._label_marginal_kl(kl_inv, z, qm, qv, label, inv), kl_spur

    def kl_invariant(self, z, qm, qv, label, inv) -> torch.Tensor:
        """KL of q(z_inv | x) to p(z_inv | y) per cell (B,), from z, qm, qv (B, D), label (B,), inv
        (B, C_inv). Unknown labels use the label-marginal prior."""
        pm, pv = self.prior_inv(self._inv_prior_input(label, inv))
        zi, qmi, qvi = (t[..., : self.n_latent_inv] for t in (z, qm, qv))
        if self.kl_estimator == "analytic":
            kl = gaussian_kl(qmi, qvi, pm, None if self.prior_inv.unit_variance else pv)
        else:
            kl = gaussian_log_prob(zi, qmi, qvi) - gaussian_log_prob(zi, pm, pv)
        return self._label_marginal_kl(kl, z, qm, qv, label, inv)

    def _label_marginal_kl(self, kl, z, qm, qv, label, inv) -> torch.Tensor:
        """`kl` (B,) with the entries of cells without a label replaced by the (Monte-Carlo) KL to
        the label-marginal prior."""
        unknown = label < 0
        if self.n_labels == 0 or not bool(unknown.any()):
            return kl
        z, qm, qv = (t[..., : self.n_latent_inv] for t in (z, qm, qv))
        # Mixture over all labels for cells without a label: log p(z) = logsumexp_k log pi_k N(z; m_k, v_k)
        zu, inv_u = z[unknown], inv[unknown]
        eye = torch.eye(self.n_labels, dtype=inv.dtype, device=inv.device)
        c = torch.cat([eye.expand(len(zu), -1, -1), inv_u[:, None, :].expand(-1, self.n_labels, -1)], dim=-1)
        pm_k, pv_k = self.prior_inv(c)  # (Bu, K, D_inv)
        log_p = torch.logsumexp(self.label_log_freq + gaussian_log_prob(zu[:, None, :], pm_k, pv_k), dim=-1)
        kl_unknown = gaussian_log_prob(zu, qm[unknown], qv[unknown]) - log_p
        return kl.masked_scatter(unknown, kl_unknown)

    def kl_spurious(self, z, qm, qv, spur) -> torch.Tensor:
        """KL of q(z_spur | x) to p(z_spur | e) per cell (B,), from z, qm, qv (B, D), spur (B, C_spur)."""
        z, qm, qv = (t[..., self.n_latent_inv :] for t in (z, qm, qv))
        pm, pv = self.prior_spur(spur)
        if self.kl_estimator == "analytic":
            return gaussian_kl(qm, qv, pm, None if self.prior_spur.unit_variance else pv)
        return gaussian_log_prob(z, qm, qv) - gaussian_log_prob(z, pm, pv)

    def total_correlation(self, z, qm, qv, dataset_size: int) -> torch.Tensor:
        """Minibatch-weighted estimate of KL(q(z_inv, z_spur) || q(z_inv) q(z_spur)) (beta-TCVAE):
        z, qm, qv (B, D) -> (B,)."""
        b = z.shape[0]
        # log q(z_i | x_j) per dimension: (B, B, D)
        log_qz_dims = -0.5 * (LOG_2PI + torch.log(qv[None]) + (z[:, None] - qm[None]) ** 2 / qv[None])
        norm = math.log(b * dataset_size)
        log_qz = torch.logsumexp(log_qz_dims.sum(-1), dim=1) - norm
        inv_part, spur_part = log_qz_dims[..., : self.n_latent_inv], log_qz_dims[..., self.n_latent_inv :]
        log_q_inv = torch.logsumexp(inv_part.sum(-1), dim=1) - norm
        log_q_spur = torch.logsumexp(spur_part.sum(-1), dim=1) - norm
        return log_qz - log_q_inv - log_q_spur

    @staticmethod
    def batch_invariance(z_inv: torch.Tensor, label_weights: torch.Tensor, env: torch.Tensor) -> torch.Tensor:
        """Between-batch scatter of z_inv within labels (scalar): sum over labels k and batches e of
        n_ke ||mean(z_inv | k, e) - mean(z_inv | k)||^2, divided by the total weight; z_inv (B, D_inv),
        label_weights (B, K) each cell's weight per label (one-hot for a known label, predicted
        probabilities or zeros otherwise), env (B,) batch codes; means are weighted by label_weights.

        Zero when, within every label, each batch's cells sit at the same mean: the first moment of
        z_inv independent of the batch given the label, which is what the invariant prior p(z_inv | y)
        assumes. The ELBO alone does not enforce it: the encoder may keep batch differences in z_inv.
        """
        total = label_weights.sum()
        if total < 2:
            return z_inv.new_zeros(())
        e = F.one_hot(env, int(env.max()) + 1).to(z_inv.dtype)  # (B, E)
        w = label_weights.to(z_inv.dtype)[:, :, None] * e[:, None, :]  # (B, K, E)
        n_ke = w.sum(0)  # (K, E)
        sum_ke = torch.einsum("bke,bd->ked", w, z_inv)  # (K, E, D)
        mean_ke = sum_ke / n_ke.clamp_min(1e-8)[..., None]
        mean_k = sum_ke.sum(1) / n_ke.sum(1).clamp_min(1e-8)[:, None]  # (K, D)
        return (n_ke * ((mean_ke - mean_k[:, None, :]) ** 2).sum(-1)).sum() / total

    @staticmethod
    def batch_invariance_mmd(z_inv: torch.Tensor, label_weights: torch.Tensor, env: torch.Tensor) -> torch.Tensor:
        """Distributional form of :meth:`batch_invariance` (scalar): for each label k and batch e, the
        unbiased squared MMD between z_inv of (k, e) cells and of label k's cells in other batches,
        clamped at 0, weighted by n_ke n_k,not e / n_k and divided by the total weight. Shapes as in
        :meth:`batch_invariance`. Gaussian kernels at 0.5, 1 and 2 times the mean squared distance
        between cells of the same label (detached), averaged.

        With a linear kernel this is the first-moment penalty; a characteristic kernel also sees
        differences in spread and shape within a label, which a mean penalty leaves in z_inv.
        Costs O(B^2) per minibatch (a B x B kernel: 64 MB per copy at B = 4096).
        """
        total = label_weights.sum()
        if total < 2:
            return z_inv.new_zeros(())
        e = F.one_hot(env, int(env.max()) + 1).to(z_inv.dtype)  # (B, E)
        lw = label_weights.to(z_inv.dtype)
        inside = (lw[:, :, None] * e[:, None, :]).flatten(1)  # (B, K*E): cells of (k, e)
        outside = (lw[:, :, None] - lw[:, :, None] * e[:, None, :]).flatten(1)  # label k, other batches
        n_in, n_out = inside.sum(0), outside.sum(0)
        # only groups with two cells on each side have an unbiased estimate; at most B such columns
        keep = (n_in >= 2) & (n_out >= 2)
        if not bool(keep.any()):
            return z_inv.new_zeros(())
        inside, outside, n_in, n_out = inside[:, keep], outside[:, keep], n_in[keep], n_out[keep]
        d2 = torch.cdist(z_inv, z_inv).pow(2)
        # bandwidths at the spread within labels, the scale the penalty compares (detached)
        same = lw @ lw.T
        same = same - torch.diag_embed(same.diagonal())
        scale = (d2.detach() * same).sum() / same.sum().clamp_min(1e-8)
        kernel = sum(torch.exp(-d2 / (f * scale).clamp_min(1e-8)) for f in (0.5, 1.0, 2.0)) / 3
        off = kernel - torch.diag_embed(kernel.diagonal())

        def within(w, n):  # unbiased: pairs of distinct cells only
            return (w * (off @ w)).sum(0) / (n * n - (w * w).sum(0)).clamp_min(1e-8)

        cross = (inside * (kernel @ outside)).sum(0) / (n_in * n_out)
        # MMD² >= 0; an estimate below 0 is noise, and minimising it pushes cells of one group
        # apart (session 18, 3 seeds: transfer +0.009 synthetic, batch correction +0.01 to +0.03)
        mmd = (within(inside, n_in) + within(outside, n_out) - 2 * cross).clamp_min(0)
        return (n_in * n_out / (n_in + n_out) * mmd).sum() / total

    def invariance_label_weights(self, qm_inv: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """(B, K): one-hot known labels. For unknown ones, when `invariance_on_unlabelled` and there
        is a classifier: the classifier's one-hot label where its probability is at least
        `invariance_confidence` (zeros elsewhere), or with `invariance_confidence` 0 its predicted
        probabilities; else zeros. Detached: they weigh the cells, the penalty does not train the
        classifier. The threshold keeps cells the classifier is unsure of, which are the ones most
        often wrong, from being pulled towards another label's cells (measured in docs/benchmarks.md)."""
        known = (label >= 0).unsqueeze(-1)
        weights = F.one_hot(label.clamp_min(0), self.n_labels).to(qm_inv.dtype) * known
        if self.invariance_on_unlabelled and self.classifier is not None and not bool(known.all()):
            with torch.no_grad():
                predicted = torch.softmax(self.classifier(qm_inv), dim=-1)
                if self.invariance_confidence > 0:
                    top, arg = predicted.max(-1)
                    predicted = F.one_hot(arg, self.n_labels).to(qm_inv.dtype) * (top >= self.invariance_confidence).unsqueeze(-1)
            weights = torch.where(known, weights, predicted)
        return weights

    # -- loss -----------------------------------------------------------------------------------
    def reconstruction_loss(self, batch: dict[str, torch.Tensor], logits: torch.Tensor, log_lib: torch.Tensor) -> torch.Tensor:
        """Mean NB negative log-likelihood per cell (scalar) of x = batch["x"] (B, G) given mu = lib
        softmax(logits), logits (B, G), log_lib (B, 1). Fused kernels (:func:`nb_log_prob_dense`,
        :func:`count_lgamma_sum`) when the loader gives per-gene count summaries, else the plain
        :func:`negative_binomial_log_prob`, which is also the one for per-batch thetas (the fused kernels take
        one theta per gene)."""
        x = batch["x"]
        log_theta = self.log_theta
        if self.log_theta_batch is not None:  # (B, G): the gene's log theta plus the cell's batch offset
            log_theta = log_theta + batch["spur"][:, : self.n_batches] @ self.log_theta_batch
        log_theta = clamp(log_theta, -12.0, 12.0)  # theta in [6e-6, 2e5]: keeps exp(log mu - log theta) finite
        if "count_at_least" not in batch or self.log_theta_batch is not None:
            log_mu = F.log_softmax(logits.float(), dim=-1) + log_lib
            return -negative_binomial_log_prob(x, log_mu, log_theta).mean()
        total = (
            nb_log_prob_dense(x, logits, log_lib, log_theta).sum()
            + count_lgamma_sum(log_theta, batch["count_at_least"], batch["tail_cols"], batch["tail_vals"])
            - batch["log_x_factorial"].sum()
        )
        return -total / x.shape[0]

    def thinned_log1p(self, x: torch.Tensor) -> torch.Tensor:
        """log1p of (B, G) counts binomially thinned per cell to a capture fraction from [input_thinning, 1]:
        the encoder learns to place a shallower copy of a cell where the cell is (a lower-capture technology)."""
        keep = torch.empty(x.shape[0], 1, device=x.device).uniform_(self.input_thinning, 1.0).expand_as(x)
        nonzero = x > 0  # binomial draws only where there are counts (~20 % of entries)
        thinned = torch.zeros_like(x)
        thinned[nonzero] = torch.binomial(x[nonzero], keep[nonzero])
        return torch.log1p(thinned)

    def forward(self, batch: dict[str, torch.Tensor], kl_weight: float = 1.0, dataset_size: int = 1) -> dict[str, torch.Tensor]:
        """Per-minibatch mean losses (scalars): 'loss', 'reconstruction', 'kl_inv', 'kl_spur', 'tc',
        'classification', 'score_matching', 'invariance'.

        batch: x (B, G) counts, label (B,), inv (B, C_inv), spur (B, C_spur); optionally env (B,)
        batch codes (for the invariance penalty), x_log
        (B, G) log1p counts (fp32 or bf16) and the loader's likelihood terms: log_lib (B, 1),
        log_x_factorial (B,), count_at_least (G, K), tail_cols and tail_vals (T,).
        """
        x = batch["x"]
        x_log = batch["x_log"] if "x_log" in batch else torch.log1p(x)
        if self.training and self.input_thinning > 0:
            x_log = self.thinned_log1p(x).to(x_log.dtype)
        label, inv, spur = batch["label"], batch["inv"], batch["spur"]
        encoder_covariates = self._encoder_covariates(spur)
        score_matching = torch.zeros((), device=x.device)
        if self._fused_latent:
            z, qm, qv, kl_inv, kl_spur = self.latent_and_kl(x_log, encoder_covariates, label, inv, spur)
        else:
            qm, qv = self.encoder(x_log, encoder_covariates)
            z = qm + qv.sqrt() * torch.randn_like(qm) if self.training else qm
            if self.prior_family == "nf":
                kl_inv, sm = self.nf_kl_and_score_matching(z, qm, qv, label, inv)
                score_matching = sm.mean()
                kl_spur = self.kl_spurious(z, qm, qv, spur)
            else:
                kl_inv, kl_spur = self.kl_invariant(z, qm, qv, label, inv), self.kl_spurious(z, qm, qv, spur)
        log_lib = batch["log_lib"] if "log_lib" in batch else torch.log(x.sum(-1, keepdim=True).clamp_min(1.0))
        recon = self.reconstruction_loss(batch, self.decoder(z), log_lib)
        kl_inv, kl_spur = kl_inv.mean(), kl_spur.mean()
        loss = recon + kl_weight * (self.kl_inv_weight * kl_inv + self.kl_spur_weight * kl_spur)
        if self.prior_family == "nf":
            loss = loss + score_matching
        classification = torch.zeros((), device=x.device)
        if self.classifier is not None:  # unlabelled cells (-1) are ignored; a batch without labels adds 0
            n_labelled = (label >= 0).sum().clamp_min(1)
            logits = self.classifier(qm[:, : self.n_latent_inv])
            classification = F.cross_entropy(logits, label, ignore_index=-1, reduction="sum") / n_labelled
            loss = loss + self.classifier_weight * classification
        invariance = torch.zeros((), device=x.device)
        if self.invariance_weight > 0 and "env" in batch and self.n_labels > 1:
            qm_inv = qm[:, : self.n_latent_inv]
            penalty = self.batch_invariance_mmd if self.invariance_kernel == "mmd" else self.batch_invariance
            invariance = penalty(qm_inv, self.invariance_label_weights(qm_inv, label), batch["env"])
            loss = loss + self.invariance_weight * invariance
        tc = torch.zeros_like(kl_inv)
        if self.tc_weight > 0 and self.n_latent_spur > 0 and self.n_latent_inv > 0:
            tc = self.total_correlation(z, qm, qv, dataset_size).mean()
            loss = loss + self.tc_weight * tc
        return {
            "loss": loss,
            "reconstruction": recon,
            "kl_inv": kl_inv,
            "kl_spur": kl_spur,
            "tc": tc,
            "classification": classification,
            "score_matching": score_matching,
            "invariance": invariance,
        }
