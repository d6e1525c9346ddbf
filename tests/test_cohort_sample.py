"""synthbrain sample: BIDS derivative layout, NIfTI geometry and dtypes, seeding, resuming, gating."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from fl_app import __version__
from fl_app.config import load_profile
from fl_app.generate.cohort_folder import gate_release, grid_affine
from fl_app.generate.sample_cohort import add_sample_parser, make_rows, read_spec, sample_cohort
from fl_app.global_model import load_global_model
from fl_app.models.prior import build_prior, save_prior
from fl_app.models.vqvae import build_vqvae, save_vqvae
from tests.bids import run_bids_validator

TINY = {
    "data": {"shape": [16, 16, 16], "spacing": [12.0, 12.0, 12.0]},
    "vqvae": {"channels": [8, 8], "num_res_channels": [8, 8], "num_embeddings": 16, "embedding_dim": 4},
    "prior": {"d_model": 16, "n_layers": 1, "n_heads": 2},
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny untrained model saved with the real save functions, plus a model card with ε."""
    d = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    p = load_profile("cpu-demo", TINY)
    save_vqvae(build_vqvae(p), p, d / "vqvae.pt")
    save_prior(build_prior(p), p, d / "prior.pt")
    card = {
        "privacy": {"differential_privacy": True, "site_epsilon": {"prior": {"site-1": 3.5, "site-2": 4.25}}}
    }
    (d / "model_card.json").write_text(json.dumps(card))
    return d


@pytest.fixture(scope="module")
def gm(model_dir):
    return load_global_model(model_dir, device="cpu")


def _tsv(path: Path) -> list[dict[str, str]]:
    with open(path) as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def _arrays(out: Path, pid: str) -> tuple[np.ndarray, np.ndarray]:
    a = nib.load(out / pid / "anat" / f"{pid}_T1w.nii.gz")
    b = nib.load(out / pid / "anat" / f"{pid}_dseg.nii.gz")
    return np.asarray(a.dataobj), np.asarray(b.dataobj)


def test_layout_files_and_bids_validator(gm, model_dir, tmp_path):
    out = tmp_path / "cohort"
    rows = make_rows(5, (70, 80), "F", "AD", seed=0)
    res = sample_cohort(gm, rows, out, seed=0, chunk_size=2, progress=False, device="cpu")
    assert res["written"] == 5 and res["skipped"] == 0
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative"
    assert desc["GeneratedBy"][0]["Name"] == "synthbrain" and desc["GeneratedBy"][0]["Version"] == __version__
    sha = hashlib.sha256(
        (model_dir / "vqvae.pt").read_bytes() + (model_dir / "prior.pt").read_bytes()
    ).hexdigest()
    assert desc["SynthbrainModel"]["Sha256"] == sha
    assert desc["SynthbrainModel"]["PrivacyEpsilon"] == pytest.approx(4.25)
    parts = _tsv(out / "participants.tsv")
    assert [p["participant_id"] for p in parts] == [f"sub-synth000{i}" for i in range(1, 6)]
    assert all(p["sex"] == "F" and p["diagnosis"] == "AD" and 70 <= float(p["age"]) <= 80 for p in parts)
    assert [r["name"] for r in _tsv(out / "dseg.tsv")] == ["background", "CSF", "GM", "WM"]
    for p, r in zip(parts, rows, strict=True):
        anat = out / p["participant_id"] / "anat"
        for suffix in ("T1w.nii.gz", "T1w.json", "dseg.nii.gz", "dseg.json"):
            assert (anat / f"{p['participant_id']}_{suffix}").is_file()
        side = json.loads((anat / f"{p['participant_id']}_T1w.json").read_text())["Synthbrain"]
        assert side["Seed"] == 0 and side["Temperature"] == 1.0 and side["ModelSha256"] == sha
        assert side["Covariates"] == {"age": r.age, "sex": "F", "diagnosis": "AD"}
    errors, _warnings = run_bids_validator(out)
    assert errors == [], errors


def test_nifti_affine_dtype_and_values(gm, tmp_path):
    out = tmp_path / "c"
    sample_cohort(gm, make_rows(2, 72, "M", "CN"), out, progress=False, device="cpu")
    prof = gm.profile
    for pid in ("sub-synth0001", "sub-synth0002"):
        img = nib.load(out / pid / "anat" / f"{pid}_T1w.nii.gz")
        lab = nib.load(out / pid / "anat" / f"{pid}_dseg.nii.gz")
        assert img.get_data_dtype() == np.float32 and lab.get_data_dtype() == np.uint8
        assert img.shape == lab.shape == tuple(prof.data.shape)
        for x in (img, lab):
            np.testing.assert_allclose(x.affine, grid_affine(prof), atol=1e-4)
            assert nib.aff2axcodes(x.affine) == ("R", "A", "S")
            np.testing.assert_allclose(x.header.get_zooms()[:3], prof.data.spacing)
            assert int(x.header["sform_code"]) == 1 and int(x.header["qform_code"]) == 1
        centre = img.affine @ np.array([*((np.array(img.shape) - 1) / 2), 1.0])
        np.testing.assert_allclose(centre[:3], 0.0, atol=1e-6)
        a, b = np.asarray(img.dataobj), np.asarray(lab.dataobj)
        assert a.min() >= 0.0 and a.max() <= 1.0
        assert set(np.unique(b)) <= {0, 1, 2, 3}


def test_seed_reproducible_and_resume(gm, tmp_path):
    rows = make_rows(5, (60, 90), None, "MCI", seed=3)
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    sample_cohort(gm, rows, a, seed=7, chunk_size=2, progress=False, device="cpu")
    # b: interrupted run (only the first chunk's subjects and one more), then resumed
    sample_cohort(gm, rows, b, seed=7, chunk_size=2, progress=False, device="cpu")
    shutil.rmtree(b / "sub-synth0004")
    (b / "sub-synth0002" / "anat" / "sub-synth0002_T1w.json").unlink()  # half-written subject
    keep = b / "sub-synth0005" / "anat" / "sub-synth0005_T1w.nii.gz"
    mtime = keep.stat().st_mtime_ns
    res = sample_cohort(gm, rows, b, seed=7, chunk_size=2, progress=False, device="cpu")
    assert res["written"] == 2 and res["skipped"] == 3
    assert keep.stat().st_mtime_ns == mtime  # finished subjects are not rewritten
    for r in rows:
        xa, la = _arrays(a, r.participant_id)
        xb, lb = _arrays(b, r.participant_id)
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(la, lb)
    sample_cohort(gm, rows, c, seed=8, chunk_size=2, progress=False, device="cpu")
    assert not np.array_equal(_arrays(a, "sub-synth0001")[0], _arrays(c, "sub-synth0001")[0])
    with pytest.raises(ValueError, match="seed"):
        sample_cohort(gm, rows, a, seed=8, chunk_size=2, progress=False, device="cpu")
    with pytest.raises(ValueError, match="precision"):  # a bfloat16 run cannot finish a float32 cohort
        sample_cohort(gm, rows, a, seed=7, chunk_size=2, progress=False, device="cpu", precision="bfloat16")
    assert make_rows(5, (60, 90), None, "MCI", seed=3) == rows  # the covariates are seeded too


def test_spec_tsv_cli_and_gate(model_dir, tmp_path):
    spec = tmp_path / "cohort.tsv"
    spec.write_text(
        "participant_id\tage\tsex\tdiagnosis\nA01\t55\tF\tCN\nsub-B02\t81.25\tM\tAD\nC03\tn/a\tn/a\tMCI\n"
    )
    rows = read_spec(spec)
    assert [(r.participant_id, r.age, r.sex, r.diagnosis) for r in rows] == [
        ("sub-A01", 55.0, "F", "CN"),
        ("sub-B02", 81.2, "M", "AD"),
        ("sub-C03", None, None, "MCI"),
    ]
    import argparse

    ap = argparse.ArgumentParser()
    add_sample_parser(ap.add_subparsers())
    out = tmp_path / "out"
    args = ap.parse_args(["sample", "--vqvae", str(model_dir), "--prior", str(model_dir / "prior.pt"),
                          "--spec", str(spec), "--out", str(out), "--quiet", "--device", "cpu"])  # fmt: skip
    assert args.func(args) == 0
    parts = _tsv(out / "participants.tsv")
    assert [(p["participant_id"], p["age"], p["sex"], p["diagnosis"]) for p in parts] == [
        ("sub-A01", "55.0", "F", "CN"),
        ("sub-B02", "81.2", "M", "AD"),
        ("sub-C03", "n/a", "n/a", "MCI"),
    ]
    assert (out / "qc" / "report.html").is_file()
    assert gate_release(out, {"sub-B02": "audit"}) == ["sub-B02"]
    assert not (out / "sub-B02").exists()
    assert [p["participant_id"] for p in _tsv(out / "participants.tsv")] == ["sub-A01", "sub-C03"]
    assert args.func(args) == 0  # resuming does not re-create the withheld subject
    assert not (out / "sub-B02").exists()


def test_per_covariate_guidance_is_recorded_and_checked(model_dir, gm, tmp_path):
    """``--guidance age=3,sex=5`` travels into the cohort's sampling settings and each subject's sidecar; a resumed
    run with other weights is refused, and a malformed weight is refused before anything is written."""
    import argparse

    ap = argparse.ArgumentParser()
    add_sample_parser(ap.add_subparsers())
    out = tmp_path / "g"
    base = ["sample", "--vqvae", str(model_dir), "--prior", str(model_dir / "prior.pt"), "--n", "2", "--age",
            "70-80", "--sex", "F", "--diagnosis", "AD", "--out", str(out), "--quiet", "--device", "cpu"]  # fmt: skip
    args = ap.parse_args([*base, "--guidance", "age=3,sex=5"])
    assert args.guidance == {"age": 3.0, "sex": 5.0, "diagnosis": 1.0}
    assert args.func(args) == 0
    want = {"age": 3.0, "sex": 5.0, "diagnosis": 1.0}
    assert json.loads((out / "code" / "synthbrain" / "sampling.json").read_text())["guidance"] == want
    side = json.loads((out / "sub-synth0001" / "anat" / "sub-synth0001_T1w.json").read_text())
    assert side["Synthbrain"]["Guidance"] == want
    rows = make_rows(2, (70, 80), "F", "AD", seed=0)
    with pytest.raises(ValueError, match="guidance"):
        sample_cohort(gm, rows, out, progress=False, device="cpu", guidance=3.0)
    with pytest.raises(SystemExit):
        ap.parse_args([*base, "--guidance", "height=2"])
    with pytest.raises(ValueError, match="finite"):
        sample_cohort(gm, rows, tmp_path / "bad", progress=False, device="cpu", guidance={"age": math.inf})
    assert not (tmp_path / "bad").exists()
