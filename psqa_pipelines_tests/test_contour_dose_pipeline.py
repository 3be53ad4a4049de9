"""train_contour_dose end to end: DICOM studies (and real OpenKBP patients when ../shared is there)
-> lake -> cases, split, cache -> six models (MLflow, registered) -> predictions -> scores and seed
tables -> DICOM RT Dose / RT Structure Set exports for a new patient that has no dose yet."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pydicom

from ml.contour_dose.variants import MODEL_NAMES, VARIANTS
from psqa_pipelines.defs.contour_dose.training import TRAINED_VARIANTS, registered_name
from psqa_pipelines.resources import PsqaStorage
from psqa_pipelines.runner import run_inbox_cycle
from psqa_pipelines_tests.conftest import OPENKBP_DIR, SMALL_STUDY

TINY = {"epochs": 1, "steps_per_epoch": 2, "batch_size": 4, "widths": [4, 8, 16, 32, 64], "augment": False}


def test_train_contour_dose_end_to_end(tmp_path, make_defs, instance, mlflow_store):
    from ml.data.synthetic import generate_hn_cohort

    inbox_src = tmp_path / "cohort"
    truths = generate_hn_cohort(inbox_src, 4, seed=23, **SMALL_STUDY)
    new_patient = truths[-1]
    shutil.rmtree(new_patient.rtdose_file.parent)  # a new patient: CT + structures, no dose yet
    kbp = ""
    if OPENKBP_DIR.is_dir():
        kbp_dir = tmp_path / "openkbp"
        kbp_dir.mkdir()
        for pt in ("pt_1", "pt_10"):
            (kbp_dir / pt).symlink_to(OPENKBP_DIR / pt, target_is_directory=True)
        kbp = str(kbp_dir)
    storage = PsqaStorage(home=str(tmp_path / "home"), openkbp_dir=kbp, inbox_settle_seconds=0)
    shutil.copytree(inbox_src, storage.inbox, dirs_exist_ok=True)
    defs = make_defs(storage)
    report = run_inbox_cycle(defs, instance)
    assert not report.failed

    run_config = {"ops": {f"contour_dose_model_{v.replace('-', '_')}": {"config": TINY} for v in TRAINED_VARIANTS}}
    result = defs.resolve_job_def("train_contour_dose").execute_in_process(run_config=run_config, instance=instance)
    assert result.success
    for ev in result.get_asset_check_evaluations():
        assert ev.passed, (ev.check_name, ev.metadata)

    cases = result.output_for_node("contour_dose_cases")
    n_ok = 3 + (2 if kbp else 0)
    assert (cases["status"] == "ok").sum() == n_ok
    assert (cases["status"] == "predict_only").sum() == 1
    if kbp:
        assert set(cases.loc[cases["source"] == "openkbp", "status"]) == {"ok"}
    split = result.output_for_node("contour_dose_split")
    assert len(split) == n_ok and split.groupby("patient_id")["split"].nunique().max() == 1
    cache = result.output_for_node("contour_dose_cache").iloc[0]
    assert cache["patients"] == n_ok + 1 and cache["test"] >= 1 and cache["val"] >= 1

    # every model: an MLflow run and a registered version tagged with the Dagster run
    client = mlflow_store.client()
    for v in TRAINED_VARIANTS:
        row = result.output_for_node(f"contour_dose_model_{v.replace('-', '_')}").iloc[0]
        mv = client.get_model_version(registered_name(v), str(row["model_version"]))
        assert mv.tags["dagster_run_id"] == result.run_id and mv.tags["cache_digest"] == cache["digest"]
        run = client.get_run(row["mlflow_run_id"])
        assert run.info.status == "FINISHED" and "val_loss" in run.data.metrics
        assert {i.dataset.name for i in run.inputs.dataset_inputs} >= {f"contour-dose-cache-{cache['digest']}-train"}

    preds = result.output_for_node("contour_dose_predictions")
    test_ids = set(split.loc[split["split"] == "test", "patient_id"])
    assert set(preds.loc[preds["split"] == "test", "patient_id"]) == test_ids
    assert set(preds.loc[preds["split"] == "test", "variant"]) == set(TRAINED_VARIANTS)
    inference = preds[preds["split"] == "inference"]
    assert list(inference["variant"]) == ["product"] and len(inference) == 1

    scores = result.output_for_node("contour_dose_evaluation").set_index("variant")
    dose_models = [v for v in TRAINED_VARIANTS if "dose" in VARIANTS[v]["tasks"]]
    assert np.isfinite(scores.loc[dose_models, "dose_score"]).all()
    assert np.isfinite(scores.loc[dose_models, "dvh_score"]).all()
    assert scores.loc[["contour-only", "multi-automated", "product"], "mean_dice"].between(0, 1).all()
    mat = instance.get_latest_materialization_event(
        __import__("dagster").AssetKey("contour_dose_evaluation")
    ).asset_materialization
    assert "Average" in mat.metadata["dvh_mae_table"].value and "HD95" in mat.metadata["contour_table"].value
    evaluated = client.get_run(scores.loc["multi-automated", "evaluation_run_id"])
    assert "test_dose_score" in evaluated.data.metrics
    assert evaluated.data.tags["contour_dose/model_version"] == str(scores.loc["multi-automated", "model_version"])
    # every registered model gets a description and its first champion (the alias rule of each family)
    champ = result.output_for_node("contour_dose_champion").set_index("variant")
    assert set(champ.index) == set(TRAINED_VARIANTS) and champ["promoted"].all()
    for v in TRAINED_VARIANTS:
        name = registered_name(v)
        assert client.get_registered_model(name).description.startswith(MODEL_NAMES[v])
        version = client.get_model_version_by_alias(name, "champion")
        assert str(version.version) == champ.loc[v, "champion_version"]
        assert "/runs/" in version.description  # the link back to the Dagster run that trained it

    # the new DICOM patient gets an RT Dose + RT Structure Set on its own CT's frame of reference
    exports = result.output_for_node("contour_dose_exports")
    new_case = inference["patient_id"].iloc[0]
    mine = exports[exports["patient_id"] == new_case].set_index("kind")["path"]
    assert {"rtdose", "rtstruct", "dose_nifti", "labels_nifti"} <= set(mine.index)
    rd, rs = pydicom.dcmread(mine["rtdose"]), pydicom.dcmread(mine["rtstruct"])
    files = pd.read_parquet(storage.tables / "file_index.parquet")
    ct_stored = files[(files["study_key"] == new_case) & (files["modality"] == "CT")]["stored_path"]
    ct0 = pydicom.dcmread(storage.lake / ct_stored.iloc[0], stop_before_pixels=True)
    assert (
        rd.FrameOfReferenceUID
        == ct0.FrameOfReferenceUID
        == rs.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID
    )
    assert rd.Modality == "RTDOSE" and rd.DoseUnits == "GY" and rs.Modality == "RTSTRUCT"
    referenced = {
        c.ReferencedSOPInstanceUID
        for c in rs.ReferencedFrameOfReferenceSequence[0]
        .RTReferencedStudySequence[0]
        .RTReferencedSeriesSequence[0]
        .ContourImageSequence
    }
    assert ct0.SOPInstanceUID in referenced
