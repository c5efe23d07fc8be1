"""How well can the held-out batch's labels be told apart from its own data at all?

Transfer accuracy to a held-out batch is bounded by how separable that batch's labels are in its own
counts: a boundary within a continuum (CD4/CD8 T cells, CD14+/FCGR3A+ monocytes) or a label drawn per
cluster of another embedding stays hard for any method. Per `bench_science.py` split, this prints the
5-fold cross-validated accuracy of classifiers trained on the held-out batch's own cells and true
labels (no other batch involved), on a PCA of that batch alone (its log-normalised HVGs, 50
components): a logistic regression and a 15-NN classifier. "With the reference": the same folds, with every
labelled cell of the other batches added to each training fold, on the whole data's PCA (an oracle that
has seen the held-out batch's labels). For the simulated chemistry and read-count shifts it also
scores the same cells as sequenced (before the simulated technology), which separates what the
technology costs from what the labels themselves allow.

    .venv/bin/python benchmarks/bench_label_ceiling.py
    .venv/bin/python benchmarks/bench_label_ceiling.py --datasets kang --kang-donors donor_1015,donor_107
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_science  # noqa: E402  (its loaders, beside this file)


def labels_with_five_cells(labels: np.ndarray) -> np.ndarray:
    """(cells,) bool: cells whose label has at least 5 cells here (5-fold CV needs one per fold)."""
    names, counts = np.unique(labels, return_counts=True)
    return np.isin(labels, names[counts >= 5])


def own_batch_accuracy(counts, labels: np.ndarray, seed: int = 0) -> dict[str, float]:
    """5-fold CV accuracy of logistic regression and 15-NN on a 50-component PCA of `counts` (cells, genes)
    alone (log1p of counts per 10,000); labels with fewer than 5 cells are left out (CV needs them per fold)."""
    import anndata as ad
    import scanpy as sc
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    keep = labels_with_five_cells(labels)
    adata = ad.AnnData(counts[keep].astype(np.float32))
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    sc.pp.pca(adata, n_comps=min(50, adata.n_obs - 1, adata.n_vars - 1), random_state=seed)
    z, y = adata.obsm["X_pca"], labels[keep]
    folds = StratifiedKFold(5, shuffle=True, random_state=seed)
    classifiers = {"logistic": LogisticRegression(max_iter=3000), "knn15": KNeighborsClassifier(15)}
    scores = {name: float(cross_val_score(clf, z, y, cv=folds).mean()) for name, clf in classifiers.items()}
    return {**scores, "cells": int(keep.sum()), "labels": len(np.unique(y))}


def with_reference_accuracy(z: np.ndarray, labels: np.ndarray, query: np.ndarray, seed: int = 0) -> float:
    """5-fold CV accuracy on the query cells of a logistic regression trained on all other cells plus the
    other folds of the query; z (cells, d), labels (cells,), query (cells,) bool."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    reference, held = np.flatnonzero(~query), np.flatnonzero(query)
    held = held[labels_with_five_cells(labels[held])]
    right = 0
    for train, test in StratifiedKFold(5, shuffle=True, random_state=seed).split(held, labels[held]):
        fit_on = np.concatenate([reference, held[train]])
        clf = LogisticRegression(max_iter=3000).fit(z[fit_on], labels[fit_on])
        right += int((clf.predict(z[held[test]]) == labels[held[test]]).sum())
    return right / len(held)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default="kang_chemistry,kang_reads,kang,liao,synthetic")
    ap.add_argument("--kang-donors", default="donor_1015,donor_1016,donor_107")
    args = ap.parse_args()
    loaders = {
        "kang": lambda: bench_science.load_kang(args.kang_donors.split(",")),
        "kang_chemistry": bench_science.load_kang_chemistry,
        "kang_reads": bench_science.load_kang_reads,
        "liao": bench_science.load_liao,
        "synthetic": bench_science.load_synthetic,
    }
    print("| data | held out | cells | labels | logistic | 15-NN | logistic, with the reference |")
    print("|---|---|---|---|---|---|---|")
    for name in args.datasets.split(","):
        adata, splits = loaders[name]()
        for heldout in splits:
            cells = adata.obs["batch"].astype(str).isin(heldout).to_numpy()
            all_labels = adata.obs["cell_type"].astype(str).to_numpy()
            labels = all_labels[cells]
            oracle = with_reference_accuracy(np.asarray(adata.obsm["X_pca"]), all_labels, cells)
            rows = {"as given": adata.layers["counts"][cells]}
            if name in ("kang_chemistry", "kang_reads"):  # the same cells before the simulated technology
                import anndata as ad

                raw = ad.read_h5ad(bench_science.SHARED / "kang2018_pbmc_ctrl.h5ad")
                rows["as sequenced"] = raw[adata.obs_names[cells], adata.var_names].X
            for what, counts in rows.items():
                r = own_batch_accuracy(counts, labels)
                tag = "+".join(heldout) + ("" if what == "as given" else f" ({what})")
                with_ref = f"{oracle:.4f}" if what == "as given" else "—"
                print(f"| {name} | {tag} | {r['cells']} | {r['labels']} | {r['logistic']:.4f} | {r['knn15']:.4f} | {with_ref} |", flush=True)


if __name__ == "__main__":
    main()
