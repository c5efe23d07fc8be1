"""Diagonal Gaussians: log densities, KLs, the posterior transform, and the fused latent kernel.

Shapes: B cells, D = D_inv + D_spur latent dimensions (z = [z_inv | z_spur]); "..." is any
leading shape.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .fastmath import clamp, plain_math

LOG_2PI = math.log(2 * math.pi)
LOG_VAR_MIN, LOG_VAR_MAX, VAR_FLOOR = -12.0, 8.0, 1e-6  # posterior variance = exp(clamped log var) + floor


def posterior_variance(raw_log_var: torch.Tensor) -> torch.Tensor:
    """Encoder log variance (..., D), unclamped -> posterior variance (..., D): exp(clamp) + floor."""
    return torch.exp(clamp(raw_log_var, LOG_VAR_MIN, LOG_VAR_MAX)) + VAR_FLOOR


def gaussian_log_prob(z: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """log N(z; mean, diag(var)) summed over the last dimension: z, mean, var (..., D) -> (...)."""
    return -0.5 * (LOG_2PI + torch.log(var) + (z - mean) ** 2 / var).sum(-1)


def gaussian_kl_terms(qm: torch.Tensor, qv: torch.Tensor, pm: torch.Tensor, pv: torch.Tensor | None) -> torch.Tensor:
    """KL(N(qm, qv) || N(pm, pv)) per dimension: all (..., D) -> (..., D); pv None is unit variance (fewer ops)."""
    if pv is None:
        return 0.5 * (qv - torch.log(qv) + (qm - pm).square() - 1.0)
    return 0.5 * (torch.log(pv / qv) + (qv + (qm - pm) ** 2) / pv - 1.0)


def gaussian_kl(qm: torch.Tensor, qv: torch.Tensor, pm: torch.Tensor, pv: torch.Tensor | None) -> torch.Tensor:
    """KL(N(qm, qv) || N(pm, pv)) summed over the last dimension: (..., D) -> (...); pv None is unit variance."""
    return gaussian_kl_terms(qm, qv, pm, pv).sum(-1)


class _GaussianLatent(torch.autograd.Function):
    """Posterior, reparameterised sample and analytic KL to unit-variance priors in one autograd node.

    Inputs: heads (B, 2 D) [mean | raw log variance] from the encoder, prior_mean (B, D), noise
    (B, D) standard normal or None (then z is the mean), n_inv = D_inv. Returns z, qm, qv (B, D)
    and the KL of each block summed per cell, kl_inv (B,) and kl_spur (B,), with

        qv = exp(clamp(log var)) + floor,   z = qm + sqrt(qv) noise,
        KL(N(qm, qv) || N(pm, 1)) = (qv - log qv + (qm - pm)^2 - 1) / 2 per dimension.

    The same expressions in autograd (:func:`gaussian_latent_plain`) take ~15 nodes on (B, D)
    tensors, whose framework time on CPU exceeds their arithmetic. Gradients:
    dz/dqm = 1, dz/dqv = noise / (2 sqrt(qv)), dKL/dqm = qm - pm = -dKL/dpm, dKL/dqv = (1 - 1/qv) / 2,
    dqv/dlog var = qv - floor inside the clamp, 0 outside.
    """

    @staticmethod
    def forward(ctx, heads, prior_mean, noise, n_inv: int):
        qm, raw_log_var = heads.split(prior_mean.shape[-1], dim=-1)
        qv = F.hardtanh(raw_log_var, LOG_VAR_MIN, LOG_VAR_MAX).exp_().add_(VAR_FLOOR)
        std = qv.sqrt()
        z = torch.addcmul(qm, std, noise) if noise is not None else qm.clone()
        diff = qm - prior_mean
        kl = (qv - qv.log()).addcmul_(diff, diff).sub_(1.0).mul_(0.5)
        ctx.save_for_backward(raw_log_var, qv, std, diff, noise)
        ctx.n_inv = n_inv
        ctx.set_materialize_grads(False)  # unused outputs (often qv) get None, not a zero tensor to add
        qm = qm.contiguous()
        return z, qm, qv, kl[:, :n_inv].sum(-1), kl[:, n_inv:].sum(-1)

    @staticmethod
    def backward(ctx, g_z, g_qm, g_qv, g_kl_inv, g_kl_spur):
        raw_log_var, qv, std, diff, noise = ctx.saved_tensors
        n = ctx.n_inv
        g_kl = torch.zeros_like(qv)  # per-dimension weight of each block's KL
        if g_kl_inv is not None:
            g_kl[:, :n] = g_kl_inv[:, None]
        if g_kl_spur is not None:
            g_kl[:, n:] = g_kl_spur[:, None]
        g_prior_mean = g_kl * diff
        g_mean = g_prior_mean.clone() if g_qm is None else torch.add(g_qm, g_prior_mean)
        g_var = (1.0 - qv.reciprocal()).mul_(0.5).mul_(g_kl)
        if g_qv is not None:
            g_var += g_qv
        if g_z is not None:
            g_mean += g_z
            if noise is not None:
                g_var.addcmul_(g_z, noise / (2.0 * std))
        g_log_var = torch.ops.aten.hardtanh_backward(g_var.mul_(qv - VAR_FLOOR), raw_log_var, LOG_VAR_MIN, LOG_VAR_MAX)
        return torch.cat([g_mean, g_log_var], dim=-1), g_prior_mean.neg_(), None, None


def gaussian_latent_plain(heads: torch.Tensor, prior_mean: torch.Tensor, noise: torch.Tensor | None, n_inv: int):
    """:class:`_GaussianLatent` in plain autograd (same inputs and outputs): the reference its
    backward is tested against, and what ``SCINV_PLAIN_MATH=1`` runs."""
    qm, raw_log_var = heads.split(prior_mean.shape[-1], dim=-1)
    qv = posterior_variance(raw_log_var)
    z = qm + qv.sqrt() * noise if noise is not None else qm
    kl = gaussian_kl_terms(qm, qv, prior_mean, None)
    return z, qm, qv, kl[:, :n_inv].sum(-1), kl[:, n_inv:].sum(-1)


def gaussian_latent(heads: torch.Tensor, prior_mean: torch.Tensor, noise: torch.Tensor | None, n_inv: int):
    """heads (B, 2 D) [mean | raw log variance], prior_mean (B, D), noise (B, D) or None, n_inv =
    D_inv -> z, qm, qv (B, D), kl_inv (B,), kl_spur (B,); see :class:`_GaussianLatent` (fused) and
    :func:`gaussian_latent_plain` (``SCINV_PLAIN_MATH=1``)."""
    if plain_math():
        return gaussian_latent_plain(heads, prior_mean, noise, n_inv)
    return _GaussianLatent.apply(heads, prior_mean, noise, n_inv)
