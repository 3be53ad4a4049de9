"""MLflow tracking/registry resource (explicit ``MlflowClient``, no fluent global run state).

* The tracking store defaults to SQLite under ``$PSQA_HOME/mlflow/mlflow.db`` with artifacts in
  ``$PSQA_HOME/mlflow/artifacts``. The store is created (migrated) **once**, under a file lock,
  before anything else touches it: several processes migrating a fresh SQLite store at the
  same time crash in alembic (orchestration notes §0.7).
* ``start_run`` tags every MLflow run with the Dagster run id, asset key, partition, code
  version and git sha, so lineage can be followed both ways (materializations record the
  MLflow run id and UI URL).
* ``log_parquet_dataset`` logs a Parquet table as an MLflow dataset input (digest, schema,
  ``file://`` source).
* ``log_model`` logs a torch model in the project's explicit format (state_dict + pyfunc
  wrapper, see ``mlflow_pyfunc``) with a tensor signature and pinned ``pip_requirements``, and
  optionally registers it; ``set_alias``/``get_version_by_alias`` handle promotion (aliases,
  never the deprecated stages).
"""

import contextlib
import io
import json
import os
import subprocess
import tempfile
import warnings
from pathlib import Path

import dagster as dg
from pydantic import Field

from psqa_pipelines.settings import (
    REPO_DIR,
    mlflow_artifact_root,
    mlflow_tracking_uri,
    mlflow_ui_url,
    quiet_mlflow_progress_bars,
)


def git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_DIR, capture_output=True, text=True, timeout=5, check=False
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def pinned_requirements() -> list[str]:
    """Exact versions of what the pyfunc wrapper needs at load time."""
    from importlib.metadata import version

    reqs = []
    for pkg in ("torch", "numpy", "pandas", "mlflow"):
        try:
            v = version(pkg).split("+")[0]
        except Exception:  # noqa: BLE001
            continue
        reqs.append(f"{pkg}=={v}")
    return reqs


@contextlib.contextmanager
def _quiet_mlflow():
    """While a model is logged: no artifact progress bars, no pickle-format warning (the wrapper
    is ours, loaded from the logged code), no "Successfully registered" / "Created version" prints
    (the asset's metadata and log line name the version). Errors still raise."""
    import logging

    import mlflow.utils.logging_utils as lu

    quiet_mlflow_progress_bars()
    logger = logging.getLogger("mlflow")
    level, stream = logger.level, lu.MLFLOW_LOGGING_STREAM
    logger.setLevel(logging.ERROR)
    lu.MLFLOW_LOGGING_STREAM = io.StringIO()
    try:
        yield
    finally:
        logger.setLevel(level)
        lu.MLFLOW_LOGGING_STREAM = stream


class MlflowResource(dg.ConfigurableResource):
    tracking_uri: str = Field(default_factory=mlflow_tracking_uri)
    registry_uri: str = Field(default="", description="defaults to the tracking URI")
    artifact_root: str = Field(default_factory=mlflow_artifact_root)
    experiment: str = Field(default="psqa")
    ui_url: str = Field(
        default_factory=mlflow_ui_url,
        description="the MLflow UI: `make dev` serves it (local profile), the tracking server's (team, cluster)",
    )
    dagster_ui_url: str = Field(
        default="http://127.0.0.1:3000", description="where `make dev` serves the Dagster UI (run links in MLflow)"
    )

    # -- store ---------------------------------------------------------------------------
    def _sqlite_path(self) -> Path | None:
        if self.tracking_uri.startswith("sqlite:///"):
            return Path(self.tracking_uri.removeprefix("sqlite:///"))
        return None

    def ensure_store(self) -> None:
        """Create/migrate the store once (file lock) and make sure the experiment exists."""
        from filelock import FileLock

        db = self._sqlite_path()
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
            Path(self.artifact_root).mkdir(parents=True, exist_ok=True)
            with FileLock(str(db) + ".init.lock", timeout=300):
                self._get_or_create_experiment(self.experiment)
        else:
            self._get_or_create_experiment(self.experiment)

    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.registry_uri or self.tracking_uri)

    def _get_or_create_experiment(self, name: str) -> str:
        client = self.client()
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        if self.tracking_uri.startswith(("http://", "https://")):
            location = None  # a tracking server: its proxied artifact store (mlflow-artifacts:/), shared by all
        elif "://" not in self.artifact_root:
            location = Path(self.artifact_root, name).resolve().as_uri()
        else:
            location = f"{self.artifact_root.rstrip('/')}/{name}"
        try:
            return client.create_experiment(name, artifact_location=location)
        except Exception:
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def experiment_id(self, name: str | None = None) -> str:
        self.ensure_store()
        return self._get_or_create_experiment(name or self.experiment)

    # -- runs ----------------------------------------------------------------------------
    def dagster_tags(self, context: dg.AssetExecutionContext | dg.OpExecutionContext | None) -> dict[str, str]:
        tags = {"git_sha": git_sha()}
        if context is None:
            return tags
        tags["dagster/run_id"] = context.run.run_id
        tags["dagster_run_id"] = context.run.run_id  # the tag dagster-mlflow used
        try:
            key = context.asset_key
            tags["dagster/asset_key"] = key.to_user_string()
            tags["dagster/code_version"] = str(context.assets_def.code_versions_by_key.get(key) or "")
        except Exception:  # noqa: BLE001 - op contexts have no asset key
            pass
        if context.has_partition_key:
            tags["dagster/partition_key"] = context.partition_key
        return tags

    def start_run(
        self, context=None, run_name: str = "", tags: dict | None = None, experiment: str | None = None
    ) -> str:
        exp_id = self.experiment_id(experiment)
        all_tags = {**self.dagster_tags(context), **(tags or {}), "mlflow.source.name": "psqa_pipelines"}
        if context is not None and "mlflow.note.content" not in all_tags:
            all_tags["mlflow.note.content"] = self.dagster_note(all_tags)
        run = self.client().create_run(exp_id, run_name=run_name or None, tags=all_tags)
        return run.info.run_id

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client().set_terminated(run_id, status=status)

    def log_params(self, run_id: str, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(str(k), str(v)[:6000]) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):
            self.client().log_batch(run_id, params=items[i : i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step) for k, v in sorted(metrics.items())]
        for i in range(0, len(items), 500):
            self.client().log_batch(run_id, metrics=items[i : i + 500])

    def log_history(self, run_id: str, history, step_column: str = "epoch") -> None:
        """A trainer's history.csv (one row per epoch) as per-step metrics (NaN cells skipped)."""
        import pandas as pd

        for _, row in history.iterrows():
            self.log_metrics(
                run_id,
                {k: float(v) for k, v in row.items() if k != step_column and pd.notna(v)},
                step=int(row[step_column]),
            )

    def log_artifact_bytes(self, run_id: str, data: bytes, artifact_file: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(artifact_file).name
            path.write_bytes(data)
            parent = str(Path(artifact_file).parent)
            self.client().log_artifact(run_id, str(path), artifact_path=None if parent == "." else parent)

    def log_parquet_dataset(
        self,
        run_id: str,
        df,
        parquet_path: str | os.PathLike,
        name: str,
        context: str = "training",
        targets: str | None = None,
    ) -> str:
        """Log a Parquet table as a dataset input; returns the dataset digest."""
        import mlflow.data
        from mlflow.entities import DatasetInput, InputTag

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = mlflow.data.from_pandas(df, source=Path(parquet_path).resolve().as_uri(), name=name, targets=targets)
            entity = ds._to_mlflow_entity()
        self.client().log_inputs(
            run_id, datasets=[DatasetInput(entity, tags=[InputTag("mlflow.data.context", context)])]
        )
        return ds.digest

    # -- models --------------------------------------------------------------------------
    def log_model(
        self,
        run_id: str,
        model,
        *,
        name: str,
        class_path: str,
        kwargs: dict,
        input_specs: dict[str, tuple[str, tuple[int, ...]]],
        output_specs: dict[str, tuple[str, tuple[int, ...]]],
        registered_model_name: str | None = None,
        metadata: dict | None = None,
        model_description: str = "",
        version_description: str = "",
    ):
        """Log ``model`` (state_dict + pyfunc wrapper) with a tensor signature.

        ``input_specs``/``output_specs`` map tensor names to (numpy dtype, shape with -1 for
        free dimensions). When registered, ``model_description`` (what it predicts, inputs,
        training data, metrics) becomes the registered model's description and
        ``version_description`` the new version's. Returns mlflow's ModelInfo (``model_id``,
        ``registered_model_version``).
        """
        import mlflow
        import numpy as np
        import torch
        from mlflow.models.signature import ModelSignature
        from mlflow.types.schema import Schema, TensorSpec

        import ml
        from psqa_pipelines.resources import mlflow_pyfunc

        signature = ModelSignature(
            inputs=Schema([TensorSpec(np.dtype(d), s, n) for n, (d, s) in input_specs.items()]),
            outputs=Schema([TensorSpec(np.dtype(d), s, n) for n, (d, s) in output_specs.items()]),
        )
        self.ensure_store()
        with tempfile.TemporaryDirectory() as tmp:
            sd_path = Path(tmp) / "state_dict.pt"
            torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, sd_path)
            cfg_path = Path(tmp) / "model_config.json"
            cfg_path.write_text(
                json.dumps({"class_path": class_path, "kwargs": kwargs, "input_names": list(input_specs)}, indent=2)
            )
            mlflow.set_tracking_uri(self.tracking_uri)
            mlflow.set_registry_uri(self.registry_uri or self.tracking_uri)
            client = self.client()
            was_running = client.get_run(run_id).info.status == "RUNNING"
            # the pyfunc flavour logs into the *active* run: activate ours just for this call
            with warnings.catch_warnings(), _quiet_mlflow(), mlflow.start_run(run_id=run_id):
                warnings.simplefilter("ignore")
                info = mlflow.pyfunc.log_model(
                    name=name,
                    python_model=mlflow_pyfunc.TorchStateDictModel(),
                    artifacts={"state_dict": str(sd_path), "model_config": str(cfg_path)},
                    code_paths=[str(Path(ml.__file__).parent), mlflow_pyfunc.__file__],
                    signature=signature,
                    pip_requirements=pinned_requirements(),
                    registered_model_name=registered_model_name,
                    metadata={"format": "torch-state_dict+pyfunc", **(metadata or {})},
                )
            if was_running:  # leaving the context finished the run; the caller still owns it
                client.update_run(run_id, status="RUNNING")
        if registered_model_name and info.registered_model_version:
            if model_description:
                client.update_registered_model(registered_model_name, description=model_description)
            if version_description:
                client.update_model_version(
                    registered_model_name, str(info.registered_model_version), description=version_description
                )
        return info

    def set_alias(self, model_name: str, alias: str, version: str | int) -> None:
        self.client().set_registered_model_alias(model_name, alias, str(version))

    def get_version_by_alias(self, model_name: str, alias: str):
        try:
            return self.client().get_model_version_by_alias(model_name, alias)
        except Exception:  # noqa: BLE001 - no such alias / model
            return None

    # -- links ---------------------------------------------------------------------------
    def dagster_run_url(self, run_id: str) -> str:
        return f"{self.dagster_ui_url.rstrip('/')}/runs/{run_id}"

    def dagster_note(self, tags: dict[str, str]) -> str:
        """The MLflow run description (Markdown, ``mlflow.note.content``): a link back to the Dagster
        run that produced the run, with the asset and partition."""
        run_id = tags["dagster/run_id"]
        lines = [f"Produced by Dagster run [{run_id[:8]}]({self.dagster_run_url(run_id)})"]
        if tags.get("dagster/asset_key"):
            lines[0] += f", asset `{tags['dagster/asset_key']}`"
        if tags.get("dagster/partition_key"):
            lines[0] += f", partition `{tags['dagster/partition_key']}`"
        lines.append(f"git {tags.get('git_sha', '')[:12]}")
        return "\n\n".join(lines) + "\n"

    def run_url(self, run_id: str, experiment_id: str | None = None) -> str:
        exp = experiment_id or self.experiment_id()
        return f"{self.ui_url.rstrip('/')}/#/experiments/{exp}/runs/{run_id}"

    def model_version_url(self, name: str, version: str | int) -> str:
        return f"{self.ui_url.rstrip('/')}/#/models/{name}/versions/{version}"
