"""Reading inputs (samplesheets, 10x .h5, .h5ad) and writing outputs atomically."""

from __future__ import annotations

import contextlib
import csv
import ctypes
import os
import tempfile
from pathlib import Path
from typing import Iterator

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .errors import ScinvInputError

REQUIRED_SAMPLESHEET_COLUMNS = ("sample", "path")
RESERVED_OBS_COLUMNS = ("sample",)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    An interrupted or failed write therefore never leaves a file that looks finished.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp creates 0600; outputs should be readable like any file
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes_atomically(path: str | os.PathLike, data: bytes | memoryview) -> None:
    """Write `data` to `path` so that a kill at any moment leaves no partial file under any name.

    On Linux the bytes go to an unnamed file (O_TMPFILE) that gets a name only once complete
    (linkat through /proc/self/fd), then is renamed onto `path`: a kill can leave at most a
    complete temp file, and only in the microseconds between the two calls. Elsewhere (or on a
    filesystem without O_TMPFILE) a named temp file is written and renamed; a kill during the
    write leaves it behind, and the next save replaces it.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp")  # a fixed name: repeated kills leave one file, not many
    if not _write_unnamed_then_link(final.parent, tmp, data):
        tmp.write_bytes(data)
    os.replace(tmp, final)


def _write_unnamed_then_link(directory: Path, name: Path, data) -> bool:
    try:
        fd = os.open(directory, os.O_TMPFILE | os.O_WRONLY, 0o666)  # mode masked by the umask, as for open()
    except (AttributeError, OSError):  # not Linux, or the filesystem has no O_TMPFILE
        return False
    try:
        with open(fd, "wb", closefd=False) as fh:
            fh.write(data)
        name.unlink(missing_ok=True)
        libc = ctypes.CDLL(None, use_errno=True)
        at_fdcwd, at_symlink_follow = -100, 0x400  # from fcntl.h
        return libc.linkat(at_fdcwd, f"/proc/self/fd/{fd}".encode(), at_fdcwd, os.fsencode(name), at_symlink_follow) == 0
    except (OSError, AttributeError):
        return False
    finally:
        os.close(fd)


def write_h5ad(adata: ad.AnnData, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp, compression="gzip")


def write_table(df: pd.DataFrame, path: str | os.PathLike, index: bool = True) -> None:
    """Write a CSV or parquet table (chosen by suffix) atomically."""
    with atomic_path(path) as tmp:
        if str(path).endswith(".parquet"):
            df.to_parquet(tmp, index=index)
        else:
            df.to_csv(tmp, index=index)


def write_text(text: str, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


# ---------------------------------------------------------------------------------------------
# Samplesheets


def read_samplesheet(path: str | os.PathLike, staged_dir: str | os.PathLike | None = None) -> pd.DataFrame:
    """Read and validate a samplesheet CSV: columns `sample,path[,batch][,extra obs columns]`.

    Relative paths are resolved against the samplesheet's folder. With `staged_dir` (Nextflow
    stages row i's file as `<staged_dir>/<i+1>/<basename>`), a staged copy is preferred, so the
    step works inside containers and on cloud executors.
    """
    path = Path(path)
    if not path.exists():
        raise ScinvInputError(f"{path}: samplesheet not found; pass an existing CSV with --input")
    text = path.read_text(errors="replace")
    if not text.strip():
        raise ScinvInputError(f"{path}: samplesheet is empty; it needs a header 'sample,path' and one row per sample")
    header = text.splitlines()[0]
    if "," not in header:
        delim = "tab" if "\t" in header else ("semicolon" if ";" in header else "none")
        raise ScinvInputError(
            f"{path}: header '{header.strip()[:80]}' is not comma-separated (found delimiter: {delim}); "
            "save the samplesheet as CSV with columns sample,path[,batch,...]"
        )
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True, index_col=False)
    except (pd.errors.ParserError, csv.Error) as err:
        raise ScinvInputError(f"{path}: cannot parse CSV ({str(err).splitlines()[0]}); fix the row it names") from err
    df.columns = [c.strip() for c in df.columns]
    missing = [c for c in REQUIRED_SAMPLESHEET_COLUMNS if c not in df.columns]
    if missing:
        raise ScinvInputError(
            f"{path}: missing required column(s) {missing}; the header must start with 'sample,path' "
            f"(found {list(df.columns)})"
        )
    unnamed = [c for c in df.columns if not c or c.startswith("Unnamed")]
    if unnamed:
        raise ScinvInputError(f"{path}: a column has no name; give every column a header")
    if len(df) == 0:
        raise ScinvInputError(f"{path}: samplesheet has a header but no samples; add one row per sample")
    df = df.apply(lambda col: col.str.strip())
    df = df.reset_index(drop=True)
    empty = np.flatnonzero(((df["sample"] == "") | (df["path"] == "")).to_numpy()).tolist()
    if empty:
        raise ScinvInputError(f"{path}: row {empty[0] + 2} has an empty sample or path; fill both in")
    dups = sorted(df.loc[df["sample"].duplicated(), "sample"].unique())
    if dups:
        raise ScinvInputError(f"{path}: duplicate sample id(s) {dups}; each sample must appear once")
    base = path.resolve().parent
    df["path"] = [str(p if Path(p).is_absolute() else (base / p)) for p in df["path"]]
    for i, (sample, p) in enumerate(zip(df["sample"], df["path"])):
        staged = Path(staged_dir) / str(i + 1) / Path(p).name if staged_dir else None
        if staged is not None and staged.exists():
            df.loc[df.index[i], "path"] = str(staged)
        elif not Path(p).exists():
            raise ScinvInputError(f"{path}: file for sample '{sample}' not found: {p}; fix the path column")
    if "batch" not in df.columns:
        df["batch"] = df["sample"]
    return df


# ---------------------------------------------------------------------------------------------
# Count matrices


def read_counts(path: str | os.PathLike) -> ad.AnnData:
    """Read a 10x `filtered_feature_bc_matrix.h5` or an `.h5ad` holding raw counts.

    For .h5ad files the counts are taken from `layers["counts"]` when present, else from `X`.
    Gene expression features only are kept for 10x files (antibody capture etc. are dropped).
    """
    import scanpy as sc

    path = Path(path)
    if not path.exists():
        raise ScinvInputError(f"{path}: file not found")
    suffix = path.name.lower()
    if not (suffix.endswith(".h5") or suffix.endswith(".h5ad")):
        raise ScinvInputError(
            f"{path}: unsupported file type; give a 10x filtered_feature_bc_matrix.h5 or an .h5ad with raw counts"
        )
    if not h5py.is_hdf5(path):
        raise ScinvInputError(f"{path}: not a valid HDF5 file (truncated or wrong format); re-download or re-export it")
    try:
        if suffix.endswith(".h5ad"):
            adata = ad.read_h5ad(path)
            if "counts" in adata.layers:
                adata.X = adata.layers["counts"]
        else:
            adata = sc.read_10x_h5(path)
            adata.var_names_make_unique()  # 10x gene symbols repeat (e.g. two Ensembl ids)
    except ScinvInputError:
        raise
    except Exception as err:  # h5py/anndata raise many types for damaged files
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ScinvInputError(f"{path}: cannot read ({first}); check that the file is complete and not corrupted") from err
    adata.layers.clear()
    adata.obsm.clear()
    adata.varm.clear()
    adata.obsp.clear()
    adata.varp.clear()
    adata.uns.clear()
    adata.raw = None
    if not sp.issparse(adata.X):
        adata.X = sp.csr_matrix(adata.X)
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    return adata


def check_counts(X, where: str) -> None:
    """Raise unless X holds finite, non-negative integer counts with at least one cell and gene."""
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise ScinvInputError(f"{where}: empty matrix ({X.shape[0]} cells x {X.shape[1]} genes); provide a non-empty sample")
    data = X.data if sp.issparse(X) else np.asarray(X).ravel()
    if data.size == 0:
        raise ScinvInputError(f"{where}: matrix has no non-zero counts; provide raw UMI counts")
    if not np.all(np.isfinite(data)):
        raise ScinvInputError(f"{where}: matrix contains NaN or Inf; provide raw integer counts")
    if data.min() < 0:
        raise ScinvInputError(f"{where}: matrix contains negative values; provide raw integer counts, not scaled data")
    sample = data[: 1_000_000]
    if np.any(np.abs(sample - np.round(sample)) > 1e-6):
        raise ScinvInputError(
            f"{where}: matrix holds non-integer values (normalised or log data?); provide raw UMI counts "
            "(for .h5ad, put them in layers['counts'] or X)"
        )
