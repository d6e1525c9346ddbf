"""synthbrain: federated generative modelling of 3D brain MRI (VQ-VAE + transformer prior on NVFlare)."""

__version__ = "0.1.0"
