"""Reference mapping: gene alignment, the reference sample kept with a model, novelty of unseen types."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from sklearn.metrics import roc_auc_score

from conftest import one_error_line, run_script
from scinv.datasets import synthetic_counts
from scinv.errors import ScinvInputError
from scinv.mapping import REFERENCE_FILE, align_genes, calibrate_threshold, novelty_scores, place_on_reference_umap, smallest_centroid_gap
from scinv.model import InVAE


def test_align_genes_zero_fills_missing_genes_in_x_and_layers():
    adata = ad.AnnData(sp.csr_matrix(np.arange(12, dtype=np.float32).reshape(3, 4)), var=pd.DataFrame(index=["a", "b", "c", "d"]))
    adata.layers["counts"] = adata.X.copy()
    aligned, missing = align_genes(adata, ["d", "x", "a", "b", "c"], "q", max_missing=0.25)
    assert list(aligned.var_names) == ["d", "x", "a", "b", "c"] and missing == pytest.approx(0.2)
    expect = np.array([[3, 0, 0, 1, 2], [7, 0, 4, 5, 6], [11, 0, 8, 9, 10]], dtype=np.float32)
    assert np.array_equal(aligned.X.toarray(), expect) and np.array_equal(aligned.layers["counts"].toarray(), expect)


def test_align_genes_stops_above_the_missing_fraction():
    adata = ad.AnnData(np.ones((2, 2), np.float32), var=pd.DataFrame(index=["a", "b"]))
    with pytest.raises(ScinvInputError, match=r"query.csv: 2 of the model's 4 genes \(50%\) are missing"):
        align_genes(adata, ["a", "b", "c", "d"], "query.csv", max_missing=0.25)


def test_threshold_is_a_quantile_of_held_out_scores_across_batches_with_a_type_gap_floor():
    rng = np.random.default_rng(0)
    latent = rng.normal(0, 1, (400, 3)).astype(np.float32)
    batches = np.repeat(["b0", "b1"], 200)
    cal = calibrate_threshold(latent, batches, np.arange(0, 400, 4))
    assert cal["across_batches"] and cal["calibration_cells"] == 100
    own = np.concatenate([novelty_scores(latent[batches != b], latent[np.arange(0, 400, 4)][batches[::4] == b]) for b in ("b0", "b1")])
    assert cal["threshold"] == pytest.approx(np.quantile(own, 0.99), rel=0.05)
    # two tight types 10 apart: the floor (a quarter of the gap) sets the threshold
    labels = np.where(np.arange(400) % 2 == 0, "A", "B")
    tight = np.where(labels[:, None] == "A", 0.0, 10.0) + rng.normal(0, 0.01, (400, 3))
    assert smallest_centroid_gap(tight, labels) == pytest.approx(np.sqrt(300), rel=0.01)
    assert calibrate_threshold(tight, batches, np.arange(0, 400, 4), labels)["threshold"] == pytest.approx(0.25 * np.sqrt(300), rel=0.01)
    assert smallest_centroid_gap(tight, np.array([""] * 400)) is None


@pytest.fixture(scope="module")
def reference_and_query():
    """Four types of their own profile; the reference lacks t3, the query batch has it."""
    adata = synthetic_counts(n_cells=1600, n_genes=150, n_batches=4, n_types=4, batch_strength=0.5, seed=1)
    adata.obs = adata.obs.astype(str)
    query_cells = (adata.obs["batch"] == "b3").to_numpy()
    reference = adata[~query_cells & (adata.obs["cell_type"] != "t3").to_numpy()].copy()
    query = adata[query_cells].copy()
    model = InVAE(reference, layer="counts", batch_key="batch", label_key="cell_type", n_latent_inv=6, n_latent_spur=2, n_hidden=32)
    model.train(max_epochs=40, kl_warmup_epochs=2, batch_size=128, early_stopping_patience=0)
    model.train_predictor(max_epochs=30)
    model.store_reference(max_cells=800, seed=0)
    return reference, query, model


def test_reference_sample_is_saved_and_loaded_with_the_model(reference_and_query, tmp_path):
    reference, _, model = reference_and_query
    ref = model.reference
    assert ref.latent.shape == (800, 6) and ref.umap.shape == (800, 2) and set(ref.obs["batch"]) == {"b0", "b1", "b2"}
    assert set(ref.obs["label"]) == {"t0", "t1", "t2"} and ref.threshold > 0
    model.save(tmp_path / "m")
    assert (tmp_path / "m" / REFERENCE_FILE).exists()
    loaded = InVAE.load(tmp_path / "m")
    assert np.allclose(loaded.reference.latent, ref.latent) and loaded.reference.threshold == pytest.approx(ref.threshold)
    assert np.allclose(loaded.reference.umap, ref.umap) and list(loaded.reference.obs["label"]) == list(ref.obs["label"])
    # the kept latents are the model's latents of those cells
    cells = reference.obs_names.get_indexer(ref.obs.index)
    assert np.allclose(model.get_latent_representation(reference[cells].copy(), "inv"), ref.latent, atol=1e-5)


def test_mapped_query_flags_the_type_the_reference_lacks(reference_and_query):
    _, query, model = reference_and_query
    mapped = model.map_query(query, max_epochs=5)
    assert mapped.reference is model.reference  # carried over: novelty needs no reference data
    scores = mapped.novelty(query)
    novel = (query.obs["cell_type"] == "t3").to_numpy()
    assert roc_auc_score(novel, scores) > 0.9
    called = scores > mapped.reference.threshold
    assert called[novel].mean() > 0.5 and called[~novel].mean() < 0.05
    xy = place_on_reference_umap(mapped.reference, mapped.get_latent_representation(query))
    assert xy.shape == (query.n_obs, 2) and np.isfinite(xy).all()


def test_map_query_ignores_query_labels_it_never_saw(reference_and_query):
    """The query's label column may hold new types (and is what transfer is scored on): not read."""
    _, query, model = reference_and_query
    mapped = model.map_query(query, max_epochs=1)
    assert (mapped._data.labels == -1).all()
    w_old = model.module.prior_spur.net[0].weight.detach()
    assert torch.allclose(mapped.module.prior_spur.net[0].weight.detach()[:, :3], w_old[:, :3])


def test_novelty_without_a_reference_sample_says_what_to_do(small_adata):
    model = InVAE(small_adata, layer="counts", batch_key="batch", label_key="cell_type", n_hidden=16)
    with pytest.raises(ScinvInputError, match="store_reference"):
        model.novelty(small_adata)


def test_map_cli_refuses_a_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "notamodel").mkdir()
    query = synthetic_counts(n_cells=50, n_genes=20, n_batches=1, seed=0)
    query.write_h5ad(tmp_path / "q.h5ad")
    res = run_script(
        "scinv_map.py",
        "--input",
        str(tmp_path / "q.h5ad"),
        "--reference-model",
        str(tmp_path / "notamodel"),
        "--model-dir",
        str(tmp_path / "out"),
        "--history",
        str(tmp_path / "h.csv"),
    )
    assert res.returncode == 2 and "not a scinv model directory" in one_error_line(res.stderr)
    assert not (tmp_path / "out").exists()


def test_export_and_report_of_a_query_mapped_onto_a_model_without_labels(tmp_path):
    """No label column anywhere: the query still gets novelty scores, the reference UMAP and a report."""
    adata = synthetic_counts(n_cells=500, n_genes=60, n_batches=3, n_types=3, seed=2)
    adata.obs = adata.obs[["batch"]].astype(str)
    reference, query = adata[adata.obs["batch"] != "b2"].copy(), adata[adata.obs["batch"] == "b2"].copy()
    model = InVAE(reference, layer="counts", batch_key="batch", n_latent_inv=4, n_latent_spur=2, n_hidden=16)
    model.train(max_epochs=5, batch_size=128)
    model.store_reference(seed=0)
    model.save(tmp_path / "ref")
    query.write_h5ad(tmp_path / "q.h5ad")
    mapped = run_script(
        "scinv_map.py", "--input", str(tmp_path / "q.h5ad"), "--reference-model", str(tmp_path / "ref"),
        "--model-dir", str(tmp_path / "qm"), "--history", str(tmp_path / "h.csv"), "--max-epochs", "2",
    )  # fmt: skip
    assert mapped.returncode == 0, mapped.stderr
    out = tmp_path / "final.h5ad"
    export = run_script(
        "scinv_export.py", "--input", str(tmp_path / "q.h5ad"), "--model-dir", str(tmp_path / "qm"),
        "--output", str(out), "--embeddings", str(tmp_path / "e.parquet"), "--no-umap",
    )  # fmt: skip
    assert export.returncode == 0, export.stderr
    final = ad.read_h5ad(out)
    assert "scinv_novelty" in final.obs and "scinv_prediction" not in final.obs
    assert final.obsm["X_umap_reference"].shape == (query.n_obs, 2)
    report = run_script("scinv_report.py", "--input", str(out), "--output", str(tmp_path / "r.html"), "--model-dir", str(tmp_path / "qm"))
    assert report.returncode == 0, report.stderr
    assert "Query mapping" in (tmp_path / "r.html").read_text()
