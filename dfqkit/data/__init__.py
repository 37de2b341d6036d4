"""dfqkit.data."""
