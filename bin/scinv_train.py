#!/usr/bin/env python3
"""TRAIN_INVAE: train the inVAE model (and its invariant label predictor) on raw HVG counts."""

import click
import torch

from scinv.cli import key_list, step
from scinv.data import hide_heldout_labels
from scinv.errors import ScinvInputError
from scinv.io import read_h5ad, write_table
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
@click.option("--n-latent-inv", default=20, type=int, help="Invariant latent dimensions.")
@click.option("--n-latent-spur", default=5, type=int, help="Spurious latent dimensions.")
@click.option("--n-hidden", default=128, type=int, help="Hidden units per layer.")
@click.option("--n-layers", default=2, type=int, help="Hidden layers in encoder and decoder.")
@click.option("--dropout", default=0.1, type=float, help="Dropout rate of hidden layers.")
@click.option("--prior-mode", default="mean", type=click.Choice(["mean", "variance", "both"]), help="Which prior parameters the covariates set.")
@click.option(
    "--prior-family",
    default="gaussian",
    type=click.Choice(["gaussian", "nf"]),
    help="Invariant prior: conditional Gaussian, or NFinVAE's exponential family fitted by score matching.",
)
@click.option("--tc-weight", default=0.0, type=float, help="Weight of the total-correlation penalty between z_inv and z_spur.")
@click.option("--classifier-weight", default=20.0, type=float, help="Weight of the jointly trained label classifier on z_inv (labels as targets only; 0: off).")
@click.option("--encode-covariates/--no-encode-covariates", default=False, help="Let the encoder see the technical covariates (never the labels).")
@click.option("--max-epochs", default=200, type=int, help="Maximum training epochs.")
@click.option("--batch-size", default=256, type=int, help="Minibatch size.")
@click.option("--lr", default=1e-3, type=float, help="Learning rate (AdamW).")
@click.option("--weight-decay", default=1e-4, type=float, help="AdamW weight decay.")
@click.option("--kl-warmup-epochs", default=20, type=int, help="Epochs of linear KL warm-up.")
@click.option("--early-stopping-patience", default=20, type=int, help="Stop after this many epochs without validation improvement (0: never).")
@click.option("--validation-fraction", default=0.1, type=float, help="Fraction of cells held out for validation.")
@click.option("--predictor-epochs", default=100, type=int, help="Maximum epochs of the invariant predictor (0: skip).")
@click.option("--irm-weight", default=0.0, type=float, help="IRMv1 penalty weight of the predictor (0: environment-balanced ERM).")
@click.option("--seed", default=0, type=int, help="Random seed.")
@click.option("--device", default="auto", help="auto, cpu, cuda or cuda:N.")
@click.option("--threads", default=0, type=int, help="CPU threads for torch (0: torch default).")
@click.option("--checkpoint-dir", default=None, type=click.Path(), help="Where to keep resumable checkpoints (survives task restarts).")
@click.option("--checkpoint-every", default=10, type=int, help="Checkpoint every N epochs (needs --checkpoint-dir).")
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
    n_latent_inv,
    n_latent_spur,
    n_hidden,
    n_layers,
    dropout,
    prior_mode,
    prior_family,
    tc_weight,
    classifier_weight,
    encode_covariates,
    max_epochs,
    batch_size,
    lr,
    weight_decay,
    kl_warmup_epochs,
    early_stopping_patience,
    validation_fraction,
    predictor_epochs,
    irm_weight,
    seed,
    device,
    threads,
    checkpoint_dir,
    checkpoint_every,
):
    """Train inVAE and save the model directory."""
    import pandas as pd

    if threads > 0:
        torch.set_num_threads(threads)
    adata = read_h5ad(input_path)
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
        n_latent_inv=n_latent_inv,
        n_latent_spur=n_latent_spur,
        n_hidden=n_hidden,
        n_layers=n_layers,
        dropout=dropout,
        prior_mode=prior_mode,
        prior_family=prior_family,
        tc_weight=tc_weight,
        classifier_weight=classifier_weight,
        encode_covariates=encode_covariates,
        _where=input_path,
    )
    model.train(
        max_epochs=max_epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        kl_warmup_epochs=kl_warmup_epochs,
        validation_fraction=validation_fraction,
        early_stopping_patience=early_stopping_patience,
        seed=seed,
        device=device,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=checkpoint_every if checkpoint_dir else 0,
    )
    if label_key and predictor_epochs > 0 and model.registry.n_labels >= 2:
        model.train_predictor(max_epochs=predictor_epochs, irm_weight=irm_weight, seed=seed)
    write_table(pd.DataFrame(model.history), history_out, index=False)
    model.save(model_dir)
    click.echo(f"TRAIN_INVAE: saved model to {model_dir}", err=True)


if __name__ == "__main__":
    main()
