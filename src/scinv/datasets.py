"""Synthetic negative-binomial counts with cell types and batch effects (tests and benchmarks)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp


def synthetic_counts(
    n_cells: int = 2000,
    n_genes: int = 500,
    n_batches: int = 3,
    n_types: int = 4,
    batch_strength: float = 0.5,
    type_strength: float | None = None,
    marker_fraction: float = 0.1,
    library_log_mean: float = 7.0,
    dispersion: float = 5.0,
    seed: int = 0,
) -> ad.AnnData:
    """AnnData with raw counts in X and layers['counts'], obs 'batch' (b0..) and 'cell_type' (t0..).

    By default each type has its own expression profile. With `type_strength`, types share one
    base profile and differ by log-normal factors (sd `type_strength`) on a `marker_fraction` of
    genes, which makes types harder to tell apart. Each batch multiplies genes by log-normal
    factors (sd `batch_strength`); counts are NB with the given inverse dispersion.
    """
    rng = np.random.default_rng(seed)
    types = rng.integers(0, n_types, n_cells)
    batches = rng.integers(0, n_batches, n_cells)
    if type_strength is None:
        profiles = rng.gamma(0.3, 1.0, (n_types, n_genes))
    else:
        base = rng.gamma(0.3, 1.0, n_genes)
        markers = rng.random((n_types, n_genes)) < marker_fraction
        profiles = base * np.exp(np.where(markers, rng.normal(0.0, type_strength, (n_types, n_genes)), 0.0))
    batch_fx = np.exp(rng.normal(0.0, batch_strength, (n_batches, n_genes)))
    mu = profiles[types] * batch_fx[batches]
    mu = mu / mu.sum(1, keepdims=True) * rng.lognormal(library_log_mean, 0.3, n_cells)[:, None]
    counts = rng.negative_binomial(dispersion, dispersion / (dispersion + mu)).astype(np.float32)
    obs = pd.DataFrame(
        {"batch": pd.Categorical([f"b{i}" for i in batches]), "cell_type": pd.Categorical([f"t{i}" for i in types])},
        index=[f"cell{i}" for i in range(n_cells)],
    )
    adata = ad.AnnData(sp.csr_matrix(counts), obs=obs)
    adata.var_names = [f"gene{i}" for i in range(n_genes)]
    adata.layers["counts"] = adata.X.copy()
    return adata
