"""Scaling: training and latent inference from backed (on-disk) h5ad at 10k to 1M cells (not a test).

For each size, synthetic counts (2,000 genes, 4 batches, 8 types) are written to an .h5ad in
chunks of 50k cells (cached under --data-dir), then a fresh process opens it with
`anndata.read_h5ad(path, backed="r")`, trains scinv for --epochs epochs at the README architecture
(20 + 5 latent dims, 2 x 128 layers, batch 256) and computes the full latent. We report seconds
per epoch, cells/s, latent inference time and the process's peak RSS. Goal (issue 7): peak RSS at
1M cells < 1.5x that at 100k.

    .venv/bin/python benchmarks/bench_scaling.py                         # 10k,100k,300k,1M
    .venv/bin/python benchmarks/bench_scaling.py --sizes 10000,100000 --threads 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
from _rss import peak_rss_gb  # benchmarks/_rss.py (this script's folder is on sys.path)

ROOT = Path(__file__).resolve().parents[1]


def run_child(args) -> None:
    import anndata as ad
    import torch

    from scinv.model import InVAE

    torch.set_num_threads(args.threads)
    adata = ad.read_h5ad(args.input, backed="r")
    t0 = time.perf_counter()
    model = InVAE(adata, layer=None, batch_key="batch", label_key="cell_type", n_latent_inv=20, n_latent_spur=5, n_hidden=128, n_layers=2)
    setup = time.perf_counter() - t0
    hist = model.train(max_epochs=args.epochs, batch_size=256, validation_fraction=0.0, early_stopping_patience=0, kl_warmup_epochs=1, seed=0, log_every=1)
    t1 = time.perf_counter()
    z = model.get_latent_representation(adata, "full")
    infer = time.perf_counter() - t1
    print(
        json.dumps(
            {
                "cells": adata.n_obs,
                "setup_s": round(setup, 1),
                "seconds_per_epoch": round(min(h["seconds"] for h in hist), 1),
                "cells_per_s_train": round(adata.n_obs / min(h["seconds"] for h in hist)),
                "inference_s": round(infer, 1),
                "cells_per_s_inference": round(adata.n_obs / infer),
                "latent_shape": list(z.shape),
                "peak_rss_gb": round(peak_rss_gb(), 2),
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000,300000,1000000")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data-dir", default=str(ROOT / ".bench" / "data"))
    ap.add_argument("--csv", default=str(ROOT / "benchmarks" / "results" / "bench_scaling.csv"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--input", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return run_child(args)

    from scinv.datasets import write_synthetic_h5ad

    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        path = Path(args.data_dir) / f"synthetic_{n}x2000.h5ad"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            write_synthetic_h5ad(path, n_cells=n, n_genes=2000, n_batches=4, n_types=8, seed=0)
            print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t0:.0f} s", flush=True)
        res = subprocess.run(
            [sys.executable, __file__, "--child", "--input", str(path), "--epochs", str(args.epochs), "--threads", str(args.threads)],
            capture_output=True,
            text=True,
        )
        if res.returncode:
            sys.exit(res.stderr[-3000:])
        row = json.loads(res.stdout.strip().splitlines()[-1])
        row["threads"] = args.threads
        rows.append(row)
        print(json.dumps(row), flush=True)
    df = pd.DataFrame(rows)
    if 100_000 in set(df["cells"]):  # the goal: 1M cells < 1.5x the peak RSS at 100k
        df["rss_vs_100k"] = (df["peak_rss_gb"] / df.loc[df["cells"] == 100_000, "peak_rss_gb"].iloc[0]).round(2)
    print(df.to_string(index=False))
    Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.csv, index=False)


if __name__ == "__main__":
    main()
