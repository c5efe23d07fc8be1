"""Synthetic negative-binomial counts with cell types and batch effects (tests and benchmarks)."""

from __future__ import annotations

import os
from pathlib import Path

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
            {
                "batch": pd.Categorical.from_codes(batches, [f"b{i}" for i in range(n_batches)]),
                "cell_type": pd.Categorical.from_codes(types, [f"t{i}" for i in range(n_types)]),
            },
            index=pd.Index([f"cell{i}" for i in range(n_cells)]),
        )
        write_elem(f, "obs", obs)
        write_elem(f, "var", pd.DataFrame(index=pd.Index([f"gene{i}" for i in range(n_genes)])))
        for key in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
            write_elem(f, key, {})
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Cell Ranger output layouts, written from an AnnData (tests, benchmarks, format conversion)


def _gene_ids(adata: ad.AnnData) -> np.ndarray:
    if "gene_ids" in adata.var:
        return adata.var["gene_ids"].astype(str).to_numpy()
    return np.array([f"ENSG{i:011d}" for i in range(adata.n_vars)])


def write_10x_h5(adata: ad.AnnData, path, version: int = 3, genome: str = "GRCh38") -> None:
    """Write X (integer counts) as a Cell Ranger `filtered_feature_bc_matrix.h5`.

    version 3 (Cell Ranger >= 3): group `matrix` with `features/{id,name,feature_type,genome}`;
    version 2: one group per genome with `genes`, `gene_names`. var_names are the gene names,
    var['gene_ids'] (or made-up Ensembl ids) the ids. Counts are stored as CSC over cells, int32.
    """
    import h5py

    X = sp.csc_matrix(adata.X.T, dtype=np.int32)  # genes x cells, i.e. CSC over cells
    names = np.asarray(adata.var_names.astype(str), dtype="S")
    ids = np.asarray(_gene_ids(adata), dtype="S")
    with h5py.File(path, "w") as f:
        group = f.create_group("matrix" if version == 3 else genome)
        group.create_dataset("data", data=X.data, compression="gzip")
        group.create_dataset("indices", data=X.indices.astype(np.int64), compression="gzip")
        group.create_dataset("indptr", data=X.indptr.astype(np.int64))
        group.create_dataset("shape", data=np.array(X.shape, dtype=np.int32))
        group.create_dataset("barcodes", data=np.asarray(adata.obs_names.astype(str), dtype="S"))
        if version == 3:
            f.attrs["filetype"], f.attrs["version"] = "matrix", 2
            feats = group.create_group("features")
            feats.create_dataset("id", data=ids)
            feats.create_dataset("name", data=names)
            feats.create_dataset("feature_type", data=np.full(adata.n_vars, b"Gene Expression"))
            feats.create_dataset("genome", data=np.full(adata.n_vars, genome.encode()))
            feats.create_dataset("_all_tag_keys", data=np.array([b"genome"]))
        else:
            group.create_dataset("genes", data=ids)
            group.create_dataset("gene_names", data=names)


def write_10x_mtx(adata: ad.AnnData, folder, version: int = 3) -> None:
    """Write X as a Cell Ranger MTX folder: v3 `matrix.mtx.gz`, `features.tsv.gz` (id, name,
    'Gene Expression'), `barcodes.tsv.gz`; v2 uncompressed `matrix.mtx`, `genes.tsv` (id, name),
    `barcodes.tsv`."""
    import gzip

    import scipy.io

    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    gz = version == 3
    opener = (lambda p: gzip.open(p, "wb")) if gz else (lambda p: open(p, "wb"))
    ext = ".gz" if gz else ""
    with opener(os.path.join(folder, f"matrix.mtx{ext}")) as fh:
        scipy.io.mmwrite(fh, sp.coo_matrix(sp.csr_matrix(adata.X).T.astype(np.int64)), field="integer")
    genes = pd.DataFrame({"id": _gene_ids(adata), "name": adata.var_names.astype(str)})
    if version == 3:
        genes["type"] = "Gene Expression"
    genes.to_csv(os.path.join(folder, f"{'features' if version == 3 else 'genes'}.tsv{ext}"), sep="\t", header=False, index=False)
    pd.Series(adata.obs_names.astype(str)).to_csv(os.path.join(folder, f"barcodes.tsv{ext}"), header=False, index=False)


# The input layouts users have, by name: Cell Ranger outputs and .h5ad exports.
INPUT_KINDS = {
    "mtx_v3": "Cell Ranger >= 3 folder: matrix.mtx.gz, features.tsv.gz, barcodes.tsv.gz",
    "mtx_v2": "Cell Ranger 2 folder: matrix.mtx, genes.tsv, barcodes.tsv",
    "h5_v3": "Cell Ranger >= 3 filtered_feature_bc_matrix.h5",
    "h5_v2": "Cell Ranger 2 filtered_gene_bc_matrices_h5.h5 (one group per genome)",
    "plain": ".h5ad with CSR counts in X",
    "csc_uint16": ".h5ad with CSC uint16 counts in X",
    "dense_float64": ".h5ad with dense float64 counts in X",
    "int64_in_counts_layer": ".h5ad with int64 counts in layers['counts'], log-normalised X (scanpy convention)",
    "raw_only": ".h5ad with scaled values of half the genes in X, counts of all genes in .raw.X",
    "normalised_only": ".h5ad without counts anywhere (log-normalised X): must be refused",
}


def _write_h5ad_variant(adata: ad.AnnData, path, kind: str) -> None:
    """Write `adata` (integer counts in X) as one of the .h5ad layouts users have (see INPUT_KINDS)."""
    import scanpy as sc

    out = adata.copy()
    if kind == "csc_uint16":
        out.X = sp.csc_matrix(out.X.astype(np.uint16))
    elif kind == "dense_float64":
        out.X = out.X.toarray().astype(np.float64)
    elif kind == "int64_in_counts_layer":  # scanpy convention: counts in a layer, X log-normalised
        out.layers["counts"] = sp.csr_matrix(out.X.astype(np.int64))
        sc.pp.normalize_total(out, target_sum=1e4)
        sc.pp.log1p(out)
    elif kind == "raw_only":  # an older scanpy/Seurat export: X scaled HVGs, counts of all genes in .raw
        out.raw = out.copy()
        sc.pp.normalize_total(out, target_sum=1e4)
        sc.pp.log1p(out)
        out = out[:, : out.n_vars // 2].copy()
        out.X = out.X.toarray() - 0.5  # scaled values: negative, not counts
    elif kind == "normalised_only":  # no counts anywhere: must be refused
        sc.pp.normalize_total(out, target_sum=1e4)
        sc.pp.log1p(out)
    elif kind != "plain":
        raise ValueError(kind)
    out.write_h5ad(path)


def write_input(adata: ad.AnnData, folder, kind: str) -> Path:
    """Write one sample (integer counts in X) as one of INPUT_KINDS in `folder`; returns the path a
    samplesheet names (a Cell Ranger folder or file, or an .h5ad)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if kind in ("mtx_v2", "mtx_v3"):
        target = folder / "filtered_feature_bc_matrix"
        write_10x_mtx(adata, target, version=int(kind[-1]))
        return target
    if kind in ("h5_v2", "h5_v3"):
        target = folder / "filtered_feature_bc_matrix.h5"
        write_10x_h5(adata, target, version=int(kind[-1]))
        return target
    target = folder / f"{kind}.h5ad"
    _write_h5ad_variant(adata, target, kind)
    return target
