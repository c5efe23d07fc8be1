#!/usr/bin/env python3
"""METRICS: scib-metrics on scinv's latents, the unintegrated PCA and any baselines; held-out label transfer."""

import click

from scinv.cli import key_list, step
from scinv.errors import ScinvInputError
from scinv.io import read_h5ad, write_table
from scinv.metrics import PROFILES, add_baseline_embeddings, label_transfer_table, run_scib


@click.command(context_settings={"show_default": True})
@click.option("--input", "input_path", required=True, type=click.Path(exists=True), help="Final .h5ad from EXPORT.")
@click.option("--output", required=True, type=click.Path(), help="CSV: one row per embedding, raw metric scores.")
@click.option("--batch-key", default="batch", help="Batch column.")
@click.option("--label-key", required=True, help="Label column (bio conservation).")
@click.option("--unknown-label", default="Unknown", help="Cells with this label are left out.")
@click.option("--embeddings", default="X_scinv_inv,X_scinv", help="Comma list of obsm keys to score.")
@click.option("--baseline", default="X_pca", help="Unintegrated embedding (also scored, and used for PCR comparison).")
@click.option("--baseline-embeddings", default="", help="Comma list of parquet files from the baseline steps (Harmony, scVI) to score as well.")
@click.option("--heldout-batches", default="", help="Comma list of batches training never saw labels of: write label-transfer scores for them.")
@click.option("--label-transfer", "transfer_out", default=None, type=click.Path(), help="CSV for the label-transfer table (with --heldout-batches).")
@click.option("--profile", default="fast", type=click.Choice(list(PROFILES)), help="fast skips kBET, isolated labels and k-means.")
@click.option("--max-cells", default=50000, type=int, help="Stratified subsample above this many cells (0: all).")
@click.option("--n-jobs", default=2, type=int, help="Parallel jobs for neighbour search.")
@click.option("--seed", default=0, type=int, help="Random seed for subsampling.")
@step
def main(
    input_path,
    output,
    batch_key,
    label_key,
    unknown_label,
    embeddings,
    baseline,
    baseline_embeddings,
    heldout_batches,
    transfer_out,
    profile,
    max_cells,
    n_jobs,
    seed,
):
    """Score integration with scib-metrics (and label transfer to held-out batches)."""
    adata = read_h5ad(input_path, matrices=False)  # embeddings and obs only
    if not label_key:
        raise ScinvInputError("METRICS needs --label_key (bio-conservation metrics compare against labels)")
    heldout = key_list(heldout_batches)
    if heldout and not transfer_out:
        raise ScinvInputError("--heldout-batches needs --label-transfer (where to write the table)")
    keys = key_list(embeddings) + add_baseline_embeddings(adata, key_list(baseline_embeddings))
    if heldout:  # before scIB: a bad batch name should cost seconds, not minutes
        transfer = label_transfer_table(adata, keys + [baseline], batch_key, label_key, heldout, unknown_label)
    df = run_scib(adata, keys, batch_key, label_key, profile, baseline, max_cells, unknown_label, n_jobs, seed)
    if heldout and transfer is not None:
        write_table(transfer, transfer_out)
        click.echo(transfer.to_string(float_format=lambda v: f"{v:.3f}"), err=True)
    write_table(df, output)
    click.echo(df.to_string(float_format=lambda v: f"{v:.3f}"), err=True)


if __name__ == "__main__":
    main()
