"""Site-side anatomy stage: brain mask and CSF / GM / WM labels for T1w scans that come without a label map.

For every subject whose site provides no tissue label map, :func:`derive_anatomy` runs, on the site,
on CPU:

1. **brain extraction** with deepbet (MIT licence; a trained network whose TorchScript weights ship
   inside its wheel, nothing is downloaded), run on the scan in closest-RAS orientation at the
   network's own 256³ input grid, largest component kept and holes filled;
2. **bias correction**: N4 (SimpleITK, Apache-2.0) inside the brain mask, fitted on a grid of about
   6 mm (shrunk) and applied to the scan at full resolution;
3. **3-class tissue segmentation** (partial-volume aware): the CSF, GM and WM intensities of the
   bias-corrected brain are estimated twice, as the means of a 3-class Gaussian mixture (scikit-learn;
   pulled towards the neighbouring classes by partial-volume voxels) and as the medians of each class's
   spatial core (pulled away from them), and averaged; a voxel goes to the tissue on whose side of the
   mid-point between two tissue intensities it lies (the tissue that fills most of a mixed voxel), with
   soft memberships smoothed over ~1 mm against noise (CSF < GM < WM as in every T1w).

The result is a label map on the scan's own voxel grid and affine (0 background, 1 CSF, 2 GM, 3 WM), so
the rest of synthbrain reads it exactly as a provided ``dseg`` map and any viewer overlays it on the scan.

:class:`AnatomyCache` stores it under ``<cache_dir>/anatomy/`` (never in the data folder), keyed by the
SHA-256 of the scan's bytes and :data:`ANATOMY_VERSION`: a changed scan is derived again; a provided label
map always takes precedence (:func:`attach_derived_labels` only touches subjects without one).

:func:`plausibility_problems` turns an implausible result into named :class:`~fl_app.data.nifti.Problem` s
(brain volume out of range, mask not centred in the head, mask touching the field-of-view edge, tissue
fractions out of range, an image that is blank after bias correction); such a subject fails with the file
and the reason and is not used.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from fl_app.data.nifti import (
    NiftiError,
    Problem,
    Volume,
    file_sha256,
    read_volume,
    save_nifti,
    to_canonical,
)

ANATOMY_VERSION = "2"

BRAIN_VOLUME_ML = (700.0, 2400.0)
"""Plausible intracranial (brain-mask) volume of an adult, in ml."""
FRACTION_RANGE = {"CSF": (0.03, 0.60), "GM": (0.20, 0.65), "WM": (0.15, 0.60)}
"""Plausible fraction of the brain mask per tissue class."""
MAX_OFF_CENTRE = 0.20
"""Largest distance of the brain centre from the head centre, as a fraction of the head's extent (L-R, A-P)."""

TISSUES = ("CSF", "GM", "WM")
BET_SHAPE = int(os.environ.get("SYNTHBRAIN_BET_SHAPE", "256"))
"""Input grid (voxels per side) of deepbet's main network over the head's bounding box (its default: 256)."""


@dataclass
class Anatomy:
    """A derived brain mask and tissue labels on the scan's voxel grid."""

    label: np.ndarray  # uint8 (I, J, K), file voxel order; 0 bg, 1 CSF, 2 GM, 3 WM
    affine: np.ndarray
    brain_ml: float
    fractions: dict[str, float]
    seconds: dict[str, float] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# The steps
# --------------------------------------------------------------------------------------------------

_BET_LOCK = threading.Lock()
_BET: Any = None


def _brain_extractor() -> Any:
    """deepbet's network (loaded once per process, on CPU)."""
    global _BET
    with _BET_LOCK:
        if _BET is None:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from deepbet.bet import BrainExtraction

                _BET = BrainExtraction(no_gpu=True)
        return _BET


def brain_extract(data_ras: np.ndarray) -> np.ndarray:
    """Boolean brain mask of a closest-RAS T1w array (deepbet, CPU)."""
    import torch

    bet = _brain_extractor()
    with torch.inference_mode():
        prob = bet.run_model(np.ascontiguousarray(data_ras, dtype=np.float32), shape=(BET_SHAPE,) * 3)
    mask = prob > 0.5
    if not mask.any():
        return mask
    return np.asarray(bet.postprocess(mask), dtype=bool)


def bias_correct(data: np.ndarray, mask: np.ndarray, zooms: np.ndarray, *, fit_mm: float = 6.0) -> np.ndarray:
    """N4 bias correction (SimpleITK) fitted inside ``mask`` on a ~``fit_mm`` grid; returns the corrected array."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.transpose(data, (2, 1, 0)).astype(np.float32))
    img.SetSpacing([float(z) for z in zooms])
    msk = sitk.GetImageFromArray(np.transpose(mask, (2, 1, 0)).astype(np.uint8))
    msk.CopyInformation(img)
    shrink = [max(1, round(fit_mm / float(z))) for z in zooms]
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations([40, 30, 20])
    n4.Execute(sitk.Shrink(img, shrink), sitk.Shrink(msk, shrink))
    log_bias = np.transpose(sitk.GetArrayFromImage(n4.GetLogBiasFieldAsImage(img)), (2, 1, 0))
    return (data / np.exp(log_bias)).astype(np.float32)


def _class_intensities(data: np.ndarray, mask: np.ndarray, seed: int) -> np.ndarray:
    """CSF, GM and WM intensities (ascending) of a bias-corrected brain.

    Two estimates with opposite partial-volume biases, averaged: the means of a 3-class Gaussian mixture
    (each pulled towards its neighbouring classes by partial-volume voxels) and the medians of each
    class's spatial core (voxels of the class whose neighbours are of the same class, away from the
    mask's edge; pulled away from the neighbouring classes because the core is cut at the boundaries).
    The cores are refined a few times with the mid-point boundaries they imply.
    """
    from sklearn.mixture import GaussianMixture

    vals = data[mask].astype(np.float64)
    sample = vals[:: max(1, vals.size // 150_000)]
    init = np.percentile(sample, [8.0, 50.0, 85.0])[:, None]
    gmm = GaussianMixture(3, covariance_type="full", random_state=seed, means_init=init, max_iter=200)
    gmm.fit(sample[:, None])
    mix = np.sort(gmm.means_.ravel())
    inner = ndimage.binary_erosion(mask)
    core = mix.copy()
    for _ in range(4):
        lab = _threshold_labels(data, mask, core)
        new = core.copy()
        for k in range(3):
            region = lab == k + 1
            sel = ndimage.binary_erosion(region) & inner
            sel = sel if sel.sum() >= 200 else region
            if sel.sum() >= 50:
                new[k] = float(np.median(data[sel]))
        core = new
    return np.sort(0.5 * (mix + core))


def _threshold_labels(data: np.ndarray, mask: np.ndarray, mu: np.ndarray) -> np.ndarray:
    """1 CSF / 2 GM / 3 WM by the mid-points between the class intensities ``mu`` (0 outside ``mask``)."""
    t1, t2 = 0.5 * (mu[0] + mu[1]), 0.5 * (mu[1] + mu[2])
    lab = np.zeros(data.shape, np.uint8)
    x = data[mask]
    lab[mask] = 1 + (x >= t1).astype(np.uint8) + (x >= t2).astype(np.uint8)
    return lab


def tissue_segment(data: np.ndarray, mask: np.ndarray, zooms: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """3-class segmentation of the bias-corrected brain (1 CSF, 2 GM, 3 WM; 0 outside ``mask``).

    A voxel mixing two tissues belongs to the one that fills most of it, i.e. its intensity lies on that
    tissue's side of the mid-point between the two tissue intensities (:func:`_class_intensities`).
    Soft memberships around those mid-points (width 5 % of the CSF-WM range) are smoothed over ~1 mm
    against noise, then the largest is taken.
    """
    from scipy.special import expit

    out = np.zeros(data.shape, np.uint8)
    if not mask.any():
        return out
    # work on the mask's bounding box (1 voxel margin): same result, less to filter
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(axis=0) - 2, 0)
    hi = np.minimum(idx.max(axis=0) + 3, data.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    d, m = data[box], mask[box]
    mu = _class_intensities(d, m, seed)
    t1, t2 = 0.5 * (mu[0] + mu[1]), 0.5 * (mu[1] + mu[2])
    tau = 0.05 * max(float(mu[2] - mu[0]), 1e-12)
    x = d[m].astype(np.float64)
    p_csf = 1.0 - expit((x - t1) / tau)
    p_wm = expit((x - t2) / tau)
    post = np.zeros((*d.shape, 3), dtype=np.float32)
    post[m] = np.stack([p_csf, np.clip(1.0 - p_csf - p_wm, 0.0, 1.0), p_wm], axis=-1)
    sigma = 1.0 / np.asarray(zooms, dtype=np.float64)  # ~1 mm smoothing of the memberships
    for k in range(3):
        post[..., k] = ndimage.gaussian_filter(post[..., k], sigma)
    label = (post.argmax(axis=-1) + 1).astype(np.uint8)
    label[~m] = 0
    out[box] = label
    return out


def tissue_fractions(label: np.ndarray) -> dict[str, float]:
    n = max(int((label > 0).sum()), 1)
    return {t: float((label == k).sum()) / n for k, t in enumerate(TISSUES, start=1)}


def plausibility_problems(
    canon: Volume, mask: np.ndarray, label: np.ndarray, path: str, head: np.ndarray | None = None
) -> list[Problem]:
    """Named problems of an implausible brain mask or tissue segmentation (arrays in closest RAS)."""
    from fl_app.data.preprocess import head_mask

    problems: list[Problem] = []
    voxel_ml = float(np.prod(canon.zooms)) / 1000.0
    brain_ml = float(mask.sum()) * voxel_ml
    lo, hi = BRAIN_VOLUME_ML
    if not lo <= brain_ml <= hi:
        problems.append(
            Problem(
                "brain_mask_volume",
                f"derived brain mask is {brain_ml:.0f} ml, outside the plausible {lo:.0f}-{hi:.0f} ml "
                "(is the head cut off or the scan not a T1w of a head?)",
                path,
            )
        )
    if mask.any():
        edge = np.zeros_like(mask)
        for ax in range(3):
            sl = [slice(None)] * 3
            for end in (0, -1):
                sl[ax] = end  # type: ignore[call-overload]
                edge[tuple(sl)] = True
        n_edge = int((mask & edge).sum())
        if n_edge > 0:
            problems.append(
                Problem(
                    "brain_mask_fov_edge",
                    f"derived brain mask touches the field-of-view edge ({n_edge} voxels): the head is cut off",
                    path,
                )
            )
        head = head_mask(canon.data) if head is None else head
        if head.any():
            hidx = np.argwhere(head)
            h_lo, h_hi = hidx.min(axis=0), hidx.max(axis=0)
            b_c = np.argwhere(mask).mean(axis=0)
            h_c = (h_lo + h_hi) / 2.0
            ext = np.maximum(h_hi - h_lo, 1)
            off = np.abs(b_c - h_c)[:2] / ext[:2]
            if np.any(off > MAX_OFF_CENTRE):
                problems.append(
                    Problem(
                        "brain_mask_off_centre",
                        f"derived brain mask is not centred in the head (off by {np.round(off * 100, 0).tolist()} % "
                        "of the head's left-right / anterior-posterior extent)",
                        path,
                    )
                )
    fr = tissue_fractions(label)
    bad = [
        f"{t} {fr[t]:.2f} (plausible {a:.2f}-{b:.2f})"
        for t, (a, b) in FRACTION_RANGE.items()
        if not a <= fr[t] <= b
    ]
    if bad and (label > 0).any():
        problems.append(Problem("tissue_fractions", "implausible tissue fractions: " + ", ".join(bad), path))
    return problems


def derive_anatomy(image: Volume) -> Anatomy:
    """Run the anatomy stage on a read T1w volume (any orientation / dtype); label on the file's grid."""
    canon = to_canonical(image)
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    mask = brain_extract(canon.data)
    seconds["brain_extraction"] = time.perf_counter() - t
    problems: list[Problem] = []
    path = str(image.path)
    label = np.zeros(canon.data.shape, dtype=np.uint8)
    if mask.sum() < 100:
        problems.append(Problem("brain_mask_empty", "brain extraction found no brain in this image", path))
    else:
        t = time.perf_counter()
        corrected = bias_correct(canon.data, mask, canon.zooms)
        seconds["bias_correction"] = time.perf_counter() - t
        inside = corrected[mask]
        if not np.all(np.isfinite(inside)) or float(np.ptp(inside)) <= 1e-6 * max(
            float(np.abs(inside).max()), 1e-12
        ):
            problems.append(
                Problem(
                    "blank_after_bias_correction",
                    "the image is blank (constant) inside the brain after bias correction",
                    path,
                )
            )
        else:
            t = time.perf_counter()
            label = tissue_segment(corrected, mask, canon.zooms)
            seconds["tissue_segmentation"] = time.perf_counter() - t
        problems.extend(plausibility_problems(canon, mask, label, path))
    # back to the file's voxel order (exact inverse of to_canonical)
    ornt = nib.orientations.io_orientation(image.affine)
    back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(("R", "A", "S")), ornt)
    label_file = np.ascontiguousarray(nib.orientations.apply_orientation(label, back)).astype(np.uint8)
    assert label_file.shape == image.data.shape
    return Anatomy(
        label=label_file,
        affine=image.affine,
        brain_ml=float(mask.sum()) * float(np.prod(canon.zooms)) / 1000.0,
        fractions=tissue_fractions(label),
        seconds=seconds,
        problems=problems,
    )


# --------------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------------


@dataclass
class DerivedLabels:
    """A cached anatomy result: ``label`` is the NIfTI in the cache (None when the subject failed)."""

    label: Path | None
    brain_ml: float
    fractions: dict[str, float]
    problems: list[Problem]
    seconds: dict[str, float]
    cached: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": str(self.label) if self.label else None,
            "brain_ml": round(self.brain_ml, 1),
            "fractions": {k: round(v, 4) for k, v in self.fractions.items()},
            "problems": [p.to_dict() for p in self.problems],
            "seconds": {k: round(v, 2) for k, v in self.seconds.items()},
        }


class AnatomyCache:
    """Derived label maps of one site under ``<cache_dir>/anatomy``, keyed by the scan's content hash.

    ``<key>_dseg.nii.gz`` (scan grid and affine) and ``<key>.json`` (volume, fractions, problems, timings).
    A changed scan has another hash and is derived again; nothing is ever written into the data folder.
    """

    def __init__(self, cache_dir: str | Path):
        self.dir = Path(cache_dir) / "anatomy"
        self._hashes: dict[tuple[str, int, int], str] = {}

    def key(self, image_path: str | Path) -> str:
        p = Path(image_path)
        st = os.stat(p)
        ident = (str(p.resolve()), st.st_size, st.st_mtime_ns)
        if ident not in self._hashes:
            self._hashes[ident] = file_sha256(p)
        return hashlib.sha256(f"{ANATOMY_VERSION}:{self._hashes[ident]}".encode()).hexdigest()[:32]

    def paths(self, image_path: str | Path) -> tuple[Path, Path]:
        k = self.key(image_path)
        return self.dir / f"{k}_dseg.nii.gz", self.dir / f"{k}.json"

    def get(self, image_path: str | Path, image: Volume | None = None) -> DerivedLabels:
        """The cached result for this scan, derived now if missing. Raises NiftiError if the scan is unreadable."""
        nii, meta = self.paths(image_path)
        if meta.exists():
            try:
                d = json.loads(meta.read_text())
                label = Path(d["label"]) if d.get("label") else None
                if label is None or label.exists():
                    return DerivedLabels(
                        label=nii if label is not None else None,
                        brain_ml=float(d["brain_ml"]),
                        fractions={k: float(v) for k, v in d["fractions"].items()},
                        # the same bytes may sit at another path now: name the file asked about
                        problems=[Problem(p["code"], p["message"], str(image_path)) for p in d["problems"]],
                        seconds={k: float(v) for k, v in d.get("seconds", {}).items()},
                        cached=True,
                    )
            except (OSError, ValueError, KeyError, TypeError):
                pass  # a torn entry is recomputed
        if image is None:
            image = read_volume(image_path)
        t = time.perf_counter()
        anat = derive_anatomy(image)
        anat.seconds["total"] = time.perf_counter() - t
        # problems name the file the site gave, not a cache path
        problems = [Problem(p.code, p.message, str(image_path)) for p in anat.problems]
        self.dir.mkdir(parents=True, exist_ok=True)
        label_path: Path | None = None
        if not problems:
            save_nifti(nii, anat.label, anat.affine)
            label_path = nii
        out = DerivedLabels(label_path, anat.brain_ml, anat.fractions, problems, anat.seconds)
        tmp = meta.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(out.to_dict() | {"image": str(image_path)}, indent=1))
        os.replace(tmp, meta)
        return out


def attach_derived_labels(subjects: list[Any], cache_dir: str | Path, *, progress: bool = False) -> list[Any]:
    """Give every valid subject without a label map its derived one (in place; returns ``subjects``).

    Subjects with a provided label map are left alone (provided labels always win) and get
    ``label_source = "provided"``; derived ones get ``label_source = "derived"``, ``label`` = the NIfTI in
    the cache, and ``anatomy`` = the cached facts. A subject whose derivation is implausible gets the
    named problems instead (it then fails ``site check`` and is not used).
    """
    from tqdm import tqdm

    cache = AnatomyCache(cache_dir)
    for s in tqdm(subjects, desc="anatomy", unit="subject", disable=not progress):
        if s.label is not None:
            if getattr(s, "label_source", None) is None:
                s.label_source = "provided"
            continue
        if s.image is None or s.problems:
            continue
        try:
            d = cache.get(s.image)
        except NiftiError as exc:
            s.problems.append(exc.problem)
            continue
        s.anatomy = d.to_dict()
        if d.problems:
            s.problems.extend(d.problems)
        else:
            s.label = d.label
            s.label_source = "derived"
    return subjects
