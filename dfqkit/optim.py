"""Optimizers beyond ``torch.optim``, gin-configurable as ``@optim.<Name>``."""

from __future__ import annotations

from collections.abc import Iterable

import gin
import torch
from torch import nn


class GradientInundationSGD(torch.optim.Optimizer):
    """SGD whose step on each quantized weight is enlarged until enough integer codes change.

    Plain (Nesterov) momentum SGD computes the tentative step ``Δ = −lr · d`` of a weight. For a
    quantized weight (one whose ``QuantConv2d``/``QuantLinear`` registered its quantizer), the
    step is scaled by ``α ≥ 1``: if fewer than a fraction ``threshold`` of its integer codes
    would change, ``α`` doubles until enough do (at most ``max_alpha``), then ``alpha_iter``
    bisection steps find the smallest such ``α`` to that resolution; the weight moves by
    ``α · Δ``. Other parameters (BN, biases) take the plain step. The threshold follows the
    learning-rate schedule (``threshold × lr / initial lr``), as AIT decays it with the lr.

    Finding ``α`` reads the change fraction on the host a few times per weight and step: this
    optimizer trades speed for AIT's behaviour.

    Reference: Choi et al., "It's All In the Teacher: Zero-Shot Quantization Brought Closer to
    the Teacher", CVPR 2022 (the official code's ``SGD_adalr``: threshold 1e-3 CIFAR, 1e-4
    ImageNet, 5 refinement steps).

    Args:
        params: parameters or parameter groups.
        lr: learning rate.
        momentum, nesterov, weight_decay: as ``torch.optim.SGD`` (AIT: 0.9, True, 0).
        threshold: the fraction of codes a step must change.
        alpha_iter: bisection steps after the doubling search.
        max_alpha: cap of the step multiplier.
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter] | Iterable[dict],
        lr: float,
        momentum: float = 0.9,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        threshold: float = 1e-3,
        alpha_iter: int = 5,
        max_alpha: float = 128.0,
    ) -> None:
        if not lr > 0:
            raise ValueError(f"GradientInundationSGD.lr must be > 0, got {lr!r}")
        if not 0.0 < threshold < 1.0:
            raise ValueError(
                f"GradientInundationSGD.threshold must be in (0, 1), got {threshold!r}"
            )
        defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            threshold=threshold,
            alpha_iter=alpha_iter,
            max_alpha=max_alpha,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            group.setdefault("initial_lr", group["lr"])

    @staticmethod
    def _changed(
        quantizer: nn.Module, w: torch.Tensor, codes: torch.Tensor, step: torch.Tensor, alpha: float
    ) -> float:
        return (quantizer.codes(w + alpha * step)[0] != codes).float().mean().item()

    def _alpha(
        self, quantizer: nn.Module, w: torch.Tensor, step: torch.Tensor, group: dict
    ) -> float:
        threshold = group["threshold"] * group["lr"] / group["initial_lr"]
        codes = quantizer.codes(w)[0]
        if self._changed(quantizer, w, codes, step, 1.0) >= threshold:
            return 1.0
        alpha = 1.0
        while alpha < group["max_alpha"]:
            alpha = min(2.0 * alpha, group["max_alpha"])
            if self._changed(quantizer, w, codes, step, alpha) >= threshold:
                break
        else:
            return alpha
        lo, hi = alpha / 2.0, alpha
        for _ in range(group["alpha_iter"]):
            mid = (lo + hi) / 2.0
            if self._changed(quantizer, w, codes, step, mid) >= threshold:
                hi = mid
            else:
                lo = mid
        return hi

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if group["weight_decay"]:
                    d = d.add(p, alpha=group["weight_decay"])
                if group["momentum"]:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = d.clone()
                    else:
                        buf.mul_(group["momentum"]).add_(d)
                    d = d.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
                step = d.mul(-group["lr"])
                quantizer = getattr(p, "_dfqkit_quantizer", None)
                alpha = 1.0 if quantizer is None else self._alpha(quantizer, p, step, group)
                p.add_(step, alpha=alpha)
        return loss


gin.external_configurable(GradientInundationSGD, module="dfqkit.optim")
