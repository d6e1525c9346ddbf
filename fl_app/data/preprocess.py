"""One deterministic path from a NIfTI file to a model-ready array.

``preprocess_subject(image_path, label_path, data_cfg)``:

1. read (any dtype, endianness, singleton 4th axis; see :mod:`fl_app.data.nifti`);
2. reorient to closest RAS (exact axis permutation/flip);
3. find the head (robust foreground threshold) and its extent in world millimetres;
4. define the target grid: the profile's ``shape`` at the profile's ``spacing``, RAS, centred on
   the head left-right and anterior-posterior; superior-inferior it is centred too unless the
   scan extends further than the field of view (full-head scans with neck), in which case the
   grid is anchored a small margin above the top of the head, so the neck is what is cut;
5. resample once into that grid (trilinear for the image, with a Gaussian anti-alias filter when
   down-sampling; nearest neighbour for labels) - this is resampling and crop/pad in one step;
6. robust intensity normalisation: the image's low percentile (background) maps to 0 and the
   head's high percentile to 1, clipped to [0, 1].
7. optional brain extraction (``data.brain_mask: labels``): voxels outside the subject's own tissue
   label map (intracranial: CSF, GM, WM), dilated by ``brain_mask_dilate_mm``, are set to 0, as in the
   brain-extracted, template-space T1s the published UK Biobank model was trained on. A subject without
   a label map is then an error.

Returns float32 image (X, Y, Z) and uint8 labels (X, Y, Z) or None, plus the target affine.
:class:`PreprocessCache` stores results per site, keyed by file identity and the profile's data
section, so a cohort is preprocessed once.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from fl_app.config import DataSection
from fl_app.data.nifti import NiftiError, Problem, Volume, read_volume, to_canonical

PREPROCESS_VERSION = "2"
MAX_LABEL = 3


@dataclass
class Preprocessed:
    """A subject on the profile grid. image: float32 (X, Y, Z) in [0, 1]; label: uint8 (X, Y, Z) or None."""

    image: np.ndarray
    label: np.ndarray | None
    affine: np.ndarray


def head_mask(data: np.ndarray) -> np.ndarray:
    """Boolean foreground mask of a head image, robust to noise, offsets and negative values.

    The threshold sits a tenth of the way from the background level (2nd percentile) to the
    bright tissue level (98th percentile); small specks are removed by a binary opening.
    """
    lo, hi = np.percentile(data, [2.0, 98.0])
    if hi <= lo:
        hi = float(data.max())
    mask = data > lo + 0.1 * (hi - lo)
    if mask.sum() > 1000:
        opened = ndimage.binary_opening(mask, iterations=1)
        if opened.any():
            mask = opened
    return mask


def _head_extent_mm(vol: Volume, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World-space (RAS, mm) lower and upper bounds of the head, robust to stray voxels."""
    idx = np.argwhere(mask)
    if len(idx) == 0:
        idx = np.argwhere(np.ones_like(mask))
    if len(idx) > 200_000:
        idx = idx[:: len(idx) // 200_000 + 1]
    world = idx @ vol.affine[:3, :3].T + vol.affine[:3, 3]
    lo = np.percentile(world, 0.2, axis=0)
    hi = np.percentile(world, 99.8, axis=0)
    return lo, hi


def target_affine(vol: Volume, mask: np.ndarray, cfg: DataSection) -> np.ndarray:
    """RAS affine of the profile grid placed over the head (see module docstring, step 4)."""
    shape = np.asarray(cfg.shape, dtype=np.float64)
    spacing = np.asarray(cfg.spacing, dtype=np.float64)
    fov = shape * spacing
    lo, hi = _head_extent_mm(vol, mask)
    centre = (lo + hi) / 2.0
    extent = hi - lo
    if extent[2] > fov[2]:
        margin = 0.04 * fov[2]
        centre[2] = hi[2] + margin - fov[2] / 2.0
    aff = np.diag([*spacing, 1.0])
    aff[:3, 3] = centre - spacing * (shape - 1) / 2.0
    return aff


def _resample(
    data: np.ndarray,
    src_affine: np.ndarray,
    dst_affine: np.ndarray,
    shape: tuple[int, int, int],
    *,
    order: int,
    cval: float,
) -> np.ndarray:
    m = np.linalg.inv(src_affine) @ dst_affine
    return ndimage.affine_transform(
        data,
        m[:3, :3],
        offset=m[:3, 3],
        output_shape=shape,
        order=order,
        mode="constant",
        cval=cval,
        prefilter=False,
    )


def _anti_alias(vol: Volume, spacing: tuple[float, float, float]) -> np.ndarray:
    factors = np.asarray(spacing) / vol.zooms
    sigma = np.where(factors > 1.0, 0.42 * np.sqrt(np.maximum(factors**2 - 1.0, 0.0)), 0.0)
    if not np.any(sigma > 0.05):
        return vol.data
    return ndimage.gaussian_filter(vol.data, sigma=sigma, mode="nearest")


def check_geometry(vol: Volume, cfg: DataSection) -> list[Problem]:
    """Voxel-size and field-of-view checks against the profile (after reorientation to RAS)."""
    problems: list[Problem] = []
    zooms = vol.zooms
    lo, hi = cfg.voxel_size_range_mm
    if np.any(zooms < lo) or np.any(zooms > hi):
        problems.append(
            Problem(
                "voxel_size",
                f"implausible voxel size {np.round(zooms, 3).tolist()} mm (allowed {lo}-{hi} mm)",
                str(vol.path),
            )
        )
        return problems
    canon = to_canonical(vol)
    fov = np.asarray(canon.data.shape) * canon.zooms
    need = np.asarray(cfg.min_fov_mm)
    if np.any(fov < need):
        problems.append(
            Problem(
                "fov_too_small",
                f"field of view {np.round(fov, 1).tolist()} mm is smaller than the profile needs "
                f"({need.tolist()} mm, R-A-S)",
                str(vol.path),
            )
        )
    return problems


def check_label_volume(label: Volume, image: Volume) -> list[Problem]:
    """A tissue label map must share the image's grid and hold only 0..3."""
    problems: list[Problem] = []
    if label.data.shape != image.data.shape:
        problems.append(
            Problem(
                "label_mismatch",
                f"label map shape {label.data.shape} does not match image shape {image.data.shape}",
                str(label.path),
            )
        )
    elif not np.allclose(label.affine, image.affine, atol=1e-3, rtol=1e-4):
        shift = float(np.abs(label.affine - image.affine).max())
        problems.append(
            Problem(
                "label_mismatch",
                f"label map affine differs from the image's (max difference {shift:.3g})",
                str(label.path),
            )
        )
    vals = label.data
    if not np.all(np.isfinite(vals)):
        problems.append(Problem("label_values", "label map has NaN/Inf voxels", str(label.path)))
    else:
        bad = (vals != np.round(vals)) | (vals < 0) | (vals > MAX_LABEL)
        if bad.any():
            uniq = np.unique(vals[bad])[:5]
            problems.append(
                Problem(
                    "label_values",
                    f"label map holds values outside 0-{MAX_LABEL} (e.g. {uniq.tolist()}); "
                    "expected 0 background, 1 CSF, 2 GM, 3 WM",
                    str(label.path),
                )
            )
    return problems


def brain_mask(label: np.ndarray, spacing: tuple[float, float, float], dilate_mm: float) -> np.ndarray:
    """Intracranial mask (label > 0) grown by ``dilate_mm`` (Euclidean, in mm): bool (X, Y, Z)."""
    ic = np.asarray(label) > 0
    if dilate_mm <= 0 or not ic.any():
        return ic
    dist = ndimage.distance_transform_edt(~ic, sampling=tuple(float(s) for s in spacing))
    return dist <= dilate_mm


def preprocess_volumes(image: Volume, label: Volume | None, cfg: DataSection) -> Preprocessed:
    """Preprocess already-read volumes (steps 2-6); raises NiftiError on unusable geometry."""
    for p in check_geometry(image, cfg):
        raise NiftiError(p)
    if label is not None:
        for p in check_label_volume(label, image):
            raise NiftiError(p)
    elif cfg.brain_mask == "labels":
        raise NiftiError(
            Problem(
                "label_missing",
                "the profile brain-extracts with the tissue label map (data.brain_mask: labels), "
                "but this subject has none",
                str(image.path),
            )
        )
    canon = to_canonical(image)
    mask = head_mask(canon.data)
    dst = target_affine(canon, mask, cfg)
    lo = float(np.percentile(canon.data, cfg.lower_percentile))
    head_vals = canon.data[mask] if mask.any() else canon.data.ravel()
    hi = float(np.percentile(head_vals, cfg.upper_percentile))
    if hi <= lo:
        hi = lo + 1.0
    src = _anti_alias(canon, cfg.spacing) if cfg.anti_alias else canon.data
    out = _resample(src, canon.affine, dst, cfg.shape, order=1, cval=lo)
    out = np.clip((out - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    lab_out = None
    if label is not None:
        lab_canon = to_canonical(label)
        lab_out = _resample(
            np.rint(lab_canon.data).astype(np.float32), lab_canon.affine, dst, cfg.shape, order=0, cval=0.0
        )
        lab_out = np.clip(np.rint(lab_out), 0, MAX_LABEL).astype(np.uint8)
        if cfg.brain_mask == "labels":
            out = out * brain_mask(lab_out, cfg.spacing, cfg.brain_mask_dilate_mm)
    return Preprocessed(image=out, label=lab_out, affine=dst)


def preprocess_subject(
    image_path: str | Path, label_path: str | Path | None, cfg: DataSection
) -> Preprocessed:
    """Read and preprocess one subject's T1w (and optional tissue label map) to the profile grid."""
    image = read_volume(image_path)
    label = read_volume(label_path, check_values=False) if label_path is not None else None
    return preprocess_volumes(image, label, cfg)


def _file_key(path: Path | None) -> list[object]:
    if path is None:
        return [None]
    st = os.stat(path)
    return [str(Path(path).resolve()), st.st_size, st.st_mtime_ns]


class PreprocessCache:
    """Per-site on-disk cache of preprocessed subjects (``.npz``), keyed by file identity + profile grid.

    The key covers each file's resolved path, size and modification time, the profile's data
    section and the preprocessing version; a changed file or profile misses the cache. Entries
    are written atomically. The cache lives outside the site's data folder, which is never written.
    """

    def __init__(self, cache_dir: str | Path, cfg: DataSection):
        self.dir = Path(cache_dir)
        self.cfg = cfg
        self._cfg_json = json.dumps(cfg.model_dump(mode="json"), sort_keys=True)

    def key(self, image_path: Path, label_path: Path | None) -> str:
        blob = json.dumps(
            [PREPROCESS_VERSION, self._cfg_json, _file_key(image_path), _file_key(label_path)], default=str
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def get(self, image_path: str | Path, label_path: str | Path | None) -> Preprocessed:
        image_path = Path(image_path)
        label_path = Path(label_path) if label_path is not None else None
        entry = self.dir / f"{self.key(image_path, label_path)}.npz"
        if entry.exists():
            try:
                with np.load(entry) as z:
                    label = z["label"] if "label" in z.files else None
                    return Preprocessed(image=z["image"], label=label, affine=z["affine"])
            except (OSError, ValueError, KeyError, EOFError):
                entry.unlink(missing_ok=True)  # a torn cache entry is recomputed, never trusted
        result = preprocess_subject(image_path, label_path, self.cfg)
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_suffix(f".tmp{os.getpid()}.npz")
        arrays = {"image": result.image, "affine": result.affine}
        if result.label is not None:
            arrays["label"] = result.label
        np.savez(tmp, **arrays)
        os.replace(tmp, entry)
        return result
