from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pytest

from tasks.evaluate import evaluate
from tasks.finetune import finetune
from tasks.ingest import ingest
from tasks.lineage import verify
from tasks.preprocess import preprocess
from tasks.pretrain import pretrain
from tasks.report import report
from tests.conftest import write_params
from tests.ssl_models.medical_files import blob_volume, write_nifti, write_series
from tests.ssl_models.test_medical3d_readers import medical_params

PLANTED = ["Planted", "PID-4711", "ACC-7", "19700101"]  # name, id, accession, birth date


def test_a_planted_patient_reaches_no_output_log_or_report(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        capfd: pytest.CaptureFixture) -> None:
    """The patient's name is in the DICOM header and in every file and folder name; after the
    whole pipeline it is in no manifest, shard, checkpoint, model, report, lineage record or log."""
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
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.DEBUG)
    assert ingest("medical")["labeled"] == 24
    for stage in (preprocess, pretrain, finetune, evaluate, report):
        stage("medical")
    assert verify(Path("reports/medical/report")) == []
    written = [p for folder in ("data", "models", "reports") for p in Path(folder).rglob("*")]
    assert len(written) > 30
    for path in written:
        assert not any(value in str(path) for value in PLANTED), path
        if path.is_file():
            content = path.read_bytes()
            assert not any(value.encode() in content for value in PLANTED), path
    output = caplog.text + "".join(capfd.readouterr())
    assert "ingest medical:" in caplog.text and "pretrain medical:" in caplog.text  # the stages did log
    assert not any(value in output for value in PLANTED)
