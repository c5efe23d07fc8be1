"""The shape matrix: real-world inputs through the real pipeline, as a user runs it.

Local executor on this machine's real CPUs and memory, no --max_* flags, no -profile test. Every
shape either finishes with sensible outputs or stops with one 'ERROR:' line naming the file and
the fix; no step may print a Python traceback. Shapes (at least one run covers each):

 1 MTX v3 folder             2 MTX v2 folder (path with spaces)    3 10x h5 v2
 4 10x h5 v3 over https-like remote path (http on loopback)        5 CSC uint16 X
 6 counts only in .raw.X    7 dense float64 X, obs names with spaces/unicode
 8 int64 counts in layers['counts'] (X log-normalised)              9 a batch of 15 cells
10 a sample whose cells all fail QC (dropped, the others go on)   11 one batch wholly unlabelled
12 a label present in one batch only    13 NaN / empty labels      14 gene symbols duplicated
15 single .h5ad with 40 batches         16 targeted panel (500 genes, every gene kept)
17 Ensembl var_names, symbols in var['feature_name']               18 mouse genes (mt-)
19 numeric batch and label values       20 pre-filtered 1.3k genes where seurat_v3's loess fails
21 single batch (one-line stop)         22 no integer counts anywhere (one-line stop)
"""

from __future__ import annotations

import functools
import http.server
import re
import threading
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import shapes
from conftest import ROOT, run_nextflow

MAIN = str(ROOT / "main.nf")
FAST = ["--max_epochs", "5", "--predictor_epochs", "5", "--kl_warmup_epochs", "1"]
pytestmark = pytest.mark.slow


def tracebacks(workdir: Path) -> list[str]:
    """Task stderr files (every step, passed or failed) that hold a Python traceback."""
    return [str(p) for p in workdir.glob("*/*/.command.err") if "Traceback" in p.read_text(errors="replace")]


def run_pipeline(tmp_path: Path, *args: str) -> tuple[object, str]:
    res = run_nextflow("run", MAIN, *args, "--outdir", str(tmp_path / "out"), cwd=tmp_path, timeout=1500)
    out = res.stdout + res.stderr
    assert not tracebacks(tmp_path / "work"), tracebacks(tmp_path / "work")
    return res, out


@pytest.fixture
def http_root(tmp_path):
    """A folder served over HTTP on the loopback interface (a remote path Nextflow must stage)."""
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_samplesheet_of_every_file_kind(tmp_path, http_root):
    """Shapes 1-14: ten samples, each its own file kind and batch, in one samplesheet."""
    served, url = http_root
    genes = shapes.gene_names(1200)
    genes[40] = genes[41]  # two Ensembl ids share a symbol, as in every 10x reference
    kinds = {  # sample -> (file kind, cells)
        "mtx3": ("mtx_v3", 160),
        "mtx two": ("mtx_v2", 160),
        "h5v2": ("h5_v2", 160),
        "remote": ("h5_v3", 160),
        "csc": ("csc_uint16", 160),
        "rawonly": ("raw_only", 160),
        "dense": ("dense_float64", 160),
        "int64": ("int64_in_counts_layer", 160),
        "tiny": ("plain", 15),
        "failqc": ("plain", 120),
    }
    base = tmp_path / "my data"
    rows, labels = [], []
    for i, (sample, (kind, n)) in enumerate(kinds.items()):
        adata = shapes.cells(n, len(genes), n_types=4, seed=i)
        adata.var_names = genes
        if sample == "dense":
            adata.obs_names = [f"cell {j} ü-β" for j in range(n)]
        if sample == "failqc":
            adata.X = adata.X.multiply(0.02).floor().tocsr()  # every cell below any count threshold
        folder = served / sample if sample == "remote" else base / sample
        path = shapes.write_input(adata, folder, kind)
        rows.append((sample, f"{url}/{sample}/{path.name}" if sample == "remote" else str(path)))
        types = adata.obs["cell_type"].astype(str).to_numpy(copy=True)
        if sample == "csc":
            types[:20] = "rare"  # a label present in this batch only
        if sample == "dense":
            types[:10], types[10:20] = "", "nan"  # unlabelled, as exports write it
        if sample != "mtx3":  # mtx3: no annotation at all, the whole batch unlabelled
            labels.append(pd.DataFrame({"cell_id": [f"{sample}_{bc}" for bc in adata.obs_names], "cell_type": types}))
    sheet = tmp_path / "samples.csv"
    pd.DataFrame(rows, columns=["sample", "path"]).to_csv(sheet, index=False)
    annotations = tmp_path / "labels.csv"
    pd.concat(labels).to_csv(annotations, index=False)

    res, out = run_pipeline(
        tmp_path,
        "--input",
        str(sheet),
        "--annotations",
        str(annotations),
        "--label_key",
        "cell_type",
        "--n_top_genes",
        "600",
        "--heldout_batches",
        "h5v2",
        *FAST,
    )
    assert res.returncode == 0, out[-5000:]
    assert re.search(r"Local executor: task requests are capped to this machine's \d+ CPUs", out)
    task_logs = "".join(p.read_text(errors="replace") for p in (tmp_path / "work").glob("*/*/.command.err"))
    assert "QC left zero cells in sample(s) ['failqc']: they are dropped" in task_logs
    final = ad.read_h5ad(tmp_path / "out" / "export" / "scinv_integrated.h5ad")
    assert set(final.obs["sample"]) == set(kinds) - {"failqc"}
    assert (final.obs["sample"] == "tiny").sum() <= 15
    assert final.n_vars == 600 and np.isfinite(final.obsm["X_scinv_inv"]).all()
    by_sample = final.obs.groupby("sample", observed=True)["cell_type"]
    assert (by_sample.get_group("mtx3") == "Unknown").all()
    assert set(final.obs["cell_type"].astype(str)) == {"t0", "t1", "t2", "t3", "rare", "Unknown"}  # no 'nan', no ''
    assert any("ü-β" in name for name in final.obs_names)
    qc = pd.read_csv(tmp_path / "out" / "qc" / "scinv_qc_summary.csv", index_col=0)
    assert qc.loc["failqc", "kept"] == 0 and qc.loc["failqc", "before"] == 120
    cells = pd.read_parquet(tmp_path / "out" / "qc" / "scinv_qc_cells.parquet")
    assert cells["pct_counts_mt"].gt(0).mean() > 0.9  # MT- genes found in every file kind
    transfer = pd.read_csv(tmp_path / "out" / "metrics" / "scinv_label_transfer.csv", index_col=0)
    assert transfer.loc["scinv invariant predictor", "n_query"] == ((final.obs["sample"] == "h5v2") & (final.obs["cell_type"] != "Unknown")).sum()
    metrics = pd.read_csv(tmp_path / "out" / "metrics" / "scinv_metrics.csv", index_col=0)
    assert metrics["Total"].between(0, 1).all()
    report = (tmp_path / "out" / "report" / "scinv_report.html").read_text()
    assert "Warning: QC kept no cell of sample(s) failqc" in report


def test_single_h5ad_atlas_export(tmp_path):
    """Shapes 15-19: one .h5ad, 40 numeric batches, a 500-gene mouse panel with Ensembl ids."""
    adata = shapes.cells(1200, 500, n_batches=40, n_types=4, seed=7, mouse=True)
    symbols = adata.var_names.to_numpy(copy=True)
    symbols[100] = symbols[101]  # duplicated symbols in the symbol column
    adata.var = pd.DataFrame({"feature_name": symbols}, index=[f"ENSMUSG{i:011d}" for i in range(adata.n_vars)])
    adata.obs["batch"] = adata.obs["batch"].str[1:].astype(int) + 1  # donors 1..40
    labels = adata.obs["cell_type"].str[1:].astype(float)  # 0.0 .. 3.0
    labels[::25] = np.nan
    adata.obs["cell_type"] = labels
    adata.obs_names = [f"donor {b} · {bc}" for b, bc in zip(adata.obs["batch"], adata.obs_names)]
    adata.write_h5ad(tmp_path / "atlas.h5ad")

    res, out = run_pipeline(tmp_path, "--input", str(tmp_path / "atlas.h5ad"), "--batch_key", "batch", "--label_key", "cell_type", *FAST)
    assert res.returncode == 0, out[-5000:]
    final = ad.read_h5ad(tmp_path / "out" / "export" / "scinv_integrated.h5ad")
    assert final.n_vars == 500 and final.var_names[0].startswith("ENSMUSG")  # n_top_genes 2000 >= 500: all kept
    assert final.obs["batch"].nunique() == 40 and "1" in set(final.obs["batch"].astype(str))
    assert set(final.obs["cell_type"].astype(str)) == {"0", "1", "2", "3", "Unknown"}
    assert set(final.obs["scinv_prediction"].astype(str)) <= {"0", "1", "2", "3"}
    cells = pd.read_parquet(tmp_path / "out" / "qc" / "scinv_qc_cells.parquet")
    assert cells["pct_counts_mt"].gt(0).mean() > 0.9  # mt- genes found through var['feature_name']
    metrics = pd.read_csv(tmp_path / "out" / "metrics" / "scinv_metrics.csv", index_col=0)
    assert metrics["Total"].between(0, 1).all()


@pytest.mark.skipif(not shapes.LOESS_FAILURE_CSV.exists(), reason="needs ../shared/data/seurat_v3_loess_failure.csv")
def test_prefiltered_genes_where_seurat_v3_loess_fails(tmp_path):
    """Shape 20: a real batch (rebuilt from its gene moments) on which scanpy's seurat_v3 crashes."""
    failing = shapes.loess_failure_batch()
    other = shapes.cells(400, failing.n_vars, seed=3)
    for name, adata in (("real", failing), ("other", other)):
        shapes.write_input(adata, tmp_path / name, "h5_v3")
    sheet = tmp_path / "s.csv"
    sheet.write_text("sample,path\n" + "".join(f"{n},{tmp_path / n / 'filtered_feature_bc_matrix.h5'}\n" for n in ("real", "other")))
    res, out = run_pipeline(tmp_path, "--input", str(sheet), "--n_top_genes", "500", *FAST)
    assert res.returncode == 0, out[-5000:]
    report = (tmp_path / "out" / "report" / "scinv_report.html").read_text()
    assert "Warning: seurat_v3 loess failed with span 0.3" in report and "fitted with span 0.5" in report
    assert ad.read_h5ad(tmp_path / "out" / "export" / "scinv_integrated.h5ad").n_vars == 500


@pytest.mark.parametrize("shape", ["single_batch", "no_integer_counts"])
def test_inputs_that_must_stop_with_one_line(tmp_path, shape):
    """Shapes 21-22: one ERROR line naming the file and the fix, non-zero exit, nothing published."""
    adata = shapes.cells(300, 800, n_batches=1 if shape == "single_batch" else 2, seed=1)
    adata.obs["batch"] = adata.obs["batch"].astype(str)
    path = shapes.write_input(adata, tmp_path, "plain" if shape == "single_batch" else "normalised_only")
    res, out = run_pipeline(tmp_path, "--input", str(path))
    assert res.returncode != 0
    errors = [line.strip() for line in out.splitlines() if line.strip().startswith("ERROR: ")]
    assert errors and str(path) in errors[0], out[-3000:]
    expected = {"single_batch": "only one batch in column 'batch'", "no_integer_counts": "no raw integer counts found"}[shape]
    assert expected in errors[0] and "Traceback" not in out
    assert not (tmp_path / "out" / "export").exists()
