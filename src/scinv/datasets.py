"""Synthetic negative-binomial counts with cell types and batch effects (tests and benchmarks)."""

from __future__ import annotations

import os

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp


def _profiles(rng, n_genes, n_batches, n_types, batch_strength=0.5, type_strength=None, marker_fraction=0.1):
    """(type expression profiles (T, G), multiplicative batch effects (E, G))."""
    if type_strength is None:
        profiles = rng.gamma(0.3, 1.0, (n_types, n_genes))
    else:
        base = rng.gamma(0.3, 1.0, n_genes)
        markers = rng.random((n_types, n_genes)) < marker_fraction
        profiles = base * np.exp(np.where(markers, rng.normal(0.0, type_strength, (n_types, n_genes)), 0.0))
    return profiles, np.exp(rng.normal(0.0, batch_strength, (n_batches, n_genes)))


def _draw_counts(rng, types, batches, profiles, batch_fx, library_log_mean, dispersion) -> np.ndarray:
    """NB counts (cells, G) float32 for cells of the given types and batches, log-normal library sizes."""
    mu = profiles[types] * batch_fx[batches]
    mu = mu / mu.sum(1, keepdims=True) * rng.lognormal(library_log_mean, 0.3, len(types))[:, None]
    return rng.negative_binomial(dispersion, dispersion / (dispersion + mu)).astype(np.float32)


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
    profiles, batch_fx = _profiles(rng, n_genes, n_batches, n_types, batch_strength, type_strength, marker_fraction)
    counts = _draw_counts(rng, types, batches, profiles, batch_fx, library_log_mean, dispersion)
    obs = pd.DataFrame(
        {"batch": pd.Categorical([f"b{i}" for i in batches]), "cell_type": pd.Categorical([f"t{i}" for i in types])},
        index=[f"cell{i}" for i in range(n_cells)],
    )
    adata = ad.AnnData(sp.csr_matrix(counts), obs=obs)
    adata.var_names = [f"gene{i}" for i in range(n_genes)]
    adata.layers["counts"] = adata.X.copy()
    return adata


def write_synthetic_h5ad(
    path,
    n_cells: int,
    n_genes: int = 2000,
    n_batches: int = 4,
    n_types: int = 8,
    chunk_size: int = 50_000,
    seed: int = 0,
    **kwargs,
) -> None:
    """Write synthetic counts (as :func:`synthetic_counts`, raw counts in X as CSR) to an .h5ad in
    chunks of `chunk_size` cells, so that data larger than memory can be made; memory is O(chunk).

    Types, batches and their profiles are shared by all chunks (one generative model); chunk i
    draws its cells with seed + 1 + i. Reads back with `anndata.read_h5ad(path, backed="r")`.
    """
    import h5py
    from anndata.io import write_elem

    dispersion = kwargs.pop("dispersion", 5.0)
    library_log_mean = kwargs.pop("library_log_mean", 7.0)
    profile_args = {k: kwargs.pop(k) for k in ("batch_strength", "type_strength", "marker_fraction") if k in kwargs}
    if kwargs:
        raise TypeError(f"unknown arguments {sorted(kwargs)}")
    profiles, batch_fx = _profiles(np.random.default_rng(seed), n_genes, n_batches, n_types, **profile_args)

    types_all, batches_all = [], []
    tmp = f"{path}.tmp"
    with h5py.File(tmp, "w") as f:
        f.attrs["encoding-type"], f.attrs["encoding-version"] = "anndata", "0.1.0"
        X = f.create_group("X")
        X.attrs["encoding-type"], X.attrs["encoding-version"] = "csr_matrix", "0.1.0"
        X.attrs["shape"] = (n_cells, n_genes)
        data = X.create_dataset("data", (0,), dtype=np.float32, maxshape=(None,), chunks=(1 << 18,))
        indices = X.create_dataset("indices", (0,), dtype=np.int32, maxshape=(None,), chunks=(1 << 18,))
        indptr = [np.zeros(1, dtype=np.int64)]
        for i, start in enumerate(range(0, n_cells, chunk_size)):
            n = min(chunk_size, n_cells - start)
            rng = np.random.default_rng(seed + 1 + i)
            types, batches = rng.integers(0, n_types, n), rng.integers(0, n_batches, n)
            block = sp.csr_matrix(_draw_counts(rng, types, batches, profiles, batch_fx, library_log_mean, dispersion))
            old = data.shape[0]
            data.resize((old + block.nnz,))
            indices.resize((old + block.nnz,))
            data[old:], indices[old:] = block.data, block.indices
            indptr.append(block.indptr[1:].astype(np.int64) + old)
            types_all.append(types)
            batches_all.append(batches)
        X.create_dataset("indptr", data=np.concatenate(indptr))
        types, batches = np.concatenate(types_all), np.concatenate(batches_all)
        obs = pd.DataFrame(
            {"batch": pd.Categorical.from_codes(batches, [f"b{i}" for i in range(n_batches)]),
             "cell_type": pd.Categorical.from_codes(types, [f"t{i}" for i in range(n_types)])},
            index=pd.Index([f"cell{i}" for i in range(n_cells)]),
        )
        write_elem(f, "obs", obs)
        write_elem(f, "var", pd.DataFrame(index=pd.Index([f"gene{i}" for i in range(n_genes)])))
        for key in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
            write_elem(f, key, {})
    os.replace(tmp, path)
