"""synthbrain train."""
