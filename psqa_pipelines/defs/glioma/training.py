"""Glioma training: the training directory from the lake, the final GMMAS model (factory spec) and the
patient-level cross-validation with one MLflow run per fold.

* ``glioma_training_data``: ``ml.glioma.lake.export_training_dir`` writes the lake's cases in the shared
  training layout (``<lake>/glioma/training``: ``patients/<id>.npz`` + ``labels.csv``) -- the same
  format ``python -m ml glioma train --data DIR`` reads on a GPU node.
* ``glioma_model``: the all-training-data GMMAS (``ml.glioma.train.train``; a stratified 15 % of the
  patients validates, selects the epoch and fits the temperatures) through ``lib/training.py``'s
  factory: MLflow params, per-epoch metrics (incl. the Kendall ``sigma_<task>`` and the fusion
  weights ``w_<sequence>``), the label table and the training index as dataset inputs, the model
  (state_dict + pyfunc, tensor signature), registered as ``glioma-gmmas``.
* ``glioma_cv_predictions``: ``ml.glioma.cv.run_cv`` for GMMAS on ``glioma_folds``; one parent MLflow
  run per cross-validation and one child run per fold (``mlflow.parentRunId``, tag ``fold=<k>``) with
  its per-epoch metrics as the epochs end. The CV folder is keyed by its inputs (data digest, folds,
  settings): an identical rerun reuses the finished folds and resumes an interrupted one.
"""

import json
from pathlib import Path

import dagster as dg
import pandas as pd
from pydantic import Field

from psqa_pipelines.constants import GLIOMA, OWNER_DATA, OWNER_ML
from psqa_pipelines.lib.metadata import md_table
from psqa_pipelines.lib.training import (
    COMMON_ROW_COLUMNS,
    DatasetToLog,
    EpochMetricsToMlflow,
    ModelToLog,
    Plot,
    TrainingAssetSpec,
    TrainingRun,
    epoch_metrics,
    training_asset,
)
from psqa_pipelines.resources import ComputeResource, MlflowResource, PsqaStorage
from psqa_pipelines.resources.compute import GPU_POOL, ComputePlan

MODEL_ROW_COLUMNS = [
    *COMMON_ROW_COLUMNS,
    "data_digest",
    "best_val_loss",
    "val_dice",
    "n_train_patients",
    "n_val_patients",
    "train_slices_per_s",
]
TASK_NAMES = ("idh", "codel", "grade", "histology")
GLIOMA_MODEL_NAME = "glioma-gmmas"  # the registered MLflow model; `champion` alias moved by glioma_champion


# -- the training directory -----------------------------------------------------------------------
class GliomaTrainingDataSettings(dg.Config):
    size: int = Field(default=128, description="in-plane size of the exported slices (the model's input grid)")


@dg.asset(
    group_name=GLIOMA,
    kinds={"numpy", "parquet"},
    owners=[OWNER_DATA],
    code_version="1",
    description=(
        "The glioma lake in the shared training layout (`<lake>/glioma/training`: patients/<id>.npz with image "
        "(S, 4, 128, 128) in flair, t1c, t1, t2 order, present, mask; labels.csv) written by "
        "ml.glioma.lake.export_training_dir from glioma_cases + glioma_labels; deterministic (same lake, same "
        "bytes). One row per patient: source, slices, sequences present, mask, file sha256, data_dir, data_digest."
    ),
)
def glioma_training_data(
    context: dg.AssetExecutionContext,
    config: GliomaTrainingDataSettings,
    storage: PsqaStorage,
    glioma_cases: pd.DataFrame,
    glioma_labels: pd.DataFrame,
) -> pd.DataFrame:
    from ml.glioma.data import SEQUENCES
    from ml.glioma.lake import export_training_dir
    from ml.utils.io import sha256_bytes, sha256_file, write_parquet_atomic

    out = storage.lake / "glioma" / "training"
    index = export_training_dir(glioma_cases, glioma_labels, storage.lake, out, size=config.size)
    labels_sha = sha256_file(out / "labels.csv")
    digest = sha256_bytes(("\n".join(index["sha256"]) + "\n" + labels_sha).encode())[:16]
    index["data_dir"] = str(out)
    index["data_digest"] = digest
    write_parquet_atomic(out / "index.parquet", index)  # the dataset source MLflow points at
    present = {s: int(index["present"].str.split(";").apply(lambda xs, s=s: s in xs).sum()) for s in SEQUENCES}
    context.add_output_metadata(
        {
            "patients": len(index),
            "slices": int(index["n_slices"].sum()) if len(index) else 0,
            "with_mask": int(index["has_mask"].sum()) if len(index) else 0,
            "sequences_present": md_table(
                pd.DataFrame({"sequence": list(present), "patients": list(present.values())})
            ),
            "by_source": md_table(index["source"].value_counts().rename_axis("source").reset_index()),
            "data_digest": digest,
            "data_dir": dg.MetadataValue.path(str(out)),
        }
    )
    return index


# -- shared settings ------------------------------------------------------------------------------
class GliomaTrainSettings(dg.Config):
    epochs: int = Field(default=12, description="epochs (each = 2 x the tumour slices of the training patients)")
    batch_size: int = Field(default=16, description="slices per batch (half tumour, half uniform)")
    lr: float = Field(default=1e-3, description="AdamW learning rate (poly decay)")
    widths: list[int] = Field(default=[16, 32, 64, 128], description="encoder widths (the demo uses [4, 8, 8, 16])")
    context: int = Field(default=1, description="neighbouring slices on each side (2.5D); 0 = 2D")
    weighting: str = Field(default="kendall", description="kendall (learned uncertainty) | equal (ablation)")
    cutmix: bool = Field(default=True, description="stage switch: Tumor-CutMix")
    pseudo_labels: bool = Field(default=True, description="stage switch: UPS pseudo-labels at half the epochs")
    distill: bool = Field(default=True, description="stage switch: missing-modality self-distillation")
    calibrate: bool = Field(default=True, description="temperature scaling on the validation patients")
    withhold_labels: float = Field(default=0.0, description="fraction of training labels hidden (semi-supervised)")
    patience: int = Field(default=100, description="early stopping patience on val_loss")
    seed: int = 0
    max_minutes: float | None = Field(
        default=None, description="time budget per training; a rerun resumes from the checkpoint"
    )
    max_patients: int = Field(
        default=-1, description="only this many labelled patients, balanced over the folds (demos); -1 = all"
    )


def train_config(config: GliomaTrainSettings, plan: ComputePlan, extra: dict | None = None):
    """The ml ``TrainConfig`` of the Launchpad settings and the compute plan."""
    from ml.glioma.train import TrainConfig

    return TrainConfig(
        epochs=config.epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        widths=tuple(config.widths),
        context=config.context,
        weighting=config.weighting,
        cutmix=config.cutmix,
        pseudo_labels=config.pseudo_labels,
        distill=config.distill,
        calibrate=config.calibrate,
        withhold_labels=config.withhold_labels,
        patience=config.patience,
        seed=config.seed,
        max_minutes=config.max_minutes,
        device=plan.device,
        amp="bf16" if plan.amp_dtype == "bf16" else "off",
        extra=dict(extra or {}),
    )


def selected_folds(folds: pd.DataFrame, max_patients: int) -> pd.DataFrame:
    from ml.glioma.selection import first_patients

    return first_patients(folds, max_patients) if max_patients >= 0 else folds


# -- the final model (factory spec) ---------------------------------------------------------------
def _data(inputs) -> pd.Series:
    return inputs["glioma_training_data"].iloc[0]


def _train(data_dir, out_dir, cfg, *, log, callbacks) -> dict:
    from ml.glioma.train import train

    ids = cfg.extra.get("patients")  # max_patients: the chosen subset (else every exported patient)
    return train(data_dir, out_dir, cfg, train_ids=list(ids) if ids else None, log=log, callbacks=callbacks)


def _model_train_config(config: GliomaTrainSettings, plan: ComputePlan, inputs):
    extra = {}
    if config.max_patients >= 0:
        chosen = selected_folds(inputs["glioma_folds"], config.max_patients)
        extra = {"max_patients": config.max_patients, "patients": sorted(chosen["patient_id"])}
    return train_config(config, plan, extra)


def _params(run: TrainingRun) -> dict:
    train = {k: v for k, v in run.train_config.to_dict().items() if k != "extra"}
    return {
        **{f"train.{k}": v for k, v in train.items()},
        **{f"model.{k}": v for k, v in run.model_config["model"].items()},
        "max_patients": run.train_config.extra.get("max_patients", -1),
        "data_digest": _data(run.inputs)["data_digest"],
        "n_train_patients": run.metrics["n_train_patients"],
        "n_val_patients": run.metrics["n_val_patients"],
        "n_parameters": run.metrics["n_parameters"],
    }


def _datasets(run: TrainingRun) -> list[DatasetToLog]:
    d = _data(run.inputs)
    index = run.inputs["glioma_training_data"]
    labels = run.inputs["glioma_labels"]
    split = run.model_config.get("split", {})
    out = []
    for part, context in (("train", "training"), ("val", "validation")):
        ids = set(split.get(part, []))
        out.append(
            DatasetToLog(
                index[index["patient_id"].isin(ids)].reset_index(drop=True),
                Path(d["data_dir"]) / "index.parquet",
                f"glioma-training-{d['data_digest']}-{part}",
                context,
            )
        )
        out.append(
            DatasetToLog(
                labels[labels["patient_id"].isin(ids)].reset_index(drop=True),
                Path(d["data_dir"]) / "labels.csv",
                f"glioma-labels-{d['data_digest']}-{part}",
                context,
                targets="idh",
            )
        )
    return out


def _model(run: TrainingRun) -> ModelToLog:
    from ml.glioma.predict import load_model

    lm = load_model(run.model_dir)
    cfg = lm.model.cfg
    k = 2 * cfg.context + 1
    m = cfg.n_sequences
    return ModelToLog(
        lm.model,
        class_path="ml.glioma.model:from_config",
        kwargs=cfg.to_dict(),
        input_specs={"x": ("float32", (-1, m, k, 128, 128)), "present": ("float32", (-1, m))},
        output_specs={
            "seg": ("float32", (-1, 2, 128, 128)),
            **{t: ("float32", (-1, n)) for t, n in cfg.tasks.items()},
            "weights": ("float32", (-1, m)),
        },
        metadata={
            "variant": "gmmas",
            "data_digest": str(_data(run.inputs)["data_digest"]),
            "temperature": json.dumps(lm.temperature),
            "inputs": "x: z-scored slices (B, 4 sequences flair/t1c/t1/t2, 2*context+1, 128, 128); present: 0/1 (B, 4)",
        },
    )


def _plots(run: TrainingRun) -> list[Plot]:
    from ml.glioma.plots import kendall_sigma_png, modality_weights_png

    plots = []
    for png, name, key, alt in (
        (kendall_sigma_png(run.history), "kendall_sigma", "kendall_sigma", "Kendall sigma per epoch"),
        (modality_weights_png(run.history), "modality_weights", "modality_weights", "fusion weights per epoch"),
    ):
        if png:
            plots.append(Plot(f"plots/{name}.png", key, alt, png))
    return plots


def _val_metrics(metrics: dict) -> dict[str, float]:
    keys = ["val_loss", "val_dice", *(f"val_auc_{t}" for t in TASK_NAMES)]
    return {k: float(metrics[k]) for k in keys if metrics.get(k) is not None}


def _version_tags(run: TrainingRun) -> dict[str, str]:
    return {
        "data_digest": str(_data(run.inputs)["data_digest"]),
        "n_train_patients": str(run.metrics["n_train_patients"]),
        **{k: f"{v:.4f}" for k, v in _val_metrics(run.metrics).items()},
    }


def _row(run: TrainingRun) -> dict:
    return {
        "data_digest": str(_data(run.inputs)["data_digest"]),
        "best_val_loss": float(run.metrics["best_val_loss"]),
        "val_dice": float(run.metrics.get("val_dice") or float("nan")),
        "n_train_patients": int(run.metrics["n_train_patients"]),
        "n_val_patients": int(run.metrics["n_val_patients"]),
        "train_slices_per_s": float(run.metrics["train_slices_per_s"]),
    }


def _extra_metadata(run: TrainingRun) -> dict:
    from ml.glioma.data import SEQUENCES

    m = run.metrics
    return {
        "validation": md_table(pd.DataFrame([_val_metrics(m)]), floatfmt=".3f"),
        "kendall_sigma": dg.MetadataValue.json({k: m[k] for k in m if k.startswith("sigma_")}),
        "modality_weights_best_epoch": dg.MetadataValue.json({s: m.get(f"w_{s}") for s in SEQUENCES}),
        "temperatures": dg.MetadataValue.json({k: v for k, v in m.items() if k.startswith("temperature_")}),
        "pseudo_labels": dg.MetadataValue.json(m.get("pseudo_labels", {})),
        "n_train_patients": int(m["n_train_patients"]),
    }


glioma_model_spec = TrainingAssetSpec(
    name="glioma_model",
    variant="gmmas",
    group_name=GLIOMA,
    description=(
        "The final GMMAS (multi-task glioma segmentation + IDH, 1p/19q, grade, histology; ml.glioma.train) trained "
        "on every patient of glioma_training_data (a stratified 15 % validates, selects the epoch and fits the "
        "temperatures; `max_patients` for demos). MLflow: params, per-epoch metrics incl. the Kendall sigma per task "
        "and the modality fusion weights, the training index and label table as dataset inputs, the model "
        f"(state_dict + pyfunc, tensor signature), registered as `{GLIOMA_MODEL_NAME}` with the validation metrics as "
        "version tags. Stage switches (CutMix, UPS, distillation) and budget in the Launchpad."
    ),
    config_class=GliomaTrainSettings,
    ins={"glioma_training_data": dg.AssetIn(), "glioma_labels": dg.AssetIn(), "glioma_folds": dg.AssetIn()},
    output_columns=MODEL_ROW_COLUMNS,
    train=_train,
    train_config=_model_train_config,
    data_dir=lambda inputs: str(_data(inputs)["data_dir"]),
    model_subdir="glioma/gmmas",
    monitor=lambda metrics: "best_val_loss",
    run_tags=lambda inputs: {"glioma/variant": "gmmas", "glioma/data_digest": str(_data(inputs)["data_digest"])},
    params=_params,
    datasets=_datasets,
    model=_model,
    registered_model_name=GLIOMA_MODEL_NAME,
    model_description=(
        "GMMAS multi-task glioma model (seed 003, ml.glioma): 2.5D axial slices of FLAIR, T1c, T1 and T2 (any subset; "
        "a missing sequence is a zero fusion weight) -> FLAIR-abnormality mask + patient-level probabilities of IDH "
        "mutation, 1p/19q codeletion, grade G3 and histology (temperature-calibrated; MC-dropout uncertainty). "
        "Trained on the real TCGA-LGG cohort (lgg-mri, 88 patients, FLAIR/T1c/T1, T2 absent). Metrics: pooled 5-fold "
        "out-of-fold Dice, AUC with bootstrap CIs, ECE (`glioma_evaluation`) against majority and radiomics baselines. "
        "Research use only. Alias `champion`: moved by `glioma_champion` when the challenger's pooled out-of-fold "
        "score is higher."
    ),
    version_tags=_version_tags,
    artifacts=("history.csv", "config.json", "metrics.json", "calibration.json"),
    plots=_plots,
    row=_row,
    metric_metadata=("val_dice", "train_slices_per_s"),
    extra_metadata=_extra_metadata,
    history_columns=("epoch", "train_loss_mtl", "val_loss", "val_dice", "val_auc_", "sigma_", "w_"),
    history_rows=15,
)

glioma_model = training_asset(glioma_model_spec)


# -- cross-validation -----------------------------------------------------------------------------
class GliomaCvSettings(GliomaTrainSettings):
    folds: list[int] = Field(default=[], description="folds to run (empty = every fold of glioma_folds)")
    mc: int = Field(default=10, description="MC-dropout passes for the held-out predictions")
    missing: bool = Field(default=True, description="also predict every held-out fold with sequences removed")
    fresh: bool = Field(default=False, description="retrain even when this exact CV (data, folds, settings) exists")


def cv_root(storage: PsqaStorage, data_digest: str, folds: pd.DataFrame, base: dict, settings: dict) -> Path:
    """``<lake>/glioma/cv/<key>``: the key hashes the data, the folds and the settings (not the device)."""
    from ml.utils.io import sha256_bytes

    ident = {
        "data": data_digest,
        "folds": folds[["patient_id", "fold"]].sort_values("patient_id").to_dict("records"),
        "train": {k: v for k, v in base.items() if k not in ("device", "amp", "max_minutes")},
        **settings,
    }
    return storage.lake / "glioma" / "cv" / sha256_bytes(json.dumps(ident, sort_keys=True, default=str).encode())[:16]


def read_cv_config(cv_dir: str | Path):
    """The base ``TrainConfig`` and settings a CV folder was run with (``cv_config.json``)."""
    from ml.glioma.train import TrainConfig

    d = json.loads((Path(cv_dir) / "cv_config.json").read_text())
    train = dict(d["train"])
    train["widths"] = tuple(train["widths"])
    train["tasks"] = tuple(train["tasks"])
    return TrainConfig(**train), d


def run_tracked_cv(
    context: dg.AssetExecutionContext,
    mlflow: MlflowResource,
    data_dir: str,
    cv_dir: Path,
    folds: pd.DataFrame,
    cfg,
    variant: str,
    only_folds: list[int] | None,
    mc: int,
    missing: bool,
    tags: dict[str, str],
) -> tuple[pd.DataFrame, str, dict[int, str]]:
    """``ml.glioma.cv.run_cv`` with MLflow lineage: a parent run ``cv-<variant>`` and one child run per
    fold (``mlflow.parentRunId``, tag ``fold``), per-epoch metrics logged as epochs end (epochs of a
    reused or resumed fold from its history.csv). Returns (pooled OOF frame, parent run id, fold runs)."""
    from ml.glioma.cv import run_cv

    parent = mlflow.start_run(
        context, run_name=f"cv-{variant}", tags={"glioma/kind": "cv", "glioma/variant": variant, **tags}
    )
    fold_runs: dict[int, str] = {}
    callbacks: dict[int, EpochMetricsToMlflow] = {}

    def fold_run(k: int) -> str:
        if k not in fold_runs:
            fold_runs[k] = mlflow.start_run(
                context,
                run_name=f"cv-{variant}-fold{k}",
                tags={
                    "mlflow.parentRunId": parent,
                    "fold": str(k),
                    "glioma/kind": "cv_fold",
                    "glioma/variant": variant,
                    **tags,
                },
            )
        return fold_runs[k]

    def callbacks_for(k: int) -> list:
        callbacks[k] = EpochMetricsToMlflow(mlflow, fold_run(k))
        return [callbacks[k]]

    try:
        mlflow.log_params(
            parent,
            {
                **{f"train.{k}": v for k, v in cfg.to_dict().items() if k != "extra"},
                "variant": variant,
                "folds": ",".join(str(k) for k in only_folds) if only_folds else "all",
                "mc": mc,
                "missing": missing,
                "cv_dir": str(cv_dir),
                "n_patients": int((folds["fold"] >= 0).sum()),
                "n_unlabelled_pool": int((folds["fold"] < 0).sum()),
            },
        )
        oof = run_cv(
            data_dir,
            cv_dir,
            folds,
            cfg,
            variant=variant,
            only_folds=only_folds,
            missing=missing,
            mc=mc,
            log=context.log.info,
            callbacks_for=callbacks_for,
        )
        for k in sorted({int(f) for f in folds.loc[folds["fold"] >= 0, "fold"]}):
            if only_folds and k not in only_folds:
                continue
            fdir = cv_dir / variant / f"fold{k}"
            done = (fdir / "oof.csv").exists()
            if not done and k not in fold_runs:
                continue
            run_id = fold_run(k)
            _finish_fold_run(mlflow, run_id, fdir, k, callbacks.get(k), reused=k not in callbacks)
            mlflow.end_run(run_id, status="FINISHED" if done else "FAILED")
        if len(oof):
            mlflow.log_metrics(
                parent,
                {"oof_dice_mean": float(oof["dice"].mean()), "oof_patients": float(len(oof))},
            )
            mlflow.client().log_artifact(parent, str(cv_dir / variant / "oof.csv"), artifact_path="cv")
        mlflow.end_run(parent)
    except Exception:
        for run_id in fold_runs.values():
            mlflow.end_run(run_id, status="FAILED")
        mlflow.end_run(parent, status="FAILED")
        raise
    return oof, parent, fold_runs


def _finish_fold_run(
    mlflow: MlflowResource, run_id: str, fdir: Path, k: int, cb: EpochMetricsToMlflow | None, reused: bool
) -> None:
    """Epochs the callback did not see (a reused or resumed fold), the fold's params, OOF metrics and files."""
    if (fdir / "history.csv").exists():
        history = pd.read_csv(fdir / "history.csv")
        seen = cb.logged_epochs if cb else set()
        for _, row in history.iterrows():
            if int(row["epoch"]) not in seen:
                mlflow.log_metrics(run_id, epoch_metrics(row.to_dict()), step=int(row["epoch"]))
    metrics = json.loads((fdir / "metrics.json").read_text()) if (fdir / "metrics.json").exists() else {}
    mlflow.log_params(
        run_id,
        {
            "fold": k,
            "reused_finished_fold": reused,
            **{key: metrics[key] for key in ("n_train_patients", "n_val_patients", "best_epoch") if key in metrics},
        },
    )
    final = {}
    if (fdir / "oof.csv").exists():
        oof = pd.read_csv(fdir / "oof.csv")
        final["oof_dice_mean"] = float(oof["dice"].mean())
        final["oof_patients"] = float(len(oof))
    if metrics.get("best_val_loss") is not None:
        final["best_val_loss"] = float(metrics["best_val_loss"])
    mlflow.log_metrics(run_id, final)
    for name in ("history.csv", "config.json", "metrics.json", "calibration.json", "oof.csv"):
        if (fdir / name).exists():
            mlflow.client().log_artifact(run_id, str(fdir / name), artifact_path="fold")


OOF_EXTRA_COLUMNS = ("variant", "cv_dir", "cv_run_id")


@dg.asset(
    group_name=GLIOMA,
    kinds={"pytorch", "mlflow", "parquet"},
    owners=[OWNER_ML],
    pool=GPU_POOL,
    code_version="1",
    description=(
        "Patient-level cross-validation of GMMAS on glioma_folds (ml.glioma.cv.run_cv): per fold a model trained on "
        "the other folds (+ the unlabelled pool for UPS) predicts the held-out patients (MC dropout), and again with "
        "every subset of sequences removed. Output: the pooled out-of-fold predictions (probabilities, uncertainty, "
        "tumour voxels, Dice) with the CV folder. MLflow: a parent run `cv-gmmas` and one child run per fold tagged "
        "`fold=<k>` with its per-epoch metrics (Kendall sigma, fusion weights). Identical reruns reuse finished folds."
    ),
)
def glioma_cv_predictions(
    context: dg.AssetExecutionContext,
    config: GliomaCvSettings,
    storage: PsqaStorage,
    compute: ComputeResource,
    mlflow: MlflowResource,
    glioma_training_data: pd.DataFrame,
    glioma_folds: pd.DataFrame,
) -> pd.DataFrame:
    import shutil

    from ml.utils.io import atomic_write_json

    d = glioma_training_data.iloc[0]
    folds = selected_folds(glioma_folds, config.max_patients)
    folds = folds[folds["patient_id"].isin(set(glioma_training_data["patient_id"]))].reset_index(drop=True)
    cfg = train_config(config, compute.plan())
    only = sorted(config.folds) or None
    settings = {"folds_run": only, "mc": config.mc, "missing": config.missing, "max_patients": config.max_patients}
    cv_dir = cv_root(storage, str(d["data_digest"]), folds, cfg.to_dict(), settings)
    if config.fresh and cv_dir.exists():
        shutil.rmtree(cv_dir)
    cv_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(cv_dir / "cv_config.json", {"train": cfg.to_dict(), **settings, "data_digest": d["data_digest"]})
    folds.to_csv(cv_dir / "folds.csv", index=False)
    oof, parent, fold_runs = run_tracked_cv(
        context,
        mlflow,
        str(d["data_dir"]),
        cv_dir,
        folds,
        cfg,
        "gmmas",
        only,
        config.mc,
        config.missing,
        {"glioma/data_digest": str(d["data_digest"])},
    )
    if oof.empty:
        raise dg.Failure(f"no fold finished (budget?): the CV folder {cv_dir} resumes on a rerun")
    mlflow.log_parquet_dataset(
        parent,
        folds,
        cv_dir / "folds.csv",
        name=f"glioma-folds-{d['data_digest']}",
        context="evaluation",
        targets="fold",
    )
    per_fold = (
        oof.groupby("fold")
        .agg(patients=("patient_id", "size"), dice_mean=("dice", "mean"), tumour_voxels=("tumour_voxels", "mean"))
        .reset_index()
    )
    context.add_output_metadata(
        {
            "patients": len(oof),
            "folds_done": dg.MetadataValue.json(sorted(int(k) for k in oof["fold"].unique())),
            "oof_dice_mean": float(oof["dice"].mean()),
            "per_fold": md_table(per_fold, floatfmt=".3f"),
            "predictions": md_table(oof, max_rows=10, floatfmt=".3f"),
            "cv_dir": dg.MetadataValue.path(str(cv_dir)),
            "mlflow_run_id": parent,
            "mlflow_run": dg.MetadataValue.url(mlflow.run_url(parent)),
            "fold_runs": dg.MetadataValue.json({str(k): v for k, v in sorted(fold_runs.items())}),
        }
    )
    out = oof.copy()
    out["variant"] = "gmmas"
    out["cv_dir"] = str(cv_dir)
    out["cv_run_id"] = parent
    return out
