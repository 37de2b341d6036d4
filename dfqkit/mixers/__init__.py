"""dfqkit.mixers."""
