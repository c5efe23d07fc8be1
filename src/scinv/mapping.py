"""Reference mapping: a query's genes aligned to a model's, and a novelty score for unseen cell types.

A trained model keeps a **reference sample** (:class:`ReferenceSample`): the invariant latents
z_inv (posterior means) of up to REFERENCE_SAMPLE_CELLS training cells with their batch and label,
a 2-D UMAP of them, and a novelty threshold. A query mapped later needs none of the reference data:

- **novelty score** of a cell: the mean Euclidean distance from its z_inv to its
  NOVELTY_NEIGHBORS nearest reference cells (the deep-kNN out-of-distribution score of Sun et al.,
  ICML 2022). A type the reference never had lands away from every known type in z_inv.
- **threshold**, learned on the reference as if it were a query: each *validation* cell (held out
  of the VAE's gradient steps, so not fitted) is scored against the reference cells of the *other*
  batches, which puts the batch shift a new query brings into the calibration. The threshold is
  the NOVELTY_QUANTILE quantile of those scores, so about 1% of query cells of known types are
  called novel when a query batch differs from the reference as much as its batches differ
  among themselves. With one reference batch the calibration cells are scored against the other
  cells of that batch (no batch shift: a lower threshold, more false calls).
  The threshold is at least TYPE_GAP_FRACTION of the distance between the two closest label
  centroids: where known types are tight clusters far apart, the held-out cells' spread is tiny
  and a new batch's small shift would otherwise be called novel (measured on synthetic data with
  distinct types: 5% of known query cells called novel at the quantile alone, 0.1% with the floor;
  on Kang PBMCs the quantile is the larger of the two).
- **UMAP placement**: a query cell sits at the mean UMAP position of its 15 nearest reference cells,
  so every query lands on the same reference layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import ScinvInputError

REFERENCE_FILE = "reference_cells.parquet"
REFERENCE_SAMPLE_CELLS = 50_000
NOVELTY_NEIGHBORS = 15
NOVELTY_QUANTILE = 0.99
TYPE_GAP_FRACTION = 0.25
NOVEL_LABEL = "unknown"
# Query genes the model has but the query lacks are zero-filled, as scvi-tools' prepare_query_anndata
# does; above this fraction the mapping stops (the encoder would read mostly invented zeros).
MAX_MISSING_GENE_FRACTION = 0.25


def align_genes(adata, genes: list[str], where: str, max_missing: float = MAX_MISSING_GENE_FRACTION):
    """`adata` with exactly `genes` as columns, in order; genes it lacks are zero columns (X and layers).

    Returns (aligned AnnData, fraction of `genes` missing). Raises ScinvInputError above `max_missing`.
    """
    import anndata as ad
    import scipy.sparse as sp

    genes = pd.Index([str(g) for g in genes])
    present = genes.isin(adata.var_names.astype(str))
    missing = float(1.0 - present.mean()) if len(genes) else 0.0
    check_missing_genes(missing, int((~present).sum()), len(genes), where, max_missing)
    if present.all():
        return adata[:, genes].copy(), missing
    select = gene_selector(adata.var_names.astype(str), genes)

    def align(X):
        return sp.csr_matrix(sp.csr_matrix(X) @ select, dtype=np.float32)

    layers = {k: align(v) for k, v in adata.layers.items()}
    aligned = ad.AnnData(align(adata.X) if adata.X is not None else None, obs=adata.obs.copy(), var=pd.DataFrame(index=genes), layers=layers)
    aligned.var["in_query"] = present
    return aligned, missing


def gene_selector(source: pd.Index, genes: pd.Index):
    """(len(source), len(genes)) 0/1 CSR matrix: X @ it picks `genes` from columns `source`, zeros where absent."""
    import scipy.sparse as sp

    cols = pd.Index(source).get_indexer(genes)
    found = np.flatnonzero(cols >= 0)
    return sp.csr_matrix((np.ones(len(found), np.float32), (cols[found], found)), shape=(len(source), len(genes)))


def check_missing_genes(missing: float, n_missing: int, n_genes: int, where: str, max_missing: float = MAX_MISSING_GENE_FRACTION) -> None:
    if missing > max_missing:
        raise ScinvInputError(
            f"{where}: {n_missing} of the model's {n_genes} genes ({missing:.0%}) are missing from the query, more than "
            f"--max_missing_genes {max_missing:g}; use counts aligned to the reference's gene annotation (same gene IDs or symbols)"
        )


@dataclass
class ReferenceSample:
    """What query mapping keeps of the reference: (n, D_inv) latents, obs (batch, label), (n, 2) UMAP."""

    latent: np.ndarray
    obs: pd.DataFrame
    umap: np.ndarray | None
    calibration: dict  # calibrate_threshold's record

    @property
    def threshold(self) -> float:
        return float(self.calibration["threshold"])

    def save(self, directory: str | Path) -> None:
        table = pd.DataFrame(self.latent, index=self.obs.index, columns=[f"inv_{i}" for i in range(self.latent.shape[1])])
        table = pd.concat([self.obs.astype(str), table], axis=1)
        if self.umap is not None:
            table["umap_1"], table["umap_2"] = self.umap[:, 0], self.umap[:, 1]
        table.index.name = "cell_id"
        table.to_parquet(Path(directory) / REFERENCE_FILE)

    @classmethod
    def load(cls, directory: str | Path, calibration: dict) -> ReferenceSample | None:
        path = Path(directory) / REFERENCE_FILE
        if not path.exists():
            return None
        table = pd.read_parquet(path)
        inv = [c for c in table.columns if c.startswith("inv_")]
        umap = table[["umap_1", "umap_2"]].to_numpy(np.float32) if "umap_1" in table else None
        obs = table[[c for c in table.columns if c not in inv and not c.startswith("umap_")]]
        return cls(table[inv].to_numpy(np.float32), obs, umap, calibration)


def knn_distances(reference: np.ndarray, query: np.ndarray, k: int = NOVELTY_NEIGHBORS) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest reference rows of each query row (faiss, Euclidean): (n, k) indices and distances."""
    import faiss

    index = faiss.IndexFlatL2(reference.shape[1])
    index.add(np.ascontiguousarray(reference, dtype=np.float32))
    dist2, idx = index.search(np.ascontiguousarray(query, dtype=np.float32), min(k, len(reference)))
    return idx, np.sqrt(np.maximum(dist2, 0.0))


def novelty_scores(reference: np.ndarray, query: np.ndarray, k: int = NOVELTY_NEIGHBORS) -> np.ndarray:
    """(n_query,) mean distance to the k nearest reference latents."""
    return knn_distances(reference, query, k)[1].mean(axis=1)


def calibrate_threshold(
    latent: np.ndarray,
    batches: np.ndarray,
    calibration_cells: np.ndarray,
    labels: np.ndarray | None = None,
    k: int = NOVELTY_NEIGHBORS,
    quantile: float = NOVELTY_QUANTILE,
) -> dict:
    """Threshold = `quantile` of the scores of `calibration_cells` (indices into latent) against the other
    batches, and at least TYPE_GAP_FRACTION of the smallest distance between two `labels`' centroids.

    Each batch counts the same (a quantile of per-cell scores weighted 1 / cells of its batch), so a
    large batch does not set the threshold alone. `labels`: (n,) strings, '' for unlabelled cells.
    """
    batches = np.asarray(batches).astype(str)
    calibration_cells = np.asarray(calibration_cells)
    names = np.unique(batches)
    scores, weights = [], []
    for b in names:
        cells = calibration_cells[batches[calibration_cells] == b]
        if len(cells) == 0:
            continue
        if len(names) > 1:
            others = np.flatnonzero(batches != b)
            s = novelty_scores(latent[others], latent[cells], k)
        else:  # one batch: the other cells of the batch (drop each cell's own zero distance)
            s = knn_distances(latent, latent[cells], k + 1)[1][:, 1:].mean(axis=1)
        scores.append(s)
        weights.append(np.full(len(s), 1.0 / len(s)))
    if not scores:
        raise ScinvInputError("no reference cells to calibrate the novelty threshold on")
    scores, weights = np.concatenate(scores), np.concatenate(weights)
    order = np.argsort(scores)
    cumulative = np.cumsum(weights[order]) / weights.sum()
    by_quantile = float(scores[order][np.searchsorted(cumulative, quantile)] if cumulative[-1] >= quantile else scores.max())
    type_gap = smallest_centroid_gap(latent, labels) if labels is not None else None
    return {
        "threshold": max(by_quantile, TYPE_GAP_FRACTION * type_gap) if type_gap else by_quantile,
        "threshold_by_quantile": by_quantile,
        "smallest_type_gap": type_gap,
        "type_gap_fraction": TYPE_GAP_FRACTION,
        "quantile": quantile,
        "neighbors": k,
        "calibration_cells": int(len(scores)),
        "across_batches": bool(len(names) > 1),
        "median_score": float(np.median(scores)),
    }


def smallest_centroid_gap(latent: np.ndarray, labels: np.ndarray) -> float | None:
    """Distance between the two closest label centroids (labels '' ignored); None with fewer than two labels."""
    labels = np.asarray(labels).astype(str)
    names = [c for c in np.unique(labels) if c]
    if len(names) < 2:
        return None
    centroids = np.stack([latent[labels == c].mean(axis=0) for c in names])
    gaps = np.linalg.norm(centroids[:, None] - centroids[None], axis=-1)
    return float(gaps[np.triu_indices(len(names), 1)].min())


def place_on_reference_umap(reference: ReferenceSample, query_latent: np.ndarray) -> np.ndarray:
    """(n_query, 2): each query cell at the mean UMAP position of its nearest reference cells."""
    if reference.umap is None:
        raise ScinvInputError("the model's reference sample has no UMAP")
    from .export import N_NEIGHBORS

    idx, _ = knn_distances(reference.latent, query_latent, N_NEIGHBORS)
    return reference.umap[idx].mean(axis=1)


def reference_umap(latent: np.ndarray, seed: int = 0) -> np.ndarray:
    """(n, 2) UMAP of the reference latents, fitted on all of them as EXPORT fits its UMAPs."""
    import anndata as ad

    from .export import umap

    sub = ad.AnnData(obsm={"X": np.asarray(latent, np.float32)}, shape=(len(latent), 0))
    umap(sub, "X", "reference", seed, max_cells=0)
    return sub.obsm["X_umap_reference"].astype(np.float32)
