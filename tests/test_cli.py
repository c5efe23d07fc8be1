"""Each bin/ step: documented --help, a real run on small data, and a bad input with a clear error."""

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from conftest import ROOT, one_error_line, run_script
from scinv.io import write_h5ad

STEPS = [
    "scinv_check_input.py",
    "scinv_qc.py",
    "scinv_normalize.py",
    "scinv_train.py",
    "scinv_baseline.py",
    "scinv_export.py",
    "scinv_metrics.py",
    "scinv_report.py",
]


@pytest.mark.parametrize("script", STEPS)
def test_help_documents_every_option(script):
    res = run_script(script, "--help")
    assert res.returncode == 0, res.stderr
    import click  # every option has help text

    module = {}
    exec(compile((ROOT / "bin" / script).read_text(), script, "exec"), module)
    for param in module["main"].params:
        if isinstance(param, click.Option):
            assert param.help, f"{script}: option {param.name} has no help"
            assert param.opts[0] in res.stdout


def test_check_input_bad_samplesheet_names_file_and_fix(tmp_path):
    sheet = tmp_path / "sheet.csv"
    sheet.write_text("sample,path\nA,missing.h5\n")
    res = run_script("scinv_check_input.py", "--input", str(sheet), "--output", str(tmp_path / "out.csv"))
    assert res.returncode == 2
    line = one_error_line(res.stderr)
    assert "sheet.csv" in line and "missing.h5" in line and "fix the path column" in line
    assert not (tmp_path / "out.csv").exists()


def test_check_input_unknown_column(tmp_path):
    res = run_script(
        "scinv_check_input.py", "--input", str(ROOT / "assets" / "samplesheet_test.csv"), "--output", str(tmp_path / "o.csv"), "--label-key", "cell_type"
    )
    assert res.returncode == 2
    assert "'cell_type' not found" in one_error_line(res.stderr)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "heldout, says",
    [("C144,C15", "held-out batches ['C15'] not in column 'batch' (batches: ['C144', 'C146', 'C149'])"), ("C144,C146,C149", "names every batch")],
)
def test_check_input_refuses_heldout_batches_it_does_not_have_before_qc(tmp_path, heldout, says):
    sheet = str(ROOT / "assets" / "samplesheet_test.csv")
    res = run_script("scinv_check_input.py", "--input", sheet, "--output", str(tmp_path / "o.csv"), "--heldout-batches", heldout)
    assert res.returncode == 2
    line = one_error_line(res.stderr)
    assert "samplesheet_test.csv" in line and says in line
    assert list(tmp_path.iterdir()) == []


def test_qc_non_integer_counts(tmp_path, small_adata):
    small_adata.X = small_adata.X * 0.5
    del small_adata.layers["counts"]
    write_h5ad(small_adata, tmp_path / "norm.h5ad")
    (tmp_path / "row.json").write_text('{"sample": "S1", "batch": "b0", "shown_path": "norm.h5ad", "keep_obs": "False"}')
    res = run_script("scinv_qc.py", "--input", str(tmp_path / "norm.h5ad"), "--row", str(tmp_path / "row.json"), "--output", str(tmp_path / "q.h5ad"))
    assert res.returncode == 2
    line = one_error_line(res.stderr)
    assert "norm.h5ad" in line and "raw UMI counts" in line
    assert not (tmp_path / "q.h5ad").exists()


def test_samplesheet_h5ad_files_bring_their_own_labels(tmp_path, small_adata):
    """Per-sample .h5ad files whose obs hold the labels (CELLxGENE downloads, a split atlas) need no --annotations."""
    t = lambda n: str(tmp_path / n)  # noqa: E731
    rows = ["sample,path,batch"]
    for i, batch in enumerate(["b0", "b1", "b2"], start=1):
        part = small_adata[(small_adata.obs["batch"] == batch).to_numpy()].copy()
        part.obs = part.obs[["cell_type"]].astype(str)
        part.obs.iloc[:5, 0] = "nan"  # unlabelled, as exports write it
        write_h5ad(part, tmp_path / f"{batch}.h5ad")
        rows.append(f"S{i},{batch}.h5ad,{batch}")
    (tmp_path / "sheet.csv").write_text("\n".join(rows) + "\n")
    res = run_script("scinv_check_input.py", "--input", t("sheet.csv"), "--output", t("valid.csv"), "--label-key", "cell_type")
    assert res.returncode == 0, res.stderr
    valid = pd.read_csv(t("valid.csv"), dtype=str, keep_default_na=False)
    qc_options = ("--label-key", "cell_type", "--min-genes", "10", "--min-counts", "10", "--no-doublets")
    for i, row in enumerate(valid.to_dict("records"), start=1):
        Path(t(f"row{i}.json")).write_text(json.dumps({k: v for k, v in row.items() if k != "path"}))
        res = run_script("scinv_qc.py", "--input", row["path"], "--row", t(f"row{i}.json"), "--output", t(f"q{i}.h5ad"), *qc_options)
        assert res.returncode == 0, res.stderr
    merge = ("--output", t("n.h5ad"), "--summary", t("qs.csv"), "--cells", t("qc.parquet"))
    res = run_script("scinv_normalize.py", t("q1.h5ad"), t("q2.h5ad"), t("q3.h5ad"), *merge)
    assert res.returncode == 0, res.stderr
    merged = ad.read_h5ad(t("n.h5ad"))
    expected = small_adata.obs["cell_type"].astype(str).set_axis([f"S{int(b[1]) + 1}_{c}" for b, c in zip(small_adata.obs["batch"], small_adata.obs_names)])
    labels = merged.obs["cell_type"].astype(str)
    assert (labels == "Unknown").sum() == 15
    known = labels[labels != "Unknown"]
    assert len(known) > 500 and (known == expected.reindex(known.index)).all()
    assert merged.obs.groupby("sample", observed=True)["batch"].first().to_dict() == {"S1": "b0", "S2": "b1", "S3": "b2"}

    # a file without the column: CHECK_INPUT names it when it can read it, QC when it cannot (the pipeline's case)
    part = ad.read_h5ad(t("b2.h5ad"))
    del part.obs["cell_type"]
    write_h5ad(part, tmp_path / "b2.h5ad")
    res = run_script("scinv_check_input.py", "--input", t("sheet.csv"), "--output", t("v2.csv"), "--label-key", "cell_type")
    assert res.returncode == 2 and "b2.h5ad: obs column 'cell_type' not found" in one_error_line(res.stderr)
    assert not (tmp_path / "v2.csv").exists()
    res = run_script("scinv_check_input.py", "--input", t("sheet.csv"), "--output", t("v2.csv"), "--label-key", "cell_type", "--no-check-files")
    assert res.returncode == 0, res.stderr
    res = run_script("scinv_qc.py", "--input", t("b2.h5ad"), "--row", t("row3.json"), "--output", t("q3b.h5ad"), *qc_options)
    assert res.returncode == 2 and "b2.h5ad: obs column 'cell_type' not found" in one_error_line(res.stderr)
    assert not (tmp_path / "q3b.h5ad").exists()


def test_steps_chain_on_small_data(tmp_path, small_adata):
    """CHECK_INPUT -> QC -> NORMALIZE -> TRAIN -> EXPORT -> REPORT on synthetic counts."""
    small_adata.obs["condition"] = ["healthy" if b == "b0" else "disease" for b in small_adata.obs["batch"]]
    small_adata.obs["depth"] = small_adata.X.sum(1).A1 / 1000.0
    write_h5ad(small_adata, tmp_path / "in.h5ad")
    t = lambda n: str(tmp_path / n)  # noqa: E731
    qc_options = ("--label-key", "cell_type", "--min-genes", "10", "--min-counts", "10", "--no-doublets")
    steps = [
        ("scinv_check_input.py", "--input", t("in.h5ad"), "--output", t("sheet.csv"), "--split-dir", t("split"), "--label-key", "cell_type"),
        *[("scinv_qc.py", "--input", t(f"split/sample_0000{i}.h5ad"), "--row", t(f"row{i}.json"), "--output", t(f"q{i}.h5ad"), *qc_options) for i in (1, 2, 3)],
        (
            "scinv_normalize.py",
            t("q1.h5ad"),
            t("q2.h5ad"),
            t("q3.h5ad"),
            "--output",
            t("n.h5ad"),
            "--summary",
            t("qs.csv"),
            "--cells",
            t("qc.parquet"),
            "--n-top-genes",
            "100",
            "--n-pcs",
            "10",
        ),
        (
            "scinv_train.py",
            "--input",
            t("n.h5ad"),
            "--model-dir",
            t("model"),
            "--history",
            t("h.csv"),
            "--label-key",
            "cell_type",
            "--invariant-keys",
            "condition",
            "--spurious-keys",
            "depth",
            "--continuous-keys",
            "depth",
            "--max-epochs",
            "5",
            "--predictor-epochs",
            "5",
            "--n-hidden",
            "32",
        ),
        ("scinv_export.py", "--input", t("n.h5ad"), "--model-dir", t("model"), "--output", t("final.h5ad"), "--embeddings", t("e.parquet")),
        (
            "scinv_report.py",
            "--input",
            t("final.h5ad"),
            "--output",
            t("r.html"),
            "--qc-cells",
            t("qc.parquet"),
            "--qc-summary",
            t("qs.csv"),
            "--model-dir",
            t("model"),
            "--label-key",
            "cell_type",
        ),
    ]
    for args in steps:
        if args[0] == "scinv_qc.py" and not Path(args[4]).exists():
            sheet = pd.read_csv(t("sheet.csv"), dtype=str, keep_default_na=False)
            for i, row in enumerate(sheet.to_dict("records"), start=1):
                Path(t(f"row{i}.json")).write_text(json.dumps(row))
        res = run_script(*args)
        assert res.returncode == 0, f"{args[0]}: {res.stderr[-2000:]}"
    registry = json.loads((tmp_path / "model" / "config.json").read_text())["registry"]
    assert registry["invariant"][0]["categories"] == ["disease", "healthy"]
    assert registry["spurious"][0]["key"] == "depth" and not registry["spurious"][0]["categorical"]
    final = ad.read_h5ad(t("final.h5ad"))
    assert final.obsm["X_scinv_inv"].shape[1] == 20 and final.obsm["X_scinv_spur"].shape[1] == 5
    assert "scinv_prediction" in final.obs and "X_umap_scinv_inv" in final.obsm
    emb = pd.read_parquet(t("e.parquet"))
    assert emb.index.name == "cell_id" and list(emb.index) == list(final.obs_names)
    html = Path(t("r.html")).read_text()
    assert html.count("data:image/png;base64,") >= 4
    summary = pd.read_csv(t("qs.csv"), index_col=0)
    assert summary.loc["total", "before"] == 600


def test_normalize_refuses_when_all_cells_fail(tmp_path, small_adata):
    write_h5ad(small_adata, tmp_path / "m.h5ad")
    assert run_script("scinv_qc.py", *qc_args(tmp_path, tmp_path / "m.h5ad", "--min-genes", "100000")).returncode == 0
    res = run_script("scinv_normalize.py", *normalize_args(tmp_path))
    assert res.returncode == 2 and "relax --min_genes/--min_counts/--max_pct_mito" in one_error_line(res.stderr)
    assert not (tmp_path / "n.h5ad").exists()


def test_normalize_names_a_file_that_is_not_from_qc(tmp_path, small_adata):
    write_h5ad(small_adata, tmp_path / "q.h5ad")
    res = run_script("scinv_normalize.py", *normalize_args(tmp_path))
    assert res.returncode == 2 and "q.h5ad" in one_error_line(res.stderr) and "QC" in one_error_line(res.stderr)


def test_train_missing_label_column(tmp_path, small_adata):
    write_h5ad(small_adata, tmp_path / "n.h5ad")
    res = run_script("scinv_train.py", *train_args(tmp_path, "--label-key", "celltype"))
    assert res.returncode == 2 and "'celltype' not found" in one_error_line(res.stderr)
    assert not (tmp_path / "m").exists()


def test_export_with_wrong_model_dir(tmp_path, small_adata):
    write_h5ad(small_adata, tmp_path / "n.h5ad")
    (tmp_path / "notamodel").mkdir()
    res = run_script(
        "scinv_export.py",
        "--input",
        str(tmp_path / "n.h5ad"),
        "--model-dir",
        str(tmp_path / "notamodel"),
        "--output",
        str(tmp_path / "f.h5ad"),
        "--embeddings",
        str(tmp_path / "e.parquet"),
    )
    assert res.returncode == 2 and "not a scinv model directory" in one_error_line(res.stderr)


def test_metrics_missing_embedding(tmp_path, small_adata):
    write_h5ad(small_adata, tmp_path / "f.h5ad")
    res = run_script("scinv_metrics.py", "--input", str(tmp_path / "f.h5ad"), "--output", str(tmp_path / "m.csv"), "--label-key", "cell_type")
    assert res.returncode == 2 and "run the export step" in one_error_line(res.stderr)
    assert not (tmp_path / "m.csv").exists()


def test_metrics_on_an_unlabelled_heldout_batch_scores_integration_and_skips_transfer(tmp_path, small_adata):
    """A held-out batch without labels is a query to predict: METRICS warns instead of failing after training."""
    rng = np.random.default_rng(0)
    for key in ("X_scinv_inv", "X_scinv", "X_pca"):
        small_adata.obsm[key] = rng.normal(size=(small_adata.n_obs, 8)).astype(np.float32)
    small_adata.obs["cell_type"] = small_adata.obs["cell_type"].astype(str).where(small_adata.obs["batch"] != "b2", "Unknown")
    write_h5ad(small_adata, tmp_path / "f.h5ad")
    outputs = ("--output", str(tmp_path / "m.csv"), "--label-transfer", str(tmp_path / "t.csv"))
    res = run_script("scinv_metrics.py", "--input", str(tmp_path / "f.h5ad"), *outputs, "--label-key", "cell_type", "--heldout-batches", "b2")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "no labelled cells in the held-out batches ['b2']: label transfer is not scored" in res.stderr
    assert (tmp_path / "m.csv").exists() and not (tmp_path / "t.csv").exists()


def test_report_on_non_h5ad(tmp_path):
    bad = tmp_path / "f.h5ad"
    bad.write_text("not hdf5")
    res = run_script("scinv_report.py", "--input", str(bad), "--output", str(tmp_path / "r.html"))
    assert res.returncode == 2 and "not a valid .h5ad" in one_error_line(res.stderr)
    assert not (tmp_path / "r.html").exists()


def train_args(tmp_path, *extra):
    return ("--input", str(tmp_path / "n.h5ad"), "--model-dir", str(tmp_path / "m"), "--history", str(tmp_path / "h.csv"), *extra)


def qc_args(tmp_path, data, *extra):
    return ("--input", str(data), "--output", str(tmp_path / "q.h5ad"), "--no-doublets", *extra)


def normalize_args(tmp_path, *extra):
    return (
        str(tmp_path / "q.h5ad"),
        "--output",
        str(tmp_path / "n.h5ad"),
        "--summary",
        str(tmp_path / "s.csv"),
        "--cells",
        str(tmp_path / "c.parquet"),
        *extra,
    )


def test_check_input_refuses_a_single_batch(tmp_path, small_adata):
    small_adata.obs["batch"] = "only"
    write_h5ad(small_adata, tmp_path / "one.h5ad")
    res = run_script("scinv_check_input.py", "--input", str(tmp_path / "one.h5ad"), "--output", str(tmp_path / "o.csv"))
    assert res.returncode == 2
    line = one_error_line(res.stderr)
    assert "one.h5ad" in line and "only one batch in column 'batch'" in line and "--batch_key" in line
    assert not (tmp_path / "o.csv").exists()


def test_qc_drops_a_sample_left_with_zero_cells_and_goes_on(tmp_path, small_adata):
    # a per-sample threshold (samplesheet column) that no cell of batch b1 can meet
    small_adata.obs["min_genes"] = (small_adata.obs["batch"] == "b1").map({True: 10**6, False: 10}).astype(float)
    small_adata.obs["sample"] = small_adata.obs["batch"]
    write_h5ad(small_adata, tmp_path / "m.h5ad")
    assert run_script("scinv_qc.py", *qc_args(tmp_path, tmp_path / "m.h5ad", "--min-counts", "1")).returncode == 0
    res = run_script("scinv_normalize.py", *normalize_args(tmp_path, "--n-top-genes", "50"))
    assert res.returncode == 0, res.stderr
    assert "WARNING QC left zero cells in sample(s) ['b1']: they are dropped" in res.stderr and "Traceback" not in res.stderr
    kept = ad.read_h5ad(tmp_path / "n.h5ad")
    assert set(kept.obs["batch"]) == {"b0", "b2"} and kept.n_obs == (small_adata.obs["batch"] != "b1").sum()
    table = pd.read_csv(tmp_path / "s.csv", index_col=0)
    assert table.loc["b1", "kept"] == 0 and table.loc["b1", "low_genes"] == (small_adata.obs["batch"] == "b1").sum()


def test_qc_stops_when_only_one_batch_is_left(tmp_path, small_adata):
    small_adata.obs["min_genes"] = (small_adata.obs["batch"] == "b0").map({True: 10, False: 10**6}).astype(float)
    write_h5ad(small_adata, tmp_path / "m.h5ad")
    assert run_script("scinv_qc.py", *qc_args(tmp_path, tmp_path / "m.h5ad", "--min-counts", "1")).returncode == 0
    res = run_script("scinv_normalize.py", *normalize_args(tmp_path))
    assert res.returncode == 2
    assert "QC left cells in only one batch (b0)" in one_error_line(res.stderr)
    assert not list(tmp_path.glob("n.h5ad*")) and not (tmp_path / "s.csv").exists()


def test_qc_refuses_when_every_gene_is_filtered(tmp_path, small_adata):
    write_h5ad(small_adata, tmp_path / "m.h5ad")
    assert run_script("scinv_qc.py", *qc_args(tmp_path, tmp_path / "m.h5ad", "--min-genes", "1", "--min-counts", "1")).returncode == 0
    res = run_script("scinv_normalize.py", *normalize_args(tmp_path, "--min-cells-per-gene", "100000"))
    assert res.returncode == 2
    assert "removed all 120 genes; lower --min_cells_per_gene" in one_error_line(res.stderr)
    assert not list(tmp_path.glob("n.h5ad*"))


def test_train_refuses_an_unknown_heldout_batch(tmp_path, small_adata):
    write_h5ad(small_adata, tmp_path / "n.h5ad")
    res = run_script("scinv_train.py", *train_args(tmp_path, "--label-key", "cell_type", "--heldout-batches", "b9"))
    assert res.returncode == 2
    assert "held-out batches ['b9'] not in column 'batch'" in one_error_line(res.stderr)
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("method", ["harmony", "scvi"])
def test_baseline_embeddings_keyed_by_cell(tmp_path, small_adata, method):
    import scanpy as sc

    sc.pp.normalize_total(small_adata)
    sc.pp.log1p(small_adata)
    sc.pp.pca(small_adata, n_comps=10)
    write_h5ad(small_adata, tmp_path / "n.h5ad")
    out = tmp_path / f"{method}.parquet"
    res = run_script("scinv_baseline.py", "--method", method, "--input", str(tmp_path / "n.h5ad"), "--output", str(out), "--max-epochs", "3", "--threads", "1")
    assert res.returncode == 0, res.stderr[-2000:]
    emb = pd.read_parquet(out)
    assert emb.index.name == "cell_id" and list(emb.index) == list(small_adata.obs_names)
    assert emb.shape[1] == (10 if method == "harmony" else 25) and emb.notna().all().all()
    assert emb.columns[0] == f"{method}_0"


def test_scanvi_baseline_predicts_the_heldout_batch_without_its_labels(tmp_path, small_adata):
    import scanpy as sc

    sc.pp.normalize_total(small_adata)
    sc.pp.log1p(small_adata)
    sc.pp.pca(small_adata, n_comps=10)
    write_h5ad(small_adata, tmp_path / "n.h5ad")
    out = tmp_path / "scanvi.parquet"
    args = ("--input", str(tmp_path / "n.h5ad"), "--output", str(out), "--max-epochs", "3", "--threads", "1")
    res = run_script("scinv_baseline.py", "--method", "scanvi", *args, "--label-key", "cell_type", "--heldout-batches", "b2")
    assert res.returncode == 0, res.stderr[-2000:]
    table = pd.read_parquet(out)
    assert list(table.index) == list(small_adata.obs_names) and table.columns[0] == "scanvi_0"
    assert table.filter(like="scanvi_").shape[1] == 25 and set(table["prediction"]) <= set(small_adata.obs["cell_type"].astype(str))
    # the metrics step reads the embedding and scores scANVI's own predictions as a classifier
    from scinv.metrics import add_baseline_embeddings, label_transfer_table

    assert add_baseline_embeddings(small_adata, [str(out)]) == ["X_scanvi"] and small_adata.obsm["X_scanvi"].shape == (600, 25)
    transfer = label_transfer_table(small_adata, ["X_scanvi"], "batch", "cell_type", ["b2"], prediction_key=None)
    assert {"scanvi classifier", "kNN on X_scanvi"} == set(transfer.index)
    assert transfer["n_query"].iloc[0] == (small_adata.obs["batch"] == "b2").sum()
    res = run_script("scinv_baseline.py", "--method", "scanvi", *args)
    assert res.returncode == 2 and "scanvi needs --label-key" in one_error_line(res.stderr)


def test_baseline_refuses_a_single_batch(tmp_path, small_adata):
    small_adata.obs["batch"] = "one"
    write_h5ad(small_adata, tmp_path / "n.h5ad")
    res = run_script("scinv_baseline.py", "--method", "scvi", "--input", str(tmp_path / "n.h5ad"), "--output", str(tmp_path / "s.parquet"))
    assert res.returncode == 2 and "only one batch" in one_error_line(res.stderr)
    assert not (tmp_path / "s.parquet").exists()
