#!/usr/bin/env python3
"""TRAIN_INVAE: train the inVAE model (and its invariant label predictor) on raw HVG counts."""

from dataclasses import asdict

import click
import torch

from scinv.cli import key_list, step
from scinv.config import ModelConfig, PredictorConfig, TrainingConfig, click_options, from_options
from scinv.data import hide_heldout_labels
from scinv.errors import ScinvInputError
from scinv.io import read_counts_for_model, read_h5ad, write_table
from scinv.mapping import REFERENCE_SAMPLE_CELLS
from scinv.model import InVAE


@click.command(context_settings={"show_default": True})
@click.option("--input", "input_path", required=True, type=click.Path(exists=True), help="Normalised HVG .h5ad with raw counts in layers['counts'].")
@click.option("--model-dir", required=True, type=click.Path(), help="Directory to save the trained model in.")
@click.option("--history", "history_out", required=True, type=click.Path(), help="CSV of per-epoch losses.")
@click.option("--layer", default="counts", help="Layer with raw counts.")
@click.option("--batch-key", default="batch", help="Batch column (spurious prior, environments of the predictor).")
@click.option("--label-key", default="", help="Label column (invariant prior, predictor target); empty for none.")
@click.option("--unknown-label", default="Unknown", help="Label value of unlabelled cells (label-marginal prior, predicted).")
@click.option("--heldout-batches", default="", help="Comma list of batches whose labels training must not see (scored later as label transfer).")
@click.option("--invariant-keys", default="", help="Comma list of extra biological covariates for the invariant prior.")
@click.option("--spurious-keys", default="", help="Comma list of extra technical covariates for the spurious prior.")
@click.option("--continuous-keys", default="", help="Which of those covariates are continuous (standardised, not one-hot).")
@click_options(ModelConfig)
@click_options(TrainingConfig)
@click_options(PredictorConfig)  # its seed is --seed
@click.option(
    "--reference-cells",
    default=REFERENCE_SAMPLE_CELLS,
    type=int,
    help="Keep the invariant latents, UMAP and novelty threshold of this many training cells in the model, for query mapping (0: none).",
)
@click.option("--device", default="auto", help="auto, cpu, cuda or cuda:N.")
@click.option("--threads", default=0, type=int, help="CPU threads for torch (0: torch default).")
@step
def main(
    input_path,
    model_dir,
    history_out,
    layer,
    batch_key,
    label_key,
    unknown_label,
    heldout_batches,
    invariant_keys,
    spurious_keys,
    continuous_keys,
    reference_cells,
    device,
    threads,
    **options,
):
    """Train inVAE and save the model directory."""
    import pandas as pd

    if threads > 0:
        torch.set_num_threads(threads)
    # only the counts are read (from disk per chunk for large data); X stays on disk
    adata = read_counts_for_model(input_path, layer) if layer else read_h5ad(input_path, backed="r")
    if key_list(heldout_batches):
        if not label_key:
            raise ScinvInputError("--heldout-batches needs --label-key (whose labels to hide)")
        adata.obs[label_key] = hide_heldout_labels(adata.obs, batch_key, label_key, key_list(heldout_batches), unknown_label, input_path)
    model = InVAE(
        adata,
        layer=layer or None,
        batch_key=batch_key or None,
        label_key=label_key or None,
        unknown_label=unknown_label,
        invariant_keys=key_list(invariant_keys),
        spurious_keys=key_list(spurious_keys),
        continuous_keys=key_list(continuous_keys),
        _where=input_path,
        **asdict(from_options(ModelConfig, options)),
    )
    model.train(device=device, **asdict(from_options(TrainingConfig, options)))
    predictor = from_options(PredictorConfig, options, seed=options["seed"])
    if label_key and predictor.max_epochs > 0 and model.registry.n_labels >= 2:
        model.train_predictor(**asdict(predictor))
    if reference_cells > 0:
        model.store_reference(reference_cells, seed=options["seed"])
    write_table(pd.DataFrame(model.history), history_out, index=False)
    model.save(model_dir)
    click.echo(f"TRAIN_INVAE: saved model to {model_dir}", err=True)


if __name__ == "__main__":
    main()
