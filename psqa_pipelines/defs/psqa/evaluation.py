"""Evaluation, Shapley report and champion/challenger promotion of the PSQA models.

* ``psqa_evaluation``: the ablation table (BMMQA vs every baseline, the mean and the median
  predictor) on
  the test split, per-criterion metrics of BMMQA, plots; one MLflow evaluation run whose metrics
  are linked to the BMMQA logged model, and the headline metrics as tags on its registered version.
* ``psqa_shapley_report``: per-plan Shapley modality contributions (Parquet), contributions over
  training epochs and on the test set, plots; logged into the BMMQA training run.
* ``psqa_challenger_eval`` -> blocking check ``challenger_beats_champion`` (``checks.py``) -> ``psqa_champion``:
  the new BMMQA version (challenger) and the version holding the ``champion`` alias are evaluated
  on the same test split of the current pack (the split is stable across rounds, see
  ``ml.psqa.split``); only if the challenger wins does ``psqa_champion`` move the alias.

The math lives in ``ml.psqa.evaluate``; these assets load, call, log and describe.
"""

import json
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd

from ml.psqa.train import VARIANTS
from psqa_pipelines.constants import CHAMPION_ALIAS, OWNER_ML, PSQA_MODEL_NAME, PSQA_TRAINING
from psqa_pipelines.lib.champion import promote_challenger
from psqa_pipelines.lib.metadata import md_png, md_table
from psqa_pipelines.resources import MlflowResource, PsqaStorage

MODEL_INS = {f"psqa_model_{v}": dg.AssetIn(f"psqa_model_{v}") for v in VARIANTS}


def _metric_key(name: str) -> str:
    out = "".join(c if c.isalnum() or c in "._-" else "_" for c in name.replace("%", "pct").replace("/", "_"))
    while "__" in out:
        out = out.replace("__", "_")
    return out.strip("_").lower()


def _log_linked_metrics(
    mlflow: MlflowResource,
    run_id: str,
    metrics: dict[str, float],
    model_id: str | None,
    dataset_name: str | None = None,
    dataset_digest: str | None = None,
) -> None:
    """Metrics of an evaluation run, linked to the evaluated logged model (MLflow 3 model metrics)."""
    import time

    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    items = [
        Metric(
            k,
            float(v),
            ts,
            0,
            model_id=model_id or None,
            dataset_name=dataset_name,
            dataset_digest=dataset_digest,
            run_id=run_id,
        )
        for k, v in sorted(metrics.items())
        if v is not None and np.isfinite(v)
    ]
    for i in range(0, len(items), 500):
        mlflow.client().log_batch(run_id, metrics=items[i : i + 500])


class PsqaEvaluationSettings(dg.Config):
    split: str = "test"
    n_examples: int = 4


@dg.asset(
    group_name=PSQA_TRAINING,
    kinds={"parquet", "mlflow"},
    owners=[OWNER_ML],
    code_version="1",
    ins=MODEL_INS,
    description="Ablation table on the test split: BMMQA vs tabular-only, image-only, concatenation fusion, BMMQA "
    "without balancing, single-task GPR and DD models, the mean and the median predictor (MAE per criterion, GPR<90 % "
    "subset, AUC/sensitivity/specificity for failing plans, DD SSIM/MAE); plots; an MLflow evaluation run "
    "linked to the BMMQA model version.",
)
def psqa_evaluation(
    context: dg.AssetExecutionContext,
    config: PsqaEvaluationSettings,
    storage: PsqaStorage,
    mlflow: MlflowResource,
    psqa_pack: pd.DataFrame,
    **models: pd.DataFrame,
) -> pd.DataFrame:
    from ml.psqa.dataset import CRITERIA, LABEL_COLUMNS, load_pack
    from ml.psqa.evaluate import ablation_table, gpr_metrics
    from ml.psqa.plots import bland_altman_png, dd_examples_png, scatter_png
    from ml.psqa.predict import predict_models

    pack_row = psqa_pack.iloc[0]
    pack_dir = str(pack_row["pack_dir"])
    rows = {name.removeprefix("psqa_model_"): df.iloc[0] for name, df in models.items()}
    preds = predict_models({v: str(r["model_dir"]) for v, r in rows.items()}, pack_dir, config.split)
    pack = load_pack(pack_dir)
    test = pack.split(config.split)
    table = ablation_table(preds, test, pack.dd_for(test), pack.split("train"))

    bm_df, bm_dd = preds["bmmqa"]
    per_criterion = pd.DataFrame(
        [
            {"criterion": crit, **gpr_metrics(bm_df[f"pred_{col}"].to_numpy(), test[col].to_numpy())}
            for col, crit in zip(LABEL_COLUMNS, CRITERIA, strict=True)
        ]
    )
    gpr_preds = {v: df["pred_gpr_2_2"].to_numpy() for v, (df, _) in preds.items() if "pred_gpr_2_2" in df}
    scatter = scatter_png(gpr_preds, test["gpr_2_2"].to_numpy(), "2%/2mm")
    ba = bland_altman_png(bm_df["pred_gpr_2_2"].to_numpy(), test["gpr_2_2"].to_numpy(), "BMMQA 2%/2mm")
    dd_png = None
    if bm_dd is not None and len(test):
        order = np.argsort(test["gpr_2_2"].to_numpy())  # worst plans first
        pick = order[: max(1, min(config.n_examples, len(order)))]
        idx = test["image_index"].to_numpy()[pick]
        dd_png = dd_examples_png(
            np.asarray(pack.images[idx, 0]),
            np.asarray(pack.dd[idx, 0]),
            bm_dd[pick, 0],
            [f"GPR {g:.1f} %" for g in test["gpr_2_2"].to_numpy()[pick]],
        )

    out_dir = storage.lake / "psqa" / "evaluation" / context.run.run_id
    out_dir.mkdir(parents=True, exist_ok=True)
    table.to_parquet(out_dir / "ablation.parquet", index=False)
    bm = rows["bmmqa"]
    run_id = mlflow.start_run(
        context,
        run_name="evaluate-psqa",
        tags={
            "psqa/kind": "evaluation",
            "psqa/pack_digest": str(pack_row["digest"]),
            "psqa/model_version": str(bm["model_version"]),
            "psqa/training_run": str(bm["mlflow_run_id"]),
        },
    )
    try:
        flat = {}
        for _, r in table.iterrows():
            for k, v in r.items():
                if k != "model" and isinstance(v, (int, float)) and np.isfinite(v):
                    flat[_metric_key(f"{r['model']}.{k}")] = float(v)
        mlflow.log_metrics(run_id, flat)
        bm_metrics = {
            _metric_key(f"test.{r['criterion']}.{k}"): float(v)
            for _, r in per_criterion.iterrows()
            for k, v in r.items()
            if k != "criterion"
        }
        ds_name = f"psqa-pack-{pack_row['digest']}-{config.split}"
        digest = mlflow.log_parquet_dataset(
            run_id,
            test.drop(columns=["image_index"], errors="ignore"),
            Path(pack_dir) / "dataset.parquet",
            name=ds_name,
            context="evaluation",
            targets="gpr_2_2",
        )
        _log_linked_metrics(mlflow, run_id, bm_metrics, str(bm["model_id"]), ds_name, digest)
        mlflow.log_params(
            run_id,
            {
                "split": config.split,
                "n_test": len(test),
                "pack_digest": pack_row["digest"],
                **{f"model_run.{v}": r["mlflow_run_id"] for v, r in rows.items()},
            },
        )
        mlflow.log_artifact_bytes(run_id, table.to_markdown(index=False).encode(), "ablation.md")
        mlflow.client().log_artifact(run_id, str(out_dir / "ablation.parquet"))
        for name, png in (("scatter_2_2.png", scatter), ("bland_altman_bmmqa.png", ba), ("dd_examples.png", dd_png)):
            if png:
                mlflow.log_artifact_bytes(run_id, png, f"plots/{name}")
        mlflow.end_run(run_id)
    except Exception:
        mlflow.end_run(run_id, status="FAILED")
        raise
    if str(bm["model_version"]):
        client = mlflow.client()
        for k in ("mae", "auc"):
            v = float(per_criterion.loc[per_criterion["criterion"] == "2%/2mm", k].iloc[0])
            client.set_model_version_tag(PSQA_MODEL_NAME, str(bm["model_version"]), f"test_{k}_2_2", f"{v:.4f}")
        client.set_model_version_tag(PSQA_MODEL_NAME, str(bm["model_version"]), "evaluation_run", run_id)

    headline = table.set_index("model")
    context.add_output_metadata(
        {
            "ablation": md_table(table, max_rows=12, floatfmt=".3f"),
            "bmmqa_per_criterion": md_table(
                per_criterion[
                    [
                        "criterion",
                        "n",
                        "mae",
                        "rmse",
                        "pearson",
                        "spearman",
                        "n_fail",
                        "mae_fail",
                        "sensitivity",
                        "specificity",
                        "auc",
                    ]
                ],
                floatfmt=".3f",
            ),
            "bmmqa_mae_2_2": float(headline.loc["bmmqa", "MAE 2%/2mm"]),
            "mean_predictor_mae_2_2": float(headline.loc["mean predictor", "MAE 2%/2mm"]),
            "median_predictor_mae_2_2": float(headline.loc["median predictor", "MAE 2%/2mm"]),
            "n_test": len(test),
            "predicted_vs_measured": md_png(scatter, "predicted vs measured"),
            "bland_altman": md_png(ba, "Bland-Altman"),
            "dd_examples": md_png(dd_png, "DD examples"),
            "mlflow_run": dg.MetadataValue.url(mlflow.run_url(run_id)),
        }
    )
    table.insert(0, "evaluation_run_id", run_id)
    return table


@dg.asset(
    group_name=PSQA_TRAINING,
    kinds={"parquet", "mlflow"},
    owners=[OWNER_ML],
    code_version="1",
    description="Shapley modality contributions of BMMQA: per plan and task (Parquet: plan_key, split, task, "
    "phi_image, phi_table = error reduction each modality brings), their means per split, the "
    "contribution curves over training epochs; logged into the BMMQA training run.",
)
def psqa_shapley_report(
    context: dg.AssetExecutionContext,
    storage: PsqaStorage,
    mlflow: MlflowResource,
    psqa_model_bmmqa: pd.DataFrame,
    psqa_pack: pd.DataFrame,
) -> pd.DataFrame:
    from ml.psqa.evaluate import shapley_summary
    from ml.psqa.plots import contribution_curves_png, shapley_bars_png
    from ml.psqa.predict import shapley_table

    bm = psqa_model_bmmqa.iloc[0]
    per_plan = shapley_table(str(bm["model_dir"]), str(psqa_pack.iloc[0]["pack_dir"]))
    summary = shapley_summary(per_plan)
    history = pd.read_csv(Path(bm["model_dir"]) / "history.csv")
    curves = contribution_curves_png(history, title="BMMQA")
    bars = shapley_bars_png(summary, per_plan)
    run_id = str(bm["mlflow_run_id"])
    out = storage.lake / "psqa" / "shapley" / f"{run_id}.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    per_plan.to_parquet(out, index=False)
    mlflow.client().log_artifact(run_id, str(out), artifact_path="shapley")
    mlflow.log_artifact_bytes(run_id, summary.to_markdown(index=False).encode(), "shapley/summary.md")
    mlflow.log_artifact_bytes(run_id, bars, "shapley/contributions.png")
    mlflow.log_artifact_bytes(run_id, curves, "shapley/contribution_curves.png")
    test = summary[summary["split"] == "test"]
    mlflow.log_metrics(
        run_id,
        {f"test_shapley_{r['task']}_{m}": float(r[f"phi_{m}"]) for _, r in test.iterrows() for m in ("image", "table")},
    )
    psi_cols = [c for c in history.columns if c.startswith("psi_")]
    context.add_output_metadata(
        {
            "plans": int(per_plan["plan_key"].nunique()) if len(per_plan) else 0,
            "summary": md_table(summary, floatfmt=".4f"),
            "contributions": md_png(bars, "Shapley contributions"),
            "contribution_curves": md_png(curves, "contribution curves"),
            "final_epoch_psi": dg.MetadataValue.json(
                {c: float(history[c].dropna().iloc[-1]) for c in psi_cols if history[c].notna().any()}
            ),
            "table_path": dg.MetadataValue.path(str(out)),
            "mlflow_run": dg.MetadataValue.url(mlflow.run_url(run_id)),
        }
    )
    return per_plan


class ChampionSettings(dg.Config):
    margin_pp: float = 0.0  # the challenger must be better by more than this (MAE 2%/2mm, percentage points)
    split: str = "test"


@dg.asset(
    group_name=PSQA_TRAINING,
    kinds={"mlflow"},
    owners=[OWNER_ML],
    code_version="1",
    description="Champion/challenger comparison: the newly trained BMMQA version vs the version holding the "
    f"`{CHAMPION_ALIAS}` alias, both evaluated on the fixed test split of the current pack.",
)
def psqa_challenger_eval(
    context: dg.AssetExecutionContext,
    config: ChampionSettings,
    mlflow: MlflowResource,
    psqa_model_bmmqa: pd.DataFrame,
    psqa_pack: pd.DataFrame,
) -> pd.DataFrame:
    from ml.psqa.dataset import load_pack
    from ml.psqa.evaluate import compare_models
    from ml.psqa.predict import predict

    bm = psqa_model_bmmqa.iloc[0]
    champion = mlflow.get_version_by_alias(PSQA_MODEL_NAME, CHAMPION_ALIAS)
    champion_dir = None
    if champion is not None:
        champion_dir = (champion.tags or {}).get("model_dir")
        if str(champion.version) == str(bm["model_version"]):
            context.log.info("the challenger already holds the champion alias")
        if not champion_dir or not Path(champion_dir).exists():
            raise dg.Failure(f"champion v{champion.version} has no local model_dir tag/folder to evaluate")
    pack_dir = str(psqa_pack.iloc[0]["pack_dir"])
    challenger_pred = predict(str(bm["model_dir"]), pack_dir, config.split, device="cpu")[0]
    champion_pred = predict(champion_dir, pack_dir, config.split, device="cpu")[0] if champion_dir else None
    result = compare_models(
        challenger_pred, champion_pred, load_pack(pack_dir).split(config.split), config.split, margin=config.margin_pp
    )
    row = {
        "challenger_version": str(bm["model_version"]),
        "champion_version": "" if champion is None else str(champion.version),
        "challenger_mae_2_2": result["challenger_mae"],
        "champion_mae_2_2": result["champion_mae"],
        "n_test": result["n"],
        "promote": bool(result["promote"]),
        "reason": result["reason"],
        "pack_digest": str(psqa_pack.iloc[0]["digest"]),
        "challenger_model_dir": str(bm["model_dir"]),
    }
    run_id = mlflow.start_run(
        context,
        run_name="champion-challenger",
        tags={
            "psqa/kind": "champion_challenger",
            "psqa/challenger_version": row["challenger_version"],
            "psqa/champion_version": row["champion_version"],
            "psqa/decision": "promote" if row["promote"] else "keep",
        },
    )
    _log_linked_metrics(mlflow, run_id, {"test_mae_2_2": result["challenger_mae"]}, str(bm["model_id"]))
    mlflow.log_metrics(run_id, {"champion_test_mae_2_2": result["champion_mae"]} if champion is not None else {})
    mlflow.end_run(run_id)
    context.add_output_metadata(
        {
            **{k: v for k, v in row.items() if k != "challenger_model_dir"},
            "mlflow_run": dg.MetadataValue.url(mlflow.run_url(run_id)),
        }
    )
    return pd.DataFrame([row])


@dg.asset(
    group_name=PSQA_TRAINING,
    kinds={"mlflow"},
    owners=[OWNER_ML],
    code_version="1",
    deps=[psqa_challenger_eval],
    description=f"Moves the `{CHAMPION_ALIAS}` alias of `{PSQA_MODEL_NAME}` to the challenger; runs only when the "
    "blocking check `challenger_beats_champion` passed.",
)
def psqa_champion(
    context: dg.AssetExecutionContext, mlflow: MlflowResource, psqa_challenger_eval: pd.DataFrame
) -> pd.DataFrame:
    r = psqa_challenger_eval.iloc[0]
    row = promote_challenger(context, mlflow, PSQA_MODEL_NAME, r)
    return pd.DataFrame([{**row, "details": json.dumps({"mae": r["challenger_mae_2_2"]})}])
