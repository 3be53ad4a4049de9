"""One training asset per BMMQA variant (GPU-tagged), each tracked as an MLflow run.

The assets only orchestrate: ``ml.psqa.train.train`` does the work (and is the same code the
GPU node runs with ``python -m ml bmmqa train``). Each materialisation records the MLflow run
id and URL, the registered model version (``psqa-bmmqa`` for BMMQA; baselines are logged, not
registered), the best validation metric and the throughput.
"""

import json
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
from pydantic import Field

from ml.psqa.train import VARIANTS
from psqa_pipelines.constants import OWNER_ML, PSQA_MODEL_NAME, PSQA_TRAINING
from psqa_pipelines.lib.metadata import md_png, md_table
from psqa_pipelines.resources import ComputeResource, MlflowResource, PsqaStorage
from psqa_pipelines.resources.compute import GPU_POOL

REGISTERED = {"bmmqa": PSQA_MODEL_NAME}
MODEL_ROW_COLUMNS = ["variant", "model_dir", "mlflow_run_id", "model_id", "registered_model", "model_version",
                     "pack_digest", "best_epoch", "best_val", "epochs_run", "train_samples_per_s", "device", "n_plans"]


class PsqaTrainSettings(dg.Config):
    epochs: int = Field(default=60, description="maximum epochs")
    batch_size: int = 32
    lr: float = 1e-3
    patience: int = Field(default=15, description="early stopping patience (val MAE 2%/2mm)")
    warmup_epochs: int = Field(default=5, description="epochs before Shapley balancing starts")
    seed: int = 0
    max_minutes: float | None = Field(default=None, description="time budget; the run resumes from its checkpoint")
    enc_widths: list[int] = Field(default=[32, 64, 128, 256], description="image encoder widths")
    dec_widths: list[int] = Field(default=[32, 16, 8, 8], description="DD decoder widths")


def monitor_key(metrics: dict) -> str:
    return next(k for k in metrics if k.startswith("best_val"))


def make_training_asset(variant: str):
    @dg.asset(
        name=f"psqa_model_{variant}",
        group_name=PSQA_TRAINING,
        kinds={"pytorch", "mlflow"},
        owners=[OWNER_ML],
        pool=GPU_POOL,
        code_version="1",
        description=f"Trains the `{variant}` variant ({'BMMQA' if variant == 'bmmqa' else 'baseline'}) on the "
                    "current training pack with ml.psqa.train; logs params, per-epoch metrics, the Parquet dataset "
                    "and the model (state_dict + pyfunc) to MLflow"
                    + (", registered as `psqa-bmmqa`." if variant in REGISTERED else "."),
    )
    def _train(context: dg.AssetExecutionContext, config: PsqaTrainSettings, storage: PsqaStorage,
               compute: ComputeResource, mlflow: MlflowResource, psqa_pack: pd.DataFrame) -> pd.DataFrame:
        from ml.psqa.plots import contribution_curves_png
        from ml.psqa.train import TrainConfig, train

        pack = psqa_pack.iloc[0]
        plan = compute.plan()
        model_dir = storage.lake / "models" / "psqa" / variant / context.run.run_id
        cfg = TrainConfig(variant=variant, epochs=config.epochs, batch_size=config.batch_size, lr=config.lr,
                          patience=config.patience, warmup_epochs=config.warmup_epochs, seed=config.seed,
                          device=plan.device, amp=plan.amp_dtype if plan.amp_dtype != "off" else "off",
                          max_minutes=config.max_minutes,
                          model={"enc_widths": config.enc_widths, "dec_widths": config.dec_widths})
        run_id = mlflow.start_run(context, run_name=f"train-{variant}",
                                  tags={"psqa/variant": variant, "psqa/pack_digest": str(pack["digest"])})
        try:
            metrics = train(pack["pack_dir"], model_dir, cfg, log=context.log.info)
            history = pd.read_csv(model_dir / "history.csv")
            mcfg = json.loads((model_dir / "config.json").read_text())
            mlflow.log_params(run_id, {**{f"train.{k}": v for k, v in cfg.to_dict().items() if k != "model"},
                                       **{f"model.{k}": v for k, v in mcfg["model"].items()},
                                       "pack_digest": pack["digest"], "n_train": metrics["n_train"],
                                       "n_val": metrics["n_val"]})
            mlflow.log_history(run_id, history)
            table = pd.read_parquet(Path(pack["pack_dir"]) / "dataset.parquet")
            mlflow.log_parquet_dataset(run_id, table[table["split"] == "train"], Path(pack["pack_dir"]) / "dataset.parquet",
                                       name=f"psqa-pack-{pack['digest']}", context="training", targets="gpr_2_2")
            mlflow.log_parquet_dataset(run_id, table[table["split"] == "val"], Path(pack["pack_dir"]) / "dataset.parquet",
                                       name=f"psqa-pack-{pack['digest']}-val", context="validation", targets="gpr_2_2")
            for name in ("history.csv", "config.json", "metrics.json", "tab_scaler.json"):
                mlflow.client().log_artifact(run_id, str(model_dir / name), artifact_path="training")
            curves = contribution_curves_png(history, title=variant)
            mlflow.log_artifact_bytes(run_id, curves, "plots/contribution_curves.png")
            from ml.psqa.predict import load_model

            model, scaler, _ = load_model(model_dir)
            side = int(np.load(Path(pack["pack_dir"]) / "images.npy", mmap_mode="r").shape[-1])
            c = model.cfg.in_channels
            info = mlflow.log_model(
                run_id, model, name="model", class_path="ml.psqa.bmmqa:BMMQA",
                kwargs=model.cfg.to_dict(),
                input_specs={"image": ("float32", (-1, c, side, side)), "table": ("float32", (-1, scaler.n_features))},
                output_specs={k: v for k, v in {
                    "gpr": ("float32", (-1, model.cfg.n_criteria)), "dd": ("float32", (-1, 1, side, side))}.items()
                    if k in model.cfg.tasks},
                registered_model_name=REGISTERED.get(variant),
                metadata={"variant": variant, "pack_digest": str(pack["digest"])},
            )
            if info.registered_model_version:
                client = mlflow.client()
                for k, v in {"model_dir": str(model_dir), "pack_digest": str(pack["digest"]),
                             "dagster_run_id": context.run.run_id, "variant": variant,
                             monitor_key(metrics): f"{metrics[monitor_key(metrics)]:.4f}"}.items():
                    client.set_model_version_tag(REGISTERED[variant], str(info.registered_model_version), k, v)
            mlflow.end_run(run_id)
        except Exception:
            mlflow.end_run(run_id, status="FAILED")
            raise
        monitor = monitor_key(metrics)
        version = str(info.registered_model_version or "")
        row = {"variant": variant, "model_dir": str(model_dir), "mlflow_run_id": run_id, "model_id": info.model_id,
               "registered_model": REGISTERED.get(variant, ""), "model_version": version,
               "pack_digest": str(pack["digest"]), "best_epoch": int(metrics["best_epoch"]),
               "best_val": float(metrics[monitor]), "epochs_run": int(metrics["epochs_run"]),
               "train_samples_per_s": float(metrics["train_samples_per_s"]), "device": metrics["device_name"],
               "n_plans": int(pack["plans"])}
        context.add_output_metadata({
            "mlflow_run_id": run_id,
            "mlflow_run": dg.MetadataValue.url(mlflow.run_url(run_id)),
            **({"model_version": version,
                "mlflow_model": dg.MetadataValue.url(mlflow.model_version_url(REGISTERED[variant], version))}
               if version else {}),
            monitor: float(metrics[monitor]), "best_epoch": int(metrics["best_epoch"]),
            "epochs_run": int(metrics["epochs_run"]), "stopped_by": metrics["stopped_by"],
            "train_samples_per_s": float(metrics["train_samples_per_s"]), "device": metrics["device_name"],
            "amp": metrics["amp"], "n_plans": int(pack["plans"]),
            "history": md_table(history[[c for c in history.columns if c.startswith(("epoch", "train_loss", "val_mae_gpr_2_2",
                                                                                     "val_dd", "psi_"))]], max_rows=12),
            "contribution_curves": md_png(curves, "modality contributions"),
        })
        return pd.DataFrame([row], columns=MODEL_ROW_COLUMNS)

    return _train


training_assets = [make_training_asset(v) for v in VARIANTS]
