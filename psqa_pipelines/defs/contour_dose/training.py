"""One training asset per contour + dose model (GPU pool), each an MLflow run and a registered model.

``ml.contour_dose.train.train`` does the work (the same code as ``python -m ml contour-dose
train`` on a GPU node). Hyper-parameters are a ``Config`` editable in the Launchpad; each
model is registered as ``contour-dose-<variant>`` with tags linking the Dagster run, the
cache digest and the model directory. Seq-Automated takes the contour-only model (the
DL-Baseline) as input: it predicts the validation and test patients' masks, and k contour-only
models trained with its configuration on k-1 folds of the training patients predict the held-out
fold's (out-of-fold masks, ``ml.contour_dose.train``). Every model keeps the epoch with the best
selection score (dose score and mean Dice, weighted, on every validation patient; the rule is in
``metrics.json`` and the MLflow run). The asset itself comes from the shared factory
(``psqa_pipelines.lib.training``); this module is the contour + dose family's spec.
"""

from pathlib import Path

import dagster as dg
import pandas as pd
from pydantic import Field

from ml.contour_dose.variants import MODEL_NAMES, VARIANTS
from psqa_pipelines.constants import CONTOUR_DOSE_MODEL_PREFIX, CONTOUR_DOSE_TRAINING
from psqa_pipelines.lib.training import DatasetToLog, ModelToLog, TrainingAssetSpec, TrainingRun, training_asset
from psqa_pipelines.resources.compute import ComputePlan

MODEL_ROW_COLUMNS = [
    "variant",
    "model_dir",
    "mlflow_run_id",
    "model_id",
    "registered_model",
    "model_version",
    "cache_digest",
    "best_epoch",
    "best_val_loss",
    "epochs_run",
    "train_slices_per_s",
    "device",
]


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
    val_patients: int | None = Field(
        default=None,
        description="ignored (kept so older run configs load): every validation patient is validated",
    )
    max_minutes: float | None = Field(default=None, description="time budget; a rerun resumes from the checkpoint")
    partial_labels: bool = Field(
        default=True, description="leave ROIs a patient has no contour for out of the contour loss (marginal loss)"
    )
    oversample_rate: float | None = Field(
        default=None,
        description="share of each epoch's slices per rare ROI (Brainstem, Esophagus, SpinalCord); "
        "None: the variant's default (product 0.1, paper variants 0)",
    )
    class_weights: str | None = Field(
        default=None, description="CE class weights: none | inv_sqrt_freq; None: the variant's default"
    )
    soft_window: bool | None = Field(
        default=None, description="soft-tissue CT channel (W400/L40); None: the variant's default (product: on)"
    )
    oof_folds: int = Field(default=3, description="seq-automated: folds of out-of-fold predicted masks (0: in-sample)")
    select_dose_weight: float = Field(default=0.5, description="model selection: weight of dose score / 10 Gy")
    select_contour_weight: float = Field(default=0.5, description="model selection: weight of 1 - mean Dice")


def registered_name(variant: str) -> str:
    return f"{CONTOUR_DOSE_MODEL_PREFIX}{variant}"


def _cache(inputs) -> pd.Series:
    return inputs["contour_dose_cache"].iloc[0]


def _train(cache_dir, out_dir, cfg, *, log, callbacks) -> dict:
    from ml.contour_dose.train import train

    return train(cache_dir, out_dir, cfg, log=log, callbacks=callbacks)


def training_spec(variant: str) -> TrainingAssetSpec:
    ins = {"contour_dose_cache": dg.AssetIn()}
    if variant == "seq-automated":
        ins["contour_model"] = dg.AssetIn("contour_dose_model_contour_only")

    def train_config(config: ContourDoseTrainSettings, plan: ComputePlan, inputs):
        from ml.contour_dose.train import TrainConfig

        contour_model = None
        if "contour_model" in inputs:
            contour_model = str(inputs["contour_model"].iloc[0]["model_dir"])
        return TrainConfig(
            variant=variant,
            epochs=config.epochs,
            steps_per_epoch=config.steps_per_epoch,
            batch_size=config.batch_size,
            lr=config.lr,
            weight_decay=config.weight_decay,
            widths=tuple(config.widths),
            patience=config.patience,
            augment=config.augment,
            seed=config.seed,
            val_patients=config.val_patients,
            max_minutes=config.max_minutes,
            partial_labels=config.partial_labels,
            oversample_rate=config.oversample_rate,
            class_weights=config.class_weights,
            soft_window=config.soft_window,
            oof_folds=config.oof_folds,
            select_dose_weight=config.select_dose_weight,
            select_contour_weight=config.select_contour_weight,
            device=plan.device,
            amp="bf16" if plan.amp_dtype != "off" else "off",
            contour_model=contour_model,
        )

    def params(run: TrainingRun) -> dict:
        mcfg = run.model_config
        return {
            **{f"train.{k}": v for k, v in run.train_config.to_dict().items() if k != "extra"},
            "selection_rule": mcfg["selection"]["rule"],
            "pred_masks": (mcfg.get("pred_masks") or {}).get("source", "none"),
            **{f"model.{k}": v for k, v in mcfg["model"].items() if k != "extra"},
            "cache_digest": _cache(run.inputs)["digest"],
            "rois": ",".join(mcfg["rois"]),
            "n_parameters": mcfg["n_parameters"],
            "pretrained": "none (from scratch)",
        }

    def datasets(run: TrainingRun) -> list[DatasetToLog]:
        cache = _cache(run.inputs)
        index_path = Path(cache["cache_dir"]) / "index.parquet"
        index = pd.read_parquet(index_path)
        return [
            DatasetToLog(
                index[index["patient_id"].isin(run.model_config["split"][split_name])],
                index_path,
                f"contour-dose-cache-{cache['digest']}-{split_name}",
                ctx,
            )
            for split_name, ctx in (("train", "training"), ("val", "validation"))
        ]

    def model(run: TrainingRun) -> ModelToLog:
        from ml.contour_dose.predict import load_model

        mcfg = run.model_config
        outputs = {}
        if "dose" in mcfg["tasks"]:
            outputs["dose"] = ("float32", (-1, 1, -1, -1))
        if "contour" in mcfg["tasks"]:
            outputs["contour"] = ("float32", (-1, len(mcfg["rois"]) + 1, -1, -1))
        return ModelToLog(
            load_model(run.model_dir).model,
            class_path="ml.contour_dose.models:from_config",
            kwargs=mcfg["model"],
            input_specs={"x": ("float32", (-1, mcfg["model"]["in_channels"], -1, -1))},
            output_specs=outputs,
            metadata={
                "variant": variant,
                "cache_digest": str(_cache(run.inputs)["digest"]),
                "rois": mcfg["rois"],
                "inputs": mcfg["inputs"],
                "ct_norm": mcfg["ct_norm"],
                "dose_norm_gy": mcfg["dose_norm_gy"],
            },
        )

    def row(run: TrainingRun) -> dict:
        return {
            "cache_digest": str(_cache(run.inputs)["digest"]),
            "best_val_loss": float(run.metrics["best_val_loss"]),
            "train_slices_per_s": float(run.metrics["train_slices_per_s"]),
        }

    return TrainingAssetSpec(
        name=f"contour_dose_model_{variant.replace('-', '_')}",
        variant=variant,
        group_name=CONTOUR_DOSE_TRAINING,
        description=f"Trains {MODEL_NAMES[variant]} (`{variant}`: {VARIANTS[variant]['arch']}, inputs "
        f"{', '.join(VARIANTS[variant]['inputs'])} -> {', '.join(VARIANTS[variant]['tasks'])}) on the "
        f"contour + dose cache; MLflow run, registered as `{registered_name(variant)}`.",
        config_class=ContourDoseTrainSettings,
        ins=ins,
        output_columns=MODEL_ROW_COLUMNS,
        train=_train,
        train_config=train_config,
        data_dir=lambda inputs: _cache(inputs)["cache_dir"],
        model_subdir=f"contour_dose/{variant}",
        monitor=lambda metrics: "best_selection_score",
        run_tags=lambda inputs: {
            "contour_dose/variant": variant,
            "contour_dose/cache_digest": str(_cache(inputs)["digest"]),
        },
        params=params,
        datasets=datasets,
        model=model,
        registered_model_name=registered_name(variant),
        model_description=(
            f"{MODEL_NAMES[variant]} (`{variant}`, seed 002 contour + dose family, ml.contour_dose): "
            f"{VARIANTS[variant]['arch'].upper()} on {', '.join(VARIANTS[variant]['inputs'])} -> "
            f"{' + '.join(VARIANTS[variant]['tasks'])} ({', '.join(VARIANTS[variant]['rois'])}). Trained on the "
            "contour + dose cache of the lake's OpenKBP head-and-neck patients (real CT, structures and doses; "
            "patient-level split). Metrics on the held-out patients (`contour_dose_evaluation`, as version tags): "
            "OpenKBP dose and DVH scores (Gy), mean Dice and HD95 (mm). Alias `champion`: moved by "
            "`contour_dose_champion` when a version is no worse on every task and better on one, on the same split."
        ),
        version_tags=lambda run: {"cache_digest": str(_cache(run.inputs)["digest"])},
        monitor_format=".5f",
        row=row,
        metric_metadata=(
            "train_slices_per_s",
            "peak_gpu_mem_gb",
            "best_val_loss",
            "val_dose_score",
            "val_mean_dice",
            "n_val_patients",
        ),
        history_columns=(
            "epoch",
            "train_loss",
            "val_loss",
            "val_dose_score",
            "val_mean_dice",
            "val_selection_score",
            "lambda",
        ),
        history_rows=15,
    )


TRAINED_VARIANTS = ("contour-only", "dose-only", "seq-human", "seq-automated", "multi-automated", "product")
training_assets = [training_asset(training_spec(v)) for v in TRAINED_VARIANTS]
