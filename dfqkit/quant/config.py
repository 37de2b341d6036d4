"""``QuantConfig``: what ``quantize_`` builds, validated when it is constructed."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass

import gin
from torch import nn

from dfqkit.quant.act_ema import EMAActQuantizer
from dfqkit.quant.functional import check_bits
from dfqkit.quant.policies import POLICIES
from dfqkit.quant.weight_minmax import MinMaxWeightQuantizer


@dataclass(frozen=True)
class QuantConfig:
    """Bit widths, quantizer factories and placement for :func:`dfqkit.quant.quantize_`.

    A gin recipe binds it as ``train.quant = @quant.QuantConfig()`` with
    ``quant.QuantConfig.w_bits = %W_BITS`` and, for a quantizer, an *uncalled* reference such as
    ``quant.QuantConfig.act_quantizer = @quantizers.EMAActQuantizer`` (a factory that gin
    configures; ``quantize_`` calls it with ``bits=`` once per placement).

    Args:
        w_bits: Weight bit width, 2..16.
        a_bits: Activation bit width, 2..16.
        weight_quantizer: Factory ``(*, bits) -> nn.Module`` mapping a weight to its
            fake-quantized value, called once per conv/linear.
        act_quantizer: Factory ``(*, bits) -> ActQuantizer``, called once per placement.
        policy: Activation placement, a key of ``dfqkit.quant.policies.POLICIES``:
            ``"after_relu"`` (GDFQ: after every ReLU/ReLU6 call) or ``"layer_inputs"`` (the
            input of every quantized conv/linear).
        first_layer_bits: Bits of the first conv/linear in execution order (its weight and,
            under ``layer_inputs``, its input quantizer); None = ``w_bits``/``a_bits``.
        last_layer_bits: The same for the last conv/linear in execution order.
        second_input_bits: Bits of the second conv/linear's input in execution order (BRECQ
            and Genie keep it at 8: it reads the stem's output): under ``layer_inputs`` its
            input quantizer, under ``after_relu`` the quantizers of the ReLU calls between the
            first and the second layer; None = as the others.
        quantize_input: ``layer_inputs`` only: quantize the network input (the first layer's
            input). GDFQ never quantizes it.
        layer_bits: Weight bits of named layers, ``{qualified name: bits}`` (names as in
            ``model.named_modules()``), over every rule above: keep a layer a sensitivity
            analysis singles out at 8 bits (docs/cpu.md). A name that is no quantized
            conv/linear of the model is refused when the model is quantized.
        relu_types: Module types that count as a ReLU for ``after_relu``.
    """

    w_bits: int
    a_bits: int
    weight_quantizer: Callable[..., nn.Module] = MinMaxWeightQuantizer
    act_quantizer: Callable[..., nn.Module] = EMAActQuantizer
    policy: str = "after_relu"
    first_layer_bits: int | None = None
    last_layer_bits: int | None = None
    second_input_bits: int | None = None
    quantize_input: bool = False
    layer_bits: dict[str, int] | None = None
    relu_types: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6)

    def __post_init__(self) -> None:
        check_bits(self.w_bits, field="w_bits")
        check_bits(self.a_bits, field="a_bits")
        check_bits(self.first_layer_bits, field="first_layer_bits", allow_none=True)
        check_bits(self.last_layer_bits, field="last_layer_bits", allow_none=True)
        check_bits(self.second_input_bits, field="second_input_bits", allow_none=True)
        for field in ("weight_quantizer", "act_quantizer"):
            value = getattr(self, field)
            if not callable(value):
                raise ValueError(
                    f"{field} must be a quantizer factory called with bits= (a class, or an "
                    f"uncalled gin reference like @quantizers.EMAActQuantizer), got {value!r}"
                )
        if self.policy not in POLICIES:
            names = sorted(POLICIES)
            close = difflib.get_close_matches(str(self.policy), names, n=1, cutoff=0.5)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"policy must be one of {', '.join(map(repr, names))}, got {self.policy!r}.{hint}"
            )
        if not isinstance(self.quantize_input, bool):
            raise ValueError(f"quantize_input must be a bool, got {self.quantize_input!r}")
        if self.layer_bits is not None:
            if not isinstance(self.layer_bits, dict) or not all(
                isinstance(k, str) for k in self.layer_bits
            ):
                raise ValueError(
                    "layer_bits must be a dict {layer name: bits} such as "
                    f"{{'blocks.0.0.conv_dw': 8}}, got {self.layer_bits!r}"
                )
            for name, bits in self.layer_bits.items():
                check_bits(bits, field=f"layer_bits[{name!r}]")
        types = self.relu_types
        if not (
            isinstance(types, tuple)
            and types
            and all(isinstance(t, type) and issubclass(t, nn.Module) for t in types)
        ):
            raise ValueError(
                f"relu_types must be a non-empty tuple of nn.Module classes, got {types!r}"
            )

    def weight_bits(self, *, first: bool = False, last: bool = False, name: str = "") -> int:
        """Weight bits of layer ``name``, given whether it is the first and/or last conv/linear
        (``layer_bits`` wins)."""
        if self.layer_bits and name in self.layer_bits:
            return self.layer_bits[name]
        return self._bits(first, last, self.w_bits)

    def second_input(self, bits: int) -> int:
        """``bits`` of a quantizer of the second layer's input, widened to
        ``second_input_bits`` when that is set."""
        return bits if self.second_input_bits is None else max(bits, self.second_input_bits)

    def input_bits(self, *, first: bool = False, last: bool = False) -> int:
        """Input-quantizer bits of a layer (``layer_inputs``), given its position."""
        return self._bits(first, last, self.a_bits)

    def _bits(self, first: bool, last: bool, default: int) -> int:
        # A network with a single conv/linear is both first and last: keep the wider setting.
        chosen = [
            bits
            for applies, bits in ((first, self.first_layer_bits), (last, self.last_layer_bits))
            if applies and bits is not None
        ]
        return max(chosen) if chosen else default


gin.external_configurable(QuantConfig, module="dfqkit.quant")
