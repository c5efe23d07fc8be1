"""Input merging, quality control and normalisation/HVG selection (thin over scanpy)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .errors import ScinvInputError
from .io import check_counts, read_counts, read_samplesheet

log = logging.getLogger("scinv")

MITO_PATTERN = r"^(?:MT-|mt-)"
RIBO_PATTERN = r"^(?:RP[SL]|Rp[sl])"


# ---------------------------------------------------------------------------------------------
# CHECK_INPUT


def load_input(
    input_path: str,
    batch_key: str = "batch",
    annotations: str | None = None,
    unknown_label: str = "Unknown",
    staged_dir: str | None = None,
) -> ad.AnnData:
    """Read a samplesheet CSV (or a single .h5ad) into one AnnData with raw counts in layers['counts'].

    Samplesheet columns beyond sample/path become obs columns; cell ids are `<sample>_<barcode>`.
    `annotations` is an optional CSV keyed by `cell_id` whose other columns are joined into obs
    (cells absent from it get `unknown_label`).
    """
    path = Path(input_path)
    if path.suffix.lower() == ".h5ad":
        adata = _load_single_h5ad(path, batch_key)
    elif path.suffix.lower() in (".csv", ".tsv", ".txt") or not path.suffix:
        adata = _load_samplesheet(path, batch_key, staged_dir)
    else:
        raise ScinvInputError(f"{path}: --input must be a samplesheet .csv or an .h5ad file")
    if annotations:
        adata = _join_annotations(adata, Path(annotations), unknown_label)
    adata.layers["counts"] = adata.X.copy()
    return adata


def _load_single_h5ad(path: Path, batch_key: str) -> ad.AnnData:
    adata = read_counts(path)  # keeps obs annotations of an .h5ad
    check_counts(adata.X, str(path))
    if "sample" not in adata.obs.columns:
        adata.obs["sample"] = adata.obs[batch_key].astype(str) if batch_key in adata.obs.columns else path.stem
    if batch_key not in adata.obs.columns:
        raise ScinvInputError(f"{path}: obs column '{batch_key}' not found (obs: {list(adata.obs.columns)[:10]}); set --batch_key")
    _check_unique_names(adata, str(path))
    return adata


def _check_unique_names(adata: ad.AnnData, where: str) -> None:
    if not adata.obs_names.is_unique:
        dup = adata.obs_names[adata.obs_names.duplicated()][:3].tolist()
        raise ScinvInputError(f"{where}: duplicated cell names {dup}; make obs_names unique")
    if not adata.var_names.is_unique:
        dup = adata.var_names[adata.var_names.duplicated()][:3].tolist()
        raise ScinvInputError(f"{where}: duplicated gene names {dup}; make var_names unique (e.g. var_names_make_unique)")


def _load_samplesheet(path: Path, batch_key: str, staged_dir: str | None = None) -> ad.AnnData:
    sheet = read_samplesheet(path, staged_dir)
    extra = [c for c in sheet.columns if c not in ("sample", "path")]
    parts = []
    for row in sheet.itertuples(index=False):
        row = row._asdict()
        adata = read_counts(row["path"])
        check_counts(adata.X, row["path"])
        adata.var_names_make_unique()
        adata.obs_names = [f"{row['sample']}_{bc}" for bc in adata.obs_names]
        adata.obs = pd.DataFrame(index=adata.obs_names)
        adata.obs["sample"] = row["sample"]
        for col in extra:
            adata.obs[col] = row[col]
        parts.append(adata)
    genes = set(parts[0].var_names)
    for p in parts[1:]:
        genes &= set(p.var_names)
    if not genes:
        raise ScinvInputError(f"{path}: the samples share no gene names; use files aligned to the same reference")
    merged = ad.concat(parts, join="inner", merge="same")
    for col in ["sample"] + extra:
        merged.obs[col] = pd.Categorical(merged.obs[col].astype(str))
    if batch_key not in merged.obs.columns:
        raise ScinvInputError(f"{path}: --batch_key '{batch_key}' is not a samplesheet column (columns: {list(sheet.columns)}); add it or change --batch_key")
    _check_unique_names(merged, str(path))
    merged.X = sp.csr_matrix(merged.X, dtype=np.float32)
    return merged


def _join_annotations(adata: ad.AnnData, path: Path, unknown_label: str) -> ad.AnnData:
    if not path.exists():
        raise ScinvInputError(f"{path}: annotation file not found; fix --annotations")
    table = pd.read_csv(path, dtype=str)
    if "cell_id" not in table.columns:
        raise ScinvInputError(f"{path}: needs a 'cell_id' column matching <sample>_<barcode> cell ids")
    table = table.drop_duplicates("cell_id").set_index("cell_id")
    matched = adata.obs_names.isin(table.index).sum()
    if matched == 0:
        raise ScinvInputError(f"{path}: no cell_id matches a cell (ids look like '{adata.obs_names[0]}'); fix the ids")
    for col in table.columns:
        adata.obs[col] = pd.Categorical(table[col].reindex(adata.obs_names).fillna(unknown_label).to_numpy())
    return adata


def check_obs_keys(adata: ad.AnnData, keys: list[str], where: str) -> None:
    for key in keys:
        if key and key not in adata.obs.columns:
            raise ScinvInputError(f"{where}: obs column '{key}' not found (available: {list(adata.obs.columns)}); fix the parameter or samplesheet")


# ---------------------------------------------------------------------------------------------
# QC


@dataclass
class QCThresholds:
    min_genes: int = 200
    min_counts: int = 500
    max_counts: float | None = None
    max_pct_mito: float = 20.0
    min_cells_per_gene: int = 3
    mad_threshold: float | None = None  # e.g. 5: also drop cells > n MADs from their sample's median
    doublets: bool = True


def heldout_cells(obs: pd.DataFrame, batch_key: str, heldout: list[str], where: str) -> np.ndarray:
    """(n_cells,) bool: cells of the `heldout` batches; every name must be a value of `batch_key`."""
    batches = obs[batch_key].astype(str)
    missing = sorted(set(heldout) - set(batches.unique()))
    if missing:
        raise ScinvInputError(f"{where}: held-out batches {missing} not in column '{batch_key}'; use values of that column in --heldout_batches")
    return batches.isin(heldout).to_numpy()


def qc_metrics(adata: ad.AnnData, mito_pattern: str = MITO_PATTERN, ribo_pattern: str = RIBO_PATTERN) -> None:
    """Per-cell total counts, genes, % mitochondrial and % ribosomal counts into obs (on layers['counts'])."""
    import scanpy as sc

    adata.var["mt"] = adata.var_names.str.contains(mito_pattern, regex=True)
    adata.var["ribo"] = adata.var_names.str.contains(ribo_pattern, regex=True)
    sc.pp.calculate_qc_metrics(adata, qc_vars=["mt", "ribo"], layer="counts", percent_top=None, log1p=False, inplace=True)


def _per_sample_threshold(adata: ad.AnnData, column: str, default):
    """A samplesheet column named like the threshold overrides the global value per sample."""
    if column in adata.obs.columns:
        values = pd.to_numeric(adata.obs[column].astype(str), errors="coerce").to_numpy(float)
        return np.where(np.isfinite(values), values, np.nan if default is None else default)
    return np.full(adata.n_obs, np.nan if default is None else default, dtype=float)


def _mad_outliers(values: np.ndarray, groups: np.ndarray, n_mads: float) -> np.ndarray:
    out = np.zeros(len(values), dtype=bool)
    for g in np.unique(groups):
        m = groups == g
        v = values[m]
        med = np.median(v)
        mad = np.median(np.abs(v - med)) * 1.4826 or 1e-9
        out[m] = np.abs(v - med) > n_mads * mad
    return out


def run_qc(adata: ad.AnnData, thr: QCThresholds, batch_key: str = "batch", seed: int = 0) -> tuple[ad.AnnData, pd.DataFrame]:
    """Flag and remove low-quality cells and doublets; return (filtered AnnData, per-sample table).

    Reasons are assigned in order (first failing reason counts): low_genes, low_counts,
    high_counts, high_mito, mad_outlier, doublet. Thresholds can be overridden per sample by obs
    columns named min_genes, min_counts, max_counts, max_pct_mito (from the samplesheet).
    """
    if "sample" not in adata.obs.columns:  # .h5ad inputs written outside CHECK_INPUT
        adata.obs["sample"] = adata.obs[batch_key].astype(str) if batch_key in adata.obs.columns else "all"
    qc_metrics(adata)
    reason = np.full(adata.n_obs, "", dtype=object)

    def flag(mask, name):
        reason[(reason == "") & mask] = name

    flag(adata.obs["n_genes_by_counts"].to_numpy() < _per_sample_threshold(adata, "min_genes", thr.min_genes), "low_genes")
    flag(adata.obs["total_counts"].to_numpy() < _per_sample_threshold(adata, "min_counts", thr.min_counts), "low_counts")
    max_counts = _per_sample_threshold(adata, "max_counts", thr.max_counts)
    flag(np.isfinite(max_counts) & (adata.obs["total_counts"].to_numpy() > max_counts), "high_counts")
    flag(adata.obs["pct_counts_mt"].to_numpy() > _per_sample_threshold(adata, "max_pct_mito", thr.max_pct_mito), "high_mito")
    if thr.mad_threshold:
        samples = adata.obs["sample"].astype(str).to_numpy()
        mad = np.zeros(adata.n_obs, dtype=bool)
        mad |= _mad_outliers(np.log1p(adata.obs["total_counts"].to_numpy()), samples, thr.mad_threshold)
        mad |= _mad_outliers(np.log1p(adata.obs["n_genes_by_counts"].to_numpy()), samples, thr.mad_threshold)
        flag(mad, "mad_outlier")
    adata.obs["doublet_score"] = np.nan
    if thr.doublets:
        flag(_scrublet(adata, reason == "", batch_key, seed), "doublet")
    adata.obs["qc_reason"] = pd.Categorical(np.where(reason == "", "kept", reason))
    table = qc_table(adata.obs)
    kept = adata[reason == ""].copy()
    if kept.n_obs == 0:
        raise ScinvInputError("QC removed every cell; relax --min_genes/--min_counts/--max_pct_mito (see the QC table)")
    empty = [s for s, n in table["kept"].items() if n == 0 and s != "total"]
    if empty:
        raise ScinvInputError(
            f"QC left zero cells in sample(s) {empty}; drop them from the samplesheet or relax their thresholds "
            "with per-sample columns (min_genes, min_counts, max_pct_mito)"
        )
    n_genes_before = kept.n_vars
    import scanpy as sc

    gene_ok = sc.pp.filter_genes(kept.layers["counts"], min_cells=thr.min_cells_per_gene, inplace=False)[0]
    kept = kept[:, gene_ok].copy()
    if kept.n_vars == 0:
        raise ScinvInputError(f"QC removed all {n_genes_before} genes; lower --min_cells_per_gene")
    kept.X = kept.layers["counts"].copy()
    return kept, table


def _scrublet(adata: ad.AnnData, candidates: np.ndarray, batch_key: str, seed: int) -> np.ndarray:
    """Scrublet per batch on raw counts of cells that passed the other filters; returns a doublet mask."""
    import scanpy as sc

    doublet = np.zeros(adata.n_obs, dtype=bool)
    scores = np.full(adata.n_obs, np.nan)
    batches = adata.obs[batch_key].astype(str).to_numpy() if batch_key in adata.obs else np.zeros(adata.n_obs, str)
    for b in np.unique(batches):
        idx = np.flatnonzero(candidates & (batches == b))
        if len(idx) < 100:
            log.warning("batch %s: %d cells, too few for doublet detection; skipped", b, len(idx))
            continue
        sub = ad.AnnData(adata.layers["counts"][idx].copy())
        sc.pp.scrublet(sub, use_approx_neighbors=False, random_state=seed, verbose=False)
        doublet[idx] = sub.obs["predicted_doublet"].to_numpy(bool)
        scores[idx] = sub.obs["doublet_score"].to_numpy()
    adata.obs["doublet_score"] = scores
    return doublet


def qc_table(obs: pd.DataFrame) -> pd.DataFrame:
    """Cells per sample: before, kept, and removed per reason, with a total row."""
    t = pd.crosstab(obs["sample"].astype(str), obs["qc_reason"].astype(str))
    for col in ("kept", "low_genes", "low_counts", "high_counts", "high_mito", "mad_outlier", "doublet"):
        if col not in t.columns:
            t[col] = 0
    t.insert(0, "before", t.sum(axis=1))
    t = t[["before", "kept", "low_genes", "low_counts", "high_counts", "high_mito", "mad_outlier", "doublet"]]
    t.loc["total"] = t.sum()
    t.index.name = "sample"
    return t


# ---------------------------------------------------------------------------------------------
# NORMALIZE


def normalize_and_select(
    adata: ad.AnnData,
    n_top_genes: int = 2000,
    batch_key: str | None = "batch",
    flavor: str = "seurat_v3",
    target_sum: float = 1e4,
    n_pcs: int = 50,
    seed: int = 0,
) -> ad.AnnData:
    """normalize_total + log1p into X, batch-aware HVGs on counts, subset to HVGs, PCA.

    Returns the HVG subset with raw counts in layers['counts'] (what the model trains on),
    log-normalised values in X and the unintegrated PCA in obsm['X_pca'].
    flavor 'pearson_residuals' puts residuals (computed on the HVGs only) in layers['pearson'].
    """
    import scanpy as sc

    n_top_genes = min(n_top_genes, adata.n_vars)
    bk = batch_key if batch_key and adata.obs[batch_key].nunique() > 1 else None
    if flavor in ("seurat_v3", "pearson_residuals"):
        hv_flavor = "seurat_v3" if flavor == "seurat_v3" else "pearson_residuals"
        sc.pp.highly_variable_genes(adata, n_top_genes=n_top_genes, flavor=hv_flavor, batch_key=bk, layer="counts", subset=False)
    adata.X = adata.layers["counts"].copy()
    sc.pp.normalize_total(adata, target_sum=target_sum)
    sc.pp.log1p(adata)
    if flavor not in ("seurat_v3", "pearson_residuals"):
        sc.pp.highly_variable_genes(adata, n_top_genes=n_top_genes, flavor=flavor, batch_key=bk, subset=False)
    hvg = adata[:, adata.var["highly_variable"].to_numpy()].copy()
    if flavor == "pearson_residuals":
        hvg.layers["pearson"] = sc.experimental.pp.normalize_pearson_residuals(hvg, layer="counts", inplace=False)["X"]
    n_comps = max(2, min(n_pcs, hvg.n_obs - 1, hvg.n_vars - 1))
    sc.pp.pca(hvg, n_comps=n_comps, random_state=seed)
    hvg.uns["scinv_normalize"] = {"n_top_genes": int(n_top_genes), "flavor": flavor, "batch_key": str(bk), "target_sum": float(target_sum)}
    return hvg

