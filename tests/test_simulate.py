"""Simulated sites obey their generating law, differ from each other, are deterministic and valid BIDS."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fl_app.config import load_profile
from fl_app.data.simulate import generating_law, simulate_sites
from tests.bids import run_bids_validator


def _rows(site: Path) -> list[dict[str, str]]:
    with open(site / "participants.tsv", newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


@pytest.fixture(scope="module")
def sites(tmp_path_factory) -> list[Path]:
    out = tmp_path_factory.mktemp("sim")
    return simulate_sites(out, n_sites=2, subjects_per_site=12, profile=load_profile("cpu-demo"), seed=7)


@pytest.fixture(scope="module")
def measured(sites) -> list[dict]:
    """Per subject: covariates, BTF and ICV measured from the written label map."""
    out = []
    for site in sites:
        for r in _rows(site):
            sub = r["participant_id"]
            img = nib.load(str(site / "derivatives" / "labels" / sub / "anat" / f"{sub}_dseg.nii.gz"))
            lab = np.asarray(img.dataobj)
            vox_ml = abs(np.linalg.det(img.affine[:3, :3])) / 1000.0
            icv = np.isin(lab, (1, 2, 3)).sum()
            out.append(
                {
                    "age": float(r["age"]),
                    "sex": r["sex"],
                    "dx": r["diagnosis"],
                    "btf": np.isin(lab, (2, 3)).sum() / icv,
                    "icv_ml": icv * vox_ml,
                    "site": site.name,
                }
            )
    return out


def test_btf_falls_with_age(measured):
    age = np.array([m["age"] for m in measured])
    btf = np.array([m["btf"] for m in measured])
    assert np.corrcoef(age, btf)[0, 1] < -0.5


def test_law_is_tracked(measured):
    law = np.array([generating_law(m["age"], m["sex"], m["dx"])["brain_tissue_fraction"] for m in measured])
    btf = np.array([m["btf"] for m in measured])
    assert np.abs(btf - law).mean() < 0.02
    assert np.corrcoef(btf, law)[0, 1] > 0.8


def test_alzheimers_lower_at_equal_age(measured):
    """Residuals after regressing BTF on age (and age²): AD below CN."""
    age = np.array([m["age"] for m in measured])
    btf = np.array([m["btf"] for m in measured])
    dx = np.array([m["dx"] for m in measured])
    x = np.stack([np.ones_like(age), age, age**2], 1)
    coef, *_ = np.linalg.lstsq(x, btf, rcond=None)
    resid = btf - x @ coef
    assert (dx == "AD").any() and (dx == "CN").any()
    assert resid[dx == "AD"].mean() < resid[dx == "CN"].mean()
    # and the law itself says so at every age
    for a in (55, 70, 85):
        assert (
            generating_law(a, "F", "AD")["brain_tissue_fraction"]
            < generating_law(a, "F", "CN")["brain_tissue_fraction"]
        )


def test_men_have_larger_heads(measured):
    icv = {s: np.mean([m["icv_ml"] for m in measured if m["sex"] == s]) for s in ("F", "M")}
    assert icv["M"] > icv["F"]


def test_sites_differ(sites):
    imgs = [nib.load(str(next(iter(sorted(s.glob("sub-*/anat/*_T1w.nii.gz")))))) for s in sites]
    codes = [nib.aff2axcodes(i.affine) for i in imgs]
    zooms = [tuple(np.round(i.header.get_zooms()[:3], 2)) for i in imgs]
    dtypes = [i.get_data_dtype() for i in imgs]
    assert codes[0] != codes[1] or zooms[0] != zooms[1] or dtypes[0] != dtypes[1]
    ages = [np.mean([float(r["age"]) for r in _rows(s)]) for s in sites]
    mixes = [sorted(r["diagnosis"] for r in _rows(s)) for s in sites]
    assert ages[0] != ages[1] or mixes[0] != mixes[1]


def test_deterministic(tmp_path):
    prof = load_profile("cpu-demo")
    a = simulate_sites(tmp_path / "a", 1, 2, prof, seed=3)[0]
    b = simulate_sites(tmp_path / "b", 1, 2, prof, seed=3)[0]
    c = simulate_sites(tmp_path / "c", 1, 2, prof, seed=4)[0]

    def digest(root: Path) -> dict[str, str]:
        out = {}
        for p in sorted(root.rglob("*.nii.gz")):
            out[str(p.relative_to(root))] = hashlib.sha256(
                np.asarray(nib.load(str(p)).dataobj).tobytes()
            ).hexdigest()
        return out

    assert digest(a) == digest(b)
    assert digest(a) != digest(c)


def test_each_site_is_valid_bids(sites):
    for site in sites:
        errors, _warnings = run_bids_validator(site)
        assert errors == [], errors
