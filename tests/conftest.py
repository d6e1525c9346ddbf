"""Shared fixtures: small but real head images (from nilearn's MNI152 template) written by nibabel."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from fl_app.config import load_profile


@pytest.fixture(autouse=True)
def _restore_torch_global_state():
    """No test leaves torch's global state changed for the next one: thread counts, default dtype,
    deterministic-algorithms mode and the global RNG are put back after each test."""
    threads, interop = torch.get_num_threads(), torch.get_num_interop_threads()
    dtype = torch.get_default_dtype()
    deterministic = torch.are_deterministic_algorithms_enabled()
    rng = torch.random.get_rng_state()
    np_rng = np.random.get_state()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    assert torch.get_num_interop_threads() == interop  # can only be set once per process
    torch.set_default_dtype(dtype)
    torch.use_deterministic_algorithms(deterministic)
    torch.random.set_rng_state(rng)
    np.random.set_state(np_rng)


@pytest.fixture(scope="session")
def profile():
    return load_profile("cpu-demo")


@pytest.fixture(scope="session")
def head() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A head-like T1w (float32, RAS, 4 mm voxels) with a matching tissue label map (uint8 0..3).

    Built from nilearn's offline MNI152 template: GM/WM probability maps give the labels, the rest of
    the brain mask is CSF, and a bright scalp shell surrounds it.
    """
    from nilearn import datasets
    from scipy import ndimage

    t1 = datasets.load_mni152_template(resolution=2)
    gm = datasets.load_mni152_gm_template(resolution=2).get_fdata()[::2, ::2, ::2]
    wm = datasets.load_mni152_wm_template(resolution=2).get_fdata()[::2, ::2, ::2]
    mask = datasets.load_mni152_brain_mask(resolution=2).get_fdata()[::2, ::2, ::2] > 0
    data = t1.get_fdata()[::2, ::2, ::2].astype(np.float32)
    aff = t1.affine.copy()
    aff[:3, :3] *= 2
    label = np.zeros(data.shape, np.uint8)
    label[mask] = 1
    label[mask & (gm > 0.5)] = 2
    label[mask & (wm > 0.5)] = 3
    scalp = ndimage.binary_dilation(mask, iterations=3) & ~ndimage.binary_dilation(mask, iterations=1)
    data = data * 800.0
    data[scalp] = 900.0
    return data, label, aff


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray, dtype=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = data if dtype is None else data.astype(dtype)
    nib.save(nib.Nifti1Image(arr, affine), str(path))
    return path


def write_bids_site(
    root: Path,
    head: tuple[np.ndarray, np.ndarray, np.ndarray],
    rows: list[dict[str, str]],
    *,
    with_labels: bool = True,
    images_for: list[str] | None = None,
) -> Path:
    """A minimal BIDS site: participants.tsv from ``rows``, one T1w (+ dseg) per subject."""
    data, label, aff = head
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text('{"Name": "test", "BIDSVersion": "1.9.0"}')
    with open(root / "participants.tsv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]), delimiter="\t")
        w.writeheader()
        w.writerows(rows)
    subs = images_for if images_for is not None else [r["participant_id"] for r in rows]
    rng = np.random.default_rng(0)
    for sub in subs:
        noisy = data + rng.normal(0, 10, data.shape).astype(np.float32)
        write_nifti(root / sub / "anat" / f"{sub}_T1w.nii.gz", noisy, aff, np.int16)
        if with_labels:
            write_nifti(
                root / "derivatives" / "labels" / sub / "anat" / f"{sub}_dseg.nii.gz", label, aff, np.uint8
            )
    return root


def default_rows(n: int) -> list[dict[str, str]]:
    sexes = ["F", "M", "female", "male"]
    dxs = ["CN", "MCI", "AD"]
    return [
        {
            "participant_id": f"sub-{i:03d}",
            "age": str(50 + 3 * i),
            "sex": sexes[i % 4],
            "diagnosis": dxs[i % 3],
        }
        for i in range(1, n + 1)
    ]
