"""Robust NIfTI reading: every way a hospital file can be wrong becomes a named :class:`Problem`.

Real scanners and tools write uint8 / int16 (also big-endian) / float32 / float64 data, any
orientation, a 4th axis of length 1, anisotropic voxels and full-head fields of view. Those
are *accepted*. Files that cannot be used (unreadable, not a NIfTI, not 3-D, NaN/Inf voxels,
constant, implausible voxel size, too small a field of view) raise :class:`NiftiError`
carrying a :class:`Problem` that names the file and what is wrong with it.

Nothing here writes to disk.
"""

from __future__ import annotations

import gzip
import hashlib
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a subject: a stable ``code``, the ``file`` it concerns, a readable message."""

    code: str
    message: str
    file: str | None = None

    def __str__(self) -> str:
        return f"{self.file}: {self.message}" if self.file else self.message

    def to_dict(self) -> dict[str, str | None]:
        return asdict(self)


class NiftiError(Exception):
    """A NIfTI file cannot be used; ``.problem`` says why."""

    def __init__(self, problem: Problem):
        super().__init__(str(problem))
        self.problem = problem


def _fail(code: str, path: Path, message: str) -> NiftiError:
    return NiftiError(Problem(code=code, message=message, file=str(path)))


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    """Write a NIfTI with sform = qform (code 1), mm units and identity scaling, atomically."""
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    img.header.set_slope_inter(1.0, 0.0)
    tmp = path.with_name(path.name.replace(".nii", ".tmp.nii", 1))
    nib.save(img, str(tmp))
    os.replace(tmp, path)


def is_nifti_name(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def _sniff(path: Path) -> None:
    """Check the header bytes before nibabel: tells 'not a NIfTI' from 'truncated'."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(2)
    except OSError as exc:
        raise _fail("unreadable", path, f"cannot open file: {exc.strerror or exc}") from None
    if len(head) == 0:
        raise _fail("unreadable", path, "file is empty (0 bytes)")
    opener = gzip.open if head == b"\x1f\x8b" else open
    try:
        with opener(path, "rb") as fh:
            hdr = fh.read(352)
    except (OSError, EOFError, zlib.error) as exc:
        raise _fail(
            "unreadable", path, f"unreadable or truncated file ({type(exc).__name__}: {exc})"
        ) from None
    if len(hdr) < 348:
        if head != b"\x1f\x8b" and not path.name.lower().endswith(".gz") and len(hdr) > 0:
            # Too short to hold a NIfTI header at all.
            raise _fail("unreadable", path, f"truncated file: {len(hdr)} bytes, a NIfTI header needs 348")
        raise _fail("unreadable", path, "truncated file: header incomplete")
    sizeof_hdr_le = int.from_bytes(hdr[:4], "little")
    sizeof_hdr_be = int.from_bytes(hdr[:4], "big")
    magic = hdr[344:348]
    if magic in (b"n+1\x00", b"ni1\x00"):
        return
    if 348 in (sizeof_hdr_le, sizeof_hdr_be):
        # An ANALYZE-7.5 style header without the NIfTI magic: orientation is undefined.
        raise _fail("not_nifti", path, "not a NIfTI file (ANALYZE header without NIfTI magic)")
    if hdr[:4] in (b"\x1c\x02\x00\x00", b"\x00\x00\x02\x1c"):  # NIfTI-2 header size 540
        return
    raise _fail("not_nifti", path, "not a NIfTI file (no NIfTI header)")


@dataclass
class Volume:
    """A 3-D volume as read from disk (before any resampling).

    ``data``: float32 array (I, J, K) in the file's voxel order; ``affine``: 4x4 voxel → world (mm).
    """

    data: np.ndarray
    affine: np.ndarray
    dtype: str
    path: Path

    @property
    def zooms(self) -> np.ndarray:
        """Voxel size (mm) along each array axis, from the affine's column norms."""
        return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))

    @property
    def orientation(self) -> str:
        return "".join(nib.aff2axcodes(self.affine))


def read_volume(path: str | Path, *, check_values: bool = True) -> Volume:
    """Read a NIfTI file as a 3-D float32 volume, or raise :class:`NiftiError`.

    Singleton 4th/5th axes are dropped. With ``check_values`` NaN/Inf and constant images are
    rejected.
    """
    path = Path(path)
    if not path.exists():
        raise _fail("missing_file", path, "file does not exist")
    if not path.is_file():
        raise _fail("unreadable", path, "not a regular file")
    _sniff(path)
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for bad headers
        raise _fail("not_nifti", path, f"not a readable NIfTI header ({type(exc).__name__}: {exc})") from None
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise _fail("not_nifti", path, f"not a NIfTI image ({type(img).__name__})")
    shape = img.shape
    if len(shape) < 3:
        raise _fail("not_3d", path, f"not a 3-D image: shape {tuple(shape)}")
    if len(shape) > 3 and any(s != 1 for s in shape[3:]):
        raise _fail("not_3d", path, f"not a 3-D image: shape {tuple(shape)} (a 4-D series?)")
    if any(s < 2 for s in shape[:3]):
        raise _fail("not_3d", path, f"not a 3-D image: shape {tuple(shape)} has a flat spatial axis")
    try:
        data = np.asarray(img.dataobj, dtype=np.float32)
    except (OSError, EOFError, zlib.error, ValueError) as exc:
        raise _fail(
            "unreadable", path, f"unreadable or truncated image data ({type(exc).__name__}: {exc})"
        ) from None
    data = data.reshape(shape[:3])
    affine = img.affine
    if affine is None or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise _fail("bad_affine", path, "the image has no valid voxel-to-world affine")
    if check_values:
        n_bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
        if n_bad:
            raise _fail("non_finite", path, f"{n_bad} voxels are NaN or Inf")
        lo, hi = float(data.min()), float(data.max())
        if hi - lo <= 0:
            what = "empty (all zero)" if hi == 0 else f"constant (every voxel = {hi:g})"
            raise _fail("constant_image", path, f"image is {what}")
    dtype = str(img.get_data_dtype())
    return Volume(data=data, affine=np.asarray(affine, dtype=np.float64), dtype=dtype, path=path)


def to_canonical(vol: Volume) -> Volume:
    """Reorder axes and flip so that the array is in closest-RAS orientation (exact, no interpolation)."""
    ornt = nib.orientations.io_orientation(vol.affine)
    ras = nib.orientations.axcodes2ornt(("R", "A", "S"))
    if np.array_equal(ornt, ras):
        return vol
    transform = nib.orientations.ornt_transform(ornt, ras)
    data = nib.orientations.apply_orientation(vol.data, transform)
    inv = nib.orientations.inv_ornt_aff(transform, vol.data.shape)
    return Volume(
        data=np.ascontiguousarray(data, dtype=np.float32),
        affine=vol.affine @ inv,
        dtype=vol.dtype,
        path=vol.path,
    )


def file_sha256(*paths: str | Path) -> str:
    """SHA-256 (hex) of the bytes of ``paths``, read in order (one file: that file's usual checksum)."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
