"""Where scinv's transfer errors are: per-type confusion of the invariant predictor on a held-out
batch, and whether a post-hoc step on the held-out cells would fix them: a label-shift correction
of its probabilities, the query's own neighbourhoods (kNN smoothing; CellTypist's majority
voting over an over-clustering), or an ensemble: the predictor's probabilities averaged with the
jointly trained classifier's and a 15-NN classifier's on the reference cells in z_inv.

The correction is the EM re-estimate of the held-out batch's class priors (Saerens, Latinne and
Decaestecker 2002), starting from the predictor's training prior (each labelled batch weighs the
same, as in `InVAE.train_predictor`). Data and preprocessing are `bench_science.py`'s; scinv runs
with its defaults. Prints one RESULT line and the confusion table per seed.

    .venv/bin/python benchmarks/bench_transfer_errors.py --dataset liao --seeds 0,1,3
    .venv/bin/python benchmarks/bench_transfer_errors.py --dataset donor_1015 --seeds 0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_science  # noqa: E402  (its loaders, beside this file)


def em_label_shift(probs: np.ndarray, train_prior: np.ndarray, max_iter: int = 100, tol: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities (n, K) re-weighted to the class prior EM estimates for these cells, and that prior (K,)."""
    prior = train_prior.copy()
    for _ in range(max_iter):
        adjusted = probs * (prior / train_prior)
        adjusted /= adjusted.sum(1, keepdims=True)
        new_prior = adjusted.mean(0)
        converged = np.abs(new_prior - prior).max() < tol
        prior = new_prior
        if converged:
            break
    adjusted = probs * (prior / train_prior)
    return adjusted / adjusted.sum(1, keepdims=True), prior


def knn_smoothed(probs: np.ndarray, z: np.ndarray, k: int = 15) -> np.ndarray:
    """Probabilities (n, K) averaged over each cell's k nearest held-out cells in z (n, d), itself included."""
    from scinv.mapping import knn_distances

    return probs[knn_distances(z, z, k)[0]].mean(1)


def majority_voted(predicted: np.ndarray, z: np.ndarray, seed: int = 0) -> np.ndarray:
    """CellTypist's majority voting: Leiden over-clustering of the held-out cells in z (n, d) at its
    resolution for that many cells, then each cluster's most frequent predicted label (n,)."""
    import anndata as ad
    import scanpy as sc

    n = len(z)
    resolution = next(r for limit, r in ((5000, 5), (20000, 10), (40000, 15), (100000, 20), (200000, 25), (np.inf, 30)) if n < limit)
    q = ad.AnnData(np.zeros((n, 1), np.float32), obsm={"z": z})
    sc.pp.neighbors(q, use_rep="z", n_neighbors=15, random_state=seed)
    sc.tl.leiden(q, resolution=resolution, random_state=seed, flavor="igraph", n_iterations=2, directed=False)
    votes = pd.Series(predicted).groupby(q.obs["leiden"].to_numpy()).agg(lambda s: s.value_counts().index[0])
    return votes.reindex(q.obs["leiden"].to_numpy()).to_numpy()


def joint_classifier_probs(model, z: np.ndarray) -> np.ndarray:
    """Probabilities (n, K) of the classifier trained jointly with the VAE (`classifier_weight`) on z (n, d)."""
    import torch

    classifier = model.module.classifier.eval()
    with torch.no_grad():
        return torch.softmax(classifier(torch.from_numpy(z)), -1).numpy()


def reference_knn_probs(z_reference: np.ndarray, labels: np.ndarray, z: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Probabilities (n, K) of a distance-weighted 15-NN classifier on the reference cells (bench_science's kNN), columns in `classes` order."""
    from sklearn.neighbors import KNeighborsClassifier

    knn = KNeighborsClassifier(n_neighbors=15, weights="distance").fit(z_reference, labels)
    return pd.DataFrame(knn.predict_proba(z), columns=knn.classes_).reindex(columns=classes, fill_value=0.0).to_numpy()


def load(dataset: str):
    loaders = {"liao": bench_science.load_liao, "synthetic": bench_science.load_synthetic, "kang_chemistry": bench_science.load_kang_chemistry}
    adata, splits = loaders[dataset]() if dataset in loaders else bench_science.load_kang([dataset])
    return adata, splits[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="liao", help="liao, synthetic, kang_chemistry, or a Kang donor held out (e.g. donor_1015).")
    ap.add_argument("--seeds", default="0", help="Comma-separated seeds.")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    from scinv.model import InVAE

    torch.set_num_threads(args.threads)
    adata, heldout = load(args.dataset)
    truth = adata.obs["cell_type"].astype(str)
    query = adata.obs["batch"].isin(heldout).to_numpy()
    adata.obs["label"] = truth.where(~query, bench_science.UNKNOWN).to_numpy()
    for seed in map(int, args.seeds.split(",")):
        model = InVAE(adata, layer="counts", batch_key="batch", label_key="label", unknown_label=bench_science.UNKNOWN)
        model.train(device="cpu", seed=seed, log_every=50)
        model.train_predictor(seed=seed)
        _, probs = model.predict(adata)
        classes, p = np.asarray(probs.columns), probs.to_numpy()[query]
        data = model._training_data()
        labelled = data.labels >= 0
        labels, envs = data.labels[labelled], data.environments[labelled]
        train_prior = np.mean([np.bincount(labels[envs == e], minlength=len(classes)) / (envs == e).sum() for e in np.unique(envs)], axis=0)
        adjusted, em_prior = em_label_shift(p, train_prior)
        t = truth[query].to_numpy()
        true_prior = pd.Series(t).value_counts(normalize=True).reindex(classes).fillna(0).to_numpy()
        z_all = model.get_latent_representation(adata, "inv")
        z, predicted = z_all[query], classes[p.argmax(1)]
        smoothed, voted = knn_smoothed(p, z), majority_voted(predicted, z, seed)
        joint = joint_classifier_probs(model, z)
        ensemble = p + joint + reference_knn_probs(z_all[~query], truth[~query].to_numpy(), z, classes)
        print(
            f"RESULT {args.dataset} seed {seed}: accuracy {np.mean(predicted == t):.4f}, "
            f"after label-shift EM {np.mean(classes[adjusted.argmax(1)] == t):.4f}, "
            f"kNN-smoothed {np.mean(classes[smoothed.argmax(1)] == t):.4f}, majority-voted {np.mean(voted == t):.4f}, "
            f"joint classifier {np.mean(classes[joint.argmax(1)] == t):.4f}, ensemble {np.mean(classes[ensemble.argmax(1)] == t):.4f}; "
            f"classes {list(classes)}, "
            f"training prior {np.round(train_prior, 3)}, EM prior {np.round(em_prior, 3)}, true prior {np.round(true_prior, 3)}",
            flush=True,
        )
        print(pd.crosstab(pd.Series(t, name="truth"), pd.Series(predicted, name="predicted")).to_string(), flush=True)


if __name__ == "__main__":
    main()
