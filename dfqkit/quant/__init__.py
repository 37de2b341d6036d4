"""dfqkit.quant: fake quantizers, quantized layers, placement policies and ``quantize_``.

Importing this package registers every quantizer (``@quantizers.<Name>`` in gin) and
``quant.QuantConfig``.
"""

from dfqkit.quant.act_base import ACT_MODES, ActQuantizer
from dfqkit.quant.act_ema import EMAActQuantizer
from dfqkit.quant.act_learnable import LearnableClipActQuantizer, learnable_fake_quant
from dfqkit.quant.act_lsq import LSQActQuantizer
from dfqkit.quant.act_minmax import MinMaxActQuantizer
from dfqkit.quant.api import (
    act_quantizers,
    clip_bounds,
    float_layers,
    quantize_,
    set_quant_mode,
    sync_quantizers,
)
from dfqkit.quant.config import QuantConfig
from dfqkit.quant.functional import fake_quant, minmax_qparams, quantize_codes
from dfqkit.quant.modules import QuantConv2d, QuantConv2dSame, QuantLinear
from dfqkit.quant.policies import POLICIES
from dfqkit.quant.weight_adaround import AdaRoundWeightQuantizer
from dfqkit.quant.weight_minmax import MinMaxWeightQuantizer
from dfqkit.quant.weight_symmetric import SymmetricWeightQuantizer

__all__ = [
    "ACT_MODES",
    "POLICIES",
    "ActQuantizer",
    "AdaRoundWeightQuantizer",
    "EMAActQuantizer",
    "LSQActQuantizer",
    "LearnableClipActQuantizer",
    "MinMaxActQuantizer",
    "MinMaxWeightQuantizer",
    "QuantConfig",
    "QuantConv2d",
    "QuantConv2dSame",
    "QuantLinear",
    "SymmetricWeightQuantizer",
    "act_quantizers",
    "float_layers",
    "clip_bounds",
    "fake_quant",
    "learnable_fake_quant",
    "minmax_qparams",
    "quantize_",
    "quantize_codes",
    "set_quant_mode",
    "sync_quantizers",
]
