"""Documented command paths run through ``synthbrain`` itself (``fl_app.cli.main``) on real files:
``sample --audit-site/--audit-against/--no-gate``, ``evaluate``, ``fl run`` (DP-FedAvg, drop-out and
production flags), and the input layouts README lists (BIDS sessions, renamed columns and sex values,
manifests with paths relative to the CSV), plus a client with too few usable subjects."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fl_app.cli import main
from fl_app.config import load_profile
from fl_app.models.prior import build_prior, save_prior
from fl_app.models.vqvae import build_vqvae, save_vqvae
from tests.conftest import default_rows, write_nifti

TINY = {
    "data": {"shape": [16, 16, 16], "spacing": [12.0, 12.0, 12.0]},
    "vqvae": {"channels": [8, 8], "num_res_channels": [8, 8], "num_embeddings": 16, "embedding_dim": 4},
    "prior": {"d_model": 16, "n_layers": 1, "n_heads": 2},
}


def _tsv(path: Path) -> list[dict[str, str]]:
    with open(path) as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    p = load_profile("cpu-demo", TINY)
    save_vqvae(build_vqvae(p), p, d / "vqvae.pt")
    save_prior(build_prior(p), p, d / "prior.pt")
    return d


# ------------------------------------------------------------------------- sample + memorisation gate


def _distinct_subject(head, rng: np.random.Generator) -> np.ndarray:
    from scipy import ndimage as ndi

    data, _, _ = head
    scale = rng.uniform(0.9, 1.1, 3)
    centre = (np.array(data.shape) - 1) / 2
    out = ndi.affine_transform(data, 1 / scale, offset=centre - centre / scale, order=1)
    return (out + rng.normal(0, 15, data.shape)).clip(0, None).astype(np.float32)


def _sample_argv(model_dir: Path, out: Path) -> list[str]:
    return ["sample", "--model", str(model_dir), "--n", "3", "--out", str(out), "--device", "cpu", "--no-qc",
            "--quiet"]  # fmt: skip


@pytest.fixture(scope="module")
def gated(model_dir, head, tmp_path_factory):
    """A sampled cohort whose ``sub-synth0002`` is replaced by a training image of ``site-a`` (a memorising
    generator), and the site-a audit result written by ``synthbrain audit-site``."""
    from fl_app.data.cohort import read_bids
    from fl_app.data.dataset import SiteDataset
    from fl_app.data.nifti import save_nifti
    from fl_app.generate.cohort import cohort_profile, grid_affine

    tmp = tmp_path_factory.mktemp("gate")
    cohort = tmp / "cohort"
    assert main(_sample_argv(model_dir, cohort)) == 0
    rng = np.random.default_rng(1)
    site = tmp / "site-a"
    _, label, aff = head
    site.mkdir()
    (site / "dataset_description.json").write_text('{"Name": "a", "BIDSVersion": "1.9.0"}')
    rows = default_rows(5)
    with open(site / "participants.tsv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]), delimiter="\t")
        w.writeheader()
        w.writerows(rows)
    for r in rows:
        sub = r["participant_id"]
        write_nifti(site / sub / "anat" / f"{sub}_T1w.nii.gz", _distinct_subject(head, rng), aff, np.int16)
        write_nifti(
            site / "derivatives" / "labels" / sub / "anat" / f"{sub}_dseg.nii.gz", label, aff, np.uint8
        )
    prof = cohort_profile(cohort)
    train = SiteDataset(read_bids(site).valid(), prof, tmp / "cache", use_labels=False)
    t1w = cohort / "sub-synth0002" / "anat" / "sub-synth0002_T1w.nii.gz"
    save_nifti(t1w, train[2]["image"][0].numpy(), grid_affine(prof))
    audit = tmp / "audit_site-a.json"
    assert main(["audit-site", "--cohort", str(cohort), "--bids", str(site), "--out", str(audit),
                 "--cache-dir", str(tmp / "cache")]) == 0  # fmt: skip
    return {"cohort": cohort, "site": site, "audit": audit, "model": model_dir}


def test_audit_site_result_flags_only_the_planted_copy(gated):
    res = json.loads(gated["audit"].read_text())
    assert res["site"] == "site-a" and res["n_samples"] == 3 and res["n_training"] == 5
    assert res["flagged"] == ["sub-synth0002"]
    assert "sub-00" not in json.dumps(res)  # no training subject id leaves the site


def test_sample_no_gate_keeps_flagged_and_exits_1(gated, tmp_path, capsys):
    cohort = tmp_path / "cohort"
    shutil.copytree(gated["cohort"], cohort)
    argv = _sample_argv(gated["model"], cohort)
    assert main([*argv, "--audit-site", str(gated["audit"]), "--no-gate"]) == 1
    assert "flagged 1 subjects (kept: --no-gate)" in capsys.readouterr().out
    summary = json.loads((cohort / "code" / "synthbrain" / "audit.json").read_text())
    assert summary["flagged"] == {"sub-synth0002": ["site-a"]} and summary["n_flagged"] == 1
    assert summary["n_samples"] == 3 and len(summary["sites"]) == 1
    assert (cohort / "sub-synth0002" / "anat" / "sub-synth0002_T1w.nii.gz").is_file()
    assert not (cohort / "code" / "synthbrain" / "withheld.tsv").exists()
    assert [r["participant_id"] for r in _tsv(cohort / "participants.tsv")] == [
        "sub-synth0001", "sub-synth0002", "sub-synth0003"]  # fmt: skip


def test_sample_gate_withholds_flagged_subject_and_keeps_it_out_on_resume(gated, tmp_path, capsys):
    cohort = tmp_path / "cohort"
    shutil.copytree(gated["cohort"], cohort)
    argv = _sample_argv(gated["model"], cohort)
    # --audit-against: the coordinator runs the site's audit itself (simulations, a researcher who is a site)
    assert main([*argv, "--audit-against", str(gated["site"])]) == 0
    assert "withheld 1 flagged subjects: sub-synth0002" in capsys.readouterr().out
    summary = json.loads((cohort / "code" / "synthbrain" / "audit.json").read_text())
    assert summary["flagged"] == {"sub-synth0002": ["site-a"]}
    assert not (cohort / "sub-synth0002").exists()
    assert (cohort / "sub-synth0001" / "anat" / "sub-synth0001_T1w.nii.gz").is_file()
    withheld = _tsv(cohort / "code" / "synthbrain" / "withheld.tsv")
    assert [w["participant_id"] for w in withheld] == ["sub-synth0002"] and "audit" in withheld[0]["reason"]
    assert [r["participant_id"] for r in _tsv(cohort / "participants.tsv")] == [
        "sub-synth0001",
        "sub-synth0003",
    ]
    # re-running the same command (resume) does not re-create the withheld subject
    assert main([*argv, "--audit-site", str(gated["audit"])]) == 0
    assert not (cohort / "sub-synth0002").exists()
    assert [r["participant_id"] for r in _tsv(cohort / "participants.tsv")] == [
        "sub-synth0001",
        "sub-synth0003",
    ]


def test_sample_gate_with_no_flag_and_bad_audit_file(gated, tmp_path, capsys):
    cohort = tmp_path / "cohort"
    shutil.copytree(gated["cohort"], cohort)
    honest = json.loads(gated["audit"].read_text()) | {"flagged": []}
    (tmp_path / "honest.json").write_text(json.dumps(honest))
    argv = _sample_argv(gated["model"], cohort)
    assert main([*argv, "--audit-site", str(tmp_path / "honest.json")]) == 0
    assert "0 of 3 subjects flagged by 1 site(s)" in capsys.readouterr().out
    assert json.loads((cohort / "code" / "synthbrain" / "audit.json").read_text())["n_flagged"] == 0
    assert len(_tsv(cohort / "participants.tsv")) == 3
    # a malformed or missing site result fails before anything is sampled
    (tmp_path / "bad.json").write_text(json.dumps({"site": "x"}))
    for bad in ("bad.json", "missing.json"):
        fresh = tmp_path / f"fresh-{bad}"
        assert main([*_sample_argv(gated["model"], fresh), "--audit-site", str(tmp_path / bad)]) == 2
        assert not fresh.exists()
    err = capsys.readouterr().err
    assert "bad.json: not a site audit result (missing 'flagged')" in err and "missing.json" in err
