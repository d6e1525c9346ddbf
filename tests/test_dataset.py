"""The torch Dataset over a site: item layout, covariate encoding, caching and skipping bad files."""

from __future__ import annotations

import math

import torch

from fl_app.data.cohort import read_bids
from fl_app.data.covariates import DIAGNOSES, SEXES
from fl_app.data.dataset import SiteDataset, make_loaders, split_indices
from tests.conftest import default_rows, write_bids_site


def test_items_and_loaders(tmp_path, head, profile):
    site = write_bids_site(tmp_path / "s", head, default_rows(5))
    ds = SiteDataset(read_bids(site).valid(), profile, cache_dir=tmp_path / "cache")
    assert len(ds) == 5 and ds.n_skipped == 0
    item = ds[0]
    assert item["image"].shape == (1, *profile.data.shape) and item["image"].dtype == torch.float32
    assert item["label"].shape == profile.data.shape and item["label"].dtype == torch.int64
    assert set(item["label"].unique().tolist()) <= {0, 1, 2, 3} and bool(item["has_label"])
    assert item["age"].item() == 53.0
    assert SEXES[item["sex"].item()] == "M" and DIAGNOSES[item["diagnosis"].item()] == "MCI"
    train, val = make_loaders(ds, batch_size=2, val_fraction=0.4, seed=1)
    assert len(train.dataset) == 3 and len(val.dataset) == 2
    batch = next(iter(train))
    assert batch["image"].shape == (2, 1, *profile.data.shape)
    assert not set(train.dataset.indices) & set(val.dataset.indices)


def test_without_labels_and_unknown_covariates(tmp_path, head, profile):
    """Image-only mode (no brain extraction): an unlabelled subject is usable, its label is all -1."""
    image_only = profile.model_copy(update={"data": profile.data.model_copy(update={"brain_mask": "none"})})
    rows = default_rows(2)
    site = write_bids_site(tmp_path / "s", head, rows, with_labels=False)
    cohort = read_bids(site)
    cohort.subjects[0].age = None
    cohort.subjects[0].sex = None
    ds = SiteDataset(cohort.subjects, image_only, cache_dir=tmp_path / "cache", derive_labels=False)
    item = ds[0]
    assert not bool(item["has_label"]) and (item["label"] == -1).all()
    assert math.isnan(item["age"].item()) and item["sex"].item() == len(SEXES)


def test_without_labels_under_brain_extraction_is_skipped(tmp_path, head, profile):
    """The cpu-demo profile brain-extracts with the label map: without one (and with the on-site anatomy
    stage turned off) a subject is skipped and counted."""
    assert profile.data.brain_mask == "labels"
    site = write_bids_site(tmp_path / "s", head, default_rows(2), with_labels=False)
    ds = SiteDataset(read_bids(site).subjects, profile, cache_dir=tmp_path / "cache", derive_labels=False)
    assert len(ds) == 0 and ds.n_skipped == 2


def test_unreadable_after_check_is_skipped_and_counted(tmp_path, head, profile):
    site = write_bids_site(tmp_path / "s", head, default_rows(4))
    subjects = read_bids(site).valid()
    bad = subjects[1].image
    bad.write_bytes(bad.read_bytes()[:500])  # becomes unreadable after the check passed
    ds = SiteDataset(subjects, profile, cache_dir=tmp_path / "cache")
    assert len(ds) == 3 and ds.n_skipped == 1
    assert all(s.image != bad for s in ds.subjects)


def test_split_is_deterministic():
    assert split_indices(10, 0.2, 3) == split_indices(10, 0.2, 3)
    tr, va = split_indices(10, 0.2, 3)
    assert len(va) == 2 and sorted(tr + va) == list(range(10))
    assert split_indices(1, 0.2, 0) == ([0], [])
