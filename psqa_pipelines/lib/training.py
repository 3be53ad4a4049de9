"""One factory for every training asset: a model family describes itself in a ``TrainingAssetSpec``
and ``training_asset(spec)`` returns the Dagster asset.

What every training asset does (the factory's part):

1. builds the ml ``TrainConfig`` from the Launchpad ``Config``, the compute plan and the
   upstream inputs (``spec.train_config``), and a model folder ``<lake>/models/<model_subdir>/<run id>``;
2. starts an MLflow run tagged with the Dagster run id, asset key, partition, code version and
   git sha (``MlflowResource.start_run``) plus the family's tags (``spec.run_tags``);
3. calls the ml entry point ``spec.train(data_dir, model_dir, cfg, log=..., callbacks=[...])``, which
   returns a metrics dict and writes ``history.csv``, ``config.json`` and ``metrics.json``; each
   finished epoch goes to MLflow as it ends (``EpochMetricsToMlflow``: one metric per history
   column, ``step`` = epoch) with a short Dagster log line;
4. logs the params, the dataset inputs, the trainer's files, the plots and the model (state_dict
   + pyfunc wrapper, tensor signature, pinned pip requirements; ``MlflowResource.log_model``),
   registers it when ``spec.registered_model_name`` is set and tags the version (model folder,
   Dagster run, variant, monitor metric, the family's tags);
5. ends the run (``FAILED`` when anything above raised, then re-raises);
6. returns the one-row model table (``spec.output_columns``) with the MLflow run id, model id and
   version, and records the run id/URL, the version, the monitor metric, the history and the
   plots as materialization metadata.

What a family supplies (the spec's part): names, inputs and the ``Config`` class; how to build its
``TrainConfig`` and where its data is; its params, datasets, model signature, plots and
metadata; its row columns. Hooks that run after training receive a ``TrainingRun``.
"""

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd

from psqa_pipelines.constants import OWNER_ML
from psqa_pipelines.lib.metadata import md_png, md_table
from psqa_pipelines.resources import ComputeResource, MlflowResource, PsqaStorage
from psqa_pipelines.resources.compute import GPU_POOL, ComputePlan

Inputs = Mapping[str, pd.DataFrame]

# every training asset's output starts with these columns (the spec adds its own after them)
COMMON_ROW_COLUMNS = (
    "variant",
    "model_dir",
    "mlflow_run_id",
    "model_id",
    "registered_model",
    "model_version",
    "best_epoch",
    "epochs_run",
    "device",
)


@dataclass(frozen=True)
class TrainingRun:
    """A finished training, as the spec's post-training hooks see it."""

    variant: str
    inputs: Inputs  # the upstream assets' values, by input name
    train_config: Any  # the ml TrainConfig that was trained with
    model_dir: Path
    metrics: dict  # what the ml entry point returned (also metrics.json)
    history: pd.DataFrame  # history.csv: one row per epoch
    model_config: dict  # config.json written by the trainer
    monitor: str  # the metrics key of the monitored (best) validation value
    mlflow_run_id: str
    dagster_run_id: str


@dataclass(frozen=True)
class DatasetToLog:
    """One MLflow dataset input: a Parquet table (or a subset of its rows) and its role."""

    frame: pd.DataFrame
    parquet_path: Path
    name: str
    context: str  # training | validation | evaluation
    targets: str | None = None


@dataclass(frozen=True)
class ModelToLog:
    """What ``MlflowResource.log_model`` needs: the module, how to rebuild it, its tensor signature.

    ``input_specs``/``output_specs``: tensor name -> (numpy dtype, shape with -1 for free dims)."""

    model: Any  # torch.nn.Module
    class_path: str  # "package.module:callable" that rebuilds the module from ``kwargs``
    kwargs: dict
    input_specs: Mapping[str, tuple[str, tuple[int, ...]]]
    output_specs: Mapping[str, tuple[str, tuple[int, ...]]]
    metadata: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Plot:
    """A PNG logged as an MLflow artifact and shown inline in the materialization metadata."""

    artifact_file: str  # e.g. "plots/contribution_curves.png"
    metadata_key: str
    alt: str
    png: bytes


def _none(_run: TrainingRun) -> list:
    return []


def _empty(_run: TrainingRun) -> dict:
    return {}


@dataclass(frozen=True)
class TrainingAssetSpec:
    """Everything that differs between two training assets.

    Hooks called before training get ``(inputs)`` or ``(config, plan, inputs)``; hooks called
    after training get the ``TrainingRun``."""

    # -- the asset ------------------------------------------------------------------------------
    name: str
    variant: str
    group_name: str
    description: str
    config_class: type[dg.Config]  # the Launchpad settings
    ins: Mapping[str, dg.AssetIn]
    output_columns: Sequence[str]  # COMMON_ROW_COLUMNS and the family's own, in table order
    # -- training -------------------------------------------------------------------------------
    train: Callable[..., dict]  # ml entry point: train(data_dir, out_dir, cfg, log=..., callbacks=...)
    train_config: Callable[[dg.Config, ComputePlan, Inputs], Any]
    data_dir: Callable[[Inputs], str]
    model_subdir: str  # models land in <lake>/models/<model_subdir>/<dagster run id>
    monitor: Callable[[dict], str]  # metrics -> key of the best validation value
    # -- MLflow ---------------------------------------------------------------------------------
    run_tags: Callable[[Inputs], dict[str, str]]
    params: Callable[[TrainingRun], dict]
    datasets: Callable[[TrainingRun], list[DatasetToLog]]
    model: Callable[[TrainingRun], ModelToLog]
    registered_model_name: str | None = None  # None: the model is logged, not registered
    # the registered model's description in MLflow: what it predicts, inputs, training data, metrics
    model_description: str = ""
    version_tags: Callable[[TrainingRun], dict[str, str]] = _empty  # besides model_dir, run, variant, monitor
    monitor_format: str = ".4f"  # how the monitor value is written as a version tag
    artifacts: Sequence[str] = ("history.csv", "config.json", "metrics.json")  # model_dir files -> training/
    plots: Callable[[TrainingRun], list[Plot]] = _none
    # -- the output and its metadata ------------------------------------------------------------
    row: Callable[[TrainingRun], dict] = _empty  # the family's columns of the output row
    metric_metadata: Sequence[str] = ()  # metrics keys shown as float metadata when present
    extra_metadata: Callable[[TrainingRun], dict] = _empty
    history_columns: Sequence[str] = ("epoch", "train_loss", "val_")  # column prefixes of the history table
    history_rows: int = 12
    # -- Dagster attributes ---------------------------------------------------------------------
    kinds: frozenset[str] = frozenset({"pytorch", "mlflow"})
    owners: Sequence[str] = (OWNER_ML,)
    pool: str | None = GPU_POOL
    code_version: str = "1"

    @property
    def run_name(self) -> str:
        return f"train-{self.variant}"


def epoch_metrics(row: Mapping[str, Any], step_column: str = "epoch") -> dict[str, float]:
    """One history row as MLflow metrics: every numeric column except the step, NaN skipped."""
    out = {}
    for k, v in row.items():
        if k == step_column or isinstance(v, str) or v is None:
            continue
        try:
            value = float(v)
        except (TypeError, ValueError):
            continue
        if not math.isnan(value):
            out[k] = value
    return out


class EpochMetricsToMlflow:
    """Training callback (``on_epoch_end``): logs each finished epoch's history row to the MLflow
    run (``step`` = epoch) as the epoch ends. The engine's own epoch line already reaches the
    Dagster log, so no second event per epoch (one summary line at the end instead)."""

    def __init__(self, mlflow: MlflowResource, run_id: str) -> None:
        self.mlflow = mlflow
        self.run_id = run_id
        self.logged_epochs: set[int] = set()

    def on_epoch_end(self, epoch: int, row: dict) -> None:
        metrics = epoch_metrics(row)
        self.mlflow.log_metrics(self.run_id, metrics, step=int(epoch))
        self.logged_epochs.add(int(epoch))


def _log_unlogged_epochs(mlflow: MlflowResource, run_id: str, history: pd.DataFrame, logged: set[int]) -> None:
    """Epochs that finished before this process started (a resumed checkpoint) were not seen by the
    callback: log them from history.csv so the run holds the whole curve, each epoch once."""
    if "epoch" not in history.columns or history.empty:
        return
    missing = history[~history["epoch"].astype(int).isin(logged)]
    for _, row in missing.iterrows():
        mlflow.log_metrics(run_id, epoch_metrics(row.to_dict()), step=int(row["epoch"]))


def training_asset(spec: TrainingAssetSpec) -> dg.AssetsDefinition:
    """The Dagster asset that trains ``spec``'s model, tracks it in MLflow and returns its row."""
    config_class = spec.config_class

    @dg.asset(
        name=spec.name,
        ins=dict(spec.ins),
        group_name=spec.group_name,
        kinds=set(spec.kinds),
        owners=list(spec.owners),
        pool=spec.pool,
        code_version=spec.code_version,
        description=spec.description,
    )
    def _train(
        context: dg.AssetExecutionContext,
        config: config_class,
        storage: PsqaStorage,
        compute: ComputeResource,
        mlflow: MlflowResource,
        **inputs: pd.DataFrame,
    ) -> pd.DataFrame:
        return _run_training(spec, context, config, storage, compute, mlflow, inputs)

    return _train


def _run_training(
    spec: TrainingAssetSpec,
    context: dg.AssetExecutionContext,
    config: dg.Config,
    storage: PsqaStorage,
    compute: ComputeResource,
    mlflow: MlflowResource,
    inputs: Inputs,
) -> pd.DataFrame:
    import json

    plan = compute.plan()
    model_dir = storage.lake / "models" / spec.model_subdir / context.run.run_id
    cfg = spec.train_config(config, plan, inputs)
    run_id = mlflow.start_run(context, run_name=spec.run_name, tags=spec.run_tags(inputs))
    try:
        epochs = EpochMetricsToMlflow(mlflow, run_id)
        metrics = spec.train(spec.data_dir(inputs), model_dir, cfg, log=context.log.info, callbacks=[epochs])
        if not (model_dir / "model_best.pt").exists():
            raise dg.Failure(
                f"{spec.name}: training stopped ({metrics.get('stopped_by')}) before its first epoch was validated, "
                f"so there is no model to log; the checkpoint is in {model_dir}. Raise max_minutes."
            )
        history = pd.read_csv(model_dir / "history.csv")
        _log_unlogged_epochs(mlflow, run_id, history, epochs.logged_epochs)
        context.log.info(
            f"{len(history)} epochs of metrics in MLflow run {run_id} ({len(epochs.logged_epochs)} as they ended)"
        )
        run = TrainingRun(
            variant=spec.variant,
            inputs=inputs,
            train_config=cfg,
            model_dir=model_dir,
            metrics=metrics,
            history=history,
            model_config=json.loads((model_dir / "config.json").read_text()),
            monitor=spec.monitor(metrics),
            mlflow_run_id=run_id,
            dagster_run_id=context.run.run_id,
        )
        mlflow.log_params(run_id, spec.params(run))
        for ds in spec.datasets(run):
            mlflow.log_parquet_dataset(
                run_id, ds.frame, ds.parquet_path, name=ds.name, context=ds.context, targets=ds.targets
            )
        for name in spec.artifacts:
            mlflow.client().log_artifact(run_id, str(model_dir / name), artifact_path="training")
        plots = spec.plots(run)
        for plot in plots:
            mlflow.log_artifact_bytes(run_id, plot.png, plot.artifact_file)
        m = spec.model(run)
        info = mlflow.log_model(
            run_id,
            m.model,
            name="model",
            class_path=m.class_path,
            kwargs=m.kwargs,
            input_specs=dict(m.input_specs),
            output_specs=dict(m.output_specs),
            registered_model_name=spec.registered_model_name,
            metadata=m.metadata,
            model_description=spec.model_description,
            version_description=(
                f"Trained by Dagster run [{context.run.run_id[:8]}]({mlflow.dagster_run_url(context.run.run_id)}) "
                f"(asset `{spec.name}`, variant `{spec.variant}`): best {run.monitor} "
                f"{format(float(metrics[run.monitor]), spec.monitor_format)} at epoch {int(metrics['best_epoch'])} "
                f"of {int(metrics['epochs_run'])}; model folder `{model_dir}`."
            ),
        )
        version = str(info.registered_model_version or "")
        if version:
            client = mlflow.client()
            tags = {
                "model_dir": str(model_dir),
                **spec.version_tags(run),
                "dagster_run_id": context.run.run_id,
                "variant": spec.variant,
                run.monitor: format(float(metrics[run.monitor]), spec.monitor_format),
            }
            for k, v in tags.items():
                client.set_model_version_tag(spec.registered_model_name, version, k, v)
        mlflow.end_run(run_id)
    except Exception:
        mlflow.end_run(run_id, status="FAILED")
        raise
    row = {
        "variant": spec.variant,
        "model_dir": str(model_dir),
        "mlflow_run_id": run_id,
        "model_id": info.model_id,
        "registered_model": spec.registered_model_name or "",
        "model_version": version,
        "best_epoch": int(metrics["best_epoch"]),
        "epochs_run": int(metrics["epochs_run"]),
        "device": metrics["device_name"],
        **spec.row(run),
    }
    shown = [c for c in history.columns if c.startswith(tuple(spec.history_columns))]
    context.add_output_metadata(
        {
            "mlflow_run_id": run_id,
            "mlflow_run": dg.MetadataValue.url(mlflow.run_url(run_id)),
            **(
                {
                    "model_version": version,
                    "mlflow_model": dg.MetadataValue.url(mlflow.model_version_url(spec.registered_model_name, version)),
                }
                if version
                else {}
            ),
            run.monitor: float(metrics[run.monitor]),
            "best_epoch": int(metrics["best_epoch"]),
            "epochs_run": int(metrics["epochs_run"]),
            "stopped_by": metrics["stopped_by"],
            **{k: float(metrics[k]) for k in spec.metric_metadata if k in metrics},
            "device": metrics["device_name"],
            "amp": metrics["amp"],
            **spec.extra_metadata(run),
            "history": md_table(history[shown], max_rows=spec.history_rows),
            **{p.metadata_key: md_png(p.png, p.alt) for p in plots},
        }
    )
    return pd.DataFrame([row], columns=list(spec.output_columns))
