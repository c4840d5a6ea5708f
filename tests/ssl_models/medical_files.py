"""Tiny real-format medical files for tests: DICOM series built from pydicom's CT_small.dcm
(a real CT header) with planted patient data, small NIfTI volumes, shard rows of cubes, and
tiny params for the medical domain."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid


def write_series(folder: Path, patient_name: str, patient_id: str, n_slices: int = 10, size: int = 16,
                 slice_step: float = 2.5, drop: int | None = None, file_stem: str = "IM",
                 contrast: float = 0.0) -> list[Path]:
    """One CT series (a `SeriesInstanceUID`), slice k filled with 100 * k HU (+ a bright cube of
    `contrast` HU in its centre); files named in reverse position order, to test sorting."""
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    folder.mkdir(parents=True, exist_ok=True)
    series_uid, study_uid = generate_uid(), generate_uid()
    paths = []
    for k in range(n_slices):
        if k == drop:
            continue
        ds = template.copy()
        ds.PatientName, ds.PatientID = patient_name, patient_id
        ds.PatientBirthDate, ds.AccessionNumber, ds.InstitutionName = "19700101", "ACC-7", "Planted Hospital"
        ds.SeriesInstanceUID, ds.StudyInstanceUID = series_uid, study_uid
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [-20.0, -20.0, -50.0 + k * slice_step]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.8, 0.7]  # row spacing (mm between rows), column spacing
        ds.Rows = ds.Columns = size
        pixels = np.full((size, size), 1024 + 100 * k, dtype=np.int16)  # stored + intercept -1024 = 100 k HU
        centre = slice(size // 4, 3 * size // 4)
        pixels[centre, centre] += np.int16(contrast)
        ds.PixelData = pixels.tobytes()
        path = folder / f"{file_stem}_{n_slices - k:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_without_pixels(path: Path) -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del ds.PixelData
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def write_nifti(path: Path, array: np.ndarray, spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array.astype(np.float32), np.diag([*spacing, 1.0])), path)


def blob_volume(rng: np.random.Generator, size: int, with_blob: bool) -> np.ndarray:
    """Noise in a head-like ball, with or without a bright blob: a binary task a 3D net can learn."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, size)] * 3, indexing="ij"))
    volume = (np.sqrt((grid ** 2).sum(0)) < 0.9) * (100 + 10 * rng.standard_normal((size,) * 3))
    if with_blob:
        centre = rng.uniform(-0.4, 0.4, 3)
        volume += 150 * (np.sqrt(((grid - centre[:, None, None, None]) ** 2).sum(0)) < 0.3)
    return volume


def cube_rows(n: int, size: int = 16) -> list[dict[str, Any]]:
    """Pretraining rows as the preprocess stage writes them: float16 cubes, half with a blob."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        cube = (blob_volume(rng, size, i % 2 == 0) / 250).astype(np.float16)
        rows.append({"sample_id": str(i), "image": cube.tobytes(), "shape": list(cube.shape)})
    return rows


TINY_MEDICAL: dict[str, Any] = {
    "module": "medical3d",
    "corpus": "corpus",
    "labels": None,
    "split": {"val": 0.1, "test": 0.3, "salt": "split-v1"},
    "privacy": {"salt_file": "secret/salt"},
    "ingest": {"min_slices": 8},
    "preprocess": {"spacing": None},
    "model": {"backbone": "vit", "size": 16, "patch_size": 8, "hidden_size": 24, "num_layers": 1, "num_heads": 2,
              "mlp_dim": 48, "resnet_widths": [4, 8, 8, 16]},
    "pretrain": {"method": "mae", "steps": 4, "batch_size": 4, "learning_rate": 0.001, "warmup_steps": 1,
                 "checkpoint_every": 2, "rankme_samples": 8},
    "finetune": {"label_fractions": [0.5, 1.0], "seeds": [0], "max_steps": 2, "batch_size": 4},
}


def medical_params(**overrides: Any) -> dict[str, Any]:
    """`{"domains": {"medical": block}}`: the tiny block, each override updating its section
    (a mapping) or replacing it (any other value)."""
    block = copy.deepcopy(TINY_MEDICAL)
    for section, values in overrides.items():
        if isinstance(values, dict):
            block.setdefault(section, {}).update(values)
        else:
            block[section] = values
    return {"domains": {"medical": block}}


def assert_learns_then_reloads(model: Any, domain: Any, cfg: Any, root: Path, rows: list[dict[str, Any]], *,
                               learning_rate: float, steps: int) -> Any:
    """`model` lowers its loss on one fixed batch of `rows` (views and masks drawn once) by a tenth
    within `steps` AdamW steps; its saved encoder, loaded as fine-tuning loads `ssl`, embeds `rows`
    as the method does. Returns that encoder."""
    import torch

    from ssl_models.core.modules import sample_seeds

    batch = model.data_side()(rows, sample_seeds(0, 0, range(len(rows))))

    def loss() -> float:
        with torch.no_grad():
            return model(batch).item()

    before = loss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    for _ in range(steps):
        model(batch).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss() < 0.9 * before
    model.eval()
    model.encoder().save(root / "encoder")
    encoder = domain.load_encoder("ssl", cfg, root, root / "encoder", seed=1).eval()
    with torch.no_grad():
        assert torch.allclose(encoder(encoder.collate(rows)), model.embed(rows), atol=1e-5)
    return encoder
