"""Hand-crafted morphometric and intensity features of a brain volume, computable offline.

Every function takes one subject on the profile grid: ``image`` float (X, Y, Z) in about [0, 1]
and ``label`` int (X, Y, Z) with 0 background, 1 CSF, 2 GM, 3 WM; ``voxel_mm`` the voxel size.

Two independent measurements of the conditioned quantities:

* from the **label map** (:func:`label_measures`): brain tissue fraction BTF = (GM + WM) / (CSF + GM
  + WM), CSF and "deep CSF" (ventricle proxy: CSF more than :data:`DEEP_CSF_MM` mm inside the
  intracranial surface) volumes, intracranial volume;
* from the **image intensities** (:func:`intensity_measures`): inside the intracranial region, the
  voxels are split into CSF / GM / WM by 1-D k-means on intensity (three clusters, initialised at the
  10th/50th/90th percentiles; T1w: CSF darkest), which gives BTF and CSF volume without using the
  label classes. (The intracranial region itself comes from the label map: the decoded images keep
  the skull and scalp, and a robust intensity-only skull strip is out of scope here.)

:func:`feature_vector` stacks both with tissue intensity statistics and an intensity histogram into
the fixed feature space (:data:`FEATURE_NAMES`) used for the distribution distance.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage as ndi

__all__ = [
    "DEEP_CSF_MM",
    "FEATURE_NAMES",
    "feature_vector",
    "intensity_measures",
    "kmeans_1d",
    "label_measures",
]

DEEP_CSF_MM = 20.0
"""CSF deeper than this (mm) below the intracranial surface counts as ventricular (a proxy)."""

_HIST_BINS = 8


def _voxel_ml(voxel_mm: Sequence[float]) -> float:
    return float(np.prod(voxel_mm)) / 1000.0


def label_measures(label: np.ndarray, voxel_mm: Sequence[float]) -> dict[str, float]:
    """BTF, CSF / deep-CSF / GM / WM / intracranial volumes (ml) from a tissue label map (X, Y, Z)."""
    lab = np.asarray(label)
    ic = lab > 0
    n_ic = int(ic.sum())
    vml = _voxel_ml(voxel_mm)
    if n_ic == 0:
        nan = float("nan")
        return dict.fromkeys(
            ("btf", "csf_ml", "deep_csf_ml", "gm_ml", "wm_ml", "icv_ml", "csf_fraction"), nan
        ) | {"icv_ml": 0.0}
    depth = ndi.distance_transform_edt(ic, sampling=tuple(float(v) for v in voxel_mm))
    csf = lab == 1
    n_t = int((lab >= 2).sum())
    return {
        "btf": n_t / n_ic,
        "csf_fraction": 1.0 - n_t / n_ic,
        "csf_ml": float(csf.sum()) * vml,
        "deep_csf_ml": float((csf & (depth > DEEP_CSF_MM)).sum()) * vml,
        "gm_ml": float((lab == 2).sum()) * vml,
        "wm_ml": float((lab == 3).sum()) * vml,
        "icv_ml": n_ic * vml,
    }


def kmeans_1d(values: np.ndarray, k: int = 3, iters: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """1-D k-means: values (N,) -> (sorted centres (k,), assignment (N,) into the sorted centres)."""
    v = np.asarray(values, dtype=np.float64)
    centres = np.percentile(v, np.linspace(10, 90, k))
    assign = np.zeros(v.shape, dtype=np.int64)
    for _ in range(iters):
        assign = np.abs(v[:, None] - centres[None, :]).argmin(1)
        new = np.array([v[assign == j].mean() if np.any(assign == j) else centres[j] for j in range(k)])
        if np.allclose(new, centres):
            break
        centres = new
    order = np.argsort(centres)
    remap = np.empty(k, dtype=np.int64)
    remap[order] = np.arange(k)
    return centres[order], remap[assign]


def intensity_measures(image: np.ndarray, label: np.ndarray, voxel_mm: Sequence[float]) -> dict[str, float]:
    """BTF and CSF volume from intensities: k-means (CSF < GM < WM) inside the intracranial region."""
    ic = np.asarray(label) > 0
    vals = np.asarray(image, dtype=np.float64)[ic]
    if vals.size < 10:
        return {"btf_intensity": float("nan"), "csf_ml_intensity": float("nan")}
    _, cls = kmeans_1d(vals, 3)
    n_csf = int((cls == 0).sum())
    return {
        "btf_intensity": 1.0 - n_csf / vals.size,
        "csf_ml_intensity": n_csf * _voxel_ml(voxel_mm),
    }


FEATURE_NAMES: tuple[str, ...] = (
    "btf",
    "csf_fraction",
    "gm_fraction",
    "wm_fraction",
    "icv_ml",
    "deep_csf_ml",
    "btf_intensity",
    "csf_mean",
    "gm_mean",
    "wm_mean",
    "csf_sd",
    "gm_sd",
    "wm_sd",
    "head_fraction",
    *(f"ic_hist_{i}" for i in range(_HIST_BINS)),
)


def feature_vector(image: np.ndarray, label: np.ndarray, voxel_mm: Sequence[float]) -> np.ndarray:
    """The :data:`FEATURE_NAMES` vector (F,) float64 of one subject."""
    img = np.asarray(image, dtype=np.float64)
    lab = np.asarray(label)
    m = label_measures(lab, voxel_mm)
    im = intensity_measures(img, lab, voxel_mm)
    icv = max(m["icv_ml"], 1e-9)
    ic = lab > 0
    stats = []
    for c in (1, 2, 3):
        v = img[lab == c]
        stats.append((float(v.mean()) if v.size else 0.0, float(v.std()) if v.size else 0.0))
    hist = np.histogram(np.clip(img[ic], 0, 1), bins=_HIST_BINS, range=(0.0, 1.0))[0].astype(np.float64)
    hist /= max(hist.sum(), 1.0)
    return np.array(
        [
            m["btf"],
            m["csf_fraction"],
            m["gm_ml"] / icv,
            m["wm_ml"] / icv,
            m["icv_ml"],
            m["deep_csf_ml"],
            im["btf_intensity"],
            stats[0][0],
            stats[1][0],
            stats[2][0],
            stats[0][1],
            stats[1][1],
            stats[2][1],
            float((img > 0.1).mean()),
            *hist,
        ],
        dtype=np.float64,
    )
