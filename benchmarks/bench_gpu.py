"""GPU training speed: epoch time, cells/s and GPU memory at several batch sizes (not a test).
On `--device cpu` each batch size runs with and without bf16 wide layers.

Needs no internet: the data are synthetic and made here. On an offline GPU machine, install from a
wheelhouse made on a connected one (same Python version and platform):

    make wheelhouse                                   # connected machine: wheels/ with every pin
    python3 -m venv .venv && .venv/bin/pip install --no-index --find-links wheels "scinv[baselines]"
    .venv/bin/python benchmarks/bench_gpu.py --cells 100000    # from a checkout (the script is not in the wheel)

`--device cpu` runs the same grid on the CPU (to check the script anywhere).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=100_000)
    ap.add_argument("--genes", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=3, help="epochs per setting; the fastest is reported (the first compiles kernels)")
    ap.add_argument("--batch-sizes", default="256,1024,4096")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--csv", default=str(ROOT / "benchmarks" / "results" / "bench_gpu.csv"))
    args = ap.parse_args()

    import torch

    from scinv.datasets import synthetic_counts
    from scinv.model import InVAE

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible to torch: run on a GPU machine (or pass --device cpu)")
    adata = synthetic_counts(n_cells=args.cells, n_genes=args.genes, n_batches=4, n_types=8, seed=0)
    rows = []
    # bf16 is used on CPUs with native bf16 only (on an H200 it was slower: docs/benchmarks.md "GPU")
    for mixed in (True, False) if args.device == "cpu" else (False,):
        for bs in [int(b) for b in args.batch_sizes.split(",")]:
            model = InVAE(adata, layer="counts", batch_key="batch", label_key="cell_type", n_latent_inv=20, n_latent_spur=5, n_hidden=128, n_layers=2)
            if args.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            hist = model.train(
                max_epochs=args.epochs,
                batch_size=bs,
                validation_fraction=0.0,
                early_stopping_patience=0,
                kl_warmup_epochs=1,
                seed=0,
                device=args.device,
                mixed_precision=mixed,
                log_every=args.epochs,
            )
            t0 = time.perf_counter()
            model.get_latent_representation(adata, "full", batch_size=8192)
            infer = time.perf_counter() - t0
            best = min(h["seconds"] for h in hist)
            row = {
                "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                "cells": args.cells,
                "batch_size": bs,
                "mixed_precision": mixed,
                "seconds_per_epoch": round(best, 2),
                "cells_per_s": round(args.cells / best),
                "inference_cells_per_s": round(args.cells / infer),
                "final_loss": round(hist[-1]["train_loss"], 2),
            }
            if args.device.startswith("cuda"):
                row["gpu_peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
    df = pd.DataFrame(rows)
    print(df.to_string(index=False))
    Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.csv, index=False)


if __name__ == "__main__":
    main()
