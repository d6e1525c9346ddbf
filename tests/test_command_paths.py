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
from fl_app.config import load_profile, profile_to_yaml
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
    from fl_app.generate.cohort_folder import cohort_profile, grid_affine

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


# ------------------------------------------------------------------------------------------- evaluate


def _small_profile_yaml(**data) -> str:
    small = {"shape": [24, 24, 24], "spacing": [8.0, 8.0, 8.0], "voxel_size_range_mm": [0.5, 10.0], **data}
    return profile_to_yaml(load_profile("cpu-demo", {"data": small}))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, Path]:
    """A simulated site (``synthbrain simulate``: label maps and a known age effect) on a small grid."""
    tmp = tmp_path_factory.mktemp("evaluate")
    prof = tmp / "profile.yaml"
    prof.write_text(_small_profile_yaml())
    argv = [
        "simulate",
        "--sites",
        "1",
        "--subjects-per-site",
        "12",
        "--profile",
        str(prof),
        "--out",
        str(tmp),
    ]
    assert main(argv) == 0
    return {"site": tmp / "site-1", "profile": prof, "cache": tmp / "cache"}


def _cohort_of_reference(reference, out: Path, age=lambda a: a) -> Path:
    """A cohort folder holding the reference subjects themselves (as preprocessed for the profile), with
    their ages mapped by ``age``: a generator that reproduced the data exactly, or its age effect scaled."""
    from fl_app.data.cohort import read_bids
    from fl_app.data.covariates import DIAGNOSES, SEXES
    from fl_app.data.dataset import SiteDataset
    from fl_app.data.nifti import save_nifti
    from fl_app.generate.cohort_folder import PROFILE_FILE, grid_affine

    prof = load_profile(reference["profile"])
    ds = SiteDataset(read_bids(reference["site"]).valid(), prof, reference["cache"])
    rows = []
    for i in range(len(ds)):
        it = ds[i]
        pid = f"sub-synth{i + 1:04d}"
        anat = out / pid / "anat"
        save_nifti(anat / f"{pid}_T1w.nii.gz", it["image"][0].numpy(), grid_affine(prof))
        save_nifti(anat / f"{pid}_dseg.nii.gz", it["label"].numpy().astype(np.uint8), grid_affine(prof))
        rows.append(
            [pid, f"{age(float(it['age'])):.4f}", SEXES[int(it["sex"])], DIAGNOSES[int(it["diagnosis"])]]
        )
    with open(out / "participants.tsv", "w", newline="") as fh:
        w = csv.writer(fh, delimiter="\t", lineterminator="\n")
        w.writerow(["participant_id", "age", "sex", "diagnosis"])
        w.writerows(rows)
    (out / PROFILE_FILE).parent.mkdir(parents=True, exist_ok=True)
    (out / PROFILE_FILE).write_text(reference["profile"].read_text())
    return out


def _evaluate(reference, cohort: Path, tmp_path: Path) -> dict:
    out = tmp_path / f"{cohort.name}.json"
    argv = ["evaluate", "--cohort", str(cohort), "--reference", str(reference["site"]), "--pairs", "4",
            "--cache-dir", str(reference["cache"]), "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    res = json.loads((cohort / "qc" / "evaluation.json").read_text())
    assert json.loads(out.read_text()) == res
    assert (cohort / "qc" / "report.html").is_file()
    return res


def test_evaluate_slope_error_vs_reference(reference, tmp_path):
    """``slope_error_pct_vs_reference`` is 0 for a cohort that is the reference itself, and exactly 50 %
    when the cohort's ages are stretched ×2 (the age effect per year halves; intercepts absorb the shift)."""
    same = _evaluate(reference, _cohort_of_reference(reference, tmp_path / "same"), tmp_path)
    s = same["summary"]
    assert s["n_synthetic"] == s["n_reference"] == 12
    assert s["btf_age_slope_reference"] < 0  # the simulator's brain atrophy with age
    assert s["btf_slope_error_pct_vs_reference"] == pytest.approx(0.0, abs=1e-3)  # ages written to 4 decimals
    assert s["csf_ml_slope_error_pct_vs_reference"] == pytest.approx(0.0, abs=1e-3)
    assert "btf_slope_error_pct_vs_law" in s  # a simulated reference is also compared with the law
    stretched = _cohort_of_reference(reference, tmp_path / "stretched", age=lambda a: 70.0 + 2.0 * (a - 70.0))
    st = _evaluate(reference, stretched, tmp_path)
    assert st["summary"]["btf_slope_error_pct_vs_reference"] == pytest.approx(50.0, abs=1e-3)
    for name, entry in st["fidelity"].items():
        if entry.get("slope_error_pct_vs_reference") is not None:
            assert entry["slope_error_pct_vs_reference"] == pytest.approx(50.0, abs=1e-3), name


def test_evaluate_derives_reference_labels_and_fails_clearly_without_cohort_labels(
    reference, tmp_path, capsys
):
    cohort = _cohort_of_reference(reference, tmp_path / "c")
    no_labels = tmp_path / "site-nolabels"
    shutil.copytree(reference["site"], no_labels)
    shutil.rmtree(no_labels / "derivatives")
    (tmp_path / "p.yaml").write_text(_small_profile_yaml(brain_mask="none"))  # preprocessed without labels
    argv = ["evaluate", "--cohort", str(cohort), "--reference", str(no_labels), "--profile", str(tmp_path / "p.yaml"),
            "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    # a reference without label maps is read with the labels derived for it (fl_app.data.anatomy, in the cache)
    assert main(argv) == 0
    assert any((tmp_path / "cache" / "anatomy").rglob("*.nii.gz"))
    assert not (no_labels / "derivatives").exists()  # nothing written into the reference folder
    (cohort / "qc" / "evaluation.json").unlink()
    for f in cohort.glob("sub-*/anat/*_dseg.nii.gz"):
        f.unlink()
    assert main(["evaluate", "--cohort", str(cohort)]) == 2
    assert "no subject with both a T1w and a dseg" in capsys.readouterr().err
    assert not (cohort / "qc" / "evaluation.json").exists()


# ------------------------------------------------------------------------------------------------ fl run


FL_FLAGS = ["--dp-fedavg", "--dp-noise", "0.7", "--dp-clip", "2.0", "--dp-quantile", "0.5", "--min-sites", "1",
            "--round-timeout", "17", "--rounds", "3", "--max-steps", "5"]  # fmt: skip


def _server_component(cfg: dict, suffix: str) -> dict:
    for part in ("workflows", "components"):
        for c in cfg.get(part, []):
            if str(c.get("path", "")).endswith(suffix):
                return c["args"]
    raise AssertionError(f"{suffix} not in the server config")


def test_fl_run_prod_submits_the_configured_job_through_the_startup_kit(tmp_path, monkeypatch, capsys):
    """``fl run --env prod --startup-kit KIT`` with the DP-FedAvg and drop-out flags: the job the admin's
    kit submits (NVFlare's ProdEnv, its session replaced by a recorder) carries every setting."""
    from nvflare.recipe.prod_env import ProdEnv

    submitted: dict = {}

    def deploy(self, job):
        job.export_job(str(tmp_path / "exported"))
        submitted.update(kit=self.startup_kit_location, user=self.username, name=job.name)
        return "job-123"

    monkeypatch.setattr(ProdEnv, "deploy", deploy)
    monkeypatch.setattr(ProdEnv, "get_job_result", lambda self, job_id, timeout=0.0: f"/results/{job_id}")
    monkeypatch.setattr(ProdEnv, "get_job_status", lambda self, job_id: "FINISHED:COMPLETED")
    kit = tmp_path / "admin@hospital.org"
    kit.mkdir()
    argv = ["fl", "run", "vqvae", "--env", "prod", "--clients", "site-a", "site-b", "--startup-kit", str(kit),
            "--username", "admin@hospital.org", "--runs", str(tmp_path / "runs"), "--run", "r1", *FL_FLAGS]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "submitted job job-123" in out and "job job-123 finished: FINISHED:COMPLETED" in out
    assert submitted == {"kit": str(kit), "user": "admin@hospital.org", "name": "synthbrain-vqvae"}
    spec = json.loads((tmp_path / "runs" / "r1" / "job_vqvae.json").read_text())
    assert spec["env"] == "prod" and spec["num_clients"] == 2 and spec["num_rounds"] == 3
    assert spec["min_sites"] == 1 and spec["round_timeout"] == 17 and spec["max_steps"] == 5
    assert spec["checkpoint_dir"] == "synthbrain/r1/vqvae"  # on the server, not the admin's machine
    assert spec["strategy_path"] == "fl_app.privacy.dp_fedavg.DPFedAvgStrategy"
    assert spec["strategy_args"] == {
        "noise_multiplier": 0.7,
        "clip": 2.0,
        "delta": 1e-5,
        "target_quantile": 0.5,
    }
    job = tmp_path / "exported" / "synthbrain-vqvae"
    assert json.loads((job / "meta.json").read_text())["min_clients"] == 1
    server = json.loads(next(job.rglob("config_fed_server.json")).read_text())
    ctl = _server_component(server, "SynthFedAvg")
    assert ctl["num_rounds"] == 3 and ctl["min_sites"] == 1 and ctl["round_timeout"] == 17
    agg = ctl["aggregator"]["args"]
    assert agg["strategy_path"] == spec["strategy_path"] and agg["strategy_args"] == spec["strategy_args"]
    assert _server_component(server, "SynthPersistor")["checkpoint_dir"] == "synthbrain/r1/vqvae"
    assert not (tmp_path / "runs" / "r1" / "global").exists()  # prod: the model stays on the server


def test_fl_run_prod_without_a_startup_kit_fails_clearly(tmp_path, capsys):
    base = [
        "fl",
        "run",
        "vqvae",
        "--env",
        "prod",
        "--clients",
        "site-a",
        "--runs",
        str(tmp_path),
        "--run",
        "r",
    ]
    assert main(base) == 2
    assert "--env prod needs --startup-kit" in capsys.readouterr().err
    assert main([*base, "--startup-kit", str(tmp_path / "no-kit")]) == 2
    assert f"{tmp_path / 'no-kit'} is not a folder" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------------------- input layouts


def _session_site(root: Path, head) -> Path:
    """A BIDS site as a PACS export might write it: sessions, renamed columns, numeric sex codes, ids
    without the ``sub-`` prefix, label maps per session."""
    data, label, aff = head
    rng = np.random.default_rng(3)
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text('{"Name": "pacs", "BIDSVersion": "1.9.0"}')
    (root / "participants.tsv").write_text(
        "subject\tage_at_scan\tgender\tgroup\n001\t61.5\t2\tHC\n002\t70\t1\tAD\n003\t66\t2\tMCI\n004\t79\t1\tHC\n"
    )
    layout = {
        "sub-001": ["ses-01", "ses-02"],
        "sub-002": ["ses-01"],
        "sub-003": [None],
        "sub-004": ["ses-02"],
    }
    for sub, sessions in layout.items():
        for ses in sessions:
            anat = Path(sub, ses, "anat") if ses else Path(sub, "anat")
            stem = f"{sub}_{ses}" if ses else sub
            img = data + rng.normal(0, 10, data.shape).astype(np.float32)
            write_nifti(root / anat / f"{stem}_T1w.nii.gz", img, aff, np.int16)
            write_nifti(root / "derivatives" / "fs" / anat / f"{stem}_dseg.nii.gz", label, aff, np.uint8)
    # a label map of a session whose image is not there: sub-004's ses-02 image must get its ses-02 map
    write_nifti(root / "derivatives/fs/sub-004/ses-01/anat/sub-004_ses-01_dseg.nii.gz", label, aff, np.uint8)
    return root


SESSION_YAML = """name: pacs-site
bids_dir: pacs                      # relative to this file
min_subjects: 4
columns:
  participant_id: subject
  age: age_at_scan
  sex: gender
  diagnosis: group
  sex_values: {"1": M, "2": F}
  diagnosis_values: {HC: CN, MCI: MCI, AD: AD}
"""


def test_site_check_reads_sessions_renamed_columns_and_sex_values(head, tmp_path, monkeypatch, capsys):
    site = _session_site(tmp_path / "pacs", head)
    (tmp_path / "site.yaml").write_text(SESSION_YAML)
    monkeypatch.chdir(tmp_path.parent)  # the YAML's relative bids_dir is relative to the YAML, not the cwd
    report = tmp_path / "report.json"
    assert (
        main(["site", "check", "--config", str(tmp_path / "site.yaml"), "--json", str(report), "--quiet"])
        == 0
    )
    rep = json.loads(report.read_text())
    assert rep["ok"] and rep["site"] == "pacs-site" and rep["n_valid"] == 4
    subs = {s["participant_id"]: s for s in rep["subjects"]}
    assert {k: (v["age"], v["sex"], v["diagnosis"]) for k, v in subs.items()} == {
        "sub-001": (61.5, "F", "CN"), "sub-002": (70.0, "M", "AD"),
        "sub-003": (66.0, "F", "MCI"), "sub-004": (79.0, "M", "CN")}  # fmt: skip
    # two sessions: the first in sort order, with that session's label map, and a warning naming the choice
    s1 = subs["sub-001"]
    assert s1["image"] == str(site / "sub-001" / "ses-01" / "anat" / "sub-001_ses-01_T1w.nii.gz")
    assert s1["label"] == str(site / "derivatives/fs/sub-001/ses-01/anat/sub-001_ses-01_dseg.nii.gz")
    assert any("2 T1w files found" in w for w in s1["warnings"])
    assert subs["sub-004"]["label"].endswith("sub-004/ses-02/anat/sub-004_ses-02_dseg.nii.gz")
    assert subs["sub-003"]["image"] == str(site / "sub-003" / "anat" / "sub-003_T1w.nii.gz")
    # the same folder without the YAML's columns: the site cannot join, and the table says why
    assert main(["site", "check", "--bids", str(site), "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "missing column(s) ['participant_id', 'age', 'sex', 'diagnosis']" in out
    # a code the YAML does not map is named
    (site / "participants.tsv").write_text(
        (site / "participants.tsv").read_text().replace("004\t79\t1", "004\t79\t3")
    )
    assert main(["site", "check", "--config", str(tmp_path / "site.yaml"), "--quiet"]) == 1
    assert "'gender' = '3' is not one of ['1', '2']" in capsys.readouterr().out


def test_site_check_manifest_paths_are_relative_to_the_csv(head, tmp_path, monkeypatch, capsys):
    data, label, aff = head
    man_dir = tmp_path / "export"
    rows = ["path,label_path,age,sex,diagnosis"]
    for i in range(1, 5):
        write_nifti(man_dir / "images" / f"sub-{i:02d}_T1w.nii.gz", data, aff, np.int16)
        write_nifti(man_dir / "labels" / f"sub-{i:02d}_dseg.nii.gz", label, aff, np.uint8)
        rows.append(f"images/sub-{i:02d}_T1w.nii.gz,labels/sub-{i:02d}_dseg.nii.gz,{60 + i},F,CN")
    (man_dir / "cohort.csv").write_text("\n".join(rows) + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    report = tmp_path / "report.json"
    assert (
        main(["site", "check", "--manifest", str(man_dir / "cohort.csv"), "--json", str(report), "--quiet"])
        == 0
    )
    subs = json.loads(report.read_text())["subjects"]
    assert [s["participant_id"] for s in subs] == ["sub-01", "sub-02", "sub-03", "sub-04"]
    assert subs[0]["image"] == str(man_dir / "images" / "sub-01_T1w.nii.gz")
    assert subs[0]["label"] == str(man_dir / "labels" / "sub-01_dseg.nii.gz")
    # the same CSV moved away from the images: every path is missing, and named
    shutil.copy(man_dir / "cohort.csv", elsewhere / "cohort.csv")
    assert main(["site", "check", "--manifest", "cohort.csv", "--quiet"]) == 1
    out = capsys.readouterr().out
    assert out.count("image file does not exist") == 4 and "site cannot join" in out


def test_client_with_too_few_usable_subjects_refuses_to_join(head, tmp_path):
    """A site's client opens its data before training: with fewer usable subjects than its ``min_subjects``
    (here one of four files unreadable) it refuses to join instead of training on what is left."""
    from fl_app.config import load_site_config
    from fl_app.fl.client import open_site_dataset

    site = _session_site(tmp_path / "pacs", head)
    prof = load_profile("cpu-demo", {"data": {"shape": [16, 16, 16], "spacing": [12.0, 12.0, 12.0]}})
    yaml_text = SESSION_YAML + f"cache_dir: {tmp_path / 'cache'}\n"
    (tmp_path / "site.yaml").write_text(yaml_text)
    ds = open_site_dataset(load_site_config(tmp_path / "site.yaml"), prof)
    assert len(ds) == 4  # the renamed columns and sessions reach the training data too
    assert [float(ds[i]["age"]) for i in range(4)] == [61.5, 70.0, 66.0, 79.0]
    (tmp_path / "site.yaml").write_text(yaml_text.replace("min_subjects: 4", "min_subjects: 5"))
    with pytest.raises(
        RuntimeError, match=r"site pacs-site: 4 usable subjects, fewer than its min_subjects \(5\)"
    ):
        open_site_dataset(load_site_config(tmp_path / "site.yaml"), prof)
    t1w = site / "sub-003" / "anat" / "sub-003_T1w.nii.gz"
    t1w.write_bytes(t1w.read_bytes()[:2000])  # truncated after the check: not usable
    (tmp_path / "site.yaml").write_text(yaml_text)
    with pytest.raises(RuntimeError, match=r"3 usable subjects, fewer than its min_subjects \(4\)"):
        open_site_dataset(load_site_config(tmp_path / "site.yaml"), prof)
