"""Options no other test exercised, each through the real model or the real step script:
tc_weight, kl_inv_weight, kl_spur_weight, invariance_weight, label_prior, input_thinning, dispersion (with map_query),
kl_estimator='sample', prior_mode 'variance'/'both', QC --mad-threshold, EXPORT --cellxgene, and CHECK_INPUT's errors for a bad --annotations file."""

import copy

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from conftest import one_error_line, run_script
from scinv.data import MinibatchLoader
from scinv.datasets import synthetic_counts
from scinv.errors import ScinvInputError
from scinv.io import write_h5ad
from scinv.model import InVAE
from scinv.module import InVAEModule

FAST = dict(kl_warmup_epochs=2, batch_size=128, early_stopping_patience=0, seed=0)
N_CELLS, N_TYPES, N_BATCHES = 400, 3, 2


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The models here are tiny: one thread runs them faster than two, and far faster when other
    work shares the cores (threads then wait on each other). Restored for the tests after these."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data():
    return synthetic_counts(n_cells=N_CELLS, n_genes=100, n_batches=N_BATCHES, n_types=N_TYPES, seed=0)


def make_model(adata, **kw):
    return InVAE(adata, layer="counts", batch_key="batch", label_key="cell_type", n_latent_inv=4, n_latent_spur=2, n_hidden=32, **kw)


def same_weights_with(model, **hparams):
    """A copy of a trained model whose module is built with other hyperparameters (same weights)."""
    config = copy.deepcopy(model._config())
    config["hparams"].update(hparams)
    return InVAE.from_state(config, model._state_dict())


def loss_terms(record: dict, prefix: str, kl_weight: float, hparams: dict) -> float:
    """What the loss is made of besides the total-correlation penalty, with the model's weights."""
    r = {k[len(prefix) :]: v for k, v in record.items() if k.startswith(prefix)}
    other = hparams["classifier_weight"] * r["classification"] + hparams["invariance_weight"] * r["invariance"] + r.get("score_matching", 0.0)
    return r["reconstruction"] + kl_weight * (hparams["kl_inv_weight"] * r["kl_inv"] + hparams["kl_spur_weight"] * r["kl_spur"]) + other


# -- model options -------------------------------------------------------------------------------------


def test_tc_weight_adds_the_weighted_total_correlation_to_the_loss_and_changes_training(data):
    plain, penalised = make_model(data), make_model(data, tc_weight=2.5)
    for model in (plain, penalised):
        model.train(max_epochs=4, **FAST)
    assert all(h["train_tc"] == 0 and h["validation_tc"] == 0 for h in plain.history)
    for h in penalised.history:
        for prefix, kl_weight in (("train_", h["kl_weight"]), ("validation_", 1.0)):
            tc = h[f"{prefix}tc"]
            assert np.isfinite(tc) and tc > 0.05, h
            # loss = the other terms + tc_weight * tc (the term is in the objective, with its weight)
            terms = loss_terms(h, prefix, kl_weight, penalised.hparams)
            assert h[f"{prefix}loss"] == pytest.approx(terms + 2.5 * tc, rel=1e-5, abs=1e-3), h
    # same seed, same data: the penalty alone makes the two runs differ
    z_plain, z_penalised = plain.get_latent_representation(data, "full"), penalised.get_latent_representation(data, "full")
    assert np.abs(z_plain - z_penalised).max() > 1e-3


def test_kl_inv_weight_scales_the_invariant_kl_and_keeps_variation_within_labels(data):
    """beta < 1 on z_inv's KL: the loss holds beta * kl_inv, and z_inv uses more of its posterior
    (a larger KL to the label prior) than at beta 1, where it shrinks towards the label means."""
    full, light = make_model(data, kl_inv_weight=1.0), make_model(data, kl_inv_weight=0.1)
    for model in (full, light):
        model.train(max_epochs=20, **FAST)
    h = light.history[-1]
    for prefix, kl_weight in (("train_", h["kl_weight"]), ("validation_", 1.0)):
        assert light.hparams["kl_inv_weight"] == 0.1
        terms = loss_terms(h, prefix, kl_weight, light.hparams)
        assert h[f"{prefix}loss"] == pytest.approx(terms, rel=1e-5, abs=1e-3), h
    assert light.history[-1]["validation_kl_inv"] > 1.5 * full.history[-1]["validation_kl_inv"], (light.history[-1], full.history[-1])
    reloaded = InVAE.from_state(light._config(), light._state_dict())
    assert reloaded.module.kl_inv_weight == 0.1


def test_kl_spur_weight_follows_kl_inv_weight_unless_set_and_scales_the_spurious_kl(data):
    """One beta for the whole latent by default; set apart, z_spur's KL gets its own weight in the
    loss, and a lighter one lets z_spur carry more (a larger KL to the batch prior)."""
    assert make_model(data).hparams["kl_spur_weight"] == make_model(data).hparams["kl_inv_weight"] == 0.1
    assert make_model(data, kl_inv_weight=1.0).hparams["kl_spur_weight"] == 1.0
    full, light = make_model(data, kl_spur_weight=1.0), make_model(data, kl_spur_weight=0.05)
    for model in (full, light):
        model.train(max_epochs=20, **FAST)
    h = light.history[-1]
    for prefix, kl_weight in (("train_", h["kl_weight"]), ("validation_", 1.0)):
        assert h[f"{prefix}loss"] == pytest.approx(loss_terms(h, prefix, kl_weight, light.hparams), rel=1e-5, abs=1e-3), h
    assert light.history[-1]["validation_kl_spur"] > 1.25 * full.history[-1]["validation_kl_spur"], (light.history[-1], full.history[-1])
    assert InVAE.from_state(light._config(), light._state_dict()).module.kl_spur_weight == 0.05


def within_label_batch_scatter(model, adata) -> float:
    """The invariance penalty measured on the posterior means of all labelled cells."""
    d = model._training_data()
    z = torch.from_numpy(model.get_latent_representation(adata, "inv"))
    labels = torch.from_numpy(d.labels)
    weights = torch.nn.functional.one_hot(labels.clamp_min(0), model.registry.n_labels) * (labels >= 0)[:, None]
    return float(InVAEModule.batch_invariance(z, weights, torch.from_numpy(d.environments)))


def test_invariance_weight_penalises_batch_differences_of_z_inv_within_labels(data):
    shifted = data.copy()  # a strong batch effect: half the genes x3 in batch b1
    counts = shifted.layers["counts"].toarray()
    counts[(shifted.obs["batch"] == "b1").to_numpy(), :50] *= 3
    shifted.layers["counts"] = sp.csr_matrix(counts)
    plain, penalised = (make_model(shifted, invariance_kernel="mean", invariance_weight=w) for w in (0.0, 50.0))
    for model in (plain, penalised):
        model.train(max_epochs=15, **FAST)
    assert all(h["train_invariance"] == 0 for h in plain.history)
    h = penalised.history[-1]
    assert penalised.hparams["invariance_weight"] == 50.0
    assert h["train_loss"] == pytest.approx(loss_terms(h, "train_", h["kl_weight"], penalised.hparams), rel=1e-5, abs=1e-3)
    before, after = within_label_batch_scatter(plain, shifted), within_label_batch_scatter(penalised, shifted)
    assert after < 0.5 * before, (before, after)


def test_mmd_invariance_sees_batch_differences_in_spread_that_the_mean_penalty_misses():
    gen = torch.Generator().manual_seed(0)
    n = 600
    label, env = torch.arange(n) % 3, (torch.arange(n) // 3) % 2
    weights = torch.nn.functional.one_hot(label, 3).float()
    z = torch.randn(n, 4, generator=gen) + 4.0 * label[:, None]
    wide = z.clone()  # batch 1 twice as spread within each label, around the same means
    wide[env == 1] = 4.0 * label[env == 1, None] + 2.0 * (z[env == 1] - 4.0 * label[env == 1, None])
    mean_of, mmd_of = InVAEModule.batch_invariance, InVAEModule.batch_invariance_mmd
    assert abs(float(mmd_of(z, weights, env))) < 0.01  # one distribution: the unbiased estimate is ~0
    assert float(mmd_of(wide, weights, env)) > 10 * abs(float(mmd_of(z, weights, env)))
    # the mean penalty sees only the sampling noise of the means in both
    assert float(mean_of(wide, weights, env)) < 4 * float(mean_of(z, weights, env)) + 0.2
    assert float(mmd_of(z, torch.zeros(n, 3), env)) == 0.0  # no labelled cells: no penalty


def test_mmd_invariance_never_rewards_spreading_a_batch():
    """Cells of one distribution give unbiased MMD² estimates around 0, half of them negative; the
    penalty clamps each group's at 0, so it is never negative and such a draw has no gradient
    (minimising a negative estimate would push cells of one group apart)."""
    gen = torch.Generator().manual_seed(0)
    env, weights = torch.arange(12) % 2, torch.ones(12, 1)  # one label, two batches
    values = []
    for _ in range(40):
        z = torch.randn(12, 3, generator=gen, requires_grad=True)
        value = InVAEModule.batch_invariance_mmd(z, weights, env)
        value.backward()
        values.append(float(value.detach()))
        assert values[-1] >= 0.0
        if values[-1] == 0.0:
            assert float(z.grad.abs().max()) == 0.0
    assert 0 < values.count(0.0) < len(values)  # both sides of 0 were drawn


def test_invariance_weight_defaults_to_the_scale_of_the_chosen_kernel(data):
    defaults = make_model(data).hparams
    assert (defaults["invariance_kernel"], defaults["invariance_weight"]) == ("mmd", 300.0)
    assert make_model(data, invariance_kernel="mean").hparams["invariance_weight"] == 10.0
    assert make_model(data, invariance_kernel="mean", invariance_weight=3.0).hparams["invariance_weight"] == 3.0
    assert make_model(data, invariance_weight=0.0).hparams["invariance_weight"] == 0.0  # 0 turns it off, not the default


def test_label_prior_sets_the_mixture_weights_of_unlabelled_cells_and_is_saved(data):
    adata = data.copy()
    adata.obs["label"] = adata.obs["cell_type"].astype(str).where(adata.obs["batch"] != "b1", "Unknown").to_numpy()
    adata.obs.loc[adata.obs_names[:150], "label"] = "t0"  # a skewed reference: t0 is common
    kw = dict(layer="counts", batch_key="batch", label_key="label", n_latent_inv=4, n_latent_spur=2, n_hidden=32)
    uniform, frequency = InVAE(adata, **kw), InVAE(adata, label_prior="frequency", **kw)
    assert uniform.hparams["label_prior"] == "uniform"  # the default
    assert torch.allclose(uniform.module.label_log_freq.exp(), torch.full((N_TYPES,), 1 / N_TYPES))
    labelled = adata.obs["label"][adata.obs["label"] != "Unknown"]
    counts = labelled.value_counts().reindex(uniform.registry.labels).to_numpy() + 1.0  # +1: no label weighs 0
    assert torch.allclose(frequency.module.label_log_freq.exp(), torch.tensor(counts / counts.sum(), dtype=torch.float32))
    # an unlabelled cell's KL: the mixture with the weights chosen
    z, qm, qv, label = torch.randn(1, 6), torch.randn(1, 6), torch.rand(1, 6) + 0.5, torch.tensor([-1])
    frequency.module.load_state_dict({**uniform.module.state_dict(), "label_log_freq": frequency.module.label_log_freq})
    kl_u, kl_f = (m.module.eval().kl_invariant(z, qm, qv, label, torch.zeros(1, 0)) for m in (uniform, frequency))
    assert not torch.allclose(kl_u, kl_f)
    loaded = InVAE.from_state(frequency._config(), frequency._state_dict())
    assert loaded.hparams["label_prior"] == "frequency" and torch.equal(loaded.module.label_log_freq, frequency.module.label_log_freq)


def test_a_model_saved_before_an_option_existed_loads_with_the_behaviour_it_trained_with(data):
    model = make_model(data)
    config = copy.deepcopy(model._config())
    for key in ("invariance_kernel", "invariance_weight", "kl_inv_weight", "kl_spur_weight", "label_prior"):  # not saved by earlier versions
        del config["hparams"][key]
    loaded = InVAE.from_state(config, model._state_dict())
    module = loaded.module
    assert loaded.hparams["label_prior"] == "frequency"
    assert (module.invariance_kernel, module.invariance_weight, module.kl_inv_weight, module.kl_spur_weight) == ("mean", 0.0, 1.0, 1.0)
    module = InVAE.from_state(model._config(), model._state_dict()).module  # saved today: its own values
    assert (module.invariance_kernel, module.invariance_weight, module.kl_inv_weight, module.kl_spur_weight) == ("mmd", 300.0, 0.1, 0.1)


def test_input_thinning_reaches_the_module_and_is_saved(data):
    model = make_model(data, input_thinning=0.3)
    assert model.module.input_thinning == 0.3
    assert InVAE.from_state(model._config(), model._state_dict()).module.input_thinning == 0.3
    config = copy.deepcopy(model._config())
    del config["hparams"]["input_thinning"]  # a model saved before the option: trained without thinning
    assert InVAE.from_state(config, model._state_dict()).module.input_thinning == 0.0


def test_gene_batch_dispersion_trains_one_theta_per_batch_saves_and_maps_new_batches(data):
    model = make_model(data, dispersion="gene-batch")
    assert tuple(model.module.log_theta_batch.shape) == (N_BATCHES, data.n_vars)
    model.train(max_epochs=3, **FAST)
    assert model.module.log_theta_batch.detach().abs().sum() > 0  # the per-batch offsets trained
    loaded = InVAE.from_state(model._config(), model._state_dict())
    assert torch.equal(loaded.module.log_theta_batch, model.module.log_theta_batch)
    old_model = make_model(data)
    config = copy.deepcopy(old_model._config())
    del config["hparams"]["dispersion"]  # a model saved before the option: one theta per gene
    assert InVAE.from_state(config, old_model._state_dict()).module.log_theta_batch is None
    query = synthetic_counts(n_cells=120, n_genes=100, n_batches=1, n_types=N_TYPES, seed=3)
    query.obs["batch"] = "q0"
    mapped = model.map_query(query, max_epochs=2)
    old, new = model.module.log_theta_batch.detach(), mapped.module.log_theta_batch.detach()
    assert new.shape == (N_BATCHES + 1, data.n_vars) and torch.equal(new[:N_BATCHES], old)  # reference rows frozen
    assert not torch.allclose(new[N_BATCHES], old.mean(0))  # the query's row trained from the reference mean
    assert InVAE.from_state(mapped._config(), mapped._state_dict()).module.log_theta_batch.shape == new.shape
    with pytest.raises(ScinvInputError, match="needs a batch_key"):
        InVAE(data, layer="counts", label_key="cell_type", dispersion="gene-batch")


def test_invariance_kernel_mmd_is_the_training_penalty_and_is_saved(data):
    model = make_model(data, invariance_weight=30.0, invariance_kernel="mmd")
    model.train(max_epochs=3, **FAST)
    h = model.history[-1]
    assert h["train_invariance"] > 0
    assert model.hparams["invariance_weight"] == 30.0
    assert h["train_loss"] == pytest.approx(loss_terms(h, "train_", h["kl_weight"], model.hparams), rel=1e-5, abs=1e-3)
    assert InVAE.from_state(model._config(), model._state_dict()).module.invariance_kernel == "mmd"
    with pytest.raises(ValueError, match="invariance_kernel"):
        make_model(data, invariance_kernel="median")


def test_invariance_weighs_cells_without_a_label_by_the_joint_classifier(data):
    module = make_model(data, invariance_weight=1.0, invariance_on_unlabelled=True, invariance_confidence=0.0).module.eval()
    qm, label = torch.randn(4, 4), torch.tensor([0, 2, -1, -1])
    weights = module.invariance_label_weights(qm, label)
    assert torch.equal(weights[:2], torch.eye(3)[[0, 2]])
    with torch.no_grad():
        assert torch.allclose(weights[2:], torch.softmax(module.classifier(qm[2:]), dim=-1))
    module.invariance_on_unlabelled = False  # labelled cells only
    assert torch.equal(module.invariance_label_weights(qm, label)[2:], torch.zeros(2, 3))


def test_invariance_confidence_keeps_only_confident_predictions_as_hard_labels(data):
    module = make_model(data, invariance_weight=1.0, invariance_on_unlabelled=True, invariance_confidence=0.9).module.eval()
    with torch.no_grad():  # logits = 10 * the first three latent dimensions
        module.classifier.net.weight.copy_(10 * torch.eye(3, 4))
        module.classifier.net.bias.zero_()
    qm = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.1, 0.1, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    label = torch.tensor([0, -1, -1, -1])
    weights = module.invariance_label_weights(qm, label)
    assert torch.equal(weights[0], torch.eye(3)[0])  # a known label stays whatever the classifier says
    assert torch.equal(weights[1], torch.eye(3)[1])  # p = 0.9999: its hard label
    assert torch.equal(weights[2], torch.zeros(3))  # p = 0.42: left out
    assert torch.equal(weights[3], torch.eye(3)[2])
    module.invariance_confidence = 0.0  # soft weights for every cell, as before
    assert float(module.invariance_label_weights(qm, label)[2].sum()) == pytest.approx(1.0)


def test_sampled_kl_trains_and_agrees_with_the_analytic_kl_on_average(data, prior_models):
    models = {est: make_model(data, prior_mode="both", kl_estimator=est) for est in ("analytic", "sample")}
    for model in models.values():
        model.train(max_epochs=4, **FAST)
        h = model.history
        assert all(np.isfinite(r["train_loss"]) and np.isfinite(r["validation_loss"]) for r in h)
        assert h[-1]["train_reconstruction"] < h[0]["train_reconstruction"]
    assert models["sample"].hparams["kl_estimator"] == "sample"
    z = {est: m.get_latent_representation(data, "full") for est, m in models.items()}
    assert np.abs(z["analytic"] - z["sample"]).max() > 1e-3  # the option reaches the training objective
    # One set of weights (priors with label- and batch-dependent means and variances) scored by
    # both estimators in training mode, where z is a posterior sample. Each pass draws the same
    # dropout masks for both (same seed), so the analytic KL is exact for that pass and the
    # one-sample estimate scatters around it: their mean difference must vanish within its error.
    trained = prior_models["both"][0]
    twins = {est: same_weights_with(trained, kl_estimator=est).module.train() for est in ("analytic", "sample")}
    batch = next(iter(MinibatchLoader(trained._data, batch_size=N_CELLS, shuffle=False)))
    kl = {est: [] for est in twins}
    for i in range(200):
        for est, module in twins.items():
            torch.manual_seed(i)
            with torch.no_grad():
                out = module(batch)
            kl[est].append([float(out["kl_inv"]), float(out["kl_spur"])])
    analytic, sampled = np.array(kl["analytic"]), np.array(kl["sample"])
    diff = sampled - analytic
    error = diff.std(0, ddof=1) / np.sqrt(len(diff))  # standard error of the mean difference, ~0.005 nats
    assert (analytic > 0).all() and (error > 1e-4).all()  # 'sample' really samples
    assert (np.abs(diff.mean(0)) < 4 * error + 1e-3).all(), (analytic.mean(0), diff.mean(0), error)


@pytest.fixture(scope="module")
def prior_models(data):
    """prior_mode -> (trained model with a predictor, its priors after the first epoch)."""
    out = {}
    eye_labels, eye_batches = torch.eye(N_TYPES), torch.eye(N_BATCHES)
    for mode in ("variance", "both"):
        # the mean penalty: at 12 epochs on 400 cells mmd's weight slows the labels down (both reach 1.0 by 60)
        model = make_model(data, prior_mode=mode, invariance_kernel="mean")
        model.train(max_epochs=1, **FAST)
        with torch.no_grad():
            early = (model.module.prior_inv(eye_labels), model.module.prior_spur(eye_batches))
        model.train(max_epochs=11, batch_size=128, early_stopping_patience=0)  # continues from the current weights
        model.train_predictor(max_epochs=15)
        out[mode] = (model, early)
    return out


@pytest.mark.parametrize("mode", ["variance", "both"])
def test_prior_mode_through_the_model(data, prior_models, mode, tmp_path):
    model, (early_inv, early_spur) = prior_models[mode]
    assert model.hparams["prior_mode"] == mode
    assert all(np.isfinite(h["train_loss"]) for h in model.history)
    z = model.get_latent_representation(data, "inv")
    assert z.shape == (N_CELLS, 4) and np.isfinite(z).all()
    labels, probs = model.predict(data)
    assert np.allclose(probs.sum(1), 1, atol=1e-5) and list(probs.columns) == ["t0", "t1", "t2"]
    assert (labels == data.obs["cell_type"].astype(str).to_numpy()).mean() > 0.45  # chance: 1/3
    with torch.no_grad():
        priors = {"inv": (model.module.prior_inv(torch.eye(N_TYPES)), early_inv), "spur": (model.module.prior_spur(torch.eye(N_BATCHES)), early_spur)}
    for which, ((mean, var), (early_mean, early_var)) in priors.items():
        off_diagonal = ~torch.eye(len(var), dtype=bool)
        assert torch.cdist(var.log(), var.log())[off_diagonal].min() > 0.05, (which, var)  # each label (batch) has its own variance
        # the KL uses the learned variance: training moved it (only the KL gives it a gradient)
        assert (var.log() - early_var.log()).abs().max() > 0.1, (which, var, early_var)
        if mode == "variance":
            assert torch.all(mean == 0), (which, mean)
        else:
            assert torch.cdist(mean, mean)[off_diagonal].min() > 0.05, (which, mean)
            assert (mean - early_mean).abs().max() > 0.1, (which, mean, early_mean)
    # the mode is saved with the model and rebuilds the same priors
    model.save(tmp_path / "m")
    loaded = InVAE.load(tmp_path / "m")
    assert loaded.hparams["prior_mode"] == mode
    with torch.no_grad():
        for a, b in zip(loaded.module.prior_inv(torch.eye(N_TYPES)), priors["inv"][0]):
            assert torch.allclose(a, b)


# -- pipeline steps --------------------------------------------------------------------------------------


def test_qc_mad_threshold_removes_outliers_of_their_own_sample(tmp_path, data):
    adata = data.copy()
    adata.obs["sample"] = adata.obs["batch"].astype(str)
    batch = adata.obs["batch"].astype(str).to_numpy()
    factor = np.where(batch == "b1", 10.0, 1.0)  # a whole sample sequenced 10x deeper: normal for it
    outliers = np.array([np.flatnonzero(batch == b)[i] for b in ("b0", "b1") for i in (3, 50)])
    factor[outliers] *= 50.0  # 50x the library size of their sample
    adata.X = sp.csr_matrix(np.round(adata.X.toarray() * factor[:, None]).astype(np.float32))
    adata.layers["counts"] = adata.X.copy()
    write_h5ad(adata, tmp_path / "m.h5ad")
    out = {n: str(tmp_path / n) for n in ("q.h5ad", "n.h5ad", "s.csv", "c.parquet")}
    res = run_script(
        "scinv_qc.py",
        *("--input", str(tmp_path / "m.h5ad"), "--output", out["q.h5ad"]),
        *("--no-doublets", "--min-genes", "1", "--min-counts", "1", "--mad-threshold", "5"),
    )
    assert res.returncode == 0, res.stderr[-2000:]
    res = run_script(
        "scinv_normalize.py", out["q.h5ad"], "--output", out["n.h5ad"], "--summary", out["s.csv"], "--cells", out["c.parquet"], "--n-top-genes", "50"
    )
    assert res.returncode == 0, res.stderr[-2000:]
    cells = pd.read_parquet(out["c.parquet"])
    assert len(cells) == N_CELLS
    flagged = cells.index[cells["qc_reason"] == "mad_outlier"]
    assert sorted(flagged) == sorted(adata.obs_names[outliers])
    assert set(cells["qc_reason"].drop(flagged)) == {"kept"}  # the deep sample is judged against its own median
    kept = ad.read_h5ad(out["n.h5ad"])
    assert kept.n_obs == N_CELLS - len(outliers) and not set(flagged) & set(kept.obs_names)
    table = pd.read_csv(out["s.csv"], index_col=0)
    assert table.loc["b0", "mad_outlier"] == 2 and table.loc["b1", "mad_outlier"] == 2 and table.loc["total", "mad_outlier"] == 4
    assert table.loc["total", "kept"] == N_CELLS - 4


def test_export_cellxgene_copy_is_log_normalised_with_x_umap(tmp_path, data):
    adata = data[:300].copy()
    model = make_model(adata)
    model.train(max_epochs=2, **FAST)
    model.train_predictor(max_epochs=3)
    model.save(tmp_path / "model")
    counts = adata.layers["counts"]
    adata.X = sp.csr_matrix(sp.diags(1e4 / np.asarray(counts.sum(1)).ravel()) @ counts).log1p().astype(np.float32)
    write_h5ad(adata, tmp_path / "n.h5ad")
    t = lambda n: str(tmp_path / n)  # noqa: E731
    res = run_script(
        "scinv_export.py",
        *("--input", t("n.h5ad"), "--model-dir", t("model"), "--output", t("f.h5ad"), "--embeddings", t("e.parquet"), "--cellxgene", t("cx.h5ad")),
    )
    assert res.returncode == 0, res.stderr[-2000:]
    cx, final = ad.read_h5ad(t("cx.h5ad")), ad.read_h5ad(t("f.h5ad"))
    # one row per cell and gene, with unique ids (cellxgene's requirement)
    assert list(cx.obs_names) == list(adata.obs_names) and list(cx.var_names) == list(adata.var_names)
    assert cx.obs_names.is_unique and cx.var_names.is_unique
    # X: the log-normalised values, not the counts
    x = cx.X.toarray() if sp.issparse(cx.X) else np.asarray(cx.X)
    assert np.allclose(x, adata.X.toarray(), atol=1e-6)
    assert np.allclose(np.expm1(x).sum(1), 1e4, rtol=1e-3)
    # X_umap: the 2-D UMAP of the invariant latent
    assert cx.obsm["X_umap"].shape == (300, 2) and np.isfinite(cx.obsm["X_umap"]).all()
    assert np.allclose(cx.obsm["X_umap"], final.obsm["X_umap_scinv_inv"])
    # every embedding is an X_ key cellxgene can draw (2-D, at least two columns, finite)
    for key, value in cx.obsm.items():
        value = np.asarray(value)
        assert key.startswith("X_") and value.ndim == 2 and value.shape[1] >= 2 and np.isfinite(value).all(), key
    assert np.allclose(cx.obsm["X_scinv_inv"], final.obsm["X_scinv_inv"])
    assert (cx.obs["scinv_prediction"].astype(str) == final.obs["scinv_prediction"].astype(str)).all()


def _annotation(kind: str, tmp_path):
    path = tmp_path / f"labels_{kind}.csv"
    if kind == "missing":
        return path
    if kind == "folder":
        path.mkdir()
    elif kind == "no_cell_id_column":
        path.write_text("barcode,cell_type\ncell0,T\n")
    elif kind == "no_matching_ids":
        path.write_text("cell_id,cell_type\nS1_AAAC,T\nS1_AAAG,B\n")
    elif kind == "empty":
        path.write_text("")
    elif kind == "not_text":
        path.write_bytes(b"\xff\xfe\x00\x01binary\x00")
    return path


@pytest.mark.parametrize(
    "kind, says",
    [
        ("missing", "annotation file not found"),
        ("folder", "not a folder"),
        ("no_cell_id_column", "needs a 'cell_id' column"),
        ("no_matching_ids", "no cell_id matches a cell (ids look like 'cell0')"),
        ("empty", "not a readable CSV table"),
        ("not_text", "not a readable CSV table"),
    ],
)
def test_check_input_bad_annotations_file(tmp_path, data, kind, says):
    write_h5ad(data, tmp_path / "in.h5ad")
    annotations = _annotation(kind, tmp_path)
    out = tmp_path / "out.h5ad"
    res = run_script("scinv_check_input.py", "--input", str(tmp_path / "in.h5ad"), "--output", str(out), "--annotations", str(annotations))
    assert res.returncode == 2, res.stderr[-2000:]
    line = one_error_line(res.stderr)
    assert str(annotations) in line and says in line, line
    assert not out.exists() and not list(tmp_path.glob("out.h5ad*"))
