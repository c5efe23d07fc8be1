#!/usr/bin/env python3
"""EXPORT: latents, predicted labels and UMAPs into the final .h5ad, plus a parquet sidecar."""

import anndata as ad
import click
import numpy as np
import pandas as pd
import scanpy as sc

from scinv.cli import step
from scinv.io import read_h5ad, write_h5ad, write_table
from scinv.model import InVAE


def umap(adata, rep: str, key: str, seed: int) -> None:
    sc.pp.neighbors(adata, use_rep=rep, n_neighbors=15, random_state=seed, key_added=f"nn_{key}")
    sc.tl.umap(adata, neighbors_key=f"nn_{key}", random_state=seed)
    adata.obsm[f"X_umap_{key}"] = adata.obsm.pop("X_umap")


@click.command(context_settings={"show_default": True})
@click.option(
    "--input", "input_path", required=True, type=click.Path(exists=True), help="Normalised HVG .h5ad the model was trained on (or a query with the same genes)."
)
@click.option("--model-dir", required=True, type=click.Path(exists=True), help="Saved scinv model directory.")
@click.option("--output", required=True, type=click.Path(), help="Final .h5ad with obsm X_scinv_inv, X_scinv_spur and predictions.")
@click.option("--embeddings", required=True, type=click.Path(), help="Parquet sidecar: embeddings and predictions keyed by cell_id.")
@click.option("--umap/--no-umap", "with_umap", default=True, help="Compute UMAPs of the invariant, spurious and PCA embeddings.")
@click.option("--cellxgene", default=None, type=click.Path(), help="Also write a cellxgene-ready copy (log-normalised X, X_umap) here.")
@click.option("--seed", default=0, type=int, help="Random seed for UMAP.")
@step
def main(input_path, model_dir, output, embeddings, with_umap, cellxgene, seed):
    """Export embeddings and predictions."""
    adata = read_h5ad(input_path)
    model = InVAE.load(model_dir, device="auto")
    full = model.get_latent_representation(adata, "full")  # one pass; split into the two blocks
    n_inv = model.hparams["n_latent_inv"]
    adata.obsm["X_scinv"] = full
    adata.obsm["X_scinv_inv"], adata.obsm["X_scinv_spur"] = full[:, :n_inv], full[:, n_inv:]
    table = pd.DataFrame(adata.obsm["X_scinv_inv"], index=adata.obs_names, columns=[f"inv_{i}" for i in range(adata.obsm["X_scinv_inv"].shape[1])])
    table = table.join(
        pd.DataFrame(adata.obsm["X_scinv_spur"], index=adata.obs_names, columns=[f"spur_{i}" for i in range(adata.obsm["X_scinv_spur"].shape[1])])
    )
    if model.predictor is not None:
        labels, probs = model.predict(adata)
        adata.obs["scinv_prediction"] = pd.Categorical(labels)
        adata.obs["scinv_prediction_probability"] = probs.max(axis=1).to_numpy()
        adata.obsm["scinv_label_probabilities"] = probs.to_numpy(np.float32)
        adata.uns["scinv_label_names"] = list(probs.columns)
        table["scinv_prediction"] = labels
        table["scinv_prediction_probability"] = adata.obs["scinv_prediction_probability"].to_numpy()
    if with_umap:
        umap(adata, "X_scinv_inv", "scinv_inv", seed)
        umap(adata, "X_scinv_spur", "scinv_spur", seed)
        if "X_pca" in adata.obsm:
            umap(adata, "X_pca", "pca", seed)
        adata.obsm["X_umap"] = adata.obsm["X_umap_scinv_inv"]
    table.index.name = "cell_id"
    write_table(table, embeddings)
    write_h5ad(adata, output)
    if cellxgene:
        cx = ad.AnnData(X=adata.X, obs=adata.obs, var=adata.var[[]], obsm={k: v for k, v in adata.obsm.items() if k.startswith("X_")})
        write_h5ad(cx, cellxgene)
    click.echo(f"EXPORT: wrote {output} ({adata.n_obs} cells)", err=True)


if __name__ == "__main__":
    main()
