"""Torch ``Dataset`` / ``DataLoader`` over a site cohort.

Each item is a dict::

    image       float32 (1, X, Y, Z) in [0, 1], on the profile's RAS grid
    label       int64 (X, Y, Z), 0 background / 1 CSF / 2 GM / 3 WM; all -1 without a label map
    has_label   bool scalar
    age         float32 scalar (NaN if unknown)
    sex         int64 scalar index into SEXES (UNKNOWN_SEX if unknown)
    diagnosis   int64 scalar index into DIAGNOSES (UNKNOWN_DIAGNOSIS if unknown)
    participant_id  str

Subjects without a tissue label map get the one derived on site by :mod:`fl_app.data.anatomy` (from the
site's cache, derived there if missing; ``derive_labels=False`` turns that off) and from then on are read
exactly like subjects with a provided map. Volumes are preprocessed once through :class:`~fl_app.data.preprocess.PreprocessCache`. A
subject whose file cannot be read (even one that became unreadable after ``site check``) is
skipped when the dataset is prepared; only the *count* of skipped subjects is exposed
(``dataset.n_skipped``), never their content.

A file can also become unreadable *after* the dataset was prepared (mid-job, between rounds).
The cache does not hide that: its key holds each file's size and modification time, so a truncated
or replaced file misses the cache and is read again. :meth:`SiteDataset.recheck` (called by the
federated clients before every round) re-verifies every subject that way and excludes those that
no longer read (``dataset.n_unreadable``); with ``skip_unreadable`` set, an item that fails while a
round is running is returned as ``None`` (the training collates drop it) instead of raising.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data._utils.collate import default_collate

from fl_app.config import Profile
from fl_app.data.anatomy import AnatomyCache
from fl_app.data.cohort import Subject
from fl_app.data.covariates import diagnosis_index, sex_index
from fl_app.data.nifti import NiftiError
from fl_app.data.preprocess import PreprocessCache

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """``$SYNTHBRAIN_CACHE`` or ``~/.cache/synthbrain/preprocessed`` (never inside the data folder)."""
    env = os.environ.get("SYNTHBRAIN_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "synthbrain" / "preprocessed"


class SiteDataset(Dataset):
    """Preprocessed subjects of one site (see module docstring for the item layout)."""

    def __init__(
        self,
        subjects: Sequence[Subject],
        profile: Profile,
        cache_dir: str | Path | None = None,
        *,
        use_labels: bool = True,
        derive_labels: bool = True,
    ):
        self.profile = profile
        self.cache = PreprocessCache(cache_dir or default_cache_dir(), profile.data)
        anatomy = AnatomyCache(cache_dir or default_cache_dir()) if derive_labels else None
        # preprocessing needs the label map when it brain-extracts with it, whatever the caller wants back
        self.use_labels = use_labels or profile.data.brain_mask == "labels"
        self.subjects: list[Subject] = []
        self.n_skipped = 0
        self.skip_unreadable = False
        self._unreadable: set[int] = set()
        self._keys: list[str] = []
        for s in subjects:
            if s.image is None or not s.ok:
                self.n_skipped += 1
                continue
            try:
                if s.label is None and anatomy is not None and self.use_labels:
                    # no label map from the site: the derived one (site cache) is read exactly like a provided one
                    derived = anatomy.get(s.image)
                    if derived.problems:
                        raise NiftiError(derived.problems[0])
                    s = dataclasses.replace(
                        s, label=derived.label, label_source="derived", anatomy=derived.to_dict()
                    )
                self.cache.get(s.image, s.label if self.use_labels else None)
            except (NiftiError, OSError, ValueError) as exc:
                self.n_skipped += 1
                code = exc.problem.code if isinstance(exc, NiftiError) else type(exc).__name__
                log.warning(
                    "skipping one subject whose data could not be preprocessed (%s); "
                    "`synthbrain site check` names the file",
                    code,
                )
                continue
            self.subjects.append(s)
            self._keys.append(self._key(s))

    def _key(self, s: Subject) -> str:
        label = s.label if self.use_labels else None
        return self.cache.key(Path(s.image), Path(label) if label is not None else None)  # type: ignore[arg-type]

    def _exclude(self, i: int, exc: Exception) -> None:
        if i not in self._unreadable:
            self._unreadable.add(i)
            code = exc.problem.code if isinstance(exc, NiftiError) else type(exc).__name__
            log.warning("one subject became unreadable and is excluded from now on (%s)", code)

    @property
    def n_unreadable(self) -> int:
        """Subjects excluded because their files stopped reading after the dataset was prepared."""
        return len(self._unreadable)

    def recheck(self) -> int:
        """Re-verify every subject's files; exclude those that no longer read. Returns :attr:`n_unreadable`.

        Cheap for unchanged files (one ``stat`` each: size and modification time against the prepared
        cache entry); a changed file is read and preprocessed again, and excluded if that fails.
        """
        for i, s in enumerate(self.subjects):
            if i in self._unreadable:
                continue
            try:
                key = self._key(s)
                if key != self._keys[i]:
                    self.cache.get(s.image, s.label if self.use_labels else None)  # type: ignore[arg-type]
                    self._keys[i] = key
            except (NiftiError, OSError, ValueError) as exc:
                self._exclude(i, exc)
        return self.n_unreadable

    def __len__(self) -> int:
        return len(self.subjects)

    def __getitem__(self, i: int) -> dict[str, object] | None:
        s = self.subjects[i]
        if i in self._unreadable:
            if self.skip_unreadable:
                return None
            raise OSError("this subject was excluded: its files no longer read")
        try:
            pre = self.cache.get(s.image, s.label if self.use_labels else None)  # type: ignore[arg-type]
        except (NiftiError, OSError, ValueError) as exc:
            self._exclude(i, exc)
            if self.skip_unreadable:
                return None
            raise
        image = torch.from_numpy(np.ascontiguousarray(pre.image, dtype=np.float32))[None]
        if pre.label is not None:
            label = torch.from_numpy(pre.label.astype(np.int64))
            has_label = True
        else:
            label = torch.full(tuple(self.profile.data.shape), -1, dtype=torch.int64)
            has_label = False
        return {
            "image": image,
            "label": label,
            "has_label": torch.tensor(has_label),
            "age": torch.tensor(math.nan if s.age is None else s.age, dtype=torch.float32),
            "sex": torch.tensor(sex_index(s.sex), dtype=torch.int64),
            "diagnosis": torch.tensor(diagnosis_index(s.diagnosis), dtype=torch.int64),
            "participant_id": s.participant_id,
        }

    def affine(self, i: int) -> np.ndarray:
        s = self.subjects[i]
        return self.cache.get(s.image, s.label if self.use_labels else None).affine  # type: ignore[arg-type]


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic subject-level train/validation split (at least one of each when n >= 2)."""
    perm = np.random.default_rng(seed).permutation(n).tolist()
    n_val = round(n * val_fraction)
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    return sorted(perm[n_val:]), sorted(perm[:n_val])


def collate_readable(items: list[dict[str, object] | None]) -> dict[str, object]:
    """``default_collate`` of the items that are not ``None`` (subjects that stopped reading mid-job are
    returned as ``None`` by a dataset with ``skip_unreadable``); ``{}`` when none is left (the training and
    evaluation loops skip a batch without ``"image"``)."""
    kept = [it for it in items if it is not None]
    return default_collate(kept) if kept else {}


def make_loaders(
    dataset: Dataset,
    batch_size: int,
    val_fraction: float = 0.2,
    seed: int = 0,
    num_workers: int = 0,
) -> tuple[DataLoader, DataLoader]:
    """(train, validation) loaders; the training loader reshuffles every epoch with a seeded generator."""
    train_idx, val_idx = split_indices(len(dataset), val_fraction, seed)  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(seed)
    train = DataLoader(
        Subset(dataset, train_idx),
        batch_size=batch_size,
        shuffle=True,
        generator=g,
        num_workers=num_workers,
        collate_fn=collate_readable,
    )
    val = DataLoader(
        Subset(dataset, val_idx),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_readable,
    )
    return train, val
