"""The public pretrained checkpoint that ships with the package.

``fl_app/pretrained/<profile>/`` is a global-model directory (see :mod:`fl_app.global_model`) written by
``synthbrain pretrain``: trained centrally on simulated subjects from seeds that no demo, bench or test site
uses, so it carries no patient. Its ``model_card.json`` records the command, data, steps, wall time,
held-out metrics and the SHA-256 of each weights file.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["PRETRAINED_ROOT", "pretrained_dir", "pretrained_vqvae_path"]

PRETRAINED_ROOT = Path(__file__).resolve().parent.parent / "pretrained"


def pretrained_dir(profile: str = "cpu-demo") -> Path:
    """The shipped global-model directory for ``profile``; a clear error if the package has none."""
    d = PRETRAINED_ROOT / profile
    if not (d / "vqvae.pt").is_file():
        raise FileNotFoundError(
            f"{d}: no pretrained checkpoint ships for profile {profile!r} "
            f"(`synthbrain pretrain --profile {profile}` makes one)"
        )
    return d


def pretrained_vqvae_path(profile: str = "cpu-demo") -> Path:
    return pretrained_dir(profile) / "vqvae.pt"
