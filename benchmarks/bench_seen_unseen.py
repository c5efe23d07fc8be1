#!/usr/bin/env python
"""Does z_inv look the same for cells the model trained on and for cells it never saw? (issue #16)

scIB scores every cell, and most of them are the training cells whose labels the joint classifier
and the invariance penalty were fitted on. This trains scinv on one bench_science.py split and
prints, for three groups of cells:

- train: labelled cells in the gradient steps;
- validation: labelled cells of the same batches that training held out of its gradient steps;
- heldout: the held-out batch (labels hidden from training);

the median within-type spread of z_inv (RMS distance to the group's type mean), the offset of the
group's type means from the training cells' type means, the label silhouette, and k-means ARI/NMI
(k = number of types in the group). A model that generalises gives the three groups about the same
figures. The unintegrated PCA is scored on the same groups for reference. `--variant
name:option=value,...` adds runs with other scinv options.

    .venv/bin/python benchmarks/bench_seen_unseen.py --dataset kang --heldout donor_107 --seed 0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_science as bs  # noqa: E402

LOADERS = {"kang": lambda held: bs.load_kang(held)[0], "liao": lambda held: bs.load_liao()[0], "synthetic": lambda held: bs.load_synthetic()[0]}


def group_figures(z: np.ndarray, types: np.ndarray, group: np.ndarray) -> pd.DataFrame:
    from scib_metrics import silhouette_label
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    train_means = {t: z[(group == "train") & (types == t)].mean(0) for t in np.unique(types[group == "train"])}
    rows = []
    for g in ("train", "validation", "heldout"):
        s = group == g
        members = {t: s & (types == t) for t in np.unique(types[s])}
        means = {t: z[m].mean(0) for t, m in members.items() if m.sum() >= 10}  # types with enough cells for a spread
        spread = [np.sqrt(((z[members[t]] - mean) ** 2).sum(1).mean()) for t, mean in means.items()]
        offset = [np.linalg.norm(mean - train_means[t]) for t, mean in means.items() if t in train_means]
        clusters = KMeans(len(members), n_init=10, random_state=0).fit_predict(z[s])
        rows.append(
            {
                "cells": g,
                "n": int(s.sum()),
                "spread": float(np.median(spread)),
                "offset": float(np.median(offset)),
                "silhouette_label": silhouette_label(z[s], types[s]),
                "ARI": adjusted_rand_score(types[s], clusters),
                "NMI": normalized_mutual_info_score(types[s], clusters),
            }
        )
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="kang", choices=sorted(LOADERS))
    ap.add_argument("--heldout", default="donor_107", help="Held-out batch (Kang donor; Liao C149 and synthetic b3 are fixed).")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variant", action="append", default=[], help="An extra scinv run 'name:option=value,...' (InVAE model options).")
    args = ap.parse_args()

    from scinv.model import InVAE

    heldout = {"kang": args.heldout, "liao": "C149", "synthetic": "b3"}[args.dataset]
    adata = LOADERS[args.dataset]([heldout])
    held = adata.obs["batch"].astype(str).eq(heldout).to_numpy()
    adata.obs["label"] = np.where(held, bs.UNKNOWN, adata.obs["cell_type"].astype(str))
    types = adata.obs["cell_type"].astype(str).to_numpy()
    runs = {"scinv": {}, **{name[len("scinv[") : -1]: opts for name, opts in bs.parse_variants(args.variant).items()}}
    tables = []
    for name, options in runs.items():
        model = InVAE(adata, layer="counts", batch_key="batch", label_key="label", unknown_label=bs.UNKNOWN, **options)
        model.train(device="cpu", seed=args.seed, log_every=50)
        z = model.get_latent_representation(adata, "inv")
        group = np.where(held, "heldout", "train").astype(object)
        validation = model._validation_cells
        group[validation[~held[validation]]] = "validation"
        table = group_figures(z, types, group)
        table.insert(0, "run", name)
        tables.append(table)
        print(table.round(3).to_string(index=False), flush=True)
        if name == "scinv":  # the unintegrated PCA on the same three groups: no training, so no gap
            pca = group_figures(np.asarray(adata.obsm["X_pca"], np.float32), types, group)
            pca.insert(0, "run", "PCA")
            tables.append(pca)
    print(f"\n{args.dataset}, {heldout} held out, seed {args.seed}")
    print(pd.concat(tables).round(3).to_string(index=False))


if __name__ == "__main__":
    main()
