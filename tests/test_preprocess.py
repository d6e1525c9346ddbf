"""Preprocessing accepts what real scanners and tools write and lands it on the profile grid."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from fl_app.data import preprocess as pp
from fl_app.data.preprocess import PreprocessCache, preprocess_subject
from tests.conftest import write_nifti


def _reorient(data: np.ndarray, aff: np.ndarray, codes: str) -> tuple[np.ndarray, np.ndarray]:
    t = nib.orientations.ornt_transform(
        nib.orientations.axcodes2ornt("RAS"), nib.orientations.axcodes2ornt(codes)
    )
    out = nib.orientations.apply_orientation(data, t)
    return np.ascontiguousarray(out), aff @ nib.orientations.inv_ornt_aff(t, data.shape)


@pytest.fixture(scope="module")
def profile(profile):
    """The cpu-demo grid with the whole head kept: these tests are about geometry and intensities of image-only
    variants (brain extraction, which needs a label map, has its own test below)."""
    return profile.model_copy(update={"data": profile.data.model_copy(update={"brain_mask": "none"})})


@pytest.fixture(scope="module")
def reference(head, profile, tmp_path_factory):
    data, label, aff = head
    d = tmp_path_factory.mktemp("ref")
    img = write_nifti(d / "ref_T1w.nii.gz", data, aff, np.float32)
    lab = write_nifti(d / "ref_dseg.nii.gz", label, aff, np.uint8)
    return preprocess_subject(img, lab, profile.data)


def _variant(kind: str, head, tmp_path):
    data, label, aff = head
    if kind in ("LIA", "LPS", "PIR"):
        d, a = _reorient(data, aff, kind)
        lab, _ = _reorient(label, aff, kind)
        return write_nifti(tmp_path / "v.nii.gz", d, a, np.int16), write_nifti(tmp_path / "l.nii.gz", lab, a)
    if kind == "uint8":
        return write_nifti(tmp_path / "v.nii", data * (255.0 / data.max()), aff, np.uint8), None
    if kind in ("int16", "float32", "float64"):
        return write_nifti(tmp_path / "v.nii.gz", data, aff, np.dtype(kind)), None
    if kind == "big-endian":
        return write_nifti(tmp_path / "v.nii.gz", data.astype(">i2"), aff), None
    if kind == "4d-singleton":
        return write_nifti(tmp_path / "v.nii.gz", data[..., None], aff, np.int16), None
    if kind == "negative":
        return write_nifti(tmp_path / "v.nii.gz", data - 1000.0, aff, np.float32), None
    if kind == "anisotropic":  # 2 x 2 x 3 mm voxels
        zoom = np.array([2.0, 2.0, 4.0 / 3.0])
        d = ndimage.zoom(data, zoom, order=1)
        lab = ndimage.zoom(label, zoom, order=0)
        a = aff.copy()
        a[:3, :3] = np.diag([2.0, 2.0, 3.0])
        a[:3, 3] = aff[:3, 3] - 1.0  # keep the field of view in place (half-voxel shift)
        return write_nifti(tmp_path / "v.nii.gz", d, a, np.float32), write_nifti(
            tmp_path / "l.nii.gz", lab, a
        )
    if kind == "oblique":  # 10 degrees about S, as an oblique acquisition writes it
        th = np.deg2rad(10)
        rot = np.array(
            [[np.cos(th), -np.sin(th), 0, 0], [np.sin(th), np.cos(th), 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
        )
        return (
            write_nifti(tmp_path / "v.nii.gz", data, rot @ aff, np.int16),
            write_nifti(tmp_path / "l.nii.gz", label, rot @ aff, np.uint8),
        )
    raise AssertionError(kind)


KINDS = [
    "LIA",
    "LPS",
    "PIR",
    "uint8",
    "int16",
    "float32",
    "float64",
    "big-endian",
    "4d-singleton",
    "negative",
    "anisotropic",
    "oblique",
]


@pytest.mark.parametrize("kind", KINDS)
def test_accepted_kinds(kind, head, profile, reference, tmp_path):
    img, lab = _variant(kind, head, tmp_path)
    out = preprocess_subject(img, lab, profile.data)
    assert out.image.shape == tuple(profile.data.shape)
    assert out.image.dtype == np.float32
    assert np.isfinite(out.image).all()
    assert 0.0 <= out.image.min() and out.image.max() <= 1.0
    assert nib.aff2axcodes(out.affine) == ("R", "A", "S")
    np.testing.assert_allclose(np.diag(out.affine)[:3], profile.data.spacing)
    if kind == "oblique":
        # The head is physically rotated by 10 degrees (no registration is done): tissue volumes survive.
        for k in (1, 2, 3):
            ratio = (out.label == k).sum() / (reference.label == k).sum()
            assert abs(ratio - 1) < 0.05, (k, ratio)
        return
    corr = np.corrcoef(out.image.ravel(), reference.image.ravel())[0, 1]
    assert corr > (0.9 if kind == "anisotropic" else 0.98), corr
    if lab is not None:
        assert set(np.unique(out.label)) <= {0, 1, 2, 3}
        agree = (out.label == reference.label).mean()
        assert agree > (0.9 if kind == "anisotropic" else 0.99), agree


def test_labels_nearest_neighbour_preserve_volume(head, profile, reference):
    _, label, _ = head
    voxel_in = 4.0**3
    voxel_out = np.prod(profile.data.spacing)
    for k in (1, 2, 3):
        v_in = (label == k).sum() * voxel_in
        v_out = (reference.label == k).sum() * voxel_out
        assert abs(v_out - v_in) / v_in < 0.08, (k, v_in, v_out)


def test_head_with_neck_keeps_the_whole_brain(head, profile, reference, tmp_path):
    data, label, aff = head
    n_neck = 25  # 100 mm of neck below the head
    neck = np.zeros((data.shape[0], data.shape[1], n_neck), np.float32)
    yy, xx = np.meshgrid(np.arange(data.shape[1]), np.arange(data.shape[0]))
    cyl = (xx - data.shape[0] / 2) ** 2 + (yy - data.shape[1] / 2) ** 2 < 12**2
    neck[cyl] = 500.0
    d = np.concatenate([neck, data], axis=2)
    lab = np.concatenate([np.zeros_like(neck, dtype=np.uint8), label], axis=2)
    a = aff.copy()
    a[2, 3] -= 4.0 * n_neck
    out = preprocess_subject(
        write_nifti(tmp_path / "neck.nii.gz", d, a, np.int16),
        write_nifti(tmp_path / "neck_l.nii.gz", lab, a),
        profile.data,
    )
    brain_ref = (reference.label > 0).sum()
    brain = (out.label > 0).sum()
    assert abs(brain - brain_ref) / brain_ref < 0.01  # nothing of the brain was cut
    top = np.nonzero((out.label > 0).any(axis=(0, 1)))[0].max()
    assert top < profile.data.shape[2] - 1  # brain does not touch the top of the grid


def test_deterministic(head, profile, tmp_path):
    img, _ = _variant("int16", head, tmp_path)
    a = preprocess_subject(img, None, profile.data)
    b = preprocess_subject(img, None, profile.data)
    assert np.array_equal(a.image, b.image)


def test_cache_hits_and_invalidates(head, profile, tmp_path, monkeypatch):
    img, _ = _variant("int16", head, tmp_path)
    cache = PreprocessCache(tmp_path / "cache", profile.data)
    first = cache.get(img, None)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1

    def boom(*a, **k):
        raise AssertionError("cache miss")

    monkeypatch.setattr(pp, "preprocess_subject", boom)
    assert np.array_equal(cache.get(img, None).image, first.image)
    data, _, aff = head
    write_nifti(img, data * 0.5 + 3, aff, np.int16)  # the file changes: the cache must not serve the old one
    with pytest.raises(AssertionError, match="cache miss"):
        cache.get(img, None)


def test_brain_mask_from_labels(head, profile, tmp_path):
    """``data.brain_mask: labels`` zeroes everything farther than the margin from the intracranial labels,
    keeps the brain's intensities unchanged, and names the file of a subject without a label map."""
    from fl_app.data.nifti import NiftiError

    data, label, aff = head
    img = write_nifti(tmp_path / "b_T1w.nii.gz", data, aff, np.float32)
    lab = write_nifti(tmp_path / "b_dseg.nii.gz", label, aff, np.uint8)
    cfg_head = profile.data.model_copy(update={"brain_mask": "none"})
    cfg_brain = profile.data.model_copy(update={"brain_mask": "labels", "brain_mask_dilate_mm": 3.0})
    whole = preprocess_subject(img, lab, cfg_head)
    brain = preprocess_subject(img, lab, cfg_brain)
    np.testing.assert_array_equal(whole.label, brain.label)
    ic = brain.label > 0
    dist = ndimage.distance_transform_edt(~ic, sampling=profile.data.spacing)
    assert np.all(brain.image[dist > 3.0] == 0)
    np.testing.assert_array_equal(brain.image[dist <= 3.0], whole.image[dist <= 3.0])
    assert whole.image[dist > 3.0].max() > 0.2  # there was a scalp to remove
    with pytest.raises(NiftiError, match="label map") as err:
        preprocess_subject(img, None, cfg_brain)
    assert str(img) in str(err.value)
