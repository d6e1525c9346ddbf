"""synthbrain evaluate."""
