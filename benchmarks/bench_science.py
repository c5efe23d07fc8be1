"""Label transfer to unseen batches and scIB scores: scinv against PCA, Harmony, scVI and scANVI.

For each dataset, held-out split and seed, every method sees the same preprocessed data (the
pipeline's QC/normalisation functions) with the labels of the held-out batches hidden; the held-out
cells are in every method's training data unlabelled, as in the pipeline (`--heldout_batches`).
Scores per method:

- transfer accuracy and macro-F1 on the held-out cells: scinv's invariant predictor and scANVI's
  classifier as they are, every embedding also by a distance-weighted 15-NN classifier fitted on
  the reference cells ("kNN");
- scIB (the METRICS step's `fast` profile, k-means NMI/ARI included) of the embedding on all cells.

Datasets (the data files are read from ../shared/data or the bundled assets, never committed):

- kang: Kang et al. 2018 control PBMCs, 8 donors; leave-one-donor-out for `--kang-donors`;
- liao: the bundled Liao et al. 2020 BALF data, donor C149 held out (as `-profile test`);
- kang_chemistry: the Kang donors as three simulated 10x chemistries (per-gene capture efficiency,
  see `load_kang_chemistry`), batch = chemistry, the third one (2 donors) held out;
- kang_reads: the Kang donors, two of them as a read-count protocol would give them (every UMI
  amplified into reads with a per-gene bias, see `load_kang_reads`), held out: a depth shift of ~20x;
- synthetic: NB counts with strong batch effects and weak type markers, batch b3 held out.

Results go row by row into a CSV (`--csv`); runs already in it are skipped, so an interrupted
benchmark resumes, and variants (`--variant name:key=value,...`, scinv's options) can be added to it
later. The summary (mean +- sd over seeds) is printed and written as Markdown (`--markdown`).

    .venv/bin/python benchmarks/bench_science.py                       # everything, seeds 0 1 2
    .venv/bin/python benchmarks/bench_science.py --datasets kang --methods scinv --variant tc:tc_weight=1
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
UNKNOWN = "Unknown"
METHODS = ("scinv", "pca", "harmony", "scvi", "scanvi")
KANG_DONORS = ("donor_1015", "donor_1016", "donor_107")  # the largest, a middle and a small donor of the 8
COLUMNS = [
    "dataset",
    "heldout",
    "seed",
    "method",
    "fit_s",
    "epochs",
    "clf_accuracy",
    "clf_macro_f1",
    "knn_accuracy",
    "knn_macro_f1",
    "scib_total",
    "bio",
    "batch_correction",
]
COLUMNS += ["KMeans NMI", "KMeans ARI", "Silhouette label", "cLISI", "iLISI", "BRAS", "Graph connectivity", "PCR comparison"]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- datasets: (AnnData with counts layer, log-normalised X and X_pca; batch key; label key; splits) --
def prepare(adata, seed: int = 0):
    from scinv.preprocess import normalize_and_select

    return normalize_and_select(adata, n_top_genes=2000, batch_key="batch", flavor="seurat", seed=seed)


def load_kang(donors):
    import anndata as ad

    path = SHARED / "kang2018_pbmc_ctrl.h5ad"
    if not path.exists():
        raise SystemExit(f"{path}: not found; the Kang data are read from ../shared/data beside the project")
    adata = ad.read_h5ad(path)
    adata.obs = adata.obs[["batch", "cell_type"]].astype(str)
    adata.layers["counts"] = adata.X.copy()
    found = set(adata.obs["batch"])
    missing = [d for d in donors if d not in found]
    if missing:
        raise SystemExit(f"--kang-donors {missing} are not donors of the Kang data; use some of {sorted(found)}")
    return prepare(adata), [[d] for d in donors]


def chemistry_shift(counts, capture, seed: int):
    """Counts as another chemistry would capture them: each gene's UMIs kept with its probability
    `capture` (G,) (binomial thinning), the way capture efficiency differs between 10x chemistries."""
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    x = sp.csr_matrix(counts, dtype=np.float32, copy=True)
    p = np.asarray(capture, np.float64)[x.indices]
    x.data = rng.binomial(x.data.astype(np.int64), p).astype(np.float32)
    x.eliminate_zeros()
    return x


def load_kang_chemistry():
    """Kang's 8 donors as three 'chemistries' (sorted donors 3 + 3 + 2), each but the first with
    its own per-gene capture efficiency (median 0.6 / 0.4, log-sd 0.6, at most 1): a strong
    technical shift on real biology, the third chemistry held out (its 2 donors are new too)."""
    import anndata as ad

    adata = ad.read_h5ad(SHARED / "kang2018_pbmc_ctrl.h5ad")
    donors = sorted(adata.obs["batch"].astype(str).unique())
    chemistry = dict(zip(donors, ["chem_a"] * 3 + ["chem_b"] * 3 + ["chem_c"] * 2))
    adata.obs = pd.DataFrame({"batch": adata.obs["batch"].astype(str).map(chemistry), "cell_type": adata.obs["cell_type"].astype(str)}, index=adata.obs_names)
    rng = np.random.default_rng(2018)  # the same data for every method and seed
    blocks = []
    for i, (chem, median) in enumerate((("chem_a", 1.0), ("chem_b", 0.6), ("chem_c", 0.4))):
        rows = np.flatnonzero(adata.obs["batch"].to_numpy() == chem)
        capture = np.ones(adata.n_vars) if median == 1.0 else np.minimum(1.0, median * np.exp(rng.normal(0, 0.6, adata.n_vars)))
        blocks.append((rows, chemistry_shift(adata.X[rows], capture, seed=i)))
    import scipy.sparse as sp

    order = np.concatenate([rows for rows, _ in blocks])
    adata = adata[order].copy()
    adata.X = sp.vstack([x for _, x in blocks]).tocsr()
    adata = adata[np.asarray(adata.X.sum(axis=1)).ravel() > 0].copy()
    adata.layers["counts"] = adata.X.copy()
    return prepare(adata), [["chem_c"]]


def amplified_reads(counts, mean_reads, seed: int, shape: float = 1.0):
    """Read counts from UMI counts (cells, G): each molecule amplified into NB(mean mean_reads[g], shape)
    reads, so a count x becomes NB(mean x * mean_reads[g], shape * x) (PCR duplicates of a full-length,
    non-UMI protocol, with a per-gene amplification bias)."""
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    x = sp.csr_matrix(counts, dtype=np.float32, copy=True)
    m = np.asarray(mean_reads, np.float64)[x.indices]
    x.data = rng.negative_binomial(shape * x.data.astype(np.float64), shape / (shape + m)).astype(np.float32)
    x.eliminate_zeros()
    return x


def load_kang_reads():
    """Kang's 8 donors, batch = donor; the last two (sorted) merged into one batch 'reads' whose UMIs are
    amplified into reads (mean 20 per molecule, log-sd 0.5 across genes; fixed seed): a protocol without
    UMIs, ~20x deeper and noisier, held out."""
    import anndata as ad
    import scipy.sparse as sp

    adata = ad.read_h5ad(SHARED / "kang2018_pbmc_ctrl.h5ad")
    donors = sorted(adata.obs["batch"].astype(str).unique())
    batch = adata.obs["batch"].astype(str).map(lambda d: "reads" if d in donors[-2:] else d)
    adata.obs = pd.DataFrame({"batch": batch, "cell_type": adata.obs["cell_type"].astype(str)}, index=adata.obs_names)
    rng = np.random.default_rng(2018)  # the same data for every method and seed
    X = sp.csr_matrix(adata.X, dtype=np.float32)
    rows = np.flatnonzero(batch.to_numpy() == "reads")
    reads = amplified_reads(X[rows], 20.0 * np.exp(rng.normal(-0.125, 0.5, adata.n_vars)), seed=1)
    X = X.tolil()
    X[rows] = reads
    adata.X = X.tocsr()
    adata.layers["counts"] = adata.X.copy()
    return prepare(adata), [["reads"]]


def load_liao():
    from scinv.preprocess import QCThresholds, load_input, run_qc

    adata = load_input(str(ROOT / "assets" / "samplesheet_test.csv"), annotations=str(ROOT / "assets" / "liao2020" / "derived_celltype_labels.csv"))
    adata.obs["cell_type"] = adata.obs["celltype_derived"].astype(str)
    kept, _ = run_qc(adata, QCThresholds(), "batch", seed=0)
    kept.obs = kept.obs[["batch", "cell_type"]].astype(str)
    return prepare(kept), [["C149"]]


def load_synthetic():
    from scinv.datasets import synthetic_counts

    # strong per-gene batch factors, types told apart by a few weak markers: the shift is technical
    adata = synthetic_counts(n_cells=4000, n_genes=1000, n_batches=4, n_types=6, batch_strength=0.8, type_strength=0.6, marker_fraction=0.1, seed=0)
    adata.obs = adata.obs.astype(str)
    return prepare(adata), [["b3"]]


# -- methods: each returns {"embedding": (cells, d), optional "prediction": (cells,)} ----------------
def run_scinv(adata, labels, seed, options):
    from scinv.config import ModelConfig, PredictorConfig, TrainingConfig
    from scinv.model import InVAE

    fields = {k: {f for f in cls.__dataclass_fields__} for k, cls in (("model", ModelConfig), ("train", TrainingConfig), ("predictor", PredictorConfig))}
    model_opts = {k: v for k, v in options.items() if k in fields["model"]}
    train_opts = {k: v for k, v in options.items() if k in fields["train"] and k not in model_opts}
    pred_opts = {k[len("predictor_") :]: v for k, v in options.items() if k.startswith("predictor_")}
    unknown = set(options) - set(model_opts) - set(train_opts) - {k for k in options if k.startswith("predictor_")}
    if unknown:
        raise SystemExit(f"--variant: unknown scinv options {sorted(unknown)}")
    data = adata.copy()
    data.obs["label"] = labels.to_numpy()
    model = InVAE(data, layer="counts", batch_key="batch", label_key="label", unknown_label=UNKNOWN, **model_opts)
    model.train(device="cpu", **{"seed": seed, "log_every": 25, **train_opts})
    model.train_predictor(**{"seed": seed, **pred_opts})
    predicted, _ = model.predict(data)
    return {"embedding": model.get_latent_representation(data, "inv"), "prediction": predicted, "epochs": len(model.history)}


def run_pca(adata, labels, seed, options):
    return {"embedding": np.asarray(adata.obsm["X_pca"], np.float32)}


def run_harmony(adata, labels, seed, options):
    from scinv.baselines import harmony_embedding

    return {"embedding": harmony_embedding(adata, "batch", seed=seed, threads=2)}


_SCVI_CACHE: dict = {}  # (cells, labels, seed) -> the scVI model scANVI fine-tunes: scVI is trained once


def _scvi_model(adata, labels, seed, options):
    from scinv.baselines import train_scvi

    key = (adata.n_obs, tuple(labels), seed)
    if key not in _SCVI_CACHE:
        _SCVI_CACHE.clear()
        _SCVI_CACHE[key] = train_scvi(adata, "batch", n_latent=25, max_epochs=options.get("max_epochs"), seed=seed, accelerator="cpu", labels=labels)
    return _SCVI_CACHE[key]


def run_scvi(adata, labels, seed, options):
    return {"embedding": np.asarray(_scvi_model(adata, labels, seed, options).get_latent_representation(), np.float32)}


def run_scanvi(adata, labels, seed, options):
    from scinv.baselines import scanvi_embedding

    z, predicted = scanvi_embedding(adata, "batch", labels, UNKNOWN, seed=seed, accelerator="cpu", scvi_model=_scvi_model(adata, labels, seed, options))
    return {"embedding": z, "prediction": predicted}


RUNNERS = {"scinv": run_scinv, "pca": run_pca, "harmony": run_harmony, "scvi": run_scvi, "scanvi": run_scanvi}


# -- scoring ----------------------------------------------------------------------------------------
def score(adata, result, heldout, seed, n_jobs) -> dict:
    from sklearn.neighbors import KNeighborsClassifier

    from scinv.metrics import label_transfer_scores, run_scib

    truth = adata.obs["cell_type"].astype(str).to_numpy()
    query = adata.obs["batch"].astype(str).isin(heldout).to_numpy()
    z = result["embedding"]
    knn = KNeighborsClassifier(n_neighbors=15, weights="distance").fit(z[~query], truth[~query])
    row = {f"knn_{k}": v for k, v in label_transfer_scores(truth[query], knn.predict(z[query])).items()}
    if "prediction" in result:
        row.update({f"clf_{k}": v for k, v in label_transfer_scores(truth[query], np.asarray(result["prediction"]).astype(str)[query]).items()})
    scored = adata.copy()
    scored.obsm["X_method"] = z
    scib = run_scib(scored, ["X_method"], "batch", "cell_type", profile="fast", n_jobs=n_jobs, seed=seed).loc["X_method"]
    row.update({"bio": scib["Bio conservation"], "batch_correction": scib["Batch correction"], "scib_total": scib["Total"]})
    row.update(
        {c: scib[c] for c in ("KMeans NMI", "KMeans ARI", "Silhouette label", "cLISI", "iLISI", "BRAS", "Graph connectivity", "PCR comparison") if c in scib}
    )
    return row


def parse_variants(specs: list[str]) -> dict[str, dict]:
    """'name:key=value,key=value' -> {name: {key: value}} (values as int, float, bool or str)."""

    def value(text: str):
        for cast in (int, float):
            try:
                return cast(text)
            except ValueError:
                pass
        return {"true": True, "false": False}.get(text.lower(), text)

    variants = {}
    for spec in specs:
        name, _, body = spec.partition(":")
        variants[f"scinv[{name}]"] = {k: value(v) for k, v in (item.split("=", 1) for item in body.split(",") if item)}
    return variants


def method_options(methods: str, variants: list[str], baseline_epochs: int) -> dict[str, dict]:
    """--methods, --variant and --baseline-epochs -> {method: its options} (scVI and scANVI: their epochs)."""
    chosen = {m: {} for m in methods.split(",") if m}
    bad = [m for m in chosen if m not in RUNNERS]
    if bad:
        raise SystemExit(f"--methods: unknown {bad}; use some of {list(RUNNERS)}")
    for m in ("scvi", "scanvi"):
        if m in chosen:
            chosen[m] = {"max_epochs": baseline_epochs}
    chosen.update(parse_variants(variants))
    return chosen


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    """Mean and sd over seeds per dataset, split and method; 'transfer' = the method's own classifier if it has one, else kNN."""
    df = df.copy()
    df["transfer"] = df["clf_accuracy"].fillna(df["knn_accuracy"]) if "clf_accuracy" in df else df["knn_accuracy"]
    df["transfer_f1"] = df["clf_macro_f1"].fillna(df["knn_macro_f1"]) if "clf_macro_f1" in df else df["knn_macro_f1"]
    cols = ["transfer", "transfer_f1", "knn_accuracy", "scib_total", "bio", "batch_correction", "KMeans NMI", "KMeans ARI"]
    g = df.groupby(["dataset", "heldout", "method"], sort=False)[[c for c in cols if c in df]]
    out = g.mean().round(3).astype(str) + " ± " + g.std().fillna(0).round(3).astype(str)
    out["seeds"] = g.size()
    return out


def against_the_bar(df: pd.DataFrame, method: str = "scinv") -> pd.DataFrame:
    """Issue #16's bar per split, paired by seed: `method`'s transfer (its own classifier) minus the best
    baseline's (the highest of any baseline's classifier or kNN accuracy on that seed), and its batch
    correction minus scVI's. Mean, sd and the seeds where `method` is ahead; only seeds every method ran."""
    baselines = [m for m in df["method"].unique() if m in RUNNERS and m != method]
    rows = []
    for (name, heldout), split in df.groupby(["dataset", "heldout"], sort=False):
        wide = split.pivot_table(index="seed", columns="method", values=["clf_accuracy", "knn_accuracy", "batch_correction"])
        if method not in wide["knn_accuracy"] or not baselines or not set(baselines) <= set(wide["knn_accuracy"]):
            continue
        wide = wide.dropna(subset=[("knn_accuracy", m) for m in [method, *baselines]])
        ours = wide.get(("clf_accuracy", method), wide[("knn_accuracy", method)]).fillna(wide[("knn_accuracy", method)])
        best = pd.concat([wide[(c, m)] for c in ("clf_accuracy", "knn_accuracy") for m in baselines if (c, m) in wide], axis=1).max(axis=1)
        margin = ours - best
        row = {"dataset": name, "heldout": heldout, "seeds": len(wide), "transfer": ours.mean(), "best baseline": best.mean()}
        row.update({"margin": margin.mean(), "margin sd": margin.std(), "seeds ahead": int((margin > 0).sum())})
        if ("batch_correction", "scvi") in wide:
            batch = wide[("batch_correction", method)] - wide[("batch_correction", "scvi")]
            row.update({"batch - scVI": batch.mean(), "seeds batch >= scVI": int((batch >= 0).sum())})
        rows.append(row)
    return pd.DataFrame(rows).round(4)


def markdown(table: pd.DataFrame) -> str:
    """The summary as a Markdown table (pandas' to_markdown needs tabulate, which is not installed)."""
    flat = table.reset_index()
    rows = [list(flat.columns), ["---"] * flat.shape[1], *flat.astype(str).to_numpy().tolist()]
    return "\n".join("| " + " | ".join(map(str, row)) + " |" for row in rows) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="kang,liao,synthetic")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--kang-donors", default=",".join(KANG_DONORS), help="Kang donors held out one at a time.")
    ap.add_argument("--variant", action="append", default=[], help="An extra scinv run 'name:option=value,...' (model, training or predictor_* options).")
    ap.add_argument("--baseline-epochs", type=int, default=200, help="scVI (and scANVI's scVI pre-training) epochs; scinv's default max_epochs is 200 too.")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (1 when two benchmarks share 2 cores).")
    ap.add_argument("--csv", default=str(ROOT / "benchmarks" / "results" / "bench_science.csv"))
    ap.add_argument("--summarise-with", action="append", default=[], help="More result CSVs (e.g. of a run beside this one) for the summary.")
    ap.add_argument("--markdown", default=None, help="Write the summary table here too.")
    args = ap.parse_args()

    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(args.threads)
    methods = method_options(args.methods, args.variant, args.baseline_epochs)
    seeds = [int(s) for s in args.seeds.split(",")]
    csv = Path(args.csv)
    csv.parent.mkdir(parents=True, exist_ok=True)
    done = pd.read_csv(csv, dtype={"heldout": str}) if csv.exists() else pd.DataFrame(columns=["dataset", "heldout", "seed", "method"])
    have = set(zip(done["dataset"], done["heldout"].astype(str), done["seed"].astype(int), done["method"]))

    from scinv.data import hide_heldout_labels

    for name in args.datasets.split(","):
        log(f"{name}: preparing")
        adata, splits = {
            "kang": lambda: load_kang(args.kang_donors.split(",")),
            "kang_chemistry": load_kang_chemistry,
            "kang_reads": load_kang_reads,
            "liao": load_liao,
            "synthetic": load_synthetic,
        }[name]()
        log(f"{name}: {adata.n_obs} cells x {adata.n_vars} genes, batches {adata.obs['batch'].nunique()}, labels {adata.obs['cell_type'].nunique()}")
        for heldout in splits:
            labels = hide_heldout_labels(adata.obs, "batch", "cell_type", heldout, UNKNOWN, name)
            for seed in seeds:
                for method, options in methods.items():
                    key = (name, "+".join(heldout), seed, method)
                    if key in have:
                        continue
                    t0 = time.perf_counter()
                    runner = RUNNERS["scinv" if method.startswith("scinv[") else method]
                    result = runner(adata, labels, seed, options)
                    fit_s = time.perf_counter() - t0
                    row = {
                        "dataset": name,
                        "heldout": key[1],
                        "seed": seed,
                        "method": method,
                        "fit_s": round(fit_s, 1),
                        **score(adata, result, heldout, seed, args.threads),
                    }
                    if "epochs" in result:
                        row["epochs"] = result["epochs"]
                    log(
                        f"{name} {key[1]} seed {seed} {method}: transfer {row.get('clf_accuracy', row['knn_accuracy']):.3f} "
                        f"(kNN {row['knn_accuracy']:.3f}) scIB {row['scib_total']:.3f} bio {row['bio']:.3f} batch {row['batch_correction']:.3f} ({fit_s:.0f} s)"
                    )
                    pd.DataFrame([row]).reindex(columns=COLUMNS).to_csv(csv, mode="a", header=not csv.exists() or csv.stat().st_size == 0, index=False)
    results = pd.concat([pd.read_csv(f, dtype={"heldout": str}) for f in [csv, *args.summarise_with] if Path(f).exists()], ignore_index=True)
    table = summarise(results)
    print(table.to_string())
    bar = against_the_bar(results)
    if not bar.empty:
        print("\nscinv against issue #16's bar, paired by seed (margin: its transfer minus the best baseline's):")
        print(bar.to_string(index=False))
    if args.markdown:
        Path(args.markdown).write_text(markdown(table))


if __name__ == "__main__":
    main()
