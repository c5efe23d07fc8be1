"""The label predictor on z_inv and its training objective: environment-balanced ERM plus the
IRMv1 penalty.

Shapes: B cells, D_inv invariant latent dimensions, K labels, E environments (batches).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Dropout


class InvariantClassifier(nn.Module):
    """Predicts labels from z_inv (B, D_inv) -> logits (B, K). Linear when n_hidden == 0."""

    def __init__(self, n_latent_inv: int, n_labels: int, n_hidden: int = 64, dropout: float = 0.1):
        super().__init__()
        if n_hidden > 0:
            self.net = nn.Sequential(nn.Linear(n_latent_inv, n_hidden), nn.ReLU(), Dropout(dropout), nn.Linear(n_hidden, n_labels))
        else:
            self.net = nn.Linear(n_latent_inv, n_labels)

    def forward(self, z_inv: torch.Tensor) -> torch.Tensor:
        return self.net(z_inv)


def environment_risks(logits: torch.Tensor, labels: torch.Tensor, envs: torch.Tensor, n_envs: int, scale: torch.Tensor | None = None):
    """Per-environment mean cross-entropy (E,) and a mask (E,) of environments present.

    logits (B, K), labels (B,), envs (B,) in [0, E), E = n_envs. `scale` (E,) multiplies the
    logits of each environment (the IRMv1 dummy classifier).
    """
    if scale is not None:
        logits = logits * scale[envs][:, None]
    ce = F.cross_entropy(logits, labels, reduction="none")
    sums = torch.zeros(n_envs, device=logits.device, dtype=ce.dtype).index_add(0, envs, ce)
    counts = torch.zeros(n_envs, device=logits.device, dtype=ce.dtype).index_add(0, envs, torch.ones_like(ce))
    present = counts > 0
    return sums / counts.clamp_min(1.0), present


def invariant_risk(logits, labels, envs, n_envs: int, irm_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Environment-balanced ERM plus the IRMv1 penalty (Arjovsky et al. 2019), vectorised.

    logits (B, K), labels (B,), envs (B,) in [0, n_envs). Returns (objective, penalty), both
    scalars. ERM averages each environment's risk with equal weight, so a large batch does not
    dominate. The penalty is the mean over environments of the squared gradient of the
    environment risk with respect to a scalar multiplier of the logits at 1.
    """
    scale = torch.ones(n_envs, device=logits.device, requires_grad=True)
    risks, present = environment_risks(logits, labels, envs, n_envs, scale)
    erm = risks[present].mean()
    if irm_weight <= 0:
        return erm, torch.zeros((), device=logits.device)
    (grad,) = torch.autograd.grad(risks[present].sum(), scale, create_graph=True)
    penalty = (grad[present] ** 2).mean()
    return erm + irm_weight * penalty, penalty
