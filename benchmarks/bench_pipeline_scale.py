"""Atlas scale (issue 18): the whole pipeline on a synthetic atlas of 100k to 1M cells; time and memory per step.

A synthetic atlas is written (cached under --data-dir) as one Cell Ranger v3
`filtered_feature_bc_matrix.h5` per sample plus a samplesheet (`sample,path,batch`): --genes genes
(13 MT- genes, 78 RPS/RPL genes, the rest GENE00001...), 8 cell types with marker genes, log-normal
library sizes (median ~5,000 UMIs), ~2,200 genes detected per cell, mild per-sample and per-batch
effects and ~4% damaged cells (high mitochondrial fraction, which QC removes). Each cell's UMIs are
drawn as gene indices from its type's profile (O(UMIs), one sample in memory at a time).

Then `main.nf` runs on it with the local executor and a Nextflow trace (fields below); the trace is
summarised per step: tasks, summed and largest task wall time (realtime), mean %CPU, largest peak
RSS, and a `whole run` row whose wall_s is the run's elapsed time (end to end, not summed). The
table is printed and written as CSV next to the trace. Without --labels the run has no labels
(no METRICS step); --labels joins `annotations.csv` (cell_id, cell_type) with --label_key cell_type.

    .venv/bin/python benchmarks/bench_pipeline_scale.py --cells 100000 --samples 20
    .venv/bin/python benchmarks/bench_pipeline_scale.py --cells 1000000 --samples 100 --samples-per-batch 4 --labels
    .venv/bin/python benchmarks/bench_pipeline_scale.py --cells 300000 --samples 60 --epochs 5 -- --n_top_genes 3000
    .venv/bin/python benchmarks/bench_pipeline_scale.py --cells 100000 --samples 20 --generate-only
    .venv/bin/python benchmarks/bench_pipeline_scale.py --trace .bench/atlas_100000_20/run_e3/trace.txt --markdown
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

ROOT = Path(__file__).resolve().parents[1]

MT_GENES = ["MT-ND1", "MT-ND2", "MT-CO1", "MT-CO2", "MT-ATP8", "MT-ATP6", "MT-CO3", "MT-ND3", "MT-ND4L", "MT-ND4", "MT-ND5", "MT-ND6", "MT-CYB"]
RIBO_GENES = (
    ["RPSA", "RPS2", "RPS3", "RPS3A", "RPS4X", "RPS4Y1", "RPS5", "RPS6", "RPS7", "RPS8", "RPS9", "RPS10", "RPS11", "RPS12", "RPS13", "RPS14"]
    + ["RPS15", "RPS15A", "RPS16", "RPS17", "RPS18", "RPS19", "RPS20", "RPS21", "RPS23", "RPS24", "RPS25", "RPS26", "RPS27", "RPS27A", "RPS28"]
    + ["RPS29", "RPLP0", "RPLP1", "RPLP2", "RPL3", "RPL4", "RPL5", "RPL6", "RPL7", "RPL7A", "RPL8", "RPL9", "RPL10", "RPL10A", "RPL11", "RPL12"]
    + ["RPL13", "RPL13A", "RPL14", "RPL15", "RPL17", "RPL18", "RPL18A", "RPL19", "RPL21", "RPL22", "RPL23", "RPL23A", "RPL24", "RPL26", "RPL27"]
    + ["RPL27A", "RPL28", "RPL29", "RPL30", "RPL31", "RPL32", "RPL34", "RPL35", "RPL35A", "RPL36", "RPL36A", "RPL37", "RPL37A", "RPL38", "RPL39", "RPL41"]
)
GENE_SHAPE = 0.13  # gamma shape of the expression profile: heavy tail, most genes rarely detected
RIBO_SHARE = 0.2  # ribosomal genes' share of the non-mitochondrial UMIs
N_MARKERS = 50  # marker genes per cell type
LIBRARY_MEDIAN, LIBRARY_SD = 5000, 0.5  # log-normal UMIs per cell
DAMAGED_FRACTION = 0.04  # cells with 25-70% mitochondrial UMIs (and half the library)
TRACE_FIELDS = "task_id,hash,process,tag,name,status,exit,attempt,cpus,memory,submit,start,complete,duration,realtime,%cpu,peak_rss,rss"


# ---------------------------------------------------------------------------------------------
# Synthetic atlas


def gene_names(n_genes: int) -> np.ndarray:
    n_other = n_genes - len(MT_GENES) - len(RIBO_GENES)
    return np.array(MT_GENES + RIBO_GENES + [f"GENE{i:05d}" for i in range(1, n_other + 1)])


def atlas_model(rng, n_genes: int, n_types: int, n_batches: int) -> dict:
    """Shared by all samples: type profiles (T, G) without MT genes, the MT profile, batch effects."""
    n_mt, ribo = len(MT_GENES), slice(len(MT_GENES), len(MT_GENES) + len(RIBO_GENES))
    base = rng.gamma(GENE_SHAPE, 1.0, n_genes)
    base[:n_mt] = 0.0
    base[ribo] = rng.gamma(4.0, 1.0, len(RIBO_GENES))
    base[ribo] *= RIBO_SHARE / (1 - RIBO_SHARE) * (base.sum() - base[ribo].sum()) / base[ribo].sum()
    profiles = base * np.exp(rng.normal(0.0, 0.5, (n_types, n_genes)))
    high = np.quantile(base[ribo.stop :], 0.99)
    for t in range(n_types):
        markers = rng.choice(np.arange(ribo.stop, n_genes), N_MARKERS, replace=False)
        profiles[t, markers] = np.maximum(profiles[t, markers], high * rng.uniform(0.5, 3.0, N_MARKERS))
    mito = np.zeros(n_genes)
    mito[:n_mt] = rng.gamma(2.0, 1.0, n_mt)
    type_weights = 0.75 ** np.arange(n_types)
    return {
        "profiles": profiles,
        "mito": mito,
        "batch_effects": np.exp(rng.normal(0.0, 0.3, (n_batches, n_genes))),
        "type_weights": type_weights / type_weights.sum(),
    }


def alias_table(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Walker/Vose alias table of a discrete distribution: draw k uniformly, keep it with
    probability accept[k], else take alias[k]. O(1) per draw, unlike a search of the CDF."""
    n = len(weights)
    accept, alias = (weights * (n / weights.sum())).tolist(), list(range(n))
    small, large = [k for k in range(n) if accept[k] < 1], [k for k in range(n) if accept[k] >= 1]
    while small and large:
        s, g = small.pop(), large[-1]
        alias[s] = g
        accept[g] -= 1 - accept[s]
        if accept[g] < 1:
            small.append(large.pop())
    for k in small + large:  # left over by rounding
        accept[k] = 1.0
    return np.array(accept), np.array(alias)


def draw_counts(rng, profiles: np.ndarray, profile_per_cell: list[np.ndarray], umis_per_cell: list[np.ndarray], chunk: int = 500) -> sp.csr_matrix:
    """CSR int32 (cells, genes): cell i gets umis_per_cell[k][i] UMIs from profiles[profile_per_cell[k][i]]."""
    n_genes, n_cells = profiles.shape[1], len(umis_per_cell[0])
    tables = [alias_table(p) for p in profiles]
    accept, alias = np.concatenate([t[0] for t in tables]), np.concatenate([t[1] for t in tables])
    data, indices, indptr = [], [], [np.zeros(1, dtype=np.int64)]
    for start in range(0, n_cells, chunk):
        rows = slice(start, min(start + chunk, n_cells))
        n = rows.stop - start
        umis = [u[rows] for u in umis_per_cell]
        cell = np.concatenate([np.repeat(np.arange(n), u) for u in umis])
        flat = np.concatenate([np.repeat(p[rows] * n_genes, u) for p, u in zip(profile_per_cell, umis)])
        x = rng.random(len(flat)) * n_genes
        k = x.astype(np.int64)
        flat += k
        gene = np.where(x - k < accept[flat], k, alias[flat])
        counts = np.bincount(cell * n_genes + gene, minlength=n * n_genes)
        nonzero = np.flatnonzero(counts)
        data.append(counts[nonzero].astype(np.int32))
        indices.append((nonzero % n_genes).astype(np.int32))
        indptr.append(np.searchsorted(nonzero, np.arange(1, n + 1) * n_genes) + indptr[-1][-1])
    matrix = (np.concatenate(data), np.concatenate(indices), np.concatenate(indptr))
    return sp.csr_matrix(matrix, shape=(n_cells, n_genes))


def barcodes(rng, n: int) -> np.ndarray:
    """n distinct 10x-style barcodes (AAACCTGAGAAACCAT-1)."""
    codes = rng.choice(4**16, n, replace=False)
    digits = (codes[:, None] >> (2 * np.arange(15, -1, -1))) & 3
    letters = np.frombuffer(b"ACGT", dtype="S1")[digits]
    return np.char.add(letters.view("S16").ravel().astype(str), "-1")


def simulate_sample(rng, model: dict, batch: int, n_cells: int) -> tuple[sp.csr_matrix, np.ndarray]:
    """(counts CSR int32, cell type per cell) of one sample of `batch`."""
    n_types, n_genes = model["profiles"].shape
    sample_effect = np.exp(rng.normal(0.0, 0.1, n_genes))
    profiles = np.vstack([model["profiles"] * model["batch_effects"][batch] * sample_effect, model["mito"]])
    types = rng.choice(n_types, n_cells, p=rng.dirichlet(50 * model["type_weights"]))
    library = rng.lognormal(np.log(LIBRARY_MEDIAN) + rng.normal(0.0, 0.15), LIBRARY_SD, n_cells)
    mito_fraction = rng.beta(5, 100, n_cells)
    damaged = rng.random(n_cells) < DAMAGED_FRACTION
    mito_fraction[damaged] = rng.uniform(0.25, 0.7, damaged.sum())
    library[damaged] *= 0.5
    n_mito = rng.binomial(library.astype(np.int64), mito_fraction)
    n_other = library.astype(np.int64) - n_mito
    counts = draw_counts(rng, profiles, [types, np.full(n_cells, n_types)], [n_other, n_mito])
    return counts, types


def write_sample(path: Path, sample: str, counts: sp.csr_matrix, types: np.ndarray, genes: np.ndarray, cells: np.ndarray) -> None:
    """The sample's .h5 (written last, atomically: its presence means the sample is done) and cell_types.csv."""
    import anndata as ad

    from scinv.datasets import write_10x_h5

    path.parent.mkdir(parents=True, exist_ok=True)
    labels = pd.DataFrame({"cell_id": np.char.add(f"{sample}_", cells), "cell_type": np.char.add("type", types.astype(str))})
    labels.to_csv(path.parent / "cell_types.csv", index=False)
    tmp = path.with_name(path.name + ".tmp")
    write_10x_h5(ad.AnnData(counts, obs=pd.DataFrame(index=cells), var=pd.DataFrame(index=genes)), tmp)
    os.replace(tmp, path)


def split_evenly(total: int, weights: np.ndarray) -> np.ndarray:
    """Cells per sample: integers proportional to weights that sum to total."""
    edges = np.round(np.cumsum(np.r_[0.0, weights]) / weights.sum() * total).astype(int)
    return np.diff(edges)


def generate_atlas(data_dir: Path, n_cells: int, n_samples: int, n_genes: int, samples_per_batch: int, n_types: int, seed: int) -> tuple[Path, Path]:
    """Write (or reuse) the atlas; returns (samplesheet, annotations CSV)."""
    spec = {"cells": n_cells, "samples": n_samples, "genes": n_genes, "samples_per_batch": samples_per_batch, "types": n_types, "seed": seed}
    data_dir.mkdir(parents=True, exist_ok=True)
    spec_file, sheet, annotations = data_dir / "atlas.json", data_dir / "samplesheet.csv", data_dir / "annotations.csv"
    if spec_file.exists() and json.loads(spec_file.read_text()) != spec:
        sys.exit(f"{data_dir} holds another atlas ({spec_file.read_text().strip()}); choose another --data-dir")
    spec_file.write_text(json.dumps(spec))
    if sheet.exists() and annotations.exists():
        print(f"reusing {data_dir}", flush=True)
        return sheet, annotations

    rng = np.random.default_rng(seed)
    n_batches = -(-n_samples // samples_per_batch)
    model = atlas_model(rng, n_genes, n_types, n_batches)
    genes = gene_names(n_genes)
    sizes = split_evenly(n_cells, rng.uniform(0.7, 1.3, n_samples))
    width = len(str(n_samples))
    rows, t_all = [], time.perf_counter()
    for i, n in enumerate(sizes):
        sample, batch = f"S{i + 1:0{width}d}", i // samples_per_batch
        batch_name = sample if samples_per_batch == 1 else f"B{batch + 1:0{width}d}"
        path = data_dir / sample / "filtered_feature_bc_matrix.h5"
        rows.append({"sample": sample, "path": str(path), "batch": batch_name})
        if path.exists():
            continue
        t0 = time.perf_counter()
        sample_rng = np.random.default_rng([seed, i + 1])
        counts, types = simulate_sample(sample_rng, model, batch, int(n))
        write_sample(path, sample, counts, types, genes, barcodes(sample_rng, int(n)))
        print(f"{sample}: {n} cells, {counts.nnz / n:.0f} genes/cell, {counts.sum() / n:.0f} UMIs/cell, {time.perf_counter() - t0:.1f} s", flush=True)
    pd.concat(pd.read_csv(data_dir / r["sample"] / "cell_types.csv") for r in rows).to_csv(annotations.with_suffix(".tmp"), index=False)
    os.replace(annotations.with_suffix(".tmp"), annotations)
    pd.DataFrame(rows).to_csv(sheet, index=False)
    size_gb = sum(Path(r["path"]).stat().st_size for r in rows) / 1e9
    print(f"wrote {sheet}: {n_cells} cells, {n_samples} samples, {size_gb:.2f} GB in {time.perf_counter() - t_all:.0f} s", flush=True)
    return sheet, annotations


# ---------------------------------------------------------------------------------------------
# Pipeline run


def run_pipeline(sheet: Path, run_dir: Path, epochs: int, annotations: Path | None, extra: list[str]) -> tuple[int, float]:
    """Run main.nf (local executor, output streamed to the terminal); returns (exit status, seconds)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    config = run_dir / "trace.config"
    config.write_text(f"trace {{\n    enabled   = true\n    overwrite = true\n    raw       = true\n    fields    = '{TRACE_FIELDS}'\n}}\n")
    cmd = [str(ROOT / "tools" / "nextflow"), "run", str(ROOT / "main.nf"), "-c", str(config), "--input", str(sheet)]
    cmd += ["--outdir", str(run_dir / "results"), "-work-dir", str(run_dir / "work"), "-with-trace", str(run_dir / "trace.txt")]
    cmd += ["--max_epochs", str(epochs)]
    if annotations is not None:
        cmd += ["--annotations", str(annotations), "--label_key", "cell_type"]
    cmd += extra
    print(" ".join(cmd), flush=True)
    t0 = time.perf_counter()
    status = subprocess.run(cmd, cwd=run_dir).returncode  # cwd: .nextflow/ and .nextflow.log go to run_dir
    return status, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# Trace summary (raw or human-readable traces, any field order)

DURATION_UNITS = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
MEMORY_UNITS = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}


def seconds(value: str) -> float:
    """'1h 2m 3s', '350ms' (human) or '3723000' (raw, ms); nan for '-'."""
    if re.fullmatch(r"[\d.]+", value):
        return float(value) / 1000
    parts = re.findall(r"([\d.]+)\s*(ms|s|m|h|d)\b", value)
    return sum(float(n) * DURATION_UNITS[u] for n, u in parts) if parts else float("nan")


def gigabytes(value: str) -> float:
    """'1.2 GB' (human, binary units) or '1288490188' (raw, bytes) in GB (1e9 bytes); nan for '-'."""
    match = re.fullmatch(r"([\d.]+)\s*([KMGT]?B)?", value.strip())
    return float(match[1]) * MEMORY_UNITS[match[2] or "B"] / 1e9 if match else float("nan")


def timestamp_s(value: str) -> float:
    """'2025-01-31 12:00:00.123' (human) or epoch ms (raw) in epoch seconds; nan for '-'."""
    if re.fullmatch(r"\d+", value):
        return int(value) / 1000
    stamp = pd.to_datetime(value, errors="coerce")
    return stamp.timestamp() if not pd.isna(stamp) else float("nan")


def percent(value: str) -> float:
    """'95.3%' (human) or '95.3' (raw); nan for '-'."""
    return float(value.rstrip("%")) if value not in ("", "-") else float("nan")


def read_trace(path) -> pd.DataFrame:
    """One row per task: step, status, realtime_s, cpu_pct, peak_rss_gb, submit_s, end_s (completion;
    submission + duration when the trace has no 'complete' field, as Nextflow's default fields)."""
    raw = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    process = raw["process"] if "process" in raw else raw["name"].str.replace(r"\s*\(.*\)$", "", regex=True)

    def column(name, parse):
        return raw[name].map(parse) if name in raw else pd.Series(np.nan, index=raw.index)

    submit_s = column("submit", timestamp_s)
    end_s = column("complete", timestamp_s) if "complete" in raw else submit_s + column("duration", seconds)
    return pd.DataFrame(
        {
            "step": process.str.split(":").str[-1],
            "status": raw["status"],
            "realtime_s": column("realtime", seconds),
            "cpu_pct": column("%cpu", percent),
            "peak_rss_gb": column("peak_rss", gigabytes),
            "submit_s": submit_s,
            "end_s": end_s,
        }
    )


def summarise_trace(path, run_wall_s: float | None = None) -> pd.DataFrame:
    """Per step (in order of first submission): tasks, failed, wall_s (summed realtime), max_task_s,
    mean_cpu_pct, max_peak_rss_gb; then a 'whole run' row whose wall_s is the run's elapsed time
    (run_wall_s, else first submission to last completion in the trace)."""
    tasks = read_trace(path)
    tasks["failed"] = ~tasks["status"].isin(["COMPLETED", "CACHED"])
    order = tasks.groupby("step", sort=False)["submit_s"].min().sort_values(kind="stable").index
    per_step = tasks.groupby("step", sort=False).agg(
        tasks=("status", "size"),
        failed=("failed", "sum"),
        wall_s=("realtime_s", "sum"),
        max_task_s=("realtime_s", "max"),
        mean_cpu_pct=("cpu_pct", "mean"),
        max_peak_rss_gb=("peak_rss_gb", "max"),
    )
    if run_wall_s is None:
        run_wall_s = tasks["end_s"].max() - tasks["submit_s"].min()
    whole = {
        "tasks": len(tasks),
        "failed": int(tasks["failed"].sum()),
        "wall_s": run_wall_s,
        "max_task_s": tasks["realtime_s"].max(),
        "mean_cpu_pct": tasks["cpu_pct"].mean(),
        "max_peak_rss_gb": tasks["peak_rss_gb"].max(),
    }
    table = pd.concat([per_step.loc[order], pd.DataFrame([whole], index=["whole run"])])
    table.index.name = "step"
    return table.round({"wall_s": 1, "max_task_s": 1, "mean_cpu_pct": 0, "max_peak_rss_gb": 2})


def markdown(table: pd.DataFrame) -> str:
    """The table as Markdown (pandas' to_markdown needs tabulate, which is not installed)."""
    flat = table.reset_index()
    rows = [list(flat.columns), ["---"] * flat.shape[1], *flat.astype(str).to_numpy().tolist()]
    return "\n".join("| " + " | ".join(map(str, row)) + " |" for row in rows)


def report(trace: Path, run_wall_s: float | None, as_markdown: bool) -> None:
    table = summarise_trace(trace, run_wall_s)
    csv = trace.with_name(trace.stem + "_summary.csv")
    table.to_csv(csv)
    print(markdown(table) if as_markdown else table.to_string())
    whole = table.loc["whole run"]
    print(f"whole run: {whole['wall_s']:.0f} s elapsed, max peak RSS of a task {whole['max_peak_rss_gb']:.2f} GB; summary written to {csv}")


# ---------------------------------------------------------------------------------------------


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, usage="%(prog)s [options] [-- pipeline options]")
    ap.add_argument("--cells", type=int, default=100_000)
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--samples-per-batch", type=int, default=1, help="K samples per batch (default 1: batch = sample).")
    ap.add_argument("--genes", type=int, default=20_000)
    ap.add_argument("--types", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", help="Atlas folder (default .bench/atlas_<cells>_<samples>, gitignored).")
    ap.add_argument("--run-dir", help="Pipeline results, work dir and trace (default <data-dir>/run_e<epochs>[_labels]).")
    ap.add_argument("--epochs", type=int, default=3, help="--max_epochs of the run.")
    ap.add_argument("--labels", action="store_true", help="Join annotations.csv and train with --label_key cell_type.")
    ap.add_argument("--generate-only", action="store_true", help="Write the atlas, do not run the pipeline.")
    ap.add_argument("--trace", type=Path, help="Only summarise this existing trace file (no generation or run).")
    ap.add_argument("--markdown", action="store_true", help="Print the summary as a Markdown table.")
    args = ap.parse_args(argv)
    if args.genes < len(MT_GENES) + len(RIBO_GENES) + N_MARKERS * args.types:
        ap.error("--genes is too small for the MT, ribosomal and marker genes")
    if args.trace:
        return report(args.trace, None, args.markdown)

    data_dir = Path(args.data_dir or ROOT / ".bench" / f"atlas_{args.cells}_{args.samples}")
    sheet, annotations = generate_atlas(data_dir.resolve(), args.cells, args.samples, args.genes, args.samples_per_batch, args.types, args.seed)
    if args.generate_only:
        return
    run_dir = Path(args.run_dir or data_dir / f"run_e{args.epochs}{'_labels' if args.labels else ''}").resolve()
    status, wall = run_pipeline(sheet, run_dir, args.epochs, annotations if args.labels else None, extra)
    trace = run_dir / "trace.txt"
    if trace.exists():
        report(trace, wall, args.markdown)
    if status:
        sys.exit(f"the pipeline exited with status {status} after {wall:.0f} s (any summary above covers the tasks it ran)")


if __name__ == "__main__":
    main()
