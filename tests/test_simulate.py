"""Simulated sites obey their generating law, differ from each other, are deterministic and valid BIDS."""

from __future__ import annotations

import csv
import hashlib
import itertools
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fl_app.config import load_profile
from fl_app.data.simulate import (
    add_simulate_parser,
    generating_law,
    simulate_sites,
    site_grid,
    site_spec,
)
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
    assert np.corrcoef(btf, law)[0, 1] > 0.9
    # the individual spread around the law is the modelled one (sd 0.010), not zero and not larger
    assert 0.003 < np.std(btf - law) < 0.02


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
    # measured intracranial volumes are on the law's scale (within 10 % of its sex means)
    for s in ("F", "M"):
        assert abs(icv[s] / generating_law(70, s, "CN")["intracranial_volume_ml"] - 1) < 0.1


def test_generating_law():
    law = generating_law
    for sex in ("F", "M"):
        btf = [law(a, sex, "CN")["brain_tissue_fraction"] for a in (45, 60, 75, 90)]
        assert all(x > y for x, y in itertools.pairwise(btf))  # atrophy grows with age
    cn = [law(a, "F", "CN")["brain_tissue_fraction"] for a in (50, 85)]
    mci = [law(a, "F", "MCI")["brain_tissue_fraction"] for a in (50, 85)]
    ad = [law(a, "F", "AD")["brain_tissue_fraction"] for a in (50, 85)]
    assert all(ad[i] < mci[i] < cn[i] for i in range(2))
    assert (cn[0] - cn[1]) < (ad[0] - ad[1])  # faster with AD
    r = law(70, "M", "MCI")
    assert r["csf_fraction"] == pytest.approx(1 - r["brain_tissue_fraction"])
    assert r["intracranial_volume_ml"] > law(70, "F", "MCI")["intracranial_volume_ml"]
    assert r["head_scale"] == pytest.approx(r["head_volume_scale"] ** (1 / 3))
    with pytest.raises(ValueError):
        law(70, "X", "CN")
    with pytest.raises(ValueError):
        law(70, "F", "PD")


def test_labels_match_t1_contrast_and_full_head(sites):
    """Per image: mean T1 in WM > GM > CSF; bright non-brain tissue (scalp) outside the brain."""
    for site in sites:
        for t1 in sorted(site.glob("sub-*/anat/*_T1w.nii.gz"))[:4]:
            sub = t1.name.split("_")[0]
            img = nib.load(str(t1))
            lab_img = nib.load(str(site / "derivatives" / "labels" / sub / "anat" / f"{sub}_dseg.nii.gz"))
            assert lab_img.shape == img.shape and np.allclose(lab_img.affine, img.affine)
            a = np.asarray(img.dataobj, dtype=np.float32)
            lab = np.asarray(lab_img.dataobj)
            assert set(np.unique(lab)) == {0, 1, 2, 3}
            csf, gm, wm = (a[lab == k].mean() for k in (1, 2, 3))
            assert wm > gm > csf, (t1.name, csf, gm, wm)
            scalp = (lab == 0) & (a > gm)
            assert scalp.sum() > 0.02 * (lab > 0).sum()  # a head, not a skull-stripped brain


def test_site_settings_deterministic_for_any_number_of_sites():
    prof = load_profile("cpu-demo")
    specs = [site_spec(i, prof, seed=5) for i in range(9)]
    assert specs == [site_spec(i, prof, seed=5) for i in range(9)]
    assert [s.orientation for s in specs[:3]] == ["RAS", "LIA", "LPS"]
    assert len({s.dtype for s in specs[:3]}) == 3
    vox = [s.voxel_mm for s in specs]
    assert max(vox[2]) / min(vox[2]) > 1.4  # an anisotropic site
    assert max(vox[0]) / min(vox[0]) < 1.05  # a near-isotropic one
    assert len(set(vox)) == len(vox)  # later sites are jittered copies, all distinct
    assert specs[4].noise_sigma != specs[0].noise_sigma
    for s in specs:
        _shape, aff = site_grid(s)
        assert "".join(nib.aff2axcodes(aff)) == s.orientation
        assert np.allclose(np.abs(np.linalg.det(aff[:3, :3])), np.prod(s.voxel_mm))
    # voxel sizes follow the profile's spacing
    full = site_spec(0, load_profile("full-1mm"), seed=5)
    assert full.voxel_mm[0] == pytest.approx(specs[0].voxel_mm[0] / 3, rel=0.01)


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
    # byte-identical files, metadata included
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


def test_cli_parser(tmp_path, capsys):
    import argparse

    parser = argparse.ArgumentParser()
    add_simulate_parser(parser.add_subparsers())
    out = tmp_path / "sim"
    args = parser.parse_args(
        ["simulate", "--sites", "1", "--subjects-per-site", "1", "--seed", "2", "--out", str(out)]
    )
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "site-1: 1 subjects" in text and "RAS" in text
    assert (out / "site-1" / "participants.tsv").exists()


def test_each_site_is_valid_bids(sites):
    for site in sites:
        errors, _warnings = run_bids_validator(site)
        assert errors == [], errors


def test_first_site_writes_the_same_site_as_a_longer_call(tmp_path):
    """``first_site=1`` writes exactly the ``site-2`` a two-site call writes (scanner preset, subjects, images):
    a bench can take sites whose preset a checkpoint's public data did not have."""
    prof = load_profile("cpu-demo")
    both = simulate_sites(tmp_path / "both", 2, 1, prof, seed=3)
    (alone,) = simulate_sites(tmp_path / "alone", 1, 1, prof, seed=3, first_site=1)
    assert alone.name == both[1].name == "site-2"
    files = sorted(p.relative_to(alone) for p in alone.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(both[1]) for p in both[1].rglob("*") if p.is_file())
    for f in files:
        assert (alone / f).read_bytes() == (both[1] / f).read_bytes(), f
    with pytest.raises(ValueError, match="first_site"):
        simulate_sites(tmp_path / "bad", 1, 1, prof, seed=3, first_site=-1)
