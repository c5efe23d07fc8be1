#!/usr/bin/env python3
"""QC: per-cell metrics, threshold and MAD filters, per-batch doublet detection, kept/removed table."""

import click

from scinv.cli import step
from scinv.io import read_h5ad, write_h5ad, write_table
from scinv.preprocess import QCThresholds, run_qc


@click.command(context_settings={"show_default": True})
@click.option("--input", "input_path", required=True, type=click.Path(exists=True), help="Merged .h5ad from CHECK_INPUT.")
@click.option("--output", required=True, type=click.Path(), help="Filtered .h5ad.")
@click.option("--summary", required=True, type=click.Path(), help="CSV: cells per sample before/kept/removed per reason.")
@click.option("--cells", "cells_out", required=True, type=click.Path(), help="Parquet with the QC metrics and verdict of every input cell.")
@click.option("--batch-key", default="batch", help="obs column for per-batch doublet detection.")
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
@click.option("--min-cells-per-gene", default=3, type=int, help="Drop genes detected in fewer cells.")
@click.option("--mad-threshold", default=None, type=float, help="Also drop cells further than this many MADs from their sample's median log counts/genes.")
@click.option("--doublets/--no-doublets", default=True, help="Run scrublet per batch on raw counts.")
@click.option("--seed", default=0, type=int, help="Random seed for scrublet.")
@step
def main(input_path, output, summary, cells_out, batch_key, min_genes, min_counts, max_counts, max_pct_mito, min_cells_per_gene, mad_threshold, doublets, seed):
    """Filter low-quality cells and doublets."""
    adata = read_h5ad(input_path)
    thr = QCThresholds(min_genes, min_counts, max_counts, max_pct_mito, min_cells_per_gene, mad_threshold, doublets)
    cols = ["sample", batch_key, "n_genes_by_counts", "total_counts", "pct_counts_mt", "pct_counts_ribo", "doublet_score", "qc_reason"]
    kept, table = run_qc(adata, thr, batch_key, seed)
    write_table(adata.obs[[c for c in dict.fromkeys(cols) if c in adata.obs]].astype({"qc_reason": str}), cells_out)
    write_table(table, summary)
    write_h5ad(kept, output)
    click.echo(table.to_string(), err=True)


if __name__ == "__main__":
    main()
