#!/usr/bin/env python3
"""CHECK_INPUT: validate the samplesheet (or .h5ad) and its files; merge into one AnnData."""

import click

from scinv.cli import key_list, step
from scinv.errors import ScinvInputError
from scinv.io import write_h5ad
from scinv.preprocess import check_obs_keys, load_input, prepare_covariates


@click.command(context_settings={"show_default": True})
@click.option(
    "--input", "input_path", required=True, type=click.Path(), help="Samplesheet CSV (sample,path[,batch][,extra obs columns]) or an .h5ad with raw counts."
)
@click.option("--output", required=True, type=click.Path(), help="Merged .h5ad to write (raw counts in X and layers['counts']).")
@click.option("--batch-key", default="batch", help="obs column with the batch of each cell.")
@click.option("--label-key", default="", help="obs column with cell labels (optional); must exist after merging.")
@click.option("--obs-keys", default="", help="Comma list of further obs columns that must exist (invariant/spurious covariates).")
@click.option("--annotations", default=None, type=click.Path(), help="Optional CSV with a cell_id column (<sample>_<barcode>) whose other columns join obs.")
@click.option("--unknown-label", default="Unknown", help="Value given to cells without an annotation.")
@click.option("--shown-as", default=None, help="--input as the user wrote it (path or URL); messages name it instead of the staged copy.")
@click.option(
    "--staged-dir",
    default=None,
    type=click.Path(),
    help="Folder where Nextflow staged the samplesheet's files as <row>/<name> (preferred over the paths as written).",
)
@step
def main(input_path, output, batch_key, label_key, obs_keys, annotations, unknown_label, shown_as, staged_dir):
    """Validate inputs and write one AnnData with raw counts."""
    adata = load_input(input_path, batch_key=batch_key, annotations=annotations, unknown_label=unknown_label, staged_dir=staged_dir, shown_as=shown_as)
    where = shown_as or input_path
    check_obs_keys(adata, [batch_key, label_key, *key_list(obs_keys)], where)
    prepare_covariates(adata, batch_key, label_key, unknown_label, where)
    n_batches = adata.obs[batch_key].nunique()
    if n_batches < 2:  # refused here, in seconds, rather than by METRICS/baselines after training
        raise ScinvInputError(
            f"{where}: only one batch in column '{batch_key}'; integration needs two or more. "
            "Set --batch_key to a column with several values, or add samples from other batches"
        )
    write_h5ad(adata, output)
    click.echo(f"CHECK_INPUT: {adata.n_obs} cells x {adata.n_vars} genes from {adata.obs['sample'].nunique()} sample(s), {n_batches} batch(es)", err=True)


if __name__ == "__main__":
    main()
