#!/usr/bin/env python3
"""EXPORT: latents, predicted labels and UMAPs into the final .h5ad, plus a parquet sidecar."""

import click
import numpy as np
import pandas as pd

from scinv.cli import step
from scinv.export import UMAP_MAX_CELLS, umap, write_annotated_copy
from scinv.io import read_counts_for_model, read_h5ad, write_table
from scinv.mapping import NOVEL_LABEL, place_on_reference_umap
from scinv.model import InVAE


@click.command(context_settings={"show_default": True})
@click.option(
    "--input", "input_path", required=True, type=click.Path(exists=True), help="Normalised HVG .h5ad the model was trained on (or a query with the same genes)."
)
@click.option("--model-dir", required=True, type=click.Path(exists=True), help="Saved scinv model directory.")
@click.option("--output", required=True, type=click.Path(), help="Final .h5ad with obsm X_scinv_inv, X_scinv_spur and predictions.")
@click.option("--embeddings", required=True, type=click.Path(), help="Parquet sidecar: embeddings and predictions keyed by cell_id.")
@click.option("--umap/--no-umap", "with_umap", default=True, help="Compute UMAPs of the invariant, spurious and PCA embeddings.")
@click.option("--cellxgene", default=None, type=click.Path(), help="Also write a cellxgene-ready copy (log-normalised X, X_umap) here.")
@click.option(
    "--umap-max-cells",
    default=UMAP_MAX_CELLS,
    type=int,
    help="Fit UMAPs on a random subsample of this many cells and place the others by their nearest fitted cells (0: all cells).",
)
@click.option("--seed", default=0, type=int, help="Random seed for UMAP.")
@step
def main(input_path, model_dir, output, embeddings, with_umap, cellxgene, umap_max_cells, seed):
    """Export embeddings and predictions."""
    model = InVAE.load(model_dir, device="auto")
    layer = model.registry.layer  # only the counts are read (from disk per chunk for large data)
    adata = read_counts_for_model(input_path, layer) if layer else read_h5ad(input_path, backed="r")
    full = model.get_latent_representation(adata, "full")  # one pass; split into the two blocks
    n_inv = model.hparams["n_latent_inv"]
    adata.obsm["X_scinv"] = full
    adata.obsm["X_scinv_inv"], adata.obsm["X_scinv_spur"] = full[:, :n_inv], full[:, n_inv:]
    table = pd.DataFrame(adata.obsm["X_scinv_inv"], index=adata.obs_names, columns=[f"inv_{i}" for i in range(adata.obsm["X_scinv_inv"].shape[1])])
    table = table.join(
        pd.DataFrame(adata.obsm["X_scinv_spur"], index=adata.obs_names, columns=[f"spur_{i}" for i in range(adata.obsm["X_scinv_spur"].shape[1])])
    )
    query = model.mapped_query and model.reference is not None  # a query mapped onto a trained model
    if query:  # distance to the reference sample in z_inv; above the threshold: a type the reference lacked
        novelty = model.novelty(latent=adata.obsm["X_scinv_inv"])
        adata.obs["scinv_novelty"] = novelty
        adata.obs["scinv_novel"] = novelty > model.reference.threshold
        adata.uns["scinv_novelty"] = {k: ("" if v is None else v) for k, v in model.reference.calibration.items()}
        table["scinv_novelty"] = novelty
    if model.predictor is not None:
        labels, probs = model.predict(adata)
        adata.obs["scinv_prediction_probability"] = probs.max(axis=1).to_numpy()
        adata.obs["scinv_uncertainty"] = 1.0 - adata.obs["scinv_prediction_probability"]
        adata.obsm["scinv_label_probabilities"] = probs.to_numpy(np.float32)
        adata.uns["scinv_label_names"] = list(probs.columns)
        if query:
            adata.obs["scinv_prediction_known_types"] = pd.Categorical(labels)
            labels = np.where(adata.obs["scinv_novel"].to_numpy(), NOVEL_LABEL, labels)
        adata.obs["scinv_prediction"] = pd.Categorical(labels)
        table["scinv_prediction"] = labels
        table["scinv_prediction_probability"] = adata.obs["scinv_prediction_probability"].to_numpy()
        table["scinv_uncertainty"] = adata.obs["scinv_uncertainty"].to_numpy()
    if query and model.reference.umap is not None:  # the query on the reference's UMAP (the model keeps it)
        adata.obsm["X_umap_reference"] = place_on_reference_umap(model.reference, adata.obsm["X_scinv_inv"])
    if with_umap:
        for rep, key in (("X_scinv_inv", "scinv_inv"), ("X_scinv_spur", "scinv_spur"), ("X_pca", "pca")):
            if rep in adata.obsm:
                umap(adata, rep, key, seed, umap_max_cells)
        adata.obsm["X_umap"] = adata.obsm["X_umap_scinv_inv"]
    table.index.name = "cell_id"
    write_table(table, embeddings)
    write_annotated_copy(input_path, output, adata)
    if cellxgene:  # log-normalised X only, for cellxgene
        write_annotated_copy(input_path, cellxgene, adata, cellxgene=True)
    click.echo(f"EXPORT: wrote {output} ({adata.n_obs} cells)", err=True)


if __name__ == "__main__":
    main()
