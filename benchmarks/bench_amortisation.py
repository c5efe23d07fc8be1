"""Where the held-out batch's transfer errors come from: the labels' information in z_inv, or the
encoder's amortised inference on a batch it saw without labels.

Per seed, on the held-out batch of one `bench_science.py` split, scinv with its defaults:
- the predictor's accuracy on the encoder's posterior means (what `bench_science.py` scores);
- in-batch separability: 5-fold cross-validated accuracy of a logistic regression trained on the
  held-out batch's own z_inv and true labels, and the same on one labelled batch. If the held-out
  batch is much less separable than a labelled one, the encoder lost its labels' information
  there; if it is as separable, its cells are misplaced, not blurred;
- semi-amortised inference: each held-out cell's posterior (mean, log variance) refined by Adam
  steps on its own ELBO under the trained decoder and priors (the label-marginal prior, the training
  KL weights), then classified by the same predictor. This recovers what the likelihood knows and the
  amortised encoder missed (Cremer et al. 2018, "Inference suboptimality in VAEs");
- on the synthetic set, the Bayes-optimal accuracy: the NB likelihood of each held-out cell under each type's
  true profile times the held-out batch's true gene factors (the generator's own parameters).

    .venv/bin/python benchmarks/bench_amortisation.py --dataset synthetic --seeds 3,4,5
    .venv/bin/python benchmarks/bench_amortisation.py --dataset donor_1015 --seeds 3 --steps 10,50,100 --model-dir .bench/models
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_science  # noqa: E402  (its loaders, beside this file)
import bench_transfer_errors  # noqa: E402


def synthetic_bayes_accuracy(adata, heldout: str) -> float:
    """Accuracy of the generator's own classifier on the held-out batch of bench_science's synthetic set."""
    from scinv.datasets import _profiles

    rng = np.random.default_rng(0)  # bench_science.load_synthetic's generator, replayed up to the parameters
    n_cells, n_genes, n_batches, n_types = 4000, 1000, 4, 6
    rng.integers(0, n_types, n_cells), rng.integers(0, n_batches, n_cells)
    profiles, batch_fx = _profiles(rng, n_genes, n_batches, n_types, 0.8, 0.6, 0.1)
    cells = (adata.obs["batch"] == heldout).to_numpy()
    genes = adata.var_names.str[len("gene") :].astype(int)  # genes kept by preprocessing
    x = adata.layers["counts"][cells]
    x = np.asarray(x.toarray() if sp.issparse(x) else x, np.float64)
    lib, r = x.sum(1, keepdims=True), 5.0  # the generator's inverse dispersion
    loglik = []
    for t in range(n_types):
        mu = profiles[t] * batch_fx[int(heldout[1:])]
        mu = mu[genes] / mu[genes].sum() * lib
        loglik.append((x * np.log(mu / (mu + r)) + r * np.log(r / (mu + r))).sum(1))
    truth = adata.obs["cell_type"][cells].str[1:].astype(int).to_numpy()
    return float(np.mean(np.argmax(loglik, 0) == truth))


def refined_posterior(model, x, inv, spur, steps: int, lr: float, seed: int, chunk: int = 4096):
    """Posterior means (n, D) after `steps` Adam steps per cell on its ELBO; x (n, G) counts, inv (n, C_inv), spur (n, C_spur)."""
    import torch

    from scinv.module import negative_binomial_log_prob

    module, h = model.module.eval(), model.hparams
    for p in module.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    means = []
    for start in range(0, len(x), chunk):
        xs, iv, sp = x[start : start + chunk], inv[start : start + chunk], spur[start : start + chunk]
        unknown = torch.full((len(xs),), -1)
        log_lib = torch.log(xs.sum(1, keepdim=True).clamp_min(1))
        with torch.no_grad():
            qm0, qv0 = module.encoder(torch.log1p(xs), None)
        qm, log_qv = qm0.clone().requires_grad_(True), torch.log(qv0).requires_grad_(True)
        opt = torch.optim.Adam([qm, log_qv], lr=lr)
        for _ in range(steps):
            qv = log_qv.exp()
            z = qm + qv.sqrt() * torch.randn(qm.shape, generator=gen)
            log_mu = torch.log_softmax(module.decoder(z), -1) + log_lib
            nll = -negative_binomial_log_prob(xs, log_mu, module.log_theta.clamp(-12, 12))
            kl = h["kl_inv_weight"] * module.kl_invariant(z, qm, qv, unknown, iv) + h["kl_spur_weight"] * module.kl_spurious(z, qm, qv, sp)
            opt.zero_grad()
            (nll + kl).sum().backward()
            opt.step()
        means.append(qm.detach())
    return torch.cat(means)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="synthetic", help="synthetic, liao, kang_chemistry, or a Kang donor held out (e.g. donor_1015).")
    ap.add_argument("--seeds", default="3", help="Comma-separated seeds.")
    ap.add_argument("--steps", default="10,50,100", help="Refinement steps to score (comma-separated).")
    ap.add_argument("--lr", type=float, default=0.05, help="Adam learning rate of the refinement.")
    ap.add_argument("--model-dir", default=None, help="Keep trained models here and reuse them (one per dataset and seed).")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    from scinv.model import InVAE

    torch.set_num_threads(args.threads)
    adata, heldout = bench_transfer_errors.load(args.dataset)
    truth = adata.obs["cell_type"].astype(str).to_numpy()
    query = adata.obs["batch"].isin(heldout).to_numpy()
    adata.obs["label"] = np.where(query, bench_science.UNKNOWN, truth)
    if args.dataset == "synthetic":
        print(f"RESULT {args.dataset}: Bayes-optimal accuracy on {heldout[0]} {synthetic_bayes_accuracy(adata, heldout[0]):.4f}", flush=True)
    steps = sorted(map(int, args.steps.split(",")))
    for seed in map(int, args.seeds.split(",")):
        path = Path(args.model_dir, f"{args.dataset}_{seed}") if args.model_dir else None
        if path is not None and path.exists():
            model = InVAE.load(path)
            model.adata, model._data = adata, model.registry.encode(adata, args.dataset)
        else:
            model = InVAE(adata, layer="counts", batch_key="batch", label_key="label", unknown_label=bench_science.UNKNOWN)
            model.train(device="cpu", seed=seed, log_every=50)
            model.train_predictor(seed=seed)
            if path is not None:
                model.save(path)
        print(f"RESULT {args.dataset} seed {seed}: " + ", ".join(score(model, adata, truth, query, steps, args.lr, seed)), flush=True)


def score(model, adata, truth, query, steps, lr, seed) -> list[str]:
    """The predictor's accuracy on the held-out cells (amortised and refined) and in-batch separability."""
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    classes, d = np.asarray(model.registry.labels), model.hparams["n_latent_inv"]

    def accuracy(z_inv):
        with torch.no_grad():
            return float(np.mean(classes[model.predictor(z_inv).argmax(1).numpy()] == truth[query]))

    z = model.get_latent_representation(adata, "inv")
    one_batch = (adata.obs["batch"] == adata.obs["batch"][~query].iloc[0]).to_numpy()
    cv = {name: cross_val_score(LogisticRegression(max_iter=2000), z[c], truth[c], cv=5).mean() for name, c in (("held", query), ("one", one_batch))}
    row = [f"predictor {accuracy(torch.from_numpy(z[query])):.4f}", f"in-batch CV held-out {cv['held']:.4f} / one labelled batch {cv['one']:.4f}"]
    x = adata.layers["counts"][query]
    x = torch.from_numpy(np.asarray(x.toarray() if sp.issparse(x) else x, np.float32))
    inv, spur = (torch.from_numpy(a[query]) for a in (model._data.inv_covariates, model._data.spur_covariates))
    for n in steps:
        start = time.perf_counter()
        refined = refined_posterior(model, x, inv, spur, n, lr, seed)[:, :d]
        row.append(f"refined {n} steps {accuracy(refined):.4f} ({time.perf_counter() - start:.0f} s)")
    return row


if __name__ == "__main__":
    main()
