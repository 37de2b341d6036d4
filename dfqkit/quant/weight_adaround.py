"""Weight quantizer with learned rounding and learned step size (AdaRound, Genie-M)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dfqkit.quant.functional import check_bits, qrange
from dfqkit.quant.search import search_asymmetric
from dfqkit.registry import register

#: AdaRound's rectified sigmoid stretch: ``h(v) = clamp(sigmoid(v) (ZETA - GAMMA) + GAMMA, 0, 1)``
GAMMA, ZETA = -0.1, 1.1


def rectified_sigmoid(v: Tensor) -> Tensor:
    """AdaRound's ``h(v)``: a sigmoid stretched to ``(-0.1, 1.1)`` and clipped to ``[0, 1]``."""
    return torch.sigmoid(v).mul(ZETA - GAMMA).add(GAMMA).clamp(0.0, 1.0)


def rectified_sigmoid_inverse(h: Tensor) -> Tensor:
    """``v`` with ``h(v) = h`` for ``h`` in ``[0, 1)`` (the initial logits)."""
    return -torch.log((ZETA - GAMMA) / (h - GAMMA) - 1.0)


@register("quantizers")
class AdaRoundWeightQuantizer(nn.Module):
    """Per-channel asymmetric weight quantizer whose rounding and step size are learned.

    On the Eq. 14 grid of :mod:`dfqkit.quant.functional`, per output channel: the initial range
    ``[lo, hi]`` is the ``L_2.4``-best clip of the weight's min/max (:func:`search_asymmetric`,
    Genie's init), giving the initial scale ``s0`` and the integer zero point ``z``. Then

        q = clamp(floor(w / s0 - z) + r, -2^(k-1), 2^(k-1) - 1),   w_hat = s · (q + z)

    with ``s`` a learned step size (initialised to ``s0``) and ``r`` the rounding: during
    reconstruction (``soft = True``) ``r = h(v)`` (AdaRound's rectified sigmoid of the learned
    logits ``v``), otherwise ``r = [v >= 0]``. ``v`` starts at ``h^-1(frac(w / s0))``, so before
    any learning the hard rounding is round-to-nearest. Keeping the integer part from ``s0``
    while ``s`` moves is Genie's choice: the step size rescales a fixed code pattern.

    The weight must not change after the quantizer is bound to it (PTQ): its floor is read
    from the current weight at every forward, but ``v`` and ``s0`` were fitted to the original
    one. :meth:`bind_weight` is called by ``QuantConv2d.from_float`` / ``QuantLinear.from_float``.

    References: AdaRound (Nagel et al., ICML 2020); Genie (Jeon et al., CVPR 2023), whose
    weight quantizer also learns the step size; BRECQ/QDrop for the ``L_2.4`` init.

    Args:
        bits: bit width ``k`` in 2..16.
        init: ``"mse"`` (Genie: the ``L_2.4``-best clip ratio per channel) or ``"minmax"``.
        lr: learning rate of ``s`` when this quantizer trains inside the student optimizer
            (QAT; ``None``: the student's); reconstruction uses its own learning rates.
    """

    #: parameter-group overrides the trainer applies to this module's own parameters
    param_group = ("lr", "weight_decay")

    def __init__(self, *, bits: int, init: str = "mse", lr: float | None = None) -> None:
        super().__init__()
        check_bits(bits)
        if init not in ("mse", "minmax"):
            raise ValueError(f"init must be 'mse' or 'minmax', got {init!r}")
        self.bits = bits
        self.init = init
        self.lr = lr
        self.weight_decay = 0.0
        self.soft = False  # set by the reconstruction while it learns this layer
        self.scale = nn.Parameter(torch.empty(0))
        self.logits = nn.Parameter(torch.empty(0))
        self.register_buffer("floor_scale", torch.empty(0))
        self.register_buffer("zero_point", torch.empty(0))

    @property
    def bound(self) -> bool:
        return self.logits.numel() > 0

    @torch.no_grad()
    def bind_weight(self, w: Tensor) -> None:
        """Fit ``s0``, ``z`` and the initial logits to the weight ``w`` (``(c_out, ...)``)."""
        flat = w.detach().float().reshape(w.shape[0], -1)
        if self.init == "mse":
            lo, hi = search_asymmetric(flat, self.bits)
        else:
            lo, hi = torch.aminmax(flat, dim=1)
        shape = (w.shape[0],) + (1,) * (w.dim() - 1)
        scale = (hi - lo).clamp_min(1e-8).div(2**self.bits - 1).view(shape)
        zero_point = (lo.view(shape) / scale).round().add(2 ** (self.bits - 1))
        t = w.detach().float() / scale
        frac = t - t.floor()
        self.floor_scale = scale.clone()
        self.zero_point = zero_point
        self.scale = nn.Parameter(scale.clone())
        self.logits = nn.Parameter(rectified_sigmoid_inverse(frac))

    def _check(self) -> None:
        if not self.bound:
            raise RuntimeError(
                "AdaRoundWeightQuantizer is not bound to a weight: build it through "
                "quantize_ (QuantConv2d/QuantLinear.from_float call bind_weight)"
            )

    def _codes(self, w: Tensor, soft: bool) -> Tensor:
        qmin, qmax = qrange(self.bits)
        base = torch.floor(w.detach().float() / self.floor_scale).sub_(self.zero_point)
        rounding = rectified_sigmoid(self.logits) if soft else (self.logits >= 0).float()
        return (base + rounding).clamp(qmin, qmax)

    def forward(self, w: Tensor) -> Tensor:
        """Fake-quantize the bound weight: ``(c_out, ...)`` -> fp32, same shape."""
        self._check()
        return self.scale * (self._codes(w, self.soft) + self.zero_point)

    def rounding_loss(self, beta: float) -> Tensor:
        """AdaRound's regulariser ``Σ 1 - |2 h(v) - 1|^β`` (summed, as Genie)."""
        h = rectified_sigmoid(self.logits)
        return (1.0 - (2.0 * h - 1.0).abs().pow(beta)).sum()

    @torch.no_grad()
    def codes(self, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(q, scale, zero_point)`` of the hard rounding, ``w_hat = scale · (q + zero_point)``."""
        self._check()
        return self._codes(w, False), self.scale.detach().clone(), self.zero_point.clone()

    def extra_repr(self) -> str:
        return f"bits={self.bits}, init={self.init!r}, soft={self.soft}"
