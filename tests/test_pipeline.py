"""The real Nextflow pipeline, run with the pinned Nextflow on the bundled real data."""

import json
import re

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from conftest import ROOT, render_in_chromium, run_nextflow

MAIN = str(ROOT / "main.nf")
PROCESSES = ["PIPELINE_INITIALISATION:CHECK_INPUT"] + [
    f"SCINV:{p}" for p in ("QC", "NORMALIZE", "TRAIN_INVAE", "BASELINE_HARMONY", "BASELINE_SCVI", "BASELINE_SCANVI", "EXPORT", "METRICS", "REPORT")
]
SAMPLES = 3  # QC runs once per sample of -profile test


def test_pinned_nextflow_version(tmp_path):
    res = run_nextflow("-version", cwd=tmp_path)
    assert res.returncode == 0 and "version 24.10.8" in res.stdout


def test_help_lists_parameters(tmp_path):
    res = run_nextflow("run", MAIN, "--help", cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    for p in ("--input", "--label_key", "--invariant_keys", "--spurious_keys", "--unknown_label", "--outdir"):
        assert p in res.stdout


def test_invalid_parameter_is_refused_before_running(tmp_path):
    res = run_nextflow("run", MAIN, "-profile", "test", "--prior_mode", "median", "--outdir", str(tmp_path / "o"), cwd=tmp_path)
    assert res.returncode != 0
    assert "--prior_mode must be one of mean, variance, both" in res.stdout + res.stderr
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").iterdir())


def test_scanvi_baseline_without_labels_is_refused_before_running(tmp_path):
    unlabelled = tmp_path / "params.json"  # `--label_key ''` on the command line is a boolean to Nextflow
    unlabelled.write_text('{"label_key": "", "heldout_batches": ""}')
    res = run_nextflow("run", MAIN, "-profile", "test", "-params-file", str(unlabelled), "--outdir", str(tmp_path / "o"), cwd=tmp_path)
    assert res.returncode != 0
    assert "--baselines scanvi needs --label_key" in res.stdout + res.stderr


def test_stub_run_wires_every_process(tmp_path):
    # a list typed with spaces after the commas, and a text value with a space, reach each step as one argument
    lists = ("--heldout_batches", "C149, C146", "--invariant_keys", " condition", "--unknown_label", "not annotated", "--report_color_keys", "donor")
    res = run_nextflow("run", MAIN, "-profile", "test", "-stub", "--outdir", str(tmp_path / "o"), *lists, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:]
    for proc in PROCESSES:
        assert proc in res.stdout
    check_input = next(p.read_text() for p in (tmp_path / "work").glob("*/*/.command.sh") if "scinv_check_input.py" in p.read_text())
    assert "--heldout-batches 'C149,C146'" in check_input and "--obs-keys 'condition'" in check_input
    assert "--unknown-label 'not annotated'" in check_input
    # the report colours by --report_color_keys and the model's covariates (build_report drops repeats)
    report = next(p.read_text() for p in (tmp_path / "work").glob("*/*/.command.sh") if "_report.html" in p.read_text())
    assert "--color-keys 'donor,condition'" in report


def test_adding_a_sample_reruns_only_that_samples_tasks_on_resume(tmp_path):
    """Per-sample scatter: -resume after adding a row leaves the other samples' QC cached."""
    rows = (ROOT / "assets" / "samplesheet_test.csv").read_text().splitlines()
    sheet = tmp_path / "sheet.csv"
    sheet.write_text("\n".join(rows[:3]).replace("liao2020/", f"{ROOT}/assets/liao2020/") + "\n")
    # C146 held out: the profile's C149 is not in the first sheet
    args = ["run", MAIN, "-profile", "test", "-stub", "--input", str(sheet), "--heldout_batches", "C146", "--outdir", str(tmp_path / "o")]
    first = run_nextflow(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-3000:]
    assert len(re.findall(r"Submitted process > SCINV:QC \(", first.stdout)) == 2
    sheet.write_text("\n".join(rows).replace("liao2020/", f"{ROOT}/assets/liao2020/") + "\n")
    again = run_nextflow(*args, "-resume", cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-3000:]
    assert sorted(re.findall(r"Cached process > SCINV:QC \((\w+)\)", again.stdout)) == ["C144", "C146"]
    assert re.findall(r"Submitted process > SCINV:QC \((\w+)\)", again.stdout) == ["C149"]
    assert "Submitted process > SCINV:NORMALIZE" in again.stdout


# a spreadsheet's CSV export: a byte-order mark, and an empty last column (a trailing comma on every line)
@pytest.mark.parametrize("start, end", [("", ""), ("\ufeff", ",")], ids=["plain", "spreadsheet-export"])
def test_missing_sample_file_stops_before_any_task_with_one_line(tmp_path, start, end):
    sheet = tmp_path / "sheet.csv"
    sheet.write_text(f"{start}sample,path{end}\nC149,{ROOT}/assets/liao2020/GSM4475052_C149_filtered_feature_bc_matrix.h5{end}\nX,nowhere.h5{end}\n")
    res = run_nextflow("run", MAIN, "--input", str(sheet), "--outdir", str(tmp_path / "o"), cwd=tmp_path)
    out = res.stdout + res.stderr
    assert res.returncode != 0
    assert "Submitted process" not in out
    errors = [line.strip() for line in out.splitlines() if line.strip().startswith("ERROR: ")]
    assert errors and "sheet.csv" in errors[0] and "nowhere.h5" in errors[0] and "fix the path column" in errors[0]


@pytest.fixture(scope="module")
def profile_test(tmp_path_factory):
    """One `-profile test` run (its folder, outdir and output), shared by the tests that read it."""
    tmp_path = tmp_path_factory.mktemp("profile_test")
    outdir = tmp_path / "results"
    return tmp_path, outdir, run_nextflow("run", MAIN, "-profile", "test", "--outdir", str(outdir), cwd=tmp_path, timeout=1500)


@pytest.mark.slow
def test_profile_test_end_to_end_and_resume(profile_test):
    tmp_path, outdir, res = profile_test
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    for proc in PROCESSES:
        assert re.search(rf"Submitted process > {proc}\b", res.stdout), proc

    final = ad.read_h5ad(outdir / "export" / "scinv_integrated.h5ad")
    assert final.n_obs > 5000 and final.n_vars == 2000
    assert final.obsm["X_scinv_inv"].shape == (final.n_obs, 20)
    assert final.obsm["X_scinv_spur"].shape == (final.n_obs, 5)
    assert np.isfinite(final.obsm["X_scinv_inv"]).all()
    assert "counts" in final.layers and set(final.obs["batch"].unique()) == {"C144", "C146", "C149"}
    assert final.obs["scinv_prediction"].notna().all()

    emb = pd.read_parquet(outdir / "export" / "scinv_embeddings.parquet")
    assert emb.shape[0] == final.n_obs and emb.index.name == "cell_id"

    metrics = pd.read_csv(outdir / "metrics" / "scinv_metrics.csv", index_col=0)
    assert {"X_scinv_inv", "X_pca", "X_harmony", "X_scvi", "X_scanvi"} <= set(metrics.index)
    assert metrics[["KMeans NMI", "KMeans ARI"]].notna().all().all()
    for col in ("Bio conservation", "Batch correction", "Total", "Total (published)"):
        assert metrics[col].between(0, 1).all(), col
    transfer = pd.read_csv(outdir / "metrics" / "scinv_label_transfer.csv", index_col=0)
    assert {"scinv invariant predictor", "kNN on X_scinv_inv", "kNN on X_harmony", "kNN on X_scvi", "scanvi classifier", "kNN on X_scanvi"} <= set(
        transfer.index
    )
    held, known = final.obs["batch"] == "C149", final.obs["celltype_derived"] != "Unknown"
    assert (transfer["n_query"] == (held & known).sum()).all() and (transfer["n_reference"] == (~held & known).sum()).all()
    # the predictor never saw C149's labels, yet transfers them far better than chance (8 types)
    assert transfer.loc["scinv invariant predictor", "accuracy"] > 0.6, transfer

    report = outdir / "report" / "scinv_report.html"
    html = report.read_text()
    assert "Integration metrics" in html and "Software versions" in html and "Label transfer to held-out batches" in html
    # QC violins + scatter, training, 3 UMAP grids, scIB, confusion: every one decodes in a browser
    sizes, shot = render_in_chromium(report, tmp_path)
    assert len(sizes) == html.count("data:image/png;base64,") >= 8
    assert all(w > 300 and h > 200 for w, h in sizes), sizes
    assert shot.stat().st_size > 100_000  # a screenshot of a page full of figures, not a blank page

    info = outdir / "pipeline_info"
    assert list(info.glob("execution_trace_*.txt")) and list(info.glob("execution_report_*.html")) and list(info.glob("execution_timeline_*.html"))
    versions = (info / "software_versions.yml").read_text()
    assert all(p in versions for p in PROCESSES if p != "SCINV:REPORT")
    assert all(p in html for p in PROCESSES)  # the report lists every step's versions, its own too
    assert json.loads((info / "params.json").read_text())["label_key"] == "celltype_derived"
    qc = pd.read_csv(outdir / "qc" / "scinv_qc_summary.csv", index_col=0)
    assert qc.loc["total", "before"] == 10706 and qc.loc["total", "kept"] == final.n_obs

    again = run_nextflow("run", MAIN, "-profile", "test", "--outdir", str(outdir), "-resume", cwd=tmp_path, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:]
    assert len(re.findall(r"Cached process > ", again.stdout)) == len(PROCESSES) + SAMPLES - 1


def test_reference_model_that_is_not_a_model_stops_before_any_task(tmp_path):
    (tmp_path / "empty").mkdir()
    res = run_nextflow("run", MAIN, "-profile", "test_mapping", "--reference_model", str(tmp_path / "empty"), "--outdir", str(tmp_path / "o"), cwd=tmp_path)
    assert res.returncode != 0
    assert f"--reference_model {tmp_path / 'empty'}: not a scinv model directory" in res.stdout + res.stderr
    assert "Submitted process" not in res.stdout


def test_stub_mapping_run_maps_instead_of_training(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"")
    res = run_nextflow("run", MAIN, "-profile", "test_mapping", "-stub", "--reference_model", str(model), "--outdir", str(tmp_path / "o"), cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:]
    for proc in ("SCINV:QC", "SCINV:NORMALIZE", "SCINV:MAP_QUERY", "SCINV:EXPORT", "SCINV:REPORT"):
        assert f"> {proc}" in res.stdout, proc
    assert "TRAIN_INVAE" not in res.stdout and "METRICS" not in res.stdout and "BASELINE" not in res.stdout


@pytest.mark.slow
def test_reference_then_query_mapping_end_to_end(tmp_path, profile_test):
    """-profile test_reference trains on C144 and C146; -profile test_mapping maps C149 onto that model."""
    ref_out, query_out = tmp_path / "results_reference", tmp_path / "results_query"
    first = run_nextflow("run", MAIN, "-profile", "test_reference", "--outdir", str(ref_out), cwd=tmp_path, timeout=1200)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-2000:]
    model_dir = ref_out / "model" / "scinv_model"
    second = run_nextflow("run", MAIN, "-profile", "test_mapping", "--reference_model", str(model_dir), "--outdir", str(query_out), cwd=tmp_path, timeout=900)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-2000:]
    assert "Submitted process > SCINV:MAP_QUERY" in second.stdout and "TRAIN_INVAE" not in second.stdout  # never trains from scratch

    from scinv.io import read_counts_for_model
    from scinv.model import InVAE

    query = ad.read_h5ad(query_out / "export" / "scinv_integrated.h5ad")
    assert set(query.obs["batch"]) == {"C149"} and query.n_vars == 2000
    assert {"scinv_novelty", "scinv_novel", "scinv_uncertainty", "scinv_prediction"} <= set(query.obs)
    assert query.obsm["X_umap_reference"].shape == (query.n_obs, 2) and query.obsm["scinv_label_probabilities"].shape[1] == 5
    # the reference weights are unchanged: the mapped model gives the reference cells the same latents
    mapped = InVAE.load(query_out / "model" / "scinv_query_model")
    assert mapped.mapped_query and "C149" in mapped.registry.batch.categories
    reference = ref_out / "export" / "scinv_integrated.h5ad"
    z_before = ad.read_h5ad(reference).obsm["X_scinv_inv"]
    z_after = mapped.get_latent_representation(read_counts_for_model(reference, "counts"), "inv")
    np.testing.assert_allclose(z_after, z_before, atol=1e-4)
    # transfer to C149 as good as in the joint run where C149's labels were hidden (-profile test)
    _, joint_out, joint = profile_test
    assert joint.returncode == 0
    joint_accuracy = pd.read_csv(joint_out / "metrics" / "scinv_label_transfer.csv", index_col=0).loc["scinv invariant predictor", "accuracy"]
    known = (query.obs["celltype_derived"] != "Unknown").to_numpy()
    truth = query.obs["celltype_derived"].astype(str).to_numpy()[known]
    mapped_accuracy = (query.obs["scinv_prediction_known_types"].astype(str).to_numpy()[known] == truth).mean()
    assert abs(mapped_accuracy - joint_accuracy) <= 0.02, (mapped_accuracy, joint_accuracy)
    assert query.obs["scinv_novel"].mean() < 0.02  # C149 has no type the reference lacks

    html = (query_out / "report" / "scinv_report.html").read_text()
    assert "Query mapping" in html and "query cells on the reference UMAP" in html and "Transfer to the query" in html
    sizes, _ = render_in_chromium(query_out / "report" / "scinv_report.html", tmp_path)
    assert len(sizes) == html.count("data:image/png;base64,") >= 4
