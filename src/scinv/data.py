"""Data registration (one place): which obs columns feed which prior, and how they are encoded.

A :class:`DataRegistry` records the count layer, the label column, the batch column and the
extra invariant (biological) and spurious (technical) covariates, together with the categories
seen in training. It encodes any AnnData with the same columns into arrays for the model, and
refuses categories it has not seen (defect 8 of the reference code silently zero-encoded them).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata.abc import CSRDataset

from .errors import ScinvInputError
from .labels import UNKNOWN_LABEL, as_strings, normalize_labels, unlabelled
from .preprocess import heldout_training_cells

COUNT_HISTOGRAM_BINS = 16
_SUFFIX_SUM = torch.ones(COUNT_HISTOGRAM_BINS, COUNT_HISTOGRAM_BINS).tril()  # hist @ it sums the bins i >= j


@dataclass
class Covariate:
    """One obs column: categorical (one-hot encoded) or continuous (standardised)."""

    key: str
    categorical: bool
    categories: list[str] = field(default_factory=list)
    mean: float = 0.0
    std: float = 1.0

    @property
    def width(self) -> int:
        return len(self.categories) if self.categorical else 1

    def encode(self, obs: pd.DataFrame, where: str, unknown: str = "error") -> np.ndarray:
        """Return an (n_cells, width) float32 array.

        unknown='error' refuses unseen categories; unknown='zero' encodes them (and a missing
        column) as all-zero rows, the "unknown batch" input the encoder is trained for.
        """
        if self.key not in obs.columns:
            if unknown == "zero":
                return np.zeros((len(obs), self.width), dtype=np.float32)
            raise ScinvInputError(f"{where}: obs column '{self.key}' is missing; add it or drop it from the model setup")
        col = obs[self.key]
        if not self.categorical:
            values = pd.to_numeric(col, errors="coerce").to_numpy(np.float64)
            if not np.all(np.isfinite(values)):
                raise ScinvInputError(f"{where}: continuous column '{self.key}' has missing or non-numeric values; fill them in")
            return ((values - self.mean) / self.std).astype(np.float32)[:, None]
        values = col.astype(str).to_numpy()
        lookup = {c: i for i, c in enumerate(self.categories)}
        codes = np.fromiter((lookup.get(v, -1) for v in values), dtype=np.int64, count=len(values))
        if (codes < 0).any() and unknown == "zero":
            onehot = np.zeros((len(values), self.width), dtype=np.float32)
            known = codes >= 0
            onehot[np.flatnonzero(known), codes[known]] = 1.0
            return onehot
        if (codes < 0).any():
            unseen = sorted(set(values[codes < 0]))[:5]
            raise ScinvInputError(
                f"{where}: column '{self.key}' has categories not seen in training {unseen}; "
                "use InVAE.map_query to add new batches, or relabel them to known categories"
            )
        onehot = np.zeros((len(values), self.width), dtype=np.float32)
        onehot[np.arange(len(values)), codes] = 1.0
        return onehot

    @classmethod
    def fit(cls, obs: pd.DataFrame, key: str, where: str, categorical: bool | None = None) -> Covariate:
        if key not in obs.columns:
            raise ScinvInputError(f"{where}: obs column '{key}' not found (available: {list(obs.columns)[:12]}); fix the key")
        col = obs[key]
        if categorical is None:
            categorical = not pd.api.types.is_float_dtype(col)
        if categorical:
            if col.isna().any():
                raise ScinvInputError(f"{where}: column '{key}' has missing values; fill them in (e.g. with 'Unknown')")
            cats = sorted(col.astype(str).unique().tolist())
            return cls(key=key, categorical=True, categories=cats)
        values = pd.to_numeric(col, errors="coerce").to_numpy(np.float64)
        if not np.all(np.isfinite(values)):
            raise ScinvInputError(f"{where}: continuous column '{key}' has missing or non-numeric values; fill them in")
        std = float(values.std()) or 1.0
        return cls(key=key, categorical=False, mean=float(values.mean()), std=std)


@dataclass
class EncodedData:
    """Everything the module needs for a set of cells; arrays are row-aligned.

    X: (n_cells, n_genes) CSR float32 counts, or a backed dataset.
    inv_covariates: (n_cells, d_inv) float32, spur_covariates: (n_cells, d_spur) float32.
    labels: (n_cells,) int64 label codes, -1 where unknown or when no label is registered.
    environments: (n_cells,) int64 batch codes (environments for the invariant predictor).
    """

    X: object
    inv_covariates: np.ndarray
    spur_covariates: np.ndarray
    labels: np.ndarray
    environments: np.ndarray

    @property
    def n_cells(self) -> int:
        return self.X.shape[0]

    @property
    def row_terms(self) -> np.ndarray:
        """(n_cells, 2) sum_g lgamma(x + 1) and log library size, computed once for in-memory data."""
        if getattr(self, "_row_terms", None) is None:
            self._row_terms = count_row_terms(self.X)
        return self._row_terms


@dataclass
class DataRegistry:
    layer: str | None = None
    batch_key: str | None = None
    label_key: str | None = None
    unknown_label: str = UNKNOWN_LABEL
    labels: list[str] = field(default_factory=list)
    batch: Covariate | None = None
    invariant: list[Covariate] = field(default_factory=list)
    spurious: list[Covariate] = field(default_factory=list)
    var_names: list[str] = field(default_factory=list)

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_anndata(
        cls,
        adata,
        layer: str | None = None,
        batch_key: str | None = None,
        label_key: str | None = None,
        unknown_label: str = UNKNOWN_LABEL,
        invariant_keys: Sequence[str] = (),
        spurious_keys: Sequence[str] = (),
        continuous_keys: Sequence[str] = (),
        where: str = "AnnData",
    ) -> DataRegistry:
        """Fit category maps from `adata.obs`. Columns in `continuous_keys` are standardised."""
        if layer is not None and layer not in adata.layers:
            raise ScinvInputError(f"{where}: layer '{layer}' not found (layers: {list(adata.layers)}); fix layer")
        reg = cls(layer=layer, batch_key=batch_key, label_key=label_key, unknown_label=unknown_label)
        reg.var_names = adata.var_names.astype(str).tolist()
        obs = adata.obs
        cont = set(continuous_keys)
        if label_key:
            if label_key not in obs.columns:
                raise ScinvInputError(f"{where}: label column '{label_key}' not found in obs; fix label_key")
            col = pd.Series(normalize_labels(obs[label_key], unknown_label))
            reg.labels = sorted(set(col.unique()) - {unknown_label})
            if not reg.labels:
                raise ScinvInputError(f"{where}: label column '{label_key}' holds only '{unknown_label}'; label some cells")
        if batch_key:
            reg.batch = Covariate.fit(obs, batch_key, where, categorical=True)

        def fit_all(keys):  # label and batch are registered above, so they are skipped here
            return [Covariate.fit(obs, k, where, categorical=False if k in cont else None) for k in keys if k not in (label_key, batch_key)]

        reg.invariant, reg.spurious = fit_all(invariant_keys), fit_all(spurious_keys)
        return reg

    # -- widths -----------------------------------------------------------------------------
    @property
    def n_labels(self) -> int:
        return len(self.labels)

    @property
    def n_batches(self) -> int:
        return self.batch.width if self.batch else 1

    @property
    def inv_width(self) -> int:
        """Width of the invariant covariates excluding the label one-hot."""
        return sum(c.width for c in self.invariant)

    @property
    def spur_width(self) -> int:
        return (self.batch.width if self.batch else 0) + sum(c.width for c in self.spurious)

    # -- encoding ---------------------------------------------------------------------------
    def check_genes(self, adata, where: str) -> None:
        """Refuse data whose genes are not the training genes in the training order."""
        if self.var_names and list(adata.var_names.astype(str)) != self.var_names:
            raise ScinvInputError(
                f"{where}: genes differ from the training genes ({adata.n_vars} vs {len(self.var_names)}); "
                "subset the data to the model's genes (model.var_names) in the same order"
            )

    def counts(self, adata):
        X = adata.layers[self.layer] if self.layer else adata.X
        if isinstance(X, CSRDataset):
            return X  # backed sparse dataset (backed X, or io.read_counts_for_model): rows are read per chunk by the loader
        if not sp.issparse(X):
            X = sp.csr_matrix(np.asarray(X, dtype=np.float32))
        return sp.csr_matrix(X, dtype=np.float32)

    def encode_encoder_covariates(self, obs: pd.DataFrame, where: str) -> tuple[np.ndarray, list[str]]:
        """Technical covariates as the encoder sees them; unseen batches become "unknown" (zeros).

        Returns the (n_cells, C_spur) array and the unseen categories/columns (for a warning).
        """
        covs = ([self.batch] if self.batch else []) + self.spurious
        parts, unseen = [], []
        for c in covs:
            if c.key not in obs.columns:
                unseen.append(f"column {c.key}")
            elif c.categorical:
                unseen += sorted(set(obs[c.key].astype(str)) - set(c.categories))
            parts.append(c.encode(obs, where, unknown="zero"))
        n = len(obs)
        return (np.concatenate(parts, axis=1) if parts else np.zeros((n, 0), np.float32)), unseen

    def encode_labels(self, obs: pd.DataFrame, where: str) -> np.ndarray:
        """Label codes (n_cells,), -1 for unknown labels or when the label column is absent."""
        n = len(obs)
        if not self.label_key or self.label_key not in obs.columns:
            return np.full(n, -1, dtype=np.int64)
        values = as_strings(obs[self.label_key]).fillna("").str.strip().to_numpy()
        lookup = {c: i for i, c in enumerate(self.labels)}
        known = ~unlabelled(obs[self.label_key], self.unknown_label)
        codes = np.fromiter((lookup.get(v, -1) if k else -1 for v, k in zip(values, known)), dtype=np.int64, count=n)
        unseen = sorted(set(values[(codes < 0) & known]))[:5]
        if unseen:
            raise ScinvInputError(
                f"{where}: label column '{self.label_key}' has labels not seen in training {unseen}; set them to '{self.unknown_label}' to have them predicted"
            )
        return codes

    def encode(self, adata, where: str = "AnnData", use_labels: bool = True) -> EncodedData:
        """Encode `adata` with the training category maps. Missing label column = all unknown."""
        obs = adata.obs
        self.check_genes(adata, where)
        n = adata.n_obs
        inv = [c.encode(obs, where) for c in self.invariant]
        batch = self.batch.encode(obs, where) if self.batch else None
        spur = ([batch] if batch is not None else []) + [c.encode(obs, where) for c in self.spurious]
        env = np.argmax(batch, axis=1).astype(np.int64) if batch is not None else np.zeros(n, dtype=np.int64)
        labels = self.encode_labels(obs, where) if use_labels else np.full(n, -1, dtype=np.int64)
        return EncodedData(
            X=self.counts(adata),
            inv_covariates=np.concatenate(inv, axis=1) if inv else np.zeros((n, 0), np.float32),
            spur_covariates=np.concatenate(spur, axis=1) if spur else np.zeros((n, 0), np.float32),
            labels=labels,
            environments=env,
        )

    # -- (de)serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DataRegistry:
        d = dict(d)
        d["batch"] = Covariate(**d["batch"]) if d.get("batch") else None
        d["invariant"] = [Covariate(**c) for c in d.get("invariant", [])]
        d["spurious"] = [Covariate(**c) for c in d.get("spurious", [])]
        return cls(**d)


# ---------------------------------------------------------------------------------------------
# Minibatches


class MinibatchLoader:
    """Yield minibatches as dense tensors from sparse CSR rows; never densifies the whole matrix.

    For backed (on-disk) data, rows are read in chunks of `chunk_size` cells, each gathered from
    random `block_size`-cell runs of the file and shuffled within, so memory stays flat in the
    number of cells and minibatches mix the whole file.

    Each batch is a dict of tensors: x (B, G) counts, inv (B, d_inv), spur (B, d_spur),
    label (B,), env (B,), index (B,) row positions in the encoded data.
    """

    def __init__(
        self,
        data: EncodedData,
        indices: np.ndarray | None = None,
        batch_size: int = 256,
        shuffle: bool = True,
        seed: int = 0,
        device: str | torch.device = "cpu",
        chunk_size: int = 16384,
        block_size: int = 1024,
        drop_last: bool = False,
        likelihood_terms: bool = True,
        x_log_dtype: torch.dtype = torch.float32,
    ):
        self.data = data
        self.x_log_dtype = x_log_dtype  # bf16 when the encoder's input layer computes in bf16
        self.indices = np.arange(data.n_cells) if indices is None else np.asarray(indices)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.rng = np.random.default_rng(seed)
        self.device = torch.device(device)
        self.backed = not sp.issparse(data.X)
        self.chunk_size = chunk_size
        self.block_size = block_size  # contiguous cells read at once from a backed file
        self.drop_last = drop_last
        self.likelihood_terms = likelihood_terms  # False: encoder inputs only (inference)
        self._set_at_least: torch.Tensor | None = None  # in memory: count_at_least of all self.indices

    def __len__(self) -> int:
        n = len(self.indices)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _order(self) -> Iterator[list[np.ndarray]]:
        """In memory: one permutation of all indices. Backed: chunks of about `chunk_size` cells made
        of `block_size`-cell runs of the file (sorted indices) drawn at random when shuffling, so
        that a chunk mixes many parts of the file (files are written sample by sample: whole
        16k-cell runs made minibatches of one or two samples)."""
        idx = self.indices
        if not self.backed:
            yield [self.rng.permutation(idx) if self.shuffle else idx]
            return
        idx = np.sort(idx)
        blocks = [idx[i : i + self.block_size] for i in range(0, len(idx), self.block_size)]
        if self.shuffle:
            blocks = [blocks[i] for i in self.rng.permutation(len(blocks))]
        per_chunk = max(1, self.chunk_size // self.block_size)
        for i in range(0, len(blocks), per_chunk):
            yield blocks[i : i + per_chunk]

    def _tensors(self, block: sp.csr_matrix, rows: np.ndarray, row_terms: np.ndarray | None, at_least: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Dense counts and log1p counts, plus the likelihood's count summaries (`at_least`: see __iter__)."""
        d = self.data
        values = block.data
        x_log = self._dense_log1p(block)
        covariates = {
            "inv": torch.from_numpy(d.inv_covariates[rows]),
            "spur": torch.from_numpy(d.spur_covariates[rows]),
            "label": torch.from_numpy(d.labels[rows]),
            "env": torch.from_numpy(d.environments[rows]),
            "index": torch.from_numpy(np.asarray(rows, dtype=np.int64)),
        }
        if not self.likelihood_terms:
            return {"x_log": x_log, **covariates}
        tail = values > COUNT_HISTOGRAM_BINS + 0.5
        return {
            "x": torch.from_numpy(block.toarray()),
            "x_log": x_log,
            "count_at_least": at_least,  # (G, K) float32
            "tail_cols": torch.from_numpy(block.indices[tail].astype(np.int64)),
            "tail_vals": torch.from_numpy(values[tail].astype(np.float32)),
            "log_x_factorial": torch.from_numpy(np.ascontiguousarray(row_terms[:, 0])),
            "log_lib": torch.from_numpy(np.ascontiguousarray(row_terms[:, 1:])),  # (B, 1)
            **covariates,
        }

    def _dense_log1p(self, block: sp.csr_matrix) -> torch.Tensor:
        """log1p counts (B, G) in `x_log_dtype`. For bf16 the rounded bit patterns are densified as
        uint16 (scipy has no bf16): half the bytes to write and no cast of the whole matrix later."""
        logged = np.log1p(block.data)
        if self.x_log_dtype == torch.bfloat16:
            bits = torch.from_numpy(logged).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            dense = sp.csr_matrix((bits, block.indices, block.indptr), shape=block.shape).toarray()
            return torch.from_numpy(dense.view(np.int16)).view(torch.bfloat16)
        dense = sp.csr_matrix((logged, block.indices, block.indptr), shape=block.shape).toarray()
        return torch.from_numpy(dense).to(self.x_log_dtype)

    def _whole_set_at_least(self) -> torch.Tensor:
        """count_at_least over all of this loader's cells (in-memory data), computed once."""
        if self._set_at_least is None:
            X, idx = self.data.X, self.indices
            self._set_at_least = sum(count_at_least(X[idx[i : i + self.chunk_size]]) for i in range(0, len(idx), self.chunk_size))
        return self._set_at_least

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """Minibatches. The count term of the likelihood depends on the counts only through per-gene
        histograms (module._CountLgammaSum) and on no parameter but theta, so each batch carries the
        histogram of the whole set it is drawn from (all cells in memory, else the current backed
        chunk) scaled by its share of that set, instead of its own: the same expectation, exactly
        the same sum over an epoch, a lower-variance theta gradient, and no histogram per batch
        (~0.25 ms, 2-3 % of a CPU training step). Counts above the histogram's range stay per batch."""
        d = self.data
        pin = self.device.type == "cuda"
        for blocks in self._order():
            chunk = np.concatenate(blocks)
            if self.backed:
                source = sp.vstack([d.X[b[0] : b[-1] + 1][b - b[0]] for b in blocks], format="csr", dtype=np.float32)
                source_row_terms = count_row_terms(source) if self.likelihood_terms else None
                set_at_least = count_at_least(source) if self.likelihood_terms else None
                pos = self.rng.permutation(len(chunk)) if self.shuffle else np.arange(len(chunk))
            else:
                source, pos = d.X, chunk
                source_row_terms = d.row_terms if self.likelihood_terms else None
                set_at_least = self._whole_set_at_least() if self.likelihood_terms else None
            for start in range(0, len(pos), self.batch_size):
                sel = pos[start : start + self.batch_size]
                if self.drop_last and len(sel) < self.batch_size:
                    break
                rows = chunk[sel] if self.backed else sel
                share = None if set_at_least is None else set_at_least * (len(sel) / len(pos))
                batch = self._tensors(source[sel], rows, None if source_row_terms is None else source_row_terms[sel], share)
                if self.device.type != "cpu":
                    batch = {k: (v.pin_memory() if pin else v).to(self.device, non_blocking=True) for k, v in batch.items()}
                yield batch


def count_at_least(block: sp.csr_matrix) -> torch.Tensor:
    """(G, K) float32: per gene, how many entries of `block` exceed j (j < K), counting entries up
    to K only (larger ones are listed per batch; see module._CountLgammaSum).

    One bincount of gene * (K + 2) + min(count, K + 1) (torch's int32 bincount is ~2x faster than
    numpy's); columns 0 (stored zeros) and K + 1 (tail) dropped; then a reverse cumulative sum over
    the bins, as a matmul with a triangle.
    """
    k, n_genes = COUNT_HISTOGRAM_BINS, block.shape[1]
    counts = torch.from_numpy(block.data).add(0.5).to(torch.int32).clamp_(max=k + 1)  # non-negative: rounds
    codes = torch.from_numpy(block.indices).to(torch.int32).mul(k + 2).add_(counts)  # mul, not mul_: .to may share the array
    hist = torch.bincount(codes, minlength=n_genes * (k + 2)).view(n_genes, k + 2)[:, 1 : k + 1].to(torch.float32)
    return hist @ _SUFFIX_SUM


def count_row_terms(X: sp.csr_matrix) -> np.ndarray:
    """(n_rows, 2) float32: per row sum of lgamma(x + 1), the count-only constant of the NB
    likelihood, and the log library size log(max(sum x, 1))."""
    from scipy.special import gammaln

    rows = np.repeat(np.arange(X.shape[0]), np.diff(X.indptr))
    log_fact = np.bincount(rows, weights=gammaln(X.data.astype(np.float64) + 1.0), minlength=X.shape[0])
    library = np.bincount(rows, weights=X.data, minlength=X.shape[0])
    return np.stack([log_fact, np.log(np.maximum(library, 1.0))], axis=1).astype(np.float32)


def split_train_validation(n_cells: int, validation_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random split of row positions; returns (train, validation), validation possibly empty."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n_cells)
    n_val = int(round(n_cells * validation_fraction)) if n_cells >= 20 else 0
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def hide_heldout_labels(obs: pd.DataFrame, batch_key: str, label_key: str, heldout: list[str], unknown_label: str, where: str) -> pd.Series:
    """The label column with every cell of the `heldout` batches set to `unknown_label`.

    Training on the result treats those batches as unlabelled query data (label-marginal prior, no
    classifier or predictor target), so label transfer to them can be scored honestly afterwards.
    """
    for key in (batch_key, label_key):
        if key not in obs.columns:
            raise ScinvInputError(f"{where}: obs column '{key}' not found; fix batch_key/label_key")
    hidden = heldout_training_cells(obs, batch_key, heldout, where)
    labels = obs[label_key].astype(str).to_numpy(copy=True)
    labels[hidden] = unknown_label
    return pd.Series(labels, index=obs.index, name=label_key)
