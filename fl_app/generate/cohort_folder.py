"""The synthetic-cohort folder: a BIDS derivative dataset with tissue labels, written by ``synthbrain sample``
(:mod:`fl_app.generate.sample_cohort`) and read by ``evaluate``, ``audit-site`` and the QC report. Layout::

    dataset_description.json          DatasetType "derivative"; GeneratedBy synthbrain + model hash + ε
    participants.tsv / .json          participant_id, age, sex, diagnosis (the prescribed covariates)
    dseg.tsv                          index, name, abbreviation of the tissue labels
    sub-<label>/anat/sub-<label>_T1w.nii.gz   float32 in [0, 1], RAS, profile voxel size
    sub-<label>/anat/sub-<label>_T1w.json     seed, chunk, temperature, covariates, model hash
    sub-<label>/anat/sub-<label>_dseg.nii.gz  uint8 0 background, 1 CSF, 2 GM, 3 WM (same affine)
    sub-<label>/anat/sub-<label>_dseg.json
    code/synthbrain/sampling.json     how the cohort was sampled (checked on resume)
    code/synthbrain/withheld.tsv      subjects withheld by the memorisation audit gate (if any)
    qc/                               montages + report.html (listed in .bidsignore)

Geometry: the profile grid, RAS, voxel size = profile spacing, origin chosen so that the grid centre
is at world (0, 0, 0) mm (:func:`grid_affine`); the same orientation and spacing as the preprocessed
training data, whose grids are centred on each subject's head.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fl_app import __version__
from fl_app.config import TISSUE_LABELS, Profile
from fl_app.data.nifti import save_nifti

if TYPE_CHECKING:
    from fl_app.global_model import GlobalModel

__all__ = [
    "PROFILE_FILE",
    "SAMPLING_FILE",
    "WITHHELD_FILE",
    "CohortRow",
    "cohort_profile",
    "gate_release",
    "grid_affine",
    "is_done",
    "read_cohort_dir",
    "read_withheld",
    "subject_paths",
    "write_dataset_files",
    "write_json",
    "write_participants",
    "write_subject",
]

BIDS_VERSION = "1.9.0"
SAMPLING_FILE = Path("code") / "synthbrain" / "sampling.json"
PROFILE_FILE = Path("code") / "synthbrain" / "profile.yaml"
WITHHELD_FILE = Path("code") / "synthbrain" / "withheld.tsv"
_ABBREV = {0: "BG", 1: "CSF", 2: "GM", 3: "WM"}


@dataclass
class CohortRow:
    """One prescribed subject. ``None`` = unconditional in that covariate."""

    participant_id: str  # "sub-<label>"
    age: float | None
    sex: str | None
    diagnosis: str | None


def grid_affine(profile: Profile) -> np.ndarray:
    """RAS affine (4, 4) of the profile grid: voxel size = spacing, grid centre at world 0 mm."""
    sp = np.asarray(profile.data.spacing, dtype=np.float64)
    shape = np.asarray(profile.data.shape, dtype=np.float64)
    aff = np.diag([*sp, 1.0])
    aff[:3, 3] = -sp * (shape - 1) / 2.0
    return aff


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def subject_paths(out: Path, pid: str) -> dict[str, Path]:
    anat = Path(out) / pid / "anat"
    return {
        "t1w": anat / f"{pid}_T1w.nii.gz",
        "t1w_json": anat / f"{pid}_T1w.json",
        "dseg": anat / f"{pid}_dseg.nii.gz",
        "dseg_json": anat / f"{pid}_dseg.json",
    }


def is_done(out: Path, pid: str) -> bool:
    p = subject_paths(out, pid)
    return p["t1w_json"].is_file() and p["t1w"].is_file()


def read_withheld(out: Path) -> dict[str, str]:
    """``{participant_id: reason}`` of subjects withheld by the audit gate."""
    f = Path(out) / WITHHELD_FILE
    if not f.is_file():
        return {}
    with open(f) as fh:
        return {r["participant_id"]: r["reason"] for r in csv.DictReader(fh, delimiter="\t")}


def write_dataset_files(out: Path, gm: GlobalModel, rows: Sequence[CohortRow]) -> None:
    eps = gm.max_epsilon
    eps_text = (
        f"differential privacy, largest site epsilon {eps:.3g}"
        if eps is not None
        else "no DP epsilon recorded"
    )
    write_json(
        out / "dataset_description.json",
        {
            "Name": "synthbrain synthetic cohort",
            "BIDSVersion": BIDS_VERSION,
            "DatasetType": "derivative",
            "License": "CC0",
            "Authors": ["synthbrain generator (synthetic data)"],
            "GeneratedBy": [
                {
                    "Name": "synthbrain",
                    "Version": __version__,
                    "Description": (
                        f"Synthetic T1w images and tissue labels sampled from the synthbrain model "
                        f"sha256:{gm.model_hash} ({eps_text}). These are not images of real people."
                    ),
                }
            ],
            "SynthbrainModel": {
                "Sha256": gm.model_hash,
                "PrivacyEpsilon": eps,
                "PrivacyEpsilonPerSite": gm.epsilon,
                "Profile": gm.profile.name,
            },
        },
    )
    (out / "README").write_text(
        "Synthetic brain MRI cohort written by `synthbrain sample` (synthbrain "
        f"{__version__}).\nEach subject has a T1w image and a tissue label map (dseg: 0 background, 1 CSF, "
        "2 GM, 3 WM)\nsampled under the covariates in participants.tsv. These are not images of real people.\n"
        f"Model sha256: {gm.model_hash}\n"
    )
    # The legacy BIDS validator (bids-validator 1.x, which tests and CI run) does not know the BIDS
    # derivatives naming of discrete segmentations (``anat/sub-*_dseg.nii.gz`` + root ``dseg.tsv``,
    # schema rule ``anat_parametric_discrete_segmentation``); it would report them as NOT_INCLUDED.
    (out / ".bidsignore").write_text("qc/\n*_dseg.nii.gz\n*_dseg.json\ndseg.tsv\n")
    write_json(
        out / "participants.json",
        {
            "age": {"Description": "Prescribed age (condition of the generator)", "Units": "year"},
            "sex": {"Description": "Prescribed sex", "Levels": {"F": "female", "M": "male"}},
            "diagnosis": {
                "Description": "Prescribed diagnosis",
                "Levels": {
                    "CN": "cognitively normal",
                    "MCI": "mild cognitive impairment",
                    "AD": "Alzheimer's disease",
                },
            },
        },
    )
    with open(out / "dseg.tsv", "w", newline="") as fh:
        w = csv.writer(fh, delimiter="\t", lineterminator="\n")
        w.writerow(["index", "name", "abbreviation"])
        for k, name in TISSUE_LABELS.items():
            w.writerow([k, name, _ABBREV[k]])


def write_participants(out: Path, rows: Sequence[CohortRow]) -> None:
    """participants.tsv listing only the subjects whose files exist (keeps the dataset valid)."""
    with open(out / "participants.tsv", "w", newline="") as fh:
        w = csv.writer(fh, delimiter="\t", lineterminator="\n")
        w.writerow(["participant_id", "age", "sex", "diagnosis"])
        for r in rows:
            if (out / r.participant_id).is_dir():
                w.writerow(
                    [
                        r.participant_id,
                        "n/a" if r.age is None else f"{r.age:.1f}",
                        r.sex or "n/a",
                        r.diagnosis or "n/a",
                    ]
                )


def write_subject(
    out: Path,
    row: CohortRow,
    image: np.ndarray,
    label: np.ndarray | None,
    affine: np.ndarray,
    meta: dict[str, Any],
) -> None:
    p = subject_paths(out, row.participant_id)
    save_nifti(p["t1w"], np.clip(image, 0.0, 1.0).astype(np.float32), affine)
    side = {
        "Description": "Synthetic T1-weighted image (intensities normalised to [0, 1]).",
        "SkullStripped": False,
        "Synthbrain": meta,
    }
    if label is not None:
        save_nifti(p["dseg"], label.astype(np.uint8), affine)
        write_json(
            p["dseg_json"],
            {
                "Description": "Tissue labels decoded jointly with the T1w image (0 background, 1 CSF, 2 GM, 3 WM).",
                "Synthbrain": meta,
            },
        )
    write_json(p["t1w_json"], side)  # written last: marks the subject finished


def cohort_profile(cohort: str | Path, override: str | Path | None = None) -> Profile:
    """The profile a cohort was sampled with (``code/synthbrain/profile.yaml``), or ``override``."""
    from fl_app.config import load_profile

    if override is not None:
        return load_profile(override)
    f = Path(cohort) / PROFILE_FILE
    if not f.is_file():
        raise FileNotFoundError(f"{f} missing: give --profile")
    return load_profile(f)


def read_cohort_dir(cohort: str | Path) -> list[dict[str, Any]]:
    """The subjects of a written cohort: ``participant_id, age, sex, diagnosis, t1w, dseg`` (paths;
    ``dseg`` None when absent), in participants.tsv order."""
    cohort = Path(cohort)
    with open(cohort / "participants.tsv") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    out = []
    for r in rows:
        pid = r["participant_id"]
        p = subject_paths(cohort, pid)
        if not p["t1w"].is_file():
            continue
        out.append(
            {
                "participant_id": pid,
                "age": None if r.get("age", "n/a") in ("n/a", "") else float(r["age"]),
                "sex": None if r.get("sex", "n/a") in ("n/a", "") else r["sex"],
                "diagnosis": None if r.get("diagnosis", "n/a") in ("n/a", "") else r["diagnosis"],
                "t1w": p["t1w"],
                "dseg": p["dseg"] if p["dseg"].is_file() else None,
            }
        )
    return out


def gate_release(out: str | Path, flagged: dict[str, str]) -> list[str]:
    """Withhold flagged subjects: delete their files, record them in ``code/synthbrain/withheld.tsv``
    (so a resumed run does not re-create them) and drop them from participants.tsv.

    Args:
        out: the cohort directory.
        flagged: ``{participant_id: reason}``.

    Returns:
        The participant ids withheld by this call.
    """
    out = Path(out)
    withheld = read_withheld(out)
    new = [pid for pid in flagged if pid not in withheld]
    for pid in new:
        shutil.rmtree(out / pid, ignore_errors=True)
        for png in (out / "qc").glob(f"{pid}_*"):
            png.unlink()
        (out / "qc" / "report_viewer" / "data" / f"{pid}.js").unlink(missing_ok=True)  # its viewer data
        withheld[pid] = flagged[pid]
    f = out / WITHHELD_FILE
    f.parent.mkdir(parents=True, exist_ok=True)
    with open(f, "w", newline="") as fh:
        w = csv.writer(fh, delimiter="\t", lineterminator="\n")
        w.writerow(["participant_id", "reason"])
        for pid, reason in withheld.items():
            w.writerow([pid, reason])
    sfile = out / SAMPLING_FILE
    if sfile.is_file():
        rows = [CohortRow(**r) for r in json.loads(sfile.read_text())["subjects"]]
        write_participants(out, rows)
    return new
