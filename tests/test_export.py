"""EXPORT at atlas scale: UMAPs fitted on a subsample place every other cell beside its neighbours."""

import anndata as ad
import numpy as np

from scinv.export import umap


def test_umap_on_a_subsample_places_the_other_cells_with_their_neighbours():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 10, (3, 8))
    groups = np.repeat(np.arange(3), 200)
    adata = ad.AnnData(obsm={"X_rep": (centres[groups] + rng.normal(0, 1, (600, 8))).astype(np.float32)}, shape=(600, 0))
    umap(adata, "X_rep", "rep", seed=0, max_cells=150)
    coords = adata.obsm["X_umap_rep"]
    assert coords.shape == (600, 2) and np.isfinite(coords).all()
    assert adata.uns["umap_rep"]["fitted_cells"] == 150
    # each well-separated group stays together: every cell is nearer its own group's centre
    means = np.stack([coords[groups == g].mean(0) for g in range(3)])
    nearest = np.argmin(((coords[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    assert (nearest == groups).mean() > 0.99


def test_umap_of_few_cells_uses_them_all_and_keeps_the_graph():
    rng = np.random.default_rng(1)
    adata = ad.AnnData(obsm={"X_rep": rng.normal(size=(120, 5)).astype(np.float32)}, shape=(120, 0))
    umap(adata, "X_rep", "rep", seed=0, max_cells=150)
    assert adata.obsm["X_umap_rep"].shape == (120, 2) and "nn_rep_connectivities" in adata.obsp and "umap_rep" not in adata.uns
