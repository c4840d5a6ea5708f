from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pytest

from tasks.lineage import verify
from tests.conftest import run_stages, write_params
from tests.ssl_models.medical_files import blob_volume, medical_params, write_nifti, write_series

PLANTED = ["Planted", "PID-4711", "ACC-7", "19700101"]  # name, id, accession, birth date


@pytest.mark.slow
def test_a_planted_patient_reaches_no_output_log_or_report(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture) -> None:
    """The patient's name is in the DICOM header and in every file and folder name; after the
    whole pipeline and the export it is in no manifest, shard, checkpoint, model, report, lineage
    record, exported bundle, model card or log."""
    corpus = tmp_path / "corpus"
    write_series(corpus / "Doe^Planted_PID-4711", "Doe^Planted", "PID-4711", n_slices=16, file_stem="Doe_Planted",
                 contrast=300)
    rng = np.random.default_rng(0)
    rows = [["Doe^Planted_PID-4711", "mass", ""]]
    for i in range(23):
        label = "mass" if i % 2 else "normal"
        write_nifti(corpus / f"Planted_case_{i}.nii.gz", blob_volume(rng, 16, label == "mass"))
        rows.append([f"Planted_case_{i}.nii.gz", label, f"Planted-family-{i % 8}"])
    with open(corpus / "labels.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([["path", "label", "group"], *rows])
    write_params(tmp_path, medical_params(labels="corpus/labels.csv"))
    caplog.set_level(logging.DEBUG)
    (summary,) = run_stages(tmp_path, "medical", "ingest")
    assert summary["labeled"] == 24
    run_stages(tmp_path, "medical", "preprocess", "pretrain", "finetune", "evaluate", "report", "export")
    assert verify(tmp_path / "reports/medical/report", tmp_path) == []
    # the bundle and its model card (with the data statement and the verdict): scanned below with the rest
    assert (tmp_path / "models/medical/export/README.md").exists()
    written = [p for folder in ("data", "models", "reports") for p in (tmp_path / folder).rglob("*")]
    assert len(written) > 30
    for path in written:
        assert not any(value in str(path.relative_to(tmp_path)) for value in PLANTED), path
        if path.is_file():
            content = path.read_bytes()
            assert not any(value.encode() in content for value in PLANTED), path
    output = caplog.text + "".join(capfd.readouterr())
    assert "ingest medical:" in caplog.text and "pretrain medical:" in caplog.text  # the stages did log
    assert not any(value in output for value in PLANTED)
