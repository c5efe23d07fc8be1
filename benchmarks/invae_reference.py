"""Train the authors' inVAE (PyPI invae 0.1.0, FinVAE) and write timings and latents.

Runs inside its own virtual environment (invae pins anndata 0.8 and needs numpy<2, pandas<2):

    python -m venv .bench/invae && .bench/invae/bin/pip install invae==0.1.0 "numpy<2" "pandas<2"
    .bench/invae/bin/python benchmarks/invae_reference.py --input ref.h5ad --query query.h5ad --out out/

Called by benchmarks/bench_model.py; not imported by scinv.
"""

import argparse
import json
import time
from pathlib import Path

import anndata as ad
import numpy as np
import torch
from _rss import peak_rss_gb  # benchmarks/_rss.py (this script's folder is on sys.path)
from torch import optim


class _QuietPlateau(optim.lr_scheduler.ReduceLROnPlateau):
    """torch >= 2.7 removed ReduceLROnPlateau(verbose=...), which invae 0.1.0 still passes."""

    def __init__(self, *args, verbose=None, **kwargs):
        super().__init__(*args, **kwargs)


optim.lr_scheduler.ReduceLROnPlateau = _QuietPlateau  # a subclass for invae's classifier; no file is patched


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--input", required=True)
    p.add_argument("--query", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-key", default="batch")
    p.add_argument("--label-key", default="cell_type")
    p.add_argument("--latent-inv", type=int, default=20)
    p.add_argument("--latent-spur", type=int, default=5)
    p.add_argument("--learned-mean", action="store_true", help="fix_mean_prior=False, fix_var_prior=True (their best heart setting)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    np.random.seed(a.seed)
    from inVAE import FinVAE

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    adata = ad.read_h5ad(a.input)
    model = FinVAE(
        adata=adata,
        layer="counts",
        inv_covar_keys={"cont": [], "cat": [a.label_key]},
        spur_covar_keys={"cont": [], "cat": [a.batch_key]},
        latent_dim_inv=a.latent_inv,
        latent_dim_spur=a.latent_spur,
        n_layers=2,
        hidden_dim=128,
        fix_mean_prior=not a.learned_mean,
        fix_var_prior=a.learned_mean,
        batch_size=256,
        device="cpu",
    )
    n_params = sum(p.numel() for p in model.module.parameters())
    t0 = time.perf_counter()
    model.train(n_epochs=a.epochs, lr_train=1e-3, weight_decay=1e-4, print_every_n_epochs=1)
    seconds = time.perf_counter() - t0
    result = {
        "tool": "invae 0.1.0",
        "epochs": a.epochs,
        "seconds": seconds,
        "seconds_per_epoch": seconds / a.epochs,
        "cells": adata.n_obs,
        "cells_per_second": adata.n_obs * a.epochs / seconds,
        "params": n_params,
        "peak_rss_gb": peak_rss_gb(),
        "threads": a.threads,
    }
    np.save(out / "latent_reference.npy", model.get_latent_representation(latent_type="inv", verbose=False))
    if a.query:
        query = ad.read_h5ad(a.query)
        # the query's batch and label are unseen: invae's one-hot encoders turn them into zeros
        query.obs[a.label_key] = "Unknown"
        np.save(out / "latent_query.npy", model.get_latent_representation(query, latent_type="inv", verbose=False))
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
