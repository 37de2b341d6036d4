"""dfqkit: data-free quantization as interchangeable, gin-wired components."""

__version__ = "0.1.0"
