"""Input merging, quality control and normalisation/HVG selection (thin over scanpy)."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .errors import ScinvInputError, first_line
from .io import check_counts, read_counts, read_h5ad, read_samplesheet
from .labels import as_strings, normalize_labels

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
    shown_as: str | None = None,
) -> ad.AnnData:
    """Read a samplesheet CSV (or a single .h5ad) into one AnnData with raw counts in layers['counts'].

    Samplesheet columns beyond sample/path become obs columns; cell ids are `<sample>_<barcode>`.
    `annotations` is an optional CSV keyed by `cell_id` whose other columns are joined into obs
    (cells absent from it get `unknown_label`). `shown_as`: the --input as the user wrote it
    (Nextflow hands over a staged copy); error messages name it, not the copy.
    """
    path = Path(input_path)
    if path.suffix.lower() == ".h5ad":
        with _naming(str(path), shown_as):
            adata = _load_single_h5ad(path, batch_key)
    elif path.suffix.lower() in (".csv", ".tsv", ".txt") or not path.suffix:
        adata = _load_samplesheet(path, batch_key, staged_dir, shown_as)
    else:
        raise ScinvInputError(f"{shown_as or path}: input must be a samplesheet .csv or an .h5ad file")
    if annotations:
        adata = _join_annotations(adata, Path(annotations), unknown_label)
    adata.layers["counts"] = adata.X.copy()
    return adata


def _load_single_h5ad(path: Path, batch_key: str) -> ad.AnnData:
    adata = read_counts(path)  # keeps obs annotations of an .h5ad
    check_counts(adata.X, str(path))
    if "sample" not in adata.obs.columns:
        adata.obs["sample"] = as_strings(adata.obs[batch_key]).to_numpy() if batch_key in adata.obs.columns else path.stem
    if batch_key not in adata.obs.columns:
        raise ScinvInputError(f"{path}: obs column '{batch_key}' not found (obs: {list(adata.obs.columns)[:10]}); set batch_key")
    _make_names_unique(adata, str(path))
    return adata


def _make_names_unique(adata: ad.AnnData, where: str) -> None:
    """Merged exports repeat barcodes across samples and symbols across Ensembl ids: suffix them."""
    for axis, names in (("cell", adata.obs_names), ("gene", adata.var_names)):
        if not names.is_unique:
            dup = names[names.duplicated()][:3].tolist()
            log.warning("%s: %d duplicated %s names (e.g. %s) made unique with -1, -2 suffixes", where, int(names.duplicated().sum()), axis, dup)
    adata.obs_names_make_unique()
    adata.var_names_make_unique()


@contextlib.contextmanager
def _naming(staged: str, shown: str | None):
    """Re-raise input errors with the staged copy's path replaced by the name the user gave."""
    try:
        yield
    except ScinvInputError as err:
        if not shown or shown == staged:
            raise
        raise ScinvInputError(str(err).replace(staged, shown)) from err


def _load_samplesheet(path: Path, batch_key: str, staged_dir: str | None = None, shown_as: str | None = None) -> ad.AnnData:
    sheet = read_samplesheet(path, staged_dir, shown_as)
    extra = [c for c in sheet.columns if c not in ("sample", "path")]
    parts = []
    for row in sheet.itertuples(index=False):
        row = row._asdict()
        adata = _read_sample_counts(row["path"], sheet.attrs["shown"].get(row["path"]))
        parts.append(_obs_from_row(adata, row))
    genes = set(parts[0].var_names)
    for p in parts[1:]:
        genes &= set(p.var_names)
    if not genes:
        raise ScinvInputError(f"{path}: the samples share no gene names; use files aligned to the same reference")
    merged = ad.concat(parts, join="inner", merge="same")
    for col in ["sample"] + extra:
        merged.obs[col] = pd.Categorical(merged.obs[col].astype(str))
    if batch_key not in merged.obs.columns:
        raise ScinvInputError(f"{path}: batch_key '{batch_key}' is not a samplesheet column (columns: {list(sheet.columns)}); add it or change --batch_key")
    _make_names_unique(merged, str(path))
    merged.X = sp.csr_matrix(merged.X, dtype=np.float32)
    return merged


def _read_annotations(path: Path) -> pd.DataFrame:
    """The annotation CSV indexed by cell_id (first row of each id), values as strings."""
    if not path.exists():
        raise ScinvInputError(f"{path}: annotation file not found; fix annotations")
    if path.is_dir():
        raise ScinvInputError(f"{path}: annotations must be a CSV file, not a folder")
    try:
        table = pd.read_csv(path, dtype=str)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise ScinvInputError(f"{path}: not a readable CSV table ({first_line(err)}); annotations needs a CSV with a cell_id column") from err
    if "cell_id" not in table.columns:
        raise ScinvInputError(f"{path}: needs a 'cell_id' column matching <sample>_<barcode> cell ids")
    return table.drop_duplicates("cell_id").set_index("cell_id")


def _join_annotations(adata: ad.AnnData, path: Path, unknown_label: str, require_match: bool = True) -> ad.AnnData:
    """Join the annotation columns on cell id; unmatched cells get `unknown_label`. `require_match`:
    no matching cell is an error (a whole input; one sample may have no annotated cell)."""
    table = _read_annotations(path)
    if require_match and not adata.obs_names.isin(table.index).any():
        raise ScinvInputError(f"{path}: no cell_id matches a cell (ids look like '{adata.obs_names[0]}'); fix the ids")
    for col in table.columns:
        adata.obs[col] = pd.Categorical(table[col].reindex(adata.obs_names).fillna(unknown_label).to_numpy())
    return adata


# Columns CHECK_INPUT adds to the validated samplesheet (not obs columns)
SHEET_PATH_COLUMNS = ("path", "shown_path", "keep_obs")


def validate_input(
    input_path: str,
    batch_key: str = "batch",
    obs_keys: list[str] | None = None,
    annotations: str | None = None,
    label_key: str | None = None,
    unknown_label: str = "Unknown",
    shown_as: str | None = None,
    split_dir: str | None = None,
    check_files: bool = True,
    min_batches: int = 2,
    heldout_batches: list[str] | None = None,
) -> pd.DataFrame:
    """CHECK_INPUT: validate --input without reading count matrices; return one row per sample.

    A samplesheet is checked for its structure, the batch column (`min_batches` or more batches:
    two to integrate, one for a query mapped onto a trained model), the
    obs columns the run needs (`obs_keys`, from the sheet or the annotations) and the annotation
    file. A single .h5ad is read, validated like a merged input, and split by its 'sample' column
    (else by batch) into one .h5ad per sample under `split_dir`, so that both inputs go through
    the same per-sample steps. `heldout_batches` must name batches of the input, not all of them
    (checked here, before QC, as well as by training). Returned columns: sample, path (as written, or the split file),
    shown_path (for messages), keep_obs (a split file carries its own obs), the batch column and
    the sheet's other columns.
    """
    path = Path(input_path)
    where = shown_as or input_path
    keys = [batch_key, label_key, *(obs_keys or [])]
    if path.suffix.lower() == ".h5ad":
        with _naming(str(path), shown_as):
            adata = _load_single_h5ad(path, batch_key)
        if annotations:
            adata = _join_annotations(adata, Path(annotations), unknown_label)
        check_obs_keys(adata, keys, where)
        prepare_covariates(adata, batch_key, label_key, unknown_label, where)
        _require_batches(adata.obs[batch_key], batch_key, where, min_batches)
        heldout_training_cells(adata.obs, batch_key, heldout_batches or [], where)
        return _split_by_sample(adata, Path(split_dir or "."), batch_key)
    if not (path.suffix.lower() in (".csv", ".tsv", ".txt") or not path.suffix):
        raise ScinvInputError(f"{where}: input must be a samplesheet .csv or an .h5ad file")
    sheet = read_samplesheet(path, shown_as=shown_as, check_files=check_files)
    if batch_key not in sheet.columns:
        raise ScinvInputError(f"{where}: batch_key '{batch_key}' is not a samplesheet column (columns: {list(sheet.columns)}); add it or change --batch_key")
    columns = [c for c in sheet.columns if c not in SHEET_PATH_COLUMNS]
    if annotations:
        columns += [c for c in _annotation_columns(Path(annotations), sheet["sample"]) if c not in columns]
    per_cell = [key for key in keys if key and key not in columns]
    if per_cell:
        _check_keys_in_h5ad_obs(sheet, per_cell, columns, where, check_files)
    sheet[batch_key] = _batch_values(sheet[batch_key], batch_key, where).to_numpy()
    _require_batches(sheet[batch_key], batch_key, where, min_batches)
    heldout_training_cells(sheet, batch_key, heldout_batches or [], where)
    sheet.insert(2, "shown_path", [sheet.attrs["shown"][p] for p in sheet["path"]])
    sheet.insert(3, "keep_obs", False)
    return sheet


def _check_keys_in_h5ad_obs(sheet: pd.DataFrame, keys: list[str], columns: list[str], where: str, read_files: bool) -> None:
    """Per-cell obs columns the samplesheet lacks may come from every sample's own .h5ad obs.

    QC checks each file (the pipeline's CHECK_INPUT cannot see them); with `read_files` they are
    checked here too, reading obs only.
    """
    not_h5ad = [name for name, path in zip(sheet["sample"], sheet["path"]) if not str(path).lower().endswith(".h5ad")]
    if not_h5ad:
        raise ScinvInputError(
            f"{where}: obs column '{keys[0]}' not found (available: {columns}); fix the parameter, or add it to the samplesheet "
            f"or --annotations (sample '{not_h5ad[0]}' is not an .h5ad, whose obs could hold it)"
        )
    if not read_files:
        return
    for path in sheet["path"]:
        obs = read_h5ad(path, matrices=False).obs.columns
        missing = [key for key in keys if key not in obs]
        if missing:
            shown = sheet.attrs.get("shown", {}).get(path, path)
            raise ScinvInputError(
                f"{shown}: obs column '{missing[0]}' not found (obs: {list(obs)[:10]}); fix the parameter, or add it to this file's obs or the samplesheet"
            )


def _require_batches(batches: pd.Series, batch_key: str, where: str, min_batches: int = 2) -> None:
    if batches.nunique() < min_batches:  # refused here, in seconds, rather than by METRICS/baselines after training
        raise ScinvInputError(
            f"{where}: only one batch in column '{batch_key}'; integration needs two or more. "
            "Set --batch_key to a column with several values, or add samples from other batches"
        )


def _split_by_sample(adata: ad.AnnData, folder: Path, batch_key: str) -> pd.DataFrame:
    """One .h5ad per value of obs['sample'] (raw counts in X, obs kept) under `folder`; their rows."""
    from .io import write_h5ad

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    samples = adata.obs["sample"].astype(str)
    for i, name in enumerate(pd.unique(samples)):
        part = adata[(samples == name).to_numpy()].copy()
        part.layers.clear()
        file = folder / f"sample_{i + 1:05d}.h5ad"  # sample names need not be valid file names
        write_h5ad(part, file)
        rows.append({"sample": name, "path": file.name, "shown_path": file.name, "keep_obs": True, batch_key: str(part.obs[batch_key].iloc[0])})
    return pd.DataFrame(rows)


def _annotation_columns(path: Path, samples: pd.Series) -> list[str]:
    """Validate an annotation CSV against the samples' cell-id prefixes; its columns other than cell_id."""
    table = _read_annotations(path)
    prefixes = tuple(f"{s}_" for s in samples)
    if not table.index.str.startswith(prefixes).any():
        raise ScinvInputError(f"{path}: no cell_id starts with a sample name and '_' (ids look like '{table.index[0]}'); cell ids are <sample>_<barcode>")
    return list(table.columns)


def _read_sample_counts(path: str, shown: str | None) -> ad.AnnData:
    """One sample's raw counts, validated; errors name the file as the user gave it (`shown`)."""
    with _naming(str(path), shown):
        adata = read_counts(path)
        check_counts(adata.X, str(path))
    return adata


def _obs_from_row(adata: ad.AnnData, row: dict) -> ad.AnnData:
    """Cell ids `<sample>_<barcode>`; obs columns from the samplesheet row (path columns left out)
    over the file's own per-cell obs (an .h5ad's annotations; 10x files have none)."""
    adata.obs_names = [f"{row['sample']}_{bc}" for bc in adata.obs_names]
    for col, value in row.items():
        if col not in SHEET_PATH_COLUMNS:
            adata.obs[col] = pd.Categorical([str(value)] * adata.n_obs)
    return adata


def load_sample(
    counts_path: str,
    row: dict,
    batch_key: str = "batch",
    label_key: str | None = None,
    annotations: str | None = None,
    unknown_label: str = "Unknown",
    obs_keys: list[str] | None = None,
) -> ad.AnnData:
    """QC's input: one sample's counts with obs from its samplesheet `row` (see :func:`validate_input`).

    Cell ids become `<sample>_<barcode>` and the annotations join on them; a split .h5ad
    (row['keep_obs']) already carries both. An .h5ad keeps its own obs columns, under the row's
    and the annotations'; the batch, label and `obs_keys` columns must then exist. Raw counts in
    X and layers['counts'].
    """
    shown = row.get("shown_path") or counts_path
    adata = _read_sample_counts(counts_path, shown)
    if str(row.get("keep_obs", "")).lower() != "true":
        _obs_from_row(adata, row)
        _make_names_unique(adata, shown)
        if annotations:
            _join_annotations(adata, Path(annotations), unknown_label, require_match=False)
    check_obs_keys(adata, [batch_key, label_key, *(obs_keys or [])], shown)
    prepare_covariates(adata, batch_key, label_key, unknown_label, shown)
    adata.layers["counts"] = adata.X
    return adata


def prepare_covariates(adata: ad.AnnData, batch_key: str, label_key: str | None, unknown_label: str, where: str) -> None:
    """Batch and label columns as string categories (numeric ids keep the names users typed, 1.0 -> '1');
    every unlabelled spelling becomes `unknown_label` (see :mod:`scinv.labels`). Missing batches are refused."""
    adata.obs[batch_key] = pd.Categorical(_batch_values(adata.obs[batch_key], batch_key, where).to_numpy())
    if label_key:
        adata.obs[label_key] = normalize_labels(adata.obs[label_key], unknown_label)


def _batch_values(values: pd.Series, batch_key: str, where: str) -> pd.Series:
    batches = as_strings(values)
    if batches.isna().any() or (batches.str.strip() == "").any():
        n = int((batches.isna() | (batches.fillna("").str.strip() == "")).sum())
        raise ScinvInputError(f"{where}: {n} cells have no value in batch column '{batch_key}'; fill it in for every cell or set batch_key")
    return batches.str.strip()


def check_obs_keys(adata: ad.AnnData, keys: list[str], where: str) -> None:
    for key in keys:
        if key and key not in adata.obs.columns:
            raise ScinvInputError(
                f"{where}: obs column '{key}' not found (available: {list(adata.obs.columns)[:20]}); "
                "fix the parameter, or add the column to the samplesheet or the file's obs"
            )


# ---------------------------------------------------------------------------------------------
# QC


# Cell thresholds made for whole-transcriptome 10x data. A targeted or pre-filtered panel detects
# fewer genes and counts per cell, so unset thresholds scale with the panel (200 genes / 500 counts
# at >= 10,000 genes; 10 / 25 for a 500-gene panel): otherwise QC would remove every cell.
WHOLE_TRANSCRIPTOME = {"genes": 10_000, "min_genes": 200, "min_counts": 500}


@dataclass
class QCThresholds:
    min_genes: int | None = None  # None: WHOLE_TRANSCRIPTOME's value, scaled for small panels
    min_counts: int | None = None
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
        raise ScinvInputError(
            f"{where}: held-out batches {missing} not in column '{batch_key}' (batches: {sorted(batches.unique())[:20]}); "
            "use values of that column in heldout_batches"
        )
    return batches.isin(heldout).to_numpy()


def heldout_training_cells(obs: pd.DataFrame, batch_key: str, heldout: list[str], where: str) -> np.ndarray:
    """:func:`heldout_cells`, refusing `heldout` lists that leave training no labelled batch."""
    hidden = heldout_cells(obs, batch_key, heldout, where)
    if hidden.all():
        raise ScinvInputError(f"{where}: heldout_batches names every batch; keep at least one labelled batch for training")
    return hidden


def qc_metrics(adata: ad.AnnData, mito_pattern: str = MITO_PATTERN, ribo_pattern: str = RIBO_PATTERN) -> None:
    """Per-cell total counts, genes, % mitochondrial and % ribosomal counts into obs (on layers['counts']).

    Genes are matched by var['gene_symbols'] when present (Ensembl-id var_names), else by var_names;
    the patterns cover human (MT-, RPS/RPL) and mouse (mt-, Rps/Rpl) symbols.
    """
    import scanpy as sc

    symbols = pd.Index(adata.var["gene_symbols"].astype(str)) if "gene_symbols" in adata.var else adata.var_names.astype(str)
    adata.var["mt"] = symbols.str.contains(mito_pattern, regex=True)
    adata.var["ribo"] = symbols.str.contains(ribo_pattern, regex=True)
    sc.pp.calculate_qc_metrics(adata, qc_vars=["mt", "ribo"], layer="counts", percent_top=None, log1p=False, inplace=True)


def resolve_cell_thresholds(thr: QCThresholds, n_genes: int) -> QCThresholds:
    """`thr` with unset min_genes/min_counts filled in for a panel of `n_genes` (see WHOLE_TRANSCRIPTOME)."""
    scale = min(1.0, n_genes / WHOLE_TRANSCRIPTOME["genes"])
    filled = {k: int(round(WHOLE_TRANSCRIPTOME[k] * scale)) for k in ("min_genes", "min_counts") if getattr(thr, k) is None}
    if filled and scale < 1:
        log.info(
            "%d genes (a targeted or pre-filtered panel): %s scaled by %.3f; set them to override",
            n_genes,
            ", ".join(f"{k} {WHOLE_TRANSCRIPTOME[k]} -> {v}" for k, v in filled.items()),
            scale,
        )
    return replace(thr, **filled)


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


def flag_cells(adata: ad.AnnData, thr: QCThresholds, seed: int = 0, group_key: str = "sample") -> None:
    """QC metrics and a verdict per cell in obs: 'qc_reason' is 'kept' or the first failing reason.

    Reasons, in order: low_genes, low_counts, high_counts, high_mito, mad_outlier, doublet.
    Thresholds can be overridden per sample by obs columns named min_genes, min_counts,
    max_counts, max_pct_mito (from the samplesheet). MAD outliers and scrublet are computed per
    `group_key` group (one sample: doublets form within one capture). Counts in layers['counts'].
    """
    if "sample" not in adata.obs.columns:  # .h5ad inputs written outside CHECK_INPUT
        adata.obs["sample"] = "all"
    qc_metrics(adata)
    thr = resolve_cell_thresholds(thr, adata.n_vars)
    reason = np.full(adata.n_obs, "", dtype=object)

    def flag(mask, name):
        reason[(reason == "") & mask] = name

    flag(adata.obs["n_genes_by_counts"].to_numpy() < _per_sample_threshold(adata, "min_genes", thr.min_genes), "low_genes")
    flag(adata.obs["total_counts"].to_numpy() < _per_sample_threshold(adata, "min_counts", thr.min_counts), "low_counts")
    max_counts = _per_sample_threshold(adata, "max_counts", thr.max_counts)
    flag(np.isfinite(max_counts) & (adata.obs["total_counts"].to_numpy() > max_counts), "high_counts")
    flag(adata.obs["pct_counts_mt"].to_numpy() > _per_sample_threshold(adata, "max_pct_mito", thr.max_pct_mito), "high_mito")
    groups = adata.obs[group_key].astype(str).to_numpy() if group_key in adata.obs else np.zeros(adata.n_obs, str)
    if thr.mad_threshold:
        mad = _mad_outliers(np.log1p(adata.obs["total_counts"].to_numpy()), groups, thr.mad_threshold)
        mad |= _mad_outliers(np.log1p(adata.obs["n_genes_by_counts"].to_numpy()), groups, thr.mad_threshold)
        flag(mad, "mad_outlier")
    adata.obs["doublet_score"] = np.nan
    if thr.doublets:
        flag(_scrublet(adata, reason == "", groups, seed), "doublet")
    adata.obs["qc_reason"] = pd.Categorical(np.where(reason == "", "kept", reason))


def qc_sample(adata: ad.AnnData, thr: QCThresholds, seed: int = 0) -> None:
    """QC step of the pipeline, on one sample: :func:`flag_cells`, and var['n_cells_kept'] (cells
    passing QC that detect each gene) from which NORMALIZE filters genes over all samples."""
    flag_cells(adata, thr, seed)
    kept = np.flatnonzero(adata.obs["qc_reason"].astype(str).to_numpy() == "kept")
    adata.var["n_cells_kept"] = genes_detected(adata.layers["counts"][kept])


def check_kept_cells(obs: pd.DataFrame, batch_key: str, table: pd.DataFrame) -> None:
    """Stop when QC kept no cell or one batch only; warn about samples left without cells."""
    kept = obs["qc_reason"].astype(str).to_numpy() == "kept"
    if not kept.any():
        raise ScinvInputError("QC removed every cell; relax min_genes/min_counts/max_pct_mito (see the QC table)")
    empty = [s for s, n in table["kept"].items() if n == 0 and s != "total"]
    if empty:  # one failed sample should not stop an atlas; the QC table and report show it
        log.warning(
            "QC left zero cells in sample(s) %s: they are dropped and the other samples go on "
            "(relax their thresholds with per-sample columns min_genes, min_counts, max_pct_mito)",
            empty,
        )
    if batch_key in obs and obs.loc[kept, batch_key].nunique() < 2 <= obs[batch_key].nunique():
        raise ScinvInputError(
            f"QC left cells in only one batch ({obs.loc[kept, batch_key].iloc[0]}); integration needs two or more. "
            "Relax the failing samples' thresholds with per-sample columns (min_genes, min_counts, max_pct_mito)"
        )


def run_qc(adata: ad.AnnData, thr: QCThresholds, batch_key: str = "batch", seed: int = 0) -> tuple[ad.AnnData, pd.DataFrame]:
    """In memory: :func:`flag_cells` per sample, then keep passing cells and genes detected in
    `thr.min_cells_per_gene` cells; return (filtered AnnData, per-sample table). The pipeline does
    the same per sample (QC) and across samples (NORMALIZE, :mod:`scinv.gather`)."""
    flag_cells(adata, thr, seed)
    table = qc_table(adata.obs)
    check_kept_cells(adata.obs, batch_key, table)
    kept = adata[adata.obs["qc_reason"].astype(str).to_numpy() == "kept"].copy()
    gene_ok = genes_detected(kept.layers["counts"]) >= thr.min_cells_per_gene
    kept = kept[:, gene_ok].copy()
    if kept.n_vars == 0:
        raise ScinvInputError(f"QC removed all {len(gene_ok)} genes; lower min_cells_per_gene")
    kept.X = kept.layers["counts"].copy()
    return kept, table


def genes_detected(X) -> np.ndarray:
    """(n_genes,) number of cells in which each gene has a non-zero count."""
    X = sp.csr_matrix(X)
    return np.bincount(X.indices[X.data != 0], minlength=X.shape[1])


def _scrublet(adata: ad.AnnData, candidates: np.ndarray, groups: np.ndarray, seed: int) -> np.ndarray:
    """Scrublet per group (sample) on raw counts of cells that passed the other filters; returns a doublet mask."""
    import scanpy as sc

    doublet = np.zeros(adata.n_obs, dtype=bool)
    scores = np.full(adata.n_obs, np.nan)
    for b in np.unique(groups):
        idx = np.flatnonzero(candidates & (groups == b))
        if len(idx) < 100:
            log.warning("sample %s: %d cells, too few for doublet detection; skipped", b, len(idx))
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


# seurat_v3's loess (span 0.3 in scanpy) can be near-singular on pre-filtered or targeted-panel
# genes ("There are other near singularities as well"); a wider span smooths over the clustered
# means and fits (measured on a real 362-cell, 1,314-gene batch: 0.3 and 0.4 fail, 0.5 fits).
SEURAT_V3_SPANS = (0.3, 0.5, 0.7)
# skmisc's loess segfaults (not raises) on a handful of points: a batch of one cell has no varying
# gene. Batches smaller than this, or with fewer varying genes, do not vote on the HVGs.
MIN_HVG_BATCH_CELLS, MIN_HVG_VARYING_GENES = 10, 50
COUNT_FLAVORS = ("seurat_v3", "pearson_residuals")  # work on raw counts; the others on log-normalised X


def select_hvgs(adata: ad.AnnData, n_top_genes: int, batch_key: str | None, flavor: str) -> dict:
    """Mark `n_top_genes` highly variable genes in `adata.var['highly_variable']`; never fails on real data.

    Raw counts are read from layers['counts'], log-normalised values from X. When every gene is
    asked for, all are kept. seurat_v3 retries with wider loess spans (SEURAT_V3_SPANS) and then
    falls back to flavor 'seurat' (batch-aware, then without batches). Returns what was done:
    {'requested', 'flavor', 'span', 'fallback'} (fallback: the reason in words, or '').
    """
    import scanpy as sc

    record = {"requested": flavor, "flavor": flavor, "span": None, "fallback": ""}
    if n_top_genes >= adata.n_vars:
        log.info("n_top_genes %d >= %d genes: keeping all genes", n_top_genes, adata.n_vars)
        adata.var["highly_variable"] = True
        record["flavor"] = "all genes"
        return record
    voters = _hvg_voters(adata, batch_key)
    if not voters.any():  # no batch big enough: one fit over all cells
        log.warning("HVG: no batch has %d cells and %d varying genes; HVGs chosen without batches", MIN_HVG_BATCH_CELLS, MIN_HVG_VARYING_GENES)
        batch_key = None
    elif not voters.all():
        # HVGs from the batches that can vote; the others keep every gene's annotation as computed there
        sub = adata[voters].copy()
        record = select_hvgs(sub, n_top_genes, batch_key if sub.obs[batch_key].nunique() > 1 else None, flavor)
        for col in sub.var.columns.difference(adata.var.columns).union(["highly_variable"]):
            adata.var[col] = sub.var[col]
        left_out = sorted(set(adata.obs[batch_key].astype(str)) - set(sub.obs[batch_key].astype(str)))
        note = f"batches {left_out} too small to vote on HVGs (< {MIN_HVG_BATCH_CELLS} cells or < {MIN_HVG_VARYING_GENES} varying genes)"
        log.warning("HVG: %s", note)
        record["fallback"] = "; ".join(x for x in (note, record["fallback"]) if x)
        return record
    failures = []
    if flavor == "seurat_v3" and _n_varying_genes(adata.layers["counts"]) < MIN_HVG_VARYING_GENES:
        failures.append(("seurat_v3", f"fewer than {MIN_HVG_VARYING_GENES} genes vary, too few for its loess"))
        flavor = "seurat"
        record["flavor"] = flavor
    if flavor == "pearson_residuals":
        sc.experimental.pp.highly_variable_genes(adata, n_top_genes=n_top_genes, batch_key=batch_key, layer="counts")
        return record
    if flavor == "seurat_v3":
        for span in SEURAT_V3_SPANS:
            try:
                sc.pp.highly_variable_genes(adata, n_top_genes=n_top_genes, flavor="seurat_v3", batch_key=batch_key, layer="counts", span=span)
                record["span"] = span
                if failures:
                    record["fallback"] = f"seurat_v3 loess failed with span {failures[0][0]} ({failures[0][1]}); fitted with span {span}"
                    log.warning("HVG: %s", record["fallback"])
                return record
            except (ValueError, np.linalg.LinAlgError) as err:
                failures.append((span, first_line(err)))
        record["flavor"] = "seurat"
    for bk in dict.fromkeys([batch_key, None]):
        try:
            sc.pp.highly_variable_genes(adata, n_top_genes=n_top_genes, flavor=record["flavor"], batch_key=bk)
            break
        except (ValueError, np.linalg.LinAlgError, IndexError) as err:
            if bk is None:
                raise ScinvInputError(f"HVG selection failed on every flavour ({first_line(err)}); check that the counts vary across cells") from err
            failures.append((f"{record['flavor']} per batch", first_line(err)))
            record["flavor"] += " (without batches)"
    _keep_top(adata.var, n_top_genes)
    if failures:
        tried = "; ".join(f"{what}: {why}" for what, why in failures)
        record["fallback"] = f"{record['requested']} could not be fitted ({tried}); used {record['flavor']} instead"
        log.warning("HVG: %s", record["fallback"])
    return record


def _keep_top(var: pd.DataFrame, n_top_genes: int) -> None:
    """Flavour 'seurat' marks every gene tied at the cut-off; keep exactly `n_top_genes` by its own ranking."""
    hv = var["highly_variable"].to_numpy(bool)
    if hv.sum() <= n_top_genes or "dispersions_norm" not in var:
        return
    keys = [c for c in ("highly_variable_nbatches", "dispersions_norm") if c in var]
    ranked = var.loc[hv].sort_values(keys, ascending=False, kind="stable").index[:n_top_genes]
    var["highly_variable"] = var.index.isin(ranked)


def _n_varying_genes(X) -> int:
    X = sp.csr_matrix(X)
    mean = np.asarray(X.mean(0)).ravel()
    return int((np.asarray(X.multiply(X).mean(0)).ravel() - mean**2 > 1e-12).sum())


def _hvg_voters(adata: ad.AnnData, batch_key: str | None) -> np.ndarray:
    """(n_cells,) bool: cells of batches big enough for a per-batch HVG fit (all cells without batches)."""
    if not batch_key:
        return np.ones(adata.n_obs, dtype=bool)
    batches = adata.obs[batch_key].astype(str).to_numpy()
    ok = np.ones(adata.n_obs, dtype=bool)
    for b in np.unique(batches):
        idx = batches == b
        if idx.sum() < MIN_HVG_BATCH_CELLS or _n_varying_genes(adata.layers["counts"][idx]) < MIN_HVG_VARYING_GENES:
            ok[idx] = False
    return ok


def normalize_and_select(
    adata: ad.AnnData,
    n_top_genes: int = 2000,
    batch_key: str | None = "batch",
    flavor: str = "seurat_v3",
    target_sum: float = 1e4,
    n_pcs: int = 50,
    seed: int = 0,
) -> ad.AnnData:
    """normalize_total + log1p into X, batch-aware HVGs (:func:`select_hvgs`), subset to HVGs, PCA.

    Returns the HVG subset with raw counts in layers['counts'] (what the model trains on),
    log-normalised values in X and the unintegrated PCA in obsm['X_pca']. What the HVG step did
    (flavour used, fallback) is in uns['scinv_normalize']['hvg'] for the report.
    """
    import scanpy as sc

    n_top_genes = min(n_top_genes, adata.n_vars)
    bk = batch_key if batch_key and adata.obs[batch_key].nunique() > 1 else None
    adata.X = adata.layers["counts"].copy()
    sc.pp.normalize_total(adata, target_sum=target_sum)
    sc.pp.log1p(adata)
    hvg_record = select_hvgs(adata, n_top_genes, bk, flavor)
    hvg = adata[:, adata.var["highly_variable"].to_numpy()].copy()
    n_comps = max(2, min(n_pcs, hvg.n_obs - 1, hvg.n_vars - 1))
    sc.pp.pca(hvg, n_comps=n_comps, random_state=seed)
    hvg.uns["scinv_normalize"] = {
        "n_top_genes": int(n_top_genes),
        "flavor": flavor,
        "batch_key": str(bk),
        "target_sum": float(target_sum),
        "hvg": {k: ("" if v is None else v) for k, v in hvg_record.items()},
    }
    return hvg
