"""Where an embedding's BRAS comes from: batch mixing within each label, scinv against baselines.

scib-metrics' BRAS (batch removal adapted silhouette) is the mean over labels of each label's mean
1 - |silhouette of its cells by batch| (cosine distance, mean distance to the other batches), so a
rare type weighs as much as a common one. This prints that per-label term for each method on one
held-out split, averaged over seeds, with the cell count of each label; the last row is the BRAS
the METRICS step reports. Data, preprocessing and methods are `bench_science.py`'s (the held-out
batch's labels hidden; scinv's z_inv).

    .venv/bin/python benchmarks/bench_bras_per_label.py --dataset donor_1015 --seeds 3
    .venv/bin/python benchmarks/bench_bras_per_label.py --dataset synthetic --methods scinv --variant w50:invariance_weight=50
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_science  # noqa: E402  (its loaders and methods, beside this file)
import bench_transfer_errors  # noqa: E402


def bras_per_label(z: np.ndarray, labels: np.ndarray, batches: np.ndarray) -> pd.Series:
    """Each label's BRAS term (scib_metrics.bras before its mean over labels); labels with one batch are left out, as there."""
    from scib_metrics.utils import silhouette_samples

    terms = {}
    for label in np.unique(labels):
        mask = labels == label
        if len(np.unique(batches[mask])) in (1, mask.sum()):
            continue
        s = silhouette_samples(z[mask], batches[mask], chunk_size=2048, metric="cosine", between_cluster_distances="mean_other")
        terms[label] = float(np.mean(1 - np.abs(np.asarray(s))))
    return pd.Series(terms)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="donor_1015", help="liao, synthetic, kang_chemistry, or a Kang donor held out (e.g. donor_1015).")
    ap.add_argument("--seeds", default="0", help="Comma-separated seeds.")
    ap.add_argument("--methods", default="scinv,scvi", help=f"Some of {','.join(bench_science.METHODS)}.")
    ap.add_argument("--variant", action="append", default=[], help="An extra scinv run 'name:option=value,...', as in bench_science.py.")
    ap.add_argument("--baseline-epochs", type=int, default=200, help="scVI (and scANVI's pre-training) epochs.")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    from scinv.data import hide_heldout_labels

    torch.set_num_threads(args.threads)
    adata, heldout = bench_transfer_errors.load(args.dataset)
    truth = adata.obs["cell_type"].astype(str)
    labels = hide_heldout_labels(adata.obs, "batch", "cell_type", heldout, bench_science.UNKNOWN, args.dataset)
    batches = adata.obs["batch"].astype(str).to_numpy()
    columns = {}
    for method, options in bench_science.method_options(args.methods, args.variant, args.baseline_epochs).items():
        runner = bench_science.RUNNERS["scinv" if method.startswith("scinv[") else method]
        per_seed = [bras_per_label(runner(adata, labels, seed, options)["embedding"], truth.to_numpy(), batches) for seed in map(int, args.seeds.split(","))]
        columns[method] = pd.concat(per_seed, axis=1).mean(1)
    table = pd.DataFrame(columns)
    counts = truth.value_counts()
    table.index = [f"{label} ({counts[label]})" for label in table.index]
    table.loc["BRAS (mean over labels)"] = table.mean()
    print(f"{args.dataset}, seeds {args.seeds}: BRAS per label (cells)")
    print(table.round(3).to_string())


if __name__ == "__main__":
    main()
