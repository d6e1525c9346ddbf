"""`site check`: every kind of bad input is detected, named with its file, and nothing is modified."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fl_app.cli import main
from fl_app.data.cohort import read_bids
from fl_app.data.validate import check_site
from tests.conftest import default_rows, write_bids_site, write_nifti


@pytest.fixture(scope="module")
def good_site(tmp_path_factory, head) -> Path:
    return write_bids_site(tmp_path_factory.mktemp("good") / "site-a", head, default_rows(6))


@pytest.fixture()
def site(tmp_path, good_site) -> Path:
    dst = tmp_path / "site-a"
    shutil.copytree(good_site, dst)
    return dst


def _t1(site: Path, sub: str) -> Path:
    return site / sub / "anat" / f"{sub}_T1w.nii.gz"


def _dseg(site: Path, sub: str) -> Path:
    return site / "derivatives" / "labels" / sub / "anat" / f"{sub}_dseg.nii.gz"


def _report(site: Path, profile, min_subjects: int = 4):
    return check_site(read_bids(site), profile, min_subjects=min_subjects)


def _problems(report, sub: str) -> list:
    return next(s for s in report.subjects if s.participant_id == sub).problems


def test_good_site_passes(good_site, profile):
    report = _report(good_site, profile)
    assert report.ok, report.format_table()
    assert report.n_valid == 6
    assert all(s.label is not None for s in report.subjects)


def _truncate(site, head):
    p = _t1(site, "sub-002")
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2])
    return p, "unreadable"


def _not_nifti(site, head):
    p = _t1(site, "sub-002")
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(2000))
    return p, "not_nifti"


def _text_as_nii(site, head):
    p = _t1(site, "sub-002")
    p.unlink()
    p = p.with_name("sub-002_T1w.nii")
    p.write_text("this is a radiology report, not an image\n" * 20)
    return p, "not_nifti"


def _four_d(site, head):
    data, _, aff = head
    p = write_nifti(_t1(site, "sub-002"), np.stack([data, data], axis=-1), aff, np.int16)
    return p, "not_3d"


def _nan(site, head):
    data, _, aff = head
    bad = data.copy()
    bad[10, 10, 10] = np.nan
    bad[11, 10, 10] = np.inf
    p = write_nifti(_t1(site, "sub-002"), bad, aff, np.float32)
    return p, "non_finite"


def _constant(site, head):
    data, _, aff = head
    p = write_nifti(_t1(site, "sub-002"), np.full(data.shape, 7.0, np.float32), aff)
    return p, "constant_image"


def _empty(site, head):
    data, _, aff = head
    p = write_nifti(_t1(site, "sub-002"), np.zeros(data.shape, np.float32), aff)
    return p, "constant_image"


def _small_fov(site, head):
    data, label, aff = head
    p = write_nifti(_t1(site, "sub-002"), data[:, :, 10:25], aff, np.int16)  # 60 mm in S
    write_nifti(_dseg(site, "sub-002"), label[:, :, 10:25], aff, np.uint8)
    return p, "fov_too_small"


def _voxel_size(site, head):
    data, label, aff = head
    big = aff.copy()
    big[:3, :3] = np.diag([12.0, 12.0, 12.0])
    p = write_nifti(_t1(site, "sub-002"), data, big, np.int16)
    write_nifti(_dseg(site, "sub-002"), label, big, np.uint8)
    return p, "voxel_size"


def _label_shape(site, head):
    _, label, aff = head
    p = write_nifti(_dseg(site, "sub-002"), label[:-2], aff, np.uint8)
    return p, "label_mismatch"


def _label_affine(site, head):
    _, label, aff = head
    moved = aff.copy()
    moved[0, 3] += 8.0
    p = write_nifti(_dseg(site, "sub-002"), label, moved, np.uint8)
    return p, "label_mismatch"


def _label_values(site, head):
    _, label, aff = head
    bad = label.copy()
    bad[20, 20, 20] = 7
    p = write_nifti(_dseg(site, "sub-002"), bad, aff, np.uint8)
    return p, "label_values"


CORRUPTIONS = [
    _truncate,
    _not_nifti,
    _text_as_nii,
    _four_d,
    _nan,
    _constant,
    _empty,
    _small_fov,
    _voxel_size,
    _label_shape,
    _label_affine,
    _label_values,
]


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__.strip("_"))
def test_bad_file_is_named(site, head, profile, corrupt):
    path, code = corrupt(site, head)
    before = {p: p.stat().st_mtime_ns for p in site.rglob("*") if p.is_file()}
    report = _report(site, profile)
    probs = _problems(report, "sub-002")
    assert [p.code for p in probs] == [code], report.format_table()
    assert probs[0].file == str(path)
    assert path.name in report.format_table()
    assert not report.ok  # default: every listed subject must be valid
    others = [s for s in report.subjects if s.participant_id != "sub-002"]
    assert all(s.ok for s in others)
    after = {p: p.stat().st_mtime_ns for p in site.rglob("*") if p.is_file()}
    assert after == before  # nothing written into the data folder


def _edit_rows(site: Path, edit) -> None:
    lines = (site / "participants.tsv").read_text().splitlines()
    (site / "participants.tsv").write_text("\n".join(edit(lines)) + "\n")


@pytest.mark.parametrize(
    ("field", "value", "code"),
    [
        ("age", "", "missing_age"),
        ("age", "n/a", "missing_age"),
        ("age", "sixty", "invalid_age"),
        ("age", "-4", "invalid_age"),
        ("sex", "X", "invalid_sex"),
        ("sex", "", "missing_sex"),
        ("diagnosis", "PD", "invalid_diagnosis"),
        ("diagnosis", "n/a", "missing_diagnosis"),
    ],
)
def test_bad_covariates(site, profile, field, value, code):
    col = ["participant_id", "age", "sex", "diagnosis"].index(field)

    def edit(lines):
        cells = lines[3].split("\t")  # sub-003
        cells[col] = value
        lines[3] = "\t".join(cells)
        return lines

    _edit_rows(site, edit)
    report = _report(site, profile)
    probs = _problems(report, "sub-003")
    assert [p.code for p in probs] == [code]
    assert "participants.tsv:4" in probs[0].file


def test_duplicate_missing_image_and_orphan(site, head, profile):
    _edit_rows(site, lambda lines: [*lines, lines[1], "sub-099\t70\tF\tAD"])
    data, _, aff = head
    write_nifti(_t1(site, "sub-777"), data, aff, np.int16)
    report = _report(site, profile)
    codes = {(s.participant_id, p.code) for s in report.subjects for p in s.problems}
    assert ("sub-001", "duplicate_subject") in codes
    assert ("sub-099", "missing_image") in codes
    assert ("sub-777", "no_participant_row") in codes
    assert not report.ok


def test_minimum_and_fraction(site, profile):
    assert not _report(site, profile, min_subjects=7).ok
    _truncate(site, None)
    report = check_site(read_bids(site), profile, min_subjects=4, max_invalid_fraction=0.2)
    assert report.ok and report.n_valid == 5


def test_cli_exit_codes_and_json(site, profile, tmp_path, capsys):
    out = tmp_path / "report.json"
    assert main(["site", "check", "--bids", str(site), "--json", str(out), "--quiet"]) == 0
    rep = json.loads(out.read_text())
    assert rep["ok"] is True and len(rep["subjects"]) == 6
    assert {"participant_id", "ok", "problems"} <= set(rep["subjects"][0])

    _truncate(site, None)
    assert main(["site", "check", "--bids", str(site), "--json", str(out), "--quiet"]) == 1
    rep = json.loads(out.read_text())
    assert rep["ok"] is False
    bad = [s for s in rep["subjects"] if not s["ok"]]
    assert [s["participant_id"] for s in bad] == ["sub-002"]
    assert bad[0]["problems"][0]["code"] == "unreadable"


def _head_for_cli(site: Path):
    import nibabel as nib

    img = nib.load(str(_t1(site, "sub-001")))
    return np.asarray(img.dataobj, np.float32), None, img.affine


def _blank_age(line: str) -> str:
    cells = line.split("\t")
    cells[1] = ""
    return "\t".join(cells)


def test_truncated_nan_and_missing_age_all_named(site, profile, tmp_path, capsys):
    """The 'done when' scenario: three different subjects, three problems, all named; exit 1."""
    trunc, _ = _truncate(site, None)
    data, _, aff = _head_for_cli(site)
    bad = data.copy()
    bad[5, 5, 5] = np.nan
    nan_path = write_nifti(_t1(site, "sub-003"), bad, aff, np.float32)
    _edit_rows(
        site,
        lambda lines: [lines[0], *[_blank_age(line) if "sub-005" in line else line for line in lines[1:]]],
    )
    assert main(["site", "check", "--bids", str(site), "--quiet"]) == 1
    text = capsys.readouterr().out
    assert str(trunc) in text and "truncated" in text
    assert str(nan_path) in text and "NaN" in text
    assert "sub-005" in text and "'age' is missing" in text


def test_manifest_gives_same_subjects(site, profile, tmp_path):
    bids = read_bids(site)
    rows = ["path,age,sex,diagnosis,label_path"]
    for s in bids.subjects:
        rows.append(f"{s.image},{s.age},{s.sex},{s.diagnosis},{s.label}")
    (tmp_path / "cohort.csv").write_text("\n".join(rows) + "\n")
    from fl_app.data.cohort import read_manifest

    man = read_manifest(tmp_path / "cohort.csv")
    key = lambda c: [(s.participant_id, s.image, s.label, s.age, s.sex, s.diagnosis) for s in c.subjects]  # noqa: E731
    assert key(man) == key(bids)
    assert check_site(man, profile).ok
