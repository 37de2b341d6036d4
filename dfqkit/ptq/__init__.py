"""dfqkit.ptq: post-training quantization stages and data-free transforms.

Importing this package registers

* ``@ptq.BlockReconstruction`` (Genie-M), run after calibration:
  ``train.reconstruction = @ptq.BlockReconstruction()``;
* the data-free transforms of ``train.transforms`` (Nagel et al., ICCV 2019), applied to the
  student and the naive reference alike: ``@ptq.CrossLayerEqualization()`` on the float model
  before quantization, ``@ptq.SQuant()`` (Guo et al., ICLR 2022) on the rounding of the
  quantized weights, ``@ptq.BiasCorrection()`` on the quantized model.
"""

from dfqkit.ptq.bias_correction import BiasCorrection
from dfqkit.ptq.cross_layer_equalization import CrossLayerEqualization
from dfqkit.ptq.reconstruction import DEFAULT_UNITS, BlockReconstruction, Unit
from dfqkit.ptq.squant import SQuant
from dfqkit.ptq.transforms import Transform, check_transforms, quantize_with

__all__ = [
    "DEFAULT_UNITS",
    "BiasCorrection",
    "BlockReconstruction",
    "CrossLayerEqualization",
    "SQuant",
    "Transform",
    "Unit",
    "check_transforms",
    "quantize_with",
]
