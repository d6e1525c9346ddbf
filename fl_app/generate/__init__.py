"""synthbrain generate."""
