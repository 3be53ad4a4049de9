"""One training asset per contour + dose model (GPU pool), each an MLflow run and a registered model.

``ml.contour_dose.train.train`` does the work (the same code as ``python -m ml contour-dose
train`` on a GPU node). Hyper-parameters are a ``Config`` editable in the Launchpad; each
model is registered as ``contour-dose-<variant>`` with tags linking the Dagster run, the
cache digest and the model directory. Seq-Automated takes the contour-only model as input.
"""

import json
from pathlib import Path

import dagster as dg
import pandas as pd
from pydantic import Field

from ml.contour_dose.variants import MODEL_NAMES, VARIANTS
from psqa_pipelines.constants import CONTOUR_DOSE_MODEL_PREFIX, CONTOUR_DOSE_TRAINING, OWNER_ML
from psqa_pipelines.lib.metadata import md_table
from psqa_pipelines.resources import ComputeResource, MlflowResource, PsqaStorage
from psqa_pipelines.resources.compute import GPU_POOL

MODEL_ROW_COLUMNS = ["variant", "model_dir", "mlflow_run_id", "model_id", "registered_model", "model_version",
                     "cache_digest", "best_epoch", "best_val_loss", "epochs_run", "train_slices_per_s", "device"]


class ContourDoseTrainSettings(dg.Config):
    epochs: int = Field(default=100, description="maximum epochs (spec [I]: 100)")
    steps_per_epoch: int | None = Field(default=None, description="None: one pass over the training slices")
    batch_size: int = Field(default=8, description="slices per batch (paper: 8 on OpenKBP)")
    lr: float = Field(default=1e-4, description="Adam learning rate (paper: 1e-4)")
    weight_decay: float = 1e-5
    widths: list[int] = Field(default=[32, 64, 128, 256, 512], description="encoder widths (5 stages)")
    patience: int = 20
    augment: bool = True
    seed: int = 0
    val_patients: int | None = Field(default=None, description="cap on validation volumes per epoch")
    max_minutes: float | None = Field(default=None, description="time budget; a rerun resumes from the checkpoint")


def registered_name(variant: str) -> str:
    return f"{CONTOUR_DOSE_MODEL_PREFIX}{variant}"


def make_training_asset(variant: str):
    ins = {"contour_dose_cache": dg.AssetIn()}
    if variant == "seq-automated":
        ins["contour_model"] = dg.AssetIn("contour_dose_model_contour_only")

    @dg.asset(
        name=f"contour_dose_model_{variant.replace('-', '_')}",
        ins=ins,
        group_name=CONTOUR_DOSE_TRAINING,
        kinds={"pytorch", "mlflow"},
        owners=[OWNER_ML],
        pool=GPU_POOL,
        code_version="1",
        description=f"Trains {MODEL_NAMES[variant]} (`{variant}`: {VARIANTS[variant]['arch']}, inputs "
                    f"{', '.join(VARIANTS[variant]['inputs'])} -> {', '.join(VARIANTS[variant]['tasks'])}) on the "
                    f"contour + dose cache; MLflow run, registered as `{registered_name(variant)}`.",
    )
    def _train(context: dg.AssetExecutionContext, config: ContourDoseTrainSettings, storage: PsqaStorage,
               compute: ComputeResource, mlflow: MlflowResource, contour_dose_cache: pd.DataFrame,
               **upstream: pd.DataFrame) -> pd.DataFrame:
        from ml.contour_dose.predict import load_model
        from ml.contour_dose.train import TrainConfig, train

        cache = contour_dose_cache.iloc[0]
        plan = compute.plan()
        model_dir = storage.lake / "models" / "contour_dose" / variant / context.run.run_id
        contour_model = None
        if "contour_model" in upstream:
            contour_model = str(upstream["contour_model"].iloc[0]["model_dir"])
        cfg = TrainConfig(variant=variant, epochs=config.epochs, steps_per_epoch=config.steps_per_epoch,
                          batch_size=config.batch_size, lr=config.lr, weight_decay=config.weight_decay,
                          widths=tuple(config.widths), patience=config.patience, augment=config.augment,
                          seed=config.seed, val_patients=config.val_patients, max_minutes=config.max_minutes,
                          device=plan.device, amp="bf16" if plan.amp_dtype != "off" else "off",
                          contour_model=contour_model)
        run_id = mlflow.start_run(context, run_name=f"train-{variant}",
                                  tags={"contour_dose/variant": variant, "contour_dose/cache_digest": str(cache["digest"])})
        try:
            metrics = train(cache["cache_dir"], model_dir, cfg, log=context.log.info)
            history = pd.read_csv(model_dir / "history.csv")
            mcfg = json.loads((model_dir / "config.json").read_text())
            mlflow.log_params(run_id, {**{f"train.{k}": v for k, v in cfg.to_dict().items() if k != "extra"},
                                       **{f"model.{k}": v for k, v in mcfg["model"].items() if k != "extra"},
                                       "cache_digest": cache["digest"], "rois": ",".join(mcfg["rois"]),
                                       "n_parameters": mcfg["n_parameters"], "pretrained": "none (from scratch)"})
            mlflow.log_history(run_id, history)
            index_path = Path(cache["cache_dir"]) / "index.parquet"
            index = pd.read_parquet(index_path)
            for split_name, ctx in (("train", "training"), ("val", "validation")):
                ids = mcfg["split"][split_name]
                mlflow.log_parquet_dataset(run_id, index[index["patient_id"].isin(ids)], index_path,
                                           name=f"contour-dose-cache-{cache['digest']}-{split_name}", context=ctx)
            for name in ("history.csv", "config.json", "metrics.json"):
                mlflow.client().log_artifact(run_id, str(model_dir / name), artifact_path="training")
            lm = load_model(model_dir)
            outputs = {}
            if "dose" in mcfg["tasks"]:
                outputs["dose"] = ("float32", (-1, 1, -1, -1))
            if "contour" in mcfg["tasks"]:
                outputs["contour"] = ("float32", (-1, len(mcfg["rois"]) + 1, -1, -1))
            info = mlflow.log_model(
                run_id, lm.model, name="model", class_path="ml.contour_dose.models:from_config",
                kwargs=mcfg["model"], input_specs={"x": ("float32", (-1, mcfg["model"]["in_channels"], -1, -1))},
                output_specs=outputs, registered_model_name=registered_name(variant),
                metadata={"variant": variant, "cache_digest": str(cache["digest"]), "rois": mcfg["rois"],
                          "inputs": mcfg["inputs"], "ct_norm": mcfg["ct_norm"], "dose_norm_gy": mcfg["dose_norm_gy"]})
            version = str(info.registered_model_version or "")
            if version:
                client = mlflow.client()
                for k, v in {"model_dir": str(model_dir), "cache_digest": str(cache["digest"]),
                             "dagster_run_id": context.run.run_id, "variant": variant,
                             "best_val_loss": f"{metrics['best_val_loss']:.5f}"}.items():
                    client.set_model_version_tag(registered_name(variant), version, k, v)
            mlflow.end_run(run_id)
        except Exception:
            mlflow.end_run(run_id, status="FAILED")
            raise
        row = {"variant": variant, "model_dir": str(model_dir), "mlflow_run_id": run_id, "model_id": info.model_id,
               "registered_model": registered_name(variant), "model_version": version,
               "cache_digest": str(cache["digest"]), "best_epoch": int(metrics["best_epoch"]),
               "best_val_loss": float(metrics["best_val_loss"]), "epochs_run": int(metrics["epochs_run"]),
               "train_slices_per_s": float(metrics["train_slices_per_s"]), "device": metrics["device_name"]}
        shown = [c for c in history.columns if c.startswith(("epoch", "train_loss", "val_loss", "val_dose_score",
                                                             "val_mean_dice", "lambda"))]
        context.add_output_metadata({
            "mlflow_run_id": run_id, "mlflow_run": dg.MetadataValue.url(mlflow.run_url(run_id)),
            "model_version": version,
            "mlflow_model": dg.MetadataValue.url(mlflow.model_version_url(registered_name(variant), version)),
            "best_val_loss": float(metrics["best_val_loss"]), "best_epoch": int(metrics["best_epoch"]),
            "epochs_run": int(metrics["epochs_run"]), "stopped_by": metrics["stopped_by"],
            "train_slices_per_s": float(metrics["train_slices_per_s"]), "device": metrics["device_name"],
            "amp": metrics["amp"], "peak_gpu_mem_gb": float(metrics["peak_gpu_mem_gb"]),
            **{k: float(v) for k, v in metrics.items() if k in ("val_dose_score", "val_mean_dice")},
            "history": md_table(history[shown], max_rows=15),
        })
        return pd.DataFrame([row], columns=MODEL_ROW_COLUMNS)

    return _train


TRAINED_VARIANTS = ("contour-only", "dose-only", "seq-human", "seq-automated", "multi-automated", "product")
training_assets = [make_training_asset(v) for v in TRAINED_VARIANTS]
