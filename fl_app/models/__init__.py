"""synthbrain models."""
