#!/usr/bin/env python3
"""QC of one sample: per-cell metrics, threshold and MAD filters, doublet detection; every cell's verdict."""

import json
from pathlib import Path

import click

from scinv.cli import key_list, step
from scinv.io import read_h5ad, write_h5ad
from scinv.preprocess import QCThresholds, load_sample, qc_sample, qc_table


@click.command(context_settings={"show_default": True})
@click.option(
    "--input", "input_path", required=True, type=click.Path(exists=True), help="One sample's counts (10x .h5, MTX folder, .h5ad), or an .h5ad of samples."
)
@click.option("--output", required=True, type=click.Path(), help=".h5ad with every input cell, its QC metrics and obs['qc_reason'] (kept or why not).")
@click.option(
    "--row", "row_json", default=None, type=click.Path(exists=True), help="JSON: the sample's row of CHECK_INPUT's samplesheet (obs columns, thresholds)."
)
@click.option("--annotations", default=None, type=click.Path(), help="Optional CSV with a cell_id column whose other columns join obs.")
@click.option("--batch-key", default="batch", help="obs column with the batch of each cell.")
@click.option("--label-key", default="", help="obs column with cell labels (optional).")
@click.option("--unknown-label", default="Unknown", help="Value given to unlabelled cells.")
@click.option("--obs-keys", default="", help="Comma list of further obs columns that must exist (invariant/spurious covariates).")
@click.option(
    "--min-genes",
    default=None,
    type=int,
    help="Minimum detected genes per cell (samplesheet column min_genes overrides per sample). Default: 200, scaled down for panels under 10,000 genes.",
)
@click.option(
    "--min-counts",
    default=None,
    type=int,
    help="Minimum counts per cell (column min_counts overrides). Default: 500, scaled down for panels under 10,000 genes.",
)
@click.option("--max-counts", default=None, type=float, help="Maximum counts per cell (column max_counts overrides).")
@click.option("--max-pct-mito", default=20.0, type=float, help="Maximum % mitochondrial counts (column max_pct_mito overrides).")
@click.option("--mad-threshold", default=None, type=float, help="Also drop cells further than this many MADs from their sample's median log counts/genes.")
@click.option("--doublets/--no-doublets", default=True, help="Run scrublet per sample on raw counts.")
@click.option("--seed", default=0, type=int, help="Random seed for scrublet.")
@step
def main(
    input_path,
    output,
    row_json,
    annotations,
    batch_key,
    label_key,
    unknown_label,
    obs_keys,
    min_genes,
    min_counts,
    max_counts,
    max_pct_mito,
    mad_threshold,
    doublets,
    seed,
):
    """Flag low-quality cells and doublets of one sample (NORMALIZE removes them and merges the samples)."""
    if row_json:
        row = json.loads(Path(row_json).read_text())
        adata = load_sample(input_path, row, batch_key, label_key, annotations, unknown_label, key_list(obs_keys))
    else:
        adata = read_h5ad(input_path)
        if "counts" not in adata.layers:
            adata.layers["counts"] = adata.X
    thr = QCThresholds(min_genes, min_counts, max_counts, max_pct_mito, None, mad_threshold, doublets)
    qc_sample(adata, thr, seed)
    adata.X = adata.layers.pop("counts")
    write_h5ad(adata, output)
    click.echo(qc_table(adata.obs).to_string(), err=True)


if __name__ == "__main__":
    main()
