"""Normalizing-flow attention over feature levels and the Transformer blocks of Eq. 8.

Parts of :class:`~dfqkit.mixers.attention_mixer.MultiLayerAttentionMixer`, usable alone:

* :class:`AffineCouplingFlow`: a RealNVP-style invertible map ``u = f(z)`` of ``D``-dim noise
  (``steps`` affine coupling layers, halves swapped between layers, ``tanh``-bounded log-scales),
  with an exact :meth:`~AffineCouplingFlow.inverse` and log-determinant.
* :class:`FlowLevelAttention`: one flow per level turns the same Gaussian ``z`` into a learned,
  level-specific noise ``u^j = f_j(z)``; per head, a softmax over the ``J`` levels of
  ``<W_q u^j, W_k m^j>`` weights the level tokens, so two samples of one class emphasise
  different levels (the paper's intra-class diversity). Tokens: ``t^j = J · α_j ⊙ m^j + u^j``.
* :class:`LevelTransformer`: ``B`` pre-norm Transformer encoder blocks over the ``J`` tokens,
  mean-pooled to the conditioning vector (Eq. 8).

Reference: "Enhancing Diversity for Data-free Quantization" (CVPR 2025), Eq. 6 and Eq. 8. The
flow family, per-level flows and the token formula are dfqkit's GUESS (docs/methods/diversity.md).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class _Coupling(nn.Module):
    """One affine coupling layer: the second half is scaled and shifted by a function of the
    first (``swap`` exchanges the halves' roles)."""

    def __init__(self, dim: int, hidden: int, swap: bool) -> None:
        super().__init__()
        self.d1 = dim // 2
        self.swap = swap
        keep, change = (dim - self.d1, self.d1) if swap else (self.d1, dim - self.d1)
        self.net = nn.Sequential(nn.Linear(keep, hidden), nn.Tanh(), nn.Linear(hidden, 2 * change))
        nn.init.zeros_(self.net[-1].weight)  # starts as the identity map
        nn.init.zeros_(self.net[-1].bias)

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = x[..., : self.d1], x[..., self.d1 :]
        return (b, a) if self.swap else (a, b)

    def _join(self, keep: torch.Tensor, change: torch.Tensor) -> torch.Tensor:
        return torch.cat((change, keep) if self.swap else (keep, change), dim=-1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keep, change = self._split(x)
        log_s, t = self.net(keep).chunk(2, dim=-1)
        log_s = torch.tanh(log_s)
        return self._join(keep, change * log_s.exp() + t), log_s.sum(-1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        keep, change = self._split(y)
        log_s, t = self.net(keep).chunk(2, dim=-1)
        return self._join(keep, (change - t) * torch.tanh(log_s).neg().exp())


class AffineCouplingFlow(nn.Module):
    """Invertible ``R^D → R^D`` map from ``steps`` affine coupling layers (RealNVP).

    Args:
        dim: ``D`` (>= 2).
        steps: coupling layers (>= 1).
        hidden: width of each coupling network.
    """

    def __init__(self, dim: int, steps: int = 2, hidden: int | None = None) -> None:
        super().__init__()
        if dim < 2:
            raise ValueError(f"AffineCouplingFlow needs dim >= 2, got {dim}")
        if steps < 1:
            raise ValueError(f"AffineCouplingFlow needs steps >= 1, got {steps}")
        hidden = hidden or dim
        self.layers = nn.ModuleList(_Coupling(dim, hidden, swap=i % 2 == 1) for i in range(steps))

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``z (..., D)`` → ``(u (..., D), log|det ∂u/∂z| (...))``."""
        logdet = z.new_zeros(z.shape[:-1])
        for layer in self.layers:
            z, ld = layer(z)
            logdet = logdet + ld
        return z, logdet

    def inverse(self, u: torch.Tensor) -> torch.Tensor:
        """The exact inverse of :meth:`forward`."""
        for layer in reversed(self.layers):
            u = layer.inverse(u)
        return u


class FlowLevelAttention(nn.Module):
    """Per-sample attention over ``J`` level tokens driven by flow-transformed noise (Eq. 6).

    Args:
        levels: ``J``.
        dim: token width ``D`` (divisible by ``heads``).
        heads: attention heads.
        flow_steps: coupling layers per level flow.
    """

    def __init__(self, levels: int, dim: int, heads: int, flow_steps: int) -> None:
        super().__init__()
        if heads < 1 or dim % heads:
            raise ValueError(f"flow attention: dim={dim} must be divisible by heads={heads} >= 1")
        self.levels, self.dim, self.heads = levels, dim, heads
        self.flows = nn.ModuleList(AffineCouplingFlow(dim, flow_steps) for _ in range(levels))
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)

    def forward(self, m: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``m (b, J, D)`` level tokens, ``z (b, D)`` noise → ``(t (b, J, D), α (b, H, J))``."""
        b, j, d = m.shape
        u = torch.stack([flow(z)[0] for flow in self.flows], dim=1)  # (b, J, D)
        h, dh = self.heads, d // self.heads
        q = self.q(u).view(b, j, h, dh)
        k = self.k(m).view(b, j, h, dh)
        alpha = ((q * k).sum(-1) / math.sqrt(dh)).softmax(dim=1).transpose(1, 2)  # (b, H, J)
        weights = alpha.transpose(1, 2).repeat_interleave(dh, dim=2) * j  # (b, J, D)
        return weights * m + u, alpha


class LevelTransformer(nn.Module):
    """``B`` pre-norm Transformer encoder blocks over the level tokens, mean-pooled (Eq. 8).

    Args:
        dim: token width ``D``.
        heads: attention heads (``dim`` divisible by it).
        blocks: ``B`` (>= 1).
        mlp_ratio: hidden width of each block's MLP as a multiple of ``D``.
    """

    def __init__(self, dim: int, heads: int, blocks: int, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        if heads < 1 or dim % heads:
            raise ValueError(f"transformer: dim={dim} must be divisible by heads={heads} >= 1")
        layer = nn.TransformerEncoderLayer(
            d_model=dim,
            nhead=heads,
            dim_feedforward=int(mlp_ratio * dim),
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=blocks, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(b, J, D)`` → ``(b, D)``."""
        return self.norm(self.encoder(tokens)).mean(1)
