"""Reference mapping with novel-type detection: hold a cell type out of the reference, map a query that has it.

For each dataset, held-out type and seed:

1. reference = the non-query batches without the held-out type; its HVGs, QC and normalisation
   only (as the pipeline's reference run); scinv trained with labels, its predictor and its
   reference sample (``store_reference``: latents, novelty threshold from held-out reference cells);
2. query = the query batch(es), every type, aligned to the reference genes (``align_genes``) and
   mapped with ``map_query`` (query labels unused);
3. scored on the query: AUROC of the novelty score for "held-out type vs the rest" (and of 1 - max
   class probability, the usual uncertainty, for comparison); recall and false-call rate at the
   learned threshold; accuracy on the other types of the plain predictor and of the predictor with
   novel calls ("unknown" counts as wrong).

Datasets (data read from ../shared/data or the bundled assets, never committed):

- kang: Kang et al. 2018 control PBMCs; query donor_1015 (the largest); held out in turn: the three
  most abundant types (CD4 T cells, CD14+ Monocytes, B cells);
- liao: bundled Liao et al. 2020 BALF; query C149; held out: Monocyte (the most abundant type);
- synthetic: 6 types with their own expression profiles (``synthetic_counts``' default), 4 batches
  with strong batch effects, query b3; held out: t0;
- synthetic_weak: bench_science's hard set, types told apart only by weak markers on 10% of the
  genes (known-type accuracy ~0.84); query b3; held out: t0.

Rows go into `--csv` (finished runs are skipped on a rerun); the mean +- sd over seeds is printed.

    .venv/bin/python benchmarks/bench_mapping.py --seeds 0 1 2 --csv .bench/mapping.csv
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_science import ROOT, SHARED, UNKNOWN, log, markdown  # noqa: E402

SPLITS = {
    "kang": (["donor_1015"], ["CD4 T cells", "CD14+ Monocytes", "B cells"]),
    "liao": (["C149"], ["Monocyte"]),
    "synthetic": (["b3"], ["t0"]),
    "synthetic_weak": (["b3"], ["t0"]),
}
COLUMNS = [
    "dataset", "heldout_type", "seed", "query_cells", "novel_cells", "auroc_novelty", "auroc_max_probability", "novel_recall",
    "false_call_rate", "accuracy_known", "accuracy_known_with_novelty", "threshold", "fit_s",
]  # fmt: skip


def raw_data(name: str):
    """AnnData with raw counts in layers['counts'], obs batch and cell_type (after QC for Liao)."""
    import anndata as ad

    if name == "kang":
        adata = ad.read_h5ad(SHARED / "kang2018_pbmc_ctrl.h5ad")
        adata.obs = adata.obs[["batch", "cell_type"]].astype(str)
    elif name == "liao":
        from scinv.preprocess import QCThresholds, load_input, run_qc

        adata = load_input(str(ROOT / "assets" / "samplesheet_test.csv"), annotations=str(ROOT / "assets" / "liao2020" / "derived_celltype_labels.csv"))
        adata.obs["cell_type"] = adata.obs["celltype_derived"].astype(str)
        adata, _ = run_qc(adata, QCThresholds(), "batch", seed=0)
        adata.obs = adata.obs[["batch", "cell_type"]].astype(str)
    else:
        from scinv.datasets import synthetic_counts

        weak = {"type_strength": 0.6, "marker_fraction": 0.1} if name == "synthetic_weak" else {}
        adata = synthetic_counts(n_cells=4000, n_genes=1000, n_batches=4, n_types=6, batch_strength=0.8, seed=0, **weak)
        adata.obs = adata.obs[["batch", "cell_type"]].astype(str)
    adata.layers["counts"] = adata.X.copy()
    return adata


def run(adata, query_batches, heldout_type, seed) -> dict:
    from sklearn.metrics import roc_auc_score

    from scinv.mapping import align_genes
    from scinv.model import InVAE
    from scinv.preprocess import normalize_and_select

    in_query = adata.obs["batch"].isin(query_batches).to_numpy()
    reference = adata[~in_query & (adata.obs["cell_type"] != heldout_type).to_numpy()].copy()
    reference = normalize_and_select(reference, n_top_genes=2000, batch_key="batch", flavor="seurat", seed=seed)
    query, _ = align_genes(adata[in_query].copy(), list(reference.var_names), "query")
    start = time.perf_counter()
    model = InVAE(reference, layer="counts", batch_key="batch", label_key="cell_type", unknown_label=UNKNOWN)
    model.train(device="cpu", seed=seed, log_every=50)
    model.train_predictor(seed=seed)
    model.store_reference(seed=seed, umap=False)
    mapped = model.map_query(query, seed=seed, device="cpu")
    predicted, probs = mapped.predict(query)
    scores = mapped.novelty(query)
    fit_s = time.perf_counter() - start
    truth = query.obs["cell_type"].to_numpy()
    novel = truth == heldout_type
    known = ~novel & (truth != UNKNOWN)
    called = scores > mapped.reference.threshold
    correct = predicted == truth
    return {
        "query_cells": int(len(truth)),
        "novel_cells": int(novel.sum()),
        "auroc_novelty": roc_auc_score(novel, scores),
        "auroc_max_probability": roc_auc_score(novel, 1 - probs.to_numpy().max(axis=1)),
        "novel_recall": float(called[novel].mean()),
        "false_call_rate": float(called[known].mean()),
        "accuracy_known": float(correct[known].mean()),
        "accuracy_known_with_novelty": float((correct & ~called)[known].mean()),
        "threshold": mapped.reference.threshold,
        "fit_s": round(fit_s, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default="synthetic,synthetic_weak,liao,kang")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--csv", default=str(ROOT / ".bench" / "mapping.csv"))
    ap.add_argument("--markdown", default=None, help="Also write the summary table here.")
    args = ap.parse_args()
    out = Path(args.csv)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = pd.read_csv(out) if out.exists() else None
    for name in args.datasets.split(","):
        query_batches, types = SPLITS[name]
        adata = raw_data(name)
        for heldout in types:
            for seed in args.seeds:
                if done is not None and ((done["dataset"] == name) & (done["heldout_type"] == heldout) & (done["seed"] == seed)).any():
                    continue
                log(f"{name}: {heldout} held out of the reference, query {query_batches}, seed {seed}")
                row = {"dataset": name, "heldout_type": heldout, "seed": seed, **run(adata, query_batches, heldout, seed)}
                log(f"  {row}")
                done = pd.DataFrame([row]) if done is None else pd.concat([done, pd.DataFrame([row])], ignore_index=True)
                done[COLUMNS].to_csv(out, index=False)
    print(summarise(done).to_string())
    kang = done[done["dataset"] == "kang"]
    if len(kang):  # the bar: mean over the held-out types, per seed
        per_seed = kang.groupby("seed")[["auroc_novelty", "accuracy_known", "accuracy_known_with_novelty"]].mean()
        drop = per_seed["accuracy_known"] - per_seed["accuracy_known_with_novelty"]
        print(f"kang, mean over held-out types: AUROC {per_seed['auroc_novelty'].mean():.3f} ± {per_seed['auroc_novelty'].std():.3f}, "
              f"accuracy drop from novel calls {drop.mean():.3f} ± {drop.std():.3f} ({len(per_seed)} seeds)")  # fmt: skip
    if args.markdown:
        Path(args.markdown).write_text(markdown(summarise(done)))


def summarise(done: pd.DataFrame) -> pd.DataFrame:
    """Mean ± sd over seeds per dataset and held-out type; `accuracy_drop` = the cost of the novel calls on known types."""
    done = done.assign(accuracy_drop=done["accuracy_known"] - done["accuracy_known_with_novelty"])
    metrics = ["auroc_novelty", "auroc_max_probability", "novel_recall", "false_call_rate", "accuracy_known", "accuracy_known_with_novelty", "accuracy_drop"]
    g = done.groupby(["dataset", "heldout_type"], sort=False)
    table = g[metrics].mean().round(3).astype(str) + " ± " + g[metrics].std().fillna(0).round(3).astype(str)
    table["query cells (novel)"] = g["query_cells"].first().astype(str) + " (" + g["novel_cells"].first().astype(str) + ")"
    table["seeds"] = g.size()
    return table


if __name__ == "__main__":
    main()
