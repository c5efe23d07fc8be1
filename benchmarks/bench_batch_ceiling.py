#!/usr/bin/env python
"""What batch correction an embedding with no batch signal at all can score in scIB (issue #16).

scIB's batch metrics assume that a well-integrated embedding mixes batches. When batches differ
in cell-type composition (donors in disease and health, PBMC donors whose monocytes are 14% or
40% of their cells), an embedding that keeps cell types apart cannot mix them fully: iLISI is
computed over all cells, and PCR comparison counts variance that batch "explains" through
composition. This scores, on each data set of bench_science.py and with its scorer (the METRICS
`fast` profile), embeddings made of cell-type structure only, in which batch carries no
information by construction:

- the unintegrated PCA (the reference of PCR comparison, score 0 by definition);
- each cell replaced by its type's mean in PCA space (perfect bio, PCA's geometry between types);
- the same with isotropic noise of 10% of PCA's scale, and with noise of 30% of the mean
  within-type spread (batch-independent in both);
- a one-hot of the type (perfect bio, every type equidistant).

Their batch correction is a ceiling for any embedding that keeps the types perfectly: a method
scoring above it there does so by blurring cell types. The first table is PCR alone (raw, before
scib-metrics clips the comparison at 0).

    .venv/bin/python benchmarks/bench_batch_ceiling.py --datasets kang,liao,synthetic
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def embeddings(X: np.ndarray, types: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """The reference PCA and embeddings with cell-type structure only: (cells, d) each."""
    codes, index = np.unique(types, return_inverse=True)
    means = np.stack([X[index == k].mean(0) for k in range(len(codes))])[index]
    noise = np.random.default_rng(seed).standard_normal(X.shape).astype(np.float32)
    within_sd = np.sqrt(((X - means) ** 2).sum(1).mean() / X.shape[1])  # per dimension
    return {
        "PCA (unintegrated)": X,
        "type means in PCA space": means,
        "type means + 10% noise": means + 0.1 * X.std() * noise,
        "type means + 30% of within-type spread": means + 0.3 * within_sd * noise,
        "type one-hot": np.eye(len(codes), dtype=np.float32)[index],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="kang,liao,synthetic")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    import bench_science
    from scib_metrics.utils import principal_component_regression

    loaders = {"kang": lambda: bench_science.load_kang(["donor_107"]), "liao": bench_science.load_liao, "synthetic": bench_science.load_synthetic}
    pcr_rows, scib_rows = [], []
    for name in args.datasets.split(","):
        adata, splits = loaders[name]()
        batch, types = adata.obs["batch"].astype(str).to_numpy(), adata.obs["cell_type"].astype(str).to_numpy()
        X = np.asarray(adata.obsm["X_pca"], np.float32)
        pre = principal_component_regression(X, batch, categorical=True)
        for label, E in embeddings(X, types).items():
            pcr = principal_component_regression(E, batch, categorical=True)
            pcr_rows.append(f"| {name} | {label} | {pcr:.4f} | {max(0.0, (pre - pcr) / pre):.3f} (raw {(pre - pcr) / pre:+.3f}) |")
            s = bench_science.score(adata, {"embedding": E}, splits[0], 0, args.threads)
            scib_rows.append(
                f"| {name} | {label} | {s['bio']:.3f} | **{s['batch_correction']:.3f}** | {s['iLISI']:.3f} | {s['BRAS']:.3f} "
                f"| {s['Graph connectivity']:.3f} | {s['PCR comparison']:.3f} |"
            )
            print(scib_rows[-1], file=sys.stderr, flush=True)
    print("| data | embedding | PCR (batch) | PCR comparison |\n|---|---|---|---|")
    print("\n".join(pcr_rows))
    print("\n| data | embedding | bio | batch correction | iLISI | BRAS | graph connectivity | PCR comparison |\n|---|---|---|---|---|---|---|---|")
    print("\n".join(scib_rows))


if __name__ == "__main__":
    main()
