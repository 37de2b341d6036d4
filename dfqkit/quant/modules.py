"""Conv2d / Linear layers that fake-quantize their weight (and optionally their input)."""

from __future__ import annotations

from timm.layers.conv2d_same import Conv2dSame
from timm.layers.padding import pad_same
from torch import Tensor, nn
from torch.nn import functional as F


def _check_float(module: nn.Module, base: type[nn.Module], quant: type[nn.Module]) -> None:
    if isinstance(module, quant):
        raise ValueError(f"{type(module).__name__} is already quantized")
    if not isinstance(module, base) or type(module).forward is not base.forward:
        raise ValueError(
            f"{quant.__name__}.from_float expects an {base.__name__} (or a subclass that keeps "
            f"its forward), got {type(module).__name__}"
        )


class QuantConv2d(nn.Conv2d):
    """``nn.Conv2d`` computing with a fake-quantized weight; the bias stays float (as GDFQ).

    A subclass, so the ``weight``/``bias`` state-dict keys stay those of the float layer; the
    quantizers add ``weight_quant.*`` and ``input_quant.*`` keys for their own state.

    Attributes:
        weight_quant: Module mapping the float weight ``(c_out, c_in/groups, kh, kw)`` to its
            fake-quantized value.
        input_quant: Module fake-quantizing the input ``(b, c_in, h, w)``, or None.
    """

    weight_quant: nn.Module
    input_quant: nn.Module | None

    @classmethod
    def from_float(
        cls, module: nn.Conv2d, *, weight_quant: nn.Module, input_quant: nn.Module | None
    ) -> QuantConv2d:
        """A quantized layer sharing ``module``'s parameters (they are not copied or changed).

        Args:
            module: The float ``nn.Conv2d``.
            weight_quant: Weight quantizer, e.g. ``MinMaxWeightQuantizer(bits=4)``.
            input_quant: Input quantizer, or None to leave the input float.

        Returns:
            A ``QuantConv2d`` in the same train/eval mode as ``module``.
        """
        _check_float(module, nn.Conv2d, cls)
        return cls._sharing(module, weight_quant=weight_quant, input_quant=input_quant)

    @classmethod
    def _sharing(
        cls, module: nn.Conv2d, *, weight_quant: nn.Module, input_quant: nn.Module | None
    ) -> QuantConv2d:
        new = cls(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            groups=module.groups,
            bias=module.bias is not None,
            padding_mode=module.padding_mode,
            device="meta",  # no allocation or init: the parameters are module's own
        )
        new.weight = module.weight
        new.bias = module.bias
        new.weight_quant = weight_quant
        if hasattr(weight_quant, "bind_weight"):  # quantizers fitted to the weight (AdaRound)
            weight_quant.bind_weight(module.weight)
        # lets optimizers that look at integer codes (AIT's gradient inundation) find it
        new.weight._dfqkit_quantizer = weight_quant
        new.input_quant = input_quant
        return new.train(module.training)

    def forward(self, x: Tensor) -> Tensor:
        """``(b, c_in, h, w) -> (b, c_out, h', w')``."""
        if self.input_quant is not None:
            x = self.input_quant(x)
        return self._conv_forward(x, self.weight_quant(self.weight), self.bias)


class QuantConv2dSame(QuantConv2d):
    """timm's ``Conv2dSame`` (TensorFlow "SAME" padding, computed from the input size at every
    call: the stem and the stride-2 depthwise convolutions of timm's ``tf_*`` EfficientNets)
    computing with a fake-quantized weight. The input is quantized (when ``input_quant`` is set)
    before it is zero-padded, as an integer kernel pads its integer input."""

    @classmethod
    def from_float(
        cls, module: nn.Conv2d, *, weight_quant: nn.Module, input_quant: nn.Module | None
    ) -> QuantConv2dSame:
        if isinstance(module, QuantConv2d):
            raise ValueError(f"{type(module).__name__} is already quantized")
        if type(module) is not Conv2dSame:
            raise ValueError(f"{cls.__name__}.from_float expects a timm Conv2dSame, got "
                             f"{type(module).__name__}")  # fmt: skip
        return cls._sharing(module, weight_quant=weight_quant, input_quant=input_quant)

    def forward(self, x: Tensor) -> Tensor:
        """``(b, c_in, h, w) -> (b, c_out, ceil(h / stride), ceil(w / stride))``."""
        if self.input_quant is not None:
            x = self.input_quant(x)
        x = pad_same(x, self.weight.shape[-2:], self.stride, self.dilation)
        return self._conv_forward(x, self.weight_quant(self.weight), self.bias)


class QuantLinear(nn.Linear):
    """``nn.Linear`` computing with a fake-quantized weight; the bias stays float (as GDFQ).

    Attributes:
        weight_quant: Module mapping the float weight ``(out, in)`` to its fake-quantized value.
        input_quant: Module fake-quantizing the input ``(..., in)``, or None.
    """

    weight_quant: nn.Module
    input_quant: nn.Module | None

    @classmethod
    def from_float(
        cls, module: nn.Linear, *, weight_quant: nn.Module, input_quant: nn.Module | None
    ) -> QuantLinear:
        """A quantized layer sharing ``module``'s parameters (they are not copied or changed).

        Args:
            module: The float ``nn.Linear``.
            weight_quant: Weight quantizer, e.g. ``MinMaxWeightQuantizer(bits=4)``.
            input_quant: Input quantizer, or None to leave the input float.

        Returns:
            A ``QuantLinear`` in the same train/eval mode as ``module``.
        """
        _check_float(module, nn.Linear, cls)
        new = cls(
            module.in_features, module.out_features, bias=module.bias is not None, device="meta"
        )
        new.weight = module.weight
        new.bias = module.bias
        new.weight_quant = weight_quant
        if hasattr(weight_quant, "bind_weight"):  # quantizers fitted to the weight (AdaRound)
            weight_quant.bind_weight(module.weight)
        # lets optimizers that look at integer codes (AIT's gradient inundation) find it
        new.weight._dfqkit_quantizer = weight_quant
        new.input_quant = input_quant
        return new.train(module.training)

    def forward(self, x: Tensor) -> Tensor:
        """``(..., in) -> (..., out)``."""
        if self.input_quant is not None:
            x = self.input_quant(x)
        return F.linear(x, self.weight_quant(self.weight), self.bias)


QUANT_MODULES: dict[type[nn.Module], type[nn.Module]] = {
    Conv2dSame: QuantConv2dSame,
    nn.Conv2d: QuantConv2d,
    nn.Linear: QuantLinear,
}


def quant_class(module: nn.Module) -> type[nn.Module] | None:
    """The quantized class ``quantize_`` swaps ``module`` for: the entry of
    :data:`QUANT_MODULES` whose base ``module`` is an instance of without overriding its
    ``forward`` (timm's ``Conv2dSame`` has its own entry); ``None`` for any other module."""
    return next(
        (
            quant
            for base, quant in QUANT_MODULES.items()
            if isinstance(module, base) and type(module).forward is base.forward
        ),
        None,
    )
