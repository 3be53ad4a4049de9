"""The PSQA vertical through Dagster: simulated QA programme in the inbox -> sensor -> plan QA
assets -> split/pack -> BMMQA + baselines -> evaluation, Shapley report -> champion promotion;
then a second round of plans (schedule with the new-plans condition) and a challenger that must
not be promoted. Checks lineage in MLflow and the champion alias."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from ml.psqa.train import VARIANTS
from psqa_pipelines_tests.conftest import PSQA_TINY_TRAINING

ROUND1, ROUND2 = 20, 8
TINY = PSQA_TINY_TRAINING


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    from ml.psqa.simulator import simulate

    r1, r2 = tmp_path_factory.mktemp("qa_round1"), tmp_path_factory.mktemp("qa_round2")
    s1 = simulate(r1, ROUND1, seed=21, batch=0, workers=2)
    s2 = simulate(r2, ROUND2, seed=21, batch=1, workers=2)
    return (r1, s1), (r2, s2)


def _copy_into(src, dst) -> None:
    shutil.copytree(src, dst, dirs_exist_ok=True)


def _train_config(variants, **extra) -> dict:
    return {"ops": {f"psqa_model_{v}": {"config": {**TINY, **extra}} for v in variants}}


def _mat_metadata(instance, key: str) -> dict:
    ev = instance.get_latest_materialization_event(dg.AssetKey(key))
    return {k: v.value for k, v in ev.asset_materialization.metadata.items()}


def test_psqa_two_rounds_lineage_and_champion(simulated, storage, tmp_path, monkeypatch):
    from psqa_pipelines.constants import CHAMPION_ALIAS, PSQA_MODEL_NAME
    from psqa_pipelines.definitions import build_defs, build_resources
    from psqa_pipelines.defs.psqa.schedules import psqa_retrain_schedule
    from psqa_pipelines.resources import MlflowResource
    from psqa_pipelines.runner import run_inbox_cycle

    (r1, s1), (r2, _s2) = simulated
    mlflow = MlflowResource(
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        artifact_root=str(tmp_path / "artifacts"),
        experiment="psqa-e2e",
    )
    mlflow.ensure_store()
    defs = build_defs(build_resources(storage, mlflow=mlflow))
    (tmp_path / "dagster").mkdir()
    instance = dg.DagsterInstance.local_temp(str(tmp_path / "dagster"))  # schedules need an instance ref
    storage.ensure_dirs()

    # ---- round 1: the sensor ingests the plans and the clinic's QA export --------------------
    _copy_into(r1, storage.inbox)
    rep = run_inbox_cycle(defs, instance, raise_on_error=True)
    assert len(rep.studies) == ROUND1 and not rep.failed and rep.qa_results_runs == 1
    # every QA study carries an RT Plan: its own `plans` partition, plan-QA run after the ingestion
    assert sorted(instance.get_dynamic_partitions("plans")) == sorted(rep.studies) == sorted(rep.plans)
    assert instance.get_materialized_partitions(dg.AssetKey("plan_complexity")) == set(rep.studies)
    labels = pd.read_parquet(storage.tables / "psqa_labels.parquet")
    features = pd.read_parquet(storage.tables / "psqa_features.parquet")
    assert len(labels) == ROUND1 and len(features) == ROUND1
    assert features["mcs"].between(0, 1).all() and (features["total_mu"] > 0).all()
    # the machine identity: a de-identified treatment-machine pseudonym and the QA device's model
    assert features["treatment_machine"].str.startswith("M-").all() and (features["qa_device"] != "").all()
    # the QA device: its model, and its serial only as a keyed pseudonym (never the serial itself)
    assert features["qa_device"].str.contains(" D-").all() and not features["qa_device"].str.contains(r"SN\d").any()
    linacs = {str(s["linac"]) for s in s1}
    assert features["treatment_machine"].nunique() == len(linacs)
    # our gamma labels reproduce the clinic's composite GPRs (same planes, CSV rounded to 0.1 %)
    agreement = pd.read_parquet(storage.tables / "qa_label_agreement.parquet")
    assert len(agreement) == 3 * ROUND1 and agreement["diff_pp"].abs().max() <= 0.06
    # no PHI of the simulated patients in the de-identified tables
    planted = {str(s["patient_id"]) for s in s1}
    for name in ("psqa_labels", "psqa_features", "qa_results_table", "qa_label_agreement"):
        text = pd.read_parquet(storage.tables / f"{name}.parquet").to_csv()
        assert not any(p in text for p in planted), name

    monkeypatch.setenv("PSQA_RETRAIN_MIN_NEW_PLANS", str(ROUND2))
    ctx = dg.build_schedule_context(instance=instance)
    first = psqa_retrain_schedule(ctx)
    assert isinstance(first, dg.RunRequest)  # nothing trained yet: every plan is new

    res = defs.resolve_job_def("train_psqa").execute_in_process(
        instance=instance, run_config=_train_config(VARIANTS), raise_on_error=True
    )
    assert res.success
    bm1 = res.output_for_node("psqa_model_bmmqa").iloc[0]
    assert bm1["model_version"] == "1" and bm1["n_plans"] == ROUND1
    champion = mlflow.get_version_by_alias(PSQA_MODEL_NAME, CHAMPION_ALIAS)
    assert champion is not None and str(champion.version) == "1"
    # lineage: registered version -> MLflow run -> Dagster run, pack digest, dataset inputs
    client = mlflow.client()
    run = client.get_run(bm1["mlflow_run_id"])
    assert run.data.tags["dagster/run_id"] == res.run_id
    assert run.data.tags["psqa/pack_digest"] == bm1["pack_digest"]
    assert champion.run_id == bm1["mlflow_run_id"] and champion.tags["model_dir"] == bm1["model_dir"]
    assert {d.dataset.name for d in run.inputs.dataset_inputs} >= {f"psqa-pack-{bm1['pack_digest']}"}
    assert "val_mae_gpr_2_2" in run.data.metrics and "test_shapley_gpr_image" in run.data.metrics
    arts = {a.path for a in client.list_artifacts(bm1["mlflow_run_id"], "shapley")}
    assert {"shapley/contributions.png", "shapley/summary.md"} <= arts
    # the pack's tabular modality holds the machine one-hot columns
    meta = json.loads((Path(bm1["model_dir"]) / "tab_scaler.json").read_text())
    assert sum(c.startswith("treatment_machine=") for c in meta["columns"]) == len(linacs)
    # evaluation: one row per variant + the mean and median predictors, linked to the model version
    ev = res.output_for_node("psqa_evaluation")
    assert set(ev["model"]) == set(VARIANTS) | {"mean predictor", "median predictor"}
    assert np.isfinite(ev.loc[ev["model"] == "bmmqa", "MAE 2%/2mm"]).all()
    version = client.get_model_version(PSQA_MODEL_NAME, "1")
    assert version.tags["evaluation_run"] == ev["evaluation_run_id"].iloc[0] and "test_mae_2_2" in version.tags
    shap = res.output_for_node("psqa_shapley_report")
    assert set(shap["task"]) == {"gpr", "dd"} and shap["plan_key"].nunique() == ROUND1
    split1 = pd.read_parquet(storage.tables / "psqa_split.parquet")
    assert set(split1["split"]) == {"train", "val", "test"}

    assert isinstance(psqa_retrain_schedule(ctx), dg.SkipReason)  # no new plans since training

    # ---- round 2: new plans arrive; the schedule's condition is met --------------------------
    _copy_into(r2, storage.inbox)
    rep2 = run_inbox_cycle(defs, instance, cursor=rep.cursor, raise_on_error=True)
    assert len(rep2.studies) == ROUND2 and rep2.qa_results_runs == 1
    req = psqa_retrain_schedule(dg.build_schedule_context(instance=instance))
    assert isinstance(req, dg.RunRequest) and req.tags["psqa/new_plans"] == str(ROUND2)
    res2 = defs.resolve_job_def("retrain_bmmqa").execute_in_process(
        instance=instance, run_config=_train_config(["bmmqa"]), tags=req.tags, raise_on_error=False
    )
    split2 = pd.read_parquet(storage.tables / "psqa_split.parquet")
    assert len(split2) == ROUND1 + ROUND2
    kept = split2.set_index("plan_key").loc[split1["plan_key"], "split"]
    assert (kept.to_numpy() == split1["split"].to_numpy()).all()  # the fixed test split never moves
    bm2 = res2.output_for_node("psqa_model_bmmqa").iloc[0]
    cmp2 = res2.output_for_node("psqa_challenger_eval").iloc[0]
    assert bm2["model_version"] == "2" and bm2["n_plans"] == ROUND1 + ROUND2
    assert cmp2["champion_version"] == "1" and cmp2["challenger_version"] == "2"
    expected = "2" if cmp2["challenger_mae_2_2"] < cmp2["champion_mae_2_2"] else "1"
    assert res2.success == (expected == "2")
    assert str(mlflow.get_version_by_alias(PSQA_MODEL_NAME, CHAMPION_ALIAS).version) == expected

    # ---- round 3: a challenger that cannot win (impossible margin) is blocked ------------------
    before = str(mlflow.get_version_by_alias(PSQA_MODEL_NAME, CHAMPION_ALIAS).version)
    res3 = defs.resolve_job_def("retrain_bmmqa").execute_in_process(
        instance=instance,
        raise_on_error=False,
        run_config={
            **_train_config(["bmmqa"]),
            "ops": {**_train_config(["bmmqa"])["ops"], "psqa_challenger_eval": {"config": {"margin_pp": 1000.0}}},
        },
    )
    assert not res3.success
    checks = res3.get_asset_check_evaluations()
    assert [c.passed for c in checks if c.check_name == "challenger_beats_champion"] == [False]
    assert "psqa_champion" not in {m.asset_key.to_user_string() for m in res3.get_asset_materialization_events()}
    assert str(mlflow.get_version_by_alias(PSQA_MODEL_NAME, CHAMPION_ALIAS).version) == before
    assert client.get_model_version(PSQA_MODEL_NAME, "3").tags["dagster_run_id"] == res3.run_id
