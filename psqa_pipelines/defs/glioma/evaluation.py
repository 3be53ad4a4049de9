"""Glioma evaluation, ablation, missing-modality study, per-patient reports and the champion/challenger rule.

* ``glioma_evaluation``: the pooled out-of-fold (OOF) GMMAS predictions against the baselines on the same
  folds (majority class; radiomics logistic regression on shape + first-order features of the
  *ground-truth* masks -- an optimistic baseline that is handed the reference segmentation), per task AUC
  with bootstrap CI, balanced accuracy, sensitivity, specificity, ECE; segmentation Dice / HD95;
  reliability, ROC and confusion plots. One MLflow evaluation run; the pooled OOF metrics (``oof_score``,
  Dice, AUCs) become tags of the ``glioma-gmmas`` version trained in the same Dagster run.
* ``glioma_ablation``: ``run_cv`` per ablation variant with the CV's settings on the same folds, tabulated
  against GMMAS.
* ``glioma_missing_modality``: Dice / AUC per removed-sequence subset and the learned modality weights.
* ``glioma_reports``: Markdown + HTML report (with figure) per OOF patient under ``<lake>/glioma/reports/``.
* ``glioma_challenger_eval`` -> blocking check ``glioma_challenger_beats_champion`` (``checks.py``) ->
  ``glioma_champion``: the alias ``champion`` moves only when the new version beats the current champion
  on the pooled OOF score (both have one), else on the best validation loss (``ml.glioma.selection``).

The math lives in ``ml.glioma.evaluate``, ``ml.glioma.selection``, ``ml.glioma.report`` and
``ml.glioma.plots``; these assets load files, call, log and describe.
"""

from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
from pydantic import Field

from psqa_pipelines.constants import CHAMPION_ALIAS, GLIOMA, OWNER_ML
from psqa_pipelines.defs.glioma.training import (
    GLIOMA_MODEL_NAME,
    OOF_EXTRA_COLUMNS,
    TASK_NAMES,
    read_cv_config,
    run_tracked_cv,
)
from psqa_pipelines.lib.champion import promote_challenger
from psqa_pipelines.lib.metadata import md_png, md_table
from psqa_pipelines.resources import MlflowResource, PsqaStorage
from psqa_pipelines.resources.compute import GPU_POOL

RADIOMICS_NAME = "radiomics LR (GT masks)"


def _metric_key(name: str) -> str:
    out = "".join(c if c.isalnum() or c in "._-" else "_" for c in name)
    while "__" in out:
        out = out.replace("__", "_")
    return out.strip("_").lower()


def _labels(data_dir: str) -> pd.DataFrame:
    from ml.glioma.data import read_labels

    return read_labels(Path(data_dir) / "labels.csv")[0]


def _patient(data_dir: str, pid: str):
    """One exported patient as ``ml.glioma.data.Patient`` (z-scored, model order), like the benchmark."""
    from ml.glioma.data import load_patient

    return load_patient(Path(data_dir) / "patients" / f"{pid}.npz")


def _oof(cv_predictions: pd.DataFrame) -> tuple[pd.DataFrame, str, str]:
    """(OOF frame without the asset's extra columns, cv_dir, cv run id)."""
    r = cv_predictions.iloc[0]
    return cv_predictions.drop(columns=list(OOF_EXTRA_COLUMNS)), str(r["cv_dir"]), str(r["cv_run_id"])


def _used_folds(cv_dir: str, oof: pd.DataFrame) -> pd.DataFrame:
    """The folds the CV ran on, restricted to the OOF patients (baselines use exactly these)."""
    folds = pd.read_csv(Path(cv_dir) / "folds.csv", dtype={"patient_id": str})
    return folds[folds["patient_id"].isin(set(oof["patient_id"])) | (folds["fold"] < 0)].reset_index(drop=True)


def _log_tables(mlflow: MlflowResource, run_id: str, out_dir: Path, tables: dict[str, pd.DataFrame]) -> None:
    for name, df in tables.items():
        df.to_parquet(out_dir / f"{name}.parquet", index=False)
        mlflow.client().log_artifact(run_id, str(out_dir / f"{name}.parquet"), artifact_path="tables")
        mlflow.log_artifact_bytes(run_id, df.to_markdown(index=False).encode(), f"tables/{name}.md")


# -- evaluation -----------------------------------------------------------------------------------
class GliomaEvaluationSettings(dg.Config):
    n_boot: int = Field(default=2000, description="bootstrap resamples for the AUC confidence intervals")
    seed: int = 0


@dg.asset(
    group_name=GLIOMA,
    kinds={"parquet", "mlflow"},
    owners=[OWNER_ML],
    code_version="1",
    ins={
        "glioma_cv_predictions": dg.AssetIn(),
        "glioma_training_data": dg.AssetIn(),
        "glioma_model": dg.AssetIn(),
    },
    description=(
        "Pooled out-of-fold evaluation of GMMAS against baselines on the same folds: majority class and a radiomics "
        "logistic regression on shape + first-order features of the ground-truth masks (optimistic: it is given "
        "the reference segmentation). Per task AUC with bootstrap 95 % CI, balanced accuracy, sensitivity, "
        "specificity, ECE; Dice and HD95 per patient; reliability, ROC and confusion plots (metadata and MLflow "
        "artifacts of an evaluation run). The OOF metrics become tags of the glioma-gmmas version (oof_score = mean "
        "of mean Dice and the task AUCs, used by the champion rule). Output: the model x task comparison table."
    ),
)
def glioma_evaluation(
    context: dg.AssetExecutionContext,
    config: GliomaEvaluationSettings,
    storage: PsqaStorage,
    mlflow: MlflowResource,
    glioma_cv_predictions: pd.DataFrame,
    glioma_training_data: pd.DataFrame,
    glioma_model: pd.DataFrame,
) -> pd.DataFrame:
    from ml.glioma.cv import load_oof_masks
    from ml.glioma.data import SEQUENCES
    from ml.glioma.evaluate import (
        classification_table,
        compare_table,
        confusion_png,
        majority_baseline,
        radiomics_baseline,
        radiomics_features,
        reliability_png,
        roc_png,
        segmentation_table,
    )
    from ml.glioma.selection import variant_summary

    data_dir = str(glioma_training_data.iloc[0]["data_dir"])
    oof, cv_dir, cv_run = _oof(glioma_cv_predictions)
    labels = _labels(data_dir)
    folds = _used_folds(cv_dir, oof)
    ids = sorted(oof["patient_id"])

    pred_masks = load_oof_masks(cv_dir)
    patients = {pid: _patient(data_dir, pid) for pid in ids}
    true_masks = {pid: p.mask for pid, p in patients.items() if p.mask is not None}
    seg = segmentation_table(pred_masks, true_masks)
    feats = pd.DataFrame(
        [
            {
                "patient_id": pid,
                **radiomics_features(p.image, p.mask, channels=SEQUENCES, present=p.present),
            }
            for pid, p in patients.items()
            if p.mask is not None
        ]
    )
    preds = {
        "GMMAS": oof,
        "majority": majority_baseline(labels, folds),
        RADIOMICS_NAME: radiomics_baseline(feats, labels, folds, seed=config.seed),
    }
    preds = {k: v[v["patient_id"].isin(set(ids))].reset_index(drop=True) for k, v in preds.items()}
    tables = {k: classification_table(v, labels, n_boot=config.n_boot, seed=config.seed) for k, v in preds.items()}
    compare = compare_table(tables)
    summary = variant_summary(oof, labels, n_boot=config.n_boot, seed=config.seed)
    seg_summary = pd.DataFrame(
        [
            {
                "patients": len(seg),
                "dice_mean": float(seg["dice"].mean()) if len(seg) else float("nan"),
                "dice_median": float(seg["dice"].median()) if len(seg) else float("nan"),
                "dice_std": float(seg["dice"].std()) if len(seg) else float("nan"),
                "hd95_median": float(seg["hd95"].median()) if len(seg) else float("nan"),
                "hd95_units": "voxels of the 128 x 128 training grid (lgg-mri records no geometry)",
            }
        ]
    )
    plots = {}
    for t in TASK_NAMES:
        plots[f"roc_{t}"] = roc_png(preds, labels, t)
        plots[f"reliability_{t}"] = reliability_png(oof, labels, t)
        plots[f"confusion_{t}"] = confusion_png(oof, labels, t)

    out_dir = storage.lake / "glioma" / "evaluation" / context.run.run_id
    out_dir.mkdir(parents=True, exist_ok=True)
    model = glioma_model.iloc[0]
    version = str(model["model_version"])
    run_id = mlflow.start_run(
        context,
        run_name="evaluate-glioma",
        tags={
            "glioma/kind": "evaluation",
            "glioma/model_version": version,
            "glioma/training_run": str(model["mlflow_run_id"]),
            "glioma/cv_run": cv_run,
            "glioma/data_digest": str(glioma_training_data.iloc[0]["data_digest"]),
        },
    )
    try:
        flat = {
            _metric_key(f"{r['model']}.{r['task']}.{k}"): float(r[k])
            for _, r in compare.iterrows()
            for k in ("auc", "auc_lo", "auc_hi", "balanced_accuracy", "ece")
            if np.isfinite(r[k])
        }
        flat.update({f"gmmas.{k}": float(v) for k, v in summary.items() if isinstance(v, float) and np.isfinite(v)})
        flat.update({f"seg.{k}": float(v) for k, v in seg_summary.iloc[0].items() if isinstance(v, float)})
        mlflow.log_metrics(run_id, {k: v for k, v in flat.items() if np.isfinite(v)})
        mlflow.log_params(
            run_id,
            {
                "n_patients": len(ids),
                "n_boot": config.n_boot,
                "cv_dir": cv_dir,
                "radiomics_masks": "ground truth (optimistic baseline)",
                "model_version": version,
            },
        )
        _log_tables(
            mlflow,
            run_id,
            out_dir,
            {
                "comparison": compare,
                **{f"classification_{_metric_key(k)}": v for k, v in tables.items()},
                "segmentation": seg,
                "radiomics_features": feats,
            },
        )
        for name, png in plots.items():
            mlflow.log_artifact_bytes(run_id, png, f"plots/{name}.png")
        mlflow.end_run(run_id)
    except Exception:
        mlflow.end_run(run_id, status="FAILED")
        raise
    if version:
        client = mlflow.client()
        tags = {
            "oof_score": summary["score"],
            "oof_dice_mean": summary["dice_mean"],
            **{f"oof_auc_{t}": summary[f"auc_{t}"] for t in TASK_NAMES},
        }
        for k, v in tags.items():
            client.set_model_version_tag(GLIOMA_MODEL_NAME, version, k, f"{v:.4f}" if np.isfinite(v) else "nan")
        client.set_model_version_tag(GLIOMA_MODEL_NAME, version, "evaluation_run", run_id)
    context.add_output_metadata(
        {
            "patients": len(ids),
            "comparison": md_table(compare.drop(columns=["auc", "auc_lo", "auc_hi"]), max_rows=20, floatfmt=".3f"),
            "gmmas_classification": md_table(tables["GMMAS"], floatfmt=".3f"),
            "segmentation_summary": md_table(seg_summary, floatfmt=".3f"),
            "segmentation": md_table(seg, max_rows=10, floatfmt=".3f"),
            "oof_score": float(summary["score"]),
            "oof_dice_mean": float(summary["dice_mean"]),
            "radiomics_note": "radiomics features are computed on the ground-truth masks (not the predicted ones)",
            **{k: md_png(v, k.replace("_", " ")) for k, v in plots.items()},
            "tables_dir": dg.MetadataValue.path(str(out_dir)),
            "mlflow_run": dg.MetadataValue.url(mlflow.run_url(run_id)),
        }
    )
    compare.insert(0, "evaluation_run_id", run_id)
    return compare


# -- ablation -------------------------------------------------------------------------------------
class GliomaAblationSettings(dg.Config):
    variants: list[str] = Field(
        default=["equal_weights", "no_cutmix"],
        description="ml.glioma.cv.VARIANTS to compare with GMMAS (equal_weights, no_cutmix, no_pseudo, no_distill, "
        "stl_<task>, stl_seg); trained with the CV's settings on the same folds",
    )
    folds: list[int] = Field(default=[], description="folds to run (empty = the folds the GMMAS CV ran)")
    n_boot: int = Field(default=1000, description="bootstrap resamples for the AUC confidence intervals")


@dg.asset(
    group_name=GLIOMA,
    kinds={"pytorch", "mlflow", "parquet"},
    owners=[OWNER_ML],
    pool=GPU_POOL,
    code_version="1",
    ins={"glioma_cv_predictions": dg.AssetIn(), "glioma_training_data": dg.AssetIn()},
    description=(
        "Ablation of GMMAS: each configured variant (default equal_weights = no Kendall weighting, no_cutmix) is "
        "cross-validated with the GMMAS CV's settings on the same folds and patients (ml.glioma.cv.run_cv; one "
        "MLflow parent run per variant, child runs per fold) and tabulated against GMMAS: mean Dice, AUC per task "
        "with CI, ECE before/after temperature, pooled score and the paired differences to GMMAS (bootstrap CIs over "
        "patients, ml.glioma.selection.ablation_table)."
    ),
)
def glioma_ablation(
    context: dg.AssetExecutionContext,
    config: GliomaAblationSettings,
    mlflow: MlflowResource,
    glioma_cv_predictions: pd.DataFrame,
    glioma_training_data: pd.DataFrame,
) -> pd.DataFrame:
    from ml.glioma.cv import VARIANTS
    from ml.glioma.plots import ablation_png
    from ml.glioma.selection import ablation_table

    unknown = sorted(set(config.variants) - set(VARIANTS))
    if unknown:
        raise dg.Failure(f"unknown ablation variants {unknown}; choose from {sorted(VARIANTS)}")
    d = glioma_training_data.iloc[0]
    oof, cv_dir, _ = _oof(glioma_cv_predictions)
    base, settings = read_cv_config(cv_dir)
    folds = pd.read_csv(Path(cv_dir) / "folds.csv", dtype={"patient_id": str})
    only = sorted(config.folds) or settings.get("folds_run")
    oofs = {"gmmas": oof}
    runs = {"gmmas": str(glioma_cv_predictions.iloc[0]["cv_run_id"])}
    for variant in [v for v in config.variants if v != "gmmas"]:
        v_oof, parent, _ = run_tracked_cv(
            context,
            mlflow,
            str(d["data_dir"]),
            Path(cv_dir),
            folds,
            base,
            variant,
            only,
            int(settings.get("mc", 10)),
            False,
            {"glioma/data_digest": str(d["data_digest"]), "glioma/ablation": "true"},
        )
        oofs[variant] = v_oof
        runs[variant] = parent
    common = set.intersection(*(set(df["patient_id"]) for df in oofs.values()))
    oofs = {k: v[v["patient_id"].isin(common)].reset_index(drop=True) for k, v in oofs.items()}
    table = ablation_table(oofs, _labels(str(d["data_dir"])), reference="gmmas", n_boot=config.n_boot)
    table["cv_run_id"] = table["variant"].map(runs)
    png = ablation_png(table)
    for variant, run_id in runs.items():
        if variant != "gmmas":
            mlflow.log_artifact_bytes(run_id, table.to_markdown(index=False).encode(), "ablation/table.md")
            if png:
                mlflow.log_artifact_bytes(run_id, png, "ablation/ablation.png")
    shown = [
        "variant",
        "n_patients",
        "dice_mean",
        "delta_dice_mean",
        "delta_dice_mean_lo",
        "delta_dice_mean_hi",
        *(f"auc_{t}" for t in TASK_NAMES),
        *(f"delta_auc_{t}" for t in TASK_NAMES),
        "score",
        "delta_score",
    ]
    context.add_output_metadata(
        {
            "variants": len(table),
            "patients": len(common),
            "ablation": md_table(table[[c for c in shown if c in table]], floatfmt=".3f"),
            "ablation_plot": md_png(png, "ablation"),
            "cv_runs": dg.MetadataValue.json(runs),
        }
    )
    return table


# -- missing modality -----------------------------------------------------------------------------
@dg.asset(
    group_name=GLIOMA,
    kinds={"parquet", "mlflow"},
    owners=[OWNER_ML],
    code_version="1",
    ins={"glioma_cv_predictions": dg.AssetIn(), "glioma_training_data": dg.AssetIn(), "glioma_model": dg.AssetIn()},
    description=(
        "Missing-modality robustness of GMMAS: every held-out fold predicted again with each subset of the acquired "
        "sequences removed (fusion weight zeroed; ml.glioma.cv missing_<subset>.csv) -> mean Dice and AUC per "
        "removed subset against the full input; and the learned modality fusion weights of every fold model and "
        "of the final model. Logged into the GMMAS CV run."
    ),
)
def glioma_missing_modality(
    context: dg.AssetExecutionContext,
    mlflow: MlflowResource,
    glioma_cv_predictions: pd.DataFrame,
    glioma_training_data: pd.DataFrame,
    glioma_model: pd.DataFrame,
) -> pd.DataFrame:
    import json

    from ml.glioma.cv import load_oof
    from ml.glioma.data import SEQUENCES
    from ml.glioma.plots import missing_modality_png
    from ml.glioma.selection import missing_modality_table

    _, cv_dir, cv_run = _oof(glioma_cv_predictions)
    oof, missing = load_oof(cv_dir, "gmmas")
    table = missing_modality_table(oof, missing, _labels(str(glioma_training_data.iloc[0]["data_dir"])))
    weights = []
    for f in sorted((Path(cv_dir) / "gmmas").glob("fold*/metrics.json")):
        m = json.loads(f.read_text())
        weights.append({"model": f.parent.name, **{s: m.get(f"w_{s}") for s in SEQUENCES}})
    final = Path(str(glioma_model.iloc[0]["model_dir"])) / "metrics.json"
    if final.exists():
        m = json.loads(final.read_text())
        weights.append({"model": "final", **{s: m.get(f"w_{s}") for s in SEQUENCES}})
    weights = pd.DataFrame(weights)
    png = missing_modality_png(table)
    mlflow.log_metrics(
        cv_run,
        {
            _metric_key(f"missing.{r['removed']}.{k}"): float(r[k])
            for _, r in table.iterrows()
            for k in ("dice_mean", "score")
            if np.isfinite(r[k])
        },
    )
    mlflow.log_artifact_bytes(cv_run, table.to_markdown(index=False).encode(), "missing_modality/table.md")
    mlflow.log_artifact_bytes(cv_run, weights.to_markdown(index=False).encode(), "missing_modality/weights.md")
    if png:
        mlflow.log_artifact_bytes(cv_run, png, "missing_modality/missing_modality.png")
    shown = ["removed", "n_patients", "dice_mean", "delta_dice_mean", *(f"auc_{t}" for t in TASK_NAMES), "score"]
    context.add_output_metadata(
        {
            "subsets": int((table["removed"] != "none").sum()) if len(table) else 0,
            "missing_modality": md_table(table[[c for c in shown if c in table]], floatfmt=".3f"),
            "modality_weights": md_table(weights, floatfmt=".3f"),
            "missing_modality_plot": md_png(png, "missing modality"),
            "mlflow_run": dg.MetadataValue.url(mlflow.run_url(cv_run)),
        }
    )
    return table


# -- reports --------------------------------------------------------------------------------------
@dg.asset(
    group_name=GLIOMA,
    kinds={"html", "markdown", "mlflow"},
    owners=[OWNER_ML],
    code_version="1",
    ins={
        "glioma_cv_predictions": dg.AssetIn(),
        "glioma_training_data": dg.AssetIn(),
        "glioma_evaluation": dg.AssetIn(),
    },
    description=(
        "Per-patient reports (ml.glioma.report: tumour volume and location, every prediction with probability, "
        "MC-dropout uncertainty and call, WHO CNS5 mapping, calibration caveat with the OOF ECE, a figure with the "
        "predicted and reference contours, the true labels for review, a disclaimer) for every out-of-fold patient: "
        "`<lake>/glioma/reports/<patient>.md|.html|.png`, also MLflow artifacts of the GMMAS CV run."
    ),
)
def glioma_reports(
    context: dg.AssetExecutionContext,
    storage: PsqaStorage,
    mlflow: MlflowResource,
    glioma_cv_predictions: pd.DataFrame,
    glioma_training_data: pd.DataFrame,
    glioma_evaluation: pd.DataFrame,
) -> pd.DataFrame:
    from ml.glioma.cv import load_oof_masks
    from ml.glioma.report import patient_report, report_figure_png
    from ml.utils.io import atomic_write_bytes, atomic_write_text

    data_dir = str(glioma_training_data.iloc[0]["data_dir"])
    oof, cv_dir, cv_run = _oof(glioma_cv_predictions)
    labels = _labels(data_dir).set_index("patient_id")
    masks = load_oof_masks(cv_dir)
    gm = glioma_evaluation[glioma_evaluation["model"] == "GMMAS"]
    ece = {str(r["task"]): float(r["ece"]) for _, r in gm.iterrows()}
    out = storage.lake / "glioma" / "reports"
    out.mkdir(parents=True, exist_ok=True)
    current = set(oof["patient_id"].astype(str))
    for f in out.iterdir():  # the folder holds the latest reports only (it is logged as a whole)
        if f.is_file() and f.suffix in (".md", ".html", ".png") and f.stem not in current:
            f.unlink()
    rows = []
    for pred in oof.sort_values("patient_id").to_dict("records"):
        pid = str(pred["patient_id"])
        p = _patient(data_dir, pid)
        mask = masks.get(pid)
        true_row = labels.loc[pid].to_dict() if pid in labels.index else None
        fig = report_figure_png(p.image, mask, p.mask, present=p.present) if mask is not None else None
        kw = dict(mask=mask, spacing=p.spacing, true_row=true_row, figure_png=fig, ece=ece)
        md = patient_report(pred, fmt="md", figure_name=f"{pid}.png", **kw)
        html = patient_report(pred, fmt="html", **kw)
        atomic_write_text(out / f"{pid}.md", md)
        atomic_write_text(out / f"{pid}.html", html)
        if fig:
            atomic_write_bytes(out / f"{pid}.png", fig)
        rows.append(
            {
                "patient_id": pid,
                "fold": int(pred["fold"]),
                "markdown": str(out / f"{pid}.md"),
                "html": str(out / f"{pid}.html"),
                "figure": str(out / f"{pid}.png") if fig else "",
            }
        )
    table = pd.DataFrame(rows, columns=["patient_id", "fold", "markdown", "html", "figure"])
    mlflow.client().log_artifacts(cv_run, str(out), artifact_path="reports")
    sample = table.iloc[0] if len(table) else None
    preview = {}
    if sample is not None:
        text = Path(sample["markdown"]).read_text()
        preview["sample_report"] = dg.MetadataValue.md(text.replace(f"]({sample['patient_id']}.png)", "](figure)"))
        if sample["figure"]:
            preview["sample_figure"] = md_png(Path(sample["figure"]).read_bytes(), "report figure")
    context.add_output_metadata(
        {
            "reports": len(table),
            "reports_dir": dg.MetadataValue.path(str(out)),
            **preview,
            "mlflow_run": dg.MetadataValue.url(mlflow.run_url(cv_run)),
        }
    )
    return table


# -- champion / challenger ------------------------------------------------------------------------
class GliomaChampionSettings(dg.Config):
    margin: float = Field(
        default=0.0, description="the challenger must be better by more than this (oof_score or val_loss units)"
    )


def _version_metrics(tags: dict) -> dict[str, float]:
    out = {}
    for key, tag in (("oof_score", "oof_score"), ("val_loss", "best_val_loss")):
        try:
            out[key] = float(tags.get(tag, "nan"))
        except ValueError:
            out[key] = float("nan")
    return out


@dg.asset(
    group_name=GLIOMA,
    kinds={"mlflow"},
    owners=[OWNER_ML],
    code_version="1",
    ins={"glioma_model": dg.AssetIn(), "glioma_evaluation": dg.AssetIn()},
    description=(
        f"Champion/challenger comparison of `{GLIOMA_MODEL_NAME}`: the newly trained version (challenger) against the "
        f"version holding the `{CHAMPION_ALIAS}` alias, on the pooled OOF score (mean of mean Dice and the task "
        "AUCs, version tag `oof_score`, higher is better) when both versions have one, else on the best validation "
        "loss (`best_val_loss`, lower is better). No champion yet: the challenger wins."
    ),
)
def glioma_challenger_eval(
    context: dg.AssetExecutionContext,
    config: GliomaChampionSettings,
    mlflow: MlflowResource,
    glioma_model: pd.DataFrame,
    glioma_evaluation: pd.DataFrame,
) -> pd.DataFrame:
    from ml.glioma.selection import champion_decision

    version = str(glioma_model.iloc[0]["model_version"])
    client = mlflow.client()
    challenger = _version_metrics(client.get_model_version(GLIOMA_MODEL_NAME, version).tags or {})
    champion = mlflow.get_version_by_alias(GLIOMA_MODEL_NAME, CHAMPION_ALIAS)
    if champion is not None and str(champion.version) == version:
        context.log.info("the challenger already holds the champion alias")
    decision = champion_decision(
        challenger, None if champion is None else _version_metrics(champion.tags or {}), config.margin
    )
    row = {
        "challenger_version": version,
        "champion_version": "" if champion is None else str(champion.version),
        "metric": decision["metric"],
        "challenger_value": decision["challenger_value"],
        "champion_value": decision["champion_value"],
        "promote": bool(decision["promote"]),
        "reason": decision["reason"],
    }
    run_id = mlflow.start_run(
        context,
        run_name="champion-challenger-glioma",
        tags={
            "glioma/kind": "champion_challenger",
            "glioma/challenger_version": row["challenger_version"],
            "glioma/champion_version": row["champion_version"],
            "glioma/decision": "promote" if row["promote"] else "keep",
        },
    )
    mlflow.log_metrics(
        run_id,
        {
            k: v
            for k, v in (("challenger_value", row["challenger_value"]), ("champion_value", row["champion_value"]))
            if np.isfinite(v)
        },
    )
    mlflow.log_params(run_id, {"metric": row["metric"], "margin": config.margin, "reason": row["reason"]})
    mlflow.end_run(run_id)
    context.add_output_metadata({**row, "mlflow_run": dg.MetadataValue.url(mlflow.run_url(run_id))})
    return pd.DataFrame([row])


@dg.asset(
    group_name=GLIOMA,
    kinds={"mlflow"},
    owners=[OWNER_ML],
    code_version="1",
    deps=[glioma_challenger_eval],
    description=f"Moves the `{CHAMPION_ALIAS}` alias of `{GLIOMA_MODEL_NAME}` to the challenger; runs only when the "
    "blocking check `glioma_challenger_beats_champion` passed.",
)
def glioma_champion(
    context: dg.AssetExecutionContext, mlflow: MlflowResource, glioma_challenger_eval: pd.DataFrame
) -> pd.DataFrame:
    r = glioma_challenger_eval.iloc[0]
    row = promote_challenger(context, mlflow, GLIOMA_MODEL_NAME, r)
    return pd.DataFrame([{**row, "metric": str(r["metric"])}])[
        ["champion_version", "previous_champion", "metric", "reason"]
    ]
