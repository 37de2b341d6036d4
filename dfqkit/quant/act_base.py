"""Base class of per-tensor activation quantizers: observe a range, then freeze it."""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dfqkit.quant.codes import eq14_grid
from dfqkit.quant.functional import _ONNX_EXPORT, check_bits, check_ste, fake_quant
from dfqkit.quant.onnx_qdq import act_qdq

ACT_MODES: tuple[str, ...] = ("observe", "frozen")


def check_mode(mode: object) -> None:
    """Raise ``ValueError`` unless ``mode`` is an activation-quantizer mode."""
    if mode not in ACT_MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, ACT_MODES))}, got {mode!r}")


class ActQuantizer(nn.Module, abc.ABC):
    """Per-tensor asymmetric activation fake quantizer with an observed range.

    State lives in buffers, so a ``state_dict`` holds everything: ``lo`` and ``hi`` (fp32
    scalars) and ``num_updates`` (int64 scalar, batches observed). ``mode`` is a plain attribute,
    set by the trainer for each phase (:func:`dfqkit.quant.set_quant_mode`), not saved:

    * ``"observe"``: each forward updates the range from the batch (under ``no_grad``), then
      fake-quantizes the batch with the updated range, as GDFQ does. This happens in ``eval()``
      too: the mode, not ``self.training``, gates the update.
    * ``"frozen"``: only fake-quantizes. A quantizer frozen before it observed anything raises
      instead of collapsing activations to a zero range.

    The frozen check reads a Python mirror of ``num_updates`` (kept in step by ``forward`` and
    refreshed by ``load_state_dict``), never the buffer, so forwards cost no host-device sync.
    Subclasses implement :meth:`_update` (and may override :meth:`_observe`) and set
    ``sync_reduce``. A quantizer with a learnable
    range overrides :meth:`_quantize` (and adds a mode for it).

    Args:
        bits: Bit width ``k`` in 2..16.
        ste: Straight-through estimator, ``"identity"`` (GDFQ) or ``"clipped"``.
    """

    #: How :meth:`sync_` merges ranks: ``"minmax"`` (global min/max) or ``"mean"`` (averages).
    sync_reduce: ClassVar[str] = "mean"

    lo: Tensor
    hi: Tensor
    num_updates: Tensor

    def __init__(self, *, bits: int, ste: str = "identity") -> None:
        super().__init__()
        check_bits(bits)
        check_ste(ste)
        self.bits = bits
        self.ste = ste
        self.mode = "observe"
        self.register_buffer("lo", torch.zeros(()))
        self.register_buffer("hi", torch.zeros(()))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self._updates = 0  # Python mirror of num_updates: read in the hot path without a sync

    @abc.abstractmethod
    def _update(self, batch_lo: Tensor, batch_hi: Tensor) -> None:
        """Fold one batch's range into ``lo``/``hi`` in place.

        Args:
            batch_lo: fp32 scalar, the batch minimum.
            batch_hi: fp32 scalar, the batch maximum.

        ``self._updates`` is the number of batches observed before this one.
        """

    def _observe(self, x: Tensor) -> None:
        """Fold one batch into the state (under ``no_grad``): its min/max through
        :meth:`_update`. A quantizer that needs more of the batch than its range overrides this."""
        batch_lo, batch_hi = torch.aminmax(x)
        self._update(batch_lo.float(), batch_hi.float())

    def _quantize(self, x: Tensor) -> Tensor:
        return fake_quant(x, self.lo, self.hi, self.bits, self.ste)

    def export_grid(self) -> tuple[Tensor, Tensor]:
        """``(s, n_lo)``: the frozen forward rounds onto ``s · [n_lo, n_lo + 2^k − 1]``.

        Eq. 14 on ``[lo, hi]`` here; a quantizer with another grid overrides it. The ONNX
        export stores this grid (:mod:`dfqkit.quant.onnx_qdq`).
        """
        return eq14_grid(self.lo, self.hi, self.bits)

    def forward(self, x: Tensor) -> Tensor:
        """Observe (in ``"observe"`` mode) and fake-quantize an activation.

        Args:
            x: Activation, any shape, e.g. ``(b, c, h, w)``.

        Returns:
            fp32 fake-quantized activation, shape of ``x``.
        """
        if self.mode == "observe":
            with torch.no_grad():
                self._observe(x.detach())
                self.num_updates.add_(1)
            self._updates += 1
        elif self.mode != "frozen":
            check_mode(self.mode)
        elif self._updates == 0:
            raise RuntimeError(
                f"{type(self).__name__} is frozen but never observed a batch, so its range is "
                "empty; run forwards in 'observe' mode first (set_quant_mode(model, 'observe')) "
                "or load a checkpoint that holds observed ranges"
            )
        if _ONNX_EXPORT[0]:  # traced for ONNX: QuantizeLinear → DequantizeLinear on the grid
            return act_qdq(x, *self.export_grid(), self.bits, what=type(self).__name__)
        return self._quantize(x)

    def sync_(self) -> None:
        """All-reduce the range across processes so every rank holds the same quantizer.

        ``sync_reduce == "minmax"``: global min of ``lo`` and max of ``hi``; ``"mean"``: the
        average over ranks (sum / world size). No-op without an initialized process group.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return
        with torch.no_grad():
            if self.sync_reduce == "minmax":
                both = torch.stack([self.lo.neg(), self.hi])  # one MAX reduce for both ends
                dist.all_reduce(both, op=dist.ReduceOp.MAX)
                self.lo.copy_(both[0].neg())
            else:
                both = torch.stack([self.lo, self.hi])
                dist.all_reduce(both, op=dist.ReduceOp.SUM)  # gloo has no AVG
                both.div_(dist.get_world_size())
                self.lo.copy_(both[0])
            self.hi.copy_(both[1])

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        loaded = state_dict.get(prefix + "num_updates")
        if isinstance(loaded, Tensor) and not loaded.is_meta:
            self._updates = int(loaded.item())  # once per load, not in the hot path

    def extra_repr(self) -> str:
        rng = "meta" if self.lo.is_meta else f"[{self.lo.item():.4g}, {self.hi.item():.4g}]"
        return f"bits={self.bits}, mode={self.mode!r}, range={rng}, ste={self.ste!r}"
