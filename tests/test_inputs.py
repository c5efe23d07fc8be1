"""The inputs users have: Cell Ranger folders and files, .h5ad exports, labels and gene panels."""

import gzip
import shutil

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import shapes
from scinv.errors import ScinvInputError
from scinv.io import read_counts
from scinv.labels import normalize_labels, unlabelled
from scinv.preprocess import QCThresholds, normalize_and_select, qc_metrics, resolve_cell_thresholds


@pytest.fixture
def sample():
    return shapes.cells(80, 60, seed=0)


def same_counts(a, b):
    return a.shape == b.shape and (sp.csr_matrix(a.X) != sp.csr_matrix(b.X)).nnz == 0


@pytest.mark.parametrize("kind", ["mtx_v2", "mtx_v3", "h5_v2", "h5_v3", "csc_uint16", "dense_float64", "int64_in_counts_layer", "plain"])
def test_every_file_kind_reads_the_same_counts(tmp_path, sample, kind):
    got = read_counts(shapes.write_input(sample, tmp_path, kind))
    assert same_counts(got, sample) and list(got.var_names) == list(sample.var_names)
    assert list(got.obs_names) == list(sample.obs_names) and got.X.dtype == np.float32 and sp.isspmatrix_csr(got.X)
    assert got.var["gene_symbols"].iloc[0] == "MT-ND1"


def test_counts_only_in_raw_are_found_with_all_raw_genes(tmp_path, sample):
    got = read_counts(shapes.write_input(sample, tmp_path, "raw_only"))
    assert same_counts(got, sample) and list(got.var_names) == list(sample.var_names)


def test_no_integer_counts_is_one_clear_error(tmp_path, sample):
    path = shapes.write_input(sample, tmp_path, "normalised_only")
    with pytest.raises(ScinvInputError, match=r"no raw integer counts found \(looked in X;.*layers\['counts'\], X or .raw.X") as err:
        read_counts(path)
    assert str(path) in str(err.value)


def test_mtx_folder_variants_geo_prefix_and_cellranger_outs(tmp_path, sample):
    shapes.write_input(sample, tmp_path / "outs", "mtx_v3")  # outs/filtered_feature_bc_matrix/
    assert same_counts(read_counts(tmp_path / "outs"), sample)
    geo = tmp_path / "geo"
    geo.mkdir()
    for f in (tmp_path / "outs" / "filtered_feature_bc_matrix").iterdir():
        shutil.copy(f, geo / f"GSM1_{f.name}")
    assert same_counts(read_counts(geo), sample)
    assert same_counts(read_counts(geo / "GSM1_matrix.mtx.gz"), sample)  # the matrix file itself
    (geo / "GSM1_barcodes.tsv.gz").unlink()
    with pytest.raises(ScinvInputError, match="barcodes.tsv.gz is missing"):
        read_counts(geo)
    with gzip.open(geo / "GSM1_barcodes.tsv.gz", "wt") as fh:
        fh.write("AAAC-1\n")
    with pytest.raises(ScinvInputError, match="come from different runs"):
        read_counts(geo)
    with pytest.raises(ScinvInputError, match="no matrix.mtx"):
        read_counts(tmp_path / "outs" / "filtered_feature_bc_matrix" / ".." / ".." / "geo" / "..")


def test_mtx_keeps_gene_expression_only(tmp_path, sample):
    folder = shapes.write_input(sample, tmp_path, "mtx_v3")
    feats = pd.read_csv(folder / "features.tsv.gz", sep="\t", header=None)
    feats.iloc[-5:, 2] = "Antibody Capture"
    feats.to_csv(folder / "features.tsv.gz", sep="\t", header=False, index=False)
    assert read_counts(folder).n_vars == sample.n_vars - 5


def test_ensembl_var_names_find_mito_genes_through_symbols(tmp_path):
    adata = shapes.cells(50, 60, seed=1, mouse=True)
    adata.var = pd.DataFrame({"feature_name": adata.var_names}, index=[f"ENSMUSG{i:011d}.2" for i in range(60)])
    adata.write_h5ad(tmp_path / "e.h5ad")
    got = read_counts(tmp_path / "e.h5ad")
    assert got.var_names[0] == "ENSMUSG00000000000.2" and got.var["gene_symbols"].iloc[0] == "mt-Nd1"
    got.layers["counts"] = got.X
    qc_metrics(got)
    assert got.var["mt"].sum() == 13 and got.var["ribo"].sum() == 20 and (got.obs["pct_counts_mt"] > 0).all()


def test_duplicated_gene_symbols_are_made_unique(tmp_path, sample):
    sample.var_names = ["GENE1"] * 2 + list(sample.var_names[2:])
    got = read_counts(shapes.write_input(sample, tmp_path, "plain"))
    assert got.var_names.is_unique and list(got.var_names[:2]) == ["GENE1", "GENE1-1"]


def test_one_definition_of_unlabelled():
    values = pd.Series(["T", "", " ", "nan", "NaN", None, np.nan, "NA", "<NA>", "null", "Unknown", "unassigned"])
    assert unlabelled(values).tolist() == [False] + [True] * 10 + [False]
    assert unlabelled(values, unknown_label="unassigned")[-1]
    assert normalize_labels(pd.Series([1.0, 2.0, np.nan])).tolist() == ["1", "2", "Unknown"]
    assert normalize_labels(pd.Series([3, 1])).tolist() == ["3", "1"]


def test_labels_are_read_the_same_by_training_and_metrics(small_adata):
    from scinv.data import DataRegistry
    from scinv.metrics import heldout_mask

    obs = small_adata.obs
    obs["cell_type"] = obs["cell_type"].astype(object)
    obs.iloc[:5, obs.columns.get_loc("cell_type")] = np.nan
    obs.iloc[5:10, obs.columns.get_loc("cell_type")] = ""
    reg = DataRegistry.from_anndata(small_adata, label_key="cell_type", batch_key="batch")
    assert reg.labels == ["t0", "t1", "t2", "t3"]
    codes = reg.encode_labels(obs, "test")
    assert (codes[:10] == -1).all() and (codes[10:] >= 0).all()
    ref, query = heldout_mask(obs, "batch", "cell_type", ["b0"], "Unknown")
    assert not (ref | query)[:10].any() and (ref | query)[10:].all()


def test_hvg_keeps_every_gene_when_asked_for_as_many(small_adata):
    hvg = normalize_and_select(small_adata, n_top_genes=5000, batch_key="batch")
    assert hvg.n_vars == small_adata.n_vars and hvg.uns["scinv_normalize"]["hvg"]["flavor"] == "all genes"


@pytest.mark.parametrize("flavor", ["seurat_v3", "pearson_residuals", "seurat", "cell_ranger"])
def test_every_offered_hvg_flavour_runs(small_adata, flavor):
    hvg = normalize_and_select(small_adata, n_top_genes=50, batch_key="batch", flavor=flavor)
    assert hvg.n_vars == 50 and hvg.uns["scinv_normalize"]["hvg"] == {
        "requested": flavor,
        "flavor": flavor,
        "span": 0.3 if flavor == "seurat_v3" else "",
        "fallback": "",
    }


@pytest.mark.skipif(not shapes.LOESS_FAILURE_CSV.exists(), reason="needs ../shared/data/seurat_v3_loess_failure.csv")
def test_seurat_v3_loess_failure_retries_with_a_wider_span():
    import scanpy as sc

    adata = shapes.loess_failure_batch()
    with pytest.raises(ValueError, match="near singularities"):  # scanpy alone still fails on it
        sc.pp.highly_variable_genes(adata.copy(), n_top_genes=500, flavor="seurat_v3")
    adata.layers["counts"] = adata.X.copy()
    adata.obs["batch"] = "b0"
    hvg = normalize_and_select(adata, n_top_genes=500, batch_key="batch")
    record = hvg.uns["scinv_normalize"]["hvg"]
    assert hvg.n_vars == 500 and record["flavor"] == "seurat_v3" and record["span"] == 0.5
    assert record["fallback"].startswith("seurat_v3 loess failed with span 0.3 (There are other near singularities")


@pytest.mark.skipif(not shapes.LOESS_FAILURE_CSV.exists(), reason="needs ../shared/data/seurat_v3_loess_failure.csv")
def test_seurat_v3_falls_back_to_seurat_when_no_span_fits(monkeypatch):
    from scinv import preprocess

    monkeypatch.setattr(preprocess, "SEURAT_V3_SPANS", (0.3, 0.4))  # both fail on this real batch
    adata = shapes.loess_failure_batch()
    adata.layers["counts"] = adata.X.copy()
    adata.obs["batch"] = "b0"
    hvg = normalize_and_select(adata, n_top_genes=500, batch_key="batch")
    record = hvg.uns["scinv_normalize"]["hvg"]
    assert hvg.n_vars == 500 and record["flavor"] == "seurat"
    assert record["fallback"].startswith("seurat_v3 could not be fitted (0.3: There are other near singularities")
    assert record["fallback"].endswith("used seurat instead")


def test_a_batch_of_one_cell_does_not_vote_on_hvgs(small_adata):
    # skmisc's loess segfaults on a batch without varying genes (one cell): that batch must not vote
    small_adata.obs["batch"] = small_adata.obs["batch"].astype(str)
    small_adata.obs.iloc[:1, small_adata.obs.columns.get_loc("batch")] = "single"
    hvg = normalize_and_select(small_adata, n_top_genes=50, batch_key="batch")
    record = hvg.uns["scinv_normalize"]["hvg"]
    assert hvg.n_vars == 50 and record["flavor"] == "seurat_v3" and "single" in hvg.obs["batch"].to_numpy()
    assert record["fallback"].startswith("batches ['single'] too small to vote on HVGs")


def test_too_few_varying_genes_skip_the_loess(small_adata):
    small_adata = small_adata[:, :40].copy()
    hvg = normalize_and_select(small_adata, n_top_genes=20, batch_key=None)
    record = hvg.uns["scinv_normalize"]["hvg"]
    assert hvg.n_vars == 20 and record["flavor"] == "seurat" and "fewer than 50 genes vary" in record["fallback"]


def test_cell_thresholds_scale_with_small_panels():
    assert resolve_cell_thresholds(QCThresholds(), 33_538).min_genes == 200
    panel = resolve_cell_thresholds(QCThresholds(), 500)
    assert (panel.min_genes, panel.min_counts) == (10, 25)
    assert resolve_cell_thresholds(QCThresholds(min_genes=50), 500).min_genes == 50  # set by the user: kept
