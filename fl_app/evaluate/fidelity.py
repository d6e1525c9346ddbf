"""``synthbrain evaluate``: conditioning fidelity, realism and diversity of a synthetic cohort.

**Conditioning fidelity.** For every subject, brain tissue fraction (BTF) and CSF / deep-CSF
(ventricle proxy) volumes are measured from its label map and, independently, BTF and CSF volume from
its image intensities (:mod:`fl_app.evaluate.features`). Each measure is regressed on the prescribed
age with one intercept per (sex, diagnosis) group and a common age slope (ANCOVA,
:func:`age_slope`). The same regression is fitted on the real reference subjects and, when the
reference sites are simulated, on the generating law evaluated at the synthetic subjects' own
covariates. The slope error is ``100 · |slope_synthetic − slope_target| / |slope_target|``.

**Realism and diversity.** Mean 3D MS-SSIM over random pairs of synthetic subjects vs over random
pairs of real subjects (too high = mode collapse, too low = noise). Distribution distance: the
squared maximum mean discrepancy (MMD², Gaussian kernel, median-heuristic bandwidth) between
standardised hand-crafted feature vectors (:data:`~fl_app.evaluate.features.FEATURE_NAMES`:
tissue fractions and volumes, intensity-based BTF, per-tissue intensity statistics, intracranial
intensity histogram). Why this feature space: it works offline with no downloaded weights, every
axis is interpretable (a gap says *what* differs), and it does not come from the VQ-VAE being
evaluated (an encoder trained on the same data would be blind to its own failure modes). MMD rather
than a Fréchet distance because the cohorts are small (tens of subjects for ~20 features): the
unbiased MMD² estimate needs no covariance matrix. The floor is real-vs-real: MMD² between two
random halves of the reference, against MMD² between the synthetic cohort and one half
(averaged over random splits).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fl_app.evaluate.features import FEATURE_NAMES, feature_vector, intensity_measures, label_measures

__all__ = [
    "MEASURES",
    "Subjects",
    "add_evaluate_parser",
    "age_slope",
    "evaluate",
    "load_cohort_subjects",
    "load_reference_subjects",
    "mmd2",
    "mmd_vs_floor",
    "pairwise_ms_ssim",
    "slope_error_pct",
]

MEASURES: tuple[str, ...] = ("btf", "csf_ml", "deep_csf_ml", "btf_intensity", "csf_ml_intensity")
"""Conditioned measures regressed on age (label-based, then intensity-based)."""

_LAW_KEY = {"btf": "brain_tissue_fraction", "btf_intensity": "brain_tissue_fraction"}


@dataclass
class Subjects:
    """Volumes on one grid with covariates. images: (N, X, Y, Z) float32; labels: (N, X, Y, Z) int."""

    images: np.ndarray
    labels: np.ndarray
    ages: np.ndarray  # (N,) float, NaN unknown
    sexes: list[str | None]
    diagnoses: list[str | None]
    voxel_mm: tuple[float, float, float]
    ids: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ages)


def load_cohort_subjects(cohort: str | Path) -> Subjects:
    """The synthetic cohort's T1w + dseg volumes (RAS grid) and prescribed covariates."""
    import nibabel as nib

    from fl_app.generate.cohort_folder import read_cohort_dir

    subs = [s for s in read_cohort_dir(cohort) if s["dseg"] is not None]
    if not subs:
        raise ValueError(f"{cohort}: no subject with both a T1w and a dseg")
    imgs, labs = [], []
    zooms: tuple[float, float, float] = (1.0, 1.0, 1.0)
    for s in subs:
        im = nib.as_closest_canonical(nib.load(str(s["t1w"])))
        imgs.append(np.asarray(im.dataobj, dtype=np.float32))
        labs.append(np.asarray(nib.as_closest_canonical(nib.load(str(s["dseg"]))).dataobj).astype(np.int16))
        zooms = tuple(float(z) for z in im.header.get_zooms()[:3])  # type: ignore[assignment]
    return Subjects(
        images=np.stack(imgs),
        labels=np.stack(labs),
        ages=np.array([math.nan if s["age"] is None else s["age"] for s in subs], dtype=np.float64),
        sexes=[s["sex"] for s in subs],
        diagnoses=[s["diagnosis"] for s in subs],
        voxel_mm=zooms,
        ids=[s["participant_id"] for s in subs],
    )


def load_reference_subjects(
    bids_dirs: Sequence[str | Path], profile: Any, cache_dir: str | Path | None = None
) -> Subjects:
    """Real reference subjects (with label maps) preprocessed to ``profile``'s grid."""
    from fl_app.data.cohort import read_bids
    from fl_app.data.covariates import DIAGNOSES, SEXES
    from fl_app.data.dataset import SiteDataset

    imgs, labs, ages, sexes, dxs, ids = [], [], [], [], [], []
    for b in bids_dirs:
        ds = SiteDataset(read_bids(b).valid(), profile, cache_dir)
        for i in range(len(ds)):
            it = ds[i]
            if not bool(it["has_label"]):
                continue
            imgs.append(it["image"][0].numpy())
            labs.append(it["label"].numpy().astype(np.int16))
            ages.append(float(it["age"]))
            s, d = int(it["sex"]), int(it["diagnosis"])
            sexes.append(SEXES[s] if s < len(SEXES) else None)
            dxs.append(DIAGNOSES[d] if d < len(DIAGNOSES) else None)
            ids.append(f"{Path(b).name}/{it['participant_id']}")
    if not imgs:
        raise ValueError("no reference subject with a label map")
    return Subjects(
        np.stack(imgs),
        np.stack(labs),
        np.array(ages),
        sexes,
        dxs,
        tuple(float(v) for v in profile.data.spacing),
        ids,
    )  # type: ignore[arg-type]


def measure(subjects: Subjects) -> dict[str, np.ndarray]:
    """Per-subject :data:`MEASURES` plus ``icv_ml`` and ``csf_fraction`` -> ``{name: (N,)}``."""
    rows = []
    for img, lab in zip(subjects.images, subjects.labels, strict=True):
        rows.append(label_measures(lab, subjects.voxel_mm) | intensity_measures(img, lab, subjects.voxel_mm))
    return {
        m: np.array([r[m] for r in rows], dtype=np.float64) for m in (*MEASURES, "icv_ml", "csf_fraction")
    }


def _per_subject(s: Subjects, m: dict[str, np.ndarray]) -> dict[str, list[Any]]:
    """Covariates and label measures of every subject (for the plots of ``evaluate --html``)."""
    return {
        "ids": list(s.ids),
        "age": s.ages.tolist(),
        "sex": list(s.sexes),
        "diagnosis": list(s.diagnoses),
        **{k: m[k].tolist() for k in ("btf", "csf_fraction", "csf_ml", "icv_ml")},
    }


def age_slope(ages: np.ndarray, values: np.ndarray, groups: Sequence[Any]) -> dict[str, Any]:
    """OLS ``value = slope · age + intercept[group]`` (common slope, one intercept per group).

    Subjects with unknown age or non-finite value are dropped; groups need at least 2 subjects.

    Returns ``{"slope", "slope_se", "n", "groups", "per_group": {group: slope of that group alone}}``
    (``slope`` NaN if the ages do not vary within any group).
    """
    ages = np.asarray(ages, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    keep = np.isfinite(ages) & np.isfinite(values)
    g = [str(x) for x, k in zip(groups, keep, strict=True) if k]
    a, y = ages[keep], values[keep]
    names = sorted({x for x in g if g.count(x) >= 2})
    sel = np.array([x in names for x in g], dtype=bool)
    a, y, g = a[sel], y[sel], [x for x, s in zip(g, sel, strict=True) if s]
    out: dict[str, Any] = {
        "slope": math.nan,
        "slope_se": math.nan,
        "n": len(a),
        "groups": names,
        "per_group": {},
    }
    if not names:
        return out
    X = np.zeros((len(a), 1 + len(names)))
    X[:, 0] = a
    for j, name in enumerate(names):
        X[:, 1 + j] = [x == name for x in g]
    # centre age within groups for the slope's identifiability check
    within = sum(float(np.var(a[X[:, 1 + j] > 0])) for j in range(len(names)))
    if within <= 1e-12:
        return out
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    resid = y - X @ coef
    dof = max(len(a) - X.shape[1], 1)
    cov = np.linalg.pinv(X.T @ X) * float(resid @ resid) / dof
    out["slope"] = float(coef[0])
    out["slope_se"] = float(math.sqrt(max(cov[0, 0], 0.0)))
    for j, name in enumerate(names):
        m = X[:, 1 + j] > 0
        if m.sum() >= 3 and np.var(a[m]) > 1e-12:
            out["per_group"][name] = float(np.polyfit(a[m], y[m], 1)[0])
    return out


def slope_error_pct(slope: float, target: float) -> float:
    """``100 · |slope − target| / |target|`` (NaN if either is NaN or target is 0)."""
    if not (math.isfinite(slope) and math.isfinite(target)) or target == 0:
        return math.nan
    return 100.0 * abs(slope - target) / abs(target)


def _groups(s: Subjects) -> list[str]:
    return [f"{x or 'n/a'}/{d or 'n/a'}" for x, d in zip(s.sexes, s.diagnoses, strict=True)]


def pairwise_ms_ssim(images: np.ndarray, n_pairs: int = 30, seed: int = 0) -> dict[str, float]:
    """Mean ± SD 3D MS-SSIM over up to ``n_pairs`` random distinct pairs of images (N, X, Y, Z) in [0, 1]."""
    import torch

    from fl_app.evaluate.metrics import ms_ssim

    n = len(images)
    if n < 2:
        return {"mean": math.nan, "sd": math.nan, "pairs": 0}
    all_pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(all_pairs))[:n_pairs]
    pairs = [all_pairs[k] for k in idx]
    a = torch.from_numpy(np.stack([images[i] for i, _ in pairs]).clip(0, 1)).float()[:, None]
    b = torch.from_numpy(np.stack([images[j] for _, j in pairs]).clip(0, 1)).float()[:, None]
    vals = torch.cat([ms_ssim(a[k : k + 8], b[k : k + 8]) for k in range(0, len(pairs), 8)]).numpy()
    return {"mean": float(vals.mean()), "sd": float(vals.std()), "pairs": len(pairs), "values": vals.tolist()}


def mmd2(x: np.ndarray, y: np.ndarray, bandwidth: float) -> float:
    """Unbiased MMD² between samples x (n, F) and y (m, F) with a Gaussian kernel of ``bandwidth``."""

    def k(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        d2 = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
        return np.exp(-d2 / (2.0 * bandwidth**2))

    n, m = len(x), len(y)
    if n < 2 or m < 2:
        return math.nan
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    return float(
        (kxx.sum() - np.trace(kxx)) / (n * (n - 1))
        + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        - 2 * kxy.mean()
    )


def mmd_vs_floor(synth: np.ndarray, real: np.ndarray, n_splits: int = 20, seed: int = 0) -> dict[str, float]:
    """MMD² synthetic-vs-real-half against the real-half-vs-real-half floor, on features standardised
    by the real set, averaged over ``n_splits`` random half splits of the real set."""
    mu, sd = real.mean(0), real.std(0)
    sd = np.where(sd > 1e-12, sd, 1.0)
    zr, zs = (real - mu) / sd, (synth - mu) / sd
    zs = np.nan_to_num(zs, nan=0.0, posinf=0.0, neginf=0.0)
    zr = np.nan_to_num(zr, nan=0.0)
    d = np.sqrt(((zr[:, None] - zr[None]) ** 2).sum(-1))
    bw = float(np.median(d[np.triu_indices(len(zr), 1)])) if len(zr) > 2 else 1.0
    bw = bw if bw > 0 else 1.0
    rng = np.random.default_rng(seed)
    floor, score = [], []
    half = len(zr) // 2
    for _ in range(n_splits):
        p = rng.permutation(len(zr))
        a, b = zr[p[:half]], zr[p[half:]]
        floor.append(mmd2(a, b, bw))
        s = zs[rng.permutation(len(zs))[: len(b)]] if len(zs) > len(b) else zs
        score.append(mmd2(s, a, bw))
    return {
        "synthetic_vs_real": float(np.nanmean(score)),
        "real_vs_real": float(np.nanmean(floor)),
        "bandwidth": bw,
        "splits": n_splits,
    }


def group_contrasts(s: Subjects, m: dict[str, np.ndarray], at_age: float = 75.0) -> dict[str, float]:
    """Covariate effects that do not show in an age slope.

    ``btf_ad_minus_cn_at_75``: AD minus CN brain-tissue fraction at ``at_age``, each from its own OLS line of
    BTF on age (needs 3 subjects with varying ages per group, else NaN); ``icv_male_female_ratio``: mean
    intracranial volume of men over that of women (label count × voxel volume).
    """
    ages = np.asarray(s.ages, dtype=np.float64)

    def at(dx: str) -> float:
        sel = np.array([d == dx for d in s.diagnoses]) & np.isfinite(ages) & np.isfinite(m["btf"])
        if sel.sum() < 3 or np.var(ages[sel]) <= 1e-12:
            return math.nan
        slope, icpt = np.polyfit(ages[sel], m["btf"][sel], 1)
        return float(slope * at_age + icpt)

    def icv(sex: str) -> float:
        sel = np.array([x == sex for x in s.sexes]) & np.isfinite(m["icv_ml"])
        return float(m["icv_ml"][sel].mean()) if sel.any() else math.nan

    return {"btf_ad_minus_cn_at_75": at("AD") - at("CN"), "icv_male_female_ratio": icv("M") / icv("F")}


def contrast_intervals(
    s: Subjects, m: dict[str, np.ndarray], n_boot: int = 1000, seed: int = 0, at_age: float = 75.0
) -> dict[str, list[float]]:
    """95 % percentile-bootstrap intervals of :func:`group_contrasts` (subjects resampled with replacement within
    each (sex, diagnosis) group, so every group keeps its size): ``{contrast: [low, high]}`` (NaN where a
    resample leaves a contrast undefined too often)."""
    groups = np.array(_groups(s), dtype=object)
    idx_by_group = [np.flatnonzero(groups == g) for g in dict.fromkeys(groups.tolist())]
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {}
    for _ in range(n_boot):
        idx = np.concatenate([rng.choice(ix, size=len(ix), replace=True) for ix in idx_by_group])
        sub = Subjects(s.images[:0], s.labels[:0], np.asarray(s.ages)[idx], [s.sexes[i] for i in idx],
                       [s.diagnoses[i] for i in idx], s.voxel_mm)  # fmt: skip
        for k, v in group_contrasts(sub, {k2: m[k2][idx] for k2 in ("btf", "icv_ml")}, at_age).items():
            draws.setdefault(k, []).append(v)
    out: dict[str, list[float]] = {}
    for k, v in draws.items():
        a = np.asarray(v, dtype=np.float64)
        a = a[np.isfinite(a)]
        ok = len(a) >= 0.9 * n_boot
        out[k] = [float(np.quantile(a, q)) if ok else math.nan for q in (0.025, 0.975)]
    return out


def _law_contrasts(at_age: float = 75.0) -> dict[str, float]:
    from fl_app.data.simulate import generating_law

    def law(sex: str, dx: str) -> dict[str, float]:
        return generating_law(at_age, sex, dx)

    return {
        "btf_ad_minus_cn_at_75": law("F", "AD")["brain_tissue_fraction"]
        - law("F", "CN")["brain_tissue_fraction"],
        "icv_male_female_ratio": law("M", "CN")["intracranial_volume_ml"]
        / law("F", "CN")["intracranial_volume_ml"],
    }


def _law_values(s: Subjects, key: str) -> np.ndarray | None:
    try:
        from fl_app.data.simulate import generating_law
    except ImportError:
        return None
    out = []
    for a, x, d in zip(s.ages, s.sexes, s.diagnoses, strict=True):
        if not math.isfinite(a) or x is None or d is None:
            out.append(math.nan)
        else:
            out.append(generating_law(float(a), x, d)[key])
    return np.array(out)


def evaluate(
    synth: Subjects,
    reference: Subjects | None,
    simulated: bool = False,
    n_pairs: int = 30,
    seed: int = 0,
) -> dict[str, Any]:
    """All metrics (JSON-able dict with a flat ``summary``).

    Args:
        synth: the synthetic cohort (prescribed covariates).
        reference: real subjects on the same grid (None: fidelity vs the law only, no realism).
        simulated: the reference sites were written by ``synthbrain simulate``: also compare the
            BTF slopes with the generating law.
        n_pairs: image pairs per MS-SSIM estimate.
        seed: RNG seed of pair and split choices.
    """
    res: dict[str, Any] = {"n_synthetic": len(synth), "n_reference": len(reference) if reference else 0}
    ms = measure(synth)
    mr = measure(reference) if reference is not None else None
    fid: dict[str, Any] = {}
    summary: dict[str, Any] = {"n_synthetic": len(synth), "n_reference": res["n_reference"]}
    for name in MEASURES:
        entry: dict[str, Any] = {"synthetic": age_slope(synth.ages, ms[name], _groups(synth))}
        entry["synthetic_mean"] = float(np.nanmean(ms[name]))
        if mr is not None and reference is not None:
            entry["reference"] = age_slope(reference.ages, mr[name], _groups(reference))
            entry["reference_mean"] = float(np.nanmean(mr[name]))
            entry["slope_error_pct_vs_reference"] = slope_error_pct(
                entry["synthetic"]["slope"], entry["reference"]["slope"]
            )
        if simulated and name in _LAW_KEY:
            law = _law_values(synth, _LAW_KEY[name])
            if law is not None:
                entry["law"] = age_slope(synth.ages, law, _groups(synth))
                entry["slope_error_pct_vs_law"] = slope_error_pct(
                    entry["synthetic"]["slope"], entry["law"]["slope"]
                )
            law_r = _law_values(reference, _LAW_KEY[name]) if "reference" in entry else None
            if law_r is not None and reference is not None:  # the control: the real subjects' own error
                entry["reference_slope_error_pct_vs_law"] = slope_error_pct(
                    entry["reference"]["slope"], age_slope(reference.ages, law_r, _groups(reference))["slope"]
                )
        fid[name] = entry
    res["fidelity"] = fid
    res["per_subject"] = {"synthetic": _per_subject(synth, ms)}
    if mr is not None and reference is not None:
        res["per_subject"]["reference"] = _per_subject(reference, mr)
    res["law_compared"] = bool(simulated)
    b = fid["btf"]
    summary["btf_age_slope_synthetic"] = b["synthetic"]["slope"]
    if "reference" in b:
        summary["btf_age_slope_reference"] = b["reference"]["slope"]
        summary["btf_slope_error_pct_vs_reference"] = b["slope_error_pct_vs_reference"]
    if "law" in b:
        summary["btf_age_slope_law"] = b["law"]["slope"]
        summary["btf_slope_error_pct_vs_law"] = b["slope_error_pct_vs_law"]
    if "slope_error_pct_vs_law" in fid["btf_intensity"]:
        summary["btf_intensity_slope_error_pct_vs_law"] = fid["btf_intensity"]["slope_error_pct_vs_law"]
    if "slope_error_pct_vs_reference" in fid["btf_intensity"]:
        summary["btf_intensity_slope_error_pct_vs_reference"] = fid["btf_intensity"][
            "slope_error_pct_vs_reference"
        ]
    # how far the real reference subjects themselves are from the law (the measure's floor)
    for name in _LAW_KEY:
        if "reference_slope_error_pct_vs_law" in fid[name]:
            summary[f"{name}_slope_error_pct_vs_law_reference"] = fid[name][
                "reference_slope_error_pct_vs_law"
            ]
    if "slope_error_pct_vs_reference" in fid["csf_ml"]:
        summary["csf_ml_slope_error_pct_vs_reference"] = fid["csf_ml"]["slope_error_pct_vs_reference"]
    contrasts = {"synthetic": group_contrasts(synth, ms)}
    if mr is not None and reference is not None:
        contrasts["reference"] = group_contrasts(reference, mr)
    if simulated:
        contrasts["law"] = _law_contrasts()
    res["contrasts"] = contrasts
    res["contrast_intervals"] = {"synthetic": contrast_intervals(synth, ms, seed=seed)}
    for key, ci in res["contrast_intervals"]["synthetic"].items():
        summary[f"{key}_synthetic_ci95"] = ci
    for key, value in contrasts["synthetic"].items():
        summary[f"{key}_synthetic"] = value
        for against in ("reference", "law"):
            if against in contrasts:
                summary[f"{key}_{against}"] = contrasts[against][key]
    if "law" in contrasts:
        c, law = contrasts["synthetic"], contrasts["law"]
        summary["btf_ad_minus_cn_error_pct_vs_law"] = slope_error_pct(
            c["btf_ad_minus_cn_at_75"], law["btf_ad_minus_cn_at_75"]
        )
        summary["icv_ratio_error_vs_law"] = abs(c["icv_male_female_ratio"] - law["icv_male_female_ratio"])
        if "reference" in contrasts:
            r = contrasts["reference"]
            summary["btf_ad_minus_cn_error_pct_vs_law_reference"] = slope_error_pct(
                r["btf_ad_minus_cn_at_75"], law["btf_ad_minus_cn_at_75"]
            )
            summary["icv_ratio_error_vs_law_reference"] = abs(
                r["icv_male_female_ratio"] - law["icv_male_female_ratio"]
            )
    ss = pairwise_ms_ssim(synth.images, n_pairs, seed)
    res["ms_ssim"] = {"synthetic": ss}
    summary["ms_ssim_synthetic"] = ss["mean"]
    if reference is not None:
        rr = pairwise_ms_ssim(reference.images, n_pairs, seed)
        res["ms_ssim"]["reference"] = rr
        summary["ms_ssim_reference"] = rr["mean"]
        summary["ms_ssim_gap"] = abs(ss["mean"] - rr["mean"])
        fs = np.stack(
            [
                feature_vector(i, lab, synth.voxel_mm)
                for i, lab in zip(synth.images, synth.labels, strict=True)
            ]
        )
        fr = np.stack(
            [
                feature_vector(i, lab, reference.voxel_mm)
                for i, lab in zip(reference.images, reference.labels, strict=True)
            ]
        )
        mmd = mmd_vs_floor(fs, fr, seed=seed)
        res["distribution"] = {
            "features": list(FEATURE_NAMES),
            "mmd2": mmd,
            "feature_means": {"synthetic": fs.mean(0).tolist(), "reference": fr.mean(0).tolist()},
        }
        summary["mmd2_synthetic_vs_real"] = mmd["synthetic_vs_real"]
        summary["mmd2_real_vs_real"] = mmd["real_vs_real"]
    res["summary"] = summary
    return res


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, np.generic):
        return _clean(v.item())
    return v


def _is_simulated(bids_dir: Path) -> bool:
    f = Path(bids_dir) / "dataset_description.json"
    if not f.is_file():
        return False
    gen = json.loads(f.read_text()).get("GeneratedBy") or []
    return any(g.get("Name") == "synthbrain-simulate" for g in gen if isinstance(g, dict))


def _run_evaluate(args: argparse.Namespace) -> int:
    from fl_app.generate.cohort_folder import cohort_profile

    try:
        profile = cohort_profile(args.cohort, args.profile)
        synth = load_cohort_subjects(args.cohort)
        ref = load_reference_subjects(args.reference, profile, args.cache_dir) if args.reference else None
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    simulated = args.law or (bool(args.reference) and all(_is_simulated(Path(b)) for b in args.reference))
    res = evaluate(synth, ref, simulated=simulated, n_pairs=args.pairs, seed=args.seed)
    if args.audit:
        from fl_app.evaluate.audit import audit_cohort_locally, combine_site_audits

        res["audit"] = combine_site_audits(
            audit_cohort_locally(args.cohort, args.audit, profile, args.audit_quantile)
        )
        res["summary"]["audit_flagged"] = res["audit"]["n_flagged"]
        res["summary"]["audit_min_distance_over_threshold"] = res["audit"]["min_distance_over_threshold"]
    res = _clean(res)
    text = json.dumps(res, indent=2)
    qc = Path(args.cohort) / "qc"
    qc.mkdir(exist_ok=True)
    (qc / "evaluation.json").write_text(text + "\n")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    for k, v in res["summary"].items():
        print(f"{k:40s} {v:.4g}" if isinstance(v, float) else f"{k:40s} {v}")
    from fl_app.evaluate.plots import write_evaluation_html

    pages = [qc / "evaluation.html"] + ([Path(args.html)] if args.html else [])
    for page in pages:
        write_evaluation_html(res, page, title=f"synthbrain evaluation: {Path(args.cohort).resolve().name}")
    print(f"evaluation plots: {', '.join(str(p) for p in pages)}")
    from fl_app.generate.qc import write_qc

    print(f"QC report updated: {write_qc(args.cohort)}")
    return 0


def add_evaluate_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``synthbrain evaluate`` to an argparse subparsers object."""
    p = subparsers.add_parser(
        "evaluate",
        help="conditioning fidelity, realism/diversity and memorisation audit of a synthetic cohort",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--cohort", required=True, help="synthetic cohort folder (synthbrain sample --out)")
    p.add_argument("--reference", nargs="+", help="real BIDS folder(s) with label maps (derivatives/labels)")
    p.add_argument(
        "--audit", nargs="+", metavar="BIDS", help="also run the memorisation audit against these sites"
    )
    p.add_argument("--audit-quantile", type=float, default=0.05)
    p.add_argument("--law", action="store_true", help="compare with the simulator's generating law")
    p.add_argument("--profile", help="profile (default: the cohort's code/synthbrain/profile.yaml)")
    p.add_argument("--pairs", type=int, default=30, help="image pairs per MS-SSIM estimate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", help="preprocessing cache for the reference")
    p.add_argument("--json", help="write all results here (also written to COHORT/qc/evaluation.json)")
    p.add_argument(
        "--html",
        metavar="OUT.html",
        help="also write the plots page here (always written to COHORT/qc/evaluation.html): tissue fractions "
        "against age per diagnosis with the law's or the reference's curve, intracranial volume by sex, "
        "diversity (MS-SSIM pairs) synthetic vs real, the audit's distances against its threshold",
    )
    p.set_defaults(func=_run_evaluate)
    return p
