"""Layers and the two networks of inVAE: the encoder q(z | x, e) and the count decoder p(x | z).

Shapes: B cells, G genes, C covariate columns, H hidden units, D latent dimensions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .fastmath import plain_math
from .gaussian import posterior_variance


class WideLinear(nn.Linear):
    """A linear layer across all genes, (B, G) -> (B, H) or (B, H) -> (B, G): the encoder's input
    layer and the decoder's output layer, which hold ~95 % of the FLOPs. With `compute_dtype` set
    (bf16, see :meth:`InVAEModule.wide_layers_in`), only their matmuls run in it; parameters,
    gradients and every other layer stay fp32. Autocast would also cast around the small layers,
    which on CPU costs more than bf16 saves there."""

    compute_dtype: torch.dtype | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = self.compute_dtype
        if dt is None:
            return super().forward(x.to(self.weight.dtype))  # the loader may hand over bf16 inputs
        return F.linear(x.to(dt), self.weight.to(dt), None if self.bias is None else self.bias.to(dt))


class Dropout(nn.Module):
    """Inverted dropout, h (any shape) -> h masked and scaled, whose mask comes from 16 random bits
    per unit, drawn 64 at a time.

    Same semantics as nn.Dropout (p quantised to 1/65536), but cheaper than torch's CPU
    `bernoulli_`, which draws one random number per element. The bits come from torch's generator,
    so `seed` still makes runs reproducible; plain math draws the same bits (see :meth:`mask`).
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.threshold = round(p * 65536) - 32768  # keep where the int16 draw >= threshold

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p <= 0:
            return h
        n = h.numel()
        bits = torch.empty(n // 4 + 1, dtype=torch.int64, device=h.device).random_(-(2**63), None)
        mask = self.mask(bits.view(torch.int16)[:n].view(h.shape))
        return h * (mask if h.dtype == mask.dtype else mask.to(h.dtype))

    def mask(self, draws: torch.Tensor) -> torch.Tensor:
        """int16 draws (any shape) -> fp32 1 / (1 - p) where draw >= threshold, else 0. By
        arithmetic, because comparisons and bool tensors take slower CPU kernels than float ones;
        the draws are integers, exact in fp32. Plain math: the comparison (the same mask)."""
        if plain_math():
            return (draws >= self.threshold).to(torch.float32) * (1.0 / (1.0 - self.p))
        return draws.to(torch.float32).sub_(self.threshold - 1).clamp_(0.0, 1.0).mul_(1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


class HiddenStack(nn.Sequential):
    """(Linear -> [BatchNorm] -> ReLU -> [Dropout]) x n_layers, built by :func:`mlp`: (B, n_in) -> (B, H).

    A Linear followed by batch norm has no bias: the norm subtracts the batch mean, so a bias
    would get a zero gradient in training and only shift the running mean. Dropping it saves an
    op and an autograd node per layer. Models saved with those biases load exactly: each bias is
    folded into the running mean it shifted.
    """

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for i in range(len(self) - 1):
            linear, norm = self[i], self[i + 1]
            key = f"{prefix}{i}.bias"
            if isinstance(linear, nn.Linear) and linear.bias is None and isinstance(norm, nn.BatchNorm1d) and key in state_dict:
                bias = state_dict.pop(key)
                mean_key = f"{prefix}{i + 1}.running_mean"
                if mean_key in state_dict:
                    state_dict[mean_key] = state_dict[mean_key] - bias
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def mlp(n_in: int, n_hidden: int, n_layers: int, dropout: float, batch_norm: bool, wide_input: bool = False) -> HiddenStack:
    """Hidden stack (B, n_in) -> (B, n_hidden): (Linear -> [BatchNorm] -> ReLU -> [Dropout]) x
    n_layers, no output layer. wide_input: the first Linear is a :class:`WideLinear`."""
    layers: list[nn.Module] = []
    for i in range(n_layers):
        linear = WideLinear if (i == 0 and wide_input) else nn.Linear
        layers.append(linear(n_in if i == 0 else n_hidden, n_hidden, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm1d(n_hidden, momentum=0.01, eps=1e-3))
        layers.append(nn.ReLU())
        if dropout > 0:
            layers.append(Dropout(dropout))
    return HiddenStack(*layers)


class GaussianEncoder(nn.Module):
    """q(z | x, e): log1p counts (B, G) and technical covariates e (B, C) -> mean, variance (B, D).

    The covariates enter through their own bias-free linear map added to the first layer, so that
    new batches can be added as new columns (query mapping) and an all-zero e means "batch
    unknown" (trained by covariate dropout). Labels are never an input.
    """

    def __init__(self, n_genes: int, n_covariates: int, n_latent: int, n_hidden: int, n_layers: int, dropout: float, batch_norm: bool):
        super().__init__()
        self.body = mlp(n_genes, n_hidden, n_layers, dropout, batch_norm, wide_input=True)
        self.covariates = nn.Linear(n_covariates, n_hidden, bias=False) if n_covariates > 0 else None
        self.n_latent = n_latent
        self.heads = nn.Linear(n_hidden, 2 * n_latent)  # [mean | log variance]: one matmul, not two

    def forward(self, x_log: torch.Tensor, e: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x_log (B, G), e (B, C) or None -> posterior mean (B, D), variance (B, D)."""
        mean, log_var = self.raw(x_log, e).split(self.n_latent, dim=-1)
        return mean, posterior_variance(log_var)

    def raw(self, x_log: torch.Tensor, e: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 2 D): [mean | unclamped log variance], before the posterior transform of forward."""
        h = self.body[0](x_log).to(self.heads.weight.dtype)  # back from the wide layer's bf16, if any
        if self.covariates is not None and e is not None:
            h = h + self.covariates(e)
        return self.heads(self.body[1:](h))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # models saved before the heads were fused had separate `mean` and `log_var` layers
        for kind in ("weight", "bias"):
            old = [f"{prefix}mean.{kind}", f"{prefix}log_var.{kind}"]
            if all(k in state_dict for k in old):
                state_dict[f"{prefix}heads.{kind}"] = torch.cat([state_dict.pop(k) for k in old])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class CountDecoder(nn.Module):
    """p(x | z): z (B, D) -> logits (B, G) of the expected expression fraction per gene (softmax)."""

    def __init__(self, n_latent: int, n_genes: int, n_hidden: int, n_layers: int, dropout: float, batch_norm: bool):
        super().__init__()
        self.body = mlp(n_latent, n_hidden, n_layers, dropout, batch_norm)
        self.out = WideLinear(n_hidden, n_genes)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Logits (B, G), in the wide layers' compute dtype; the likelihood applies the softmax in fp32."""
        return self.out(self.body(z))
