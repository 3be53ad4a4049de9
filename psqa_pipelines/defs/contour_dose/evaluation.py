"""Contour + dose evaluation: test-split predictions -> scores, seed tables, figures -> clinic exports.

``ml.contour_dose.evaluate`` computes everything; these assets pass files around, attach
markdown tables and PNGs as metadata, and log an MLflow evaluation run per model version.
"""

import json
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd

from psqa_pipelines.constants import CHAMPION_ALIAS, CONTOUR_DOSE_TRAINING, OWNER_ML
from psqa_pipelines.defs.contour_dose.training import TRAINED_VARIANTS
from psqa_pipelines.lib.metadata import md_png, md_table
from psqa_pipelines.resources import ComputeResource, MlflowResource, PsqaStorage

MODEL_INS = {v.replace("-", "_"): dg.AssetIn(f"contour_dose_model_{v.replace('-', '_')}") for v in TRAINED_VARIANTS}


def _model_dirs(models: dict[str, pd.DataFrame]) -> dict[str, str]:
    return {df.iloc[0]["variant"]: str(df.iloc[0]["model_dir"]) for df in models.values() if len(df)}


@dg.asset(
    ins={"contour_dose_cache": dg.AssetIn(), "contour_dose_split": dg.AssetIn(), **MODEL_INS},
    group_name=CONTOUR_DOSE_TRAINING,
    kinds={"pytorch", "numpy"},
    owners=[OWNER_ML],
    code_version="1",
    description="Every trained model predicts every test-split patient (dose in Gy, zero outside the "
    "possible-dose mask; label maps); the product model (else Multi-Automated) also predicts the "
    "`predict_only` cases (new patients without a dose yet). npz under "
    "lake/contour_dose/predictions/<run>.",
)
def contour_dose_predictions(
    context: dg.AssetExecutionContext,
    storage: PsqaStorage,
    compute: ComputeResource,
    contour_dose_cache: pd.DataFrame,
    contour_dose_split: pd.DataFrame,
    **models: pd.DataFrame,
) -> pd.DataFrame:
    from ml.contour_dose.predict import predict_cases

    cache = contour_dose_cache.iloc[0]
    from ml.contour_dose.cache import Cache

    index = Cache.open(cache["cache_dir"]).index
    test = sorted(
        set(contour_dose_split.loc[contour_dose_split["split"] == "test", "patient_id"]) & set(index["patient_id"])
    )
    if not test:
        raise dg.Failure("the split has no test patients")
    out = storage.lake / "contour_dose" / "predictions" / context.run.run_id
    dirs = _model_dirs(models)
    preds = predict_cases(dirs, cache["cache_dir"], test, out, device=compute.plan().device, log=context.log.info)
    preds["split"] = "test"
    new = sorted(index.loc[~index["has_dose"].astype(bool), "patient_id"])
    clinic = "product" if "product" in dirs else "multi-automated"
    if new and clinic in dirs:
        extra = predict_cases(
            {clinic: dirs[clinic]}, cache["cache_dir"], new, out, device=compute.plan().device, log=context.log.info
        )
        preds = pd.concat([preds, extra.assign(split="inference")], ignore_index=True)
    versions = {
        df.iloc[0]["variant"]: (
            str(df.iloc[0]["registered_model"]),
            str(df.iloc[0]["model_version"]),
            str(df.iloc[0]["mlflow_run_id"]),
        )
        for df in models.values()
        if len(df)
    }
    preds["registered_model"] = preds["variant"].map(lambda v: versions[v][0])
    preds["model_version"] = preds["variant"].map(lambda v: versions[v][1])
    preds["mlflow_run_id"] = preds["variant"].map(lambda v: versions[v][2])
    preds["cache_dir"] = str(cache["cache_dir"])
    context.add_output_metadata(
        {
            "test_patients": len(test),
            "inference_patients": len(new),
            "models": preds["variant"].nunique(),
            "predictions_dir": dg.MetadataValue.path(str(out)),
        }
    )
    return preds


@dg.asset(
    group_name=CONTOUR_DOSE_TRAINING,
    kinds={"parquet", "mlflow"},
    owners=[OWNER_ML],
    code_version="1",
    description="OpenKBP dose and DVH scores per model (official definitions), the seed's DVH-MAE table "
    "(Baseline / Seq-Human / Seq-Automated / Multi-Automated, relative differences, one-sided "
    "paired t-tests with Bonferroni), Dice/HD95 per OAR (contour-only vs Multi-Automated), "
    "DVH curves and best/median/worst cases; logged to MLflow against each model version.",
)
def contour_dose_evaluation(
    context: dg.AssetExecutionContext, mlflow: MlflowResource, contour_dose_predictions: pd.DataFrame
) -> pd.DataFrame:
    from ml.contour_dose.cache import Cache
    from ml.contour_dose.evaluate import case_figure_png, dvh_png, evaluate, markdown_tables, ranked_cases

    cache_dir = contour_dose_predictions["cache_dir"].iloc[0]
    contour_dose_predictions = contour_dose_predictions[contour_dose_predictions["split"] == "test"]
    res = evaluate(contour_dose_predictions, cache_dir)
    scores = res["scores"]
    meta = {"scores": md_table(scores.round(4)), "test_patients": int(contour_dose_predictions["patient_id"].nunique())}
    tables = markdown_tables(res)
    tables.pop("scores.md")  # shown as the scores table above
    for name, text in tables.items():
        meta[name.removesuffix(".md")] = dg.MetadataValue.md(text)
    cache = Cache.open(cache_dir)
    pngs = {}
    focus = "product" if "product" in res["dvh"] else next(iter(res["dvh"]), None)
    if focus:
        ranks = ranked_cases(res["per_patient"], focus)
        for label, pid in ranks.items():
            row = contour_dose_predictions[
                (contour_dose_predictions["variant"] == focus) & (contour_dose_predictions["patient_id"] == pid)
            ].iloc[0]
            with np.load(row["path"]) as z:
                pred = {k: z[k] for k in z.files}
            pngs[f"case_{label}.png"] = case_figure_png(cache.load(pid), pred, f"{focus}: {label} case ({pid})")
        median = ranks["median"]
        doses = {}
        for v in res["dvh"]:
            row = contour_dose_predictions[
                (contour_dose_predictions["variant"] == v) & (contour_dose_predictions["patient_id"] == median)
            ].iloc[0]
            with np.load(row["path"]) as z:
                doses[v] = z["dose"]
        pngs["dvh_median.png"] = dvh_png(cache.load(median), doses, f"DVH, median case ({median})")
        meta["case_median"] = md_png(pngs["case_median.png"], "median case")
        meta["dvh_median"] = md_png(pngs["dvh_median.png"], "DVH")
    # one evaluation run per model version, linked to the model's training run
    out_rows = []
    for _, s in scores.iterrows():
        p = contour_dose_predictions[contour_dose_predictions["variant"] == s["variant"]].iloc[0]
        run_id = mlflow.start_run(
            context,
            run_name=f"evaluate-{s['variant']}",
            tags={
                "contour_dose/variant": s["variant"],
                "contour_dose/evaluates_run": p["mlflow_run_id"],
                "contour_dose/registered_model": p["registered_model"],
                "contour_dose/model_version": p["model_version"],
            },
        )
        metrics = {
            f"test_{k}": float(s[k])
            for k in ("dose_score", "dvh_score", "mean_dice", "mean_hd95_mm")
            if k in s and pd.notna(s[k])
        }
        mlflow.log_metrics(run_id, metrics)
        for name, text in tables.items():
            mlflow.log_artifact_bytes(run_id, text.encode(), f"tables/{name}")
        for name, png in pngs.items():
            mlflow.log_artifact_bytes(run_id, png, f"plots/{name}")
        mlflow.end_run(run_id)
        if p["model_version"]:
            client = mlflow.client()
            for k, v in metrics.items():
                client.set_model_version_tag(p["registered_model"], p["model_version"], k, f"{v:.4f}")
            client.set_model_version_tag(p["registered_model"], p["model_version"], "evaluation_run_id", run_id)
        out_rows.append({**s.to_dict(), "evaluation_run_id": run_id, "model_version": p["model_version"]})
    context.add_output_metadata(meta)
    return pd.DataFrame(out_rows)


@dg.asset(
    group_name=CONTOUR_DOSE_TRAINING,
    kinds={"mlflow", "parquet"},
    owners=[OWNER_ML],
    code_version="1",
    description="Champion/challenger for every registered contour + dose model: the version just evaluated takes "
    "the `champion` alias when it is no worse on every held-out task metric (OpenKBP dose score, mean Dice) and "
    "better on one, against the champion evaluated on the same split (ml.contour_dose.selection); otherwise the "
    "champion stays and the reason is recorded.",
)
def contour_dose_champion(
    context: dg.AssetExecutionContext, mlflow: MlflowResource, contour_dose_evaluation: pd.DataFrame
) -> pd.DataFrame:
    from ml.contour_dose.selection import champion_decision
    from psqa_pipelines.defs.contour_dose.training import registered_name
    from psqa_pipelines.lib.champion import move_champion_alias

    client = mlflow.client()
    rows = []
    for _, r in contour_dose_evaluation.iterrows():
        version = str(r.get("model_version") or "")
        if not version:
            continue
        name = registered_name(str(r["variant"]))
        challenger = dict(client.get_model_version(name, version).tags)
        current = mlflow.get_version_by_alias(name, CHAMPION_ALIAS)
        before = str(current.version) if current is not None else ""
        if before == version:
            decision = {"promote": False, "reason": "already the champion"}
        else:
            decision = champion_decision(challenger, dict(current.tags) if current is not None else None)
        if decision["promote"]:
            move_champion_alias(mlflow, name, version, context.run.run_id)
        rows.append(
            {
                "variant": str(r["variant"]),
                "registered_model": name,
                "challenger_version": version,
                "previous_champion": before,
                "champion_version": version if decision["promote"] else before,
                "promoted": bool(decision["promote"]),
                "reason": decision["reason"],
            }
        )
    out = pd.DataFrame(
        rows,
        columns=[
            "variant",
            "registered_model",
            "challenger_version",
            "previous_champion",
            "champion_version",
            "promoted",
            "reason",
        ],
    )
    context.add_output_metadata(
        {"promoted": int(out["promoted"].sum()), "decisions": md_table(out.drop(columns=["registered_model"]))}
    )
    return out


@dg.asset(
    ins={"contour_dose_cases": dg.AssetIn(), "file_index": dg.AssetIn()},
    group_name=CONTOUR_DOSE_TRAINING,
    kinds={"dicom", "nifti"},
    owners=[OWNER_ML],
    code_version="1",
    description="Files a clinic can open, for each test and new (predict-only) patient with the product model "
    "(else Multi-Automated): "
    "NIfTI dose + label map for all; for DICOM studies also an RT Dose on the CT's frame of "
    "reference and an RT Structure Set referencing the CT series.",
)
def contour_dose_exports(
    context: dg.AssetExecutionContext,
    storage: PsqaStorage,
    contour_dose_predictions: pd.DataFrame,
    contour_dose_cases: pd.DataFrame,
    file_index: pd.DataFrame,
) -> pd.DataFrame:
    from ml.contour_dose.cache import Cache
    from ml.contour_dose.export import export_study
    from ml.data.volume import Volume, read_nifti, resample_to

    preds = contour_dose_predictions
    variant = "product" if (preds["variant"] == "product").any() else "multi-automated"
    preds = preds[preds["variant"] == variant]
    if preds.empty:
        raise dg.Failure("no dose + contour model predictions to export")
    cache = Cache.open(preds["cache_dir"].iloc[0])
    cases = contour_dose_cases.set_index("case_id")
    out_root = storage.lake / "contour_dose" / "exports" / context.run.run_id
    rows = []
    for _, p in preds.iterrows():
        case = cases.loc[p["patient_id"]]
        entry = cache.load(p["patient_id"])
        with np.load(p["path"]) as z:
            pred = {k: z[k] for k in z.files}
        grid = Volume(np.zeros(entry.full_shape, np.uint8), entry.meta["grid_spacing"], entry.meta["grid_origin"])
        ct = read_nifti(storage.lake / case["ct_path"])
        dose = grid.with_array(pred["dose"].astype(np.float32))
        masks = {}
        for i, name in enumerate(pred["rois"], start=1):
            m = resample_to(grid.with_array((pred["labels"] == i).astype(np.uint8)), ct, "nearest").array.astype(bool)
            masks[str(name)] = m
        ct_files = file_index[(file_index["study_key"] == case["study_key"]) & (file_index["modality"] == "CT")]
        out = out_root / p["patient_id"]
        if case["source"] == "dicom" and len(ct_files):
            paths = export_study(
                out,
                ct,
                [storage.lake / s for s in ct_files["stored_path"]],
                dose=dose,
                masks=masks,
                prefix=variant,
                model_version=f"{p['registered_model']}:{p['model_version']}",
            )
        else:  # OpenKBP / NIfTI studies: no DICOM geometry to refer to -> NIfTI only
            from ml.contour_dose.export import export_nifti

            paths = {
                "dose_nifti": export_nifti(
                    resample_to(dose, ct, "linear", 0.0, np.float32), out / f"dose_{variant}.nii.gz"
                )
            }
            label = np.zeros(ct.array.shape, np.uint8)
            for i, name in enumerate(pred["rois"], start=1):
                label[masks[str(name)]] = i
            paths["labels_nifti"] = export_nifti(ct.with_array(label), out / f"labels_{variant}.nii.gz")
            (out / f"labels_{variant}.json").write_text(
                json.dumps({str(i): str(n) for i, n in enumerate(pred["rois"], start=1)}, indent=2)
            )
        for kind, path in paths.items():
            rows.append(
                {
                    "patient_id": p["patient_id"],
                    "study_key": case["study_key"],
                    "source": case["source"],
                    "variant": variant,
                    "kind": kind,
                    "path": str(Path(path)),
                }
            )
    df = pd.DataFrame(rows)
    context.add_output_metadata(
        {
            "patients": int(df["patient_id"].nunique()),
            "files": len(df),
            "by_kind": md_table(df["kind"].value_counts().rename_axis("kind").reset_index()),
            "exports_dir": dg.MetadataValue.path(str(out_root)),
        }
    )
    return df
