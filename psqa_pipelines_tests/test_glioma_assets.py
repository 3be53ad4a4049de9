"""The glioma data assets: glioma_cases + glioma_labels (one import step), glioma_folds and their
checks, materialised on a small subset of the real sources into a temporary PSQA_HOME."""

from __future__ import annotations

import dagster as dg
import pandas as pd
import pytest

from ml.data.phi import table_phi_violations
from ml.data.quarantine import read_log
from psqa_pipelines.defs.glioma.assets import glioma_folds, glioma_import
from psqa_pipelines.defs.glioma.checks import glioma_folds_are_sound, glioma_labels_are_sound
from psqa_pipelines.resources import DeidentificationResource, LakeParquetIOManager
from psqa_pipelines_tests.conftest import BRAIN_DIR, SHARED

LGG_DIR = SHARED / "datasets" / "lgg-mri"
needs_lgg = pytest.mark.skipif(not LGG_DIR.is_dir(), reason="needs ../shared lgg-mri data (absent)")


def _materialize(storage, instance, config: dict):
    return dg.materialize(
        [glioma_import, glioma_folds, glioma_labels_are_sound, glioma_folds_are_sound],
        resources={
            "storage": storage,
            "io_manager": LakeParquetIOManager(storage=storage),
            "deid": DeidentificationResource(),
        },
        run_config={"ops": {"glioma_import": {"config": config}, "glioma_folds": {"config": {"n_folds": 3}}}},
        instance=instance,
    )


@needs_lgg
def test_glioma_data_assets(storage, instance):
    config = {
        "lgg_dir": str(LGG_DIR),
        "brain_mri_dir": str(BRAIN_DIR) if BRAIN_DIR.is_dir() else "",
        "max_patients": 6,
        "max_brain_cases": 1,  # the BraTS-layout case: four sequences on one grid, no registration
    }
    result = _materialize(storage, instance, config)
    assert result.success
    evals = result.get_asset_check_evaluations()
    assert {e.check_name for e in evals} == {"glioma_labels_are_sound", "glioma_folds_are_sound"}
    for ev in evals:
        assert ev.passed, (ev.check_name, ev.metadata)

    cases = result.output_for_node("glioma_import", "glioma_cases")
    labels = result.output_for_node("glioma_import", "glioma_labels")
    folds = result.output_for_node("glioma_folds")
    n_brain = 1 if BRAIN_DIR.is_dir() else 0
    assert cases["patient_id"].nunique() == 6 + n_brain == len(labels) == len(folds)
    assert (labels["source"] == "lgg-mri").sum() == 6
    assert table_phi_violations(cases) == [] and table_phi_violations(labels) == []
    assert all((storage.lake / p).exists() for p in cases["path"])
    assert (folds["fold"] == -1).sum() == n_brain  # the unlabelled pool
    assert set(folds.loc[folds["fold"] >= 0, "fold"]) == {0, 1, 2}
    assert (storage.tables / "glioma_labels.parquet").exists() and (storage.tables / "glioma_folds.parquet").exists()

    mats = {
        e.asset_key.to_user_string(): e.step_materialization_data.materialization.metadata
        for e in result.get_asset_materialization_events()
    }
    assert mats["glioma_cases"]["patients"].value == 6 + n_brain
    assert "data:image/png;base64" in mats["glioma_cases"]["preview"].value
    schema = mats["glioma_labels"]["dagster/column_schema"].schema
    assert all(c.description for c in schema.columns), [c.name for c in schema.columns if not c.description]
    assert "by_fold_and_stratum" in mats["glioma_folds"]

    # a second run writes no new volumes and gives the same tables
    stamps = {p: p.stat().st_mtime_ns for p in (storage.lake / "glioma" / "volumes").rglob("*.nii.gz")}
    again = _materialize(storage, instance, config)
    assert again.success
    pd.testing.assert_frame_equal(again.output_for_node("glioma_import", "glioma_cases"), cases)
    pd.testing.assert_frame_equal(again.output_for_node("glioma_folds"), folds)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


@needs_lgg
def test_bad_label_and_corrupt_file_do_not_stop_the_import(storage, instance, tmp_path):
    src = tmp_path / "lgg"
    (src / "patients").mkdir(parents=True)
    ids = ("TCGA-CS-4942", "TCGA-CS-4943")
    for pid in ids:
        (src / "patients" / f"{pid}.npz").symlink_to(LGG_DIR / "patients" / f"{pid}.npz")
    (src / "patients" / "TCGA-XX-0000.npz").write_bytes(b"not an npz")
    labels = pd.read_csv(LGG_DIR / "labels.csv", dtype=str, keep_default_na=False)
    labels = labels[labels["patient_id"].isin(ids)].reset_index(drop=True)
    labels.loc[0, "grade"] = "G9"
    labels.to_csv(src / "labels.csv", index=False)

    result = _materialize(storage, instance, {"lgg_dir": str(src), "brain_mri_dir": ""})
    assert result.success
    assert all(ev.passed for ev in result.get_asset_check_evaluations())
    out = result.output_for_node("glioma_import", "glioma_labels")
    assert len(out) == 2 and out["grade"].isna().sum() == 1
    log = read_log(storage.quarantine_log)
    assert list(log["reason"]) == ["unreadable"] and list(log["source"]) == ["lgg-mri"]
    assert table_phi_violations(log) == []
