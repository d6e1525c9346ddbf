"""Covariate vocabulary shared by cohorts, simulated sites, the prior and the sampler.

Categorical covariates are encoded as integer indices into these tuples; the prior adds
one extra "unknown" index (``len(SEXES)`` / ``len(DIAGNOSES)``) for missing values.
"""

from __future__ import annotations

SEXES: tuple[str, ...] = ("F", "M")
DIAGNOSES: tuple[str, ...] = ("CN", "MCI", "AD")
UNKNOWN_SEX = len(SEXES)
UNKNOWN_DIAGNOSIS = len(DIAGNOSES)


def sex_index(sex: str | None) -> int:
    """'F' -> 0, 'M' -> 1, None -> UNKNOWN_SEX."""
    return UNKNOWN_SEX if sex is None else SEXES.index(sex)


def diagnosis_index(dx: str | None) -> int:
    """'CN' -> 0, 'MCI' -> 1, 'AD' -> 2, None -> UNKNOWN_DIAGNOSIS."""
    return UNKNOWN_DIAGNOSIS if dx is None else DIAGNOSES.index(dx)
