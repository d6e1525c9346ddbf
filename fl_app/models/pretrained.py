"""The public pretrained checkpoint that ships with the package.

``fl_app/pretrained/<profile>/`` is a global-model directory (see :mod:`fl_app.global_model`) written by
``synthbrain pretrain``: trained centrally on simulated subjects from seeds that no demo, bench or test site
uses, so it carries no patient. Its ``model_card.json`` records the command, data, steps, wall time,
held-out metrics and the SHA-256 of each weights file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = [
    "PRETRAINED_ROOT",
    "check_init_architecture",
    "checkpoint_profile_dict",
    "pretrained_dir",
    "pretrained_vqvae_path",
    "resolve_init",
]


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


def resolve_init(
    init: str | Path | None, kind: str, profile: str = "cpu-demo", option: str = "--init"
) -> Path | None:
    """The ``kind`` (``"vqvae"`` / ``"prior"``) weights file a job starts from, or None for ``scratch``.

    Args:
        init: ``"pretrained"`` (the package's ``fl_app/pretrained/<profile>/``), a global-model directory
            (its ``<kind>.pt``), a ``.pt`` file, or ``"scratch"`` / None / ``""``.
        kind: the job's model.
        profile: the profile name ``pretrained`` is looked up by.
        option: the command-line option named in the error (``--init``, ``--prior``, ...).

    Raises:
        FileNotFoundError: naming the path that is missing (the package ships no checkpoint, the directory
            has no ``<kind>.pt``, the file does not exist).
    """
    if init is None or str(init) in ("", "scratch"):
        return None
    if kind not in ("vqvae", "prior"):
        raise ValueError(f"kind must be vqvae or prior, got {kind!r}")
    d = pretrained_dir(profile) if str(init) == "pretrained" else Path(init)
    path = d / f"{kind}.pt" if d.is_dir() else d
    if not path.is_file():
        where = f"{d} has no {kind}.pt" if d.is_dir() else f"{path} does not exist"
        raise FileNotFoundError(
            f"{option} {init}: {where} (give a global-model directory or a {kind} .pt file)"
        )
    return path.resolve()


def checkpoint_profile_dict(path: str | Path) -> dict[str, Any]:
    """The profile stored in a VQ-VAE / prior ``.pt``; for a global-model directory, its ``prior.pt``'s (the
    whole profile: the VQ-VAE's sections as they were, plus the prior section it was trained with), or its
    ``vqvae.pt``'s when it has no prior."""
    import torch

    p = Path(path)
    if p.is_dir():
        p = p / "prior.pt" if (p / "prior.pt").is_file() else p / "vqvae.pt"
    payload = torch.load(p, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or not isinstance(payload.get("profile"), dict):
        raise ValueError(f"{p}: not a synthbrain checkpoint (no profile inside)")
    return payload["profile"]


def check_init_architecture(path: str | Path, kind: str, job_profile: Any) -> None:
    """Raise :class:`~fl_app.config.ConfigError` naming every architecture key where the checkpoint at
    ``path`` and the job's :class:`~fl_app.config.Profile` differ (see :data:`fl_app.config.ARCHITECTURE_KEYS`)."""
    from fl_app.config import ConfigError, architecture_diff, profile_from_dict

    ck = profile_from_dict(checkpoint_profile_dict(path), source=str(path))
    sections = ("data", "vqvae") if kind == "vqvae" else ("data", "vqvae", "prior")
    diff = architecture_diff(ck, job_profile, sections)
    if diff:
        raise ConfigError(
            f"{path}: the checkpoint's architecture differs from the job's profile (checkpoint != job): "
            + "; ".join(diff)
            + ". Start the job from the checkpoint's own profile (drop --profile / these --set keys)."
        )
