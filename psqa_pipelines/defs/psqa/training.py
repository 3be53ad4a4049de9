"""One training asset per BMMQA variant (GPU-tagged), each tracked as an MLflow run.

The assets only orchestrate: ``ml.psqa.train.train`` does the work (and is the same code the
GPU node runs with ``python -m ml bmmqa train``). Each materialisation records the MLflow run
id and URL, the registered model version (``psqa-bmmqa`` for BMMQA; baselines are logged, not
registered), the best validation metric and the throughput. The asset itself comes from the
shared factory (``psqa_pipelines.lib.training``); this module is the PSQA family's spec.
"""

from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
from pydantic import Field

from ml.psqa.train import VARIANTS, train
from psqa_pipelines.constants import PSQA_MODEL_NAME, PSQA_TRAINING
from psqa_pipelines.lib.training import (
    DatasetToLog,
    ModelToLog,
    Plot,
    TrainingAssetSpec,
    TrainingRun,
    training_asset,
)
from psqa_pipelines.resources.compute import ComputePlan

REGISTERED = {"bmmqa": PSQA_MODEL_NAME}
BMMQA_DESCRIPTION = (
    "BMMQA patient-specific IMRT QA (balanced multimodal multi-task; seed 001, ml.psqa.bmmqa). Inputs per plan: the "
    "planned dose plane + fluence map (image) and the plan-complexity metrics (table). Outputs: gamma passing rates "
    "at the QA criteria (%) and the dose-difference map (measured - planned, % of max). Trained on the lake's QA "
    "programme (`psqa_pack`: RT Plans with their measured QA results, plan-level split). Metrics: held-out GPR MAE "
    "per criterion and dose-difference error against the mean/median/single-modality/fusion baselines "
    "(`psqa_evaluation`), "
    "Shapley modality contributions (`psqa_shapley_report`). Alias `champion`: moved by `psqa_champion` only when "
    "a challenger beats the champion on the same held-out plans."
)
MODEL_ROW_COLUMNS = [
    "variant",
    "model_dir",
    "mlflow_run_id",
    "model_id",
    "registered_model",
    "model_version",
    "pack_digest",
    "best_epoch",
    "best_val",
    "epochs_run",
    "train_samples_per_s",
    "device",
    "n_plans",
]


class PsqaTrainSettings(dg.Config):
    """The knobs of ``ml.psqa.train.TrainConfig`` exposed in the Launchpad (the rest keep its defaults)."""

    epochs: int = Field(default=60, description="maximum epochs")
    batch_size: int = 32
    lr: float = Field(default=1e-4, description="AdamW learning rate (after the linear warm-up)")
    lr_warmup: float = Field(default=0.05, description="linear lr warm-up, fraction of all training steps")
    patience: int = Field(
        default=15, description="early stopping patience (val MAE 2%/2mm), counted from the first selectable epoch"
    )
    warmup_epochs: int = Field(
        default=5, description="epochs before Shapley balancing starts; model selection only from this epoch on"
    )
    modality_dropout: float = Field(default=0.2, description="probability of dropping each modality per plan")
    shapley_holdout: float = Field(
        default=0.1, description="fraction of the training plans held out for the Shapley contributions"
    )
    gpr_loss: str = Field(default="l1", description="GPR loss in percentage points: l1 | huber")
    seed: int = 0
    max_minutes: float | None = Field(default=None, description="time budget; the run resumes from its checkpoint")
    enc_widths: list[int] = Field(default=[32, 64, 128, 256], description="image encoder widths")
    dec_widths: list[int] = Field(default=[32, 16, 8, 8], description="DD decoder widths")


def monitor_key(metrics: dict) -> str:
    return next(k for k in metrics if k.startswith("best_val"))


def _pack(inputs) -> pd.Series:
    return inputs["psqa_pack"].iloc[0]


def training_spec(variant: str) -> TrainingAssetSpec:
    def train_config(config: PsqaTrainSettings, plan: ComputePlan, inputs):
        from ml.psqa.train import TrainConfig

        return TrainConfig(
            variant=variant,
            epochs=config.epochs,
            batch_size=config.batch_size,
            lr=config.lr,
            lr_warmup=config.lr_warmup,
            patience=config.patience,
            warmup_epochs=config.warmup_epochs,
            modality_dropout=config.modality_dropout,
            shapley_holdout=config.shapley_holdout,
            gpr_loss=config.gpr_loss,
            seed=config.seed,
            device=plan.device,
            amp=plan.amp_dtype if plan.amp_dtype != "off" else "off",
            max_minutes=config.max_minutes,
            model={"enc_widths": config.enc_widths, "dec_widths": config.dec_widths},
        )

    def params(run: TrainingRun) -> dict:
        return {
            **{f"train.{k}": v for k, v in run.train_config.to_dict().items() if k != "model"},
            **{f"model.{k}": v for k, v in run.model_config["model"].items()},
            "pack_digest": _pack(run.inputs)["digest"],
            "n_train": run.metrics["n_train"],
            "n_val": run.metrics["n_val"],
            "n_shapley_holdout": run.metrics.get("n_shapley_holdout", 0),
            "selection_start_epoch": run.metrics.get("selection_start_epoch", 0),
        }

    def datasets(run: TrainingRun) -> list[DatasetToLog]:
        pack = _pack(run.inputs)
        path = Path(pack["pack_dir"]) / "dataset.parquet"
        table = pd.read_parquet(path)
        return [
            DatasetToLog(
                table[table["split"] == "train"], path, f"psqa-pack-{pack['digest']}", "training", targets="gpr_2_2"
            ),
            DatasetToLog(
                table[table["split"] == "val"], path, f"psqa-pack-{pack['digest']}-val", "validation", targets="gpr_2_2"
            ),
        ]

    def plots(run: TrainingRun) -> list[Plot]:
        from ml.psqa.plots import contribution_curves_png

        return [
            Plot(
                "plots/contribution_curves.png",
                "contribution_curves",
                "modality contributions",
                contribution_curves_png(run.history, title=variant),
            )
        ]

    def model(run: TrainingRun) -> ModelToLog:
        from ml.psqa.predict import load_model

        pack = _pack(run.inputs)
        net, scaler, _ = load_model(run.model_dir)
        side = int(np.load(Path(pack["pack_dir"]) / "images.npy", mmap_mode="r").shape[-1])
        c = net.cfg.in_channels
        return ModelToLog(
            net,
            class_path="ml.psqa.bmmqa:BMMQA",
            kwargs=net.cfg.to_dict(),
            input_specs={"image": ("float32", (-1, c, side, side)), "table": ("float32", (-1, scaler.n_features))},
            output_specs={
                k: v
                for k, v in {
                    "gpr": ("float32", (-1, net.cfg.n_criteria)),
                    "dd": ("float32", (-1, 1, side, side)),
                }.items()
                if k in net.cfg.tasks
            },
            metadata={"variant": variant, "pack_digest": str(pack["digest"])},
        )

    def row(run: TrainingRun) -> dict:
        pack = _pack(run.inputs)
        return {
            "pack_digest": str(pack["digest"]),
            "best_val": float(run.metrics[run.monitor]),
            "train_samples_per_s": float(run.metrics["train_samples_per_s"]),
            "n_plans": int(pack["plans"]),
        }

    return TrainingAssetSpec(
        name=f"psqa_model_{variant}",
        variant=variant,
        group_name=PSQA_TRAINING,
        description=f"Trains the `{variant}` variant ({'BMMQA' if variant == 'bmmqa' else 'baseline'}) on the "
        "current training pack with ml.psqa.train; logs params, per-epoch metrics, the Parquet dataset "
        "and the model (state_dict + pyfunc) to MLflow"
        + (", registered as `psqa-bmmqa`." if variant in REGISTERED else "."),
        config_class=PsqaTrainSettings,
        ins={"psqa_pack": dg.AssetIn()},
        output_columns=MODEL_ROW_COLUMNS,
        train=train,
        train_config=train_config,
        data_dir=lambda inputs: _pack(inputs)["pack_dir"],
        model_subdir=f"psqa/{variant}",
        monitor=monitor_key,
        run_tags=lambda inputs: {"psqa/variant": variant, "psqa/pack_digest": str(_pack(inputs)["digest"])},
        params=params,
        datasets=datasets,
        model=model,
        registered_model_name=REGISTERED.get(variant),
        model_description=BMMQA_DESCRIPTION if variant in REGISTERED else "",
        version_tags=lambda run: {"pack_digest": str(_pack(run.inputs)["digest"])},
        monitor_format=".4f",
        artifacts=("history.csv", "config.json", "metrics.json", "tab_scaler.json"),
        plots=plots,
        row=row,
        metric_metadata=("train_samples_per_s",),
        extra_metadata=lambda run: {"n_plans": int(_pack(run.inputs)["plans"])},
        history_columns=("epoch", "train_loss", "val_mae_gpr_2_2", "val_dd", "psi_"),
        history_rows=12,
    )


training_assets = [training_asset(training_spec(v)) for v in VARIANTS]
