"""Federated memorisation audit: is any synthetic subject a near-copy of a training subject?

The training images never leave their site. Each site runs :func:`site_audit` **locally** on the
synthetic cohort (synthetic images may travel) and its own preprocessed training subjects, and
returns only an aggregate :class:`dict`:

* ``min_distance``: the smallest sample-to-nearest-training-subject distance;
* ``threshold``: the ``quantile`` of the site's own real-to-real nearest-neighbour distances
  (each training subject to its nearest *other* training subject);
* ``histogram``: counts of the samples' nearest-training distances in units of ``threshold``
  (fixed edges :data:`HIST_EDGES`, so sites can be pooled without revealing their scale);
* ``flagged``: ids of the *synthetic* subjects that are near copies (no training id, no image, no
  per-training-subject value leaves the site): closer than ``threshold`` to a training subject **and**
  distinctly closer to it than to any other, ``d1 < nearest_ratio · d2`` (nearest and second-nearest training
  distances, :data:`NEAREST_RATIO`);
* ``n_within_threshold``: how many samples are closer than ``threshold`` at all (the looser count).

Why two conditions: the threshold alone flags look-alikes, not copies. Measured on the cpu-demo profile
(docs/BENCHMARKS.md, "Memorisation audit controls"), 11 of 32 *fresh* real subjects from an unseen seed fall
under some training site's threshold, more than of a good synthetic cohort; none of them is distinctly closer to
one training subject than to the next (d1 / d2 ≥ 0.70), while the worst case of memorisation — the VQ-VAE's own
reconstruction of a training subject, which is what a prior that replays a training code sequence decodes to —
stays at d1 / d2 ≤ 0.64 and within 0.73 × threshold for all 120 training subjects.

:func:`combine_site_audits` merges the site answers at the coordinator; ``synthbrain sample
--audit-site ...`` withholds flagged subjects from the release (:func:`gate_cohort`).

Distance: each volume (profile grid, intensities in [0, 1]) is smoothed with a Gaussian
(σ = 1 voxel) and down-sampled by 2 before the root-mean-square voxel difference. Smoothing removes
the scanner noise that otherwise dominates real-to-real distances (a noise-free decoded sample would
look "closer" than any two noisy scans), while a copy of a training image, or its VQ-VAE
reconstruction, stays far closer to its source than any other subject is.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

__all__ = [
    "HIST_EDGES",
    "NEAREST_RATIO",
    "add_audit_parser",
    "audit_cohort_locally",
    "audit_embedding",
    "combine_site_audits",
    "gate_cohort",
    "load_site_audit",
    "nn_distances",
    "site_audit",
    "site_audit_arrays",
]

NEAREST_RATIO: float = 2.0 / 3.0
"""A sample within the threshold is a near copy if its nearest training subject is at most this fraction of the
distance to the second nearest (at least 1.5 × closer to one subject than to any other)."""

HIST_EDGES: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0, float("inf"))
"""Histogram edges of sample distances, in units of the site threshold."""


def audit_embedding(image: np.ndarray) -> np.ndarray:
    """Volume (X, Y, Z) -> the flattened, smoothed (σ 1 voxel), 2x down-sampled vector the audit compares."""
    v = ndi.gaussian_filter(np.asarray(image, dtype=np.float32), sigma=1.0, mode="nearest")
    return v[::2, ::2, ::2].reshape(-1).astype(np.float32)


def _rms_dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise RMS distances between rows of a (N, D) and b (M, D) -> (N, M)."""
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.sqrt(np.maximum(d2, 0.0) / a.shape[1])


def nn_distances(samples: np.ndarray, training: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sample -> nearest training distances (N,), training -> nearest other training distances (M,))."""
    d_st = _rms_dist(samples, training).min(1)
    d_tt = _rms_dist(training, training)
    np.fill_diagonal(d_tt, np.inf)
    return d_st, d_tt.min(1)


def nearest_two(samples: np.ndarray, training: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(nearest, second-nearest) training distances (N,), (N,) of each sample; needs ≥ 2 training rows."""
    d = np.sort(_rms_dist(samples, training), axis=1)
    return d[:, 0], d[:, 1]


def site_audit_arrays(
    samples: Sequence[np.ndarray],
    sample_ids: Sequence[str],
    training: Sequence[np.ndarray],
    site: str = "site",
    quantile: float = 0.05,
    nearest_ratio: float = NEAREST_RATIO,
) -> dict[str, Any]:
    """The site-side audit on arrays: samples and training volumes (X, Y, Z) on the same grid.

    Returns the aggregate dict described in the module docstring (JSON-able).
    """
    if not 0.0 < nearest_ratio <= 1.0:
        raise ValueError(f"nearest_ratio must be in (0, 1], got {nearest_ratio}")
    if len(training) < 2:
        raise ValueError("the audit needs at least 2 training subjects at the site")
    if len(samples) != len(sample_ids):
        raise ValueError("one id per sample")
    es = np.stack([audit_embedding(s) for s in samples]) if len(samples) else np.zeros((0, 1))
    et = np.stack([audit_embedding(t) for t in training])
    d_t = nn_distances(et[:1], et)[1]
    d_s, d_s2 = nearest_two(es, et) if len(samples) else (np.zeros(0), np.zeros(0))
    thr = float(np.quantile(d_t, quantile))
    rel = d_s / thr if thr > 0 else np.full_like(d_s, np.inf)
    copy = (rel < 1.0) & (d_s < nearest_ratio * d_s2)
    counts, _ = np.histogram(rel, bins=np.asarray(HIST_EDGES))
    return {
        "site": site,
        "n_training": len(training),
        "n_samples": len(samples),
        "quantile": float(quantile),
        "threshold": thr,
        "nearest_ratio": float(nearest_ratio),
        "n_within_threshold": int((rel < 1.0).sum()),
        "min_distance": float(d_s.min()) if len(d_s) else None,
        "min_distance_over_threshold": float(rel.min()) if len(rel) else None,
        "histogram": {
            "edges_over_threshold": [e if np.isfinite(e) else None for e in HIST_EDGES],
            "counts": counts.astype(int).tolist(),
        },
        "flagged": [sid for sid, c in zip(sample_ids, copy, strict=True) if c],
    }


def _cohort_images(cohort: str | Path) -> tuple[list[np.ndarray], list[str]]:
    import nibabel as nib

    from fl_app.generate.cohort_folder import read_cohort_dir

    subs = read_cohort_dir(cohort)
    imgs = [
        np.asarray(nib.as_closest_canonical(nib.load(str(s["t1w"]))).dataobj, dtype=np.float32) for s in subs
    ]
    return imgs, [s["participant_id"] for s in subs]


def site_audit(
    cohort: str | Path,
    bids_dir: str | Path,
    profile: Any,
    quantile: float = 0.05,
    cache_dir: str | Path | None = None,
    site: str | None = None,
    site_cfg: Any = None,
    nearest_ratio: float = NEAREST_RATIO,
) -> dict[str, Any]:
    """Run at a site: the audit of the synthetic ``cohort`` against the site's BIDS training data,
    preprocessed to ``profile``'s grid exactly as for training. Returns only the aggregate dict."""
    from fl_app.data.cohort import read_bids
    from fl_app.data.dataset import SiteDataset

    imgs, ids = _cohort_images(cohort)
    grid = tuple(profile.data.shape)
    if imgs and tuple(imgs[0].shape) != grid:
        raise ValueError(f"cohort grid {imgs[0].shape} differs from the profile grid {grid}")
    # images only (sites without label maps can run it); a brain-extracting profile still reads the label
    # maps, so the site's volumes are exactly the training ones
    ds = SiteDataset(read_bids(bids_dir, site_cfg).valid(), profile, cache_dir, use_labels=False)
    training = [ds[i]["image"][0].numpy() for i in range(len(ds))]
    return site_audit_arrays(imgs, ids, training, site or Path(bids_dir).name, quantile, nearest_ratio)


def audit_cohort_locally(
    cohort: str | Path,
    bids_dirs: Sequence[str | Path],
    profile: Any,
    quantile: float = 0.05,
    cache_dir: str | Path | None = None,
) -> list[dict[str, Any]]:
    """:func:`site_audit` for each site folder in turn (simulations, or a researcher who is a site)."""
    return [site_audit(cohort, b, profile, quantile, cache_dir) for b in bids_dirs]


def combine_site_audits(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Coordinator side: ``{"n_samples", "sites", "flagged": {sample id: [sites]}, "n_flagged",
    "min_distance_over_threshold", "histogram_counts" (summed over sites)}``."""
    flagged: dict[str, list[str]] = {}
    for r in results:
        for sid in r["flagged"]:
            flagged.setdefault(sid, []).append(r["site"])
    mins = [
        r["min_distance_over_threshold"] for r in results if r.get("min_distance_over_threshold") is not None
    ]
    hist = np.sum([r["histogram"]["counts"] for r in results], axis=0).astype(int).tolist() if results else []
    return {
        "n_samples": max((r["n_samples"] for r in results), default=0),
        "sites": list(results),
        "flagged": flagged,
        "n_flagged": len(flagged),
        "min_distance_over_threshold": min(mins) if mins else None,
        "histogram_edges_over_threshold": list(results[0]["histogram"]["edges_over_threshold"])
        if results
        else [],
        "histogram_counts": hist,
    }


def load_site_audit(path: str | Path) -> dict[str, Any]:
    """Read a site's audit JSON (written by ``synthbrain audit-site``) and check its keys."""
    d = json.loads(Path(path).read_text())
    for k in ("site", "flagged", "threshold", "histogram", "n_samples"):
        if k not in d:
            raise ValueError(f"{path}: not a site audit result (missing {k!r})")
    return d


def gate_cohort(
    out: str | Path,
    profile: Any,
    site_audits: Sequence[dict[str, Any]],
    audit_against: Sequence[str | Path] | None,
    quantile: float = 0.05,
    no_gate: bool = False,
) -> int:
    """The release gate of a written cohort: combine the site audits (``site_audits``, each read with
    :func:`load_site_audit`, and/or this audit run here against ``audit_against`` BIDS sites), write ``code/synthbrain/audit.json`` and withhold
    the flagged subjects (:func:`~fl_app.generate.cohort_folder.gate_release`); with ``no_gate`` keep them
    and return 1. Returns 0 otherwise."""
    from fl_app.generate.cohort_folder import gate_release, write_json

    results = list(site_audits)
    if audit_against:
        results += audit_cohort_locally(out, audit_against, profile, quantile=quantile)
    summary = combine_site_audits(results)
    write_json(Path(out) / "code" / "synthbrain" / "audit.json", summary)
    flagged = summary["flagged"]
    if not flagged:
        print(f"memorisation audit: 0 of {summary['n_samples']} subjects flagged by {len(results)} site(s)")
        return 0
    if no_gate:
        print(f"WARNING: the memorisation audit flagged {len(flagged)} subjects (kept: --no-gate)")
        return 1
    reasons = {pid: f"audit: near copy of a training subject ({', '.join(s)})" for pid, s in flagged.items()}
    gone = gate_release(out, reasons)
    print(f"memorisation audit: withheld {len(gone)} flagged subjects: {', '.join(sorted(flagged))}")
    return 0


def _run_audit_site(args: argparse.Namespace) -> int:
    from fl_app.config import SiteConfig, load_site_config
    from fl_app.generate.cohort_folder import cohort_profile

    cfg = load_site_config(args.config) if args.config else SiteConfig()
    bids = args.bids or cfg.bids_dir
    if bids is None:
        print("error: give --bids DIR or a --config naming one", file=sys.stderr)
        return 2
    profile = cohort_profile(args.cohort, args.profile)
    site = args.site or (cfg.name if args.config else Path(bids).name)
    res = site_audit(
        args.cohort, bids, profile, args.quantile, args.cache_dir or cfg.cache_dir, site=site, site_cfg=cfg,
        nearest_ratio=args.nearest_ratio,
    )  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(
        f"{res['site']}: {res['n_samples']} samples vs {res['n_training']} training subjects; "
        f"closest at {res['min_distance_over_threshold']:.2f} x threshold ({res['n_within_threshold']} within it); "
        f"flagged as near copies {len(res['flagged'])}. "
        f"Send {args.out} (aggregates only) to the coordinator."
    )
    return 0


def add_audit_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``synthbrain audit-site`` (the site-local half of the memorisation audit)."""
    p = subparsers.add_parser(
        "audit-site",
        help="memorisation audit at a site: nearest-training distances of a synthetic cohort (aggregates only)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--cohort", required=True, help="synthetic cohort folder (synthbrain sample --out)")
    p.add_argument("--bids", help="the site's BIDS folder (default: the site config's)")
    p.add_argument("--config", help="site YAML")
    p.add_argument(
        "--profile", help="profile name or YAML (default: the cohort's code/synthbrain/profile.yaml)"
    )
    p.add_argument("--site", help="site name in the result (default: config name or folder name)")
    p.add_argument(
        "--quantile", type=float, default=0.05, help="threshold quantile of real-to-real NN distances"
    )
    p.add_argument(
        "--nearest-ratio",
        type=float,
        default=NEAREST_RATIO,
        help="a sample within the threshold is a near copy if d1 < RATIO x d2 (nearest / second-nearest "
        "training distance; default 2/3)",
    )
    p.add_argument("--cache-dir", help="preprocessing cache")
    p.add_argument("--out", required=True, help="result JSON to send back")
    p.set_defaults(func=_run_audit_site)
    return p
