"""Training loop: minibatches from sparse rows, KL warm-up, validation, early stopping, LR schedule,
progress with ETA, bf16 mixed precision (GPU, and CPUs with native bf16), and resumable checkpoints (weights_only-loadable)."""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .config import TrainingConfig
from .data import EncodedData, MinibatchLoader, split_train_validation
from .errors import ScinvInputError
from .io import write_bytes_atomically
from .module import InVAEModule, plain_math

log = logging.getLogger("scinv")
CHECKPOINT_NAME = "last.ckpt"


class CheckpointStore:
    """`last.ckpt` in a local directory or under a URL that fsspec knows (s3://, gs://, az://).

    Local files are written by io.write_bytes_atomically (an unnamed file linked in only when
    complete, then renamed); an object store makes a single PUT visible
    only when complete, so a killed task never leaves a half-written checkpoint either way. Loading
    uses torch.load(weights_only=True): no pickle code runs.
    """

    def __init__(self, location: str | os.PathLike):
        location = str(location)
        self.remote = "://" in location and not location.startswith("file://")
        self.path = f"{location.rstrip('/')}/{CHECKPOINT_NAME}" if self.remote else str(Path(location.removeprefix("file://")) / CHECKPOINT_NAME)

    def _fs(self):
        import fsspec

        try:
            return fsspec.core.url_to_fs(self.path)[0]
        except (ImportError, ValueError) as err:
            raise ScinvInputError(f"checkpoint dir {self.path}: {err}; install the filesystem package (s3fs for s3://) or use a local path") from err

    def exists(self) -> bool:
        return self._fs().exists(self.path) if self.remote else Path(self.path).exists()

    def save(self, state: dict) -> str:
        buf = io.BytesIO()
        torch.save(state, buf)
        if not self.remote:
            write_bytes_atomically(self.path, buf.getbuffer())
            return self.path
        with self._fs().open(self.path, "wb") as fh:
            fh.write(buf.getvalue())
        return self.path

    def load(self) -> dict:
        if not self.remote:
            return torch.load(self.path, map_location="cpu", weights_only=True)
        with self._fs().open(self.path, "rb") as fh:
            return torch.load(io.BytesIO(fh.read()), map_location="cpu", weights_only=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def keep_freed_memory_for_reuse() -> None:
    """Ask glibc malloc to keep freed blocks under 64 MB for reuse instead of returning them to the OS.

    Every training step allocates and frees several (batch x genes) tensors of ~2 MB. glibc serves
    blocks that large with mmap and unmaps them on free unless its dynamic threshold happens to
    have been raised by earlier large frees, so, depending on what the process did before (reading
    an h5ad vs building data in memory), each step faulted in ~5 MB of fresh zeroed pages: 1,227
    page faults per step and 10 % of the epoch, measured. Process-wide and idempotent; a no-op off
    glibc or when the user set MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ themselves.
    """
    if not sys.platform.startswith("linux") or any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
        libc.mallopt(m_mmap_threshold, 64 << 20)
        libc.mallopt(m_trim_threshold, 256 << 20)
    except (OSError, AttributeError):  # musl or another libc: nothing to tune
        pass


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 wide layers pay off: on CPUs with native bf16 (AVX512-BF16 or AMX), ~2x. Not on
    CUDA: a step there is bound by kernel launches, not matmuls, and the casts cost more than they
    save (H200, 2,000 genes: 0.82x at batch 256, 0.93x at 1,024, 0.91x at 4,096; docs/benchmarks.md)."""
    if device.type != "cpu":
        return False
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # older torch
        return False


def make_optimizer(params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW, fused into one kernel where this torch build supports it (CPU and CUDA since 2.4); not under SCINV_PLAIN_MATH=1."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=not plain_math())
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def resolve_device(device: str | None = "auto") -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _format_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else (f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s")


def progress(message: str) -> None:
    """One progress line to stderr (Nextflow puts it in the task log), flushed at once."""
    print(message, file=sys.stderr, flush=True)


class _RunningMeans:
    """Cell-weighted means of per-batch losses, kept as tensors so that a GPU is synchronised
    once per epoch rather than once per loss term and batch."""

    def __init__(self):
        self.keys: list[str] = []
        self.totals: torch.Tensor | float = 0.0
        self.n = 0

    def add(self, out: dict[str, torch.Tensor], n_cells: int) -> None:
        self.keys = list(out)
        self.totals = self.totals + torch.stack(list(out.values())).detach() * n_cells
        self.n += n_cells

    def result(self, prefix: str) -> dict[str, float]:
        if not self.keys:
            return {}
        values = (self.totals / max(self.n, 1)).tolist()
        return {f"{prefix}{k}": v for k, v in zip(self.keys, values)}


class EarlyStopping:
    """The best monitored value and state so far; stop after `patience` updates without an
    improvement of more than `min_delta` (patience 0: never). Used by the VAE and the predictor."""

    def __init__(self, patience: int, min_delta: float = 0.0):
        self.patience, self.min_delta = patience, min_delta
        self.best, self.best_state, self.bad = math.inf, None, 0

    def update(self, value: float, state) -> bool:
        """Record `value`; `state()` is called (to copy the weights) only on improvement. True: stop now."""
        if value < self.best - self.min_delta:
            self.best, self.best_state, self.bad = value, state(), 0
            return False
        self.bad += 1
        return bool(self.patience) and self.bad >= self.patience


DEFAULT_MAX_EPOCHS = 200


def default_max_epochs(n_cells: int) -> int:
    """200 epochs, fewer for large data so that training sees about 8 million cells (scvi-tools'
    rule, min(round(20000 / n_cells * 400), 400), with scinv's cap of 200): 80 at 100k, 8 at 1M."""
    return int(max(1, min(DEFAULT_MAX_EPOCHS, round(8e6 / max(n_cells, 1)))))


class Trainer:
    """Fits an :class:`InVAEModule` on :class:`EncodedData`. History is a list of per-epoch dicts."""

    def __init__(self, module: InVAEModule, data: EncodedData, config: TrainingConfig, device: torch.device, frozen=(), parameters=None):
        """`frozen`: submodules kept in eval mode (batch-norm statistics untouched); `parameters`:
        what the optimiser updates (default: every parameter of `module`)."""
        if config.max_epochs is None:
            config = dataclasses.replace(config, max_epochs=default_max_epochs(data.n_cells))
            progress(f"max_epochs not set: {config.max_epochs} for {data.n_cells:,} cells (scinv.training.default_max_epochs)")
        self.module, self.data, self.config, self.device = module.to(device), data, config, device
        self.frozen = list(frozen)
        self.train_idx, self.val_idx = split_train_validation(data.n_cells, config.validation_fraction, config.seed)
        self.optimizer = make_optimizer(module.parameters() if parameters is None else parameters, config.lr, config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(self.optimizer, mode="min", factor=config.lr_factor, patience=config.lr_patience)
        self.loader_rng_seed = config.seed
        self.history: list[dict] = []
        self.epoch = 0
        self.early_stopping = EarlyStopping(config.early_stopping_patience, config.min_delta)
        self.stopped_early = False
        self.amp_dtype = torch.bfloat16 if (config.mixed_precision and native_bf16(device)) else None

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "module": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "history": self.history,
            "best_loss": self.early_stopping.best,
            "best_state": self.early_stopping.best_state,
            "bad_epochs": self.early_stopping.bad,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy_rng": self.loader.rng.bit_generator.state,
            "train_idx": torch.from_numpy(self.train_idx),
            "val_idx": torch.from_numpy(self.val_idx),
        }

    def save_checkpoint(self, location: str | os.PathLike) -> str:
        """Write the full training state to `location`/last.ckpt (local or s3://...), never half-written."""
        return CheckpointStore(location).save(self.state_dict())

    def load_checkpoint(self, location: str | os.PathLike) -> None:
        state = CheckpointStore(location).load()
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.history = state["epoch"], state["history"]
        es = self.early_stopping
        es.best, es.best_state, es.bad = state["best_loss"], state["best_state"], state["bad_epochs"]
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.train_idx, self.val_idx = state["train_idx"].numpy(), state["val_idx"].numpy()
        self._make_loaders()
        self.loader.rng.bit_generator.state = state["numpy_rng"]

    # -- loop -------------------------------------------------------------------------------------
    def _make_loaders(self) -> None:
        c = self.config
        # drop a trailing batch of one cell: batch norm cannot train on it
        drop_last = len(self.train_idx) % c.batch_size == 1
        x_log_dtype = self.amp_dtype or torch.float32  # the encoder's input layer reads it in this dtype
        self.loader = MinibatchLoader(self.data, self.train_idx, c.batch_size, True, c.seed, self.device, drop_last=drop_last, x_log_dtype=x_log_dtype)
        self.val_loader = MinibatchLoader(self.data, self.val_idx, max(c.batch_size, 1024), False, c.seed, self.device, x_log_dtype=x_log_dtype)

    def kl_weight(self, epoch: int) -> float:
        w = self.config.kl_warmup_epochs or 0
        return 1.0 if w <= 0 else min(1.0, (epoch + 1) / w)

    def _run_epoch(self, epoch: int) -> dict:
        self.module.train()
        for sub in self.frozen:
            sub.eval()
        means = _RunningMeans()
        kl_w = self.kl_weight(epoch)
        with self.module.wide_layers_in(self.amp_dtype):
            for batch in self.loader:
                out = self.module(batch, kl_weight=kl_w, dataset_size=len(self.train_idx))
                self.optimizer.zero_grad(set_to_none=True)
                out["loss"].backward()
                self.optimizer.step()
                means.add(out, batch["x"].shape[0])
        return means.result("train_")

    @torch.no_grad()
    def _validate(self, epoch: int) -> dict:
        if len(self.val_idx) == 0:
            return {}
        self.module.eval()
        means = _RunningMeans()
        with self.module.wide_layers_in(self.amp_dtype):
            for batch in self.val_loader:
                out = self.module(batch, kl_weight=1.0, dataset_size=len(self.val_idx))
                means.add(out, batch["x"].shape[0])
        return means.result("validation_")

    def fit(self, checkpoint_dir: str | os.PathLike | None = None, resume: bool = True) -> list[dict]:
        c = self.config
        seed_everything(c.seed)
        keep_freed_memory_for_reuse()
        self._make_loaders()
        if checkpoint_dir and resume and CheckpointStore(checkpoint_dir).exists():
            self.load_checkpoint(checkpoint_dir)
            progress(f"resumed from {CheckpointStore(checkpoint_dir).path} at epoch {self.epoch}")
        progress(
            f"training on {self.device} ({len(self.train_idx)} train / {len(self.val_idx)} validation cells, "
            f"{sum(p.numel() for p in self.module.parameters()):,} parameters, up to {c.max_epochs} epochs)"
        )
        start, start_epoch = time.perf_counter(), self.epoch
        while self.epoch < c.max_epochs and not self.stopped_early:
            t0 = time.perf_counter()
            record = {"epoch": self.epoch + 1, "kl_weight": self.kl_weight(self.epoch)}
            record.update(self._run_epoch(self.epoch))
            record.update(self._validate(self.epoch))
            record["lr"] = self.optimizer.param_groups[0]["lr"]
            record["seconds"] = time.perf_counter() - t0
            self.history.append(record)
            self.epoch += 1
            self._track_best(record)
            if c.checkpoint_every and checkpoint_dir and self.epoch % c.checkpoint_every == 0:
                self.save_checkpoint(checkpoint_dir)
            if c.log_every and (self.epoch % c.log_every == 0 or self.epoch == c.max_epochs or self.stopped_early):
                done = self.epoch - start_epoch
                eta = (time.perf_counter() - start) / done * (c.max_epochs - self.epoch)
                val = record.get("validation_loss")
                progress(
                    f"epoch {self.epoch}/{c.max_epochs} loss {record['train_loss']:.2f} "
                    f"(recon {record['train_reconstruction']:.2f}, kl_inv {record['train_kl_inv']:.2f}, "
                    f"kl_spur {record['train_kl_spur']:.2f})"
                    + (f" val {val:.2f}" if val is not None else "")
                    + f" lr {record['lr']:.1e} {record['seconds']:.2f}s/epoch ETA {_format_seconds(eta)}"
                )
        if self.stopped_early:
            progress(f"early stopping at epoch {self.epoch}: validation loss has not improved for {c.early_stopping_patience} epochs")
        if checkpoint_dir and c.checkpoint_every:
            self.save_checkpoint(checkpoint_dir)  # the last state, so a longer rerun continues exactly
        if self.early_stopping.best_state is not None:
            self.module.load_state_dict(self.early_stopping.best_state)
        self.module.eval()
        return self.history

    def _track_best(self, record: dict) -> None:
        """Early stopping and LR schedule follow the validation loss once the KL warm-up is over."""
        monitored = record.get("validation_loss", record["train_loss"])
        if record["kl_weight"] < 1.0:
            return
        self.scheduler.step(monitored)
        self.stopped_early = self.early_stopping.update(monitored, lambda: {k: v.detach().clone().cpu() for k, v in self.module.state_dict().items()})
