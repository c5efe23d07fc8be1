#!/usr/bin/env python3
"""NORMALIZE: merge the QC'd samples (kept cells, genes), batch-aware HVGs, normalize_total + log1p, PCA."""

import click

from scinv.cli import step
from scinv.gather import gather
from scinv.io import write_table
from scinv.mapping import MAX_MISSING_GENE_FRACTION
from scinv.model import model_genes


@click.command(context_settings={"show_default": True})
@click.argument("samples", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--output", required=True, type=click.Path(), help="HVG-subset .h5ad (raw counts in layers['counts'], log-normalised X, X_pca).")
@click.option("--summary", required=True, type=click.Path(), help="CSV: cells per sample before/kept/removed per reason.")
@click.option("--cells", "cells_out", required=True, type=click.Path(), help="Parquet with the QC metrics and verdict of every input cell.")
@click.option("--batch-key", default="batch", help="obs column for batch-aware HVG selection.")
@click.option("--min-cells-per-gene", default=3, type=int, help="Drop genes detected in fewer kept cells (over all samples).")
@click.option("--n-top-genes", default=2000, type=int, help="Number of highly variable genes.")
@click.option(
    "--flavor",
    default="seurat_v3",
    type=click.Choice(["seurat_v3", "pearson_residuals", "seurat", "cell_ranger"]),
    help="HVG method (seurat_v3 and pearson_residuals use raw counts). seurat_v3 runs batch by batch; the others hold all cells in memory.",
)
@click.option("--target-sum", default=1e4, type=float, help="Counts per cell after normalize_total.")
@click.option("--n-pcs", default=50, type=int, help="Principal components of the unintegrated baseline.")
@click.option("--seed", default=0, type=int, help="Random seed.")
@click.option(
    "--reference-model",
    default=None,
    type=click.Path(exists=True, file_okay=False),
    help="Query mapping: lay the samples out on this trained model's genes (no HVG selection, no PCA).",
)
@click.option(
    "--max-missing-genes",
    default=MAX_MISSING_GENE_FRACTION,
    type=click.FloatRange(0, 1),
    help="With --reference-model: stop when a sample lacks more than this fraction of the model's genes (the others are zero-filled).",
)
@step
def main(samples, output, summary, cells_out, batch_key, min_cells_per_gene, n_top_genes, flavor, target_sum, n_pcs, seed, reference_model, max_missing_genes):
    """Merge per-sample QC files (SAMPLES: .h5ad from QC) into the normalised HVG .h5ad."""
    genes = model_genes(reference_model) if reference_model else None
    table, cells, record = gather(
        list(samples),
        output,
        batch_key,
        n_top_genes,
        flavor,
        target_sum,
        n_pcs,
        min_cells_per_gene,
        seed,
        reference_genes=genes,
        max_missing_genes=max_missing_genes,
    )
    write_table(cells, cells_out)
    write_table(table, summary)
    click.echo(table.to_string(), err=True)
    click.echo(f"NORMALIZE: {int(table.loc['total', 'kept'])} cells x {record['n_top_genes']} HVGs ({record['hvg']['flavor']})", err=True)


if __name__ == "__main__":
    main()
