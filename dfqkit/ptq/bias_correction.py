"""Analytic bias correction: remove the expected output shift that weight quantization causes,
with the expected input taken from the preceding batch norm (no data).

A quantized layer computes ``y_q = W_q x + b`` instead of ``y = W x + b``; its output is off by
``ε x`` with ``ε = W_q − W``, on average ``ε E[x]``. When the layer's input is
``act(BN(·))``, the BN output of channel ``c`` is taken to be ``N(β_c, γ_c²)`` (its affine
parameters; the normalized value is assumed standard normal), so ``E[x_c]`` is known in closed
form with ``μ = β_c``, ``σ = |γ_c|``, ``Φ``/``φ`` the standard normal cdf/pdf:

* no activation: ``μ``;
* ReLU (the rectified normal): ``f(μ) = μ Φ(μ/σ) + σ φ(μ/σ)``;
* ReLU6 = ``relu(x) − relu(x − 6)``: ``f(μ) − f(μ − 6)``;
* LeakyReLU(a) = ``relu(x) + a (x − relu(x))``: ``f(μ) + a (μ − f(μ))``.

The layer's bias becomes ``b − ε E[x]`` (a zero bias is added where it had none). For a
convolution ``ε E[x]`` sums over the kernel positions and the input channels of each output's
group, so a depthwise (grouped) convolution uses each channel's own mean; positions whose
receptive field reaches into the zero padding are treated like interior ones (they see fewer
non-zero inputs), as Nagel et al. approximate. The activation quantizer's own rounding is not
corrected (the paper corrects the weight error only). The correction is computed once, from the
quantized weight at build time; a student that trains afterwards trains this bias too.

Reference: Nagel et al., "Data-Free Quantization Through Weight Equalization and Bias
Correction", ICCV 2019 (Sec. 4.2, analytic bias correction); AIMET ``bias_correction``.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor, nn

from dfqkit.errors import ConfigError
from dfqkit.ptq.graph import Activation, Site, sites, trace
from dfqkit.ptq.transforms import Transform, check_float
from dfqkit.quant.modules import QuantConv2d, QuantLinear
from dfqkit.registry import register

logger = logging.getLogger(__name__)


def _relu_mean(mu: Tensor, sigma: Tensor) -> Tensor:
    z = mu / sigma
    cdf = 0.5 * (1 + torch.erf(z / math.sqrt(2)))
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    return mu * cdf + sigma * pdf


def expected_input(mu: Tensor, sigma: Tensor, act: Activation) -> Tensor:
    """``E[act(x)]`` for ``x ~ N(mu, sigma²)`` per channel (float64), shape of ``mu``."""
    mu = mu.double()
    sigma = sigma.double().abs().clamp_min(1e-12)  # σ = 0: the activation of μ itself
    if act.kind == "identity":
        return mu
    f = _relu_mean(mu, sigma)
    if act.kind == "relu":
        return f
    if act.kind == "relu6":
        return f - _relu_mean(mu - 6.0, sigma)
    if act.kind == "leaky_relu":
        return f + act.slope * (mu - f)
    raise ValueError(f"no closed-form mean for the activation {act.what or act.kind}")


def norm_output_moments(norm: nn.Module) -> tuple[Tensor, Tensor]:
    """``(β, |γ|)`` of a batch norm, ``(c,)`` each (``(0, 1)`` without affine parameters)."""
    c = norm.num_features
    if norm.weight is None:
        return torch.zeros(c), torch.ones(c)
    return norm.bias.detach(), norm.weight.detach().abs()


def output_shift(layer: nn.Module, mean: Tensor, reference: Tensor | None = None) -> Tensor:
    """``(W_q − W) · E[x]`` of a quantized conv/linear, ``(c_out,)`` float64, for the
    per-input-channel mean ``E[x]`` ``(c_in,)`` (summed over kernel positions). ``W`` is
    ``reference`` (the float model's weight) when given, else the layer's own weight."""
    with torch.no_grad():
        w = layer.weight.detach()
        ref = w if reference is None else reference.to(w.device)
        err = (layer.weight_quant(w).double() - ref.double()).cpu()
    mean = mean.double().cpu()
    if isinstance(layer, nn.Linear):
        return err @ mean
    g = layer.groups
    per_group = mean.view(g, -1).repeat_interleave(err.shape[0] // g, dim=0)  # (c_out, c_in/g)
    return (err.sum(dim=(2, 3)) * per_group).sum(1)


@torch.no_grad()
def correct_layer(
    layer: nn.Module, norm: nn.Module, act: Activation, reference: Tensor | None = None
) -> Tensor:
    """Subtract the expected output shift from ``layer``'s bias in place; returns the shift.
    ``reference``: the float weight the quantized one is compared with (default: its own)."""
    mu, sigma = norm_output_moments(norm)
    shift = output_shift(layer, expected_input(mu, sigma, act), reference)
    w = layer.weight
    delta = (-shift).to(device=w.device, dtype=w.dtype)
    if layer.bias is None:
        layer.bias = nn.Parameter(delta, requires_grad=w.requires_grad)
    else:
        layer.bias.add_(delta.to(layer.bias.dtype))
    return shift


@register("ptq")
class BiasCorrection(Transform):
    """Analytic bias correction of every quantized conv/linear fed by a batch norm (Nagel et al.).

    Bound in ``train.transforms`` after any transform of the float model: it finds its layers
    on the float model (``before``, which also keeps their float weights) and corrects them once
    their weights are quantized (``after``), against those float weights: a rounding transform
    between the two (``@ptq.SQuant()``) is corrected as it ends. Layers that ``quantize_`` left
    float are not touched.
    """

    stage = "quantized"

    def before(
        self, model: nn.Module, example: Tensor | None = None
    ) -> tuple[list[Site], dict[str, Tensor]]:
        check_float(self, model)
        found = [
            s for s in sites(trace(model, f"train.transforms: {self!r}")) if s.act.kind != "other"
        ]
        if not found:
            raise ConfigError(
                f"train.transforms: {self!r} found no conv or linear layer fed by a batch norm "
                f"(+ ReLU/ReLU6/LeakyReLU) in {type(model).__name__}"
            )
        modules = dict(model.named_modules())
        weights = {s.layer: modules[s.layer].weight.detach().clone() for s in found}
        return found, weights

    def after(self, student: nn.Module, state: tuple[list[Site], dict[str, Tensor]]) -> None:
        found, weights = state
        modules = dict(student.named_modules())
        done = 0
        for site in found:
            layer, norm = modules.get(site.layer), modules.get(site.norm)
            if isinstance(layer, QuantConv2d | QuantLinear) and norm is not None:
                correct_layer(layer, norm, site.act, weights[site.layer])
                done += 1
        logger.info(f"BiasCorrection: {done} of {len(found)} layers fed by a batch norm corrected")

    def __repr__(self) -> str:
        return "BiasCorrection()"
