#!/usr/bin/env python3
"""CHECK_INPUT: validate the samplesheet (or split one .h5ad by sample) into one row per sample."""

import click

from scinv.cli import key_list, step
from scinv.io import write_table
from scinv.preprocess import validate_input


@click.command(context_settings={"show_default": True})
@click.option(
    "--input", "input_path", required=True, type=click.Path(), help="Samplesheet CSV (sample,path[,batch][,extra obs columns]) or an .h5ad with raw counts."
)
@click.option("--output", required=True, type=click.Path(), help="Validated samplesheet CSV: one row per sample for the per-sample steps.")
@click.option("--split-dir", default="samples", type=click.Path(), help="Where an .h5ad input is split into one .h5ad per sample.")
@click.option("--batch-key", default="batch", help="obs column with the batch of each cell.")
@click.option("--label-key", default="", help="obs column with cell labels (optional); must exist.")
@click.option("--obs-keys", default="", help="Comma list of further obs columns that must exist (invariant/spurious covariates).")
@click.option("--annotations", default=None, type=click.Path(), help="Optional CSV with a cell_id column (<sample>_<barcode>) whose other columns join obs.")
@click.option("--unknown-label", default="Unknown", help="Value given to cells without an annotation.")
@click.option(
    "--check-files/--no-check-files",
    default=True,
    help="Check that the samplesheet's files exist (the pipeline checks them before it starts, where they are visible).",
)
@click.option("--shown-as", default=None, help="--input as the user wrote it (path or URL); messages name it instead of the staged copy.")
@click.option("--heldout-batches", default="", help="Comma list of batches whose labels training will hide: each must be a batch of the input.")
@click.option("--min-batches", default=2, type=int, help="Batches the input needs: 2 to integrate, 1 for a query mapped onto a trained model.")
@step
def main(input_path, output, split_dir, batch_key, label_key, obs_keys, annotations, unknown_label, check_files, shown_as, min_batches, heldout_batches):
    """Validate inputs; count matrices are read per sample by QC."""
    keys, heldout = key_list(obs_keys), key_list(heldout_batches)
    sheet = validate_input(input_path, batch_key, keys, annotations, label_key, unknown_label, shown_as, split_dir, check_files, min_batches, heldout)
    write_table(sheet, output, index=False)
    click.echo(f"CHECK_INPUT: {len(sheet)} sample(s), {sheet[batch_key].nunique()} batch(es)", err=True)


if __name__ == "__main__":
    main()
