"""Pure torch modules of inVAE: encoder, decoder, conditional priors, losses, invariant predictor.

Notation: B cells in a minibatch, G genes, D = D_inv + D_spur latent dimensions, K labels.
The latent is z = [z_inv | z_spur]. z_inv has the prior p(z_inv | y) with y = (label, biological
covariates); z_spur has the prior p(z_spur | e) with e = (batch, technical covariates). The
decoder sees z only, so technical variation must flow through z_spur.

Differences from the reference implementation (theislab/inVAE 0.1.0), each deliberate:
- the encoder sees the counts only, never the labels (no label leakage into query latents);
- no dropout/batch norm after final layers (including prior log-variances), one linear map
  before the softmax;
- cells with unknown labels get the label-marginal prior: a mixture of the label-conditional
  priors weighted by the label frequencies (Monte-Carlo KL), instead of a fake label.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

PRIOR_MODES = ("mean", "variance", "both")
PRIOR_FAMILIES = ("gaussian", "nf")  # nf: NFinVAE's exponential-family prior for z_inv
_LOG_2PI = math.log(2 * math.pi)
_LN_2 = math.log(2.0)
_LOG_VAR_MIN, _LOG_VAR_MAX, _VAR_FLOOR = -12.0, 8.0, 1e-6  # posterior variance = exp(clamped log var) + floor
_LOG2_E = 1.0 / _LN_2


def _clamp(t: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """torch.clamp with the same gradient (zero outside [low, high]) from one backward kernel:
    hardtanh's, where clamp's backward builds boolean masks (~20 us more per call on CPU)."""
    return F.hardtanh(t, low, high)


class WideLinear(nn.Linear):
    """A linear layer across all genes: the encoder's input layer and the decoder's output layer,
    which hold ~95 % of the FLOPs. With `compute_dtype` set (bf16, see
    :meth:`InVAEModule.wide_layers_in`), only their matmuls run in it; parameters, gradients and
    every other layer stay fp32. Autocast would also cast around the small layers, which on CPU
    costs more than bf16 saves there."""

    compute_dtype: torch.dtype | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = self.compute_dtype
        if dt is None:
            return super().forward(x.to(self.weight.dtype))  # the loader may hand over bf16 inputs
        return F.linear(x.to(dt), self.weight.to(dt), None if self.bias is None else self.bias.to(dt))


class Dropout(nn.Module):
    """Inverted dropout whose mask comes from 16 random bits per unit, drawn 64 at a time.

    Same semantics as nn.Dropout (p quantised to 1/65536), but torch's CPU `bernoulli_` draws
    one random number per element and cost ~7 % of a training step on CPU; this is ~2.5x cheaper.
    The bits come from torch's generator, so `seed` still makes runs reproducible.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.threshold = round(p * 65536) - 32768  # keep where the int16 draw >= threshold

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p <= 0:
            return h
        n = h.numel()
        bits = torch.empty(n // 4 + 1, dtype=torch.int64, device=h.device).random_(-(2**63), None)
        mask = self.mask(bits.view(torch.int16)[:n].view(h.shape))
        return h * (mask if h.dtype == mask.dtype else mask.to(h.dtype))

    def mask(self, draws: torch.Tensor) -> torch.Tensor:
        """int16 draws -> fp32 1 / (1 - p) where draw >= threshold, else 0. By arithmetic, because
        comparisons and bool tensors take CPU kernels ~5x slower than float ones (~100 vs ~20 us
        per 256 x 128 layer); the draws are integers, exact in fp32."""
        return draws.to(torch.float32).sub_(self.threshold - 1).clamp_(0.0, 1.0).mul_(1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


class HiddenStack(nn.Sequential):
    """(Linear -> [BatchNorm] -> ReLU -> [Dropout]) x n_layers, built by :func:`mlp`.

    A Linear followed by batch norm has no bias: the norm subtracts the batch mean, so a bias
    would get a zero gradient in training and only shift the running mean. Dropping it saves an
    op and an autograd node per layer. Models saved with those biases load exactly: each bias is
    folded into the running mean it shifted.
    """

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for i in range(len(self) - 1):
            linear, norm = self[i], self[i + 1]
            key = f"{prefix}{i}.bias"
            if isinstance(linear, nn.Linear) and linear.bias is None and isinstance(norm, nn.BatchNorm1d) and key in state_dict:
                bias = state_dict.pop(key)
                mean_key = f"{prefix}{i + 1}.running_mean"
                if mean_key in state_dict:
                    state_dict[mean_key] = state_dict[mean_key] - bias
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def mlp(n_in: int, n_hidden: int, n_layers: int, dropout: float, batch_norm: bool, wide_input: bool = False) -> HiddenStack:
    """Hidden stack: (Linear -> [BatchNorm] -> ReLU -> [Dropout]) x n_layers. No output layer."""
    layers: list[nn.Module] = []
    for i in range(n_layers):
        linear = WideLinear if (i == 0 and wide_input) else nn.Linear
        layers.append(linear(n_in if i == 0 else n_hidden, n_hidden, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm1d(n_hidden, momentum=0.01, eps=1e-3))
        layers.append(nn.ReLU())
        if dropout > 0:
            layers.append(Dropout(dropout))
    return HiddenStack(*layers)


class GaussianEncoder(nn.Module):
    """q(z | x, e): log1p counts (B, G) and technical covariates e (B, C) -> mean, variance (B, D).

    The covariates enter through their own bias-free linear map added to the first layer, so that
    new batches can be added as new columns (query mapping) and an all-zero e means "batch
    unknown" (trained by covariate dropout). Labels are never an input.
    """

    def __init__(self, n_genes: int, n_covariates: int, n_latent: int, n_hidden: int, n_layers: int, dropout: float, batch_norm: bool):
        super().__init__()
        self.body = mlp(n_genes, n_hidden, n_layers, dropout, batch_norm, wide_input=True)
        self.covariates = nn.Linear(n_covariates, n_hidden, bias=False) if n_covariates > 0 else None
        self.n_latent = n_latent
        self.heads = nn.Linear(n_hidden, 2 * n_latent)  # [mean | log variance]: one matmul, not two

    def forward(self, x_log: torch.Tensor, e: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_var = self.raw(x_log, e).split(self.n_latent, dim=-1)
        return mean, torch.exp(_clamp(log_var, _LOG_VAR_MIN, _LOG_VAR_MAX)) + _VAR_FLOOR

    def raw(self, x_log: torch.Tensor, e: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 2 D): [mean | unclamped log variance], before the posterior transform of forward."""
        h = self.body[0](x_log).float()
        if self.covariates is not None and e is not None:
            h = h + self.covariates(e)
        return self.heads(self.body[1:](h))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # models saved before the heads were fused had separate `mean` and `log_var` layers
        for kind in ("weight", "bias"):
            old = [f"{prefix}mean.{kind}", f"{prefix}log_var.{kind}"]
            if all(k in state_dict for k in old):
                state_dict[f"{prefix}heads.{kind}"] = torch.cat([state_dict.pop(k) for k in old])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class CountDecoder(nn.Module):
    """p(x | z): z (B, D) -> logits (B, G) of the expected expression fraction per gene (softmax)."""

    def __init__(self, n_latent: int, n_genes: int, n_hidden: int, n_layers: int, dropout: float, batch_norm: bool):
        super().__init__()
        self.body = mlp(n_latent, n_hidden, n_layers, dropout, batch_norm)
        self.out = WideLinear(n_hidden, n_genes)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Logits (B, G), in the wide layers' compute dtype; the likelihood applies the softmax in fp32."""
        return self.out(self.body(z))


class ConditionalPrior(nn.Module):
    """Diagonal Gaussian p(z | c) whose parameters are a small MLP of covariates c (B, C).

    mode 'mean': learned mean, unit variance; 'variance': zero mean, learned variance (the
    reference default); 'both': both learned. With no covariates (C = 0) it is N(0, I).
    """

    def __init__(self, n_covariates: int, n_latent: int, mode: str = "mean", n_hidden: int = 64):
        super().__init__()
        if mode not in PRIOR_MODES:
            raise ValueError(f"prior mode must be one of {PRIOR_MODES}, got {mode!r}")
        self.mode, self.n_latent, self.n_covariates = mode, n_latent, n_covariates
        self.net = None
        if n_covariates > 0 and n_latent > 0:
            n_out = 2 * n_latent if mode == "both" else n_latent
            self.net = nn.Sequential(nn.Linear(n_covariates, n_hidden), nn.ReLU(), nn.Linear(n_hidden, n_out))

    @property
    def unit_variance(self) -> bool:
        """Whether the variance is fixed at 1 (then the KL needs no division by it)."""
        return self.mode == "mean" or self.net is None

    def mean(self, c: torch.Tensor) -> torch.Tensor:
        """The prior mean alone (..., D), for unit-variance priors (no ones tensor to build)."""
        if self.net is None:
            return c.new_zeros(c.shape[:-1] + (self.n_latent,))
        out = self.net(c)
        return out if self.mode == "mean" else out[..., : self.n_latent]

    def forward(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """c (..., C) -> mean (..., D), variance (..., D)."""
        if self.net is None:
            zeros = c.new_zeros(c.shape[:-1] + (self.n_latent,))
            return zeros, torch.ones_like(zeros)
        out = self.net(c)
        if self.mode == "mean":
            return out, torch.ones_like(out)
        if self.mode == "variance":
            return torch.zeros_like(out), torch.exp(_clamp(out, -8.0, 8.0))
        mean, log_var = out.chunk(2, dim=-1)
        return mean, torch.exp(_clamp(log_var, -8.0, 8.0))


class ExponentialFamilyPrior(nn.Module):
    """NFinVAE's non-factorised exponential-family prior for z_inv, unnormalised:

        log p~(z | c) = <z, l1(c)> - <z^2, softplus(l2(c))> + <t(z), l3(c)>       (B,)

    t (D -> S) is a small MLP of the whole z (tanh output, so the quadratic term dominates and the
    density stays normalisable) that lets dimensions interact; l = (l1, l2, l3) is an MLP of the
    covariates c (B, C) with the same first layer shape as :class:`ConditionalPrior` (a zero c,
    e.g. an unknown label, is the label-free prior). Its normaliser is intractable, so its
    parameters are fitted by score matching on posterior samples (:func:`score_matching_loss`),
    not through the ELBO.
    """

    def __init__(self, n_covariates: int, n_latent: int, n_stats: int = 16, n_hidden: int = 64):
        super().__init__()
        self.n_latent, self.n_stats, self.n_covariates = n_latent, n_stats, n_covariates
        n_out = 2 * n_latent + n_stats
        self.net = nn.Sequential(nn.Linear(max(n_covariates, 1), n_hidden), nn.ReLU(), nn.Linear(n_hidden, n_out))
        # softplus/tanh: smooth, so the score's derivative (the Hessian diagonal) is informative
        self.stats = nn.Sequential(nn.Linear(n_latent, n_hidden), nn.Softplus(), nn.Linear(n_hidden, n_stats), nn.Tanh())

    def natural_parameters(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.n_covariates == 0:
            c = c.new_zeros(c.shape[:-1] + (1,))
        lam = self.net(c)
        l1, l2, l3 = lam.split([self.n_latent, self.n_latent, self.n_stats], dim=-1)
        return l1, F.softplus(l2) + 1e-3, l3

    def forward(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.log_density(z, c)

    def log_density(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Unnormalised log p~(z | c) per cell: z (B, D), c (B, C) -> (B,)."""
        l1, l2, l3 = self.natural_parameters(c)
        return (z * l1).sum(-1) - (z * z * l2).sum(-1) + (self.stats(z) * l3).sum(-1)


def score_matching_loss(log_density, z: torch.Tensor) -> torch.Tensor:
    """Hyvarinen score matching per cell (B,): sum_i [ d^2 log p / dz_i^2 + 1/2 (d log p / dz_i)^2 ].

    `log_density` maps z (B, D) to (B,), cells independent. The second-derivative term is the
    exact Hessian diagonal (one backward pass per latent dimension), not the row sums
    sum_j d^2 log p / dz_i dz_j that the reference NFinVAE code uses; the two differ whenever the
    density is non-factorised, which is the point of this prior.
    """
    z = z.detach().requires_grad_(True)
    with torch.enable_grad():
        score = torch.autograd.grad(log_density(z).sum(), z, create_graph=True)[0]  # (B, D)
        diag = [torch.autograd.grad(score[:, i].sum(), z, create_graph=True)[0][:, i] for i in range(z.shape[1])]
    return torch.stack(diag, dim=-1).sum(-1) + 0.5 * (score * score).sum(-1)


class _GaussianLatent(torch.autograd.Function):
    """Posterior, reparameterised sample and analytic KL to unit-variance priors in one autograd node.

    Inputs: heads (B, 2 D) [mean | raw log variance] from the encoder, prior_mean (B, D), noise
    (B, D) standard normal or None (then z is the mean), n_inv = D_inv. Returns z, qm, qv (B, D)
    and the KL of each block summed per cell, kl_inv (B,) and kl_spur (B,), with

        qv = exp(clamp(log var)) + floor,   z = qm + sqrt(qv) noise,
        KL(N(qm, qv) || N(pm, 1)) = (qv - log qv + (qm - pm)^2 - 1) / 2 per dimension.

    The same expressions in autograd take ~15 nodes on (B, D) tensors; on CPU their framework
    time (~9 us per node) exceeds their arithmetic. Gradients:
    dz/dqm = 1, dz/dqv = noise / (2 sqrt(qv)), dKL/dqm = qm - pm = -dKL/dpm, dKL/dqv = (1 - 1/qv) / 2,
    dqv/dlog var = qv - floor inside the clamp, 0 outside.
    """

    @staticmethod
    def forward(ctx, heads, prior_mean, noise, n_inv: int):
        qm, raw_log_var = heads.split(prior_mean.shape[-1], dim=-1)
        qv = F.hardtanh(raw_log_var, _LOG_VAR_MIN, _LOG_VAR_MAX).exp_().add_(_VAR_FLOOR)
        std = qv.sqrt()
        z = torch.addcmul(qm, std, noise) if noise is not None else qm.clone()
        diff = qm - prior_mean
        kl = (qv - qv.log()).addcmul_(diff, diff).sub_(1.0).mul_(0.5)
        ctx.save_for_backward(raw_log_var, qv, std, diff, noise)
        ctx.n_inv = n_inv
        ctx.set_materialize_grads(False)  # unused outputs (often qv) get None, not a zero tensor to add
        qm = qm.contiguous()
        return z, qm, qv, kl[:, :n_inv].sum(-1), kl[:, n_inv:].sum(-1)

    @staticmethod
    def backward(ctx, g_z, g_qm, g_qv, g_kl_inv, g_kl_spur):
        raw_log_var, qv, std, diff, noise = ctx.saved_tensors
        n = ctx.n_inv
        g_kl = torch.zeros_like(qv)  # per-dimension weight of each block's KL
        if g_kl_inv is not None:
            g_kl[:, :n] = g_kl_inv[:, None]
        if g_kl_spur is not None:
            g_kl[:, n:] = g_kl_spur[:, None]
        g_prior_mean = g_kl * diff
        g_mean = g_prior_mean.clone() if g_qm is None else torch.add(g_qm, g_prior_mean)
        g_var = (1.0 - qv.reciprocal()).mul_(0.5).mul_(g_kl)
        if g_qv is not None:
            g_var += g_qv
        if g_z is not None:
            g_mean += g_z
            if noise is not None:
                g_var.addcmul_(g_z, noise / (2.0 * std))
        g_log_var = torch.ops.aten.hardtanh_backward(g_var.mul_(qv - _VAR_FLOOR), raw_log_var, _LOG_VAR_MIN, _LOG_VAR_MAX)
        return torch.cat([g_mean, g_log_var], dim=-1), g_prior_mean.neg_(), None, None


def gaussian_log_prob(z: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """Sum over the last dimension of log N(z; mean, diag(var))."""
    return -0.5 * (_LOG_2PI + torch.log(var) + (z - mean) ** 2 / var).sum(-1)


def gaussian_kl_terms(qm: torch.Tensor, qv: torch.Tensor, pm: torch.Tensor, pv: torch.Tensor | None) -> torch.Tensor:
    """KL(N(qm, qv) || N(pm, pv)) per dimension (same shape as qm); pv None is unit variance (fewer ops)."""
    if pv is None:
        return 0.5 * (qv - torch.log(qv) + (qm - pm).square() - 1.0)
    return 0.5 * (torch.log(pv / qv) + (qv + (qm - pm) ** 2) / pv - 1.0)


def gaussian_kl(qm: torch.Tensor, qv: torch.Tensor, pm: torch.Tensor, pv: torch.Tensor | None) -> torch.Tensor:
    """KL(N(qm, qv) || N(pm, pv)) summed over the last dimension; pv None is unit variance."""
    return gaussian_kl_terms(qm, qv, pm, pv).sum(-1)


def _one_thread_cpu(t: torch.Tensor) -> bool:
    """Whether to run a transcendental pass over `t` with numpy's SIMD kernels: on one CPU thread
    they are 1.4-3.6x faster than torch's (per 256 x 2000 fp32: exp2 110 vs 160 us, log1p 220 vs
    400 us, log 190 vs 690 us); from two threads on torch parallelises and wins."""
    return t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) and torch.get_num_threads() == 1


def _transcendental(t: torch.Tensor, numpy_fn, torch_fn, inplace: bool = False) -> torch.Tensor:
    """numpy_fn(t) on one CPU thread (see _one_thread_cpu), else torch_fn(t); in place or into a new
    tensor from torch's allocator (numpy's would fault in fresh pages every step)."""
    if not (_one_thread_cpu(t) and t.is_contiguous()):
        return torch_fn(t, out=t) if inplace else torch_fn(t)
    out = t if inplace else torch.empty_like(t)
    numpy_fn(t.numpy(), out=out.numpy())
    return out


class _NBFromLogits(torch.autograd.Function):
    """Dense part of the NB log-likelihood per cell (B,) straight from decoder logits (B, G):

        sum_g x d - (x + theta) softplus(d),   d = log mu - log theta,   mu = lib softmax(logits).

    The x-only lgamma terms are left out (see count_lgamma_sum). The softmax is fused into the
    likelihood with a hand-written backward: the forward takes two transcendental passes over
    (B, G) (exp2 of the shifted logits, log1p) where autograd of the same expressions takes six,
    and d itself is never materialised (sum_g x d is a dot product with the shifted logits plus
    per-row and per-gene constants). On CPU these passes dominate the step after the matmuls.
    Gradients: dL/dd = x - (x + theta) sigmoid(d); dL/dlogits = dL/dd - softmax * sum_g dL/dd;
    dL/dlog theta = -sum_b dL/dd - theta sum_b softplus(d).
    """

    @staticmethod
    def forward(ctx, x, logits, log_lib, log_theta):
        theta = log_theta.exp()
        # t = (logits - row max) log2(e) in fp32, in place on a copy; softmax = 2^t / sum 2^t
        t = logits.to(x.dtype, copy=True)
        t.mul_(_LOG2_E).sub_(t.amax(-1, keepdim=True))
        x_dot_t = torch.linalg.vecdot(x, t)
        # t is 2^t from here on (torch's CPU exp2 is also 2.5x faster than its exp)
        e = _transcendental(t, np.exp2, torch.exp2, inplace=True)
        log_sum = e.sum(-1, keepdim=True).log_()
        # e = mu / theta = lib 2^t / (sum 2^t theta), finite because log theta is clamped in the module
        e.mul_(torch.exp(log_lib - log_sum)).mul_(torch.exp(-log_theta))
        sp = _transcendental(e, np.log1p, torch.log1p)  # softplus(d)
        # sum_g x d, with d = t ln 2 + (log lib - log sum) - log theta
        x_dot_d = x_dot_t * _LN_2 + (log_lib - log_sum).squeeze(1) * x.sum(-1) - x @ log_theta
        out = x_dot_d - torch.linalg.vecdot(x, sp) - sp @ theta
        ctx.save_for_backward(x, e, sp, theta, log_lib)
        ctx.logits_dtype = logits.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        x, e, sp, theta, log_lib = ctx.saved_tensors
        grad = grad.to(e.dtype)
        mu = e * theta
        # x - (x + theta) sigmoid(d) = (x - theta e) / (1 + e): four passes over (B, G) instead of six
        grad_d = torch.sub(x, mu).div_(e + 1.0).mul_(grad[:, None])
        grad_log_theta = -grad_d.sum(0) - theta * (grad @ sp)
        # minus softmax * row sum, with softmax = mu / lib, in one pass
        grad_logits = grad_d.addcmul_(mu, grad_d.sum(-1, keepdim=True) / log_lib.exp(), value=-1.0)
        return None, grad_logits.to(ctx.logits_dtype), None, grad_log_theta


def nb_log_prob_dense(x: torch.Tensor, logits: torch.Tensor, log_lib: torch.Tensor, log_theta: torch.Tensor) -> torch.Tensor:
    """x (B, G) counts, logits (B, G), log_lib (B, 1), log_theta (G,) -> (B,); see _NBFromLogits."""
    return _NBFromLogits.apply(x, logits, log_lib, log_theta)


def negative_binomial_log_prob(x: torch.Tensor, log_mu: torch.Tensor, log_theta: torch.Tensor) -> torch.Tensor:
    """log NB(x; mean mu, inverse dispersion theta) per cell, summed over genes.

    x (B, G) counts, log_mu (B, G), log_theta (G,). Plain autograd: the reference the fast path
    (nb_log_prob_dense + count_lgamma_sum) is tested against.
    """
    theta = log_theta.exp()
    log_mu_theta = torch.logaddexp(log_mu, log_theta)  # log(mu + theta)
    return (torch.lgamma(x + theta) - torch.lgamma(theta) - torch.lgamma(x + 1.0) + theta * (log_theta - log_mu_theta) + x * (log_mu - log_mu_theta)).sum(-1)


class _CountLgammaSum(torch.autograd.Function):
    """sum over non-zero entries of lgamma(x + theta_g) - lgamma(theta_g) (a scalar), from counts
    summarised per gene.

    at_least (G, K): how many entries of gene g exceed j, counting entries up to K only; entries
    above K come as (tail_cols, tail_vals). Counts are small (above 16 is ~0.5 % of entries), so this
    costs G x K terms instead of one lgamma pair per non-zero entry. For integer x, lgamma(x + theta)
    - lgamma(theta) = sum_{j < x} log(theta + j), so the total is sum_{g, j} at_least[g, j]
    log(theta_g + j): G x K logs, whose gradient is reciprocals rather than digammas, and which does
    not cancel two large lgammas in fp32 (lgamma(1e5) ~ 1e6, fp32 spacing 0.06). One autograd node
    instead of a dozen: on CPU each costs ~9 us of framework time, more than its arithmetic here.
    """

    @staticmethod
    def forward(ctx, log_theta, at_least, tail_cols, tail_vals):
        theta = log_theta.exp()
        shifted = theta[:, None] + torch.arange(at_least.shape[1], device=theta.device, dtype=theta.dtype)  # theta_g + j
        tail_theta = theta[tail_cols]
        tail = torch.lgamma(tail_vals + tail_theta).sub_(torch.lgamma(tail_theta)).sum()
        ctx.save_for_backward(theta, shifted, at_least, tail_cols, tail_vals, tail_theta)
        return torch.linalg.vecdot(at_least.flatten(), _transcendental(shifted, np.log, torch.log).flatten()) + tail

    @staticmethod
    def backward(ctx, grad):
        theta, shifted, at_least, tail_cols, tail_vals, tail_theta = ctx.saved_tensors
        d_theta = (at_least / shifted).sum(1)  # d/dtheta_g of sum_j at_least log(theta_g + j)
        d_theta.index_add_(0, tail_cols, torch.digamma(tail_vals + tail_theta).sub_(torch.digamma(tail_theta)))
        return grad * theta * d_theta, None, None, None


def count_lgamma_sum(log_theta: torch.Tensor, at_least: torch.Tensor, tail_cols: torch.Tensor, tail_vals: torch.Tensor) -> torch.Tensor:
    """log_theta (G,), at_least (G, K), tail_cols / tail_vals (T,) -> scalar; see _CountLgammaSum."""
    return _CountLgammaSum.apply(log_theta, at_least, tail_cols, tail_vals)


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
        tc_weight: float = 0.0,
        label_frequencies: torch.Tensor | None = None,
        encode_covariates: bool = False,
        covariate_dropout: float = 0.2,
        classifier_weight: float = 0.0,
        prior_family: str = "gaussian",
    ):
        super().__init__()
        if kl_estimator not in ("analytic", "sample"):
            raise ValueError("kl_estimator must be 'analytic' or 'sample'")
        if prior_family not in PRIOR_FAMILIES:
            raise ValueError(f"prior_family must be one of {PRIOR_FAMILIES}, got {prior_family!r}")
        self.prior_family = prior_family
        self.n_genes, self.n_labels = n_genes, n_labels
        self.n_latent_inv, self.n_latent_spur = n_latent_inv, n_latent_spur
        self.kl_estimator, self.tc_weight = kl_estimator, tc_weight
        n_latent = n_latent_inv + n_latent_spur
        self.covariate_dropout = covariate_dropout
        self.classifier_weight = classifier_weight
        # scANVI-style auxiliary classifier: labels as targets of z_inv (never as encoder inputs)
        # keep the invariant latent label-informative where the counts carry weak type signal
        self.classifier = InvariantClassifier(n_latent_inv, n_labels, 0) if (classifier_weight > 0 and n_labels > 1) else None
        n_enc_cov = n_spur_covariates if encode_covariates else 0
        self.encoder = GaussianEncoder(n_genes, n_enc_cov, n_latent, n_hidden, n_layers, dropout, batch_norm)
        self.decoder = CountDecoder(n_latent, n_genes, n_hidden, n_layers, dropout, batch_norm)
        self.log_theta = nn.Parameter(torch.zeros(n_genes))
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
        if self.n_labels == 0:
            return inv
        onehot = F.one_hot(label.clamp_min(0), self.n_labels).to(inv.dtype)
        if self.prior_family == "nf":  # an unknown label is an all-zero one-hot: the label-free prior
            onehot = onehot * (label >= 0).unsqueeze(-1).to(inv.dtype)
        return torch.cat([onehot, inv], dim=-1)

    def nf_kl_and_score_matching(self, z, qm, qv, label, inv) -> tuple[torch.Tensor, torch.Tensor]:
        """NFinVAE: (log q(z_inv | x) - log p~(z_inv | y), score-matching loss), each per cell (B,).

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
        """Whether forward can use :class:`_GaussianLatent` (the default model: analytic KL to
        Gaussian priors with unit variance)."""
        return self.prior_family == "gaussian" and self.kl_estimator == "analytic" and self.prior_inv.unit_variance and self.prior_spur.unit_variance

    def latent_and_kl(self, x_log, encoder_covariates, label, inv, spur):
        """Encode, sample (training) and score against the priors: z, qm, qv (B, D), kl_inv (B,),
        kl_spur (B,); the same quantities as encoder + kl_invariant + kl_spurious, in fewer
        autograd nodes."""
        heads = self.encoder.raw(x_log, encoder_covariates)
        prior_mean = torch.cat([self.prior_inv.mean(self._inv_prior_input(label, inv)), self.prior_spur.mean(spur)], dim=-1)
        noise = torch.randn_like(prior_mean) if self.training else None
        z, qm, qv, kl_inv, kl_spur = _GaussianLatent.apply(heads, prior_mean, noise, self.n_latent_inv)
        return z, qm, qv, self._label_marginal_kl(kl_inv, z, qm, qv, label, inv), kl_spur

    def kl_invariant(self, z, qm, qv, label, inv) -> torch.Tensor:
        """KL of q(z_inv | x) to p(z_inv | y) per cell (B,). Unknown labels use the label-marginal prior."""
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
        z, qm, qv = (t[..., self.n_latent_inv :] for t in (z, qm, qv))
        pm, pv = self.prior_spur(spur)
        if self.kl_estimator == "analytic":
            return gaussian_kl(qm, qv, pm, None if self.prior_spur.unit_variance else pv)
        return gaussian_log_prob(z, qm, qv) - gaussian_log_prob(z, pm, pv)

    def total_correlation(self, z, qm, qv, dataset_size: int) -> torch.Tensor:
        """Minibatch-weighted estimate of KL(q(z_inv, z_spur) || q(z_inv) q(z_spur)) (beta-TCVAE)."""
        b = z.shape[0]
        # log q(z_i | x_j) per dimension: (B, B, D)
        log_qz_dims = -0.5 * (_LOG_2PI + torch.log(qv[None]) + (z[:, None] - qm[None]) ** 2 / qv[None])
        norm = math.log(b * dataset_size)
        log_qz = torch.logsumexp(log_qz_dims.sum(-1), dim=1) - norm
        inv_part, spur_part = log_qz_dims[..., : self.n_latent_inv], log_qz_dims[..., self.n_latent_inv :]
        log_q_inv = torch.logsumexp(inv_part.sum(-1), dim=1) - norm
        log_q_spur = torch.logsumexp(spur_part.sum(-1), dim=1) - norm
        return log_qz - log_q_inv - log_q_spur

    # -- loss -----------------------------------------------------------------------------------
    def reconstruction_loss(self, batch: dict[str, torch.Tensor], logits: torch.Tensor, log_lib: torch.Tensor) -> torch.Tensor:
        """Mean NB negative log-likelihood per cell (scalar) of mu = lib * softmax(logits) (B, G);
        fast path when the loader gives per-gene count summaries."""
        x = batch["x"]
        log_theta = _clamp(self.log_theta, -12.0, 12.0)  # theta in [6e-6, 2e5]: keeps exp(log mu - log theta) finite
        if "count_at_least" not in batch:
            log_mu = F.log_softmax(logits.float(), dim=-1) + log_lib
            return -negative_binomial_log_prob(x, log_mu, log_theta).mean()
        total = (
            nb_log_prob_dense(x, logits, log_lib, log_theta).sum()
            + count_lgamma_sum(log_theta, batch["count_at_least"], batch["tail_cols"], batch["tail_vals"])
            - batch["log_x_factorial"].sum()
        )
        return -total / x.shape[0]

    def forward(self, batch: dict[str, torch.Tensor], kl_weight: float = 1.0, dataset_size: int = 1) -> dict[str, torch.Tensor]:
        """Return per-minibatch mean losses: 'loss', 'reconstruction', 'kl_inv', 'kl_spur', 'tc'."""
        x = batch["x"]
        x_log = batch["x_log"] if "x_log" in batch else torch.log1p(x)
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
        loss = recon + kl_weight * (kl_inv + kl_spur)
        if self.prior_family == "nf":
            loss = loss + score_matching
        classification = torch.zeros((), device=x.device)
        if self.classifier is not None:  # unlabelled cells (-1) are ignored; a batch without labels adds 0
            n_labelled = (label >= 0).sum().clamp_min(1)
            logits = self.classifier(qm[:, : self.n_latent_inv])
            classification = F.cross_entropy(logits, label, ignore_index=-1, reduction="sum") / n_labelled
            loss = loss + self.classifier_weight * classification
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
        }


class InvariantClassifier(nn.Module):
    """Predicts labels from z_inv (B, D_inv) -> logits (B, K). Linear when n_hidden == 0."""

    def __init__(self, n_latent_inv: int, n_labels: int, n_hidden: int = 64, dropout: float = 0.1):
        super().__init__()
        if n_hidden > 0:
            self.net = nn.Sequential(nn.Linear(n_latent_inv, n_hidden), nn.ReLU(), Dropout(dropout), nn.Linear(n_hidden, n_labels))
        else:
            self.net = nn.Linear(n_latent_inv, n_labels)

    def forward(self, z_inv: torch.Tensor) -> torch.Tensor:
        return self.net(z_inv)


def environment_risks(logits: torch.Tensor, labels: torch.Tensor, envs: torch.Tensor, n_envs: int, scale: torch.Tensor | None = None):
    """Per-environment mean cross-entropy (n_envs,) and a mask of environments present.

    `scale` (n_envs,) multiplies the logits of each environment (the IRMv1 dummy classifier).
    """
    if scale is not None:
        logits = logits * scale[envs][:, None]
    ce = F.cross_entropy(logits, labels, reduction="none")
    sums = torch.zeros(n_envs, device=logits.device, dtype=ce.dtype).index_add(0, envs, ce)
    counts = torch.zeros(n_envs, device=logits.device, dtype=ce.dtype).index_add(0, envs, torch.ones_like(ce))
    present = counts > 0
    return sums / counts.clamp_min(1.0), present


def invariant_risk(logits, labels, envs, n_envs: int, irm_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Environment-balanced ERM plus the IRMv1 penalty (Arjovsky et al. 2019), vectorised.

    Returns (objective, penalty). ERM averages each environment's risk with equal weight, so a
    large batch does not dominate. The penalty is the mean over environments of the squared
    gradient of the environment risk with respect to a scalar multiplier of the logits at 1.
    """
    scale = torch.ones(n_envs, device=logits.device, requires_grad=True)
    risks, present = environment_risks(logits, labels, envs, n_envs, scale)
    erm = risks[present].mean()
    if irm_weight <= 0:
        return erm, torch.zeros((), device=logits.device)
    (grad,) = torch.autograd.grad(risks[present].sum(), scale, create_graph=True)
    penalty = (grad[present] ** 2).mean()
    return erm + irm_weight * penalty, penalty
