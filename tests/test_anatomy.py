"""On-site anatomy stage (issue 14): plain T1w sites (no label maps) get derived brain masks and tissue
labels in the site's cache, pass ``site check``, are trained on and audited exactly like labelled sites;
implausible results are named with their file.

The scans are real NIfTI files written by nibabel by the simulator: full heads with skull and neck, one
subject from each site preset (RAS int16, LIA uint8, LPS float32 anisotropic with neck, LAS int16).
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fl_app.cli import main
from fl_app.config import load_profile
from fl_app.data.anatomy import AnatomyCache
from fl_app.data.cohort import read_bids
from fl_app.data.dataset import SiteDataset
from fl_app.data.validate import check_site

PROFILE = load_profile("cpu-demo")


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file()
    }


@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> tuple[Path, Path]:
    """(plain site without label maps, folder of the simulator's truth label maps)."""
    from fl_app.data.simulate import simulate_sites

    base = tmp_path_factory.mktemp("anat")
    sites = simulate_sites(base / "sim", 4, 1, PROFILE, seed=3)
    plain, truth = base / "plain", base / "truth"
    rows = []
    for site in sites:
        with open(site / "participants.tsv") as fh:
            rows += list(csv.DictReader(fh, delimiter="\t"))
        for sub in site.glob("sub-*"):
            shutil.copytree(sub, plain / sub.name)
            dseg = site / "derivatives" / "labels" / sub.name / "anat" / f"{sub.name}_dseg.nii.gz"
            (truth / sub.name).mkdir(parents=True)
            shutil.copy(dseg, truth / sub.name / dseg.name)
    shutil.copy(sites[0] / "dataset_description.json", plain / "dataset_description.json")
    with open(plain / "participants.tsv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]), delimiter="\t")
        w.writeheader()
        w.writerows(rows)
    return plain, truth


@pytest.fixture(scope="module")
def checked(sim, tmp_path_factory) -> tuple[Path, Path, Path, dict]:
    """``synthbrain site check`` of the plain site (site YAML with a cache folder), with JSON and QC pages."""
    plain, _ = sim
    out = tmp_path_factory.mktemp("check")
    cache = out / "cache"
    cfg = out / "site.yaml"
    cfg.write_text(f"name: plain\nbids_dir: {plain}\ncache_dir: {cache}\nmin_subjects: 4\n")
    before = _snapshot(plain)
    rc = main(
        [
            "site",
            "check",
            "--config",
            str(cfg),
            "--json",
            str(out / "r.json"),
            "--qc",
            str(out / "qc"),
            "--quiet",
        ]
    )
    assert _snapshot(plain) == before  # nothing written into (or changed in) the data folder
    rep = json.loads((out / "r.json").read_text())
    assert rc == 0, rep
    return plain, cache, out, rep


def test_plain_t1w_site_passes_with_derived_labels_in_the_cache(checked, sim):
    plain, cache, out, rep = checked
    assert rep["ok"] and rep["n_valid"] == 4 and rep["n_derived_labels"] == 4
    orientations, dtypes = set(), set()
    for s in rep["subjects"]:
        assert s["labels"] == "derived"
        lab = Path(s["label"])
        assert lab.is_file() and lab.is_relative_to(cache) and not lab.is_relative_to(plain)
        img, dseg = nib.load(s["image"]), nib.load(lab)
        assert dseg.shape == img.shape and np.allclose(dseg.affine, img.affine)  # overlays on the scan
        orientations.add("".join(nib.aff2axcodes(img.affine)))
        dtypes.add(str(img.get_data_dtype()))
        fr = s["fractions"]
        assert set(fr) == {"CSF", "GM", "WM"} and abs(sum(fr.values()) - 1) < 1e-3
        assert 0.1 < fr["CSF"] < 0.45 and 0.25 < fr["GM"] < 0.55 and 0.2 < fr["WM"] < 0.5
        assert (out / "qc" / "png" / f"{s['participant_id']}.png").is_file()
    assert len(orientations) == 4 and {"int16", "uint8", "float32"} <= dtypes
    page = (out / "qc" / "site_check.html").read_text()
    assert "derived" in page and "png/" in page and "http://" not in page.split("niivue")[0]


def test_derived_labels_agree_with_truth(checked, sim):
    """A sanity bound on a few subjects (the benchmark measures the targets on many)."""
    _, truth = sim
    _, _, _, rep = checked
    for s in rep["subjects"]:
        der = np.asarray(nib.load(s["label"]).dataobj)
        tru = np.asarray(nib.load(truth / s["participant_id"] / f"{s['participant_id']}_dseg.nii.gz").dataobj)
        a, b = der > 0, tru > 0
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.93


def test_provided_labels_win_and_changed_scan_is_rederived(checked, tmp_path):
    plain, cache, _, rep = checked
    site = tmp_path / "site"
    shutil.copytree(plain, site)
    ids = [s["participant_id"] for s in rep["subjects"]]
    # subject 0 gets a provided label map (here: a copy of its derived one, moved to derivatives/)
    provided = site / "derivatives" / "labels" / ids[0] / "anat" / f"{ids[0]}_dseg.nii.gz"
    provided.parent.mkdir(parents=True)
    shutil.copy(rep["subjects"][0]["label"], provided)
    # subject 1's scan changes (one voxel): a new content hash, derived again
    img_path = site / ids[1] / "anat" / f"{ids[1]}_T1w.nii.gz"
    img = nib.load(img_path)
    data = np.asarray(img.dataobj).copy()
    data[tuple(np.array(data.shape) // 2)] += 1
    nib.save(nib.Nifti1Image(data, img.affine, img.header), img_path)
    n_before = len(list((cache / "anatomy").glob("*_dseg.nii.gz")))
    report = check_site(read_bids(site), PROFILE, anatomy_cache_dir=cache)
    by_id = {s.participant_id: s for s in report.subjects}
    assert report.ok
    assert by_id[ids[0]].label_source == "provided" and by_id[ids[0]].label == provided
    assert by_id[ids[1]].label_source == "derived"
    assert by_id[ids[1]].label != Path(rep["subjects"][1]["label"])  # re-derived under a new key
    assert len(list((cache / "anatomy").glob("*_dseg.nii.gz"))) == n_before + 1
    assert all(
        by_id[i].label == Path(rep["subjects"][k]["label"]) for k, i in enumerate(ids) if k >= 2
    )  # cached
    out = report.to_dict()["subjects"]
    assert [s["labels"] for s in out] == ["provided", "derived", "derived", "derived"]


def test_dataset_reads_derived_labels_exactly_like_provided(checked, tmp_path):
    plain, cache, _, rep = checked
    labelled = tmp_path / "labelled"
    shutil.copytree(plain, labelled)
    for s in rep["subjects"]:
        pid = s["participant_id"]
        dst = labelled / "derivatives" / "labels" / pid / "anat" / f"{pid}_dseg.nii.gz"
        dst.parent.mkdir(parents=True)
        shutil.copy(s["label"], dst)
    derived = SiteDataset(read_bids(plain).valid(), PROFILE, cache)
    provided = SiteDataset(read_bids(labelled).valid(), PROFILE, tmp_path / "cache2")
    assert len(derived) == len(provided) == 4 and derived.n_skipped == 0
    assert all(s.label_source == "derived" for s in derived.subjects)
    for i in range(4):
        a, b = derived[i], provided[i]
        assert bool(a["has_label"]) and bool(b["has_label"])
        assert np.array_equal(a["label"].numpy(), b["label"].numpy())
        assert np.array_equal(a["image"].numpy(), b["image"].numpy())
        assert (a["image"].numpy() == 0).mean() > 0.3  # brain-extracted with the derived mask


def test_memorisation_audit_uses_derived_labels(checked, tmp_path):
    from fl_app.data.nifti import save_nifti
    from fl_app.evaluate.audit import site_audit
    from fl_app.generate.cohort_folder import grid_affine

    plain, cache, _, _ = checked
    train = SiteDataset(read_bids(plain).valid(), PROFILE, cache)
    copy = train[2]["image"][0].numpy()
    cohort = tmp_path / "cohort"
    save_nifti(cohort / "sub-copy" / "anat" / "sub-copy_T1w.nii.gz", copy, grid_affine(PROFILE))
    (cohort / "participants.tsv").write_text("participant_id\tage\tsex\tdiagnosis\nsub-copy\t70\tF\tCN\n")
    res = site_audit(cohort, plain, PROFILE, quantile=0.05, cache_dir=cache)
    assert res["n_training"] == 4 and res["flagged"] == ["sub-copy"]


def test_vqvae_job_trains_on_a_plain_site(checked, tmp_path):
    import argparse

    from fl_app.train.vqvae_local import add_train_local_vqvae_parser

    plain, cache, _, _ = checked
    prof_yaml = tmp_path / "coarse.yaml"
    prof_yaml.write_text(
        "extends: cpu-demo\n"
        "data: {shape: [32, 32, 32], spacing: [6.0, 6.0, 6.0]}\n"
        "vqvae: {channels: [4, 4, 8], num_res_channels: [4, 4, 8], num_embeddings: 16}\n"
    )
    parser = argparse.ArgumentParser()
    add_train_local_vqvae_parser(parser.add_subparsers())
    run = tmp_path / "run"
    argv = ["vqvae", "--profile", str(prof_yaml), "--out", str(run), "--max-steps", "2", "--batch-size", "2"]
    argv += ["--bids", str(plain), "--cache-dir", str(cache)]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["n_train"] + metrics["n_val"] == 4  # every plain subject trained on, with derived labels


def _single_subject_site(plain: Path, dst: Path, data: np.ndarray, affine: np.ndarray, sub: str) -> Path:
    dst.mkdir(parents=True)
    shutil.copy(plain / "dataset_description.json", dst)
    with open(plain / "participants.tsv") as fh:
        lines = fh.read().splitlines()
    row = next(line for line in lines[1:] if line.startswith(sub + "\t"))
    (dst / "participants.tsv").write_text(lines[0] + "\n" + row + "\n")
    path = dst / sub / "anat" / f"{sub}_T1w.nii.gz"
    path.parent.mkdir(parents=True)
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def test_planted_cut_off_head_is_named_with_its_file(checked, tmp_path, capsys):
    plain, _, _, rep = checked
    s = next(x for x in rep["subjects"] if "".join(nib.aff2axcodes(nib.load(x["image"]).affine)) == "RAS")
    img = nib.load(s["image"])
    data = np.asarray(img.dataobj).astype(np.int16)
    k = data.shape[2]
    cut = data[:, :, : int(k * 0.62)]  # the top of the head is cut off (field of view still large enough)
    path = _single_subject_site(plain, tmp_path / "cut", cut, img.affine, s["participant_id"])
    rc = main(
        [
            "site",
            "check",
            "--bids",
            str(tmp_path / "cut"),
            "--min-subjects",
            "1",
            "--quiet",
            "--json",
            str(tmp_path / "r.json"),
        ]
    )
    text = capsys.readouterr().out
    assert rc == 1 and str(path) in text
    sub = json.loads((tmp_path / "r.json").read_text())["subjects"][0]
    codes = {p["code"] for p in sub["problems"]}
    assert codes & {"brain_mask_fov_edge", "brain_mask_volume"}, sub["problems"]
    assert all(p["file"] == str(path) for p in sub["problems"])
    assert sub["label"] is None  # a failed derivation is not used


def test_planted_blank_after_bias_correction_is_named(checked, tmp_path, monkeypatch, capsys):
    import fl_app.data.anatomy as anatomy

    plain, _, _, rep = checked
    s = rep["subjects"][0]
    img = nib.load(s["image"])
    data = np.asarray(img.dataobj).astype(np.float32) + 0.5  # another scan: not in any cache
    path = _single_subject_site(plain, tmp_path / "blank", data, img.affine, s["participant_id"])
    monkeypatch.setattr(anatomy, "bias_correct", lambda data, mask, zooms, **kw: np.zeros_like(data))
    cache = tmp_path / "cache"
    report = check_site(read_bids(tmp_path / "blank"), PROFILE, min_subjects=1, anatomy_cache_dir=cache)
    assert not report.ok
    p = report.subjects[0].problems
    assert [x.code for x in p] == ["blank_after_bias_correction"] and p[0].file == str(path)
    assert "blank" in report.format_table() and str(path) in report.format_table()
    # the failure is cached too (same scan, same verdict) and a dataset skips the subject
    ds = SiteDataset(read_bids(tmp_path / "blank").subjects, PROFILE, cache)
    assert len(ds) == 0 and ds.n_skipped == 1


def test_anatomy_cache_key_is_the_content(checked, tmp_path):
    _, cache, _, rep = checked
    src = Path(rep["subjects"][0]["image"])
    moved = tmp_path / "elsewhere.nii.gz"
    shutil.copy(src, moved)  # same bytes, other path and time: same key, cached result
    c = AnatomyCache(cache)
    assert c.key(moved) == c.key(src)
    d = c.get(moved)
    assert d.cached and d.label == Path(rep["subjects"][0]["label"])


def test_plausibility_checks_name_each_reason():
    """Volume, centring, field-of-view edge and tissue fractions, on synthetic arrays (no network)."""
    from fl_app.data.anatomy import plausibility_problems
    from fl_app.data.nifti import Volume

    shape = (60, 60, 60)
    aff = np.diag([3.0, 3.0, 3.0, 1.0])
    head = np.zeros(shape, bool)
    head[5:55, 5:55, 5:55] = True
    vol = Volume(np.where(head, 100.0, 0.0).astype(np.float32), aff, "float32", Path("x.nii.gz"))
    good = np.zeros(shape, bool)
    good[18:42, 16:44, 18:42] = True  # ~ 24*28*24*27 ml/1000 = 435 ml: too small
    label = np.where(good, 2, 0).astype(np.uint8)
    label[good & (np.indices(shape)[0] % 3 == 0)] = 1
    label[good & (np.indices(shape)[0] % 3 == 1)] = 3
    codes = {p.code for p in plausibility_problems(vol, good, label, "x.nii.gz", head)}
    assert codes == {"brain_mask_volume"}
    big = np.zeros(shape, bool)
    big[12:48, 10:50, 12:48] = True  # 36*40*36*27/1000 = 1400 ml, centred
    lab = np.where(big, 2, 0).astype(np.uint8)
    lab[big & (np.indices(shape)[0] % 3 == 0)] = 1
    lab[big & (np.indices(shape)[0] % 3 == 1)] = 3
    assert plausibility_problems(vol, big, lab, "x.nii.gz", head) == []
    shifted = np.roll(big, 11, axis=0)
    shifted_lab = np.roll(lab, 11, axis=0)
    codes = {p.code for p in plausibility_problems(vol, shifted, shifted_lab, "x.nii.gz", head)}
    assert codes == {"brain_mask_off_centre"}
    edge = np.roll(big, -12, axis=2)
    codes = {p.code for p in plausibility_problems(vol, edge, np.roll(lab, -12, axis=2), "x.nii.gz", head)}
    assert "brain_mask_fov_edge" in codes
    all_gm = np.where(big, 2, 0).astype(np.uint8)
    probs = plausibility_problems(vol, big, all_gm, "x.nii.gz", head)
    assert [p.code for p in probs] == ["tissue_fractions"] and probs[0].file == "x.nii.gz"
    assert "CSF 0.00" in probs[0].message


def _pv_phantom(atrophy: float, seed: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A folded 'brain' of partial-volume CSF / GM / WM fractions (2.5 mm voxels), T1 contrast and noise.

    Truth is the tissue filling most of each voxel (as the simulator labels); ``atrophy`` thins the cortex
    and grows the ventricles, so CSF mixes into most tissue voxels.
    """
    from scipy.special import expit

    shape, zooms = (56, 64, 56), np.array([2.5, 2.5, 2.5])
    g = np.indices(shape).astype(np.float64)
    x, y, z = ((g[a] - (shape[a] - 1) / 2) * zooms[a] for a in range(3))
    r = np.sqrt((x / 60) ** 2 + (y / 72) ** 2 + (z / 55) ** 2)
    fold = 0.05 * np.sin(9 * np.arctan2(y, x)) * np.cos(7 * np.arctan2(z, np.hypot(x, y)))
    icv = expit((1.0 - r) / 0.025)
    tissue = expit((0.93 - atrophy - r + fold) / 0.025)
    wm = expit((0.62 - r + 1.5 * fold) / 0.025)
    vent = expit(
        (0.18 + 0.5 * atrophy - 0.18 * np.sqrt((x / 18) ** 2 + (y / 30) ** 2 + (z / 14) ** 2)) / 0.025
    )
    pw = icv * wm * (1 - vent)
    pg = icv * np.clip(tissue - wm, 0, 1) * (1 - vent)
    pc = icv - pw - pg
    truth = np.where(pc >= np.maximum(pg, pw), 1, np.where(pw > pg, 3, 2)).astype(np.uint8)
    truth[icv < 0.5] = 0
    img = 0.25 * pc + 0.65 * pg + 1.0 * pw + np.random.default_rng(seed).normal(0, 0.03, shape)
    return (np.abs(img) * 500).astype(np.float32), truth, zooms


@pytest.mark.parametrize("atrophy", [0.0, 0.1])
def test_tissue_segmentation_gives_mixed_voxels_to_the_majority_tissue(atrophy):
    """Partial-volume voxels: a plain mixture's posteriors put CSF/GM mixtures into GM (brain tissue fraction
    over-estimated by ~0.08 when atrophy makes most voxels mixed); the mid-point rule must not."""
    from fl_app.data.anatomy import tissue_segment

    img, truth, zooms = _pv_phantom(atrophy)
    lab = tissue_segment(img, truth > 0, zooms)
    assert set(np.unique(lab[truth == 0]).tolist()) == {0}
    for k in (1, 2, 3):
        a, b = lab == k, truth == k
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.85, k

    def btf(x: np.ndarray) -> float:
        return float((x >= 2).sum() / (x > 0).sum())

    assert abs(btf(lab) - btf(truth)) < 0.04
