"""SQuant: data-free rounding of the weights (Guo et al., ICLR 2022).

Round-to-nearest rounds every weight on its own. For a layer whose inputs are positively
correlated (neighbouring pixels of one channel; the channels of one position), the output error
``Σ_i ε_i x_i`` is dominated by the *sum* of the rounding errors ``ε_i = q_i − w_i / s`` over the
weights that see correlated inputs, which round-to-nearest leaves to chance (for 9 weights of a
3 × 3 kernel, ``|Σ ε|`` is about 0.9 of a step on average). SQuant approximates the Hessian of
the layer's loss by its diagonal plus constant blocks per kernel and per output channel, which
turns the problem into keeping those sums small ("CASE", constrained absolute sum of error):

1. **Kernel level** (K; kernels with more than one weight): for each ``(output, input)`` kernel
   with error sum ``E``, flip ``round(|E|)`` of its weights to the other neighbouring grid point,
   in the direction that reduces ``|E|``, choosing those whose error is largest in that
   direction (each flip costs the least there). Afterwards ``|E| ≤ 0.5``.
2. **Channel level** (C): for each output channel with error sum ``E_c``, flip ``round(|E_c|)``
   more weights the same way. The candidates are, per kernel, either the last weight flipped at
   the kernel level (to undo it, when the kernel was over-corrected) or the next one in line
   (when under-corrected), so that every kernel's ``|E|`` stays at most 1; for kernels of one
   weight (1 × 1 convolutions, linear layers) every weight is a candidate. Afterwards
   ``|E_c| ≤ 0.5``.

Every weight ends on one of the two grid points around it, nothing is clipped that was not, and
the per-channel range of the weight is unchanged (a weight is only flipped to a grid point
inside it), so the layer's own quantizer reproduces the chosen codes at every forward. The
transform writes the flipped weights as their grid values; the others stay as they were.

It needs no data and runs in milliseconds. It changes the rounding only: combine it with
``@ptq.BiasCorrection()`` *after* it in ``train.transforms`` (the correction then removes the
mean shift of the final rounding, measured against the float weights).

Reference: Guo et al., "SQuant: On-the-Fly Data-Free Quantization via Diagonal Hessian
Approximation", ICLR 2022 (Sec. 3-4, Algorithm 1). dfqkit's version is vectorized over kernels
and channels (one sort per level), and is applied to per-channel asymmetric (min/max) or
symmetric grids; the paper's uses a symmetric per-channel grid. docs/ptq.md.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from dfqkit.errors import ConfigError
from dfqkit.ptq.transforms import Transform
from dfqkit.quant.functional import qrange
from dfqkit.quant.modules import QuantConv2d, QuantLinear
from dfqkit.quant.weight_minmax import MinMaxWeightQuantizer
from dfqkit.quant.weight_symmetric import SymmetricWeightQuantizer
from dfqkit.registry import register

logger = logging.getLogger(__name__)


def _ranks(priority: Tensor) -> Tensor:
    """Rank of each element along the last dim when sorted by descending ``priority`` (stable:
    ties keep their order)."""
    order = torch.sort(priority, dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return ranks


def _flip_count(total: Tensor, candidates: Tensor) -> Tensor:
    """``round(|total|)`` flips (half to even, as ``torch.round``), at most the candidates."""
    return torch.minimum(total.abs().round(), candidates.sum(-1).to(total.dtype))


def squant_round(
    r: Tensor,
    low: Tensor,
    high: Tensor,
    movable: Tensor | None = None,
    *,
    nearest: Tensor | None = None,
    kernel: bool = True,
    channel: bool = True,
) -> Tensor:
    """SQuant's rounding of continuous codes.

    Args:
        r: ``(c_out, kernels, n)`` continuous codes ``w / s − z`` inside the grid (a kernel is
            the ``n`` weights of one ``(output, input)`` pair), float64 recommended.
        low, high: ``(c_out, 1, 1)`` the lowest and highest code a weight may be flipped to.
        movable: bool, shape of ``r``: the weights that may be flipped (default: all).
        nearest: the round-to-nearest codes to start from (default ``r.round()``; a quantizer's
            own float32 rounding may differ from it for codes a hair from a half).
        kernel, channel: run the kernel (K) and channel (C) levels.

    Returns:
        Integer-valued codes, shape of ``r``: each ``round(r)`` or the other of ``floor(r)``
        and ``ceil(r)``.
    """
    q = r.round() if nearest is None else nearest.to(r.dtype)
    e = q - r
    up = (e < 0) & (q + 1 <= high)  # rounded down, may go up
    down = (e > 0) & (q - 1 >= low)  # rounded up, may go down
    if movable is not None:
        up, down = up & movable, down & movable
    c_dir = None
    if kernel and r.shape[-1] > 1:
        total = e.sum(-1)
        d = torch.where(total < 0, 1.0, -1.0).to(r.dtype)  # flip up when the sum is negative
        cand = torch.where(d[..., None] > 0, up, down)
        prio = torch.where(cand, e.abs(), -1.0)
        rank = _ranks(prio)
        t = _flip_count(total, cand)
        flip = cand & (rank < t[..., None])
        q = q + d[..., None] * flip
        e = e + d[..., None] * flip
        # one channel-level candidate per kernel: undo the last flip (over-corrected, t ≥ |E|)
        # or make the next one (under-corrected); its priority is its error after this level
        over = (t >= total.abs()) & (t > 0)
        pick = torch.where(over, t - 1, t)[..., None]
        chosen = (rank == pick) & torch.where(over[..., None], flip, cand & ~flip)
        c_dir = torch.where(over, -d, d)[..., None] * chosen
    if channel:
        shape = q.shape
        q, e = q.flatten(1), e.flatten(1)
        total = e.sum(-1)
        dc = torch.where(total < 0, 1.0, -1.0).to(r.dtype)[:, None]
        if c_dir is None:
            cand = torch.where(dc > 0, up.flatten(1), down.flatten(1))
        else:
            cand = c_dir.flatten(1) == dc
        prio = torch.where(cand, e.abs(), -1.0)
        flip = cand & (_ranks(prio) < _flip_count(total, cand)[:, None])
        q = (q + dc * flip).view(shape)
    return q


def _codes(layer: nn.Module) -> tuple[Tensor, Tensor, Tensor, int]:
    """``(q, scale, zero_point, bits)`` of a layer's weight as its quantizer rounds it now,
    with ``w ≈ s · (q + z)``."""
    wq = layer.weight_quant
    w = layer.weight.detach()
    if isinstance(wq, MinMaxWeightQuantizer):
        q, s, z = wq.codes(w)
        return q, s, z, wq.bits
    if isinstance(wq, SymmetricWeightQuantizer):
        q, s = wq.codes(w)
        return q, s, torch.zeros_like(s), wq.bits
    raise ConfigError(
        f"train.transforms: SQuant() rounds weights on a min/max or symmetric grid "
        f"(quantizers.MinMaxWeightQuantizer, quantizers.SymmetricWeightQuantizer), but "
        f"{type(wq).__name__} quantizes this layer's weight; a quantizer that learns its own "
        f"rounding (AdaRound) or range does not combine with it"
    )


@torch.no_grad()
def squant_layer(layer: nn.Module, *, kernel: bool = True, channel: bool = True) -> int:
    """Re-round a quantized conv/linear layer's weight in place; returns the number of weights
    whose code changed. The layer's quantizer then reproduces the new codes (checked)."""
    w = layer.weight
    q0, s, z, bits = _codes(layer)  # the quantizer's own (float32) rounding
    qmin, qmax = qrange(bits)
    w64 = w.detach().double()
    n = w.shape[2] * w.shape[3] if w.dim() == 4 else 1
    r3 = (w64 / s.double() - z.double()).clamp(qmin, qmax).reshape(w.shape[0], -1, n)
    # the channel's extreme weights stay, and the others may only move to codes inside the
    # channel's range, so that the range (and with it the grid) of a quantizer that follows the
    # weight stays as it is
    flat = w64.reshape(w.shape[0], -1)
    wmin, wmax = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    movable = ((flat != wmin) & (flat != wmax)).view(r3.shape)
    low = r3.flatten(1).amin(1).ceil().view(-1, 1, 1)
    high = r3.flatten(1).amax(1).floor().view(-1, 1, 1)
    q0 = q0.double().reshape(r3.shape)
    q = squant_round(r3, low, high, movable, nearest=q0, kernel=kernel, channel=channel)
    changed = q != q0
    value = (q + z.double().view(-1, 1, 1)) * s.double().view(-1, 1, 1)
    new = torch.where(changed, value, w64.reshape(r3.shape)).reshape(w.shape)
    w.copy_(new.to(w.dtype))
    got = _codes(layer)[0].double().reshape(q.shape)
    if not torch.equal(got, q.to(got.dtype)):
        raise RuntimeError(
            f"SQuant: the weight quantizer of a {type(layer).__name__} does not reproduce the "
            f"chosen codes ({int((got != q).sum())} differ); the grid moved"
        )
    return int(changed.sum())


@register("ptq")
class SQuant(Transform):
    """SQuant's data-free rounding (Guo et al., ICLR 2022) of every quantized conv and linear
    weight. Bound in ``train.transforms`` before ``@ptq.BiasCorrection()``.

    Args:
        kernel: run the kernel level (SQuant-K).
        channel: run the channel level (SQuant-C).
    """

    stage = "rounding"

    def __init__(self, *, kernel: bool = True, channel: bool = True) -> None:
        if not isinstance(kernel, bool) or not isinstance(channel, bool):
            raise ConfigError(
                f"ptq.SQuant: kernel and channel must be True or False, got {kernel!r}, {channel!r}"
            )
        if not (kernel or channel):
            raise ConfigError("ptq.SQuant: kernel = channel = False would change nothing")
        self.kernel, self.channel = kernel, channel

    def after(self, student: nn.Module, state: None) -> None:
        layers = [m for m in student.modules() if isinstance(m, QuantConv2d | QuantLinear)]
        if not layers:
            raise ConfigError(f"train.transforms: {self!r} found no quantized conv or linear layer")
        changed = total = 0
        for layer in layers:
            changed += squant_layer(layer, kernel=self.kernel, channel=self.channel)
            total += layer.weight.numel()
        logger.info(
            f"SQuant: {len(layers)} layers, {changed} of {total} weights rounded the other way"
        )

    def __repr__(self) -> str:
        if self.kernel and self.channel:
            return "SQuant()"
        return f"SQuant(kernel={self.kernel}, channel={self.channel})"
