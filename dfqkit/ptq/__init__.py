"""dfqkit.ptq: post-training quantization stages that run after calibration.

Importing this package registers ``@ptq.BlockReconstruction`` (Genie-M), bound in a recipe as
``train.reconstruction = @ptq.BlockReconstruction()``.
"""

from dfqkit.ptq.reconstruction import DEFAULT_UNITS, BlockReconstruction, Unit

__all__ = ["DEFAULT_UNITS", "BlockReconstruction", "Unit"]
