"""MlflowResource against a real SQLite store: safe creation, lineage tags, datasets, a
registered model in the explicit format, aliases, and loading it back."""

import multiprocessing as mp

import dagster as dg
import numpy as np
import pandas as pd
import torch

from ml.utils.io import write_parquet_atomic
from psqa_pipelines.resources import MlflowResource
from psqa_pipelines_tests.tiny_models import TwoInputNet


def _create(args):
    uri, art = args
    MlflowResource(tracking_uri=uri, artifact_root=art, experiment="race").ensure_store()
    return True


def test_concurrent_first_use_of_a_fresh_store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'fresh.db'}"
    ctx = mp.get_context("spawn")
    with ctx.Pool(3) as pool:
        assert pool.map(_create, [(uri, str(tmp_path / "art"))] * 3) == [True] * 3
    assert MlflowResource(tracking_uri=uri).client().get_experiment_by_name("race") is not None


def test_training_like_asset_logs_lineage_and_registers_model(tmp_path, mlflow_store, capfd):
    table = pd.DataFrame({"plan": ["a", "b", "c"], "mu": [500.0, 620.0, 710.0], "gpr": [97.1, 95.2, 88.0]})
    parquet = write_parquet_atomic(tmp_path / "features.parquet", table)

    @dg.asset(code_version="7")
    def tiny_training(context: dg.AssetExecutionContext, mlflow: MlflowResource) -> dg.MaterializeResult:
        torch.manual_seed(0)
        model = TwoInputNet()
        run_id = mlflow.start_run(context, run_name="tiny")
        mlflow.log_params(run_id, {"hidden": 8, "lr": 1e-3})
        mlflow.log_metrics(run_id, {"val_mae": 1.5}, step=1)
        digest = mlflow.log_parquet_dataset(run_id, table, parquet, name="plan_features", targets="gpr")
        info = mlflow.log_model(
            run_id,
            model,
            name="model",
            class_path="psqa_pipelines_tests.tiny_models:TwoInputNet",
            kwargs={"n_tab": 3, "hidden": 8},
            input_specs={"image": ("float32", (-1, 1, 16, 16)), "table": ("float32", (-1, 3))},
            output_specs={"gpr": ("float32", (-1,)), "dd_map": ("float32", (-1, 1, 16, 16))},
            registered_model_name="tiny-test-model",
            model_description="Tiny two-input test model: image + table -> gpr, dd_map.",
            version_description="trained by the test",
        )
        mlflow.set_alias("tiny-test-model", "champion", info.registered_model_version)
        mlflow.end_run(run_id)
        return dg.MaterializeResult(
            metadata={
                "mlflow_run_id": run_id,
                "mlflow_run_url": dg.MetadataValue.url(mlflow.run_url(run_id)),
                "model_version": str(info.registered_model_version),
                "dataset_digest": digest,
            }
        )

    with dg.instance_for_test() as instance:
        result = dg.materialize([tiny_training], resources={"mlflow": mlflow_store}, instance=instance)
    md = result.asset_materializations_for_node("tiny_training")[0].metadata
    # logging a model is quiet on the console: no progress bars, pickle warnings or registry prints
    err = capfd.readouterr().err
    for noise in ("Downloading artifacts", "Uploading artifacts", "CloudPickle", "Successfully registered"):
        assert noise not in err, noise
    run_id = md["mlflow_run_id"].value
    run = mlflow_store.client().get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["dagster/run_id"] == result.run_id
    assert run.data.tags["dagster/asset_key"] == "tiny_training"
    assert run.data.tags["dagster/code_version"] == "7"
    assert len(run.data.tags["git_sha"]) in (7, 40) or run.data.tags["git_sha"] == "unknown"
    assert run.data.params["hidden"] == "8" and run.data.metrics["val_mae"] == 1.5
    # the MLflow run description links back to the Dagster run
    note = run.data.tags["mlflow.note.content"]
    assert f"]({mlflow_store.dagster_ui_url}/runs/{result.run_id})" in note and "`tiny_training`" in note
    registered = mlflow_store.client().get_registered_model("tiny-test-model")
    assert registered.description.startswith("Tiny two-input test model")
    inputs = run.inputs.dataset_inputs
    assert [(d.dataset.name, d.dataset.digest) for d in inputs] == [("plan_features", md["dataset_digest"].value)]
    assert "features.parquet" in inputs[0].dataset.source
    assert {t.key: t.value for t in inputs[0].tags}["mlflow.data.context"] == "training"

    version = mlflow_store.get_version_by_alias("tiny-test-model", "champion")
    assert version is not None and str(version.version) == md["model_version"].value
    assert version.description == "trained by the test"
    assert version.run_id == run_id

    import mlflow.pyfunc

    loaded = mlflow.pyfunc.load_model("models:/tiny-test-model@champion")
    sig = loaded.metadata.signature
    assert [s.name for s in sig.inputs.inputs] == ["image", "table"]
    rng = np.random.default_rng(0)
    x = {
        "image": rng.normal(size=(2, 1, 16, 16)).astype(np.float32),
        "table": rng.normal(size=(2, 3)).astype(np.float32),
    }
    out = loaded.predict(x)
    torch.manual_seed(0)
    ref = TwoInputNet()
    with torch.no_grad():
        expected = ref(torch.from_numpy(x["image"]), torch.from_numpy(x["table"]))
    assert np.allclose(out["gpr"], expected["gpr"].numpy(), atol=1e-6)
    assert out["dd_map"].shape == (2, 1, 16, 16)
    assert loaded.metadata.metadata["format"] == "torch-state_dict+pyfunc"


def test_model_wrapper_imports_without_warnings():
    """The pyfunc wrapper is imported by every training run and model load: no MLflow type-hint
    warning on the console (a fresh interpreter: the warning fires once, at class definition)."""
    import subprocess
    import sys

    code = (
        "import warnings, mlflow.pyfunc\n"
        "warnings.simplefilter('error')\n"
        "import psqa_pipelines.resources.mlflow_pyfunc\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "Add type hints" not in res.stderr, res.stderr[-2000:]
