"""Cross-layer equalization (CLE): rescale channels between two layers so that the output
channel ranges of the first equal the input channel ranges of the second.

For a pair ``A → [BN] → act → B`` (:mod:`dfqkit.ptq.graph`), a positive factor ``s_i`` per
channel ``i`` between them leaves the function unchanged when channel ``i`` of ``A`` (after its
BN) is divided by ``s_i`` and input channel ``i`` of ``B`` is multiplied by ``s_i``: the
activation is positively homogeneous (``relu(x/s) = relu(x)/s``). With ``r1_i`` the range
``max|·|`` of ``A``'s output channel ``i`` and ``r2_i`` that of ``B``'s input channel ``i``,

    s_i = sqrt(r1_i · r2_i) / r2_i            so that  r1_i / s_i = r2_i · s_i = sqrt(r1_i · r2_i)

(Nagel et al., Eq. 10): both layers' channels get the geometric mean of their ranges. Passes
over all pairs repeat until no factor moves by more than ``tolerance`` (pairs sharing a layer,
as a depthwise convolution between two pointwise ones, need several passes).

**Batch norm.** ``r1`` is the range of ``A``'s weight *with the BN folded in*
(``max|W_i| · |γ_i| / sqrt(σ²_i + ε)``, as Nagel et al., AIMET and NNCF equalize), and the factor
is applied to the BN's affine parameters (``γ_i, β_i ← γ_i/s_i, β_i/s_i``), which scales the BN
output exactly: the conv weight, the BN's running statistics and the module structure stay as
they are (dfqkit's student keeps its BNs; the ONNX export folds them into the per-channel
weight grid exactly). Without a BN, ``A``'s weight row and bias are divided by ``s_i``.

**ReLU6** is not positively homogeneous. ``relu6="keep"`` (default) leaves it and skips the
pairs through it, logging why: replacing it changes the float function, and the student is
trained and judged against the unchanged teacher. ``relu6="relu"`` replaces every ``nn.ReLU6``
module by ``nn.ReLU`` first, as Nagel et al. do for MobileNetV2, and equalizes those pairs too.

Reference: Nagel et al., "Data-Free Quantization Through Weight Equalization and Bias
Correction", ICCV 2019 (Sec. 4.1); AIMET ``cross_layer_equalization``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

from dfqkit.errors import ConfigError
from dfqkit.ptq.graph import Pair, pairs, trace
from dfqkit.ptq.transforms import Transform, check_float
from dfqkit.registry import register

logger = logging.getLogger(__name__)

RELU6 = ("keep", "relu")


def output_ranges(layer: nn.Module, norm: nn.Module | None = None) -> Tensor:
    """``max|W|`` per output channel of ``layer`` (BN folded in when given), ``(c_out,)``."""
    w = layer.weight.detach().float()
    r = w.abs().reshape(w.shape[0], -1).amax(1)
    if norm is not None:
        r = r * norm.weight.detach().float().abs() / (norm.running_var.float() + norm.eps).sqrt()
    return r


def input_ranges(layer: nn.Module) -> Tensor:
    """``max|W|`` per input channel of ``layer`` (a grouped conv's channel ``i`` is column
    ``i mod c_in/g`` of its group's rows), ``(c_in,)``."""
    w = layer.weight.detach().float()
    if isinstance(layer, nn.Linear):
        return w.abs().amax(0)
    g = layer.groups
    # (c_out, c_in/g, kh, kw) -> (g, c_out/g, c_in/g, kh·kw)
    w = w.reshape(g, w.shape[0] // g, w.shape[1], -1)
    return w.abs().amax(dim=(1, 3)).reshape(-1)


@torch.no_grad()
def _scale_input(layer: nn.Module, s: Tensor) -> None:
    w = layer.weight
    if isinstance(layer, nn.Linear):
        w.mul_(s.to(w.dtype)[None, :])
        return
    g = layer.groups
    view = w.view(g, w.shape[0] // g, w.shape[1], -1)
    view.mul_(s.to(w.dtype).view(g, 1, w.shape[1], 1))


@torch.no_grad()
def _scale_output(layer: nn.Module, norm: nn.Module | None, s: Tensor) -> None:
    if norm is not None:
        norm.weight.div_(s.to(norm.weight.dtype))
        norm.bias.div_(s.to(norm.bias.dtype))
        return
    w = layer.weight
    w.div_(s.to(w.dtype).view(-1, *([1] * (w.dim() - 1))))
    if layer.bias is not None:
        layer.bias.div_(s.to(layer.bias.dtype))


def equalize_pair(model: nn.Module, pair: Pair) -> Tensor:
    """One equalization step of ``pair`` in place; returns the factors ``s`` ``(c,)``."""
    first, second = model.get_submodule(pair.first), model.get_submodule(pair.second)
    norm = model.get_submodule(pair.norm) if pair.norm else None
    r1, r2 = output_ranges(first, norm), input_ranges(second)
    ok = (r1 > 0) & (r2 > 0)  # a dead channel keeps factor 1
    s = torch.where(ok, (r1 * r2).sqrt() / r2.clamp_min(1e-30), torch.ones_like(r1))
    _scale_output(first, norm, s)
    _scale_input(second, s)
    return s


def replace_relu6(model: nn.Module) -> int:
    """Every ``nn.ReLU6`` module of ``model`` becomes an ``nn.ReLU``; returns how many."""
    names = [n for n, m in model.named_modules(remove_duplicate=False) if type(m) is nn.ReLU6]
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, nn.ReLU())
    return len(names)


@register("ptq")
class CrossLayerEqualization(Transform):
    """Cross-layer weight equalization of the float model before it is quantized (Nagel et al.).

    Bound in ``train.transforms`` (the student and the naive reference are equalized alike);
    callable on its own as ``CrossLayerEqualization()(model)``, which changes ``model`` in
    place and returns the pairs equalized.

    Args:
        relu6: ``"keep"`` (default: pairs through a ReLU6 are skipped, the float function is
            unchanged) or ``"relu"`` (every ``nn.ReLU6`` becomes ``nn.ReLU`` first, as in the
            paper; the float function changes where an activation exceeded 6).
        iterations: at most this many passes over all pairs.
        tolerance: stop when every factor of a pass is within ``1 ± tolerance``.
    """

    stage = "float"

    def __init__(
        self, *, relu6: str = "keep", iterations: int = 100, tolerance: float = 1e-6
    ) -> None:
        if relu6 not in RELU6:
            raise ConfigError(f"CrossLayerEqualization.relu6 must be one of {RELU6}, got {relu6!r}")
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ConfigError(
                f"CrossLayerEqualization.iterations must be an integer >= 1, got {iterations!r}"
            )
        if isinstance(tolerance, bool) or not isinstance(tolerance, int | float) or tolerance <= 0:
            raise ConfigError(
                f"CrossLayerEqualization.tolerance must be a number > 0, got {tolerance!r}"
            )
        self.relu6, self.iterations, self.tolerance = relu6, iterations, float(tolerance)

    def __call__(self, model: nn.Module, example: Any = None) -> list[Pair]:
        """Equalize ``model`` in place; returns the pairs equalized (``example`` is unused)."""
        return self.before(model, example)

    def before(self, model: nn.Module, example: Any = None) -> list[Pair]:
        check_float(self, model)
        replaced = replace_relu6(model) if self.relu6 == "relu" else 0
        found, skipped = pairs(trace(model, f"train.transforms: {self!r}"))
        for reason in skipped:
            logger.info(f"CrossLayerEqualization skips {reason}")
        if not found:
            why = f"; skipped: {skipped[0]}" if skipped else ""
            raise ConfigError(
                f"train.transforms: {self!r} found no conv→conv or linear→linear chain to "
                f"equalize in {type(model).__name__}{why}"
            )
        passes = 0
        while passes < self.iterations:
            passes += 1
            moved = max(float((equalize_pair(model, p) - 1).abs().max()) for p in found)
            if moved <= self.tolerance:
                break
        logger.info(
            f"CrossLayerEqualization: {len(found)} pairs equalized in {passes} passes"
            + (f", {replaced} ReLU6 replaced by ReLU" if replaced else "")
        )
        return found

    def __repr__(self) -> str:
        return f"CrossLayerEqualization(relu6={self.relu6!r})"
