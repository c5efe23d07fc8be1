"""Priors of the latent blocks: p(z_inv | y) and p(z_spur | e) as conditional Gaussians, or
NFinVAE's exponential-family prior for z_inv fitted by score matching.

Shapes: B cells, C covariate columns, D latent dimensions of the block, S sufficient statistics;
"..." is any leading shape.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .fastmath import clamp

PRIOR_MODES = ("mean", "variance", "both")
PRIOR_FAMILIES = ("gaussian", "nf")  # nf: NFinVAE's exponential-family prior for z_inv


class ConditionalPrior(nn.Module):
    """Diagonal Gaussian p(z | c) whose parameters are a small MLP of covariates c (B, C).

    mode 'mean': learned mean, unit variance; 'variance': zero mean, learned variance (the
    reference default); 'both': both learned. With no covariates (C = 0) it is N(0, I).
    """

    def __init__(self, n_covariates: int, n_latent: int, mode: str = "mean", n_hidden: int = 64):
        super().__init__()
        if mode not in PRIOR_MODES:
            raise ValueError(f"prior mode must be one of {PRIOR_MODES}, got {mode!r}")
        self.mode, self.n_latent, self.n_covariates = mode, n_latent, n_covariates
        self.net = None
        if n_covariates > 0 and n_latent > 0:
            n_out = 2 * n_latent if mode == "both" else n_latent
            self.net = nn.Sequential(nn.Linear(n_covariates, n_hidden), nn.ReLU(), nn.Linear(n_hidden, n_out))

    @property
    def unit_variance(self) -> bool:
        """Whether the variance is fixed at 1 (then the KL needs no division by it)."""
        return self.mode == "mean" or self.net is None

    def mean(self, c: torch.Tensor) -> torch.Tensor:
        """The prior mean alone, c (..., C) -> (..., D), for unit-variance priors (no ones tensor to build)."""
        if self.net is None:
            return c.new_zeros(c.shape[:-1] + (self.n_latent,))
        out = self.net(c)
        return out if self.mode == "mean" else out[..., : self.n_latent]

    def forward(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """c (..., C) -> mean (..., D), variance (..., D)."""
        if self.net is None:
            zeros = c.new_zeros(c.shape[:-1] + (self.n_latent,))
            return zeros, torch.ones_like(zeros)
        out = self.net(c)
        if self.mode == "mean":
            return out, torch.ones_like(out)
        if self.mode == "variance":
            return torch.zeros_like(out), torch.exp(clamp(out, -8.0, 8.0))
        mean, log_var = out.chunk(2, dim=-1)
        return mean, torch.exp(clamp(log_var, -8.0, 8.0))


class ExponentialFamilyPrior(nn.Module):
    """NFinVAE's non-factorised exponential-family prior for z_inv, unnormalised:

        log p~(z | c) = <z, l1(c)> - <z^2, softplus(l2(c))> + <t(z), l3(c)>       (B,)

    t (D -> S) is a small MLP of the whole z (tanh output, so the quadratic term dominates and the
    density stays normalisable) that lets dimensions interact; l = (l1, l2, l3) is an MLP of the
    covariates c (B, C) with the same first layer shape as :class:`ConditionalPrior` (a zero c,
    e.g. an unknown label, is the label-free prior). Its normaliser is intractable, so its
    parameters are fitted by score matching on posterior samples (:func:`score_matching_loss`),
    not through the ELBO.
    """

    def __init__(self, n_covariates: int, n_latent: int, n_stats: int = 16, n_hidden: int = 64):
        super().__init__()
        self.n_latent, self.n_stats, self.n_covariates = n_latent, n_stats, n_covariates
        n_out = 2 * n_latent + n_stats
        self.net = nn.Sequential(nn.Linear(max(n_covariates, 1), n_hidden), nn.ReLU(), nn.Linear(n_hidden, n_out))
        # softplus/tanh: smooth, so the score's derivative (the Hessian diagonal) is informative
        self.stats = nn.Sequential(nn.Linear(n_latent, n_hidden), nn.Softplus(), nn.Linear(n_hidden, n_stats), nn.Tanh())

    def natural_parameters(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """c (..., C) -> l1 (..., D), l2 = softplus + 1e-3 (..., D), l3 (..., S)."""
        if self.n_covariates == 0:
            c = c.new_zeros(c.shape[:-1] + (1,))
        lam = self.net(c)
        l1, l2, l3 = lam.split([self.n_latent, self.n_latent, self.n_stats], dim=-1)
        return l1, F.softplus(l2) + 1e-3, l3

    def forward(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """z (B, D), c (B, C) -> (B,); see :meth:`log_density`."""
        return self.log_density(z, c)

    def log_density(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Unnormalised log p~(z | c) per cell: z (B, D), c (B, C) -> (B,)."""
        l1, l2, l3 = self.natural_parameters(c)
        return (z * l1).sum(-1) - (z * z * l2).sum(-1) + (self.stats(z) * l3).sum(-1)


def score_matching_loss(log_density, z: torch.Tensor) -> torch.Tensor:
    """Hyvarinen score matching per cell (B,): sum_i [ d^2 log p / dz_i^2 + 1/2 (d log p / dz_i)^2 ].

    `log_density` maps z (B, D) to (B,), cells independent. The second-derivative term is the
    exact Hessian diagonal (one backward pass per latent dimension), not the row sums
    sum_j d^2 log p / dz_i dz_j that the reference NFinVAE code uses; the two differ whenever the
    density is non-factorised, which is the point of this prior.
    """
    z = z.detach().requires_grad_(True)
    with torch.enable_grad():
        score = torch.autograd.grad(log_density(z).sum(), z, create_graph=True)[0]  # (B, D)
        diag = [torch.autograd.grad(score[:, i].sum(), z, create_graph=True)[0][:, i] for i in range(z.shape[1])]
    return torch.stack(diag, dim=-1).sum(-1) + 0.5 * (score * score).sum(-1)
