"""dfqkit.quant."""
