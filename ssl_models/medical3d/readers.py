"""Reading volumes: `read_volume_record` is what ingest records of a source, `read_volume` its
volume whatever the format: a DICOM series or multi-frame file (assembled in `dicom.py`), NIfTI
(nibabel) or NRRD (MONAI's reader), reoriented to RAS+ with spacing kept, plus the checks every
volume passes whatever its format (3D, finite voxels)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ssl_models.core.domain import Record, Source
from ssl_models.core.errors import UnreadableFileError
from ssl_models.core.privacy import without_names
from ssl_models.medical3d.config import VolumeIngestConfig
from ssl_models.medical3d.dicom import Volume, looks_like_dicom, read_series

NIFTI_SUFFIXES = (".nii", ".gz")  # .nii.gz ends in .gz
NRRD_SUFFIXES = (".nrrd", ".nhdr")
# A header is trusted only this far (the default of `ingest.max_voxels`): one declaring 2048^3 voxels
# made the reader allocate 32 GiB (MemoryError, or the OOM killer where memory is overcommitted), a
# 4D one whose first volume was small took 4 GiB through all of its time points. Every dimension
# counts; only the first 3D volume is ever decoded.
MAX_VOXELS = 2 ** 30
_SLAB_VOXELS = 2 ** 22  # voxels converted (and hashed, checked) at a time: temporaries stay small
_QUOTED_PATH = re.compile(r"""(['"])[^'"]*[\\/.][^'"]*\1""")  # a quoted name, spaces and all
_PATH_LIKE = re.compile(r"""(?:[A-Za-z]:)?[\\/][^\s'"]+|[^\s'"/]+\.(?:nii|gz|hdr|img|nrrd|nhdr)\b""")


def _empty_check(path: Path) -> None:
    try:
        size = path.stat().st_size
    except OSError as error:
        raise UnreadableFileError(f"cannot read file ({error.strerror})") from None
    if size == 0:
        raise UnreadableFileError("empty file (0 bytes)")


def too_large(shape: tuple[int, ...], max_voxels: int, what: str = "the header declares") -> UnreadableFileError:
    """The reason for a source whose declared voxels (every dimension) exceed `ingest.max_voxels`."""
    voxels = declared_voxels(shape)
    return UnreadableFileError(f"volume too large: {what} {'x'.join(map(str, shape))} voxels ({voxels}) "
                               f"over ingest.max_voxels={max_voxels}")


def declared_voxels(shape: tuple[int, ...]) -> int:
    return int(np.prod([int(n) for n in shape], dtype=object))  # Python ints: no int64 overflow


def read_nifti(path: Path, max_voxels: int = MAX_VOXELS) -> Volume:
    """The first 3D volume of a NIfTI file, checked against `max_voxels` on the header (every
    dimension) before any voxel is read, and read slab by slab (a .nii.gz never whole)."""
    import nibabel as nib

    _empty_check(path)
    try:
        # the header only: the voxels stay on disk behind `dataobj`, whose file stays open while the
        # slabs are read (one after another, forward). Opened again for each slab, a .nii.gz was
        # decompressed from its start every time: a 512x512x160 CT took 3.7 s instead of 0.74 s.
        image = nib.load(path, keep_file_open=True)
        shape = tuple(int(n) for n in image.shape)
    except Exception as error:  # nibabel raises many types for a file cut short or corrupt
        raise UnreadableFileError(f"truncated or corrupt NIfTI header ({type(error).__name__}: "
                                  f"{_message(error, path)})") from None
    if declared_voxels(shape) > max_voxels:
        raise too_large(shape, max_voxels)
    try:
        first = _first_volume_of(image.dataobj, shape)
        image = nib.as_closest_canonical(nib.Nifti1Image(first, image.affine, image.header))
        array = np.asarray(image.dataobj, dtype=np.float32)
    except Exception as error:
        raise UnreadableFileError(f"truncated or corrupt NIfTI ({type(error).__name__}: "
                                  f"{_message(error, path)})") from None
    zooms = image.header.get_zooms()[:3]
    return Volume(array, tuple(float(z) for z in zooms), "", None)


def _first_volume_of(dataobj, shape: tuple[int, ...]) -> np.ndarray:
    """float32 voxels of the first 3D volume (time point, echo, channel) behind nibabel's array
    proxy, read a slab of slices at a time: the values of `np.asarray(dataobj, float32)`, scaling
    included, without the other volumes or a full-size copy in the stored type."""
    if len(shape) < 3:
        return np.asarray(dataobj, dtype=np.float32)
    rest = (0,) * (len(shape) - 3)
    out = np.empty(shape[:3], dtype=np.float32, order="F")
    step = max(1, _SLAB_VOXELS // max(1, shape[0] * shape[1]))
    for start in range(0, shape[2], step):  # along z: contiguous on disk (NIfTI is Fortran order)
        out[:, :, start:start + step] = np.asarray(dataobj[(slice(None), slice(None), slice(start, start + step),
                                                            *rest)], dtype=np.float32)
    return out


def read_nrrd(path: Path, max_voxels: int = MAX_VOXELS) -> Volume:
    import nibabel as nib
    import nrrd
    from monai.transforms import LoadImage

    _empty_check(path)
    try:
        shape = tuple(int(n) for n in nrrd.read_header(str(path))["sizes"])
    except Exception as error:
        raise UnreadableFileError(f"unreadable NRRD ({type(error).__name__})") from None
    if declared_voxels(shape) > max_voxels:
        raise too_large(shape, max_voxels)
    try:
        image = LoadImage(reader="NrrdReader", image_only=True)(str(path))
    except Exception as error:
        raise UnreadableFileError(f"unreadable NRRD ({type(error).__name__})") from None
    array = np.asarray(image, dtype=np.float32)
    canonical = nib.as_closest_canonical(nib.Nifti1Image(_first_volume(array), np.asarray(image.affine)))
    zooms = canonical.header.get_zooms()[:3]
    return Volume(np.asarray(canonical.dataobj, dtype=np.float32), tuple(float(z) for z in zooms), "", None)


def _message(error: Exception, path: Path) -> str:
    """The first line of a reader's message with no path or file name left in it: nibabel quotes
    the absolute path (`Empty file: '/data/DOE_JOHN/t1.nii.gz'`), and file names of medical data
    carry patients' names. The file's own names go first, then anything that still looks like a path."""
    line = without_names((str(error).splitlines() or [""])[0], [path])
    return _PATH_LIKE.sub("<file>", _QUOTED_PATH.sub("'<file>'", line))[:120]


def _first_volume(array: np.ndarray) -> np.ndarray:
    """A 4D file (time series, several echoes) contributes its first 3D volume."""
    while array.ndim > 3:
        array = array[..., 0]
    return array


def check_volume(volume: Volume, min_slices: int) -> None:
    """Reject what is not a usable volume: 2D images, and volumes with no finite voxel."""
    if volume.array.ndim != 3 or min(volume.array.shape) < min_slices:
        raise UnreadableFileError(f"not a 3D volume: shape {tuple(volume.array.shape)} has fewer than "
                                  f"{min_slices} slices along an axis (ingest.min_slices)")
    low, high = np.inf, -np.inf
    for slab in _slabs(volume.array):  # a boolean mask and a copy of the finite voxels of the
        finite = slab[np.isfinite(slab)]  # whole volume at once were 5 bytes a voxel
        if finite.size:
            low, high = min(low, float(finite.min())), max(high, float(finite.max()))
    if low > high:
        raise UnreadableFileError("volume with no finite voxel (all NaN or infinite)")
    if low == high:
        raise UnreadableFileError("volume with a single intensity value (blank)")


def _slabs(array: np.ndarray) -> Iterator[np.ndarray]:
    """C-order slabs along the first axis of about `_SLAB_VOXELS` voxels each."""
    step = max(1, _SLAB_VOXELS // max(1, int(np.prod(array.shape[1:]))))
    for start in range(0, array.shape[0], step):
        yield np.ascontiguousarray(array[start:start + step], dtype=np.float32)


def guess_modality(volume: Volume, setting: str) -> str:
    """DICOM says; for NIfTI/NRRD, `setting`, or CT when a voxel reaches the HU of air."""
    if volume.modality:
        return volume.modality
    if setting != "auto":
        return setting
    return "ct" if float(np.nanmin(volume.array)) < -500 else "mr"


def volume_digest(volume: Volume) -> str:
    """Content identity: voxels, shape and spacing (not headers, so a re-export is a duplicate)."""
    digest = hashlib.sha256()
    digest.update(repr((volume.array.shape, np.round(volume.spacing, 4).tolist())).encode())
    for slab in _slabs(volume.array):  # the bytes of the whole C-order array, a slab at a time
        digest.update(slab.tobytes())
    return digest.hexdigest()


def read_volume(source: Source, ingest: VolumeIngestConfig) -> Volume:
    """The checked volume of `source`: a DICOM series (or multi-frame file), a NRRD or a NIfTI file."""
    first = source.paths[0]
    if looks_like_dicom(first):
        volume = read_series(source.paths, ingest.slice_gap_tolerance, ingest.max_voxels)
    elif first.name.lower().endswith((".nrrd", ".nhdr")):
        volume = read_nrrd(first, ingest.max_voxels)
    else:
        volume = read_nifti(first, ingest.max_voxels)
    check_volume(volume, ingest.min_slices)
    return volume


def read_volume_record(source: Source, ingest: VolumeIngestConfig) -> Record:
    """The manifest record of `source`: its volume, content digest, bytes on disk and metadata."""
    volume = read_volume(source, ingest)
    meta: dict[str, Any] = {"format": "dicom" if volume.modality else "volume",
                            "modality": guess_modality(volume, ingest.nifti_modality),
                            "shape": list(volume.array.shape),
                            "spacing_mm": [round(s, 4) for s in volume.spacing]}
    # the header's patient keeps a patient's volumes in one split; ingest writes it as a pseudonym
    return Record(source.key, volume_digest(volume), sum(p.stat().st_size for p in source.paths), meta, volume,
                  group=volume.patient)
