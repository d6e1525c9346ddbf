"""``synthbrain site check``: validate every subject of a site before it joins a federation.

Reads every image and label map in full (truncation and NaN voxels only show there), checks
covariates, geometry against the profile and label/image agreement, and returns a
:class:`SiteReport`. It never raises on a bad file, never writes into the data folder and sends
nothing anywhere.

A site *can join* when at least ``min_subjects`` subjects are valid and the fraction of invalid
subjects is at most ``max_invalid_fraction`` (default 0: every listed subject must be fixed or
removed from participants.tsv, so that nothing is silently dropped).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from fl_app.config import Profile
from fl_app.data.anatomy import AnatomyCache, tissue_fractions
from fl_app.data.cohort import Cohort, Subject
from fl_app.data.nifti import NiftiError, Problem, read_volume
from fl_app.data.preprocess import check_geometry, check_label_volume


@dataclass
class SiteReport:
    site: str
    root: str
    profile: str
    min_subjects: int
    max_invalid_fraction: float
    subjects: list[Subject]
    problems: list[Problem] = field(default_factory=list)
    fractions: dict[int, dict[str, float]] = field(default_factory=dict)  # id(subject) -> CSF/GM/WM fractions

    @property
    def n_derived(self) -> int:
        return sum(s.label_source == "derived" for s in self.subjects)

    @property
    def n_valid(self) -> int:
        return sum(s.ok for s in self.subjects)

    @property
    def n_invalid(self) -> int:
        return len(self.subjects) - self.n_valid

    @property
    def ok(self) -> bool:
        if self.problems or self.n_valid < self.min_subjects:
            return False
        return self.n_invalid <= self.max_invalid_fraction * max(len(self.subjects), 1)

    def verdict(self) -> str:
        if self.ok:
            return f"site can join: {self.n_valid} valid subjects (minimum {self.min_subjects})"
        reasons = []
        if self.problems:
            reasons.append(f"{len(self.problems)} dataset-level problem(s)")
        if self.n_invalid:
            reasons.append(f"{self.n_invalid} of {len(self.subjects)} subjects have problems")
        if self.n_valid < self.min_subjects:
            reasons.append(f"only {self.n_valid} valid subjects, minimum is {self.min_subjects}")
        return "site cannot join: " + "; ".join(reasons)

    def to_dict(self) -> dict[str, Any]:
        _fractions = self.fractions
        return {
            "ok": self.ok,
            "verdict": self.verdict(),
            "site": self.site,
            "root": self.root,
            "profile": self.profile,
            "min_subjects": self.min_subjects,
            "max_invalid_fraction": self.max_invalid_fraction,
            "n_subjects": len(self.subjects),
            "n_valid": self.n_valid,
            "n_derived_labels": self.n_derived,
            "problems": [p.to_dict() for p in self.problems],
            "subjects": [
                {
                    "participant_id": s.participant_id,
                    "ok": s.ok,
                    "image": str(s.image) if s.image else None,
                    "label": str(s.label) if s.label else None,
                    "labels": s.label_source,
                    "fractions": _fractions.get(id(s)),
                    "anatomy": s.anatomy,
                    "age": s.age,
                    "sex": s.sex,
                    "diagnosis": s.diagnosis,
                    "problems": [p.to_dict() for p in s.problems],
                    "warnings": list(s.warnings),
                }
                for s in self.subjects
            ],
        }

    def write_json(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    def format_table(self) -> str:
        """A plain-text table of every subject and its problems, then the verdict."""
        rows = [("subject", "status", "age", "sex", "dx", "labels", "problems")]
        for s in self.subjects:
            age = f"{s.age:g}" if s.age is not None else "-"
            probs = "; ".join(str(p) for p in s.problems) or ("; ".join(s.warnings) if s.warnings else "")
            rows.append(
                (
                    s.participant_id,
                    "ok" if s.ok else "FAIL",
                    age,
                    s.sex or "-",
                    s.diagnosis or "-",
                    s.label_source or "-",
                    probs,
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(6)]
        lines = [f"Site {self.site} ({self.root}), profile {self.profile}"]
        for p in self.problems:
            lines.append(f"  DATASET PROBLEM: {p}")
        for r in rows:
            lines.append("  ".join(c.ljust(w) for c, w in zip(r[:6], widths, strict=True)) + "  " + r[6])
        lines.append(self.verdict())
        return "\n".join(lines)


def check_subject(
    subject: Subject, profile: Profile, anatomy_cache: AnatomyCache | None = None
) -> dict[str, float] | None:
    """Read the subject's files and append every problem found to ``subject.problems``.

    With ``anatomy_cache``, a subject without a label map gets a derived one (see
    :mod:`fl_app.data.anatomy`), checked exactly like a provided one. Returns the CSF/GM/WM fractions of
    the label map used (None without one).
    """
    if subject.image is None or any(p.code == "missing_image" for p in subject.problems):
        return None
    try:
        image = read_volume(subject.image)
    except NiftiError as exc:
        subject.problems.append(exc.problem)
        image = None
    except Exception as exc:  # never crash on a bad file
        subject.problems.append(
            Problem("unreadable", f"unexpected error reading image: {exc!r}", str(subject.image))
        )
        image = None
    if image is not None:
        subject.problems.extend(check_geometry(image, profile.data))
    if subject.label is not None and subject.label_source is None:
        subject.label_source = "provided"
    if subject.label is None and anatomy_cache is not None and image is not None and subject.ok:
        try:
            derived = anatomy_cache.get(subject.image, image)
        except Exception as exc:  # never crash on a bad file
            subject.problems.append(
                Problem("anatomy_failed", f"anatomy stage failed: {exc!r}", str(subject.image))
            )
            return None
        subject.anatomy = derived.to_dict()
        if derived.problems:
            subject.problems.extend(derived.problems)
            return None
        subject.label = derived.label
        subject.label_source = "derived"
    if subject.label is None:
        if profile.data.brain_mask == "labels":
            subject.problems.append(
                Problem(
                    "label_missing",
                    "no tissue label map, but the profile brain-extracts with it (data.brain_mask: labels)",
                    str(subject.image),
                )
            )
        return None
    try:
        label = read_volume(subject.label, check_values=False)
    except NiftiError as exc:
        p = exc.problem
        subject.problems.append(Problem(f"label_{p.code}", p.message, p.file))
        return None
    except Exception as exc:
        subject.problems.append(Problem("label_unreadable", f"unexpected error: {exc!r}", str(subject.label)))
        return None
    if image is not None:
        subject.problems.extend(check_label_volume(label, image))
    lab = np.rint(np.nan_to_num(label.data)).astype(np.int64)
    return tissue_fractions(lab) if (lab > 0).any() else None


def check_site(
    cohort: Cohort,
    profile: Profile,
    *,
    min_subjects: int = 4,
    max_invalid_fraction: float = 0.0,
    progress: bool = False,
    anatomy_cache_dir: str | Path | None = None,
) -> SiteReport:
    """Validate every subject of ``cohort`` (mutates their ``problems``) and return the report.

    With ``anatomy_cache_dir`` (the site's cache), subjects without a label map get derived ones there.
    """
    cache = AnatomyCache(anatomy_cache_dir) if anatomy_cache_dir is not None else None
    fractions: dict[int, dict[str, float]] = {}
    for subject in tqdm(
        cohort.subjects, desc=f"checking {cohort.site}", unit="subject", disable=not progress
    ):
        fr = check_subject(subject, profile, cache)
        if fr is not None:
            fractions[id(subject)] = {k: round(v, 4) for k, v in fr.items()}
    return SiteReport(
        site=cohort.site,
        root=str(cohort.root),
        profile=profile.name,
        min_subjects=min_subjects,
        max_invalid_fraction=max_invalid_fraction,
        subjects=list(cohort.subjects),
        problems=list(cohort.problems),
        fractions=fractions,
    )
