"""The training-asset factory with a third, tiny model family defined only by a spec: a small
real torch training loop that honours the ml entry-point contract (returns metrics, writes
history.csv / config.json / metrics.json, calls ``on_epoch_end``). Checks per-epoch MLflow metrics
(each epoch once), run and version tags, the output row, FAILED runs, and resumed histories."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
import torch

from psqa_pipelines.lib.training import (
    COMMON_ROW_COLUMNS,
    DatasetToLog,
    ModelToLog,
    TrainingAssetSpec,
    TrainingRun,
    training_asset,
)
from psqa_pipelines.resources import ComputeResource, LakeParquetIOManager
from psqa_pipelines_tests.tiny_models import TwoInputNet

ROW_COLUMNS = [*COMMON_ROW_COLUMNS, "data_digest", "best_val_loss"]


class TinySettings(dg.Config):
    epochs: int = 3
    fail_after: int = -1  # raise after this epoch (-1: never)
    pretend_resumed: int = 0  # epochs already in history.csv from an earlier process (not reported live)
    budget_spent: bool = False  # stop like the engine does when the budget ends inside the first epoch


def tiny_train(data_dir, out_dir, cfg: dict, log=print, callbacks=None) -> dict:
    """Fits TwoInputNet's GPR head to a small table for ``cfg["epochs"]`` epochs."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = pd.read_parquet(Path(data_dir) / "table.parquet")
    if cfg.get("budget_spent"):
        pd.DataFrame(columns=["epoch"]).to_csv(out / "history.csv", index=False)
        return {"best_val_loss": None, "best_epoch": -1, "epochs_run": 0, "stopped_by": "max_minutes"}
    torch.manual_seed(0)
    model = TwoInputNet(n_tab=3)
    x_tab = torch.tensor(table[["a", "b", "c"]].to_numpy(), dtype=torch.float32)
    x_img = torch.zeros(len(table), 1, 8, 8)
    y = torch.tensor(table["y"].to_numpy(), dtype=torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    history = [{"epoch": e, "train_loss": 9.0, "val_loss": 9.0} for e in range(cfg["pretend_resumed"])]
    for epoch in range(cfg["pretend_resumed"], cfg["epochs"]):
        loss = torch.nn.functional.mse_loss(model(x_img, x_tab)["gpr"], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            val = float(torch.nn.functional.mse_loss(model(x_img, x_tab)["gpr"], y))
        row = {"epoch": epoch, "train_loss": float(loss.detach()), "val_loss": val, "note": "text is not a metric"}
        history.append(row)
        log(f"epoch {epoch} val_loss={val:.4g}")
        for cb in callbacks or []:
            cb.on_epoch_end(epoch, dict(row))
        if epoch == cfg["fail_after"]:
            raise RuntimeError("tiny trainer failed on purpose")
    torch.save(model.state_dict(), out / "model_best.pt")
    pd.DataFrame(history).to_csv(out / "history.csv", index=False)
    (out / "config.json").write_text(json.dumps({"model": {"n_tab": 3, "hidden": 8}, "train": cfg}))
    best = min(history, key=lambda h: h["val_loss"])
    metrics = {
        "best_val_loss": best["val_loss"],
        "best_epoch": best["epoch"],
        "epochs_run": len(history),
        "stopped_by": "epochs",
        "device_name": "cpu",
        "amp": "off",
        "samples_per_s": 1.0,
    }
    (out / "metrics.json").write_text(json.dumps(metrics))
    return metrics


def tiny_spec(registered: str | None) -> TrainingAssetSpec:
    def model(run: TrainingRun) -> ModelToLog:
        net = TwoInputNet(**run.model_config["model"])
        net.load_state_dict(torch.load(run.model_dir / "model_best.pt"))
        return ModelToLog(
            net,
            "psqa_pipelines_tests.tiny_models:TwoInputNet",
            run.model_config["model"],
            input_specs={"image": ("float32", (-1, 1, 8, 8)), "table": ("float32", (-1, 3))},
            output_specs={"gpr": ("float32", (-1,)), "dd_map": ("float32", (-1, 1, 8, 8))},
            metadata={"family": "tiny"},
        )

    def data(inputs) -> pd.Series:
        return inputs["tiny_data"].iloc[0]

    return TrainingAssetSpec(
        name="tiny_model",
        variant="tiny",
        group_name="tiny_training",
        description="A tiny family.",
        config_class=TinySettings,
        ins={"tiny_data": dg.AssetIn()},
        output_columns=ROW_COLUMNS,
        train=tiny_train,
        train_config=lambda config, plan, inputs: {
            "epochs": config.epochs,
            "fail_after": config.fail_after,
            "pretend_resumed": config.pretend_resumed,
            "budget_spent": config.budget_spent,
            "device": plan.device,
        },
        data_dir=lambda inputs: data(inputs)["data_dir"],
        model_subdir="tiny/tiny",
        monitor=lambda metrics: "best_val_loss",
        run_tags=lambda inputs: {"tiny/digest": data(inputs)["digest"]},
        params=lambda run: {
            **{f"train.{k}": v for k, v in run.train_config.items()},
            "digest": data(run.inputs)["digest"],
        },
        datasets=lambda run: [
            DatasetToLog(
                pd.read_parquet(Path(data(run.inputs)["data_dir"]) / "table.parquet"),
                Path(data(run.inputs)["data_dir"]) / "table.parquet",
                "tiny-table",
                "training",
                targets="y",
            )
        ],
        model=model,
        registered_model_name=registered,
        version_tags=lambda run: {"data_digest": data(run.inputs)["digest"]},
        row=lambda run: {"data_digest": data(run.inputs)["digest"], "best_val_loss": run.metrics["best_val_loss"]},
        metric_metadata=("samples_per_s",),
    )


@pytest.fixture
def tiny_data_asset(tmp_path):
    data_dir = tmp_path / "tiny_data"
    data_dir.mkdir()
    pd.DataFrame(
        {"a": [0.1, 0.5, 0.9, 0.3], "b": [1.0, 0.0, 1.0, 0.5], "c": [0.2, 0.2, 0.7, 0.1], "y": [0.5, 0.1, 0.9, 0.3]}
    ).to_parquet(data_dir / "table.parquet")

    @dg.asset(name="tiny_data")
    def tiny_data() -> pd.DataFrame:
        return pd.DataFrame([{"data_dir": str(data_dir), "digest": "d1g3st"}])

    return tiny_data


def _materialize(spec, data_asset, storage, mlflow_store, instance, **config):
    resources = {
        "storage": storage,
        "compute": ComputeResource(device="cpu"),
        "mlflow": mlflow_store,
        "io_manager": LakeParquetIOManager(storage=storage),
    }
    return dg.materialize(
        [data_asset, training_asset(spec)],
        resources=resources,
        instance=instance,
        run_config={"ops": {"tiny_model": {"config": config}}},
        raise_on_error=False,
    )


def test_a_spec_is_enough_for_a_new_family(tiny_data_asset, storage, mlflow_store, instance):
    result = _materialize(tiny_spec("tiny-factory-model"), tiny_data_asset, storage, mlflow_store, instance, epochs=3)
    assert result.success
    row = result.output_for_node("tiny_model")
    assert list(row.columns) == ROW_COLUMNS and len(row) == 1
    r = row.iloc[0]
    assert r["variant"] == "tiny" and r["registered_model"] == "tiny-factory-model" and r["model_version"] == "1"
    assert Path(r["model_dir"]) == storage.lake / "models" / "tiny" / "tiny" / result.run_id

    client = mlflow_store.client()
    run = client.get_run(r["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "train-tiny"
    assert run.data.tags["dagster_run_id"] == result.run_id and run.data.tags["dagster/asset_key"] == "tiny_model"
    assert run.data.tags["tiny/digest"] == "d1g3st" and run.data.params["train.epochs"] == "3"
    # each epoch logged once, live, at its own step; text columns are not metrics
    for key in ("val_loss", "train_loss"):
        steps = [m.step for m in client.get_metric_history(r["mlflow_run_id"], key)]
        assert sorted(steps) == [0, 1, 2], (key, steps)
    assert "note" not in run.data.metrics
    assert {d.dataset.name for d in run.inputs.dataset_inputs} == {"tiny-table"}
    arts = {a.path for a in client.list_artifacts(r["mlflow_run_id"], "training")}
    assert arts == {"training/history.csv", "training/config.json", "training/metrics.json"}

    version = client.get_model_version("tiny-factory-model", "1")
    assert version.run_id == r["mlflow_run_id"]
    assert version.tags["dagster_run_id"] == result.run_id and version.tags["variant"] == "tiny"
    assert version.tags["data_digest"] == "d1g3st" and version.tags["model_dir"] == r["model_dir"]
    assert version.tags["best_val_loss"] == f"{r['best_val_loss']:.4f}"

    md = result.asset_materializations_for_node("tiny_model")[0].metadata
    assert md["mlflow_run_id"].value == r["mlflow_run_id"] and md["model_version"].value == "1"
    assert r["mlflow_run_id"] in md["mlflow_run"].value and "history" in md and md["samples_per_s"].value == 1.0
    logs = [e.message for e in instance.all_logs(result.run_id) if e.message]
    assert any(f"3 epochs of metrics in MLflow run {r['mlflow_run_id']} (3 as they ended)" in m for m in logs)


def test_unregistered_model_and_resumed_history(tiny_data_asset, storage, mlflow_store, instance):
    """Epochs run before a resume are not reported live: they come from history.csv, once."""
    result = _materialize(
        tiny_spec(None), tiny_data_asset, storage, mlflow_store, instance, epochs=4, pretend_resumed=2
    )
    assert result.success
    r = result.output_for_node("tiny_model").iloc[0]
    assert r["registered_model"] == "" and r["model_version"] == ""
    steps = [m.step for m in mlflow_store.client().get_metric_history(r["mlflow_run_id"], "val_loss")]
    assert sorted(steps) == [0, 1, 2, 3]
    md = result.asset_materializations_for_node("tiny_model")[0].metadata
    assert "model_version" not in md and "mlflow_model" not in md


def test_a_failing_training_ends_its_run_as_failed(tiny_data_asset, storage, mlflow_store, instance):
    result = _materialize(
        tiny_spec("tiny-failing-model"), tiny_data_asset, storage, mlflow_store, instance, epochs=3, fail_after=1
    )
    assert not result.success
    client = mlflow_store.client()
    exp = client.get_experiment_by_name(mlflow_store.experiment)
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.dagster_run_id = '{result.run_id}'")
    assert [x.info.status for x in runs] == ["FAILED"]
    assert sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "val_loss")) == [0, 1]


def test_a_training_stopped_before_its_first_epoch_fails_clearly(tiny_data_asset, storage, mlflow_store, instance):
    result = _materialize(
        tiny_spec("tiny-budget-model"), tiny_data_asset, storage, mlflow_store, instance, budget_spent=True
    )
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert "before its first epoch was validated" in str(failure.event_specific_data.error.message)
    exp = mlflow_store.client().get_experiment_by_name(mlflow_store.experiment)
    runs = mlflow_store.client().search_runs(
        [exp.experiment_id], filter_string=f"tags.dagster_run_id = '{result.run_id}'"
    )
    assert [x.info.status for x in runs] == ["FAILED"]
