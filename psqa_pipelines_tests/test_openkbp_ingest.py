"""Real OpenKBP patients through the same assets and tables as DICOM (needs ../shared)."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd

from ml.data.dicom.deid import Pseudonymizer
from ml.data.openkbp import from_canonical_array, list_patient_files, read_sparse
from ml.data.volume import read_nifti
from psqa_pipelines.resources import PsqaStorage
from psqa_pipelines.runner import run_inbox_cycle
from psqa_pipelines.settings import default_openkbp_dir
from psqa_pipelines_tests.conftest import OPENKBP_DIR, needs_openkbp


@needs_openkbp
def test_two_real_patients_and_an_incomplete_one(tmp_path, make_defs, instance):
    src = tmp_path / "openkbp"
    src.mkdir()
    for pt in ("pt_1", "pt_10"):
        (src / pt).symlink_to(OPENKBP_DIR / pt, target_is_directory=True)
    broken = src / "pt_999"  # a patient whose CT and possible-dose mask never arrived
    broken.mkdir()
    for name in ("dose.csv.xz", "voxel_dimensions.csv.xz", "PTV70.csv.xz"):
        shutil.copyfile(OPENKBP_DIR / "pt_1" / name, broken / name)
    before = sorted(p.name for p in broken.iterdir())

    storage = PsqaStorage(home=str(tmp_path / "home"), openkbp_dir=str(src), inbox_settle_seconds=0)
    report = run_inbox_cycle(make_defs(storage), instance)
    assert not report.failed
    assert report.files_seen == report.files_ingested + report.files_quarantined
    assert report.files_quarantined == 3  # the whole incomplete patient, not silently dropped
    assert sorted(p.name for p in broken.iterdir()) == before  # read-only source: copied, not moved
    q = pd.read_parquet(storage.tables / "quarantine_table.parquet")
    assert set(q["reason"]) == {"incomplete_patient"} and set(q["action"]) == {"copied"}

    p = Pseudonymizer()
    manifest = pd.read_parquet(storage.tables / "volume_manifest.parquet")
    for pt in ("pt_1", "pt_10"):
        key = p.study("kbp", pt)
        assert key in report.studies
        m = manifest[manifest["study_key"] == key].set_index("name")
        files = list_patient_files(OPENKBP_DIR / pt)
        # dose volume, mapped back to OpenKBP axes, equals the source CSV exactly
        dose = from_canonical_array(read_nifti(storage.lake / m.loc["PLAN", "path"]).array)
        idx, val = read_sparse(files["dose"])
        ref = np.zeros(128**3, np.float32)
        ref[idx] = val
        assert np.array_equal(dose.reshape(-1), ref)
        ct = from_canonical_array(read_nifti(storage.lake / m.loc["CT", "path"]).array)
        idx, val = read_sparse(files["ct"])
        assert np.array_equal(ct.reshape(-1)[idx], (val - 1024).astype(np.int16))
        assert {"possible_dose_mask", "PTV70"} <= set(m.index)
        assert m.loc["CT", "spacing_z"] > 0 and m["grid_id"].nunique() == 1

    study_index = pd.read_parquet(storage.tables / "study_index.parquet")
    assert set(study_index["source"]) == {"openkbp"} and len(study_index) == 2
    # same tables, same schema as DICOM studies
    files_tbl = pd.read_parquet(storage.tables / "file_index.parquet")
    assert not files_tbl["stored_path"].str.contains("pt_").any()


def test_openkbp_source_is_opt_in(monkeypatch, tmp_path):
    """Unset, the source is off (make dev must not queue an hour of ingestion nobody asked for);
    ``shared`` names the shared patients, any other value is a folder."""
    monkeypatch.delenv("PSQA_OPENKBP_DIR", raising=False)
    assert default_openkbp_dir() == ""
    assert PsqaStorage(home=str(tmp_path)).openkbp is None
    monkeypatch.setenv("PSQA_OPENKBP_DIR", "off")
    assert default_openkbp_dir() == ""
    monkeypatch.setenv("PSQA_OPENKBP_DIR", str(tmp_path))
    assert default_openkbp_dir() == str(tmp_path)


@needs_openkbp
def test_shared_keyword_points_at_the_shared_patients(monkeypatch):
    monkeypatch.setenv("PSQA_OPENKBP_DIR", "shared")
    assert default_openkbp_dir() == str(OPENKBP_DIR)
