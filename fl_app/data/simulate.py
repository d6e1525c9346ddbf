"""Simulated hospital sites: realistic multi-site BIDS cohorts built from the MNI152 template.

Every subject is made from the real brain template that nilearn ships offline (ICBM152 2009: T1w,
grey- and white-matter probability maps and brain mask). The template is skull-stripped, so the
simulator adds non-brain head tissue (dark skull with a brighter diploë, a galea/fat/skin scalp and,
in the inferior field of view, a neck with a vertebral column) around the intracranial volume, so
that the images look like full-head T1w scans and exercise head-centred cropping.

Per subject (all smooth, deterministic given the seed):

* **head size** from the intracranial volume drawn around the law's sex-specific mean
  (men ~11 % larger), applied as an isotropic scale;
* **pose**: a small random rotation (a few degrees) and translation in the scanner;
* **shape**: a low-frequency random displacement field of a few mm (cosine basis);
* **atrophy**: tissue at the CSF interfaces (cortical surface and, faster, around the ventricles,
  with an extra medial-temporal focus in MCI/AD) is turned into CSF until the brain tissue fraction
  measured on the written label map equals the subject's target drawn from :func:`generating_law`
  (sulci widen, the cortex thins and the ventricles grow);
* **T1 contrast** from tissue probabilities (partial volume): WM > GM > CSF, then a smooth
  multiplicative bias field and Rician noise.

Per site (:func:`site_spec`; presets cycled and jittered for any number of sites): orientation
(RAS, FreeSurfer-like LIA, LPS, LAS), voxel size (near-isotropic or 2 x 2 x 3 mm-like anisotropic
at the cpu-demo scale), data type (int16, uint8, float32), bias strength, noise level, GM/WM
contrast, inferior field of view (neck) and the demographic mix (age distribution, sex ratio,
CN/MCI/AD proportions, AD more likely at older age).

Each site is written as a BIDS 1.9.0 raw dataset with label maps in ``derivatives/labels``; see
:func:`simulate_sites`. Labels: 0 background, 1 CSF, 2 GM, 3 WM.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi
from scipy.special import expit

from fl_app import __version__
from fl_app.config import TISSUE_LABELS, Profile, load_profile
from fl_app.data.covariates import DIAGNOSES, SEXES
from fl_app.data.nifti import save_nifti

AGE_RANGE: tuple[float, float] = (45.0, 90.0)
"""Ages of simulated subjects, in years."""

# ---------------------------------------------------------------------------------------------
# The generating law
# ---------------------------------------------------------------------------------------------

_BTF_AT_45 = 0.845
_BTF_RATE = {"CN": 0.0022, "MCI": 0.0030, "AD": 0.0040}  # per year after 45
_BTF_OFFSET = {"CN": 0.0, "MCI": -0.008, "AD": -0.020}
_BTF_CURVATURE = 0.00002  # per year squared after 45
_ICV_ML = {"F": 1330.0, "M": 1480.0}
BTF_INDIVIDUAL_SD = 0.010
"""Standard deviation of a subject's brain tissue fraction around the law."""
ICV_INDIVIDUAL_CV = 0.06
"""Coefficient of variation of a subject's intracranial volume around the law."""


def generating_law(age: float, sex: str, diagnosis: str) -> dict[str, float]:
    """Expected brain measures of a simulated subject (the law every simulated site is drawn from).

    With ``a = max(age - 45, 0)`` in years, ``sex`` in ``SEXES`` and ``diagnosis`` in ``DIAGNOSES``::

        brain_tissue_fraction = 0.845 - r[dx] * a - 0.00002 * a**2 + o[dx]
            r = {CN: 0.0022, MCI: 0.0030, AD: 0.0040} per year,  o = {CN: 0, MCI: -0.008, AD: -0.020}
        csf_fraction          = 1 - brain_tissue_fraction
        intracranial_volume_ml = {F: 1330, M: 1480}[sex]            (men ~11 % larger, no age effect)
        head_volume_scale     = intracranial_volume_ml / 1405        (relative to the sex-average head)
        head_scale            = head_volume_scale ** (1/3)           (linear)

    ``brain_tissue_fraction`` is BTF = (GM + WM) / (GM + WM + CSF) counted on the label map over the
    intracranial volume (labels 1..3); ``intracranial_volume_ml`` is that same count times the
    voxel volume. The simulator draws each subject's BTF as ``law + N(0, 0.010)`` and its ICV as
    ``law * (1 + N(0, 0.06))``, then erodes the template until the written label map has exactly
    that BTF (to within a voxel's worth), so measured values track the law. Atrophy thus grows with
    age and is faster in MCI and fastest in AD.
    """
    if sex not in SEXES:
        raise ValueError(f"sex must be one of {SEXES}, got {sex!r}")
    if diagnosis not in DIAGNOSES:
        raise ValueError(f"diagnosis must be one of {DIAGNOSES}, got {diagnosis!r}")
    a = max(float(age) - 45.0, 0.0)
    btf = _BTF_AT_45 - _BTF_RATE[diagnosis] * a - _BTF_CURVATURE * a * a + _BTF_OFFSET[diagnosis]
    icv = _ICV_ML[sex]
    vol_scale = icv / (0.5 * (_ICV_ML["F"] + _ICV_ML["M"]))
    return {
        "brain_tissue_fraction": btf,
        "csf_fraction": 1.0 - btf,
        "intracranial_volume_ml": icv,
        "head_volume_scale": vol_scale,
        "head_scale": vol_scale ** (1.0 / 3.0),
    }


# ---------------------------------------------------------------------------------------------
# Site settings
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SiteSpec:
    """Scanner and demographic settings of one simulated site (deterministic given seed and index)."""

    name: str
    orientation: str  # three axis codes, e.g. "RAS", "LIA"
    voxel_mm: tuple[float, float, float]  # per voxel axis, in written order
    dtype: str  # numpy dtype name of the T1w file
    intensity_scale: float  # stored value of white matter
    bias_strength: float  # std of the log bias field
    noise_sigma: float  # Rician noise std, relative to WM = 1
    wm_level: float
    gm_level: float
    csf_level: float
    fov_mm: tuple[float, float, float]  # (x, y, z) extent in RAS world axes
    neck_mm: float  # extra inferior field of view
    age_mean: float
    age_sd: float
    p_male: float
    mci_logit: float  # log-odds MCI vs CN at age 70
    ad_logit: float  # log-odds AD vs CN at age 70
    manufacturer: str
    field_strength: float


_PRESETS: tuple[dict[str, Any], ...] = (
    # A 3T research scanner: near-isotropic int16, moderate bias, older memory-clinic cohort.
    dict(
        orientation="RAS",
        voxel_factor=(0.85, 0.85, 0.85),
        dtype="int16",
        intensity_scale=1000.0,
        bias_strength=0.12,
        noise_sigma=0.025,
        gm_level=0.62,
        csf_level=0.20,
        neck_mm=0.0,
        age_mean=71.0,
        age_sd=8.0,
        p_male=0.45,
        mci_logit=0.0,
        ad_logit=-0.3,
        manufacturer="Siemens",
        field_strength=3.0,
    ),
    # FreeSurfer-conformed exports: LIA, uint8 (WM ~110), bias-corrected, population cohort.
    dict(
        orientation="LIA",
        voxel_factor=(1.0, 1.0, 1.0),
        dtype="uint8",
        intensity_scale=110.0,
        bias_strength=0.03,
        noise_sigma=0.015,
        gm_level=0.68,
        csf_level=0.25,
        neck_mm=0.0,
        age_mean=62.0,
        age_sd=9.0,
        p_male=0.55,
        mci_logit=-0.8,
        ad_logit=-1.8,
        manufacturer="GE",
        field_strength=3.0,
    ),
    # A 1.5T clinical scanner: 2 x 2 x 3 mm-like anisotropic, LPS (DICOM), float32, strong bias,
    # noisy, low contrast, large inferior field of view with neck; many AD patients.
    dict(
        orientation="LPS",
        voxel_factor=(0.7, 0.7, 1.05),
        dtype="float32",
        intensity_scale=1234.5,
        bias_strength=0.25,
        noise_sigma=0.04,
        gm_level=0.70,
        csf_level=0.28,
        neck_mm=50.0,
        age_mean=75.0,
        age_sd=7.0,
        p_male=0.40,
        mci_logit=0.3,
        ad_logit=0.4,
        manufacturer="Philips",
        field_strength=1.5,
    ),
    # A sagittal acquisition written LAS with thick sagittal slices; mixed cohort, a little neck.
    dict(
        orientation="LAS",
        voxel_factor=(1.1, 0.8, 0.8),
        dtype="int16",
        intensity_scale=700.0,
        bias_strength=0.18,
        noise_sigma=0.03,
        gm_level=0.60,
        csf_level=0.18,
        neck_mm=25.0,
        age_mean=67.0,
        age_sd=10.0,
        p_male=0.5,
        mci_logit=-0.2,
        ad_logit=-0.8,
        manufacturer="Siemens",
        field_strength=3.0,
    ),
)


def site_spec(site_index: int, profile: Profile, seed: int) -> SiteSpec:
    """Settings of site ``site_index`` (0-based): preset ``site_index % 4``, jittered from the seed.

    Voxel sizes scale with the profile's spacing (``voxel_factor * geometric mean spacing``), so a
    3 mm profile gets 2.1-3.3 mm voxels and a 1 mm profile 0.7-1.1 mm voxels. The first four sites of
    any seed use the presets unjittered; later sites jitter every continuous setting.
    """
    p = dict(_PRESETS[site_index % len(_PRESETS)])
    rng = np.random.default_rng([seed, 7, site_index])
    jitter = site_index >= len(_PRESETS)

    def j(v: float, rel: float) -> float:
        return float(v * (1.0 + rel * rng.uniform(-1, 1))) if jitter else float(v)

    ref = float(np.prod(profile.data.spacing) ** (1.0 / 3.0))
    scale = j(1.0, 0.08)
    vox = tuple(round(f * ref * scale, 3) for f in p["voxel_factor"])
    fov = (200.0, 250.0, 215.0)
    return SiteSpec(
        name=f"site-{site_index + 1}",
        orientation=p["orientation"],
        voxel_mm=vox,  # type: ignore[arg-type]
        dtype=p["dtype"],
        intensity_scale=p["intensity_scale"],
        bias_strength=j(p["bias_strength"], 0.3),
        noise_sigma=j(p["noise_sigma"], 0.3),
        wm_level=1.0,
        gm_level=float(np.clip(j(p["gm_level"], 0.06), 0.5, 0.8)),
        csf_level=float(np.clip(j(p["csf_level"], 0.15), 0.1, 0.35)),
        fov_mm=fov,
        neck_mm=p["neck_mm"],
        age_mean=float(np.clip(p["age_mean"] + (rng.uniform(-5, 5) if jitter else 0.0), 55, 80)),
        age_sd=j(p["age_sd"], 0.2),
        p_male=float(np.clip(p["p_male"] + (rng.uniform(-0.1, 0.1) if jitter else 0.0), 0.2, 0.8)),
        mci_logit=p["mci_logit"] + (rng.uniform(-0.5, 0.5) if jitter else 0.0),
        ad_logit=p["ad_logit"] + (rng.uniform(-0.5, 0.5) if jitter else 0.0),
        manufacturer=p["manufacturer"],
        field_strength=p["field_strength"],
    )


# ---------------------------------------------------------------------------------------------
# Template maps (MNI space, padded for the scalp and neck)
# ---------------------------------------------------------------------------------------------

_PAD_MM = 24.0
_NECK_PAD_MM = 70.0
_HIPPOCAMPI_MNI = ((-26.0, -22.0, -14.0), (26.0, -22.0, -14.0))
_HEAD_CENTRE_MNI = np.array([0.0, -18.0, 8.0], np.float32)


@dataclass(frozen=True)
class _Template:
    """Template-space maps on a padded MNI grid (axes RAS, isotropic ``spacing`` mm)."""

    spacing: float
    origin: np.ndarray  # (3,) MNI mm of voxel (0, 0, 0)
    gm: np.ndarray  # (X, Y, Z) float32 GM probability
    wm: np.ndarray  # (X, Y, Z) float32 WM probability
    icv: np.ndarray  # (X, Y, Z) float32 intracranial occupancy (brain mask)
    dist_out: np.ndarray  # (X, Y, Z) float32 mm outside the intracranial volume (0 inside)
    depth_sulcal: np.ndarray  # (X, Y, Z) float32 mm from tissue to the nearest non-ventricular CSF/outside
    depth_vent: np.ndarray  # (X, Y, Z) float32 mm from tissue to the nearest ventricle
    icv_ml: float


@functools.lru_cache(maxsize=2)
def _template(resolution: int) -> _Template:
    """Load nilearn's MNI152 maps at ``resolution`` mm (1 or 2) and derive the simulator's maps."""
    from nilearn import datasets

    t1 = datasets.load_mni152_template(resolution=resolution)
    gm = datasets.load_mni152_gm_template(resolution=resolution).get_fdata(dtype=np.float32)
    wm = datasets.load_mni152_wm_template(resolution=resolution).get_fdata(dtype=np.float32)
    mask = datasets.load_mni152_brain_mask(resolution=resolution).get_fdata(dtype=np.float32) > 0.5
    aff = t1.affine
    sp = float(abs(aff[0, 0]))
    mask = ndi.binary_fill_holes(mask)
    gm = np.clip(gm, 0, 1) * mask
    wm = np.clip(wm, 0, 1) * mask
    tot = gm + wm
    over = tot > 1.0
    gm[over] /= tot[over]
    wm[over] /= tot[over]

    pad = round(_PAD_MM / sp)
    neck = round(_NECK_PAD_MM / sp)
    widths = ((pad, pad), (pad, pad), (pad + neck, pad))
    gm = np.pad(gm, widths)
    wm = np.pad(wm, widths)
    mask = np.pad(mask, widths)
    origin = aff[:3, 3].astype(np.float32) - sp * np.array([pad, pad, pad + neck], np.float32)

    sampling = (sp, sp, sp)
    dist_out = ndi.distance_transform_edt(~mask, sampling=sampling).astype(np.float32)
    tissue = (gm + wm) > 0.5
    # Ventricles: CSF deep inside the brain (>= 12 mm from the brain surface), large components.
    deep = ndi.distance_transform_edt(mask, sampling=sampling) > 12.0
    vent = mask & ~tissue & deep
    lab, n = ndi.label(vent)
    if n:
        sizes = ndi.sum(vent, lab, index=np.arange(1, n + 1))
        keep = np.flatnonzero(sizes * sp**3 >= 300.0) + 1
        vent = np.isin(lab, keep)
    depth_vent = ndi.distance_transform_edt(~vent, sampling=sampling).astype(np.float32)
    depth_sulcal = ndi.distance_transform_edt(tissue | vent, sampling=sampling).astype(np.float32)
    icv = mask.astype(np.float32)
    return _Template(
        spacing=sp,
        origin=origin,
        gm=gm.astype(np.float32),
        wm=wm.astype(np.float32),
        icv=icv,
        dist_out=dist_out,
        depth_sulcal=depth_sulcal,
        depth_vent=depth_vent,
        icv_ml=float(icv.sum() * sp**3 / 1000.0),
    )


def template_resolution(profile: Profile) -> int:
    """nilearn template resolution used for ``profile``: 1 mm when any spacing < 2 mm, else 2 mm."""
    return 1 if min(profile.data.spacing) < 2.0 else 2


@functools.lru_cache(maxsize=8)
def _smoothed(resolution: int, sigma_vox: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GM, WM and ICV maps pre-filtered against aliasing for a coarser output grid."""
    t = _template(resolution)
    if sigma_vox <= 0.05:
        return t.gm, t.wm, t.icv
    return tuple(ndi.gaussian_filter(a, sigma_vox, mode="constant") for a in (t.gm, t.wm, t.icv))  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# Geometry helpers
# ---------------------------------------------------------------------------------------------

_AXIS_CODES = {"R": (0, 1.0), "L": (0, -1.0), "A": (1, 1.0), "P": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}


def site_grid(spec: SiteSpec) -> tuple[tuple[int, int, int], np.ndarray]:
    """Voxel grid (shape, 4x4 affine) of a site: its orientation and voxel size, centred on the head.

    The field of view is ``spec.fov_mm`` (RAS world axes) plus ``spec.neck_mm`` inferiorly.
    """
    axes = [_AXIS_CODES[c] for c in spec.orientation]
    if sorted(a for a, _ in axes) != [0, 1, 2]:
        raise ValueError(f"bad orientation {spec.orientation!r}")
    fov = np.array(spec.fov_mm, dtype=np.float64)
    fov[2] += spec.neck_mm
    centre = np.array([0.0, 0.0, -0.5 * spec.neck_mm])
    shape = []
    aff = np.eye(4)
    for v, (world_axis, sign) in enumerate(axes):
        n = math.ceil(fov[world_axis] / spec.voxel_mm[v])
        shape.append(n)
        aff[:3, v] = 0.0
        aff[world_axis, v] = sign * spec.voxel_mm[v]
    # World position of voxel 0 so that the grid centre sits on ``centre``.
    half = (np.array(shape, dtype=np.float64) - 1.0) / 2.0
    aff[:3, 3] = centre - aff[:3, :3] @ half
    return tuple(shape), aff  # type: ignore[return-value]


def _cosine_field(
    shape: Sequence[int], n_basis: int, rng: np.random.Generator, n_fields: int = 1
) -> np.ndarray:
    """Smooth random fields: sums of low-frequency separable cosines, each scaled to unit std.

    Returns float32 (n_fields, *shape).
    """
    bases = []
    for n in shape:
        x = (np.arange(n, dtype=np.float32) + 0.5) / n
        bases.append(np.stack([np.cos(np.pi * k * x) for k in range(n_basis)], 1))  # (n, K)
    k = np.arange(n_basis, dtype=np.float32)
    freq2 = k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2
    weight = np.where(freq2 > 0, 1.0 / (1.0 + freq2), 0.0).astype(np.float32)
    out = np.empty((n_fields, *shape), np.float32)
    for f in range(n_fields):
        coef = rng.standard_normal((n_basis,) * 3).astype(np.float32) * weight
        t = np.tensordot(coef, bases[2], axes=(2, 1))  # (K, K, Z)
        t = np.tensordot(bases[1], t, axes=(1, 1))  # (Y, K, Z)
        t = np.tensordot(bases[0], t, axes=(1, 1))  # (X, Y, Z)
        t -= t.mean()
        t /= max(float(t.std()), 1e-6)
        out[f] = t
    return out


def _rotation(angles_deg: np.ndarray) -> np.ndarray:
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _smoothstep(x: np.ndarray, edge: float | np.ndarray, width: float) -> np.ndarray:
    """0 below ``edge``, 1 above, logistic transition of ~``width`` mm."""
    return expit((x - edge) / (0.35 * width))


# ---------------------------------------------------------------------------------------------
# One subject
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SubjectDraw:
    """Covariates and hidden generative variables of one simulated subject."""

    participant_id: str
    age: float
    sex: str
    diagnosis: str
    target_btf: float
    icv_ml: float


def draw_subjects(spec: SiteSpec, site_index: int, n: int, seed: int) -> list[SubjectDraw]:
    """Demographics of a site: ages ~ N(age_mean, age_sd) in 45-90, sex ~ Bernoulli(p_male),
    diagnosis ~ softmax(0, mci_logit + 0.05 (age - 70), ad_logit + 0.10 (age - 70)) over CN/MCI/AD;
    then the subject's BTF and ICV around :func:`generating_law`.
    """
    rng = np.random.default_rng([seed, 11, site_index])
    out = []
    for i in range(n):
        age = float(rng.normal(spec.age_mean, spec.age_sd))
        while not AGE_RANGE[0] <= age <= AGE_RANGE[1]:
            age = float(rng.normal(spec.age_mean, spec.age_sd))
        age = round(age, 1)
        sex = "M" if rng.random() < spec.p_male else "F"
        logits = np.array([0.0, spec.mci_logit + 0.05 * (age - 70), spec.ad_logit + 0.10 * (age - 70)])
        p = np.exp(logits - logits.max())
        dx = DIAGNOSES[int(rng.choice(3, p=p / p.sum()))]
        law = generating_law(age, sex, dx)
        btf = law["brain_tissue_fraction"] + BTF_INDIVIDUAL_SD * float(rng.standard_normal())
        icv = law["intracranial_volume_ml"] * (1.0 + ICV_INDIVIDUAL_CV * float(rng.standard_normal()))
        out.append(
            SubjectDraw(
                participant_id=f"sub-s{site_index + 1}p{i + 1:03d}",
                age=age,
                sex=sex,
                diagnosis=dx,
                target_btf=float(btf),
                icv_ml=float(icv),
            )
        )
    return out


@dataclass
class SimulatedSubject:
    """A simulated subject's arrays on its site grid."""

    t1w: np.ndarray  # (X, Y, Z) in the site's dtype
    label: np.ndarray  # (X, Y, Z) uint8 0..3
    affine: np.ndarray  # (4, 4)
    btf: float  # measured on ``label``
    icv_ml: float  # measured on ``label``
    head_scale: float
    erosion_mm: float


def _btf_of(labels: np.ndarray) -> tuple[float, int]:
    n_ic = int(np.count_nonzero(labels))
    n_t = int(np.count_nonzero(labels >= 2))
    return (n_t / n_ic if n_ic else float("nan")), n_ic


def _label_from(gm: np.ndarray, wm: np.ndarray, icv: np.ndarray, f: np.ndarray) -> np.ndarray:
    """Tissue label of eroded probabilities: background where ``icv < 0.5``, else the arg-max of
    (CSF = icv - GM - WM, GM, WM), so the intracranial volume does not depend on the erosion."""
    pg = gm * f
    pw = wm * f
    pc = icv - pg - pw
    lab = np.where(pw > pg, np.uint8(3), np.uint8(2))
    lab = np.where(pc >= np.maximum(pg, pw), np.uint8(1), lab)
    return np.where(icv >= 0.5, lab, np.uint8(0))


def simulate_subject(
    draw: SubjectDraw, spec: SiteSpec, resolution: int, rng: np.random.Generator
) -> SimulatedSubject:
    """Render one subject on its site grid (see the module docstring for the model)."""
    tpl = _template(resolution)
    shape, aff = site_grid(spec)
    sp = tpl.spacing

    # --- subject pose, size and smooth deformation: output voxel -> MNI mm ----------------------
    head_scale = (draw.icv_ml / tpl.icv_ml) ** (1.0 / 3.0)
    rot = _rotation(rng.uniform(-4.0, 4.0, 3))
    shift = rng.uniform(-5.0, 5.0, 3)
    q = (rot.T / head_scale).astype(np.float32)  # world -> MNI linear part
    ijk = [np.arange(n, dtype=np.float32) for n in shape]
    world = []  # world[a] broadcastable along the voxel axis that maps to world axis a
    for a in range(3):
        acc = np.float32(aff[a, 3] - shift[a])
        parts = []
        for v in range(3):
            if aff[a, v] != 0.0:
                sh = [1, 1, 1]
                sh[v] = shape[v]
                parts.append((np.float32(aff[a, v]) * ijk[v]).reshape(sh))
        world.append(sum(parts) + acc)
    fields = _cosine_field(shape, 4, rng, n_fields=6)  # 3 displacement, bias, 2 thickness
    disp_mm = float(rng.uniform(2.0, 3.5))
    coords = np.empty((3, *shape), np.float32)
    for a in range(3):
        m = q[a, 0] * world[0] + q[a, 1] * world[1] + q[a, 2] * world[2] + _HEAD_CENTRE_MNI[a]
        coords[a] = m + disp_mm * fields[a]
    mni = coords  # (3, X, Y, Z) MNI mm sampled by each output voxel
    vox = (mni - tpl.origin[:, None, None, None]) / sp

    # --- brain maps in the intracranial region --------------------------------------------------
    # Anti-aliasing pre-filter (FWHM ~ the output voxel in template mm; one cached set per site).
    mean_scale = (0.5 * (_ICV_ML["F"] + _ICV_ML["M"]) / tpl.icv_ml) ** (1.0 / 3.0)
    out_vox_mm = float(np.mean(spec.voxel_mm)) / mean_scale
    sigma = math.sqrt(max(out_vox_mm**2 - sp**2, 0.0)) / (2.355 * sp)
    gm_t, wm_t, icv_t = _smoothed(resolution, round(sigma, 2))
    icv = ndi.map_coordinates(icv_t, vox, order=1, cval=0.0, prefilter=False)
    inside = icv > 1e-3
    v_in = vox[:, inside]
    gm = ndi.map_coordinates(gm_t, v_in, order=1, cval=0.0, prefilter=False)
    wm = ndi.map_coordinates(wm_t, v_in, order=1, cval=0.0, prefilter=False)
    d_sulc = ndi.map_coordinates(tpl.depth_sulcal, v_in, order=1, cval=0.0, prefilter=False)
    d_vent = ndi.map_coordinates(tpl.depth_vent, v_in, order=1, cval=100.0, prefilter=False)
    icv_in = icv[inside]

    # Vulnerability score (mm): tissue close to CSF goes first, ventricles ~2.5x faster, plus a
    # smooth random modulation and a medial-temporal focus in MCI/AD.
    vent_speed = {"CN": 2.2, "MCI": 2.5, "AD": 2.8}[draw.diagnosis]
    score = np.minimum(d_sulc, d_vent / vent_speed)
    score *= np.exp(0.3 * fields[5][inside])
    focus = {"CN": 0.0, "MCI": 1.5, "AD": 3.0}[draw.diagnosis]
    if focus:
        pts = mni[:, inside]
        for h in _HIPPOCAMPI_MNI:
            r2 = sum((pts[a] - h[a]) ** 2 for a in range(3))
            score -= focus * np.exp(-r2 / (2 * 14.0**2))

    def labels_for(d: float) -> np.ndarray:
        f = expit((score - d) / 0.6)
        return _label_from(gm, wm, icv_in, f)

    lo, hi = -8.0, 40.0
    btf_lo, _ = _btf_of(labels_for(lo))
    if btf_lo <= draw.target_btf:
        d = lo
    else:
        for _ in range(30):
            mid = 0.5 * (lo + hi)
            b, _ = _btf_of(labels_for(mid))
            if b > draw.target_btf:
                lo = mid
            else:
                hi = mid
            if hi - lo < 1e-3:
                break
        # The closer of the two brackets in BTF.
        b_lo, _ = _btf_of(labels_for(lo))
        b_hi, _ = _btf_of(labels_for(hi))
        d = lo if abs(b_lo - draw.target_btf) <= abs(b_hi - draw.target_btf) else hi
    f = expit((score - d) / 0.6)
    pg = gm * f
    pw = wm * f
    pc = np.clip(icv_in - pg - pw, 0.0, 1.0)

    label = np.zeros(shape, np.uint8)
    label[inside] = _label_from(gm, wm, icv_in, f)

    # --- T1 intensities ---------------------------------------------------------------------------
    brain = np.zeros(shape, np.float32)
    brain[inside] = pc * spec.csf_level + pg * spec.gm_level + pw * spec.wm_level
    dist = ndi.map_coordinates(tpl.dist_out, vox, order=1, cval=1e3, prefilter=False)
    # Non-brain tissue only where it can be: near the skull, or in the neck below the skull base.
    near = (icv < 0.999) & ((dist < 30.0) | (mni[2] < -45.0))
    img = brain
    img[near] += (1.0 - icv[near]) * _head_tissue(dist[near], mni[:, near], fields[3][near], fields[4][near])
    bias = np.exp(spec.bias_strength * fields[3] * 0.7 + spec.bias_strength * 0.7 * fields[4][::-1])
    img *= bias.astype(np.float32)
    n1 = rng.standard_normal(shape, dtype=np.float32) * spec.noise_sigma
    n2 = rng.standard_normal(shape, dtype=np.float32) * spec.noise_sigma
    img = np.sqrt((img + n1) ** 2 + n2**2)

    t1w = _to_dtype(img * spec.intensity_scale, spec.dtype)
    btf, n_ic = _btf_of(label)
    vox_ml = float(abs(np.linalg.det(aff[:3, :3]))) / 1000.0
    return SimulatedSubject(
        t1w=t1w,
        label=label,
        affine=aff,
        btf=btf,
        icv_ml=n_ic * vox_ml,
        head_scale=float(head_scale),
        erosion_mm=float(d),
    )


def _head_tissue(dist: np.ndarray, mni: np.ndarray, field_a: np.ndarray, field_b: np.ndarray) -> np.ndarray:
    """Non-brain T1 intensity (WM = 1) outside the intracranial volume.

    ``dist`` is the MNI-space distance (mm) outside the intracranial volume; layers from inside out:
    skull outer/inner table (dark), diploë (intermediate), galea (dark-grey), subcutaneous fat
    (bright), skin. Below the skull base a neck (muscle with a fat rim, a vertebral body and the
    spinal canal). Returns float32 of ``dist``'s shape.
    """
    t_skull = 6.0 * (1.0 + 0.2 * field_a)
    t_scalp = 7.0 * (1.0 + 0.25 * field_b)
    w = 1.2
    in_skull = _smoothstep(dist, 0.3, w)
    diploe = _smoothstep(dist, 0.35 * t_skull, w) * (1.0 - _smoothstep(dist, 0.7 * t_skull, w))
    scalp_in = _smoothstep(dist, t_skull, w)
    fat_in = _smoothstep(dist, t_skull + 1.5, w)
    skin_in = _smoothstep(dist, t_skull + t_scalp - 1.5, w)
    head_out = _smoothstep(dist, t_skull + t_scalp, w)
    val = in_skull * 0.07
    val += diploe * 0.38
    val += scalp_in * (0.35 - 0.07)
    val += fat_in * (0.9 - 0.35)
    val += skin_in * (0.55 - 0.9)
    val -= head_out * 0.55
    head = 1.0 - head_out

    # Neck: an elliptic column below the skull base (throat anterior, nape posterior), widening
    # slowly towards the shoulders.
    x, y, z = mni[0], mni[1], mni[2]
    zc = -60.0
    below = 1.0 - _smoothstep(z, zc, 6.0)
    widen = 0.25 * np.clip(zc - 30.0 - z, 0, None)
    rx = 44.0 + widen
    ry = 50.0 + 0.5 * widen
    r = np.sqrt((x / rx) ** 2 + ((y + 32.0) / ry) ** 2)
    r_mm = (1.0 - r) * rx  # ~mm inside the neck surface
    neck_occ = below * _smoothstep(r_mm, 0.0, w)
    neck_val = 0.55 + (0.9 - 0.55) * _smoothstep(r_mm, 2.0, w) - (0.9 - 0.42) * _smoothstep(r_mm, 8.0, w)
    # Vertebral body (marrow, cortical rim) and the spinal canal with cord.
    rv = np.sqrt(x**2 + (y + 22.0) ** 2)
    body = _smoothstep(-rv, -13.0, w)
    neck_val = neck_val * (1 - body) + body * (0.1 + 0.45 * _smoothstep(-rv, -11.0, w))
    rc = np.sqrt(x**2 + (y + 44.0) ** 2)
    canal = _smoothstep(-rc, -8.0, w)
    neck_val = neck_val * (1 - canal) + canal * (0.22 + 0.45 * _smoothstep(-rc, -4.5, w))
    use_neck = neck_occ * (1.0 - head)
    return (val * head + use_neck * neck_val).astype(np.float32)


def _to_dtype(img: np.ndarray, dtype: str) -> np.ndarray:
    dt = np.dtype(dtype)
    if dt.kind in "iu":
        info = np.iinfo(dt)
        return np.clip(np.rint(img), info.min, info.max).astype(dt)
    return img.astype(dt)


# ---------------------------------------------------------------------------------------------
# BIDS writing
# ---------------------------------------------------------------------------------------------

_PARTICIPANTS_JSON = {
    "participant_id": {"Description": "Unique participant label across all simulated sites."},
    "age": {"Description": "Age at scan.", "Units": "year"},
    "sex": {
        "Description": "Sex of the participant.",
        "Levels": {"F": "female", "M": "male"},
    },
    "diagnosis": {
        "Description": "Clinical diagnosis.",
        "Levels": {
            "CN": "cognitively normal",
            "MCI": "mild cognitive impairment",
            "AD": "Alzheimer's disease dementia",
        },
    },
    "site": {"Description": "Simulated acquisition site."},
}


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _write_site(root: Path, spec: SiteSpec, seed: int, site_index: int, draws: list[SubjectDraw]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    _write_json(
        root / "dataset_description.json",
        {
            "Name": f"synthbrain simulated {spec.name}",
            "BIDSVersion": "1.9.0",
            "DatasetType": "raw",
            "License": "CC0",
            "Authors": ["synthbrain-simulate", "Fonov V. et al. (ICBM 2009 MNI152 template, via nilearn)"],
            "ReferencesAndLinks": ["https://doi.org/10.1016/j.neuroimage.2010.07.033"],
            "GeneratedBy": [{"Name": "synthbrain-simulate", "Version": __version__}],
        },
    )
    (root / "README").write_text(
        f"Simulated hospital site '{spec.name}' written by synthbrain-simulate {__version__} "
        f"(seed {seed}, site index {site_index}).\n\n"
        "T1-weighted full-head images built from the MNI152 (ICBM 2009) template shipped with nilearn,\n"
        "with a random head size, pose, smooth deformation and age/diagnosis-dependent atrophy, and\n"
        "this site's scanner effects (orientation, voxel size, data type, bias field, noise, contrast).\n"
        "Tissue label maps (0 background, 1 CSF, 2 GM, 3 WM) are in derivatives/labels.\n"
        "These are not images of real people.\n"
    )
    with open(root / "participants.tsv", "w", newline="") as fh:
        w = csv.writer(fh, delimiter="\t", lineterminator="\n")
        w.writerow(["participant_id", "age", "sex", "diagnosis", "site"])
        for d in draws:
            w.writerow([d.participant_id, f"{d.age:.1f}", d.sex, d.diagnosis, spec.name])
    _write_json(root / "participants.json", _PARTICIPANTS_JSON)
    deriv = root / "derivatives" / "labels"
    _write_json(
        deriv / "dataset_description.json",
        {
            "Name": f"synthbrain simulated tissue labels, {spec.name}",
            "BIDSVersion": "1.9.0",
            "DatasetType": "derivative",
            "GeneratedBy": [
                {
                    "Name": "synthbrain-simulate",
                    "Version": __version__,
                    "Description": "Ground-truth tissue labels of the simulated T1w images.",
                }
            ],
        },
    )
    with open(deriv / "dseg.tsv", "w", newline="") as fh:
        w = csv.writer(fh, delimiter="\t", lineterminator="\n")
        w.writerow(["index", "name", "abbreviation"])
        abbrev = {0: "BG", 1: "CSF", 2: "GM", 3: "WM"}
        for k, name in TISSUE_LABELS.items():
            w.writerow([k, name, abbrev[k]])


def simulate_sites(
    out_dir: Path | str,
    n_sites: int,
    subjects_per_site: int,
    profile: Profile,
    seed: int,
    *,
    verbose: bool = False,
    first_site: int = 0,
) -> list[Path]:
    """Write ``n_sites`` simulated BIDS sites ``out_dir/site-1`` ... and return their paths.

    ``first_site``: index of the first site (0-based); ``first_site=3`` writes ``site-4`` ... exactly as a call
    with more sites would (each site's scanner preset and subjects depend on its index and the seed only).

    Each site holds ``subjects_per_site`` subjects ``sub-s<site>p<NNN>`` (unique across sites) with
    ``sub-*/anat/sub-*_T1w.nii.gz`` (+ JSON sidecar), ``participants.tsv`` (participant_id, age, sex,
    diagnosis, site) + ``participants.json``, and ``derivatives/labels/sub-*/anat/sub-*_dseg.nii.gz``
    (same grid and affine as the T1w; 0 background, 1 CSF, 2 GM, 3 WM) with ``dseg.tsv`` and a
    ``*_dseg.json`` sidecar recording the subject's simulation parameters. The output is fully
    determined by ``seed`` (and the profile's spacing): the same call writes identical files.
    Existing site folders are overwritten file by file.
    """
    if n_sites < 1 or subjects_per_site < 1:
        raise ValueError("n_sites and subjects_per_site must be >= 1")
    if first_site < 0:
        raise ValueError(f"first_site must be >= 0, got {first_site}")
    out_dir = Path(out_dir)
    res = template_resolution(profile)
    paths = []
    for s in range(first_site, first_site + n_sites):
        spec = site_spec(s, profile, seed)
        root = out_dir / spec.name
        draws = draw_subjects(spec, s, subjects_per_site, seed)
        _write_site(root, spec, seed, s, draws)
        for i, d in enumerate(draws):
            rng = np.random.default_rng([seed, 13, s, i])
            sim = simulate_subject(d, spec, res, rng)
            sub = d.participant_id
            anat = root / sub / "anat"
            save_nifti(anat / f"{sub}_T1w.nii.gz", sim.t1w, sim.affine)
            _write_json(
                anat / f"{sub}_T1w.json",
                {
                    "Manufacturer": spec.manufacturer,
                    "ManufacturersModelName": "synthbrain simulated scanner",
                    "MagneticFieldStrength": spec.field_strength,
                    "InstitutionName": spec.name,
                },
            )
            ldir = root / "derivatives" / "labels" / sub / "anat"
            save_nifti(ldir / f"{sub}_dseg.nii.gz", sim.label, sim.affine)
            _write_json(
                ldir / f"{sub}_dseg.json",
                {
                    "Description": "Ground-truth tissue labels of the simulated T1w image.",
                    "Sources": [f"bids::{sub}/anat/{sub}_T1w.nii.gz"],
                    "SimulationParameters": {
                        "TargetBrainTissueFraction": round(d.target_btf, 5),
                        "MeasuredBrainTissueFraction": round(sim.btf, 5),
                        "TargetIntracranialVolumeMl": round(d.icv_ml, 1),
                        "MeasuredIntracranialVolumeMl": round(sim.icv_ml, 1),
                        "HeadScale": round(sim.head_scale, 4),
                        "ErosionMm": round(sim.erosion_mm, 3),
                    },
                },
            )
            if verbose:
                print(
                    f"  {sub}: age {d.age:.1f} {d.sex} {d.diagnosis}  BTF {sim.btf:.3f} "
                    f"(target {d.target_btf:.3f})  ICV {sim.icv_ml:.0f} ml"
                )
        paths.append(root)
    return paths


def site_summary(root: Path | str) -> dict[str, Any]:
    """Summary of a written simulated site (read back from its files)."""
    root = Path(root)
    with open(root / "participants.tsv") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    first = sorted(root.glob("sub-*/anat/*_T1w.nii.gz"))[0]
    img = nib.load(str(first))
    btfs = []
    for lab in sorted((root / "derivatives" / "labels").glob("sub-*/anat/*_dseg.json")):
        btfs.append(json.loads(lab.read_text())["SimulationParameters"]["MeasuredBrainTissueFraction"])
    ages = [float(r["age"]) for r in rows]
    return {
        "site": root.name,
        "path": str(root),
        "subjects": len(rows),
        "shape": list(img.shape),
        "voxel_mm": [round(float(z), 2) for z in img.header.get_zooms()[:3]],
        "orientation": "".join(nib.aff2axcodes(img.affine)),
        "dtype": str(img.get_data_dtype()),
        "age_range": [min(ages), max(ages)],
        "sex": {s: sum(r["sex"] == s for r in rows) for s in SEXES},
        "diagnosis": {d: sum(r["diagnosis"] == d for r in rows) for d in DIAGNOSES},
        "mean_btf": round(float(np.mean(btfs)), 3) if btfs else None,
    }


def preview_montage(site_dirs: Sequence[Path | str], png: Path | str, per_site: int = 3) -> Path:
    """Save a PNG montage of mid-slices (axial, coronal, sagittal; T1w and labels), RAS-reoriented."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for root in site_dirs:
        root = Path(root)
        for t1 in sorted(root.glob("sub-*/anat/*_T1w.nii.gz"))[:per_site]:
            sub = t1.name.split("_")[0]
            lab = root / "derivatives" / "labels" / sub / "anat" / f"{sub}_dseg.nii.gz"
            rows.append((f"{root.name} {sub}", t1, lab))
    fig, axes = plt.subplots(len(rows), 6, figsize=(13, 2.3 * len(rows)), squeeze=False)
    for r, (title, t1, lab) in enumerate(rows):
        im = nib.as_closest_canonical(nib.load(str(t1)))
        lb = nib.as_closest_canonical(nib.load(str(lab)))
        a = np.asarray(im.dataobj, dtype=np.float32)
        b = np.asarray(lb.dataobj)
        zooms = im.header.get_zooms()[:3]
        c = [n // 2 for n in a.shape]
        views = [
            (a[:, :, c[2]].T, b[:, :, c[2]].T, zooms[1] / zooms[0]),
            (a[:, c[1], :].T, b[:, c[1], :].T, zooms[2] / zooms[0]),
            (a[c[0], :, :].T, b[c[0], :, :].T, zooms[2] / zooms[1]),
        ]
        vmax = float(np.percentile(a, 99.5))
        for k, (sl, ls, aspect) in enumerate(views):
            axes[r, 2 * k].imshow(sl, cmap="gray", origin="lower", vmin=0, vmax=vmax, aspect=aspect)
            axes[r, 2 * k + 1].imshow(ls, cmap="viridis", origin="lower", vmin=0, vmax=3, aspect=aspect)
        axes[r, 0].set_title(title, fontsize=8, loc="left")
        for ax in axes[r]:
            ax.set_axis_off()
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=80)
    plt.close(fig)
    return png


def find_bids_validator() -> Path | None:
    """The npm ``bids-validator`` executable: the repository's ``tools/node_modules/.bin`` (pinned,
    ``npm ci --prefix tools``), else one on ``PATH``; None when neither exists."""
    import os
    import shutil

    local = Path(__file__).resolve().parents[2] / "tools" / "node_modules" / ".bin" / "bids-validator"
    if local.exists() and os.access(local, os.X_OK):
        return local
    found = shutil.which("bids-validator")
    return Path(found) if found else None


def validate_bids(root: Path | str, exe: Path | str | None = None) -> tuple[list[str], list[str]]:
    """Run ``bids-validator --json`` on ``root``; (errors, warnings) as 'KEY: reason' strings."""
    import subprocess

    exe = exe or find_bids_validator()
    if exe is None:
        raise FileNotFoundError("bids-validator not found (run `npm ci --prefix tools`)")
    proc = subprocess.run([str(exe), "--json", str(root)], capture_output=True, text=True, timeout=600)
    start = proc.stdout.find("{")
    if start < 0:
        raise RuntimeError(
            f"bids-validator printed no report (exit {proc.returncode}): {proc.stderr[-1000:]}"
        )
    issues = json.loads(proc.stdout[start:]).get("issues", {})

    def fmt(items: list[dict[str, Any]]) -> list[str]:
        out = []
        for it in items:
            files = [(f.get("file") or {}).get("relativePath", "") for f in (it.get("files") or [])[:3]]
            out.append(f"{it.get('key')}: {it.get('reason', '')} {[f for f in files if f]}")
        return out

    return fmt(issues.get("errors", [])), fmt(issues.get("warnings", []))


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def _run_simulate(args: argparse.Namespace) -> int:
    profile = load_profile(args.profile)
    paths = simulate_sites(
        Path(args.out), args.sites, args.subjects_per_site, profile, args.seed, verbose=args.verbose
    )
    for p in paths:
        s = site_summary(p)
        dx = " ".join(f"{k}={v}" for k, v in s["diagnosis"].items())
        sx = " ".join(f"{k}={v}" for k, v in s["sex"].items())
        print(
            f"{s['site']}: {s['subjects']} subjects -> {s['path']}\n"
            f"    grid {'x'.join(map(str, s['shape']))} @ {'x'.join(map(str, s['voxel_mm']))} mm, "
            f"{s['orientation']}, {s['dtype']}; age {s['age_range'][0]:.0f}-{s['age_range'][1]:.0f}, "
            f"{sx}, {dx}, mean BTF {s['mean_btf']}"
        )
    if args.preview:
        print(f"preview: {preview_montage(paths, args.preview)}")
    if args.validate:
        exe = find_bids_validator()
        if exe is None:
            print("--validate: bids-validator not found (run `make tools` or `npm ci --prefix tools`)")
            return 1
        failed = 0
        for p in paths:
            errors, warnings = validate_bids(p, exe)
            print(f"{p.name}: BIDS validator {len(errors)} error(s), {len(warnings)} warning(s)")
            for e in errors:
                print(f"    ERROR {e}")
            failed += bool(errors)
        return 1 if failed else 0
    return 0


def add_simulate_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``synthbrain simulate`` (simulated multi-site BIDS cohorts) to an argparse subparsers."""
    p = subparsers.add_parser(
        "simulate",
        help="write simulated hospital sites (BIDS, T1w + tissue labels) from the MNI152 template",
        description=(
            "Write N simulated hospital sites as BIDS folders OUT/site-1 ... with full-head T1w images, "
            "tissue label maps (derivatives/labels) and participants.tsv (age, sex, diagnosis)."
        ),
    )
    p.add_argument("--sites", type=int, default=3, help="number of sites (default 3)")
    p.add_argument("--subjects-per-site", type=int, default=8, help="subjects per site (default 8)")
    p.add_argument("--profile", default="cpu-demo", help="profile name or YAML (sets voxel sizes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--preview", default=None, help="also save a PNG montage of mid-slices here")
    p.add_argument(
        "--validate",
        action="store_true",
        help="run the BIDS validator (tools/node_modules or PATH) on each site; exit 1 on errors",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="print one line per subject")
    p.set_defaults(func=_run_simulate)
    return p


__all__ = [
    "AGE_RANGE",
    "BTF_INDIVIDUAL_SD",
    "ICV_INDIVIDUAL_CV",
    "SimulatedSubject",
    "SiteSpec",
    "SubjectDraw",
    "add_simulate_parser",
    "draw_subjects",
    "find_bids_validator",
    "generating_law",
    "preview_montage",
    "simulate_sites",
    "simulate_subject",
    "site_grid",
    "site_spec",
    "site_summary",
    "template_resolution",
    "validate_bids",
]
