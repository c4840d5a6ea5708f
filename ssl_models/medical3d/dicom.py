"""DICOM: group files into series, assemble a series (or a multi-frame file) into one volume.

Only geometry, pixel data and `Modality` are read out of a header. Identifying attributes
(PatientName, PatientID, birth date, accession number, institution, ... the PS3.15 basic
profile) never leave this module: the patient becomes a salted pseudonym, and pydicom's
warnings, which can quote header values, are silenced while reading.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ssl_models.core.domain import Rejected, Source
from ssl_models.core.errors import UnreadableFileError

DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")


def looks_like_dicom(path: Path) -> bool:
    """A `.dcm` name, or the `DICM` magic at byte 128 (scanners often write files without suffix)."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    if path.suffix:
        return False
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


@contextmanager
def quiet_pydicom() -> Iterator[None]:
    """pydicom warns about odd values by quoting them (a malformed PatientName, a birth date)."""
    logger = logging.getLogger("pydicom")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def read_header(path: Path):
    """The header, with large values (the pixel data) left unread but present, so that
    `"PixelData" in header` says whether the file holds pixels."""
    import pydicom

    with quiet_pydicom():
        return pydicom.dcmread(path, defer_size="4 KB", force=True)


# Tags every DICOM image carries (or its file meta): pydicom's `force=True` turns any bytes into a
# "dataset" of one or two nonsense elements, which must read as "not a DICOM file", not as a
# DICOM that lacks pixel data.
_IMAGE_TAGS = ("SOPClassUID", "SOPInstanceUID", "Modality", "StudyInstanceUID", "SeriesInstanceUID",
               "Rows", "Columns", "ImagePositionPatient", "PixelData")


def is_dicom(dataset) -> bool:
    """Whether a dataset read with `force=True` is a DICOM object at all."""
    meta = getattr(dataset, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return True
    return any(tag in dataset for tag in _IMAGE_TAGS)


def series_headers(job: tuple[Any, list[Path]]) -> list[list | None]:
    """Of each file of one chunk, in any process (`ssl_models.core.workers`): [a digest of its
    SeriesInstanceUID ("" when it is no DICOM object or has none), whether it holds pixel data], or
    None when it does not read. A digest: the chunk's result is written to the stage's work folder,
    and grouping needs only to tell UIDs apart."""
    _, paths = job
    found: list[list | None] = []
    for path in paths:
        try:
            header = read_header(path)
            uid = str(header.get("SeriesInstanceUID", "")) if is_dicom(header) else ""
            found.append([hashlib.sha256(uid.encode()).hexdigest() if uid else "", "PixelData" in header])
        except Exception:  # unreadable here: read() quarantines it with the reason
            found.append(None)
    return found


def group_series(files: list[Path], corpus: Path, headers: Iterable[list | None]) -> list[Source | Rejected]:
    """One source per SeriesInstanceUID. A source is named by its folder when that folder holds
    one series of several files, by the file for a single file, else `folder#series-<n>`.
    A file without pixel data beside slices of its series (a header-only copy, a structured
    report sharing the UID) is rejected on its own, so the series is still read. `headers`: each
    file's `series_headers` entry, in order."""
    by_series: dict[str, list[Path]] = defaultdict(list)
    has_pixels: dict[Path, bool] = {}
    for path, header in zip(files, headers, strict=True):
        uid = (header[0] if header is not None else "") or f"file:{path}"
        if header is not None:
            has_pixels[path] = header[1]
        by_series[uid].append(path)
    found: list[Source | Rejected] = []
    per_folder: dict[Path, list[list[Path]]] = defaultdict(list)
    for paths in by_series.values():
        with_pixels = [p for p in paths if has_pixels.get(p, True)]
        if with_pixels and len(with_pixels) < len(paths):
            found.extend(Rejected(p.relative_to(corpus).as_posix(),
                                  "DICOM without pixel data (the rest of its series is kept)")
                         for p in sorted(set(paths) - set(with_pixels)))
            paths = with_pixels
        per_folder[paths[0].parent].append(sorted(paths))
    for folder, series in sorted(per_folder.items()):
        for index, paths in enumerate(sorted(series)):
            if len(paths) == 1:
                key = paths[0].relative_to(corpus).as_posix()
            elif len(series) == 1:
                key = folder.relative_to(corpus).as_posix()
            else:
                key = f"{folder.relative_to(corpus).as_posix()}#series-{index + 1}"
            found.append(Source(key, paths))
    return found


@dataclass
class Volume:
    """Voxels in RAS+ order, spacing in mm along those axes, and what the header says of it."""

    array: np.ndarray  # float32 [x, y, z]
    spacing: tuple[float, float, float]
    modality: str  # "ct" or "mr" (other DICOM modalities are kept by name, lower-case)
    patient: str | None  # the private patient id: the caller pseudonymises it, it is never written


def _patient_of(header) -> str | None:
    for attribute in ("PatientID", "PatientName", "StudyInstanceUID"):
        value = str(header.get(attribute, "") or "").strip()
        if value:
            return f"{attribute}:{value}"
    return None


def _slice_normal(header) -> np.ndarray:
    orientation = np.array(header.ImageOrientationPatient, dtype=float)
    return np.cross(orientation[:3], orientation[3:])


def _pixels(dataset) -> np.ndarray:
    if "PixelData" not in dataset:
        raise UnreadableFileError("DICOM without pixel data")
    try:
        pixels = dataset.pixel_array.astype(np.float32)
    except Exception as error:  # compressed without a decoder, or cut short
        raise UnreadableFileError(f"DICOM pixel data cannot be decoded ({type(error).__name__})") from None
    slope = float(dataset.get("RescaleSlope", 1) or 1)
    intercept = float(dataset.get("RescaleIntercept", 0) or 0)
    return pixels * slope + intercept


def _to_ras(stack: np.ndarray, affine_lps: np.ndarray) -> tuple[np.ndarray, tuple[float, float, float]]:
    """stack [k, row, col] with its LPS voxel->mm affine (over col, row, k) -> RAS+ array and spacing."""
    import nibabel as nib

    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_lps  # DICOM is LPS, NIfTI RAS
    # the transposed view, not a copy (the values are the same; a copy was 4 more bytes a voxel)
    image = nib.as_closest_canonical(nib.Nifti1Image(stack.transpose(2, 1, 0), affine))
    zooms = image.header.get_zooms()[:3]
    return np.asarray(image.dataobj, dtype=np.float32), (float(zooms[0]), float(zooms[1]), float(zooms[2]))


def _affine(first, step: np.ndarray) -> np.ndarray:
    orientation = np.array(first.ImageOrientationPatient, dtype=float)
    row_spacing, column_spacing = (float(v) for v in first.PixelSpacing)
    affine = np.eye(4)
    affine[:3, 0] = orientation[:3] * column_spacing  # along a row: next column
    affine[:3, 1] = orientation[3:] * row_spacing  # down a column: next row
    affine[:3, 2] = step
    affine[:3, 3] = np.array(first.ImagePositionPatient, dtype=float)
    return affine


def declared_shape(datasets: list) -> tuple[int, ...]:
    """What decoding the pixel data of `datasets` would allocate, from their headers alone: rows,
    columns, all frames of all files, and samples per pixel where there are several."""
    rows = max(int(d.get("Rows", 0) or 0) for d in datasets)
    columns = max(int(d.get("Columns", 0) or 0) for d in datasets)
    frames = sum(int(str(d.get("NumberOfFrames", 1) or 1)) for d in datasets)
    samples = max(int(d.get("SamplesPerPixel", 1) or 1) for d in datasets)
    return (rows, columns, frames) + ((samples,) if samples > 1 else ())


def read_series(paths: list[Path], gap_tolerance: float, max_voxels: int | None = None) -> Volume:
    """Assemble one series (or read one multi-frame / single file) into a RAS volume; refused
    from the headers, before any pixel is decoded, when it would hold over `max_voxels`."""
    import pydicom

    for path in paths:
        try:
            empty = path.stat().st_size == 0
        except OSError as error:
            raise UnreadableFileError(f"cannot read file ({error.strerror})") from None
        if empty:
            raise UnreadableFileError("empty file (0 bytes)")
    with quiet_pydicom():
        try:
            # pixel data stays on disk until the headers have been checked
            datasets = [pydicom.dcmread(path, force=True, defer_size="1 MB") for path in paths]
        except Exception as error:
            raise UnreadableFileError(f"not a readable DICOM file ({type(error).__name__})") from None
        if not all(is_dicom(d) for d in datasets):
            raise UnreadableFileError("not a DICOM file (no DICOM header: garbage or another format "
                                      "under a DICOM name)")
        if max_voxels is not None:
            try:
                shape = declared_shape(datasets)
            except (TypeError, ValueError):
                raise UnreadableFileError("DICOM header with a malformed image size (Rows, Columns, "
                                          "NumberOfFrames or SamplesPerPixel)") from None
            voxels = int(np.prod(shape, dtype=object))
            if voxels > max_voxels:
                raise UnreadableFileError(f"volume too large: the DICOM headers declare {'x'.join(map(str, shape))} "
                                          f"voxels ({voxels}) over ingest.max_voxels={max_voxels}")
        first = datasets[0]
        modality = str(first.get("Modality", "")).lower() or "unknown"
        if len(datasets) == 1:
            return _read_single(first, modality)
        return _assemble(datasets, modality, gap_tolerance)


def _read_single(dataset, modality: str) -> Volume:
    pixels = _pixels(dataset)
    if pixels.ndim == 2:
        pixels = pixels[None]
    if pixels.ndim != 3:
        raise UnreadableFileError(f"DICOM pixel data of shape {pixels.shape} is not a grey-level volume")
    spacing_between = float(dataset.get("SpacingBetweenSlices", 0) or dataset.get("SliceThickness", 0) or 1.0)
    frames = getattr(dataset, "PerFrameFunctionalGroupsSequence", None)
    try:
        if frames and len(frames) > 1:  # enhanced multi-frame: positions per frame
            positions = [np.array(f.PlanePositionSequence[0].ImagePositionPatient, dtype=float) for f in frames]
            shared = dataset.SharedFunctionalGroupsSequence[0]
            orientation = shared.PlaneOrientationSequence[0].ImageOrientationPatient
            measures = shared.PixelMeasuresSequence[0]

            class _Geometry:  # the attributes `_affine` reads, from the functional groups
                ImageOrientationPatient = orientation
                PixelSpacing = measures.PixelSpacing
                ImagePositionPatient = positions[0]

            step = (positions[-1] - positions[0]) / (len(positions) - 1)
            affine = _affine(_Geometry, step)
        else:
            affine = _affine(dataset, _slice_normal(dataset) * spacing_between)
    except (AttributeError, KeyError, IndexError, TypeError, ValueError):
        # no patient geometry (secondary capture, some multi-frame MR): pixel grid in the file's order
        affine = np.diag([1.0, 1.0, spacing_between, 1.0])
        if "PixelSpacing" in dataset:
            affine[0, 0], affine[1, 1] = (float(v) for v in dataset.PixelSpacing[::-1])
    array, spacing = _to_ras(pixels, affine)
    return Volume(array, spacing, modality, _patient_of(dataset))


def _assemble(datasets: list, modality: str, gap_tolerance: float) -> Volume:
    if not all("PixelData" in d for d in datasets):
        raise UnreadableFileError("DICOM series without pixel data in its files")
    try:
        normal = _slice_normal(datasets[0])
        positions = np.array([np.dot(normal, np.array(d.ImagePositionPatient, dtype=float)) for d in datasets])
    except (AttributeError, TypeError, ValueError):
        raise UnreadableFileError("DICOM series without slice position or orientation") from None
    order = np.argsort(positions)
    datasets = [datasets[i] for i in order]
    positions = positions[order]
    gaps = np.diff(positions)
    if np.any(gaps < 1e-3):
        raise UnreadableFileError("DICOM series with two slices at the same position")
    usual = float(np.median(gaps))
    if np.any(gaps > usual * (1 + gap_tolerance)):
        missing = int(np.round(gaps.max() / usual)) - 1
        raise UnreadableFileError(f"DICOM series with missing slices: a gap of {gaps.max():.2f} mm where "
                                  f"slices are {usual:.2f} mm apart (about {missing} slice(s) missing)")
    if len({(d.get("Rows"), d.get("Columns")) for d in datasets}) != 1:
        raise UnreadableFileError("DICOM series whose slices differ in size")
    stack = None
    for index, dataset in enumerate(datasets):  # one decoded slice at a time: 4 bytes a voxel in all
        pixels = _pixels(dataset)
        if stack is None:
            stack = np.empty((len(datasets), *pixels.shape), dtype=np.float32)
        if pixels.shape != stack.shape[1:]:
            raise UnreadableFileError("DICOM series whose slices differ in size")
        stack[index] = pixels
        dataset._pixel_array = None  # pydicom keeps the decoded slice; the stack holds it now
        del dataset.PixelData
    step = (np.array(datasets[-1].ImagePositionPatient, dtype=float)
            - np.array(datasets[0].ImagePositionPatient, dtype=float)) / (len(datasets) - 1)
    array, spacing = _to_ras(stack, _affine(datasets[0], step))
    return Volume(array, spacing, modality, _patient_of(datasets[0]))
