"""dfqkit.models."""
