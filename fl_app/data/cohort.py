"""A hospital site's cohort: subjects, their images, optional tissue label maps and covariates.

Two sources are supported:

* a **BIDS folder**: ``participants.tsv`` (participant_id, age, sex, diagnosis; column names and
  vocabularies set by :class:`fl_app.config.CohortColumns`), T1w images at
  ``sub-*/[ses-*/]anat/*_T1w.nii[.gz]`` and optional tissue label maps at
  ``derivatives/*/sub-*/[ses-*/]anat/*_dseg.nii[.gz]`` (0 background, 1 CSF, 2 GM, 3 WM);
* a **CSV manifest**: one row per subject with ``path``, ``age``, ``sex``, ``diagnosis`` and
  optionally ``label_path`` and ``participant_id``; relative paths are relative to the CSV.

Reading never opens image data (that is :mod:`fl_app.data.validate`'s job) and never writes.
Metadata problems (missing/invalid covariates, duplicates, images without a participant row and
rows without an image) are attached to each :class:`Subject` as :class:`Problem` records.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fl_app.config import CohortColumns, SiteConfig
from fl_app.data.nifti import Problem

MISSING_VALUES = {"", "n/a", "na", "nan", "none", "null"}
_SUB_RE = re.compile(r"^sub-([A-Za-z0-9]+)$")
_SES_RE = re.compile(r"_ses-([A-Za-z0-9]+)")


class CohortError(ValueError):
    """The cohort as a whole cannot be read (no such folder, no participants file, bad manifest)."""


@dataclass
class Subject:
    """One subject of a site. ``sex`` is 'F'/'M', ``diagnosis`` 'CN'/'MCI'/'AD'; None = unknown."""

    participant_id: str
    image: Path | None
    label: Path | None = None
    age: float | None = None
    sex: str | None = None
    diagnosis: str | None = None
    site: str = "site"
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    label_source: str | None = None  # "provided" | "derived" (fl_app.data.anatomy); None = no label map
    anatomy: dict[str, Any] | None = None  # facts of a derived label map (volume, fractions, timings)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class Cohort:
    """All subject records of one site (valid or not), in participant order."""

    site: str
    root: Path
    subjects: list[Subject]
    problems: list[Problem] = field(default_factory=list)

    def __iter__(self) -> Iterator[Subject]:
        return iter(self.subjects)

    def __len__(self) -> int:
        return len(self.subjects)

    def valid(self) -> list[Subject]:
        return [s for s in self.subjects if s.ok]


def _norm(value: str | None) -> str | None:
    if value is None:
        return None
    v = value.strip()
    return None if v.lower() in MISSING_VALUES else v


def _parse_covariates(subject: Subject, row: dict[str, str], cols: CohortColumns, source: str) -> None:
    """Fill age/sex/diagnosis of ``subject`` from a raw row, recording problems."""
    raw_age = _norm(row.get(cols.age))
    if raw_age is None:
        subject.problems.append(Problem("missing_age", f"{cols.age!r} is missing", source))
    else:
        try:
            age = float(raw_age)
        except ValueError:
            age = math.nan
        lo, hi = cols.age_range
        if not math.isfinite(age) or not lo <= age <= hi:
            subject.problems.append(
                Problem("invalid_age", f"{cols.age!r} = {raw_age!r} is not a number in {lo:g}-{hi:g}", source)
            )
        else:
            subject.age = age
    raw_sex = _norm(row.get(cols.sex))
    sex_map = {k.lower(): v for k, v in cols.sex_values.items()}
    if raw_sex is None:
        subject.problems.append(Problem("missing_sex", f"{cols.sex!r} is missing", source))
    elif raw_sex.lower() not in sex_map:
        subject.problems.append(
            Problem(
                "invalid_sex",
                f"{cols.sex!r} = {raw_sex!r} is not one of {sorted(cols.sex_values)}",
                source,
            )
        )
    else:
        subject.sex = sex_map[raw_sex.lower()]
    raw_dx = _norm(row.get(cols.diagnosis))
    dx_map = {k.lower(): v for k, v in cols.diagnosis_values.items()}
    if raw_dx is None:
        subject.problems.append(Problem("missing_diagnosis", f"{cols.diagnosis!r} is missing", source))
    elif raw_dx.lower() not in dx_map:
        subject.problems.append(
            Problem(
                "invalid_diagnosis",
                f"{cols.diagnosis!r} = {raw_dx!r} is not one of {sorted(cols.diagnosis_values)}",
                source,
            )
        )
    else:
        subject.diagnosis = dx_map[raw_dx.lower()]


def _read_table(path: Path, delimiter: str) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh, delimiter=delimiter)
            rows = [(i + 2, row) for i, row in enumerate(reader)]
            header = list(reader.fieldnames or [])
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise CohortError(f"{path}: cannot read table: {exc}") from None
    return header, rows


def _sub_label(pid: str) -> str:
    return pid if pid.startswith("sub-") else f"sub-{pid}"


def _find_nifti(root: Path, pattern: str) -> list[Path]:
    found = [*root.glob(pattern + ".nii"), *root.glob(pattern + ".nii.gz")]
    return sorted(p for p in found if p.is_file() or p.is_symlink())


def _pick(paths: list[Path], what: str, subject: Subject) -> Path | None:
    if not paths:
        return None
    if len(paths) > 1:
        subject.warnings.append(
            f"{len(paths)} {what} files found; using {paths[0].name} (first session/run in sort order)"
        )
    return paths[0]


def _ses_of(path: Path) -> str | None:
    m = _SES_RE.search(path.name)
    return m.group(1) if m else None


def read_bids(bids_dir: str | Path, site_cfg: SiteConfig | None = None) -> Cohort:
    """Index a BIDS site folder (see module docstring). Raises CohortError if it is not one."""
    root = Path(bids_dir)
    cfg = site_cfg or SiteConfig()
    cols = cfg.columns
    if not root.is_dir():
        raise CohortError(f"{root}: no such directory")
    site = cfg.name if site_cfg is not None and cfg.name != "site" else root.name
    participants = root / "participants.tsv"
    cohort = Cohort(site=site, root=root, subjects=[])
    rows: list[tuple[int, dict[str, str]]] = []
    if participants.exists():
        header, rows = _read_table(participants, "\t")
        missing = [c for c in (cols.participant_id, cols.age, cols.sex, cols.diagnosis) if c not in header]
        if missing:
            cohort.problems.append(
                Problem(
                    "participants_columns", f"missing column(s) {missing}; found {header}", str(participants)
                )
            )
    else:
        cohort.problems.append(
            Problem("missing_participants", "participants.tsv not found", str(participants))
        )

    images: dict[str, list[Path]] = {}
    for sub_dir in sorted(root.glob("sub-*")):
        if not sub_dir.is_dir() or not _SUB_RE.match(sub_dir.name):
            continue
        found = _find_nifti(sub_dir, "anat/*_T1w") + _find_nifti(sub_dir, "ses-*/anat/*_T1w")
        images[sub_dir.name] = sorted(found)
    deriv = root / "derivatives"
    labels: dict[str, list[Path]] = {}
    if deriv.is_dir():
        pipelines = [deriv / cfg.label_derivative] if cfg.label_derivative else sorted(deriv.iterdir())
        for pipe in pipelines:
            if not pipe.is_dir():
                continue
            for p in _find_nifti(pipe, "sub-*/anat/*_dseg") + _find_nifti(pipe, "sub-*/ses-*/anat/*_dseg"):
                sub = p.name.split("_")[0]
                labels.setdefault(sub, []).append(p)

    seen: dict[str, int] = {}
    for line_no, row in rows:
        raw_id = _norm(row.get(cols.participant_id))
        source = f"{participants}:{line_no}"
        if raw_id is None:
            cohort.problems.append(Problem("missing_participant_id", "row without participant_id", source))
            continue
        sub = _sub_label(raw_id)
        subject = Subject(participant_id=sub, image=None, site=site)
        _parse_covariates(subject, row, cols, source)
        if sub in seen:
            subject.problems.append(
                Problem(
                    "duplicate_subject", f"{sub} appears more than once (first at line {seen[sub]})", source
                )
            )
        else:
            seen[sub] = line_no
        subject.image = _pick(images.get(sub, []), "T1w", subject)
        if subject.image is None:
            subject.problems.append(
                Problem(
                    "missing_image",
                    f"no T1w image found for {sub} (expected {sub}/anat/{sub}_T1w.nii.gz)",
                    str(root / sub),
                )
            )
        else:
            cands = labels.get(sub, [])
            ses = _ses_of(subject.image)
            if ses is not None and any(_ses_of(p) == ses for p in cands):
                cands = [p for p in cands if _ses_of(p) == ses]
            subject.label = _pick(cands, "dseg", subject)
        cohort.subjects.append(subject)

    if participants.exists():
        for sub, paths in images.items():
            if sub not in seen and paths:
                cohort.subjects.append(
                    Subject(
                        participant_id=sub,
                        image=paths[0],
                        site=site,
                        problems=[
                            Problem(
                                "no_participant_row",
                                f"{sub} has an image but no row in participants.tsv",
                                str(paths[0]),
                            )
                        ],
                    )
                )
    else:
        for sub, paths in images.items():
            subject = Subject(participant_id=sub, image=paths[0] if paths else None, site=site)
            subject.problems.append(
                Problem("no_participant_row", "participants.tsv not found", str(participants))
            )
            cohort.subjects.append(subject)
    return cohort


def read_manifest(manifest: str | Path, site_cfg: SiteConfig | None = None) -> Cohort:
    """Read a CSV manifest (path, age, sex, diagnosis[, label_path][, participant_id])."""
    path = Path(manifest)
    cfg = site_cfg or SiteConfig()
    cols = cfg.columns
    if not path.is_file():
        raise CohortError(f"{path}: no such file")
    header, rows = _read_table(path, ",")
    if cols.path not in header:
        raise CohortError(f"{path}: manifest has no {cols.path!r} column (found {header})")
    site = cfg.name if site_cfg is not None and cfg.name != "site" else path.stem
    cohort = Cohort(site=site, root=path.parent, subjects=[])
    seen: dict[str, int] = {}
    for line_no, row in rows:
        source = f"{path}:{line_no}"
        raw_path = _norm(row.get(cols.path))
        image = (path.parent / raw_path) if raw_path else None
        raw_id = _norm(row.get(cols.participant_id))
        if raw_id is None and image is not None:
            raw_id = image.name.split("_")[0] if image.name.startswith("sub-") else image.name.split(".")[0]
        pid = _sub_label(raw_id or f"row{line_no}")
        subject = Subject(participant_id=pid, image=image, site=site)
        _parse_covariates(subject, row, cols, source)
        raw_label = _norm(row.get(cols.label_path))
        subject.label = (path.parent / raw_label) if raw_label else None
        if image is None:
            subject.problems.append(Problem("missing_image", f"{cols.path!r} is empty", source))
        elif not image.exists():
            subject.problems.append(Problem("missing_image", "image file does not exist", str(image)))
        if subject.label is not None and not subject.label.exists():
            subject.problems.append(
                Problem("missing_label", "label map file does not exist", str(subject.label))
            )
        if pid in seen:
            subject.problems.append(
                Problem(
                    "duplicate_subject", f"{pid} appears more than once (first at line {seen[pid]})", source
                )
            )
        else:
            seen[pid] = line_no
        cohort.subjects.append(subject)
    return cohort


def read_cohort(site_cfg: SiteConfig) -> Cohort:
    """Read the cohort a site config points at (BIDS folder or CSV manifest)."""
    if site_cfg.bids_dir is not None:
        return read_bids(site_cfg.bids_dir, site_cfg)
    if site_cfg.manifest is not None:
        return read_manifest(site_cfg.manifest, site_cfg)
    raise CohortError(f"site {site_cfg.name!r}: set bids_dir or manifest in the site config")
