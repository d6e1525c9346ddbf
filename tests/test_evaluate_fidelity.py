"""Evaluation: the fidelity regression recovers the simulator's known age slope; realism metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fl_app.data.covariates import DIAGNOSES, SEXES
from fl_app.data.simulate import BTF_INDIVIDUAL_SD, generating_law
from fl_app.evaluate.features import FEATURE_NAMES, feature_vector, label_measures
from fl_app.evaluate.fidelity import Subjects, age_slope, evaluate, mmd2, slope_error_pct

N = 20
VOX = (6.0, 6.0, 6.0)
_R = np.sqrt(((np.indices((N, N, N)) - (N - 1) / 2) ** 2).sum(0))
_IC = _R < 8.5
_ORDER = np.argsort(_R[_IC], kind="stable")  # intracranial voxels, centre outwards


def phantom(btf: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Label map with exactly round(btf · ICV) tissue voxels (CSF = 30 % central 'ventricles' + 70 %
    outer shell; WM inside GM) and a T1w-like image (CSF < GM < WM + noise)."""
    n = int(_IC.sum())
    n_csf = round((1.0 - btf) * n)
    n_vent = round(0.3 * n_csf)
    cls = np.full(n, 2, np.uint8)
    cls[_ORDER[:n_vent]] = 1
    cls[_ORDER[n - (n_csf - n_vent) :]] = 1
    tissue = _ORDER[n_vent : n - (n_csf - n_vent)]
    cls[tissue[: len(tissue) // 2]] = 3
    lab = np.zeros((N, N, N), np.uint8)
    lab[_IC] = cls
    img = np.choose(lab, [0.05, 0.25, 0.55, 0.8]).astype(np.float32) + rng.normal(0, 0.03, lab.shape).astype(
        np.float32
    )
    return img.clip(0, 1), lab


def simulated_cohort(n: int, seed: int, slope_scale: float = 1.0) -> Subjects:
    """Subjects drawn from the generating law (BTF = law + N(0, sd)); ``slope_scale`` distorts the age
    effect (1 = the law)."""
    rng = np.random.default_rng(seed)
    ages = rng.uniform(50, 85, n).round(1)
    sexes = [SEXES[i % 2] for i in range(n)]
    dxs = [DIAGNOSES[i % 3] for i in range(n)]
    imgs, labs = [], []
    for a, s, d in zip(ages, sexes, dxs, strict=True):
        base = generating_law(70.0, s, d)["brain_tissue_fraction"]
        law = generating_law(a, s, d)["brain_tissue_fraction"]
        btf = base + slope_scale * (law - base) + rng.normal(0, BTF_INDIVIDUAL_SD)
        im, lb = phantom(btf, rng)
        imgs.append(im)
        labs.append(lb)
    return Subjects(np.stack(imgs), np.stack(labs), ages, sexes, dxs, VOX, [f"s{i}" for i in range(n)])


def test_label_measures_exact():
    rng = np.random.default_rng(0)
    _, lab = phantom(0.8, rng)
    m = label_measures(lab, VOX)
    assert m["btf"] == pytest.approx(0.8, abs=1.0 / _IC.sum())
    assert m["icv_ml"] == pytest.approx(_IC.sum() * 0.216)
    assert 0 < m["deep_csf_ml"] < m["csf_ml"]


def test_regression_recovers_known_slope():
    s = simulated_cohort(90, seed=1)
    res = evaluate(s, None, simulated=True, n_pairs=4)
    fid = res["fidelity"]
    # the label measure follows the law; so does the independent intensity-based measure
    assert fid["btf"]["slope_error_pct_vs_law"] < 10.0
    assert fid["btf_intensity"]["slope_error_pct_vs_law"] < 15.0
    law = fid["btf"]["law"]["slope"]
    assert -0.006 < law < -0.002  # the law's own slope over 50–85 y
    assert abs(fid["btf"]["synthetic"]["slope"] - law) < 3 * fid["btf"]["synthetic"]["slope_se"] + 1e-4
    # a generator that halves the age effect is caught
    bad = evaluate(simulated_cohort(90, seed=2, slope_scale=0.5), None, simulated=True, n_pairs=4)
    assert bad["fidelity"]["btf"]["slope_error_pct_vs_law"] > 35.0


def test_age_slope_ancova_and_errors():
    ages = np.array([50, 60, 70, 80, 50, 60, 70, 80, math.nan], float)
    groups = ["a"] * 4 + ["b"] * 4 + ["a"]
    y = -0.01 * ages + np.where(np.array(groups) == "a", 1.0, 2.0)
    r = age_slope(ages, y, groups)
    assert r["slope"] == pytest.approx(-0.01) and r["n"] == 8
    assert r["per_group"] == {"a": pytest.approx(-0.01), "b": pytest.approx(-0.01)}
    assert math.isnan(age_slope(np.full(4, 70.0), np.arange(4.0), ["a"] * 4)["slope"])
    assert slope_error_pct(-0.0012, -0.001) == pytest.approx(20.0)
    assert math.isnan(slope_error_pct(1.0, 0.0))


def test_realism_metrics_against_reference():
    real = simulated_cohort(24, seed=3)
    synth = simulated_cohort(12, seed=4)
    res = evaluate(synth, real, simulated=True, n_pairs=10)
    summ = res["summary"]
    assert summ["ms_ssim_gap"] < 0.1  # same generator: same diversity
    assert summ["mmd2_synthetic_vs_real"] < summ["mmd2_real_vs_real"] + 0.1
    # a collapsed generator (one image repeated) is flagged by both metrics
    collapsed = Subjects(np.repeat(synth.images[:1], 12, 0), np.repeat(synth.labels[:1], 12, 0), synth.ages,
                         synth.sexes, synth.diagnoses, VOX)  # fmt: skip
    bad = evaluate(collapsed, real, n_pairs=10)["summary"]
    assert bad["ms_ssim_synthetic"] == pytest.approx(1.0, abs=1e-4)
    assert bad["ms_ssim_gap"] > 1.5 * summ["ms_ssim_gap"]  # phantoms differ little: small absolute gaps
    assert bad["mmd2_synthetic_vs_real"] > summ["mmd2_synthetic_vs_real"] + 0.2
    assert len(res["distribution"]["features"]) == len(FEATURE_NAMES)


def test_reference_controls_are_the_real_subjects_own_errors():
    """The ``*_reference`` controls score the real reference against the law exactly as the synthetic cohort is
    scored: a cohort that *is* the reference gets the same errors, and 0 against the reference."""
    real = simulated_cohort(24, seed=3)
    summ = evaluate(real, real, simulated=True, n_pairs=4)["summary"]
    for name in ("btf", "btf_intensity"):
        assert summ[f"{name}_slope_error_pct_vs_law_reference"] == pytest.approx(
            summ[f"{name}_slope_error_pct_vs_law"]
        )
    assert summ["btf_intensity_slope_error_pct_vs_reference"] == pytest.approx(0.0, abs=1e-9)
    assert summ["btf_ad_minus_cn_error_pct_vs_law_reference"] == pytest.approx(
        summ["btf_ad_minus_cn_error_pct_vs_law"]
    )
    assert summ["icv_ratio_error_vs_law_reference"] == pytest.approx(summ["icv_ratio_error_vs_law"])
    other = evaluate(simulated_cohort(12, seed=4, slope_scale=0.5), real, simulated=True, n_pairs=4)[
        "summary"
    ]
    assert other["btf_slope_error_pct_vs_law_reference"] == pytest.approx(summ["btf_slope_error_pct_vs_law"])
    assert other["btf_slope_error_pct_vs_law"] > other["btf_slope_error_pct_vs_law_reference"]


def test_contrast_intervals_cover_the_effect_and_shrink_with_subjects():
    """The bootstrap interval of AD − CN at 75 and of the ICV ratio holds the point estimate, covers the generating
    effect in most of 30 replicate cohorts (nominal 95 %), and four times the subjects about halve its width."""
    from fl_app.evaluate.fidelity import contrast_intervals, group_contrasts

    def cohort(n: int, seed: int):
        rng = np.random.default_rng(seed)
        ages = rng.uniform(50, 85, n)
        dxs = [("CN", "MCI", "AD")[i % 3] for i in range(n)]
        sexes = ["F", "M"] * (n // 2)
        btf = 0.82 - 0.003 * (ages - 60) - 0.05 * (np.array(dxs) == "AD") + rng.normal(0, 0.02, n)
        icv = np.where(np.array(sexes) == "M", 1480.0, 1330.0) + rng.normal(0, 100, n)
        s = Subjects(np.zeros((n, 1, 1, 1)), np.zeros((n, 1, 1, 1)), ages, sexes, dxs, VOX)
        m = {"btf": btf, "icv_ml": icv}
        return group_contrasts(s, m), contrast_intervals(s, m, n_boot=200, seed=seed)

    truth = {"btf_ad_minus_cn_at_75": -0.05, "icv_male_female_ratio": 1480 / 1330}
    covered = dict.fromkeys(truth, 0)
    for rep in range(30):
        point, ci = cohort(48, rep)
        for k, v in truth.items():
            assert ci[k][0] <= point[k] <= ci[k][1]
            covered[k] += ci[k][0] <= v <= ci[k][1]
    assert all(c >= 24 for c in covered.values()), covered
    small, big = cohort(48, 100)[1], cohort(192, 101)[1]
    width = {k: (big[k][1] - big[k][0]) / (small[k][1] - small[k][0]) for k in big}
    assert all(0.3 < w < 0.75 for w in width.values()), width


def test_mmd_and_features():
    rng = np.random.default_rng(0)
    x, y, z = rng.normal(size=(30, 4)), rng.normal(size=(30, 4)), rng.normal(1.0, 1.0, size=(30, 4))
    assert abs(mmd2(x, y, 2.0)) < 0.05 < mmd2(x, z, 2.0)
    img, lab = phantom(0.75, rng)
    f = feature_vector(img, lab, VOX)
    assert f.shape == (len(FEATURE_NAMES),) and np.isfinite(f).all()
    assert f[FEATURE_NAMES.index("btf_intensity")] == pytest.approx(0.75, abs=0.03)


def test_group_contrasts_recover_known_effects():
    """AD − CN BTF at 75 (each group's own age line) and the male / female ICV ratio are read from the
    measures; the law's values are the simulator's (−0.027 and 1480 / 1330)."""
    from fl_app.evaluate.fidelity import _law_contrasts, group_contrasts

    ages = np.array([60.0, 70.0, 80.0, 90.0] * 2 + [70.0, 75.0])
    dxs = ["CN"] * 4 + ["AD"] * 4 + ["MCI", "MCI"]
    sexes = ["F", "M"] * 5
    btf = np.where(np.array(dxs) == "AD", 0.80 - 0.004 * (ages - 60), 0.82 - 0.002 * (ages - 60))
    icv = np.where(np.array(sexes) == "M", 1500.0, 1250.0)
    s = Subjects(np.zeros((10, 1, 1, 1)), np.zeros((10, 1, 1, 1)), ages, sexes, dxs, VOX)
    c = group_contrasts(s, {"btf": btf, "icv_ml": icv})
    assert c["btf_ad_minus_cn_at_75"] == pytest.approx((0.80 - 0.06) - (0.82 - 0.03))
    assert c["icv_male_female_ratio"] == pytest.approx(1.2)
    law = _law_contrasts()
    at75 = {d: generating_law(75.0, "F", d)["brain_tissue_fraction"] for d in ("AD", "CN")}
    assert law["btf_ad_minus_cn_at_75"] == pytest.approx(at75["AD"] - at75["CN"]) and law[
        "btf_ad_minus_cn_at_75"
    ] == pytest.approx(-0.02 - 0.0018 * 30)
    assert law["icv_male_female_ratio"] == pytest.approx(1480 / 1330)
    few = Subjects(s.images[:5], s.labels[:5], ages[:5], sexes[:5], dxs[:5], VOX)  # one AD subject
    assert math.isnan(group_contrasts(few, {"btf": btf[:5], "icv_ml": icv[:5]})["btf_ad_minus_cn_at_75"])
