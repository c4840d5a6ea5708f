"""Reading volumes: `read_volume_record` is what ingest records of a source, `read_volume` its
volume whatever the format: a DICOM series or multi-frame file (assembled in `dicom.py`), NIfTI
(nibabel) or NRRD (MONAI's reader), reoriented to RAS+ with spacing kept, plus the checks every
volume passes whatever its format (3D, finite voxels)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import numpy as np

from ssl_models.core.domain import Record, Source
from ssl_models.core.errors import UnreadableFileError
from ssl_models.core.privacy import without_names
from ssl_models.medical3d.config import VolumeIngestConfig
from ssl_models.medical3d.dicom import Volume, looks_like_dicom, read_series

NIFTI_SUFFIXES = (".nii", ".gz")  # .nii.gz ends in .gz
NRRD_SUFFIXES = (".nrrd", ".nhdr")
# A header is trusted only this far: one declaring 2048^3 voxels made the reader allocate 32 GiB
# (MemoryError, or the OOM killer where memory is overcommitted). 2^30 float32 voxels are 4 GiB,
# larger than any CT or MR volume of a clinical scanner (a 512 x 512 x 2000 CT is 2^29).
MAX_VOXELS = 2 ** 30
_QUOTED_PATH = re.compile(r"""(['"])[^'"]*[\\/.][^'"]*\1""")  # a quoted name, spaces and all
_PATH_LIKE = re.compile(r"""(?:[A-Za-z]:)?[\\/][^\s'"]+|[^\s'"/]+\.(?:nii|gz|hdr|img|nrrd|nhdr)\b""")


def _empty_check(path: Path) -> None:
    try:
        size = path.stat().st_size
    except OSError as error:
        raise UnreadableFileError(f"cannot read file ({error.strerror})") from None
    if size == 0:
        raise UnreadableFileError("empty file (0 bytes)")


def read_nifti(path: Path) -> Volume:
    import nibabel as nib

    _empty_check(path)
    try:
        image = nib.load(path)
        shape = tuple(int(n) for n in image.shape)
    except Exception as error:  # nibabel raises many types for a file cut short or corrupt
        raise UnreadableFileError(f"truncated or corrupt NIfTI header ({type(error).__name__}: "
                                  f"{_message(error, path)})") from None
    if int(np.prod(shape[:3], dtype=np.int64)) > MAX_VOXELS:
        raise UnreadableFileError(f"volume too large: the header declares {'x'.join(map(str, shape))} voxels "
                                  f"(more than {MAX_VOXELS} in its first 3D volume)")
    try:
        image = nib.as_closest_canonical(image)
        array = np.asarray(image.dataobj, dtype=np.float32)
    except Exception as error:
        raise UnreadableFileError(f"truncated or corrupt NIfTI ({type(error).__name__}: "
                                  f"{_message(error, path)})") from None
    zooms = image.header.get_zooms()[:3]
    return Volume(_first_volume(array), tuple(float(z) for z in zooms), "", None)


def read_nrrd(path: Path) -> Volume:
    import nibabel as nib
    from monai.transforms import LoadImage

    _empty_check(path)
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
    finite = np.isfinite(volume.array)
    if not finite.any():
        raise UnreadableFileError("volume with no finite voxel (all NaN or infinite)")
    if np.ptp(volume.array[finite]) == 0:
        raise UnreadableFileError("volume with a single intensity value (blank)")


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
    digest.update(np.ascontiguousarray(volume.array, dtype=np.float32).tobytes())
    return digest.hexdigest()


def read_volume(source: Source, ingest: VolumeIngestConfig) -> Volume:
    """The checked volume of `source`: a DICOM series (or multi-frame file), a NRRD or a NIfTI file."""
    first = source.paths[0]
    if looks_like_dicom(first):
        volume = read_series(source.paths, ingest.slice_gap_tolerance)
    elif first.name.lower().endswith((".nrrd", ".nhdr")):
        volume = read_nrrd(first)
    else:
        volume = read_nifti(first)
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
