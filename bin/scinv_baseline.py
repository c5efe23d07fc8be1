#!/usr/bin/env python3
"""BASELINE_*: a reference integration (Harmony or scVI) as a parquet table keyed by cell_id."""

import click
import pandas as pd

from scinv.baselines import METHODS, harmony_embedding, scvi_embedding
from scinv.cli import step
from scinv.io import read_h5ad, write_table


@click.command(context_settings={"show_default": True})
@click.option("--method", required=True, type=click.Choice(METHODS), help="Which baseline to run.")
@click.option("--input", "input_path", required=True, type=click.Path(exists=True), help="Normalised HVG .h5ad (counts layer, X_pca) from NORMALIZE.")
@click.option("--output", required=True, type=click.Path(), help="Parquet: one row per cell (index cell_id), one column per dimension.")
@click.option("--batch-key", default="batch", help="Batch column to correct for.")
@click.option("--n-latent", default=25, type=int, help="scVI latent dimensions (Harmony keeps the PCA's).")
@click.option("--n-hidden", default=128, type=int, help="scVI hidden units per layer.")
@click.option("--n-layers", default=2, type=int, help="scVI hidden layers.")
@click.option("--max-epochs", default=0, type=int, help="scVI epochs (0: scvi-tools' heuristic, with early stopping).")
@click.option("--device", default="auto", help="scVI accelerator: auto, cpu or gpu.")
@click.option("--threads", default=0, type=int, help="CPU threads (0: library default).")
@click.option("--seed", default=0, type=int, help="Random seed.")
@step
def main(method, input_path, output, batch_key, n_latent, n_hidden, n_layers, max_epochs, device, threads, seed):
    """Run one baseline integration on the normalised data."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    adata = read_h5ad(input_path)
    if method == "harmony":
        z = harmony_embedding(adata, batch_key, seed=seed, threads=threads)
    else:
        z = scvi_embedding(
            adata, batch_key, n_latent=n_latent, n_hidden=n_hidden, n_layers=n_layers, max_epochs=max_epochs or None, seed=seed, accelerator=device
        )
    table = pd.DataFrame(z, index=pd.Index(adata.obs_names, name="cell_id"), columns=[f"{method}_{i}" for i in range(z.shape[1])])
    write_table(table, output)
    click.echo(f"BASELINE: {method} embedding {z.shape[0]} cells x {z.shape[1]} dims -> {output}", err=True)


if __name__ == "__main__":
    main()
