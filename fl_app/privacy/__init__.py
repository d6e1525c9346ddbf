"""synthbrain privacy."""
