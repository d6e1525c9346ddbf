"""Site cohorts: reading, validation, preprocessing, simulated sites and the torch dataset."""
