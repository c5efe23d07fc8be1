"""The ``SCINV_PLAIN_MATH`` switch, and the small speed tricks shared by the layers and kernels.

Every speed trick of the model code has a plain torch twin that computes the same quantity:

==========================================  ===============================  ==========================================
trick                                       where                            plain twin
==========================================  ===============================  ==========================================
NB dense term, softmax fused in             ``nb._NBFromLogits``             ``nb.nb_log_prob_dense_plain``
NB count term from count histograms         ``nb._CountLgammaSum``           ``nb.count_lgamma_sum_plain``
posterior + sample + KL in one node         ``gaussian._GaussianLatent``     ``gaussian.gaussian_latent_plain``
private op ``aten.hardtanh_backward``       ``_GaussianLatent.backward``     (autograd of the twin)
numpy SIMD kernels on one CPU thread        :func:`transcendental`           the torch function
hardtanh as clamp                           :func:`clamp`                    ``torch.clamp``
dropout mask by float arithmetic            ``layers.Dropout.mask``          a comparison
fused AdamW                                 ``training.make_optimizer``      AdamW without ``fused``
==========================================  ===============================  ==========================================

``SCINV_PLAIN_MATH=1`` (any value but empty, 0, false, no, off) selects all the twins, to bisect a
numerical regression: if it goes away under the switch, a kernel is to blame. The variable is read
at every call (:func:`plain_math`), so it can be set or cleared between steps of one process.

The switch changes how things are computed, never what: the estimators (count histograms, the
per-batch share of the whole set's histogram), the data preparation in :mod:`scinv.data`, the random
streams (dropout draws the same bits either way) and bf16 mixed precision (its own setting,
``TrainingConfig.mixed_precision``) stay as they are, so a plain run differs from a fused one by
rounding only. Timings of the tricks: docs/benchmarks.md, "Fused kernels".
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

PLAIN_MATH_ENV = "SCINV_PLAIN_MATH"
_OFF = ("", "0", "false", "no", "off")


def plain_math() -> bool:
    """Whether ``SCINV_PLAIN_MATH`` is set to a true value (anything but empty, 0, false, no, off,
    case-insensitive): then every fused kernel and speed trick runs as plain torch autograd math.
    Read from the environment at every call, not cached."""
    return os.environ.get(PLAIN_MATH_ENV, "").strip().lower() not in _OFF


def clamp(t: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """torch.clamp of t (any shape) whose gradient (zero outside [low, high]) comes from one backward
    kernel, hardtanh's, where clamp's builds boolean masks. The two differ only at exactly `low` or
    `high`, where hardtanh passes no gradient. Plain math: torch.clamp."""
    if plain_math():
        return torch.clamp(t, low, high)
    return F.hardtanh(t, low, high)


def one_thread_cpu(t: torch.Tensor) -> bool:
    """Whether to run a transcendental pass over `t` (any shape) with numpy's SIMD kernels: on one
    CPU thread they are faster than torch's, from two threads torch parallelises and wins
    (docs/benchmarks.md, "Fused kernels"). Never under plain math."""
    return t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) and torch.get_num_threads() == 1 and not plain_math()


def transcendental(t: torch.Tensor, numpy_fn, torch_fn, inplace: bool = False) -> torch.Tensor:
    """numpy_fn(t) on one CPU thread (see :func:`one_thread_cpu`), else torch_fn(t); t any shape,
    the result the same. In place, or into a new tensor from torch's allocator (numpy's would fault
    in fresh pages every step). No autograd: for the forward passes of the fused kernels."""
    if not (one_thread_cpu(t) and t.is_contiguous()):
        return torch_fn(t, out=t) if inplace else torch_fn(t)
    out = t if inplace else torch.empty_like(t)
    numpy_fn(t.numpy(), out=out.numpy())
    return out
