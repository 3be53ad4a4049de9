"""The glioma training chain on a few real lgg-mri patients with tiny CPU settings: training directory ->
final GMMAS (factory: MLflow run with per-epoch Kendall sigma, registered glioma-gmmas) -> cross-validation
(one MLflow child run per fold, tagged fold=<k>) -> evaluation vs baselines, ablation, missing-modality
table, per-patient reports -> champion alias. Plus the champion/challenger rule on its own."""

from __future__ import annotations

import math
from pathlib import Path

import dagster as dg
import pytest

from ml.glioma.selection import champion_decision, first_patients
from psqa_pipelines.defs.glioma import assets, checks, evaluation, training
from psqa_pipelines.resources import ComputeResource, DeidentificationResource, LakeParquetIOManager
from psqa_pipelines_tests.conftest import SHARED

LGG_DIR = SHARED / "datasets" / "lgg-mri"
needs_lgg = pytest.mark.skipif(not LGG_DIR.is_dir(), reason="needs ../shared lgg-mri data (absent)")

TINY = {
    "epochs": 1,
    "batch_size": 8,
    "widths": [4, 8, 8, 16],
    "pseudo_labels": False,
    "distill": False,
    "seed": 0,
}


@pytest.fixture
def one_torch_thread():
    """One intra-op thread: on a small shared CPU, two threads oversubscribed by another process run 20-50x
    slower (measured 0.8 vs 40 slices/s on 2 cores)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_champion_rule():
    assert champion_decision({"oof_score": 0.6, "val_loss": 2.0}, None)["promote"]
    # both have an OOF score: it decides (higher is better), the validation loss is not looked at
    d = champion_decision({"oof_score": 0.7, "val_loss": 9.0}, {"oof_score": 0.6, "val_loss": 1.0})
    assert d["promote"] and d["metric"] == "oof_score"
    assert not champion_decision({"oof_score": 0.6}, {"oof_score": 0.6})["promote"]  # a tie keeps the champion
    assert not champion_decision({"oof_score": 0.65}, {"oof_score": 0.6}, margin=0.1)["promote"]
    # only the validation loss on both sides: lower is better
    d = champion_decision({"oof_score": 0.7, "val_loss": 1.0}, {"oof_score": math.nan, "val_loss": 1.5})
    assert d["promote"] and d["metric"] == "val_loss"
    assert not champion_decision({"val_loss": 2.0}, {"val_loss": 1.5})["promote"]
    assert not champion_decision({}, {"val_loss": 1.5})["promote"]  # nothing comparable: keep


def test_first_patients_keeps_every_fold():
    import pandas as pd

    folds = pd.DataFrame({"patient_id": [f"p{i}" for i in range(10)], "fold": [0, 0, 0, 0, 1, 1, 1, 2, 2, -1]})
    sub = first_patients(folds, 4)
    assert len(sub) == 4 and set(sub["fold"]) == {0, 1, 2} and (sub["fold"] >= 0).all()


@needs_lgg
def test_glioma_training_chain(storage, instance, mlflow_store, one_torch_thread):
    resources = {
        "storage": storage,
        "io_manager": LakeParquetIOManager(storage=storage),
        "deid": DeidentificationResource(),
        "mlflow": mlflow_store,
        "compute": ComputeResource(device="cpu"),
    }
    run_config = {
        "ops": {
            "glioma_import": {"config": {"lgg_dir": str(LGG_DIR), "brain_mri_dir": "", "max_patients": 8}},
            "glioma_folds": {"config": {"n_folds": 2}},
            "glioma_model": {"config": TINY},
            "glioma_cv_predictions": {"config": {**TINY, "mc": 2}},
            "glioma_evaluation": {"config": {"n_boot": 100}},
            "glioma_ablation": {"config": {"variants": ["equal_weights"], "folds": [0], "n_boot": 50}},
        }
    }
    defs = [
        assets.glioma_import,
        assets.glioma_folds,
        training.glioma_training_data,
        training.glioma_model,
        training.glioma_cv_predictions,
        evaluation.glioma_evaluation,
        evaluation.glioma_ablation,
        evaluation.glioma_missing_modality,
        evaluation.glioma_reports,
        evaluation.glioma_challenger_eval,
        evaluation.glioma_champion,
        checks.glioma_challenger_beats_champion,
    ]
    result = dg.materialize(defs, resources=resources, run_config=run_config, instance=instance)
    assert result.success
    for ev in result.get_asset_check_evaluations():
        assert ev.passed, (ev.check_name, ev.metadata)

    data = result.output_for_node("glioma_training_data")
    assert len(data) == 8 and (Path(data.iloc[0]["data_dir"]) / "labels.csv").exists()

    # the final model: one MLflow run with per-epoch sigma / fusion-weight metrics, a registered version
    client = mlflow_store.client()
    model = result.output_for_node("glioma_model").iloc[0]
    run = client.get_run(model["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert {"sigma_idh", "sigma_seg", "w_flair", "val_loss"} <= set(run.data.metrics)
    assert len(client.get_metric_history(run.info.run_id, "sigma_idh")) == 1  # one point per epoch
    assert run.data.tags["dagster/run_id"] == result.run_id
    assert any(i.dataset.name.startswith("glioma-labels-") for i in run.inputs.dataset_inputs)
    mv = client.get_model_version(training.GLIOMA_MODEL_NAME, str(model["model_version"]))
    assert mv.tags["dagster_run_id"] == result.run_id and "val_dice" in mv.tags and "oof_score" in mv.tags

    # cross-validation: every labelled patient out of fold, a child run per fold tagged fold=<k>
    oof = result.output_for_node("glioma_cv_predictions")
    assert len(oof) == 8 and set(oof["fold"]) == {0, 1} and oof["dice"].between(0, 1).all()
    parent = oof.iloc[0]["cv_run_id"]
    children = client.search_runs(
        [run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'", max_results=10
    )
    assert sorted(c.data.tags["fold"] for c in children) == ["0", "1"]
    assert all(c.info.status == "FINISHED" and "sigma_idh" in c.data.metrics for c in children)

    ev = result.output_for_node("glioma_evaluation")
    assert set(ev["model"]) == {"GMMAS", "majority", evaluation.RADIOMICS_NAME}
    assert len(ev) == 3 * 4 and set(ev["task"]) == set(training.TASK_NAMES)

    ablation = result.output_for_node("glioma_ablation")
    assert list(ablation["variant"]) == ["gmmas", "equal_weights"]
    assert ablation.loc[0, "delta_score"] == 0 or math.isnan(ablation.loc[0, "delta_score"])

    missing = result.output_for_node("glioma_missing_modality")
    assert missing.iloc[0]["removed"] == "none" and len(missing) == 1 + 6  # 3 acquired sequences -> 6 subsets

    reports = result.output_for_node("glioma_reports")
    assert len(reports) == 8
    for r in reports.to_dict("records"):
        assert Path(r["markdown"]).read_text().startswith("#") and "<html" in Path(r["html"]).read_text().lower()
    logged = {Path(a.path).name for a in client.list_artifacts(parent, "reports")}
    assert {Path(r["markdown"]).name for r in reports.to_dict("records")} <= logged

    champ = result.output_for_node("glioma_champion").iloc[0]
    assert champ["champion_version"] == str(model["model_version"])
    alias = mlflow_store.get_version_by_alias(training.GLIOMA_MODEL_NAME, "champion")
    assert str(alias.version) == str(model["model_version"])


def test_glioma_job_and_weekly_schedule():
    from psqa_pipelines.definitions import defs

    job = defs.resolve_job_def("glioma_job")
    keys = {k.to_user_string() for k in job.asset_layer.selected_asset_keys}
    assert {"glioma_cases", "glioma_model", "glioma_cv_predictions", "glioma_reports", "glioma_champion"} <= keys
    assert job.tags.get("psqa/gpu") == "true"
    schedule = defs.resolve_schedule_def("glioma_schedule")
    assert schedule.job_name == "glioma_job" and schedule.default_status == dg.DefaultScheduleStatus.STOPPED
