"""Real-world input shapes for the pipeline's shape matrix (tests/test_shapes.py).

Each builder writes files the way users get them (Cell Ranger folders and .h5, .h5ad exports from
scanpy/Seurat/CELLxGENE) from synthetic NB counts with realistic gene names, and returns what the
pipeline should make of them.
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from scinv.datasets import INPUT_KINDS, synthetic_counts, write_input  # noqa: F401 (re-exported for the tests)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
LOESS_FAILURE_CSV = SHARED / "seurat_v3_loess_failure.csv"

HUMAN_MT = ["MT-ND1", "MT-ND2", "MT-CO1", "MT-CO2", "MT-ATP8", "MT-ATP6", "MT-CO3", "MT-ND3", "MT-ND4L", "MT-ND4", "MT-ND5", "MT-ND6", "MT-CYB"]
MOUSE_MT = ["mt-Nd1", "mt-Nd2", "mt-Co1", "mt-Co2", "mt-Atp8", "mt-Atp6", "mt-Co3", "mt-Nd3", "mt-Nd4l", "mt-Nd4", "mt-Nd5", "mt-Nd6", "mt-Cytb"]


def gene_names(n_genes: int, mouse: bool = False) -> list[str]:
    """Mitochondrial genes first, then ribosomal, then the rest (human or mouse capitalisation)."""
    mt = MOUSE_MT if mouse else HUMAN_MT
    ribo = [f"{'Rpl' if mouse else 'RPL'}{i}" for i in range(1, 11)] + [f"{'Rps' if mouse else 'RPS'}{i}" for i in range(1, 11)]
    rest = [f"{'Gm' if mouse else 'GENE'}{i}" for i in range(n_genes - len(mt) - len(ribo))]
    return mt + ribo + rest


def cells(n_cells: int, n_genes: int, n_batches: int = 1, n_types: int = 4, seed: int = 0, mouse: bool = False) -> ad.AnnData:
    """Synthetic counts (X, CSR float32 integers) with gene names and 10x-like barcodes."""
    adata = synthetic_counts(n_cells=n_cells, n_genes=n_genes, n_batches=n_batches, n_types=n_types, library_log_mean=7.5, seed=seed)
    del adata.layers["counts"]
    adata.var_names = gene_names(n_genes, mouse)
    rng = np.random.default_rng(seed)
    adata.obs_names = ["".join(rng.choice(list("ACGT"), 16)) + "-1" for _ in range(n_cells)]
    adata.obs_names_make_unique()
    return adata


def counts_with_moments(mean: np.ndarray, variance: np.ndarray, n_cells: int) -> np.ndarray:
    """(n_cells, n_genes) integers whose columns have exactly mean * n_cells counts and about `variance`.

    Used to rebuild the real batch behind ../shared/data/seurat_v3_loess_failure.csv (per-gene
    mean and variance of 362 cells), on which scanpy's seurat_v3 loess fails with span 0.3.
    """
    out = np.zeros((n_cells, len(mean)), dtype=np.int64)
    for g, (m, v) in enumerate(zip(mean, variance)):
        total = int(round(m * n_cells))
        target = v * (n_cells - 1) + total**2 / n_cells
        x = np.full(n_cells, total // n_cells, dtype=np.int64)
        x[: total % n_cells] += 1
        squares = int((x**2).sum())
        while True:  # move one count from the smallest non-zero cell to the largest while it helps
            low = np.flatnonzero(x > 0)[-1]
            gain = 2 * (x[0] - x[low] + 1)
            if low == 0 or squares + gain > target + gain / 2:
                break
            x[low] -= 1
            x[0] += 1
            squares += gain
            x = np.sort(x)[::-1]
        out[:, g] = x
    return out


def loess_failure_batch() -> ad.AnnData:
    table = pd.read_csv(LOESS_FAILURE_CSV)
    X = counts_with_moments(table["mean"].to_numpy(), table["variance"].to_numpy(), 362)
    adata = ad.AnnData(sp.csr_matrix(X.astype(np.float32)))
    adata.var_names = gene_names(X.shape[1])
    adata.obs_names = [f"LF{i:04d}-1" for i in range(X.shape[0])]
    return adata
