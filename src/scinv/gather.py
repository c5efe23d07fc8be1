"""NORMALIZE at atlas scale: per-sample QC files in, one HVG .h5ad out, one sample in memory at a time.

The all-gene matrix of the atlas never sits in one process:

1. obs and var of every sample (no matrices): QC tables, the checks on kept cells, and the genes
   kept (present in every sample, detected in >= min_cells_per_gene kept cells overall);
2. HVGs by map-reduce: seurat_v3's per-batch statistic is computed one batch at a time
   (:func:`batch_hvg_statistics`) and the batches' ranks are combined as scanpy combines them
   (:func:`combine_hvg_statistics`); it selects the same genes as
   ``sc.pp.highly_variable_genes(flavor='seurat_v3', batch_key=...)`` on the merged data;
3. each sample normalised (normalize_total over the kept genes, log1p), subset to the HVGs and
   written as a piece; the pieces are concatenated on disk (:func:`anndata.experimental.concat_on_disk`);
4. PCA fitted on at most PCA_FIT_CELLS cells (all cells below that, as before) and applied to all
   cells in chunks.

Memory is bounded by the largest batch (step 2) or sample (steps 1, 3) plus the HVG matrix of at
most PCA_FIT_CELLS cells. Other HVG flavours, and data where seurat_v3 cannot be fitted batch by
batch, fall back to :func:`scinv.preprocess.select_hvgs` on the merged kept genes (in memory).
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.io import read_elem, write_elem

from .errors import ScinvInputError, first_line
from .io import atomic_path
from .mapping import MAX_MISSING_GENE_FRACTION, check_missing_genes, gene_selector
from .preprocess import MIN_HVG_BATCH_CELLS, MIN_HVG_VARYING_GENES, SEURAT_V3_SPANS, _n_varying_genes, check_kept_cells, qc_table, select_hvgs

log = logging.getLogger("scinv")

# PCA is fitted on a random subsample of this many cells (all cells when fewer: results as
# in-memory scanpy) and applied to every cell in chunks; 200k cells x 2k HVGs fit in ~2 GB.
PCA_FIT_CELLS = 200_000
CHUNK_CELLS = 50_000
QC_METRICS = ("n_genes_by_counts", "total_counts", "pct_counts_mt", "pct_counts_ribo", "doublet_score", "qc_reason")


@dataclass
class SampleFile:
    """One QC'd sample on disk: every input cell with its verdict in obs, raw counts in X."""

    path: Path
    obs: pd.DataFrame
    var: pd.DataFrame

    @classmethod
    def open(cls, path: str | Path) -> SampleFile:
        if not h5py.is_hdf5(path):
            raise ScinvInputError(f"{path}: not an .h5ad file; pass the per-sample files written by QC")
        with h5py.File(path, "r") as f:
            sample = cls(Path(path), read_elem(f["obs"]), read_elem(f["var"]))
        if "qc_reason" not in sample.obs or "n_cells_kept" not in sample.var:
            raise ScinvInputError(f"{path}: not a QC output (obs['qc_reason'] or var['n_cells_kept'] missing); pass the per-sample files written by QC")
        return sample

    @property
    def kept(self) -> np.ndarray:
        return self.obs["qc_reason"].astype(str).to_numpy() == "kept"

    def counts(self, genes: pd.Index, cells: np.ndarray | None = None) -> ad.AnnData:
        """Kept cells (or `cells` among them) x `genes`: raw counts in X, obs of those cells."""
        adata = ad.read_h5ad(self.path)
        rows = np.flatnonzero(self.kept if cells is None else self.kept & cells)
        # index the matrix, not the AnnData: a view keeps its parent in a reference cycle, so each
        # sample's full matrix stayed until the cyclic GC ran (NORMALIZE at 1M cells: +3.3 GB, measured)
        X = sp.csr_matrix(adata.X, dtype=np.float32)[rows][:, adata.var_names.get_indexer(genes)]
        return ad.AnnData(X, obs=adata.obs.iloc[rows].copy(), var=pd.DataFrame(index=genes))


def gather(
    files: list[str],
    output: str,
    batch_key: str = "batch",
    n_top_genes: int = 2000,
    flavor: str = "seurat_v3",
    target_sum: float = 1e4,
    n_pcs: int = 50,
    min_cells_per_gene: int = 3,
    seed: int = 0,
    reference_genes: list[str] | None = None,
    max_missing_genes: float = MAX_MISSING_GENE_FRACTION,
) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Merge per-sample QC files into the training .h5ad (see the module docstring).

    Writes `output` with the HVG subset: raw counts in layers['counts'], log-normalised X, PCA in
    obsm['X_pca'], what the HVG step did in uns['scinv_normalize']. Returns (QC summary per
    sample, QC metrics of every input cell, uns['scinv_normalize']).

    With `reference_genes` (a trained model's genes, for query mapping) no genes are selected: each
    sample is normalised over its own genes and laid out on `reference_genes`, the ones it lacks
    zero-filled (a sample lacking more than `max_missing_genes` of them stops the run), and no
    PCA is fitted.
    """
    samples = [SampleFile.open(f) for f in files]
    obs = pd.concat([s.obs for s in samples])
    summary = qc_table(obs)
    check_kept_cells(obs, batch_key, summary)
    cells = obs[[c for c in dict.fromkeys(["sample", batch_key, *QC_METRICS]) if c in obs]].astype({"qc_reason": str})
    samples = [s for s in samples if s.kept.any()]
    categories = _shared_categories(samples)
    if reference_genes is not None:
        hvgs = pd.Index([str(g) for g in reference_genes])
        var, record = _query_genes(samples, hvgs, max_missing_genes)
        record = {"n_top_genes": len(hvgs), "flavor": "reference", "batch_key": batch_key, "target_sum": float(target_sum), "hvg": record}
        gene_sets = [s.var.index for s in samples]  # each sample normalised over its own genes
    else:
        genes = kept_genes(samples, min_cells_per_gene)
        n_top_genes = min(n_top_genes, len(genes))
        var, record = highly_variable_genes(samples, genes, batch_key, n_top_genes, flavor, target_sum)
        hvgs = var.index[var["highly_variable"].to_numpy(bool)]
        record = {"n_top_genes": int(n_top_genes), "flavor": flavor, "batch_key": batch_key, "target_sum": float(target_sum), "hvg": record}
        gene_sets = [genes] * len(samples)
    with atomic_path(output) as final, tempfile.TemporaryDirectory(dir=Path(output).resolve().parent) as tmp:
        paths = [_write_piece(s, g, hvgs, target_sum, categories, Path(tmp) / f"{i}.h5ad") for i, (s, g) in enumerate(zip(samples, gene_sets))]
        merged = Path(tmp) / "merged.h5ad"  # the suffix tells concat_on_disk to write HDF5
        ad.experimental.concat_on_disk(paths, merged, join="inner", merge="same")
        with h5py.File(merged, "a") as f:
            _replace(f, "var", var.loc[hvgs])
            uns = {"scinv_normalize": {**record, "hvg": {k: ("" if v is None else v) for k, v in record["hvg"].items()}}}
            if reference_genes is None:
                pca = fit_pca(f, n_pcs, seed)
                _replace(f, "obsm", {"X_pca": pca.pop("X_pca")})
                _replace(f, "varm", {"PCs": pca.pop("PCs")})
                uns["pca"] = pca
            _replace(f, "uns", uns)
        os.replace(merged, final)
    return summary, cells, record


def _query_genes(samples: list[SampleFile], genes: pd.Index, max_missing: float) -> tuple[pd.DataFrame, dict]:
    """var on the model's genes (fraction of samples having each) and the missing genes per sample; stops above `max_missing`."""
    has = np.stack([genes.isin(s.var.index) for s in samples])
    names = [str(s.obs["sample"].iloc[0]) if "sample" in s.obs else s.path.name for s in samples]
    for name, row, s in zip(names, has, samples):
        check_missing_genes(1.0 - row.mean(), int((~row).sum()), len(genes), f"sample '{name}' ({s.path.name})", max_missing)
    missing = {name: int((~row).sum()) for name, row in zip(names, has)}
    if any(missing.values()):
        log.warning("genes of the model missing from the query, zero-filled: %s", ", ".join(f"{n}: {m}" for n, m in missing.items() if m))
    var = pd.DataFrame({"fraction_of_samples_with_gene": has.mean(axis=0)}, index=genes)
    return var, {"flavor": "reference", "missing_genes_per_sample": missing, "max_missing_fraction": float(1.0 - has.mean(axis=1).min())}


def _replace(f: h5py.File, key: str, value) -> None:
    if key in f:
        del f[key]
    write_elem(f, key, value)


def kept_genes(samples: list[SampleFile], min_cells_per_gene: int) -> pd.Index:
    """Genes present in every sample (first sample's order) detected in >= min_cells_per_gene kept cells."""
    genes = samples[0].var.index
    for s in samples[1:]:
        genes = genes[genes.isin(s.var.index)]
    if len(genes) == 0:
        raise ScinvInputError("the samples share no gene names; use files aligned to the same reference")
    detected = sum(s.var["n_cells_kept"].reindex(genes).to_numpy(np.int64) for s in samples)
    keep = genes[detected >= min_cells_per_gene]
    if len(keep) == 0:
        raise ScinvInputError(f"QC removed all {len(genes)} genes; lower min_cells_per_gene")
    return keep


def _shared_categories(samples: list[SampleFile]) -> dict[str, list[str]]:
    """obs columns categorical in some sample, with the union of their categories (so that pieces concatenate as categories)."""
    cats: dict[str, set] = {}
    for s in samples:
        for col in s.obs.columns:
            if isinstance(s.obs[col].dtype, pd.CategoricalDtype):
                cats.setdefault(col, set()).update(map(str, s.obs[col].cat.categories))
    return {col: sorted(values) for col, values in cats.items()}


def _write_piece(sample: SampleFile, genes: pd.Index, hvgs: pd.Index, target_sum: float, categories: dict, path: Path) -> Path:
    import scanpy as sc

    adata = sample.counts(genes)
    counts = adata.X.copy()  # normalize_total and log1p work in place
    sc.pp.normalize_total(adata, target_sum=target_sum)  # size factors over all kept genes, as before
    sc.pp.log1p(adata)
    columns = genes.get_indexer(hvgs)
    if (columns >= 0).all():
        X, counts = adata.X[:, columns], counts[:, columns]
    else:  # query mapping: the model's genes this sample lacks are zero columns
        select = gene_selector(genes, hvgs)
        X, counts = sp.csr_matrix(adata.X @ select), sp.csr_matrix(counts @ select)
    piece = ad.AnnData(X=X, obs=adata.obs, var=pd.DataFrame(index=hvgs), layers={"counts": counts})
    for col, cats in categories.items():
        if col in piece.obs:
            piece.obs[col] = pd.Categorical(piece.obs[col].astype(str), categories=cats)
    piece.write_h5ad(path)
    return path


# ---------------------------------------------------------------------------------------------
# HVGs by map-reduce


def highly_variable_genes(
    samples: list[SampleFile], genes: pd.Index, batch_key: str, n_top_genes: int, flavor: str, target_sum: float
) -> tuple[pd.DataFrame, dict]:
    """var of the kept genes with 'highly_variable' and the statistics of the method; what was done."""
    if n_top_genes >= len(genes):
        log.info("n_top_genes %d >= %d genes: keeping all genes", n_top_genes, len(genes))
        return pd.DataFrame({"highly_variable": True}, index=genes), {"requested": flavor, "flavor": "all genes", "span": None, "fallback": ""}
    if flavor == "seurat_v3":
        try:
            return _seurat_v3_by_batch(samples, genes, batch_key, n_top_genes)
        except _CannotStream as why:
            log.warning("HVG: %s; selecting on the merged kept genes in memory", why)
    return _in_memory(samples, genes, batch_key, n_top_genes, flavor, target_sum)


class _CannotStream(Exception):
    pass


def batch_hvg_statistics(counts: sp.csr_matrix, n_top_genes: int) -> tuple[np.ndarray, float]:
    """seurat_v3's normalised variance of every gene in one batch (raw counts, cells x genes) and
    the loess span that fitted (scanpy's own function, so the numbers are scanpy's)."""
    from scanpy.preprocessing._highly_variable_genes import _highly_variable_genes_seurat_v3

    batch = ad.AnnData(counts)
    failures = []
    for span in SEURAT_V3_SPANS:
        try:
            df = _highly_variable_genes_seurat_v3(batch, flavor="seurat_v3", n_top_genes=n_top_genes, check_values=False, span=span, inplace=False)
            return df["variances_norm"].to_numpy(np.float64), span
        except (ValueError, np.linalg.LinAlgError) as err:
            failures.append(f"span {span}: {first_line(err)}")
    raise _CannotStream(f"seurat_v3 loess failed in a batch ({'; '.join(failures)})")


def combine_hvg_statistics(genes: pd.Index, norm_vars: np.ndarray, n_top_genes: int) -> pd.DataFrame:
    """Batches' normalised variances (n_batches, n_genes) -> var with the HVGs, as scanpy's seurat_v3."""
    ranks = np.argsort(np.argsort(-norm_vars, axis=1), axis=1).astype(np.float32)
    n_batches_hv = np.sum((ranks < n_top_genes).astype(int), axis=0)
    ranks[ranks >= n_top_genes] = np.nan
    median_rank = np.ma.median(np.ma.masked_invalid(ranks), axis=0).filled(np.nan)
    df = pd.DataFrame(
        {"highly_variable_nbatches": n_batches_hv, "highly_variable_rank": median_rank, "variances_norm": np.mean(norm_vars, axis=0)}, index=genes
    )
    order = df.sort_values(["highly_variable_rank", "highly_variable_nbatches"], ascending=[True, False], na_position="last").index
    df["highly_variable"] = False
    df.loc[order[:n_top_genes], "highly_variable"] = True
    return df


def _seurat_v3_by_batch(samples: list[SampleFile], genes: pd.Index, batch_key: str, n_top_genes: int) -> tuple[pd.DataFrame, dict]:
    per_sample_batches = [s.obs.loc[s.kept, batch_key].astype(str) for s in samples]
    batches = sorted(set().union(*(set(b) for b in per_sample_batches)))
    norm_vars, spans, voters, left_out = [], [], [], []
    total, total_sq, n = np.zeros(len(genes)), np.zeros(len(genes)), 0
    for b in batches:
        parts = [s.counts(genes, (s.obs[batch_key].astype(str) == b).to_numpy()) for s, sb in zip(samples, per_sample_batches) if (sb == b).any()]
        counts = sp.vstack([p.X for p in parts], format="csr")
        if counts.shape[0] < MIN_HVG_BATCH_CELLS or _n_varying_genes(counts) < MIN_HVG_VARYING_GENES:
            left_out.append(b)
            continue
        nv, span = batch_hvg_statistics(counts, n_top_genes)
        norm_vars.append(nv)
        spans.append(span)
        voters.append(b)
        total += np.asarray(counts.sum(0), dtype=np.float64).ravel()
        total_sq += np.asarray(counts.multiply(counts).sum(0), dtype=np.float64).ravel()
        n += counts.shape[0]
    if not voters:
        raise _CannotStream(f"no batch has {MIN_HVG_BATCH_CELLS} cells and {MIN_HVG_VARYING_GENES} varying genes")
    var = combine_hvg_statistics(genes, np.vstack(norm_vars), n_top_genes)
    var.insert(0, "means", total / n)
    var.insert(1, "variances", (total_sq - n * (total / n) ** 2) / max(n - 1, 1))
    record = {"requested": "seurat_v3", "flavor": "seurat_v3", "span": max(spans), "fallback": ""}
    notes = []
    if left_out:
        notes.append(f"batches {left_out} too small to vote on HVGs (< {MIN_HVG_BATCH_CELLS} cells or < {MIN_HVG_VARYING_GENES} varying genes)")
    wider = [b for b, span in zip(voters, spans) if span != SEURAT_V3_SPANS[0]]
    if wider:
        notes.append(f"seurat_v3 loess failed with span {SEURAT_V3_SPANS[0]} in batch(es) {wider}; fitted with span {max(spans)}")
    if notes:
        record["fallback"] = "; ".join(notes)
        log.warning("HVG: %s", record["fallback"])
    return var, record


def _in_memory(samples: list[SampleFile], genes: pd.Index, batch_key: str, n_top_genes: int, flavor: str, target_sum: float) -> tuple[pd.DataFrame, dict]:
    """scinv.preprocess.select_hvgs on the merged kept genes: every flavour and fallback, memory ~ the atlas."""
    import scanpy as sc

    merged = ad.concat([s.counts(genes) for s in samples], merge="same")
    for col in merged.obs.columns:
        if merged.obs[col].dtype == object:
            merged.obs[col] = merged.obs[col].astype(str)
    merged.layers["counts"] = merged.X.copy()
    sc.pp.normalize_total(merged, target_sum=target_sum)
    sc.pp.log1p(merged)
    bk = batch_key if merged.obs[batch_key].nunique() > 1 else None
    record = select_hvgs(merged, n_top_genes, bk, flavor)
    return merged.var.copy(), record


# ---------------------------------------------------------------------------------------------
# PCA


def fit_pca(f: h5py.File, n_pcs: int, seed: int) -> dict:
    """PCA of the log-normalised HVG X in the open file: scanpy's, fitted on at most PCA_FIT_CELLS
    random cells and applied to all cells in chunks. Returns X_pca, PCs, variance, variance_ratio."""
    import scanpy as sc
    from anndata.io import sparse_dataset

    X = sparse_dataset(f["X"])
    n_obs, n_vars = X.shape
    fit_cells = np.arange(n_obs) if n_obs <= PCA_FIT_CELLS else np.sort(np.random.default_rng(seed).choice(n_obs, PCA_FIT_CELLS, replace=False))
    sub = ad.AnnData(X[fit_cells] if len(fit_cells) < n_obs else X[:])
    n_comps = max(2, min(n_pcs, sub.n_obs - 1, n_vars - 1))
    sc.pp.pca(sub, n_comps=n_comps, random_state=seed)
    out = {"PCs": sub.varm["PCs"], "variance": sub.uns["pca"]["variance"], "variance_ratio": sub.uns["pca"]["variance_ratio"]}
    if len(fit_cells) == n_obs:
        out["X_pca"] = sub.obsm["X_pca"]
        return out
    log.info("PCA fitted on %d of %d cells (PCA_FIT_CELLS) and applied to all", len(fit_cells), n_obs)
    mean = np.asarray(sub.X.mean(0)).ravel()
    components = sub.varm["PCs"]
    out["X_pca"] = np.vstack([np.asarray(X[i : i + CHUNK_CELLS] @ components) - mean @ components for i in range(0, n_obs, CHUNK_CELLS)]).astype(np.float32)
    return out
