#!/usr/bin/env python
"""How much of scIB's 'PCR comparison' a perfect cell-type embedding can score (issue #16).

PCR comparison = 1 - PCR(embedding) / PCR(PCA), where PCR is the variance-weighted share of each
principal component explained by batch (scib-metrics). When batches differ in cell-type
composition, an embedding made only of cell-type structure still has batch-explained variance.
This prints, per data set of bench_science.py, PCR and the comparison score of:

- the unintegrated PCA (the reference, score 0 by definition);
- each cell replaced by its type's mean in PCA space (perfect bio, PCA's geometry between types);
- the same with isotropic noise of 10% of PCA's scale;
- a one-hot of the type (perfect bio, every type equidistant).

A score near 0 for the type-only embeddings means PCR comparison cannot reward an embedding for
keeping cell types apart: batch correction then rests on the other batch metrics.

    .venv/bin/python benchmarks/bench_pcr_composition.py --datasets kang,liao,synthetic
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def embeddings(X: np.ndarray, types: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """The reference PCA and three embeddings with cell-type structure only: (cells, d) each."""
    codes, index = np.unique(types, return_inverse=True)
    means = np.stack([X[index == k].mean(0) for k in range(len(codes))])[index]
    noise = np.random.default_rng(seed).standard_normal(X.shape).astype(np.float32)
    return {
        "PCA (unintegrated)": X,
        "type means in PCA space": means,
        "type means + 10% noise": means + 0.1 * X.std() * noise,
        "type one-hot": np.eye(len(codes), dtype=np.float32)[index],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="kang,liao,synthetic")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    import bench_science
    from scib_metrics.utils import principal_component_regression

    loaders = {"kang": lambda: bench_science.load_kang(["donor_107"]), "liao": bench_science.load_liao, "synthetic": bench_science.load_synthetic}
    print("| data | embedding | PCR (batch) | PCR comparison |\n|---|---|---|---|")
    for name in args.datasets.split(","):
        adata, _ = loaders[name]()
        batch, types = adata.obs["batch"].astype(str).to_numpy(), adata.obs["cell_type"].astype(str).to_numpy()
        X = np.asarray(adata.obsm["X_pca"], np.float32)
        pre = principal_component_regression(X, batch, categorical=True)
        for label, E in embeddings(X, types).items():
            pcr = principal_component_regression(E, batch, categorical=True)
            print(f"| {name} | {label} | {pcr:.4f} | {max(0.0, (pre - pcr) / pre):.3f} (raw {(pre - pcr) / pre:+.3f}) |", flush=True)


if __name__ == "__main__":
    main()
