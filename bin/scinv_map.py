#!/usr/bin/env python3
"""MAP_QUERY: map query samples onto a trained scinv model (scArches-style: only the new batches' weights train)."""

import click
import pandas as pd
import torch

from scinv.cli import step
from scinv.errors import ScinvInputError
from scinv.io import read_counts_for_model, write_table
from scinv.model import InVAE


@click.command(context_settings={"show_default": True})
@click.option("--input", "input_path", required=True, type=click.Path(exists=True), help="Query .h5ad from NORMALIZE --reference-model (the model's genes).")
@click.option("--reference-model", required=True, type=click.Path(exists=True, file_okay=False), help="Model directory of a previous scinv run.")
@click.option("--model-dir", required=True, type=click.Path(), help="Where to save the model extended to the query's batches.")
@click.option("--history", "history_out", required=True, type=click.Path(), help="CSV of the per-epoch losses of the query training.")
@click.option("--batch-key", default="batch", help="The query's batch column (read as the model's batch column).")
@click.option("--max-epochs", default=50, type=int, help="Epochs for the new batches' weights (0: encode only, no training).")
@click.option("--batch-size", default=256, type=int, help="Minibatch size.")
@click.option("--lr", default=1e-3, type=float, help="Learning rate.")
@click.option("--seed", default=0, type=int, help="Random seed.")
@click.option("--device", default="auto", help="auto, cpu, cuda or cuda:N.")
@click.option("--threads", default=0, type=int, help="CPU threads for torch (0: torch default).")
@step
def main(input_path, reference_model, model_dir, history_out, batch_key, max_epochs, batch_size, lr, seed, device, threads):
    """Extend the reference model to the query's batches; the reference weights stay frozen."""
    if threads > 0:
        torch.set_num_threads(threads)
    model = InVAE.load(reference_model, device="cpu")
    if model.mapped_query:
        raise ScinvInputError(f"{reference_model}: a model made by mapping a query; pass the reference run's model (model/<run>_model)")
    query = read_counts_for_model(input_path, model.registry.layer or "counts")
    model_key = model.registry.batch.key if model.registry.batch else None
    if model_key and model_key not in query.obs:
        if batch_key not in query.obs:
            raise ScinvInputError(f"{input_path}: batch column '{batch_key}' not found in obs; set --batch_key to the query's batch column")
        query.obs[model_key] = query.obs[batch_key]
    if model.reference is None:
        click.echo(f"MAP_QUERY: {reference_model} keeps no reference sample (an older model): no novelty scores or reference UMAP", err=True)
    mapped = model.map_query(query, max_epochs=max_epochs, batch_size=batch_size, lr=lr, seed=seed, device=device)
    write_table(pd.DataFrame(mapped.history), history_out, index=False)
    mapped.save(model_dir)
    new = [b for b in mapped.registry.batch.categories if b not in model.registry.batch.categories] if model_key else []
    click.echo(f"MAP_QUERY: {query.n_obs} cells, new batches {new}; saved {model_dir}", err=True)


if __name__ == "__main__":
    main()
