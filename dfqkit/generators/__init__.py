"""dfqkit.generators."""
