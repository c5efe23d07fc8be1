"""Time the METRICS step's scib-metrics run at atlas-like size (not a test).

Builds N cells (default 50,000) of Gaussian-cluster embeddings with label structure and batch
shifts, writes them as an EXPORT-like .h5ad, and times `bin/scinv_metrics.py` on it end to end
(reading the file included) with the `fast` profile: two scored embeddings (X_scinv_inv,
X_scinv) plus the unintegrated X_pca it also scores. Prints a table and appends to a CSV.

    .venv/bin/python benchmarks/bench_metrics.py                    # 50k cells, fast profile
    .venv/bin/python benchmarks/bench_metrics.py --cells 100000 --profile full
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def synthetic_embeddings(n_cells: int, n_labels: int = 12, n_batches: int = 6, seed: int = 0):
    """An AnnData whose obsm holds cluster-structured embeddings; batch shifts differ in size per embedding."""
    import anndata as ad

    rng = np.random.default_rng(seed)
    labels = rng.integers(n_labels, size=n_cells)
    batches = rng.integers(n_batches, size=n_cells)

    def embed(dims: int, batch_shift: float) -> np.ndarray:
        centres = rng.normal(0, 3, (n_labels, dims))
        shifts = rng.normal(0, batch_shift, (n_batches, dims))
        return (centres[labels] + shifts[batches] + rng.normal(0, 1, (n_cells, dims))).astype(np.float32)

    obs = pd.DataFrame(
        {"batch": pd.Categorical([f"b{b}" for b in batches]), "cell_type": pd.Categorical([f"t{t}" for t in labels])}, index=[f"c{i}" for i in range(n_cells)]
    )
    inv = embed(20, 0.3)
    return ad.AnnData(
        X=np.zeros((n_cells, 1), np.float32), obs=obs, obsm={"X_scinv_inv": inv, "X_scinv": np.hstack([inv, embed(5, 2.0)]), "X_pca": embed(50, 2.0)}
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=50_000)
    ap.add_argument("--profile", default="fast", choices=["fast", "full"])
    ap.add_argument("--n-jobs", type=int, default=2)
    ap.add_argument("--embeddings", default="X_scinv_inv,X_scinv", help="obsm keys to score besides X_pca (the pipeline's default scores these two and X_pca)")
    ap.add_argument("--csv", default=str(ROOT / "benchmarks" / "results" / "bench_metrics.csv"))
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "export.h5ad"
        synthetic_embeddings(args.cells).write_h5ad(data)
        env = dict(os.environ, NUMBA_CACHE_DIR=str(Path(tmp) / "numba"), MPLCONFIGDIR=str(Path(tmp) / "mpl"))
        cmd = [
            sys.executable,
            str(ROOT / "bin" / "scinv_metrics.py"),
            "--input",
            str(data),
            "--output",
            str(Path(tmp) / "m.csv"),
            "--label-key",
            "cell_type",
            "--profile",
            args.profile,
            "--n-jobs",
            str(args.n_jobs),
            "--max-cells",
            "0",
            "--embeddings",
            args.embeddings,
        ]
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        seconds = time.perf_counter() - t0
        stages = [line for line in res.stderr.splitlines() if line.startswith("INFO metrics:")]
        if res.returncode:
            sys.exit(res.stderr[-3000:])
        peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6
        scores = pd.read_csv(Path(tmp) / "m.csv", index_col=0)
    row = pd.DataFrame(
        [
            {
                "cells": args.cells,
                "profile": args.profile,
                "scored_embeddings": len(scores),
                "n_jobs": args.n_jobs,
                "seconds": round(seconds, 1),
                "peak_rss_gb": round(peak_gb, 2),
            }
        ]
    )
    print(row.to_string(index=False))
    print("\n".join(stages))
    print(scores[["Bio conservation", "Batch correction", "Total"]].round(3).to_string())
    Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
    csv = Path(args.csv)
    row.to_csv(csv, mode="a", index=False, header=not csv.exists())


if __name__ == "__main__":
    main()
