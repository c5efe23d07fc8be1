"""Input validation: every bad input ends in one clear ScinvInputError and leaves no output."""

import numpy as np
import pytest
import scipy.sparse as sp

from conftest import ROOT
from scinv.errors import ScinvInputError
from scinv.io import atomic_path, check_counts, read_counts, read_samplesheet, write_h5ad
from scinv.preprocess import load_input

H5 = ROOT / "assets" / "liao2020" / "GSM4475052_C149_filtered_feature_bc_matrix.h5"


def sheet(tmp_path, text, name="samples.csv"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_samplesheet_resolves_relative_paths_and_defaults_batch(tmp_path):
    (tmp_path / "a.h5ad").write_text("x")
    df = read_samplesheet(sheet(tmp_path, "sample,path,condition\nA,a.h5ad,healthy\n"))
    assert df.loc[0, "path"] == str(tmp_path / "a.h5ad")
    assert df.loc[0, "batch"] == "A" and df.loc[0, "condition"] == "healthy"


@pytest.mark.parametrize(
    "text, needle",
    [
        ("", "empty"),
        ("sample;path\nA;a.h5ad\n", "semicolon"),
        ("sample\tpath\nA\ta.h5ad\n", "tab"),
        ("sample,file\nA,a.h5ad\n", "missing required column"),
        ("sample,path\n", "no samples"),
        ("sample,path\nA,a.h5ad\nA,a.h5ad\n", "duplicate sample"),
        ("sample,path\nA,missing.h5\n", "not found"),
        ("sample,path\nA,\n", "empty sample or path"),
    ],
)
def test_bad_samplesheets(tmp_path, text, needle):
    (tmp_path / "a.h5ad").write_text("x")
    with pytest.raises(ScinvInputError, match=needle) as err:
        read_samplesheet(sheet(tmp_path, text))
    assert "samples.csv" in str(err.value) and "\n" not in str(err.value)


def test_samplesheet_with_trailing_commas_drops_the_empty_column(tmp_path):
    (tmp_path / "a.h5ad").write_text("x")
    df = read_samplesheet(sheet(tmp_path, "sample,path,batch,\nA,a.h5ad,b1,\n"))
    assert list(df.columns) == ["sample", "path", "batch"] and df.loc[0, "batch"] == "b1"
    with pytest.raises(ScinvInputError, match="a column has no name"):
        read_samplesheet(sheet(tmp_path, "sample,path,\nA,a.h5ad,b1\n"))


def test_missing_samplesheet(tmp_path):
    with pytest.raises(ScinvInputError, match="not found"):
        read_samplesheet(tmp_path / "nope.csv")


def test_wrong_file_type_and_truncated_files(tmp_path):
    txt = tmp_path / "x.txt"
    txt.write_text("hello")
    with pytest.raises(ScinvInputError, match="unsupported file or folder"):
        read_counts(txt)
    fake = tmp_path / "x.h5ad"
    fake.write_text("not hdf5")
    with pytest.raises(ScinvInputError, match="not a valid HDF5"):
        read_counts(fake)
    trunc = tmp_path / "t.h5"
    trunc.write_bytes(H5.read_bytes()[:200_000])
    with pytest.raises(ScinvInputError, match="t.h5"):
        read_counts(trunc)


def test_reads_10x_h5_as_sparse_float_counts():
    adata = read_counts(H5)
    assert adata.n_obs == 2879 and adata.n_vars == 33539
    assert sp.issparse(adata.X) and adata.var_names.is_unique
    check_counts(adata.X, "C149")


@pytest.mark.parametrize(
    "matrix, needle",
    [
        (np.array([[0.5, 1.0], [2.0, 0.0]]), "non-integer"),
        (np.array([[-1.0, 1.0], [2.0, 0.0]]), "negative"),
        (np.array([[np.nan, 1.0], [2.0, 0.0]]), "NaN"),
        (np.array([[np.inf, 1.0], [2.0, 0.0]]), "NaN or Inf"),
        (np.zeros((0, 3)), "empty matrix"),
        (np.zeros((3, 3)), "no non-zero"),
    ],
)
def test_bad_count_matrices(matrix, needle):
    with pytest.raises(ScinvInputError, match=needle):
        check_counts(sp.csr_matrix(matrix), "x.h5ad")


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.h5ad"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_h5ad_input_with_annotations_and_missing_batch(tmp_path, small_adata):
    path = tmp_path / "data.h5ad"
    write_h5ad(small_adata, path)
    adata = load_input(str(path), batch_key="batch")
    assert "counts" in adata.layers and adata.n_obs == 600
    with pytest.raises(ScinvInputError, match="'donor' not found"):
        load_input(str(path), batch_key="donor")


def test_duplicate_cell_names_are_made_unique_with_a_warning(tmp_path, small_adata, caplog):
    # merged exports repeat 10x barcodes across samples
    small_adata.obs_names = ["AAAC-1"] * small_adata.n_obs
    path = tmp_path / "dup.h5ad"
    small_adata.write_h5ad(path)
    adata = load_input(str(path))
    assert adata.obs_names.is_unique and list(adata.obs_names[:2]) == ["AAAC-1", "AAAC-1-1"]
    assert "599 duplicated cell names" in caplog.text


def test_normalised_h5ad_refused(tmp_path, small_adata):
    del small_adata.layers["counts"]
    small_adata.X = small_adata.X / 3.0
    path = tmp_path / "norm.h5ad"
    small_adata.write_h5ad(path)
    with pytest.raises(ScinvInputError, match="no raw integer counts found"):
        load_input(str(path))


def test_synthetic_h5ad_written_in_chunks_reads_back_backed(tmp_path):
    import anndata as ad

    from scinv.datasets import write_synthetic_h5ad

    path = tmp_path / "big.h5ad"
    write_synthetic_h5ad(path, n_cells=2500, n_genes=50, n_batches=3, n_types=4, chunk_size=1000, seed=1)
    backed = ad.read_h5ad(path, backed="r")
    assert backed.shape == (2500, 50) and backed.isbacked
    rows = backed.X[1990:2010]
    full = ad.read_h5ad(path)
    assert (rows != full.X[1990:2010]).nnz == 0 and full.X.sum() > 0
    assert set(full.obs["batch"].cat.categories) == {"b0", "b1", "b2"} and full.obs_names[-1] == "cell2499"
    assert float(full.X.data.min()) >= 1 and np.all(full.X.data == np.round(full.X.data))
    assert not (tmp_path / "big.h5ad.tmp").exists()
