"""Negative binomial likelihood of counts: the plain reference and the two fused kernels of the
training loss, each with its plain autograd twin (``SCINV_PLAIN_MATH=1``, see :mod:`.fastmath`).

Shapes: B cells, G genes, K count-histogram bins, T tail entries (counts above K).
NB(x; mu, theta) has mean mu and inverse dispersion theta; mu = lib softmax(logits).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .fastmath import plain_math, transcendental

LN_2 = math.log(2.0)
LOG2_E = 1.0 / LN_2


def negative_binomial_log_prob(x: torch.Tensor, log_mu: torch.Tensor, log_theta: torch.Tensor) -> torch.Tensor:
    """log NB(x; mean mu, inverse dispersion theta) per cell, summed over genes.

    x (B, G) counts, log_mu (B, G), log_theta (G,) -> (B,). Plain autograd: the reference the fast
    path (nb_log_prob_dense + count_lgamma_sum) is tested against, and the loss when a batch comes
    without count summaries.
    """
    theta = log_theta.exp()
    log_mu_theta = torch.logaddexp(log_mu, log_theta)  # log(mu + theta)
    return (torch.lgamma(x + theta) - torch.lgamma(theta) - torch.lgamma(x + 1.0) + theta * (log_theta - log_mu_theta) + x * (log_mu - log_mu_theta)).sum(-1)


class _NBFromLogits(torch.autograd.Function):
    """Dense part of the NB log-likelihood per cell (B,) straight from decoder logits (B, G):

        sum_g x d - (x + theta) softplus(d),   d = log mu - log theta,   mu = lib softmax(logits).

    The x-only lgamma terms are left out (see count_lgamma_sum). The softmax is fused into the
    likelihood with a hand-written backward: the forward takes two transcendental passes over
    (B, G) (exp2 of the shifted logits, log1p) where autograd of the same expressions
    (:func:`nb_log_prob_dense_plain`) takes six, and d itself is never materialised (sum_g x d is a
    dot product with the shifted logits plus per-row and per-gene constants). On CPU these passes
    dominate the step after the matmuls.
    Gradients: dL/dd = x - (x + theta) sigmoid(d); dL/dlogits = dL/dd - softmax * sum_g dL/dd;
    dL/dlog theta = -sum_b dL/dd - theta sum_b softplus(d).
    """

    @staticmethod
    def forward(ctx, x, logits, log_lib, log_theta):
        theta = log_theta.exp()
        # t = (logits - row max) log2(e) in fp32, in place on a copy; softmax = 2^t / sum 2^t
        t = logits.to(x.dtype, copy=True)
        t.mul_(LOG2_E).sub_(t.amax(-1, keepdim=True))
        x_dot_t = torch.linalg.vecdot(x, t)
        # t is 2^t from here on (torch's CPU exp2 is also faster than its exp)
        e = transcendental(t, np.exp2, torch.exp2, inplace=True)
        log_sum = e.sum(-1, keepdim=True).log_()
        # e = mu / theta = lib 2^t / (sum 2^t theta), finite because log theta is clamped in the module
        e.mul_(torch.exp(log_lib - log_sum)).mul_(torch.exp(-log_theta))
        sp = transcendental(e, np.log1p, torch.log1p)  # softplus(d)
        # sum_g x d, with d = t ln 2 + (log lib - log sum) - log theta
        x_dot_d = x_dot_t * LN_2 + (log_lib - log_sum).squeeze(1) * x.sum(-1) - x @ log_theta
        out = x_dot_d - torch.linalg.vecdot(x, sp) - sp @ theta
        ctx.save_for_backward(x, e, sp, theta, log_lib)
        ctx.logits_dtype = logits.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        x, e, sp, theta, log_lib = ctx.saved_tensors
        grad = grad.to(e.dtype)
        mu = e * theta
        # x - (x + theta) sigmoid(d) = (x - theta e) / (1 + e): four passes over (B, G) instead of six
        grad_d = torch.sub(x, mu).div_(e + 1.0).mul_(grad[:, None])
        grad_log_theta = -grad_d.sum(0) - theta * (grad @ sp)
        # minus softmax * row sum, with softmax = mu / lib, in one pass
        grad_logits = grad_d.addcmul_(mu, grad_d.sum(-1, keepdim=True) / log_lib.exp(), value=-1.0)
        return None, grad_logits.to(ctx.logits_dtype), None, grad_log_theta


def nb_log_prob_dense_plain(x: torch.Tensor, logits: torch.Tensor, log_lib: torch.Tensor, log_theta: torch.Tensor) -> torch.Tensor:
    """:class:`_NBFromLogits` in plain autograd (same inputs and output, computed in x's dtype):
    sum_g x d - (x + theta) softplus(d), d = log_softmax(logits) + log lib - log theta."""
    d = F.log_softmax(logits.to(x.dtype), dim=-1) + log_lib - log_theta
    return (x * d - (x + log_theta.exp()) * F.softplus(d)).sum(-1)


def nb_log_prob_dense(x: torch.Tensor, logits: torch.Tensor, log_lib: torch.Tensor, log_theta: torch.Tensor) -> torch.Tensor:
    """x (B, G) counts, logits (B, G) (fp32 or bf16), log_lib (B, 1), log_theta (G,) -> (B,) in x's
    dtype: the NB log-likelihood without its x-only terms; see :class:`_NBFromLogits` (fused) and
    :func:`nb_log_prob_dense_plain` (``SCINV_PLAIN_MATH=1``)."""
    if plain_math():
        return nb_log_prob_dense_plain(x, logits, log_lib, log_theta)
    return _NBFromLogits.apply(x, logits, log_lib, log_theta)


class _CountLgammaSum(torch.autograd.Function):
    """sum over non-zero entries of lgamma(x + theta_g) - lgamma(theta_g) (a scalar), from counts
    summarised per gene.

    at_least (G, K): how many entries of gene g exceed j, counting entries up to K only; entries
    above K come as (tail_cols, tail_vals), each (T,). Counts are small (above 16 is ~0.5 % of
    entries), so this costs G x K terms instead of one lgamma pair per non-zero entry. For integer
    x, lgamma(x + theta) - lgamma(theta) = sum_{j < x} log(theta + j), so the total is
    sum_{g, j} at_least[g, j] log(theta_g + j): G x K logs, whose gradient is reciprocals rather
    than digammas, and which does not cancel two large lgammas in fp32 (lgamma(1e5) ~ 1e6, fp32
    spacing 0.06). One autograd node instead of a dozen (:func:`count_lgamma_sum_plain`), whose
    framework time on CPU exceeds their arithmetic here.
    """

    @staticmethod
    def forward(ctx, log_theta, at_least, tail_cols, tail_vals):
        theta = log_theta.exp()
        shifted = theta[:, None] + torch.arange(at_least.shape[1], device=theta.device, dtype=theta.dtype)  # theta_g + j
        tail_theta = theta[tail_cols]
        tail = torch.lgamma(tail_vals + tail_theta).sub_(torch.lgamma(tail_theta)).sum()
        ctx.save_for_backward(theta, shifted, at_least, tail_cols, tail_vals, tail_theta)
        return torch.linalg.vecdot(at_least.flatten(), transcendental(shifted, np.log, torch.log).flatten()) + tail

    @staticmethod
    def backward(ctx, grad):
        theta, shifted, at_least, tail_cols, tail_vals, tail_theta = ctx.saved_tensors
        d_theta = (at_least / shifted).sum(1)  # d/dtheta_g of sum_j at_least log(theta_g + j)
        d_theta.index_add_(0, tail_cols, torch.digamma(tail_vals + tail_theta).sub_(torch.digamma(tail_theta)))
        return grad * theta * d_theta, None, None, None


def count_lgamma_sum_plain(log_theta: torch.Tensor, at_least: torch.Tensor, tail_cols: torch.Tensor, tail_vals: torch.Tensor) -> torch.Tensor:
    """:class:`_CountLgammaSum` in plain autograd (same inputs and output): the same histogram sum
    sum_{g, j} at_least[g, j] log(theta_g + j), plus lgamma differences for the tail."""
    theta = log_theta.exp()
    shifted = theta[:, None] + torch.arange(at_least.shape[1], device=theta.device, dtype=theta.dtype)  # (G, K): theta_g + j
    tail_theta = theta[tail_cols]
    return (at_least * torch.log(shifted)).sum() + (torch.lgamma(tail_vals + tail_theta) - torch.lgamma(tail_theta)).sum()


def count_lgamma_sum(log_theta: torch.Tensor, at_least: torch.Tensor, tail_cols: torch.Tensor, tail_vals: torch.Tensor) -> torch.Tensor:
    """log_theta (G,), at_least (G, K), tail_cols / tail_vals (T,) -> scalar; see
    :class:`_CountLgammaSum` (fused) and :func:`count_lgamma_sum_plain` (``SCINV_PLAIN_MATH=1``)."""
    if plain_math():
        return count_lgamma_sum_plain(log_theta, at_least, tail_cols, tail_vals)
    return _CountLgammaSum.apply(log_theta, at_least, tail_cols, tail_vals)
