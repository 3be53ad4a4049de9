"""De-identification end to end: plant PHI everywhere a hospital export puts it (DICOM
attributes, private tags, folder and file names, NIfTI header text fields, bad files that end
in quarantine), run the whole pipeline with a persistent Dagster instance and an MLflow store
inside PSQA_HOME, then grep every file under PSQA_HOME except inbox/ and quarantine/ --
inside Parquet, gzip, zip and SQLite too -- for each planted value and every original UID.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import nibabel as nib
import numpy as np
import pandas as pd
import pydicom

from ml.data.synthetic import generate_hn_cohort
from psqa_pipelines.definitions import build_defs, build_resources
from psqa_pipelines.resources import MlflowResource, PsqaStorage
from psqa_pipelines.runner import run_inbox_cycle
from psqa_pipelines_tests.conftest import SMALL_STUDY
from psqa_pipelines_tests.phi_grep import find_phi

NIFTI_PHI = ["Quibblethorpe^Marigold", "NII-PHI-552301", "Quibblethorpe"]


def _plant_nifti_case(inbox: Path) -> None:
    folder = inbox / "Quibblethorpe_Marigold_NII-PHI-552301"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    base = rng.normal(100, 10, (40, 40, 30)).astype(np.float32)
    for seq in ("t1", "t1c", "t2", "flair"):
        img = nib.Nifti1Image(base + rng.normal(0, 1, base.shape).astype(np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
        img.header["descrip"] = b"Quibblethorpe^Marigold NII-PHI-552301"
        img.header["aux_file"] = b"NII-PHI-552301"
        img.header["db_name"] = b"Quibblethorpe"
        nib.save(img, folder / f"Quibblethorpe_NII-PHI-552301_{seq}.nii.gz")


def test_no_phi_anywhere_under_psqa_home(tmp_path):
    home = tmp_path / "home"
    storage = PsqaStorage(home=str(home), openkbp_dir="", inbox_settle_seconds=0)
    storage.ensure_dirs()
    truths = generate_hn_cohort(storage.inbox / "export", 2, seed=5, **SMALL_STUDY)
    _plant_nifti_case(storage.inbox)
    # a broken file full of PHI that must end in quarantine, not in the lake
    bad = pydicom.dcmread(truths[0].ct_files[0])
    bad.StudyInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["phi-bad"])
    del bad.ImagePositionPatient
    bad.save_as(storage.inbox / f"{truths[0].phi.patient_id}_broken.dcm", enforce_file_format=True)

    needles = list(NIFTI_PHI)
    for t in truths:
        needles += t.phi.strings()
        for f in [*t.ct_files, t.rtstruct_file, t.rtdose_file]:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            needles += [
                str(ds.get(k))
                for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")
                if ds.get(k)
            ]
    needles = sorted(set(needles))
    # the planted values really are in the input (a grep that finds nothing proves nothing)
    assert {n for _, n in find_phi(storage.inbox, needles, exclude=())} >= {n.lower() for n in NIFTI_PHI}

    mlflow = MlflowResource(
        tracking_uri=f"sqlite:///{home / 'mlflow' / 'mlflow.db'}", artifact_root=str(home / "mlflow" / "artifacts")
    )
    defs = build_defs(build_resources(storage, mlflow=mlflow))
    (home / "dagster").mkdir(parents=True)
    with dg.DagsterInstance.local_temp(tempdir=str(home / "dagster")) as instance:
        report = run_inbox_cycle(defs, instance)
        assert len(report.studies) == 4 and not report.failed  # 2 DICOM + 1 NIfTI + 1 broken-slice study
        assert report.files_quarantined == 1
        # MLflow gets lake tables too, as a training run would log them
        run_id = mlflow.start_run(run_name="phi-check", tags={"purpose": "test"})
        mlflow.log_parquet_dataset(
            run_id,
            pd.read_parquet(storage.tables / "file_index.parquet"),
            storage.tables / "file_index.parquet",
            name="file_index",
        )
        mlflow.log_params(run_id, pd.read_parquet(storage.tables / "study_index.parquet").iloc[0].to_dict())
        mlflow.end_run(run_id)

    hits = find_phi(home, needles)
    assert hits == [], hits[:20]
    # and the dagster event log and MLflow store were actually searched
    assert any((home / "dagster").rglob("*.db"))
    assert (home / "mlflow" / "mlflow.db").exists()
