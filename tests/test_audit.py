"""Memorisation audit on real NIfTI files: a planted copy of a training image is flagged, an honest
(held-out) subject is not, and only aggregates leave the site."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

from fl_app.config import load_profile
from fl_app.data.cohort import read_bids
from fl_app.data.dataset import SiteDataset
from fl_app.data.nifti import save_nifti
from fl_app.evaluate.audit import add_audit_parser, combine_site_audits, site_audit, site_audit_arrays
from fl_app.generate.cohort_folder import gate_release, grid_affine
from tests.conftest import default_rows, write_bids_site, write_nifti

PROFILE = load_profile("cpu-demo", {"data": {"shape": [32, 32, 32], "spacing": [6.0, 6.0, 6.0], "brain_mask": "none"},
                                     "vqvae": {"channels": [8, 8], "num_res_channels": [8, 8]}})  # fmt: skip


def _subject(head, rng: np.random.Generator) -> np.ndarray:
    """A distinct head: random anisotropic scale, small rotation-free shift, smooth bias field, noise."""
    data, _, _ = head
    scale = rng.uniform(0.9, 1.1, 3)
    centre = (np.array(data.shape) - 1) / 2
    out = ndi.affine_transform(data, 1 / scale, offset=centre - centre / scale + rng.uniform(-1.5, 1.5, 3),
                               order=1)  # fmt: skip
    bias = ndi.gaussian_filter(rng.normal(0, 1, data.shape), 6)
    out = out * (1 + 0.15 * bias / bias.std())
    return (out + rng.normal(0, 15, data.shape)).clip(0, None).astype(np.float32)


def _site(root: Path, head, ids: list[str], rng) -> Path:
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text('{"Name": "t", "BIDSVersion": "1.9.0"}')
    with open(root / "participants.tsv", "w") as fh:
        fh.write("participant_id\tage\tsex\tdiagnosis\n")
        for i, s in enumerate(ids):
            fh.write(f"{s}\t{60 + i}\tF\tCN\n")
    for s in ids:
        write_nifti(root / s / "anat" / f"{s}_T1w.nii.gz", _subject(head, rng), head[2], np.int16)
    return root


@pytest.fixture(scope="module")
def setup(head, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("audit")
    rng = np.random.default_rng(42)
    site = _site(tmp / "site-a", head, [f"sub-t{i:02d}" for i in range(8)], rng)
    heldout = _site(tmp / "heldout", head, ["sub-h01", "sub-h02"], rng)
    cache = tmp / "cache"
    # image-only profile and label-free synthetic heads: no on-site label derivation (tests/test_anatomy.py has it)
    train = SiteDataset(read_bids(site).valid(), PROFILE, cache, derive_labels=False)
    held = SiteDataset(read_bids(heldout).valid(), PROFILE, cache, derive_labels=False)
    cohort = tmp / "cohort"
    samples = {
        "sub-copy": train[3]["image"][0].numpy(),  # planted: a training image, as a sample file
        "sub-honest1": held[0]["image"][0].numpy(),
        "sub-honest2": held[1]["image"][0].numpy(),
    }
    for pid, arr in samples.items():
        save_nifti(cohort / pid / "anat" / f"{pid}_T1w.nii.gz", arr, grid_affine(PROFILE))
    with open(cohort / "participants.tsv", "w", newline="") as fh:
        w = csv.writer(fh, delimiter="\t")
        w.writerow(["participant_id", "age", "sex", "diagnosis"])
        for pid in samples:
            w.writerow([pid, "70.0", "F", "CN"])
    return site, cohort, cache


def test_planted_copy_flagged_honest_not(setup):
    site, cohort, cache = setup
    res = site_audit(cohort, site, PROFILE, quantile=0.05, cache_dir=cache)
    assert res["flagged"] == ["sub-copy"]
    assert res["n_training"] == 8 and res["n_samples"] == 3
    assert res["min_distance"] < 0.01 * res["threshold"]  # the copy is (almost) at distance 0
    assert sum(res["histogram"]["counts"]) == 3
    # the honest samples are as far as real subjects are from one another
    assert res["histogram"]["counts"][0] == 1 and sum(res["histogram"]["counts"][4:]) == 2
    # nothing about individual training subjects leaves the site
    text = json.dumps(res)
    assert "sub-t" not in text
    combined = combine_site_audits([res])
    assert combined["flagged"] == {"sub-copy": ["site-a"]} and combined["n_flagged"] == 1
    assert gate_release(cohort, {p: "audit" for p in combined["flagged"]}) == ["sub-copy"]
    assert not (cohort / "sub-copy").exists()


def test_cli_and_arrays(setup, tmp_path):
    site, cohort, cache = setup
    import argparse

    ap = argparse.ArgumentParser()
    add_audit_parser(ap.add_subparsers())
    out = tmp_path / "a.json"
    args = ap.parse_args(["audit-site", "--cohort", str(cohort), "--bids", str(site), "--out", str(out),
                          "--cache-dir", str(cache), "--profile", str(_profile_yaml(tmp_path))])  # fmt: skip
    assert args.func(args) == 0
    assert json.loads(out.read_text())["site"] == "site-a"
    rng = np.random.default_rng(0)
    train = [rng.random((16, 16, 16)).astype(np.float32) for _ in range(4)]
    r = site_audit_arrays([train[1] + 1e-4, rng.random((16, 16, 16))], ["x", "y"], train, quantile=0.0)
    assert r["flagged"] == ["x"]
    with pytest.raises(ValueError):
        site_audit_arrays([train[0]], ["x"], train[:1])


def _profile_yaml(tmp: Path) -> Path:
    from fl_app.config import profile_to_yaml

    p = tmp / "profile.yaml"
    p.write_text(profile_to_yaml(PROFILE))
    return p


def test_audit_of_a_brain_extracted_profile_uses_the_label_maps(head, tmp_path):
    """With ``data.brain_mask: labels`` the site's volumes are brain-extracted with their label maps, as for
    training (the audit once dropped the labels and found no usable subject)."""
    masked = PROFILE.model_copy(update={"data": PROFILE.data.model_copy(update={"brain_mask": "labels"})})
    site = write_bids_site(tmp_path / "site-b", head, default_rows(5))
    train = SiteDataset(read_bids(site).valid(), masked, tmp_path / "cache")
    copy = train[2]["image"][0].numpy()
    assert (copy == 0).mean() > 0.3  # brain-extracted: the outside of the brain is 0
    cohort = tmp_path / "cohort"
    save_nifti(cohort / "sub-copy" / "anat" / "sub-copy_T1w.nii.gz", copy, grid_affine(masked))
    (cohort / "participants.tsv").write_text("participant_id\tage\tsex\tdiagnosis\nsub-copy\t70\tF\tCN\n")
    res = site_audit(cohort, site, masked, quantile=0.05, cache_dir=tmp_path / "cache")
    assert res["n_training"] == 5 and res["flagged"] == ["sub-copy"]


def test_a_look_alike_within_the_threshold_is_not_a_copy():
    """A sample between two near-twin training subjects (0.45 / 0.55 of the way, so d1 / d2 = 0.82) lies within
    the site threshold but is not a copy of either; a copy of a third subject (plus noise) is flagged."""
    rng = np.random.default_rng(1)
    base = [ndi.gaussian_filter(rng.random((16, 16, 16)), 1.0).astype(np.float32) for _ in range(6)]
    twin = base[0] + 0.05 * ndi.gaussian_filter(rng.standard_normal((16, 16, 16)), 1.0).astype(np.float32)
    train = [*base, twin]  # subjects 0 and 6 are near twins: they set the 5 % threshold
    look_alike = 0.55 * train[0] + 0.45 * train[6]
    copy = train[3] + 0.001 * rng.standard_normal((16, 16, 16)).astype(np.float32)
    r = site_audit_arrays([look_alike, copy], ["look", "copy"], train, quantile=0.05)
    assert r["n_within_threshold"] == 2  # both are closer than the site's threshold
    assert r["flagged"] == ["copy"]  # only the copy is distinctly closer to one subject than to any other
    assert r["nearest_ratio"] == pytest.approx(2 / 3)
    strict = site_audit_arrays([look_alike, copy], ["look", "copy"], train, quantile=0.05, nearest_ratio=1.0)
    assert strict["flagged"] == ["look", "copy"]  # ratio 1: the threshold alone, as before
    with pytest.raises(ValueError, match="nearest_ratio"):
        site_audit_arrays([copy], ["copy"], train, nearest_ratio=0.0)
