#!/usr/bin/env python3
"""NORMALIZE: normalize_total + log1p, batch-aware HVG selection on raw counts, PCA."""

import click

from scinv.cli import step
from scinv.errors import ScinvInputError
from scinv.io import read_h5ad, write_h5ad
from scinv.preprocess import normalize_and_select


@click.command(context_settings={"show_default": True})
@click.option("--input", "input_path", required=True, type=click.Path(exists=True), help="QC-filtered .h5ad.")
@click.option("--output", required=True, type=click.Path(), help="HVG-subset .h5ad (raw counts in layers['counts'], log-normalised X, X_pca).")
@click.option("--batch-key", default="batch", help="obs column for batch-aware HVG selection.")
@click.option("--n-top-genes", default=2000, type=int, help="Number of highly variable genes.")
@click.option(
    "--flavor",
    default="seurat_v3",
    type=click.Choice(["seurat_v3", "pearson_residuals", "seurat", "cell_ranger"]),
    help="HVG method (seurat_v3 and pearson_residuals use raw counts).",
)
@click.option("--target-sum", default=1e4, type=float, help="Counts per cell after normalize_total.")
@click.option("--n-pcs", default=50, type=int, help="Principal components of the unintegrated baseline.")
@click.option("--seed", default=0, type=int, help="Random seed.")
@step
def main(input_path, output, batch_key, n_top_genes, flavor, target_sum, n_pcs, seed):
    """Normalise and select highly variable genes."""
    adata = read_h5ad(input_path)
    if "counts" not in adata.layers:
        raise ScinvInputError(f"{input_path}: layers['counts'] missing; run CHECK_INPUT/QC first")
    if batch_key not in adata.obs:
        raise ScinvInputError(f"{input_path}: obs column '{batch_key}' not found; fix --batch_key")
    hvg = normalize_and_select(adata, n_top_genes, batch_key, flavor, target_sum, n_pcs, seed)
    write_h5ad(hvg, output)
    click.echo(f"NORMALIZE: {hvg.n_obs} cells x {hvg.n_vars} HVGs ({hvg.uns['scinv_normalize']['hvg']['flavor']})", err=True)


if __name__ == "__main__":
    main()
