"""scinv vs the authors' inVAE (invae 0.1.0): speed per epoch and integration quality.

Not a test: prints a table and writes CSV. Data: synthetic NB counts (10k cells x 2k genes,
4 batches, 8 types by default); quality is measured with batch b3 held out as the query.

    # once: the authors' package in its own venv (it pins anndata 0.8, needs numpy<2, pandas<2)
    python3 -m venv .bench/invae && .bench/invae/bin/pip install invae==0.1.0 "numpy<2" "pandas<2"
    .venv/bin/python benchmarks/bench_model.py --invae-python .bench/invae/bin/python

Speed: both tools train on all cells for --timing-epochs epochs at the authors' README settings
(20 + 5 latent dims, 2 x 128 hidden, batch 256), each in its own process with --threads threads;
we report the median epoch time, cells/s and the process's peak RSS.
Quality: both train on the reference batches for --epochs epochs; the query's latents come from
each tool's encoder. We report kNN (k=15) label transfer reference -> query (accuracy, macro-F1),
the batch entropy of 50-NN neighbourhoods (1 = perfectly mixed), scinv's own invariant predictor on
the query, and with --scib the scib-metrics 'fast' totals on reference + query.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from _rss import peak_rss_gb  # benchmarks/_rss.py (this script's folder is on sys.path)

ROOT = Path(__file__).resolve().parents[1]


# -- runs in a child process -----------------------------------------------------------------------
def run_scinv(args) -> None:
    import anndata as ad
    import torch

    from scinv.model import InVAE

    torch.set_num_threads(args.threads)
    ref = ad.read_h5ad(args.input)
    model = InVAE(
        ref,
        layer="counts",
        batch_key="batch",
        label_key="cell_type",
        n_latent_inv=20,
        n_latent_spur=5,
        n_hidden=128,
        n_layers=2,
        prior_mode=args.prior_mode,
        classifier_weight=args.classifier_weight,
    )
    t0 = time.perf_counter()
    hist = model.train(
        max_epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        log_every=max(1, args.epochs // 5),
        early_stopping_patience=0,
        validation_fraction=0.0 if args.timing else 0.1,
        kl_warmup_epochs=min(20, args.epochs // 4),
    )
    seconds = time.perf_counter() - t0
    epoch_times = [h["seconds"] for h in hist]
    result = {
        "tool": "scinv",
        "epochs": len(hist),
        "seconds": seconds,
        "seconds_per_epoch": float(np.median(epoch_times)),
        "cells": ref.n_obs,
        "params": sum(p.numel() for p in model.module.parameters()),
        "threads": args.threads,
        "batch_size": args.batch_size,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.query:
        query = ad.read_h5ad(args.query)
        np.save(out / "latent_reference.npy", model.get_latent_representation(ref, "inv"))
        np.save(out / "latent_query.npy", model.get_latent_representation(query, "inv"))
        model.train_predictor(seed=args.seed)
        labels, _ = model.predict(query)
        result["predictor_query_accuracy"] = float((labels == query.obs["cell_type"].astype(str).to_numpy()).mean())
    result["peak_rss_gb"] = peak_rss_gb()
    (out / "result.json").write_text(json.dumps(result, indent=1))


def run_scvi(args) -> None:
    """scVI (scvi-tools) at scinv's size: 25 latent dims, 2 x 128 hidden, batch 256; per-epoch times."""
    import anndata as ad
    import scvi
    import torch
    from lightning.pytorch.callbacks import Callback

    torch.set_num_threads(args.threads)
    scvi.settings.seed = args.seed
    adata = ad.read_h5ad(args.input)
    scvi.model.SCVI.setup_anndata(adata, layer="counts", batch_key="batch")
    model = scvi.model.SCVI(adata, n_latent=25, n_hidden=128, n_layers=2)
    times = []

    class EpochTimer(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            self.t0 = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module):
            times.append(time.perf_counter() - self.t0)

    t0 = time.perf_counter()
    model.train(
        max_epochs=args.epochs,
        batch_size=args.batch_size,
        train_size=1.0,
        early_stopping=False,
        enable_progress_bar=False,
        callbacks=[EpochTimer()],
        accelerator="cpu",
    )
    result = {
        "tool": f"scvi-tools {scvi.__version__}",
        "epochs": len(times),
        "seconds": time.perf_counter() - t0,
        "seconds_per_epoch": float(np.median(times)),
        "cells": adata.n_obs,
        "params": sum(p.numel() for p in model.module.parameters()),
        "threads": args.threads,
        "batch_size": args.batch_size,
        "peak_rss_gb": peak_rss_gb(),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=1))


# -- orchestration -----------------------------------------------------------------------------------
def child(cmd: list[str], log: Path) -> dict:
    res = subprocess.run(cmd, capture_output=True, text=True)
    log.write_text(res.stdout + res.stderr)
    if res.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed, see {log}:\n{res.stderr[-2000:]}")
    out = Path(cmd[cmd.index("--out") + 1])
    result = json.loads((out / "result.json").read_text())
    epochs = [float(t) for t in re.findall(r"epoch \d+/\d+ took ([0-9.]+)s", res.stdout)]
    if epochs:  # invae prints its own epoch times; use their median like ours
        result["seconds_per_epoch"] = float(np.median(epochs))
    result["cells_per_second"] = result["cells"] / result["seconds_per_epoch"]
    return result


def knn_transfer(z_ref, y_ref, z_query, y_query, k=15) -> dict:
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.neighbors import KNeighborsClassifier

    pred = KNeighborsClassifier(n_neighbors=k).fit(z_ref, y_ref).predict(z_query)
    return {"knn_accuracy": accuracy_score(y_query, pred), "knn_macro_f1": f1_score(y_query, pred, average="macro")}


def batch_entropy(z, batches, k=50) -> float:
    from sklearn.neighbors import NearestNeighbors

    idx = NearestNeighbors(n_neighbors=k).fit(z).kneighbors(z, return_distance=False)
    codes, uniq = pd.factorize(batches)
    ent = []
    for row in codes[idx]:
        p = np.bincount(row, minlength=len(uniq)) / k
        p = p[p > 0]
        ent.append(-(p * np.log(p)).sum() / np.log(len(uniq)))
    return float(np.mean(ent))


def scib_totals(z_ref, z_query, obs, pca) -> dict:
    import anndata as ad

    from scinv.metrics import run_scib

    adata = ad.AnnData(obs=obs.copy())
    adata.obsm["X_emb"] = np.vstack([z_ref, z_query]).astype(np.float32)
    adata.obsm["X_pca"] = pca
    df = run_scib(adata, ["X_emb"], "batch", "cell_type", "fast", "X_pca", 0, n_jobs=2)
    return {
        "scib_total": float(df.loc["X_emb", "Total"]),
        "scib_bio": float(df.loc["X_emb", "Bio conservation"]),
        "scib_batch": float(df.loc["X_emb", "Batch correction"]),
        "scib_total_published": float(df.loc["X_emb", "Total (published)"]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--invae-python", default=None, help="python of a venv with invae==0.1.0 (skipped when absent)")
    p.add_argument("--cells", type=int, default=10_000)
    p.add_argument("--genes", type=int, default=2_000)
    p.add_argument("--epochs", type=int, default=100, help="training epochs for the quality runs")
    p.add_argument("--timing-epochs", type=int, default=10)
    p.add_argument("--speed-rounds", type=int, default=3, help="interleaved repetitions of every speed run (medians reported)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the quality runs")
    p.add_argument("--speed-threads", default="1,2", help="comma list of thread counts for the speed runs")
    p.add_argument("--no-scvi", action="store_true", help="skip the scVI speed runs")
    p.add_argument("--type-strength", type=float, default=0.6, help="synthetic data: sd of log-fold changes of type markers (5%% of genes)")
    p.add_argument("--batch-strength", type=float, default=0.5, help="synthetic data: sd of per-gene log batch effects")
    p.add_argument("--seeds", default="0", help="comma list of seeds for the quality runs")
    p.add_argument("--scib", action="store_true", help="also compute scib-metrics totals (slow)")
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--csv", default="benchmarks/results/bench_model.csv")
    p.add_argument("--h5ad", default=None, help="use this AnnData (counts in layers['counts'], obs batch/cell_type) instead of synthetic data")
    p.add_argument("--query-batch", default=None, help="batch held out as the query (default: the last one)")
    # child mode
    p.add_argument("--run-scinv", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--run-scvi", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--input", help=argparse.SUPPRESS)
    p.add_argument("--query", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--timing", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--prior-mode", default="mean")
    p.add_argument("--classifier-weight", type=float, default=20.0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.run_scinv:
        return run_scinv(args)
    if args.run_scvi:
        return run_scvi(args)

    import anndata as ad
    import scanpy as sc

    from scinv.datasets import synthetic_counts

    work = Path(tempfile.mkdtemp(prefix="scinv-bench-"))
    if args.h5ad:
        adata = ad.read_h5ad(args.h5ad)
    else:
        adata = synthetic_counts(
            n_cells=args.cells,
            n_genes=args.genes,
            n_batches=4,
            n_types=8,
            seed=0,
            type_strength=args.type_strength,
            batch_strength=args.batch_strength,
            marker_fraction=0.05,
        )
    adata.obs["batch"] = adata.obs["batch"].astype(str)
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(str)
    qb = args.query_batch or sorted(adata.obs["batch"].unique())[-1]
    adata.write_h5ad(work / "all.h5ad")
    ref, query = adata[adata.obs["batch"] != qb].copy(), adata[adata.obs["batch"] == qb].copy()
    ref.write_h5ad(work / "ref.h5ad")
    query.write_h5ad(work / "query.h5ad")
    me = [sys.executable, str(Path(__file__).resolve()), "--run-scinv"]
    invae = [args.invae_python, str(ROOT / "benchmarks" / "invae_reference.py")] if args.invae_python else None
    if invae and not Path(args.invae_python).exists():
        print(f"invae python {args.invae_python} not found: skipping invae (see the docstring to install it)")
        invae = None
    rows = []

    scvi_cmd = None if args.no_scvi else [sys.executable, str(Path(__file__).resolve()), "--run-scvi"]
    for threads in [] if args.skip_speed else [int(s) for s in args.speed_threads.split(",")]:
        print(
            f"speed: {adata.n_obs} cells x {adata.n_vars} genes, {args.timing_epochs} epochs, {threads} thread(s), {args.speed_rounds} interleaved round(s)",
            flush=True,
        )
        common = ["--input", str(work / "all.h5ad"), "--epochs", str(args.timing_epochs), "--threads", str(threads)]
        configs = [(f"speed scinv (batch {bs}, {threads} thr)", me + common + ["--timing", "--batch-size", str(bs)]) for bs in (256, 512)]
        if invae:
            configs.append((f"speed invae 0.1.0 (batch 256, {threads} thr)", invae + common))
        if scvi_cmd:
            configs.append((f"speed scVI (batch 256, {threads} thr)", scvi_cmd + common + ["--batch-size", "256"]))
        # tools alternate within each round, so that drift in machine speed hits all of them alike
        runs = {name: [] for name, _ in configs}
        for rnd in range(args.speed_rounds):
            for name, cmd in configs:
                tag = re.sub(r"[^a-z0-9]+", "_", name.lower()) + f"r{rnd}"
                runs[name].append(child(cmd + ["--out", str(work / tag)], work / f"{tag}.log"))
        for name, results in runs.items():
            per_epoch = [r["seconds_per_epoch"] for r in results]
            row = {"run": name, **results[int(np.argsort(per_epoch)[len(per_epoch) // 2])]}
            row.update(seconds_per_epoch=float(np.median(per_epoch)), seconds_per_epoch_min=min(per_epoch), rounds=len(per_epoch))
            row["cells_per_second"] = row["cells"] / row["seconds_per_epoch"]
            rows.append(row)
        scinv_runs = runs[configs[0][0]]
        for name, results in list(runs.items())[2:]:
            ratios = [r["seconds_per_epoch"] / s["seconds_per_epoch"] for r, s in zip(results, scinv_runs)]
            print(
                f"scinv (batch 256) is {np.median(ratios):.2f}x faster per epoch than {name.split(' (')[0][6:]} "
                f"(median of {len(ratios)} paired rounds: {', '.join(f'{x:.2f}' for x in ratios)})",
                flush=True,
            )
            rows.append(
                {
                    "run": f"speedup vs {name[6:]}",
                    "speedup_median": float(np.median(ratios)),
                    "speedup_min": min(ratios),
                    "speedup_max": max(ratios),
                    "rounds": len(ratios),
                }
            )
        print(
            pd.DataFrame(rows)
            .set_index("run")[["seconds_per_epoch", "seconds_per_epoch_min", "cells_per_second", "params", "peak_rss_gb"]]
            .dropna(how="all")
            .round(3),
            flush=True,
        )

    if not args.skip_quality:
        sc.pp.normalize_total(adata, target_sum=1e4)
        sc.pp.log1p(adata)
        sc.pp.pca(adata, n_comps=30, random_state=0)
        is_ref = (adata.obs["batch"] != qb).to_numpy()
        y_ref, y_q = adata.obs["cell_type"].to_numpy()[is_ref], adata.obs["cell_type"].to_numpy()[~is_ref]
        obs = pd.concat([adata.obs[is_ref], adata.obs[~is_ref]])
        pca = np.vstack([adata.obsm["X_pca"][is_ref], adata.obsm["X_pca"][~is_ref]])
        embeddings = {"PCA": (adata.obsm["X_pca"][is_ref], adata.obsm["X_pca"][~is_ref], {})}
        for seed in [int(s) for s in args.seeds.split(",")]:
            q = [
                "--input",
                str(work / "ref.h5ad"),
                "--query",
                str(work / "query.h5ad"),
                "--epochs",
                str(args.epochs),
                "--threads",
                str(args.threads),
                "--seed",
                str(seed),
            ]
            runs = [("scinv (learned-mean prior)", me + q + ["--prior-mode", "mean"])]
            if invae:
                runs += [("invae default (variance prior)", invae + q), ("invae learned-mean prior", invae + q + ["--learned-mean"])]
            for name, cmd in runs:
                out = work / f"q_{re.sub(r'[^a-z]+', '_', name)}_{seed}"
                r = child(cmd + ["--out", str(out)], out.with_suffix(".log"))
                embeddings[f"{name} seed {seed}"] = (np.load(out / "latent_reference.npy"), np.load(out / "latent_query.npy"), r)
        for name, (zr, zq, r) in embeddings.items():
            row = {"run": f"quality {name}", **knn_transfer(zr, y_ref, zq, y_q), "batch_entropy": batch_entropy(np.vstack([zr, zq]), obs["batch"].to_numpy())}
            if "predictor_query_accuracy" in r:
                row["predictor_query_accuracy"] = r["predictor_query_accuracy"]
            if args.scib:
                row.update(scib_totals(zr, zq, obs, pca))
            rows.append(row)
            print(row, flush=True)

    df = pd.DataFrame(rows).set_index("run")
    Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.csv)
    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.float_format", "{:.3f}".format):
        print(df)
    print(f"wrote {args.csv}; work files in {work}")


if __name__ == "__main__":
    main()
