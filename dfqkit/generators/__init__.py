"""Image synthesizers."""

from dfqkit.generators.base import Generator, synthesize
from dfqkit.generators.conditional_generator import ConditionalGenerator
from dfqkit.generators.pixel_bank import PixelBank
from dfqkit.generators.qimera_generator import QimeraGenerator
from dfqkit.generators.real_data_reference import RealDataReference

__all__ = [
    "ConditionalGenerator",
    "Generator",
    "PixelBank",
    "QimeraGenerator",
    "RealDataReference",
    "synthesize",
]
