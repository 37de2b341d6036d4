"""dfqkit.losses."""
