"""Image synthesizers."""

from dfqkit.generators.arc_generator import ARCGenerator
from dfqkit.generators.base import Generator, synthesize
from dfqkit.generators.conditional_generator import ConditionalGenerator
from dfqkit.generators.pixel_bank import PixelBank
from dfqkit.generators.qimera_generator import QimeraGenerator
from dfqkit.generators.real_data_reference import RealDataReference
from dfqkit.generators.synthetic_set import SyntheticSet

__all__ = [
    "ARCGenerator",
    "ConditionalGenerator",
    "Generator",
    "PixelBank",
    "QimeraGenerator",
    "RealDataReference",
    "SyntheticSet",
    "synthesize",
]
