"""Activation quantizer with a learned step size and QDrop (LSQ as Genie-M uses it)."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dfqkit.quant.act_base import ActQuantizer
from dfqkit.quant.search import search_symmetric, symmetric_bounds
from dfqkit.registry import register


@register("quantizers")
class LSQActQuantizer(ActQuantizer):
    """Symmetric per-tensor activation quantizer with a learned step size (LSQ) and QDrop.

    The grid is ``s · {c_min, ..., c_max}``: unsigned ``0 .. 2^k - 1`` for a tensor observed
    non-negative, signed ``-2^(k-1) .. 2^(k-1) - 1`` otherwise (Genie's ``ActivationQuantizer``).
    It is an Eq. 14 grid with ``lo = c_min s`` and ``hi = c_max s``, kept in the ``lo``/``hi``
    buffers, so export and every tool that reads ranges work unchanged.

    * ``"observe"`` mode: each batch's step size is the ``L_2.4``-best clip ratio of its max
      (``init="mse"``, Genie/BRECQ) or its max itself (``init="minmax"``); ``s`` is the mean over
      the batches observed (Genie fits the first batch only; the mean over the calibration
      pass uses all of it). The search's error is evaluated on at most ``search_elements``
      elements of a batch (an evenly strided subsample of a larger one; the candidates still
      come from the batch's extreme).
    * ``"frozen"`` mode: ``x_hat = s · clamp(round(x / s), c_min, c_max)`` with the rounding
      passed straight through, so ``s`` gets LSQ's gradient (the rounding error inside the grid,
      ``c_min``/``c_max`` outside) and ``x`` gets 1 inside, 0 outside.
    * ``learning = True`` (set by the reconstruction for the block it trains): QDrop, each
      element keeps its float value with probability ``drop_prob``.

    After ``s`` has been learned, :meth:`refresh_range_` writes ``lo``/``hi`` from it.

    References: LSQ (Esser et al., ICLR 2020), QDrop (Wei et al., ICLR 2022), Genie (Jeon et
    al., CVPR 2023).

    Args:
        bits: bit width ``k`` in 2..16.
        init: ``"mse"`` or ``"minmax"`` (see above).
        drop_prob: QDrop's probability of keeping an element unquantized while learning.
        lr: learning rate of ``s`` when it trains inside the student optimizer (QAT; ``None``:
            the student's); reconstruction uses its own.
        search_elements: cap on the elements the ``"mse"`` search evaluates per batch
            (``None``: all). The default, 2^20, searches every activation of the offline
            testbed whole and cuts a 224-px batch's search several-fold (docs/ptq.md,
            "Range search cost").
    """

    sync_reduce: ClassVar[str] = "mean"
    param_group: ClassVar[tuple[str, ...]] = ("lr", "weight_decay")

    signed: Tensor

    def __init__(
        self,
        *,
        bits: int,
        init: str = "mse",
        drop_prob: float = 0.5,
        lr: float | None = None,
        search_elements: int | None = 2**20,
    ) -> None:
        super().__init__(bits=bits, ste="identity")
        if search_elements is not None and (
            isinstance(search_elements, bool)
            or not isinstance(search_elements, int)
            or search_elements < 1
        ):
            raise ValueError(
                f"LSQActQuantizer.search_elements must be an integer >= 1 or None, "
                f"got {search_elements!r}"
            )
        self.search_elements = search_elements
        if init not in ("mse", "minmax"):
            raise ValueError(f"init must be 'mse' or 'minmax', got {init!r}")
        if isinstance(drop_prob, bool) or not isinstance(drop_prob, int | float):
            raise ValueError(f"drop_prob must be a number in [0, 1), got {drop_prob!r}")
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}")
        self.init = init
        self.drop_prob = float(drop_prob)
        self.lr = lr
        self.weight_decay = 0.0
        self.learning = False
        self.rng: torch.Generator | None = None  # QDrop's masks (set with ``learning``)
        self.scale = nn.Parameter(torch.ones(()))
        self.register_buffer("signed", torch.zeros((), dtype=torch.bool))

    def _observe(self, x: Tensor) -> None:
        x = x.float()
        self.signed |= x.amin() < 0
        if self.init == "mse":
            self._fold(
                search_symmetric(x, self.bits, self.signed, max_elements=self.search_elements)
            )
        else:
            super()._observe(x)

    def _update(self, batch_lo: Tensor, batch_hi: Tensor) -> None:
        """``init="minmax"``: the step size that just covers the batch's range."""
        top = torch.where(self.signed, 2.0 * torch.maximum(-batch_lo, batch_hi), batch_hi)
        self._fold((top.clamp_min(0.0) / (2**self.bits - 1)).clamp_min(1e-8))

    def _fold(self, step: Tensor) -> None:
        """The mean of the per-batch step sizes (``self._updates`` batches before this one)."""
        n = self._updates
        if n:
            self.scale.mul_(n / (n + 1)).add_(step, alpha=1.0 / (n + 1))
        else:
            self.scale.copy_(step)
        self.refresh_range_()

    @torch.no_grad()
    def refresh_range_(self) -> None:
        """Write ``lo``/``hi`` from the step size and sign (after ``s`` was learned)."""
        lo, hi = symmetric_bounds(self.scale.detach(), self.signed, self.bits)
        self.lo.copy_(lo)
        self.hi.copy_(hi)

    def export_grid(self) -> tuple[Tensor, Tensor]:
        """``(s, c_min)``: the learned step itself (``(hi − lo) / (2^k − 1)`` can differ from it
        by float rounding), so the ONNX export rounds exactly as the frozen forward."""
        c_min = self.signed.long() * -(2 ** (self.bits - 1))
        return self.scale.detach(), c_min

    def _quantize(self, x: Tensor) -> Tensor:
        x = x.float()
        c_min = self.signed.float() * -(2 ** (self.bits - 1))
        c_max = c_min + (2**self.bits - 1)
        t = torch.clamp(x / self.scale, c_min, c_max)
        out = (t + (t.round() - t).detach()) * self.scale
        if self.learning and self.drop_prob > 0:
            mask = torch.rand(out.shape, generator=self.rng, device=out.device)
            out = torch.where(mask < self.drop_prob, x, out)
        return out

    def sync_(self) -> None:
        """Average ``s`` over processes (and agree on the sign), then refresh the range."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        with torch.no_grad():
            signed = self.signed.to(torch.int32)
            dist.all_reduce(signed, op=dist.ReduceOp.MAX)
            self.signed.copy_(signed.bool())
            scale = self.scale.detach().clone()
            dist.all_reduce(scale, op=dist.ReduceOp.SUM)
            self.scale.copy_(scale / dist.get_world_size())
            self.refresh_range_()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, init={self.init!r}, drop_prob={self.drop_prob}"
