#!/usr/bin/env python3
"""REPORT: one self-contained HTML report (figures embedded) from the pipeline's outputs."""

import json
from pathlib import Path

import click
import pandas as pd

from scinv.cli import key_list, step
from scinv.io import read_h5ad, write_text
from scinv.mapping import REFERENCE_FILE
from scinv.report import build_report


@click.command(context_settings={"show_default": True})
@click.option("--input", "input_path", required=True, type=click.Path(exists=True), help="Final .h5ad from EXPORT.")
@click.option("--output", required=True, type=click.Path(), help="HTML file to write.")
@click.option("--qc-cells", default=None, type=click.Path(), help="Per-cell QC parquet from QC.")
@click.option("--qc-summary", default=None, type=click.Path(), help="QC summary CSV.")
@click.option("--metrics", "metrics_path", default=None, type=click.Path(), help="Metrics CSV from METRICS.")
@click.option("--label-transfer", "transfer_path", default=None, type=click.Path(), help="Label-transfer CSV from METRICS (held-out batches).")
@click.option("--heldout-batches", default="", help="Comma list of held-out batches: the confusion matrix is drawn on their cells.")
@click.option("--model-dir", default=None, type=click.Path(), help="Model directory (training history).")
@click.option("--versions", "versions_path", default=None, type=click.Path(), help="Collected versions.yml.")
@click.option("--params", "params_path", default=None, type=click.Path(), help="JSON of pipeline parameters.")
@click.option("--batch-key", default="batch", help="Batch column.")
@click.option("--label-key", default="", help="Label column.")
@click.option("--unknown-label", default="Unknown", help="Label value that marks unlabelled cells (left out of the confusion matrix).")
@click.option("--color-keys", default="", help="Comma list of further obs columns to colour UMAPs by.")
@click.option("--title", default="scinv integration report", help="Report title.")
@step
def main(
    input_path,
    output,
    qc_cells,
    qc_summary,
    metrics_path,
    transfer_path,
    heldout_batches,
    model_dir,
    versions_path,
    params_path,
    batch_key,
    label_key,
    unknown_label,
    color_keys,
    title,
):
    """Build the HTML report."""
    adata = read_h5ad(input_path, matrices=False)  # embeddings and obs only
    exists = lambda p: p and Path(p).exists()  # noqa: E731
    qc_obs = pd.read_parquet(qc_cells) if exists(qc_cells) else None
    summary = pd.read_csv(qc_summary, index_col=0) if exists(qc_summary) else None
    metrics = pd.read_csv(metrics_path, index_col=0) if exists(metrics_path) else None
    transfer = pd.read_csv(transfer_path, index_col=0) if exists(transfer_path) else None
    history = json.loads((Path(model_dir) / "config.json").read_text()).get("history", []) if exists(model_dir) else []
    reference = Path(model_dir or ".") / REFERENCE_FILE
    reference = pd.read_parquet(reference) if exists(model_dir) and reference.exists() else None
    versions = Path(versions_path).read_text() if exists(versions_path) else ""
    params = json.loads(Path(params_path).read_text()) if exists(params_path) else None
    html = build_report(
        adata,
        qc_obs,
        summary,
        metrics,
        history,
        batch_key,
        label_key or None,
        key_list(color_keys),
        versions,
        params,
        title,
        label_transfer=transfer,
        heldout_batches=key_list(heldout_batches),
        unknown_label=unknown_label,
        reference=reference,
    )
    write_text(html, output)
    click.echo(f"REPORT: wrote {output}", err=True)


if __name__ == "__main__":
    main()
