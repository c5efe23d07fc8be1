"""The pure torch parts: likelihood, KL terms, priors, invariant risk."""

import math

import numpy as np
import pytest
import torch
from torch.distributions import NegativeBinomial, Normal

from scinv.module import (
    ConditionalPrior,
    ExponentialFamilyPrior,
    InVAEModule,
    gaussian_kl,
    gaussian_log_prob,
    invariant_risk,
    negative_binomial_log_prob,
    score_matching_loss,
)


@pytest.fixture(autouse=True)
def fused_kernels(monkeypatch):
    """The tests here are about the fused kernels: they ignore a SCINV_PLAIN_MATH set in the
    environment; those comparing with the plain path set it themselves."""
    monkeypatch.delenv("SCINV_PLAIN_MATH", raising=False)


def test_negative_binomial_matches_torch_distribution():
    torch.manual_seed(0)
    x = torch.poisson(torch.rand(5, 7) * 3)
    log_mu = torch.randn(5, 7)
    log_theta = torch.randn(7)
    mu, theta = log_mu.exp(), log_theta.exp()
    # torch's NB counts failures with success prob p: mean = theta * p / (1 - p)
    ref = NegativeBinomial(total_count=theta, probs=mu / (mu + theta)).log_prob(x).sum(-1)
    assert torch.allclose(negative_binomial_log_prob(x, log_mu, log_theta), ref, atol=1e-4)


def test_gaussian_kl_matches_torch():
    qm, pm = torch.randn(4, 3), torch.randn(4, 3)
    qv, pv = torch.rand(4, 3) + 0.1, torch.rand(4, 3) + 0.1
    ref = torch.distributions.kl_divergence(Normal(qm, qv.sqrt()), Normal(pm, pv.sqrt())).sum(-1)
    assert torch.allclose(gaussian_kl(qm, qv, pm, pv), ref, atol=1e-5)
    ref_unit = torch.distributions.kl_divergence(Normal(qm, qv.sqrt()), Normal(pm, 1.0)).sum(-1)
    assert torch.allclose(gaussian_kl(qm, qv, pm, None), ref_unit, atol=1e-5)
    z = torch.randn(4, 3)
    assert torch.allclose(gaussian_log_prob(z, qm, qv), Normal(qm, qv.sqrt()).log_prob(z).sum(-1), atol=1e-5)


def test_prior_modes_and_empty_covariates():
    c = torch.eye(3)
    mean, var = ConditionalPrior(3, 4, "mean")(c)
    assert torch.all(var == 1) and not torch.allclose(mean[0], mean[1])
    mean, var = ConditionalPrior(3, 4, "variance")(c)
    assert torch.all(mean == 0) and not torch.allclose(var[0], var[1])
    mean, var = ConditionalPrior(3, 4, "both")(c)
    assert not torch.allclose(mean[0], mean[1]) and not torch.allclose(var[0], var[1])
    mean, var = ConditionalPrior(0, 4, "mean")(torch.zeros(5, 0))
    assert mean.shape == (5, 4) and torch.all(mean == 0) and torch.all(var == 1)


def test_unknown_label_uses_label_marginal_mixture_prior():
    torch.manual_seed(0)
    m = InVAEModule(
        n_genes=10, n_labels=3, n_inv_covariates=0, n_spur_covariates=0, n_latent_inv=2, n_latent_spur=1, label_frequencies=torch.tensor([0.5, 0.3, 0.2])
    )
    z, qm, qv = torch.randn(1, 3), torch.randn(1, 3), torch.rand(1, 3) + 0.5
    kl = m.kl_invariant(z, qm, qv, torch.tensor([-1]), torch.zeros(1, 0))
    # by hand: log q(z) - log sum_k pi_k N(z; m_k, v_k)
    comps = []
    for k, pi in enumerate([0.5, 0.3, 0.2]):
        pm, pv = m.prior_inv(torch.nn.functional.one_hot(torch.tensor([k]), 3).float())
        comps.append(math.log(pi) + gaussian_log_prob(z[:, :2], pm, pv))
    expected = gaussian_log_prob(z[:, :2], qm[:, :2], qv[:, :2]) - torch.logsumexp(torch.stack(comps), 0)
    assert torch.allclose(kl, expected, atol=1e-5)
    # a labelled cell gets the analytic KL to its own label's prior
    pm, pv = m.prior_inv(torch.tensor([[0.0, 1.0, 0.0]]))
    kl1 = m.kl_invariant(z, qm, qv, torch.tensor([1]), torch.zeros(1, 0))
    assert torch.allclose(kl1, gaussian_kl(qm[:, :2], qv[:, :2], pm, pv), atol=1e-6)


def test_joint_kl_equals_per_block_kl():
    """The one-node KL over both blocks (latent_and_kl, unit-variance priors) equals the per-block
    KLs, unknown labels included."""
    torch.manual_seed(0)
    m = InVAEModule(n_genes=10, n_labels=3, n_inv_covariates=1, n_spur_covariates=2, n_latent_inv=4, n_latent_spur=2).eval()
    x_log = torch.log1p(torch.poisson(torch.rand(6, 10) * 4))
    label, inv = torch.tensor([0, 1, -1, 2, -1, 0]), torch.randn(6, 1)
    spur = torch.nn.functional.one_hot(torch.tensor([0, 1, 1, 0, 1, 0]), 2).float()
    z, qm, qv, kl_inv, kl_spur = m.latent_and_kl(x_log, None, label, inv, spur)
    assert torch.allclose(kl_inv, m.kl_invariant(z, qm, qv, label, inv), atol=1e-6)
    assert torch.allclose(kl_spur, m.kl_spurious(z, qm, qv, spur), atol=1e-6)


def test_fused_latent_matches_autograd_and_its_gradient_is_exact():
    """_GaussianLatent (posterior, sample and KL in one node) equals the plain expressions, and its
    hand-written backward equals autograd's, for every output used alone or together; two raw
    log variances sit outside the clamp, where the gradient must be zero."""
    from scinv.module import _GaussianLatent

    torch.manual_seed(0)
    n_inv, d = 3, 5
    heads = torch.randn(4, 2 * d, dtype=torch.float64)
    heads[0, d], heads[1, d + 4] = -20.0, 15.0  # below and above the log-variance clamp
    heads.requires_grad_(True)
    prior_mean = torch.randn(4, d, dtype=torch.float64, requires_grad=True)
    noise = torch.randn(4, d, dtype=torch.float64)

    def reference(heads, prior_mean, noise):
        qm, log_var = heads.split(d, dim=-1)
        qv = torch.exp(log_var.clamp(-12.0, 8.0)) + 1e-6
        z = qm + qv.sqrt() * noise if noise is not None else qm
        kl = 0.5 * (qv - torch.log(qv) + (qm - prior_mean) ** 2 - 1.0)
        return z, qm, qv, kl[:, :n_inv].sum(-1), kl[:, n_inv:].sum(-1)

    for sample in (noise, None):
        fused, plain = _GaussianLatent.apply(heads, prior_mean, sample, n_inv), reference(heads, prior_mean, sample)
        for a, b in zip(fused, plain):
            assert torch.allclose(a, b, atol=1e-12)
        for used in ([0], [1], [2], [3], [4], [0, 3, 4], [0, 1, 2, 3, 4]):
            weights = [torch.randn_like(plain[i]) for i in used]
            grads = [
                torch.autograd.grad(
                    sum((out[i] * w).sum() for i, w in zip(used, weights)), (heads, prior_mean), retain_graph=True, allow_unused=True, materialize_grads=True
                )
                for out in (fused, plain)
            ]
            for a, b in zip(*grads):
                assert torch.allclose(a, b, atol=1e-10), (sample is None, used)
    assert torch.autograd.gradcheck(lambda h, p: _GaussianLatent.apply(h, p, noise, n_inv), (heads, prior_mean))


def test_training_loss_is_the_same_with_and_without_the_fused_latent(monkeypatch):
    """forward's fused path (default model) and the generic path give the same losses and gradients."""
    torch.manual_seed(0)
    m = InVAEModule(n_genes=12, n_labels=3, n_inv_covariates=0, n_spur_covariates=2, classifier_weight=1.0)
    x = torch.poisson(torch.rand(8, 12) * 4)
    batch = {
        "x": x,
        "label": torch.tensor([0, 1, 2, -1, 0, 1, 2, -1]),
        "inv": torch.zeros(8, 0),
        "spur": torch.nn.functional.one_hot(torch.arange(8) % 2, 2).float(),
    }
    results = []
    for fused in (True, False):
        monkeypatch.setattr(InVAEModule, "_fused_latent", fused)
        m.zero_grad()
        torch.manual_seed(1)
        out = m(batch)
        out["loss"].backward()
        results.append(
            ([out[k].detach() for k in ("loss", "kl_inv", "kl_spur", "classification")], [p.grad.clone() for p in m.parameters() if p.grad is not None])
        )
    for a, b in zip(results[0][0] + results[0][1], results[1][0] + results[1][1]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def test_input_thinning_thins_the_encoder_input_in_training_only():
    """input_thinning: binomial thinning per cell (never more counts, zeros stay zero, the kept fraction
    within [input_thinning, 1]); the evaluation forward and the reconstruction target are untouched."""
    torch.manual_seed(0)
    m = InVAEModule(n_genes=400, n_labels=2, n_inv_covariates=0, n_spur_covariates=2, input_thinning=0.3)
    x = torch.poisson(torch.rand(64, 400) * 6)
    thinned = m.thinned_log1p(x).expm1().round()
    assert (thinned <= x).all() and (thinned[x == 0] == 0).all()
    kept = thinned.sum(1) / x.sum(1)
    assert kept.min() > 0.2 and kept.max() <= 1.0 and kept.std() > 0.1  # one fraction per cell, spread over [0.3, 1]
    assert not torch.equal(m.thinned_log1p(x), m.thinned_log1p(x))  # redrawn each call
    spur = torch.nn.functional.one_hot(torch.arange(64) % 2, 2).float()
    batch = {"x": x, "label": torch.zeros(64, dtype=torch.long), "inv": torch.zeros(64, 0), "spur": spur}
    plain = InVAEModule(n_genes=400, n_labels=2, n_inv_covariates=0, n_spur_covariates=2)
    plain.load_state_dict(m.state_dict())
    m.eval(), plain.eval()
    assert torch.equal(m(batch)["loss"], plain(batch)["loss"])
    m.train(), plain.train()
    torch.manual_seed(1)
    thinned_loss = m(batch)["loss"]
    torch.manual_seed(1)
    assert not torch.equal(thinned_loss, plain(batch)["loss"])


def test_gene_batch_dispersion_is_the_nb_likelihood_with_each_batchs_theta():
    """dispersion 'gene-batch': a cell's log theta is the gene's plus its batch's offset (the batch one-hot leads spur);
    the loader's fused-kernel summaries in the batch do not change the result."""
    torch.manual_seed(0)
    m = InVAEModule(n_genes=50, n_labels=2, n_inv_covariates=0, n_spur_covariates=3, dispersion="gene-batch", n_batches=2)
    with torch.no_grad():
        m.log_theta.normal_()
        m.log_theta_batch.normal_()
    x = torch.poisson(torch.rand(8, 50) * 5)
    env = torch.arange(8) % 2
    spur = torch.cat([torch.nn.functional.one_hot(env, 2).float(), torch.randn(8, 1)], dim=1)
    logits, log_lib = torch.randn(8, 50), torch.log(x.sum(1, keepdim=True).clamp_min(1))
    log_mu = torch.log_softmax(logits, -1) + log_lib
    expected = -negative_binomial_log_prob(x, log_mu, m.log_theta + m.log_theta_batch[env]).mean()
    got = m.reconstruction_loss({"x": x, "spur": spur, "count_at_least": torch.zeros(50, 3)}, logits, log_lib)
    assert torch.allclose(got, expected)
    with pytest.raises(ValueError, match="n_batches"):
        InVAEModule(n_genes=50, n_labels=2, n_inv_covariates=0, n_spur_covariates=0, dispersion="gene-batch")


def test_hidden_layers_before_batch_norm_have_no_bias_and_old_biases_fold_into_running_means():
    """A bias before batch norm is dead weight (the norm removes it); models saved with one load exactly."""
    torch.manual_seed(0)
    m = InVAEModule(n_genes=12, n_labels=2, n_inv_covariates=0, n_spur_covariates=2)
    assert m.encoder.body[0].bias is None and m.decoder.body[0].bias is None
    assert InVAEModule(n_genes=12, n_labels=2, n_inv_covariates=0, n_spur_covariates=2, batch_norm=False).encoder.body[0].bias is not None
    m.train()
    for _ in range(3):  # move the running means away from zero
        m.encode(torch.poisson(torch.rand(16, 12) * 4))
    m.eval()
    state = m.state_dict()
    for name, width in (("encoder.body.0", 128), ("encoder.body.4", 128), ("decoder.body.0", 128), ("decoder.body.4", 128)):
        bias = torch.randn(width)
        state[f"{name}.bias"] = bias  # an old model: its running mean includes the bias
        norm = name[:-1] + str(int(name[-1]) + 1)
        state[f"{norm}.running_mean"] = state[f"{norm}.running_mean"] + bias
    fresh = InVAEModule(n_genes=12, n_labels=2, n_inv_covariates=0, n_spur_covariates=2).eval()
    fresh.load_state_dict(state)
    x = torch.poisson(torch.rand(5, 12) * 4)
    for a, b in zip(fresh.encode(x), m.encode(x)):
        assert torch.allclose(a, b, atol=1e-5)
    z = torch.randn(5, m.n_latent_inv + m.n_latent_spur)
    assert torch.allclose(fresh.decoder(z), m.decoder(z), atol=1e-5)


def test_invariant_risk_balances_environments_and_irm_penalty_matches_loop():
    torch.manual_seed(0)
    logits = torch.randn(12, 3, requires_grad=True)
    labels = torch.randint(0, 3, (12,))
    envs = torch.tensor([0] * 9 + [1] * 3)
    obj, _ = invariant_risk(logits, labels, envs, 2)
    ce = torch.nn.functional.cross_entropy
    expected = 0.5 * (ce(logits[:9], labels[:9]) + ce(logits[9:], labels[9:]))
    assert torch.allclose(obj, expected)
    obj, penalty = invariant_risk(logits, labels, envs, 2, irm_weight=1.0)
    by_hand = []
    for e in (0, 1):
        w = torch.tensor(1.0, requires_grad=True)
        m = envs == e
        (g,) = torch.autograd.grad(ce(logits[m] * w, labels[m]), w, create_graph=True)
        by_hand.append(g**2)
    assert torch.allclose(penalty, torch.stack(by_hand).mean(), atol=1e-6)
    assert penalty > 0
    obj.backward()  # the penalty is differentiable w.r.t. the classifier output
    assert logits.grad is not None


@pytest.fixture(params=[1, 2], ids=["1-thread-numpy-kernels", "2-threads-torch-kernels"])
def torch_threads(request):
    """Run a test on one torch thread (the likelihood's exp2/log1p go through numpy) and on two
    (torch's own kernels), restoring the thread count afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def test_encoder_takes_counts_only():
    m = InVAEModule(n_genes=10, n_labels=3, n_inv_covariates=2, n_spur_covariates=2)
    assert m.encoder.body[0].in_features == 10


@pytest.mark.parametrize("backed_chunk", [None, 70])
def test_histogram_reconstruction_equals_exact_likelihood_over_an_epoch(small_adata, monkeypatch, torch_threads, backed_chunk):
    """The loader's count-histogram path gives the exact NB log-likelihood (counts above 16
    included) summed over an epoch, and its exact gradient. Each batch carries its share of the
    whole set's histogram (in memory) or of its chunk's (backed, here chunks of 70 cells), so
    single batches differ from their own likelihood only in the theta-only count term."""
    import scinv.module
    from scinv.data import DataRegistry, MinibatchLoader

    X = small_adata.X.tolil()
    X[0, 0], X[1, 3], X[2, 5] = 40.0, 17.0, 16.0  # tail entries and the last histogram bin
    X = X.tocsr()
    X.data[X.indptr[3]] = 0.0  # an explicitly stored zero (left by some writers) must not count
    small_adata.X = X
    reg = DataRegistry.from_anndata(small_adata, batch_key="batch")
    data = reg.encode(small_adata)
    if backed_chunk:
        data.X = _RowReader(X)  # not a scipy matrix: the loader takes the backed path
    loader = MinibatchLoader(data, batch_size=32, shuffle=True, seed=3, chunk_size=backed_chunk or 16384)
    m = InVAEModule(n_genes=small_adata.n_vars, n_labels=0, n_inv_covariates=0, n_spur_covariates=3)
    torch.nn.init.normal_(m.log_theta)
    logits = torch.randn(small_adata.n_obs, small_adata.n_vars, requires_grad=True)
    x_all = torch.from_numpy(X.toarray())
    log_lib_all = torch.log(x_all.sum(1, keepdim=True))
    exact = -negative_binomial_log_prob(x_all, torch.log_softmax(logits, -1) + log_lib_all, m.log_theta).sum()
    fast, n_tail, n_seen = 0.0, 0, []
    with monkeypatch.context() as patch:  # the fast path must not fall back to the dense reference
        patch.setattr(scinv.module, "negative_binomial_log_prob", None)
        for batch in loader:
            assert torch.allclose(batch["log_lib"], log_lib_all[batch["index"]])
            fast = fast + m.reconstruction_loss(batch, logits[batch["index"]], batch["log_lib"]) * len(batch["index"])
            n_tail += len(batch["tail_vals"])
            n_seen += batch["index"].tolist()
    assert sorted(n_seen) == list(range(small_adata.n_obs)) and n_tail >= 2
    assert torch.allclose(fast, exact, rtol=1e-5)
    for fast_grad, exact_grad in zip(torch.autograd.grad(fast, (logits, m.log_theta)), torch.autograd.grad(exact, (logits, m.log_theta))):
        assert torch.allclose(fast_grad, exact_grad, rtol=1e-4, atol=1e-3)


class _RowReader:
    """A minimal stand-in for a backed h5ad matrix: row slices come back as CSR."""

    def __init__(self, X):
        self.X, self.shape = X, X.shape

    def __getitem__(self, rows):
        return self.X[rows]


def test_nb_from_logits_backward_is_exact(torch_threads):
    from scinv.module import nb_log_prob_dense

    torch.manual_seed(0)
    x = torch.poisson(torch.rand(4, 6, dtype=torch.float64) * 3)
    logits = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    log_lib = torch.log(x.sum(1, keepdim=True) + 1.0)
    log_theta = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda lg, t: nb_log_prob_dense(x, lg, log_lib, t), (logits, log_theta))


def test_nb_from_bf16_logits_matches_fp32(torch_threads):
    """The decoder's logits come in bf16 under mixed precision: the likelihood is computed in fp32
    and the logits' gradient is returned in bf16."""
    from scinv.module import nb_log_prob_dense

    torch.manual_seed(0)
    x = torch.poisson(torch.rand(8, 50) * 3)
    log_lib, log_theta = torch.log(x.sum(1, keepdim=True) + 1.0), torch.randn(50)
    logits = torch.randn(8, 50).bfloat16().requires_grad_(True)
    out = nb_log_prob_dense(x, logits, log_lib, log_theta)
    assert out.dtype == torch.float32
    assert torch.allclose(out, nb_log_prob_dense(x, logits.float(), log_lib, log_theta), rtol=1e-6)
    out.sum().backward()
    assert logits.grad.dtype == torch.bfloat16


def test_score_matching_on_a_factorised_gaussian_by_hand():
    # log p = sum_i mu_i z_i / s_i^2 - z_i^2 / (2 s_i^2): score (mu - z) / s^2, Hessian diagonal -1 / s^2
    mu, s2 = torch.tensor([0.5, -1.0]), torch.tensor([2.0, 0.5])
    z = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    by_hand = (-1 / s2 + 0.5 * ((mu - z) / s2) ** 2).sum(-1)
    got = score_matching_loss(lambda zz: (mu * zz / s2 - zz**2 / (2 * s2)).sum(-1), z)
    assert torch.allclose(got, by_hand)


def test_score_matching_uses_the_hessian_diagonal_not_row_sums():
    # non-factorised: log p = -1/2 z^T A z; Hessian -A, diagonal -A_ii, row sums -sum_j A_ij
    A = torch.tensor([[2.0, 0.9], [0.9, 1.0]])
    z = torch.tensor([[1.0, -2.0]])
    score = -(z @ A)
    exact = -A.diagonal().sum() + 0.5 * (score**2).sum()  # -3 + 0.5 * (0.2^2 + 1.1^2) = -2.375
    row_sums = -A.sum() + 0.5 * (score**2).sum()  # what the reference code computes: -4.175
    got = score_matching_loss(lambda zz: -0.5 * ((zz @ A) * zz).sum(-1), z)
    assert torch.allclose(got, exact.reshape(1)) and abs(float(exact) - (-2.375)) < 1e-6
    assert not torch.allclose(got, row_sums.reshape(1))


def test_score_matching_fits_an_exponential_family_prior():
    """Score matching alone recovers a Gaussian's mean and precision through the NF prior."""
    torch.manual_seed(0)
    prior = ExponentialFamilyPrior(n_covariates=2, n_latent=2, n_stats=4, n_hidden=16)
    opt = torch.optim.Adam(prior.parameters(), lr=0.02)
    c = torch.eye(2).repeat(256, 1)  # two conditions with means +2 / -2, variance 0.25
    target_mean = torch.where(c[:, :1] > 0, 2.0, -2.0).expand(-1, 2)
    for _ in range(400):
        z = target_mean + 0.5 * torch.randn_like(target_mean)
        loss = score_matching_loss(lambda zz: prior.log_density(zz, c), z).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    # the model's score at the true mean is ~0 and its curvature ~ -1/0.25 per dimension
    z = target_mean[:2].clone().requires_grad_(True)
    score = torch.autograd.grad(prior.log_density(z, c[:2]).sum(), z, create_graph=True)[0]
    curvature = torch.stack([torch.autograd.grad(score[:, i].sum(), z, retain_graph=True)[0][:, i] for i in range(2)], -1)
    assert score.abs().max() < 0.6, score  # mean within ~0.15 of the truth (score = -(z - mean) / var)
    assert ((curvature > -5.5) & (curvature < -3.0)).all(), curvature  # precision 1 / 0.25 = 4


def test_nf_prior_module_trains_and_reports_score_matching(small_adata, tmp_path):
    from scinv.model import InVAE

    model = InVAE(small_adata, layer="counts", batch_key="batch", label_key="cell_type", prior_family="nf", n_hidden=32)
    model.train(max_epochs=4, kl_warmup_epochs=1, batch_size=128, early_stopping_patience=0, seed=0)
    h = model.history
    assert all(math.isfinite(r["train_loss"]) and math.isfinite(r["train_score_matching"]) for r in h)
    assert h[-1]["train_loss"] < h[0]["train_loss"]
    assert isinstance(model.module.prior_inv, ExponentialFamilyPrior)
    z = model.get_latent_representation(small_adata, "inv")
    assert z.shape == (small_adata.n_obs, 20)
    model.save(tmp_path / "nf")
    loaded = InVAE.load(tmp_path / "nf")
    assert isinstance(loaded.module.prior_inv, ExponentialFamilyPrior)
    assert np.allclose(loaded.get_latent_representation(small_adata, "inv"), z, atol=1e-5)


def test_dropout_rate_scale_and_seed():
    from scinv.module import Dropout

    drop = Dropout(0.1)
    torch.manual_seed(0)
    out = drop(torch.ones(500, 400))
    assert abs((out == 0).float().mean().item() - 0.1) < 0.005  # 200k draws: sd 0.0007
    assert torch.allclose(out[out != 0], torch.tensor(1 / 0.9))  # inverted dropout keeps the mean
    torch.manual_seed(0)
    assert torch.equal(drop(torch.ones(500, 400)), out)  # reproducible with the seed
    every_draw = torch.arange(-(2**15), 2**15).to(torch.int16)
    assert torch.equal(drop.mask(every_draw), (every_draw >= drop.threshold).float() / 0.9)
    assert drop(torch.ones(3, 4, dtype=torch.bfloat16)).dtype == torch.bfloat16
    drop.eval()
    h = torch.randn(7, 3)
    assert torch.equal(drop(h), h)


def test_encoder_loads_state_saved_with_separate_heads():
    """Models saved before the mean and log-variance heads were fused into one layer still load."""
    old_style = InVAEModule(n_genes=12, n_labels=2, n_inv_covariates=0, n_spur_covariates=2).eval()
    state = old_style.state_dict()
    for kind in ("weight", "bias"):
        mean, log_var = state.pop(f"encoder.heads.{kind}").chunk(2)
        state[f"encoder.mean.{kind}"], state[f"encoder.log_var.{kind}"] = mean, log_var
    fresh = InVAEModule(n_genes=12, n_labels=2, n_inv_covariates=0, n_spur_covariates=2).eval()
    fresh.load_state_dict(state)
    x = torch.poisson(torch.rand(5, 12) * 4)
    for a, b in zip(fresh.encode(x), old_style.encode(x)):
        assert torch.equal(a, b)


def test_loader_gives_log1p_counts_in_bf16_when_asked(small_adata):
    """With bf16 wide layers the loader densifies log1p counts straight into bf16 (rounded to nearest)."""
    from scinv.data import DataRegistry, MinibatchLoader

    data = DataRegistry.from_anndata(small_adata, batch_key="batch").encode(small_adata)
    fp32 = next(iter(MinibatchLoader(data, batch_size=32, shuffle=False)))["x_log"]
    bf16 = next(iter(MinibatchLoader(data, batch_size=32, shuffle=False, x_log_dtype=torch.bfloat16)))["x_log"]
    assert fp32.dtype == torch.float32 and bf16.dtype == torch.bfloat16
    assert torch.equal(bf16, fp32.to(torch.bfloat16))
    m = InVAEModule(n_genes=small_adata.n_vars, n_labels=0, n_inv_covariates=0, n_spur_covariates=3).eval()
    assert torch.allclose(m.encoder(bf16)[0], m.encoder(bf16.float())[0])  # fp32 layers accept it too


def test_count_lgamma_sum_matches_lgamma_and_its_gradient_is_exact(torch_threads):
    """The count summary (bins up to K, a tail above) gives sum lgamma(x + theta) - lgamma(theta)
    over the entries, with an exact hand-written gradient."""
    from scinv.module import count_lgamma_sum

    torch.manual_seed(0)
    n_genes, k = 5, 4
    cols = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 4])
    vals = torch.tensor([1.0, 4.0, 2.0, 3.0, 7.0, 1.0, 12.0, 4.0, 5.0], dtype=torch.float64)
    log_theta = torch.randn(n_genes, dtype=torch.float64, requires_grad=True)
    binned = vals <= k
    at_least = torch.zeros(n_genes, k, dtype=torch.float64)
    for g, v in zip(cols[binned], vals[binned]):
        at_least[g, : int(v)] += 1  # entry v > j for j < v
    theta = log_theta.exp()
    exact = (torch.lgamma(vals + theta[cols]) - torch.lgamma(theta[cols])).sum()
    fast = count_lgamma_sum(log_theta, at_least, cols[~binned], vals[~binned])
    assert torch.allclose(fast, exact)
    assert torch.autograd.gradcheck(lambda lt: count_lgamma_sum(lt, at_least, cols[~binned], vals[~binned]), (log_theta,))


# -- fused kernels vs their plain autograd twins (SCINV_PLAIN_MATH) ------------------------------------
# each fused kernel, by the name InVAEModule calls it under, and its plain twin
KERNEL_TWINS = {
    "gaussian_latent": "gaussian_latent_plain",  # _GaussianLatent
    "nb_log_prob_dense": "nb_log_prob_dense_plain",  # _NBFromLogits
    "count_lgamma_sum": "count_lgamma_sum_plain",  # _CountLgammaSum
}
CUSTOM_NODES = {"_GaussianLatentBackward", "_NBFromLogitsBackward", "_CountLgammaSumBackward"}


def _loader_batch(adata, dtype=torch.float64):
    """One training batch as the loader builds it (count histogram share, tail counts above 16,
    log-factorial and library terms), labelled with some unknown labels, floats cast to `dtype`."""
    from scinv.data import DataRegistry, MinibatchLoader

    X = adata.layers["counts"].tolil() if "counts" in adata.layers else adata.X.tolil()
    X[0, 0], X[1, 3], X[2, 5] = 40.0, 17.0, 16.0  # tail entries and the last histogram bin
    adata.X = X.tocsr()
    reg = DataRegistry.from_anndata(adata, batch_key="batch", label_key="cell_type")
    data = reg.encode(adata)
    batch = next(iter(MinibatchLoader(data, batch_size=48, shuffle=False)))
    batch["label"][::5] = -1  # the label-marginal prior
    batch = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in batch.items()}
    assert len(batch["tail_vals"]) >= 2
    return batch, len(reg.labels), batch["spur"].shape[1]


def _module(n_genes, n_labels, n_spur, setting, dtype):
    torch.manual_seed(0)
    extra = {"tc_weight": 0.5, "classifier_weight": 1.0} if setting == "tc+classifier" else {}
    m = InVAEModule(n_genes=n_genes, n_labels=n_labels, n_inv_covariates=0, n_spur_covariates=n_spur, n_hidden=32, **extra).to(dtype)
    torch.nn.init.normal_(m.log_theta, std=0.5)
    return m.eval() if setting == "eval" else m.train()


def _losses_and_gradients(m, batch):
    """The full forward's losses and every parameter's gradient, from the same random draws."""
    m.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    out = m(batch)
    out["loss"].backward()
    return {k: v.detach() for k, v in out.items()}, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def _assert_same(fused, plain, rtol, grad_rtol):
    (fused_losses, fused_grads), (plain_losses, plain_grads) = fused, plain
    for k in fused_losses:
        torch.testing.assert_close(fused_losses[k], plain_losses[k], rtol=rtol, atol=rtol, msg=lambda m, k=k: f"loss {k}: {m}")
    assert fused_grads.keys() == plain_grads.keys() and len(fused_grads) > 10
    for name, g in fused_grads.items():
        # relative to the gradient's own scale: elementwise rtol alone fails on entries that cancel to ~0
        scale = plain_grads[name].abs().max().item()
        torch.testing.assert_close(g, plain_grads[name], rtol=grad_rtol, atol=grad_rtol * scale, msg=lambda m, name=name: f"grad {name}: {m}")


@pytest.mark.parametrize("setting", ["train", "tc+classifier", "eval"])
@pytest.mark.parametrize("kernel", [*KERNEL_TWINS, "SCINV_PLAIN_MATH=1"])
def test_fused_kernel_equals_its_plain_twin_in_the_full_forward(small_adata, monkeypatch, torch_threads, kernel, setting):
    """Each fused kernel (and all at once, by the switch) against plain autograd: the losses and
    the gradient of every parameter of InVAEModule's forward, in fp64 so that the tolerance can be
    tight (a wrong backward is off by far more). 'tc+classifier' also feeds gradients into the
    latent kernel's qm and qv outputs; 'eval' takes the no-noise branch (z = qm)."""
    import scinv.module

    batch, n_labels, n_spur = _loader_batch(small_adata)
    m = _module(small_adata.n_vars, n_labels, n_spur, setting, torch.float64)
    assert m._fused_latent and "count_at_least" in batch  # the forward really goes through all three kernels
    fused = _losses_and_gradients(m, batch)
    with monkeypatch.context() as patch:
        if kernel in KERNEL_TWINS:
            patch.setattr(scinv.module, kernel, getattr(scinv.module, KERNEL_TWINS[kernel]))
        else:
            patch.setenv("SCINV_PLAIN_MATH", "1")
        plain = _losses_and_gradients(m, batch)
    _assert_same(fused, plain, rtol=1e-12, grad_rtol=1e-11)


def test_plain_math_matches_fused_in_fp32(small_adata, monkeypatch, torch_threads):
    """The switch in the training dtype: fused and plain differ by fp32 rounding only."""
    batch, n_labels, n_spur = _loader_batch(small_adata, torch.float32)
    m = _module(small_adata.n_vars, n_labels, n_spur, "tc+classifier", torch.float32)
    fused = _losses_and_gradients(m, batch)
    monkeypatch.setenv("SCINV_PLAIN_MATH", "1")
    _assert_same(fused, _losses_and_gradients(m, batch), rtol=1e-5, grad_rtol=5e-5)


def _autograd_node_names(t: torch.Tensor) -> set[str]:
    seen, stack = set(), [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(next_node for next_node, _ in node.next_functions)
    return {type(node).__name__ for node in seen}


def test_plain_math_switch_selects_the_plain_path(small_adata, monkeypatch):
    """SCINV_PLAIN_MATH=1: no custom autograd Function and no hardtanh in the graph, no numpy
    transcendental (on one thread, where the fused path uses them), dropout masks by comparison,
    AdamW not fused. Unset (or 0): all of them. Read at every call."""
    import types

    import scinv.nn.nb
    from scinv.module import Dropout, plain_math
    from scinv.training import make_optimizer

    calls = []

    def spy(fn):
        return lambda *a, **k: calls.append(fn.__name__) or fn(*a, **k)

    monkeypatch.setattr(scinv.nn.nb, "np", types.SimpleNamespace(exp2=spy(np.exp2), log1p=spy(np.log1p), log=spy(np.log)))
    monkeypatch.setattr(Dropout, "mask", lambda self, draws, mask=Dropout.mask: calls.append("mask:" + str(plain_math())) or mask(self, draws))
    batch, n_labels, n_spur = _loader_batch(small_adata, torch.float32)
    m = _module(small_adata.n_vars, n_labels, n_spur, "train", torch.float32)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for value, plain in (("0", False), ("1", True), ("", False), ("true", True), (None, False)):
            if value is None:
                monkeypatch.delenv("SCINV_PLAIN_MATH", raising=False)
            else:
                monkeypatch.setenv("SCINV_PLAIN_MATH", value)
            assert plain_math() is plain
            calls.clear()
            nodes = _autograd_node_names(m(batch)["loss"])
            if plain:
                assert not nodes & CUSTOM_NODES and not any("Hardtanh" in n for n in nodes), nodes
                assert calls and set(calls) == {"mask:True"}, calls  # dropout ran, numpy never
            else:
                assert CUSTOM_NODES <= nodes and "HardtanhBackward0" in nodes
                assert {"exp2", "log1p", "log", "mask:False"} <= set(calls)
            assert bool(make_optimizer([torch.nn.Parameter(torch.zeros(3))], 1e-3, 0.0).defaults["fused"]) is not plain
    finally:
        torch.set_num_threads(before)


def test_fused_and_plain_adamw_take_the_same_step(monkeypatch):
    from scinv.training import make_optimizer

    torch.manual_seed(0)
    params = {mode: torch.nn.Parameter(torch.randn(50, 7)) for mode in ("fused", "plain")}
    params["plain"].data.copy_(params["fused"].data)
    for mode, p in params.items():
        monkeypatch.setenv("SCINV_PLAIN_MATH", "1" if mode == "plain" else "0")
        opt = make_optimizer([p], 1e-2, 1e-4)
        torch.manual_seed(1)
        for _ in range(3):
            p.grad = torch.randn_like(p)
            opt.step()
    torch.testing.assert_close(params["fused"], params["plain"], rtol=1e-6, atol=1e-7)
