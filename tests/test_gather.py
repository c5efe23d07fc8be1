"""NORMALIZE at atlas scale (scinv.gather): per-sample QC files merged with one sample in memory
give what the in-memory path gives on the merged data: same cells, same HVGs as scanpy's
batch-aware seurat_v3, same normalised values and PCA."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc

from scinv import gather as gather_module
from scinv.datasets import synthetic_counts
from scinv.gather import gather
from scinv.io import write_h5ad
from scinv.preprocess import QCThresholds, normalize_and_select, qc_sample, run_qc

THRESHOLDS = QCThresholds(min_genes=20, min_counts=50, doublets=False)


@pytest.fixture
def atlas():
    """6 samples in 3 batches (two samples per batch, so HVG batches are not samples)."""
    adata = synthetic_counts(n_cells=1500, n_genes=400, n_batches=3, n_types=4, library_log_mean=6.0, dispersion=0.5, seed=3)
    adata.obs["sample"] = pd.Categorical([f"{b}_s{i % 2}" for i, b in enumerate(adata.obs["batch"])])
    adata.obs_names = [f"{s}_{n}" for s, n in zip(adata.obs["sample"], adata.obs_names)]
    return adata[np.argsort(adata.obs["sample"].to_numpy(), kind="stable")].copy()  # as merged from a samplesheet


def write_qc_files(adata: ad.AnnData, folder) -> list[str]:
    files = []
    for name in adata.obs["sample"].cat.categories:
        sample = adata[adata.obs["sample"] == name].copy()
        qc_sample(sample, THRESHOLDS)
        sample.X = sample.layers.pop("counts")
        files.append(str(folder / f"{name}.h5ad"))
        write_h5ad(sample, files[-1])
    return files


def in_memory(adata: ad.AnnData, flavor: str, n_top_genes: int) -> ad.AnnData:
    kept, _ = run_qc(adata.copy(), THRESHOLDS, "batch")
    return normalize_and_select(kept, n_top_genes, "batch", flavor, 1e4, 20, 0)


def test_streamed_merge_equals_the_in_memory_path_and_scanpy(tmp_path, atlas):
    files = write_qc_files(atlas, tmp_path)
    summary, cells, record = gather(files, str(tmp_path / "n.h5ad"), n_top_genes=100, n_pcs=20)
    streamed = ad.read_h5ad(tmp_path / "n.h5ad")
    expected = in_memory(atlas, "seurat_v3", 100)
    assert record["hvg"]["flavor"] == "seurat_v3" and record["hvg"]["fallback"] == ""
    assert list(streamed.obs_names) == list(expected.obs_names)  # same cells, samplesheet order
    assert list(streamed.var_names) == list(expected.var_names)  # same HVGs
    kept, _ = run_qc(atlas.copy(), THRESHOLDS, "batch")  # and they are scanpy's own answer
    scanpy_hvgs = sc.pp.highly_variable_genes(kept, flavor="seurat_v3", batch_key="batch", n_top_genes=100, layer="counts", inplace=False)
    assert set(streamed.var_names) == set(kept.var_names[scanpy_hvgs["highly_variable"].to_numpy()])
    np.testing.assert_allclose(streamed.var["variances_norm"], expected.var["variances_norm"], rtol=1e-6)
    np.testing.assert_allclose(streamed.var["means"], expected.var["means"], rtol=1e-6)
    np.testing.assert_allclose(streamed.var["variances"], expected.var["variances"], rtol=1e-5)
    assert abs(streamed.X - expected.X).max() < 1e-6 and abs(streamed.layers["counts"] - expected.layers["counts"]).max() == 0
    np.testing.assert_allclose(np.abs(streamed.obsm["X_pca"]), np.abs(expected.obsm["X_pca"]), atol=1e-3)
    assert summary.loc["total", "before"] == atlas.n_obs and summary.loc["total", "kept"] == streamed.n_obs
    assert len(cells) == atlas.n_obs and set(cells["qc_reason"]) >= {"kept"}
    assert streamed.obs["batch"].dtype == "category" and streamed.uns["scinv_normalize"]["hvg"]["span"] == 0.3


def test_other_flavours_fall_back_to_the_in_memory_selection(tmp_path, atlas):
    files = write_qc_files(atlas, tmp_path)
    _, _, record = gather(files, str(tmp_path / "n.h5ad"), n_top_genes=100, flavor="seurat", n_pcs=20)
    assert record["hvg"]["flavor"] == "seurat"
    assert list(ad.read_h5ad(tmp_path / "n.h5ad").var_names) == list(in_memory(atlas, "seurat", 100).var_names)


def test_pca_on_a_subsample_spans_the_full_pca(tmp_path, atlas, monkeypatch):
    files = write_qc_files(atlas, tmp_path)
    gather(files, str(tmp_path / "full.h5ad"), n_top_genes=100, n_pcs=10)
    monkeypatch.setattr(gather_module, "PCA_FIT_CELLS", 700)
    monkeypatch.setattr(gather_module, "CHUNK_CELLS", 300)
    gather(files, str(tmp_path / "sub.h5ad"), n_top_genes=100, n_pcs=10)
    full, sub = ad.read_h5ad(tmp_path / "full.h5ad").obsm["X_pca"], ad.read_h5ad(tmp_path / "sub.h5ad").obsm["X_pca"]
    assert sub.shape == full.shape
    # the leading components of all cells lie in the span of a 700-cell fit's (near-equal
    # eigenvalues may rotate single components, so the subspace is compared)
    _, residual, *_ = np.linalg.lstsq(np.c_[sub[:, :5], np.ones(len(sub))], full[:, :3], rcond=None)
    r2 = 1 - residual / ((full[:, :3] - full[:, :3].mean(0)) ** 2).sum(0)
    assert (r2 > 0.99).all(), r2


def test_query_mode_lays_samples_out_on_the_model_genes_zero_filling_what_a_sample_lacks(tmp_path, atlas):
    genes = list(atlas.var_names[::3][:50]) + ["GENE_ONLY_IN_REFERENCE"]
    files = write_qc_files(atlas, tmp_path)
    short = ad.read_h5ad(files[0])  # the first sample lacks two of the model's genes
    short = short[:, ~short.var_names.isin(genes[:2])].copy()
    write_h5ad(short, files[0])
    _, _, record = gather(files, str(tmp_path / "q.h5ad"), reference_genes=genes, max_missing_genes=0.1)
    query = ad.read_h5ad(tmp_path / "q.h5ad")
    assert list(query.var_names) == genes and "X_pca" not in query.obsm
    assert record["flavor"] == "reference" and record["hvg"]["missing_genes_per_sample"]["b0_s0"] == 3
    first = (query.obs["sample"] == "b0_s0").to_numpy()
    assert query.layers["counts"][first][:, :2].nnz == 0 and query.layers["counts"][:, -1].nnz == 0
    kept, _ = run_qc(atlas.copy(), THRESHOLDS, "batch")
    rest = kept[kept.obs["sample"] != "b0_s0", genes[:-1]]
    assert abs(query.layers["counts"][~first][:, :-1] - rest.layers["counts"]).max() == 0  # raw counts, same cells
    with pytest.raises(Exception, match=r"sample 'b0_s0' .*3 of the model's 51 genes \(6%\) are missing .*--max_missing_genes 0.05"):
        gather(files, str(tmp_path / "q2.h5ad"), reference_genes=genes, max_missing_genes=0.05)
    assert not (tmp_path / "q2.h5ad").exists()
