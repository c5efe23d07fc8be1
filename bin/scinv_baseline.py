#!/usr/bin/env python3
"""BASELINE_*: a reference integration (Harmony, scVI or scANVI) as a parquet table keyed by cell_id."""

import click
import pandas as pd

from scinv.baselines import METHODS, harmony_embedding, scanvi_embedding, scvi_embedding
from scinv.cli import key_list, step
from scinv.data import hide_heldout_labels
from scinv.errors import ScinvInputError
from scinv.io import read_h5ad, write_table
from scinv.metrics import PREDICTION_COLUMN


@click.command(context_settings={"show_default": True})
@click.option("--method", required=True, type=click.Choice(METHODS), help="Which baseline to run.")
@click.option("--input", "input_path", required=True, type=click.Path(exists=True), help="Normalised HVG .h5ad (counts layer, X_pca) from NORMALIZE.")
@click.option(
    "--output", required=True, type=click.Path(), help="Parquet: one row per cell (index cell_id), one column per dimension (scanvi: and its predicted label)."
)
@click.option("--batch-key", default="batch", help="Batch column to correct for.")
@click.option("--label-key", default="", help="scANVI: label column it trains on.")
@click.option("--unknown-label", default="Unknown", help="scANVI: label value of unlabelled cells.")
@click.option("--heldout-batches", default="", help="scANVI: comma list of batches whose labels it must not see (as scinv).")
@click.option("--n-latent", default=25, type=int, help="scVI/scANVI latent dimensions (Harmony keeps the PCA's).")
@click.option("--n-hidden", default=128, type=int, help="scVI/scANVI hidden units per layer.")
@click.option("--n-layers", default=2, type=int, help="scVI/scANVI hidden layers.")
@click.option("--max-epochs", default=0, type=int, help="scVI epochs, also scANVI's pre-training (0: scvi-tools' heuristic, with early stopping).")
@click.option("--device", default="auto", help="scVI accelerator: auto, cpu or gpu.")
@click.option("--threads", default=0, type=int, help="CPU threads (0: library default).")
@click.option("--seed", default=0, type=int, help="Random seed.")
@step
def main(method, input_path, output, batch_key, label_key, unknown_label, heldout_batches, n_latent, n_hidden, n_layers, max_epochs, device, threads, seed):
    """Run one baseline integration on the normalised data."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    adata = read_h5ad(input_path)
    size = dict(n_latent=n_latent, n_hidden=n_hidden, n_layers=n_layers, max_epochs=max_epochs or None, seed=seed, accelerator=device)
    predicted = None
    if method == "harmony":
        z = harmony_embedding(adata, batch_key, seed=seed, threads=threads)
    elif method == "scvi":
        z = scvi_embedding(adata, batch_key, **size)
    else:
        if not label_key:
            raise ScinvInputError("scanvi needs --label-key (it trains on the labels)")
        labels = hide_heldout_labels(adata.obs, batch_key, label_key, key_list(heldout_batches), unknown_label, "scanvi")
        z, predicted = scanvi_embedding(adata, batch_key, labels, unknown_label, **size)
    table = pd.DataFrame(z, index=pd.Index(adata.obs_names, name="cell_id"), columns=[f"{method}_{i}" for i in range(z.shape[1])])
    if predicted is not None:
        table[PREDICTION_COLUMN] = pd.Series(predicted, index=table.index).astype(str)
    write_table(table, output)
    click.echo(f"BASELINE: {method} embedding {z.shape[0]} cells x {z.shape[1]} dims -> {output}", err=True)


if __name__ == "__main__":
    main()
