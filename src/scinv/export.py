"""EXPORT: latents, predictions and UMAPs written into a copy of the training .h5ad.

The matrices are never loaded: the model reads raw counts (layers['counts']) with the file opened
backed, and the final file is a copy of the input with obs, obsm and uns replaced, so memory
is the counts plus the latents at any atlas size.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
from anndata.io import write_elem

from .io import atomic_path

log = logging.getLogger("scinv")

# UMAPs of more cells than this are fitted on a random subsample of this many cells; each other
# cell is placed at the mean of its 15 nearest fitted cells in the embedding (as ingest-style
# mapping does). Measured here: scanpy's UMAP of 100k cells took ~100 s per embedding on 2 cores.
UMAP_MAX_CELLS = 50_000
N_NEIGHBORS = 15


def umap(adata: ad.AnnData, rep: str, key: str, seed: int = 0, max_cells: int = UMAP_MAX_CELLS) -> None:
    """obsm['X_umap_<key>'] from obsm[rep]; all cells when n_obs <= max_cells (0: always all), with the
    neighbour graph in obsp['nn_<key>_*']; else fitted on `max_cells` cells and the others placed."""
    import scanpy as sc

    if not max_cells or adata.n_obs <= max_cells:
        sc.pp.neighbors(adata, use_rep=rep, n_neighbors=N_NEIGHBORS, random_state=seed, key_added=f"nn_{key}")
        sc.tl.umap(adata, neighbors_key=f"nn_{key}", random_state=seed)
        adata.obsm[f"X_umap_{key}"] = adata.obsm.pop("X_umap")
        return
    X = np.asarray(adata.obsm[rep], dtype=np.float32)
    fitted = np.sort(np.random.default_rng(seed).choice(adata.n_obs, max_cells, replace=False))
    sub = ad.AnnData(obsm={rep: X[fitted]}, shape=(len(fitted), 0))
    sc.pp.neighbors(sub, use_rep=rep, n_neighbors=N_NEIGHBORS, random_state=seed)
    sc.tl.umap(sub, random_state=seed)
    coords = np.empty((adata.n_obs, 2), dtype=np.float32)
    coords[fitted] = sub.obsm["X_umap"]
    rest = np.setdiff1d(np.arange(adata.n_obs), fitted)
    coords[rest] = sub.obsm["X_umap"][_nearest(X[fitted], X[rest], seed)].mean(axis=1)
    adata.obsm[f"X_umap_{key}"] = coords
    adata.uns[f"umap_{key}"] = {"fitted_cells": int(max_cells), "others": f"mean of the {N_NEIGHBORS} nearest fitted cells in {rep}"}
    log.info("UMAP of %s fitted on %d of %d cells; the others placed by their nearest fitted cells", rep, max_cells, adata.n_obs)


def _nearest(index: np.ndarray, queries: np.ndarray, seed: int) -> np.ndarray:
    from pynndescent import NNDescent

    nn = NNDescent(index, n_neighbors=N_NEIGHBORS, random_state=seed)
    return nn.query(queries, k=N_NEIGHBORS)[0]


def write_annotated_copy(source: str | Path, output: str | Path, adata: ad.AnnData, cellxgene: bool = False) -> None:
    """Copy the .h5ad `source` to `output` with obs, obsm, obsp and uns taken from `adata` (same cells).

    `cellxgene`: what cellxgene reads, log-normalised X and the 2-D-or-wider X_ embeddings, without
    layers and neighbour graphs. Written atomically.
    """
    obsm, obsp, uns = dict(adata.obsm), dict(adata.obsp), dict(adata.uns)
    if cellxgene:
        obsm, obsp, uns = {k: v for k, v in obsm.items() if k.startswith("X_")}, {}, {}
    with atomic_path(output) as tmp:
        shutil.copyfile(source, tmp)
        with h5py.File(tmp, "a") as f:
            for key in ("obs", "obsm", "obsp", "uns", *(("layers",) if cellxgene else ())):
                if key in f:
                    del f[key]
            write_elem(f, "obs", adata.obs)
            write_elem(f, "obsm", obsm)
            write_elem(f, "obsp", obsp)
            write_elem(f, "uns", uns)
            if cellxgene:
                write_elem(f, "layers", {})
