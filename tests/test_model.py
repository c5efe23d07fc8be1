"""The user-facing model on real (small) data: training, latents, predictor, persistence, queries."""

import json

import anndata as ad
import numpy as np
import pytest
import torch

from scinv.errors import ScinvInputError
from scinv.model import InVAE

FAST = dict(max_epochs=8, kl_warmup_epochs=2, batch_size=128, early_stopping_patience=0)


def make_model(adata, **kw):
    return InVAE(adata, layer="counts", batch_key="batch", label_key="cell_type", n_latent_inv=6, n_latent_spur=2, n_hidden=32, **kw)


@pytest.fixture(scope="module")
def trained():
    from scinv.datasets import synthetic_counts

    adata = synthetic_counts(n_cells=600, n_genes=120, n_batches=3, n_types=4, seed=0)
    model = make_model(adata)
    model.train(**{**FAST, "max_epochs": 40})
    model.train_predictor(max_epochs=30)
    return adata, model


def test_shapes_and_probabilities(trained):
    adata, model = trained
    assert model.get_latent_representation(adata, "inv").shape == (600, 6)
    assert model.get_latent_representation(adata, "spur").shape == (600, 2)
    assert model.get_latent_representation(adata, "full").shape == (600, 8)
    labels, probs = model.predict(adata)
    assert labels.shape == (600,) and probs.shape == (600, 4)
    assert np.allclose(probs.sum(1), 1, atol=1e-5)
    assert (labels == adata.obs["cell_type"].astype(str).to_numpy()).mean() > 0.6


def test_loss_decreases(trained):
    _, model = trained
    hist = model.history
    assert hist[-1]["train_reconstruction"] < hist[0]["train_reconstruction"]
    assert "validation_loss" in hist[-1]


def test_invariant_prior_responds_to_labels(trained):
    _, model = trained
    means, _ = model.module.prior_inv(torch.eye(4))
    dists = torch.cdist(means, means)
    assert dists[~torch.eye(4, dtype=bool)].min() > 0.1


def test_no_label_leakage(trained):
    adata, model = trained
    z = model.get_latent_representation(adata, "full")
    no_label = adata.copy()
    del no_label.obs["cell_type"]
    shuffled = adata.copy()
    shuffled.obs["cell_type"] = np.random.default_rng(1).permutation(shuffled.obs["cell_type"].to_numpy())
    assert np.array_equal(z, model.get_latent_representation(no_label, "full"))
    assert np.array_equal(z, model.get_latent_representation(shuffled, "full"))


def test_save_load_round_trip_needs_no_data(trained, tmp_path):
    adata, model = trained
    model.save(tmp_path / "m")
    loaded = InVAE.load(tmp_path / "m")
    assert loaded.adata is None
    assert np.allclose(model.get_latent_representation(adata), loaded.get_latent_representation(adata), atol=1e-6)
    l1, p1 = model.predict(adata)
    l2, p2 = loaded.predict(adata)
    assert np.array_equal(l1, l2) and np.allclose(p1.to_numpy(), p2.to_numpy(), atol=1e-6)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["registry"]["labels"] == ["t0", "t1", "t2", "t3"]
    assert cfg["registry"]["batch"]["categories"] == ["b0", "b1", "b2"]
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]


def test_model_from_another_version_is_refused(trained, tmp_path):
    _, model = trained
    model.save(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["format"] = 99
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ScinvInputError, match="format 99"):
        InVAE.load(tmp_path / "m")
    with pytest.raises(ScinvInputError, match="not a scinv model"):
        InVAE.load(tmp_path)


def test_unseen_categories_are_refused_not_zeroed(trained):
    adata, model = trained
    query = adata[:50].copy()
    query.obs["batch"] = "new_lab"
    with pytest.raises(ScinvInputError, match="not seen in training"):
        model.registry.encode(query)
    query.obs["batch"] = adata.obs["batch"][:50].to_numpy()
    query.obs["cell_type"] = "new_type"
    with pytest.raises(ScinvInputError, match="labels not seen"):
        model.registry.encode(query)


def test_map_query_extends_batches_and_keeps_reference(trained):
    adata, model = trained
    from scinv.datasets import synthetic_counts

    query = synthetic_counts(n_cells=200, n_genes=120, n_batches=1, n_types=4, seed=5)
    query.obs["batch"] = "q0"
    query.obs["cell_type"] = "Unknown"
    z_ref = model.get_latent_representation(adata)
    mapped = model.map_query(query, max_epochs=3)
    assert mapped.registry.batch.categories == ["b0", "b1", "b2", "q0"]
    assert mapped.module.prior_spur.net[0].in_features == model.module.prior_spur.net[0].in_features + 1
    assert np.allclose(mapped.get_latent_representation(adata), z_ref, atol=1e-6)  # encoder frozen
    labels, _ = mapped.predict(query)
    assert len(labels) == 200
    # the new batch's prior column was trained, the reference batch columns were not
    w_old = model.module.prior_spur.net[0].weight.detach()
    w_new = mapped.module.prior_spur.net[0].weight.detach()
    assert torch.allclose(w_new[:, :3], w_old[:, :3])


def test_second_train_continues_from_the_current_weights(small_adata):
    model = make_model(small_adata)
    model.train(**{**FAST, "max_epochs": 3})
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    z_before = model.get_latent_representation(small_adata)
    model.train(max_epochs=2, batch_size=128, early_stopping_patience=0, lr=1e-6)
    assert [h["epoch"] for h in model.history] == [1, 2, 3, 4, 5]
    assert model.history[3]["kl_weight"] == 1.0  # no second KL warm-up
    # lr 1e-6 for two epochs: the weights moved a little from where they were, not from a fresh start
    after = model.module.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert np.abs(model.get_latent_representation(small_adata) - z_before).max() < 0.05


def test_a_mapped_query_model_refuses_train_and_keeps_reference_weights(trained):
    adata, model = trained
    from scinv.datasets import synthetic_counts

    query = synthetic_counts(n_cells=200, n_genes=120, n_batches=1, n_types=4, seed=6)
    query.obs["batch"] = "q1"
    mapped = model.map_query(query, max_epochs=2)
    decoder = {k: v.clone() for k, v in mapped.module.decoder.state_dict().items()}
    with pytest.raises(ScinvInputError, match="made by map_query"):
        mapped.train(max_epochs=2)
    assert all(torch.equal(decoder[k], v) for k, v in mapped.module.decoder.state_dict().items())
    assert all(torch.equal(v, model.module.decoder.state_dict()[k]) for k, v in decoder.items())


def test_unknown_labels_train_and_get_predictions(small_adata):
    truth = small_adata.obs["cell_type"].astype(str).to_numpy(copy=True)
    small_adata.obs["cell_type"] = truth
    small_adata.obs.loc[small_adata.obs_names[:100], "cell_type"] = "Unknown"
    model = make_model(small_adata)
    assert model.registry.labels == ["t0", "t1", "t2", "t3"]
    assert (model._data.labels == -1).sum() == 100
    model.train(**{**FAST, "max_epochs": 40})
    model.train_predictor(max_epochs=30)
    labels, probs = model.predict(small_adata[:100])
    # cells whose labels training never saw get their true type far above chance (0.25)
    assert (labels == truth[:100]).mean() > 0.6 and probs.shape == (100, 4)


def test_same_seed_same_embedding(small_adata):
    z = []
    for _ in range(2):
        m = make_model(small_adata)
        m.train(**FAST, seed=3)
        z.append(m.get_latent_representation(small_adata))
    assert np.array_equal(z[0], z[1])


def test_resume_from_checkpoint_equals_uninterrupted_run(small_adata, tmp_path):
    full = make_model(small_adata)
    full.train(**{**FAST, "max_epochs": 6}, seed=1)
    first = make_model(small_adata)
    first.train(**{**FAST, "max_epochs": 3}, seed=1, checkpoint_dir=tmp_path, checkpoint_every=3)
    resumed = make_model(small_adata)
    resumed.train(**{**FAST, "max_epochs": 6}, seed=1, checkpoint_dir=tmp_path, checkpoint_every=3)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4, 5, 6]
    assert abs(resumed.history[-1]["train_loss"] - full.history[-1]["train_loss"]) < 1e-3 * abs(full.history[-1]["train_loss"])
    assert np.allclose(resumed.get_latent_representation(small_adata), full.get_latent_representation(small_adata), atol=1e-4)
    # the checkpoint loads with weights_only=True (no pickle of arbitrary objects)
    torch.load(tmp_path / "last.ckpt", weights_only=True)


def test_backed_h5ad_trains_from_disk(small_adata, tmp_path):
    path = tmp_path / "d.h5ad"
    small = small_adata.copy()
    del small.layers["counts"]
    small.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    model = InVAE(backed, batch_key="batch", label_key="cell_type", n_latent_inv=4, n_latent_spur=2, n_hidden=16)
    assert not hasattr(model._data.X, "toarray") or model._data.X is backed.X
    model.train(**FAST)
    z_backed = model.get_latent_representation(backed)
    z_memory = model.get_latent_representation(ad.read_h5ad(path))
    assert np.allclose(z_backed, z_memory, atol=1e-5)


def test_large_training_files_stream_their_counts_layer(small_adata, tmp_path):
    """io.read_counts_for_model: above the threshold the counts layer stays on disk, chunks mix
    runs from all over the file, and latents equal those from the counts in memory."""
    from scinv.data import MinibatchLoader
    from scinv.io import read_counts_for_model

    small_adata.write_h5ad(tmp_path / "n.h5ad")
    streamed = read_counts_for_model(tmp_path / "n.h5ad", "counts", stream_above=100)
    in_memory = read_counts_for_model(tmp_path / "n.h5ad", "counts")
    assert not hasattr(streamed.layers["counts"], "toarray") and hasattr(in_memory.layers["counts"], "toarray")
    model = InVAE(streamed, layer="counts", batch_key="batch", label_key="cell_type", n_latent_inv=4, n_latent_spur=2, n_hidden=16)
    loader = MinibatchLoader(model._data, batch_size=32, chunk_size=120, block_size=20, seed=0)
    chunks = [np.concatenate(blocks) for blocks in loader._order()]
    assert sorted(np.concatenate(chunks)) == list(range(small_adata.n_obs))  # every cell once per epoch
    assert np.mean([np.ptp(c) for c in chunks]) > 300  # a chunk spans the file, not one 120-cell run
    model.train(**FAST)
    assert np.allclose(model.get_latent_representation(streamed), model.get_latent_representation(in_memory), atol=1e-5)


def test_genes_must_match(trained):
    adata, model = trained
    with pytest.raises(ScinvInputError, match="genes differ"):
        model.get_latent_representation(adata[:, :50].copy())


def test_encoder_with_covariates_handles_unknown_batches_explicitly(small_adata):
    model = make_model(small_adata, encode_covariates=True)
    assert model.module.encoder.covariates.in_features == 3
    model.train(**FAST)
    query = small_adata[:40].copy()
    query.obs["batch"] = "unseen"
    with pytest.warns(UserWarning, match="batch unknown"):
        z = model.get_latent_representation(query)
    assert np.isfinite(z).all()
    mapped = model.map_query(query, max_epochs=2)
    assert mapped.module.encoder.covariates.in_features == 4
    w_old = model.module.encoder.covariates.weight.detach()
    assert torch.allclose(mapped.module.encoder.covariates.weight.detach()[:, :3], w_old)


def test_joint_classifier_is_trained_and_logged(trained):
    _, model = trained
    assert model.module.classifier is not None
    assert "train_classification" in model.history[-1]
    assert model.history[-1]["train_classification"] < model.history[0]["train_classification"]
