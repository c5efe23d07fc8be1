"""Reading inputs (samplesheets, 10x .h5, .h5ad) and writing outputs atomically."""

from __future__ import annotations

import contextlib
import csv
import ctypes
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .errors import ScinvInputError, first_line

REQUIRED_SAMPLESHEET_COLUMNS = ("sample", "path")


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


def read_h5ad(path: str | os.PathLike, matrices: bool = True, **kwargs) -> ad.AnnData:
    """anndata.read_h5ad, with a damaged or foreign file reported as one ScinvInputError line.

    `matrices=False` reads obs, var, obsm and uns only (no X, layers or graphs): what metrics and
    the report need, in memory that does not grow with the number of genes.
    """
    path = Path(path)
    if not h5py.is_hdf5(path):
        raise ScinvInputError(f"{path}: not a valid .h5ad (not HDF5: truncated or another format); rerun the step that wrote it")
    try:
        if not matrices:
            from anndata.io import read_elem

            with h5py.File(path, "r") as f:
                parts = {key: read_elem(f[key]) for key in ("obs", "var", "obsm", "uns") if key in f}
            return ad.AnnData(**parts)
        return ad.read_h5ad(path, **kwargs)
    except Exception as err:  # h5py/anndata raise many types for damaged files
        raise ScinvInputError(f"{path}: cannot read this .h5ad ({first_line(err)}); rerun the step that wrote it") from err


# Above this many cells, TRAIN and EXPORT read the counts from disk per chunk instead of loading
# them (measured at 1M cells x 2k HVGs: training peaked at 11.5 GB with the counts in memory).
STREAM_COUNTS_ABOVE_CELLS = 200_000


def read_counts_for_model(path: str | os.PathLike, layer: str = "counts", stream_above: int = STREAM_COUNTS_ABOVE_CELLS) -> ad.AnnData:
    """obs, var, obsm and uns of an .h5ad with layers[layer] only (no X): in memory up to
    `stream_above` cells, else a backed sparse dataset the model reads chunk by chunk."""
    from anndata.io import read_elem, sparse_dataset

    adata = read_h5ad(path, matrices=False)
    f = h5py.File(path, "r")  # kept open by the dataset for as long as the AnnData lives
    if layer not in f.get("layers", {}):
        f.close()
        raise ScinvInputError(f"{path}: layers['{layer}'] missing; give the normalised .h5ad written by NORMALIZE")
    if adata.n_obs > stream_above:
        adata.layers[layer] = sparse_dataset(f["layers"][layer])
    else:
        adata.layers[layer] = read_elem(f["layers"][layer])
        f.close()
    return adata


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


def read_samplesheet(
    path: str | os.PathLike, staged_dir: str | os.PathLike | None = None, shown_as: str | None = None, check_files: bool = True
) -> pd.DataFrame:
    """Read and validate a samplesheet CSV: columns `sample,path[,batch][,extra obs columns]`.

    Relative paths are resolved against the samplesheet's folder. With `staged_dir` (Nextflow
    stages row i's file as `<staged_dir>/<i+1>/<basename>`), a staged copy is preferred, so the
    step works inside containers and on cloud executors. `shown_as` is the samplesheet's path or
    URL as the user gave it (not the staged copy): messages name it and the rows' paths as written
    relative to it. `df.attrs['shown']` maps each row's readable path to its name for messages.
    `check_files=False` leaves paths as written and unchecked (the pipeline checks them before it
    starts, where the files are visible: they may not be inside a container).
    """
    path = Path(path)
    shown_sheet = shown_as or str(path)
    if not path.exists():
        raise ScinvInputError(f"{shown_sheet}: samplesheet not found; pass an existing CSV with input")
    text = path.read_text(errors="replace")
    if not text.strip():
        raise ScinvInputError(f"{shown_sheet}: samplesheet is empty; it needs a header 'sample,path' and one row per sample")
    header = text.splitlines()[0]
    if "," not in header:
        delim = "tab" if "\t" in header else ("semicolon" if ";" in header else "none")
        raise ScinvInputError(
            f"{shown_sheet}: header '{header.strip()[:80]}' is not comma-separated (found delimiter: {delim}); "
            "save the samplesheet as CSV with columns sample,path[,batch,...]"
        )
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True, index_col=False)
    except (pd.errors.ParserError, csv.Error) as err:
        raise ScinvInputError(f"{shown_sheet}: cannot parse CSV ({str(err).splitlines()[0]}); fix the row it names") from err
    df.columns = [c.strip() for c in df.columns]
    missing = [c for c in REQUIRED_SAMPLESHEET_COLUMNS if c not in df.columns]
    if missing:
        raise ScinvInputError(f"{shown_sheet}: missing required column(s) {missing}; the header must start with 'sample,path' (found {list(df.columns)})")
    unnamed = [c for c in df.columns if not c or c.startswith("Unnamed")]
    blank = [c for c in unnamed if (df[c].str.strip() == "").all()]  # a trailing comma on every line, as spreadsheets export
    df, unnamed = df.drop(columns=blank), [c for c in unnamed if c not in blank]
    if unnamed:
        raise ScinvInputError(f"{shown_sheet}: a column has no name; give every column a header")
    if len(df) == 0:
        raise ScinvInputError(f"{shown_sheet}: samplesheet has a header but no samples; add one row per sample")
    df = df.apply(lambda col: col.str.strip())
    df = df.reset_index(drop=True)
    empty = np.flatnonzero(((df["sample"] == "") | (df["path"] == "")).to_numpy()).tolist()
    if empty:
        raise ScinvInputError(f"{shown_sheet}: row {empty[0] + 2} has an empty sample or path; fill both in")
    dups = sorted(df.loc[df["sample"].duplicated(), "sample"].unique())
    if dups:
        raise ScinvInputError(f"{shown_sheet}: duplicate sample id(s) {dups}; each sample must appear once")
    base = path.resolve().parent
    shown_base = shown_sheet.rsplit("/", 1)[0] if "/" in shown_sheet else str(base)
    shown = {}
    for i, (sample, given) in enumerate(zip(df["sample"], df["path"])):
        absolute = Path(given).is_absolute() or "://" in given
        local = str(Path(given) if absolute else base / given)
        name = given if absolute else f"{shown_base}/{given}"
        staged = Path(staged_dir) / str(i + 1) / Path(given).name if staged_dir else None
        readable = str(staged) if staged is not None and staged.exists() else local
        if not check_files:
            shown[given] = name
            continue
        if not Path(readable).exists():
            raise ScinvInputError(f"{shown_sheet}: file for sample '{sample}' not found: {name}; fix the path column")
        df.loc[df.index[i], "path"] = readable
        shown[readable] = name
    df.attrs["shown"] = shown
    if "batch" not in df.columns:
        df["batch"] = df["sample"]
    return df


# ---------------------------------------------------------------------------------------------
# Count matrices


ENSEMBL_ID = r"^ENS[A-Z]*G\d{6,}"  # ENSG00000..., ENSMUSG00000... (version suffix allowed)
# var columns that hold gene symbols when var_names are Ensembl ids (scanpy, CELLxGENE, Seurat exports)
SYMBOL_COLUMNS = ("gene_symbols", "gene_symbol", "feature_name", "gene_name", "gene_names", "symbol", "symbols", "name")


def read_counts(path: str | os.PathLike) -> ad.AnnData:
    """Read one sample's raw counts: a 10x .h5 (v2 or v3), a 10x MTX folder (v2 or v3), or an .h5ad.

    - 10x files and folders: gene-expression features only (antibody capture etc. are dropped),
      gene symbols as var_names (made unique), Ensembl ids in var['gene_ids'].
    - .h5ad: the first of layers['counts'], X and .raw.X that holds integers is used; a clear
      error when none does. Duplicated var_names are made unique.

    Returns an AnnData with CSR float32 counts in X and var['gene_symbols'] (the symbols QC
    looks for mitochondrial and ribosomal genes in: var_names, or a symbol column when var_names
    are Ensembl ids). Only obs and var annotations are kept.
    """
    path = Path(path)
    if not path.exists():
        raise ScinvInputError(f"{path}: file not found")
    name = path.name.lower()
    try:
        if path.is_dir() or name.endswith((".mtx", ".mtx.gz")):
            adata = read_10x_mtx(path.parent if path.is_file() else path)
        elif name.endswith(".h5ad"):
            _require_hdf5(path)
            adata = _h5ad_counts(path, ad.read_h5ad(path))
        elif name.endswith(".h5"):
            import scanpy as sc

            _require_hdf5(path)
            adata = sc.read_10x_h5(path)
        else:
            raise ScinvInputError(
                f"{path}: unsupported file or folder; give a 10x filtered_feature_bc_matrix.h5, a 10x MTX folder "
                "(matrix.mtx.gz, features.tsv.gz, barcodes.tsv.gz) or an .h5ad with raw counts"
            )
    except ScinvInputError:
        raise
    except Exception as err:  # h5py/anndata/scipy raise many types for damaged files
        raise ScinvInputError(f"{path}: cannot read ({first_line(err)}); check that the file is complete and not corrupted") from err
    _set_gene_symbols(adata)
    if not adata.var_names.is_unique:
        adata.var_names_make_unique()  # 10x symbols repeat (two Ensembl ids); so do many exports
    for slot in (adata.layers, adata.obsm, adata.varm, adata.obsp, adata.varp, adata.uns):
        slot.clear()
    adata.raw = None
    adata.X = sp.csr_matrix(adata.X if sp.issparse(adata.X) else np.asarray(adata.X), dtype=np.float32)
    return adata


def _require_hdf5(path: Path) -> None:
    if not h5py.is_hdf5(path):
        raise ScinvInputError(f"{path}: not a valid HDF5 file (truncated or wrong format); re-download or re-export it")


def _h5ad_counts(path: Path, adata: ad.AnnData) -> ad.AnnData:
    """The AnnData with X set to the first integer matrix of layers['counts'], X, .raw.X."""
    candidates = [("layers['counts']", adata.layers.get("counts"), None), ("X", adata.X, None)]
    if adata.raw is not None:
        candidates.append((".raw.X", adata.raw.X, adata.raw.var))
    for _, X, var in candidates:
        if X is not None and _holds_integers(X):
            if var is not None:  # .raw keeps all genes; X may be a subset of them
                adata = ad.AnnData(X=X, obs=adata.obs, var=var.copy())
            else:
                adata.X = X
            return adata
    looked = ", ".join(where for where, X, _ in candidates if X is not None)
    raise ScinvInputError(
        f"{path}: no raw integer counts found (looked in {looked}; they hold normalised or scaled values); "
        "store the raw UMI counts in layers['counts'], X or .raw.X"
    )


def _holds_integers(X) -> bool:
    data = X.data if sp.issparse(X) else np.asarray(X).ravel()
    sample = np.asarray(data[:1_000_000], dtype=np.float64)
    return sample.size > 0 and bool(np.all(np.isfinite(sample))) and bool(np.all(sample == np.round(sample))) and sample.min() >= 0


def _set_gene_symbols(adata: ad.AnnData) -> None:
    """var['gene_symbols']: a symbol column when var_names are Ensembl ids, else the var_names."""
    names = adata.var_names.astype(str)
    if names.str.match(ENSEMBL_ID).mean() > 0.5:
        for col in SYMBOL_COLUMNS:
            if col in adata.var.columns and not pd.Series(adata.var[col]).astype(str).str.match(ENSEMBL_ID).mean() > 0.5:
                adata.var["gene_symbols"] = pd.Series(adata.var[col]).astype(str).to_numpy()
                return
    adata.var["gene_symbols"] = names.to_numpy()


def read_10x_mtx(folder: Path) -> ad.AnnData:
    """A Cell Ranger MTX folder: v3 (features.tsv.gz) or v2 (genes.tsv), gzipped or not, with or
    without a GEO-style file prefix (GSM..._matrix.mtx.gz). A Cell Ranger `outs/` folder is
    searched for `filtered_feature_bc_matrix/` (v3) or `filtered_gene_bc_matrices/<genome>/` (v2)."""
    import gzip

    import scipy.io

    def find(stem: str) -> Path | None:
        hits = sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith((f"{stem}", f"{stem}.gz")))
        return hits[0] if hits else None

    def opener(p: Path):
        return gzip.open(p, "rt") if p.name.endswith(".gz") else open(p)

    matrix = find("matrix.mtx")
    if matrix is None:
        for sub in ("filtered_feature_bc_matrix", "filtered_gene_bc_matrices"):
            nested = [p for p in folder.glob(f"{sub}*") if p.is_dir()] + [p for p in folder.glob(f"{sub}*/*") if p.is_dir()]
            for candidate in nested:
                if any(q.name.lower().endswith(("matrix.mtx", "matrix.mtx.gz")) for q in candidate.iterdir()):
                    return read_10x_mtx(candidate)
        raise ScinvInputError(f"{folder}: no matrix.mtx(.gz) in this folder; point the path at Cell Ranger's filtered_feature_bc_matrix folder")
    features, barcodes = find("features.tsv") or find("genes.tsv"), find("barcodes.tsv")
    if features is None or barcodes is None:
        missing = "features.tsv.gz (or genes.tsv)" if features is None else "barcodes.tsv.gz"
        raise ScinvInputError(f"{folder}: {missing} is missing beside {matrix.name}; copy the whole Cell Ranger folder")
    with opener(matrix) as fh:
        X = sp.csr_matrix(scipy.io.mmread(fh).T, dtype=np.float32)
    genes = pd.read_csv(features, sep="\t", header=None, dtype=str, compression="infer")
    cells = pd.read_csv(barcodes, sep="\t", header=None, dtype=str, compression="infer")[0]
    if X.shape != (len(cells), len(genes)):
        raise ScinvInputError(
            f"{folder}: {matrix.name} is {X.shape[1]} genes x {X.shape[0]} cells but {features.name} lists {len(genes)} "
            f"and {barcodes.name} {len(cells)}; the three files come from different runs"
        )
    symbols = genes[1] if genes.shape[1] > 1 else genes[0]
    var = pd.DataFrame({"gene_ids": genes[0].to_numpy()}, index=pd.Index(symbols.to_numpy()))
    if genes.shape[1] > 2:
        var["feature_types"] = genes[2].to_numpy()
    adata = ad.AnnData(X=X, obs=pd.DataFrame(index=pd.Index(cells.to_numpy())), var=var)
    if "feature_types" in adata.var and (adata.var["feature_types"] == "Gene Expression").any():
        adata = adata[:, (adata.var["feature_types"] == "Gene Expression").to_numpy()].copy()
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
    sample = data[:1_000_000]
    if np.any(np.abs(sample - np.round(sample)) > 1e-6):
        raise ScinvInputError(
            f"{where}: matrix holds non-integer values (normalised or log data?); provide raw UMI counts (for .h5ad, put them in layers['counts'] or X)"
        )
