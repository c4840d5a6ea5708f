"""The embedded default: real volumes from installed packages, no download.

Labeled part: non-overlapping 24 mm cubes cut from nilearn's MNI152 T1 template (ICBM 2009a,
1 mm), labeled `grey_matter` or `white_matter` by the tissue that dominates the cube in
nilearn's own grey/white-matter probability maps of the same template; cubes of one 48 mm
block share a `group`, so the test regions of the brain are never trained or pretrained on.
Unlabeled extras: DICOM files of pydicom's test data (a multi-frame dose grid; two single slices,
quarantined as 2D) and nibabel's example NIfTI volumes, for the readers and the pretraining corpus.
"""

from __future__ import annotations

import csv
import importlib.util
import shutil
from pathlib import Path

import numpy as np

from ssl_models.core.errors import PipelineError
from ssl_models.medical3d.config import MniDefaultConfig

ATTRIBUTION = ("Default data: the MNI ICBM152 2009a nonlinear symmetric template and its tissue probability "
               "maps as shipped with nilearn (Fonov et al., NeuroImage 2011; free to use with the copyright "
               "notice of the McConnell Brain Imaging Centre), plus test volumes of pydicom and nibabel.")
MNI_FILES = {"t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
             "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
             "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"}
PYDICOM_VOLUMES = ("rtdose.dcm", "CT_small.dcm", "MR_small.dcm")  # a multi-frame dose grid; two single slices (quarantined: 2D)
NIBABEL_VOLUMES = ("anatomical.nii", "example4d.nii.gz", "standard.nii.gz")


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise PipelineError(f"the default 3D data needs the package {name}; run `pip install {name}` "
                            "or point the domain's corpus at your own volumes")
    return Path(next(iter(spec.submodule_search_locations)))


def write_mni_crops(out_dir: Path, options: MniDefaultConfig) -> int:
    """Cut the template into labeled cubes; returns how many were written."""
    import nibabel as nib

    data = _package_dir("nilearn") / "datasets" / "data"
    t1, gm, wm = (nib.load(data / MNI_FILES[k]) for k in ("t1", "gm", "wm"))
    t1_data = np.asarray(t1.dataobj, dtype=np.float32)
    gm_data, wm_data = (np.asarray(img.dataobj, dtype=np.float32) for img in (gm, wm))
    corpus = out_dir / "corpus" / "mni152"
    corpus.mkdir(parents=True, exist_ok=True)
    size, rows = options.crop_size, []
    for x in range(0, t1_data.shape[0] - size + 1, size):
        for y in range(0, t1_data.shape[1] - size + 1, size):
            for z in range(0, t1_data.shape[2] - size + 1, size):
                box = (slice(x, x + size), slice(y, y + size), slice(z, z + size))
                grey, white = float(gm_data[box].mean()), float(wm_data[box].mean())
                if grey + white < options.min_brain_fraction:
                    continue
                name = f"cube_x{x:03d}_y{y:03d}_z{z:03d}.nii.gz"
                affine = t1.affine.copy()
                affine[:3, 3] = t1.affine[:3, :3] @ np.array([x, y, z]) + t1.affine[:3, 3]
                nib.save(nib.Nifti1Image(t1_data[box].copy(), affine), corpus / name)
                block = "-".join(str(v * int(t1.header.get_zooms()[0]) // options.block_size) for v in (x, y, z))
                rows.append([f"mni152/{name}", "grey_matter" if grey > white else "white_matter", f"block-{block}"])
    with open(out_dir / "labels.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "group"])
        writer.writerows(rows)
    return len(rows)


def copy_registry_volumes(out_dir: Path) -> int:
    """pydicom's multi-frame files and nibabel's example volumes, unlabeled."""
    copied = 0
    sources = [(_package_dir("pydicom") / "data" / "test_files", PYDICOM_VOLUMES, "pydicom"),
               (_package_dir("nibabel") / "tests" / "data", NIBABEL_VOLUMES, "nibabel")]
    for folder, names, package in sources:
        for name in names:
            if (folder / name).exists():
                target = out_dir / "corpus" / package / name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(folder / name, target)
                copied += 1
    return copied
