"""PSQA data assets: plans -> complexity features, QA planes, labels -> split -> training pack.

Per study that carries an RT Plan (a ``plans`` partition: the sensor adds it when an RTPLAN file
arrives; the ingestion run's study tables feed it key to key; ``plan_qa_job`` runs after the
ingestion, launched by the automation sensor or by ``runner.run_inbox_cycle``): every RT Plan with
its planned (``BEAM``/``PLAN``) and delivered (``RECORD``) RT Dose planes becomes one row of
``plan_complexity`` (+ per-beam rows in ``beam_complexity``), one manifest row in ``qa_planes`` (an
npz with the composite planned and measured planes, the fluence and the dose-difference map) and
label rows in ``qa_labels`` (GPR at four criteria for the composite and each beam, from our
gamma). The lake-wide tables gather them; ``psqa_split`` is stable across retraining rounds;
``psqa_pack`` writes the training pack the ``ml`` trainer reads.
"""

import json

import dagster as dg
import numpy as np
import pandas as pd

from ml.psqa.dataset import LABEL_COLUMNS
from ml.psqa.qa_results import QA_TABLE_COLUMNS, read_qa_results
from ml.utils.io import sha256_bytes, sha256_file
from ml.utils.tables import typed_frame
from psqa_pipelines.constants import OWNER_ML, OWNER_PHYSICS, PSQA
from psqa_pipelines.lib.automation import lake_automation_condition
from psqa_pipelines.lib.metadata import counts_table, md_table
from psqa_pipelines.lib.partitions import all_partitions_in, plans_partitions, same_study
from psqa_pipelines.resources import DeidentificationResource, PsqaStorage

PLAN_ID_COLUMNS = {"study_key": "str", "patient_id": "str", "plan_key": "str", "plan_uid": "str"}
PLANES_COLUMNS = {
    **PLAN_ID_COLUMNS,
    "path": "str",
    "sha256": "str",
    "size": "int64",
    "spacing_mm": "float64",
    "n_beams": "int64",
    "planned_max_gy": "float64",
    "dd_abs_mean": "float64",
}
LABEL_TABLE_COLUMNS = {
    **PLAN_ID_COLUMNS,
    "beam": "int64",
    **dict.fromkeys(LABEL_COLUMNS, "float64"),
    "dd_mean": "float64",
    "dd_abs_mean": "float64",
    "dd_abs_p95": "float64",
}


# after a plan study's ingestion run (its study tables updated), or when the plans partition is new
PLAN_QA_AUTOMATION = dg.AutomationCondition.eager()


def _crit_col(criterion: str) -> str:
    from ml.psqa.dataset import criterion_column

    return criterion_column(criterion)


@dg.multi_asset(
    outs={
        "plan_complexity": dg.AssetOut(
            group_name=PSQA,
            automation_condition=PLAN_QA_AUTOMATION,
            kinds={"parquet"},
            owners=[OWNER_PHYSICS],
            code_version="2",
            description="Plan-level complexity metrics (MCS, LSV, AAV, SAS, edge metric, "
            "leaf travel, PI/PM, MU/Gy, jaws, MI ...) of every RT Plan in the study, with its treatment "
            "machine (de-identified TreatmentMachineName) and QA device (model of the measuring array).",
        ),
        "beam_complexity": dg.AssetOut(
            group_name=PSQA,
            automation_condition=PLAN_QA_AUTOMATION,
            kinds={"parquet"},
            owners=[OWNER_PHYSICS],
            code_version="1",
            description="The same metrics per treatment beam.",
        ),
        "qa_planes": dg.AssetOut(
            group_name=PSQA,
            automation_condition=PLAN_QA_AUTOMATION,
            kinds={"numpy", "parquet"},
            owners=[OWNER_PHYSICS],
            code_version="1",
            description="Manifest of the per-plan QA planes (npz under lake/psqa/planes/: composite "
            "planned and delivered dose, fluence, dose-difference map in % of max).",
        ),
        "qa_labels": dg.AssetOut(
            group_name=PSQA,
            automation_condition=PLAN_QA_AUTOMATION,
            kinds={"parquet"},
            owners=[OWNER_PHYSICS],
            code_version="1",
            description="GPR at 3%/3mm, 3%/2mm, 2%/3mm, 2%/2mm (global, 10 % cutoff, reference = "
            "delivered) for the composite (beam = -1) and each beam; DD statistics.",
        ),
    },
    ins={"study_files": same_study("study_files"), "study_series": same_study("study_series")},
    partitions_def=plans_partitions,
    can_subset=False,
)
def plan_qa(
    context: dg.AssetExecutionContext, storage: PsqaStorage, study_files: pd.DataFrame, study_series: pd.DataFrame
):
    import pydicom

    from ml.data.dicom.headers import quiet_pydicom
    from ml.psqa.pack import compute_plan_qa, machine_identity, save_planes

    key = context.partition_key
    plans = study_series[study_series["modality"] == "RTPLAN"].sort_values("object_key")
    cx_rows, beam_rows, plane_rows, label_rows, skipped = [], [], [], [], []
    for _, prow in plans.iterrows():
        f = study_files[study_files["object_key"] == prow["object_key"]].iloc[0]
        ident = {
            "study_key": key,
            "patient_id": prow["patient_id"],
            "plan_key": prow["object_key"],
            "plan_uid": f["sop_instance_uid"],
        }
        doses = study_series[
            (study_series["modality"] == "RTDOSE") & (study_series["referenced_object_key"] == prow["object_key"])
        ]
        with quiet_pydicom():
            plan_ds = pydicom.dcmread(storage.lake / f["stored_path"])
            dose_ds = [
                pydicom.dcmread(storage.lake / study_files.loc[study_files["object_key"] == ok, "stored_path"].iloc[0])
                for ok in doses["object_key"]
            ]
        try:
            qa = compute_plan_qa(plan_ds, dose_ds)
        except ValueError as exc:
            # a plan without delivered dose yet still gets its complexity features
            from ml.psqa.complexity import complexity_tables
            from ml.psqa.plan import read_plan

            skipped.append({"plan_key": prow["object_key"], "reason": str(exc)})
            try:
                plan = read_plan(plan_ds)
                brows, prow_m = complexity_tables(plan)
            except Exception as exc2:  # noqa: BLE001
                skipped[-1]["reason"] += f"; complexity failed ({type(exc2).__name__})"
                continue
            cx_rows.append({**ident, **prow_m, **machine_identity(plan, dose_ds)})
            beam_rows += [{**ident, **b} for b in brows]
            continue
        cx_rows.append({**ident, **qa.plan_metrics, **qa.machine})
        beam_rows += [{**ident, **b} for b in qa.beam_metrics]
        dest = storage.lake / "psqa" / "planes" / key / f"{prow['object_key']}.npz"
        data = save_planes(dest, qa)
        plane_rows.append(
            {
                **ident,
                "path": dest.relative_to(storage.lake).as_posix(),
                "sha256": sha256_bytes(data),
                "size": qa.planned.shape[0],
                "spacing_mm": qa.spacing_mm,
                "n_beams": qa.n_beams,
                "planned_max_gy": float(qa.planned.max()),
                "dd_abs_mean": float(np.abs(qa.dd).mean()),
            }
        )
        dd_stats = {
            "dd_mean": float(qa.dd.mean()),
            "dd_abs_mean": float(np.abs(qa.dd).mean()),
            "dd_abs_p95": float(np.percentile(np.abs(qa.dd), 95)),
        }
        label_rows.append({**ident, "beam": -1, **{_crit_col(c): v for c, v in qa.gpr.items()}, **dd_stats})
        for b, g in qa.beam_gpr.items():
            label_rows.append({**ident, "beam": b, **{_crit_col(c): v for c, v in g.items()}})
    cx = pd.DataFrame(cx_rows)
    bx = pd.DataFrame(beam_rows)
    planes = typed_frame(plane_rows, PLANES_COLUMNS)
    labels = typed_frame(label_rows, LABEL_TABLE_COLUMNS)
    composite = labels[labels["beam"] == -1]
    yield dg.Output(
        cx,
        output_name="plan_complexity",
        metadata={
            "plans": len(cx),
            "skipped": dg.MetadataValue.json(skipped),
            "metrics": md_table(
                cx.drop(columns=[c for c in PLAN_ID_COLUMNS if c in cx]).T.reset_index() if len(cx) else cx, max_rows=40
            ),
        },
    )
    yield dg.Output(bx, output_name="beam_complexity", metadata={"beams": len(bx)})
    yield dg.Output(planes, output_name="qa_planes", metadata={"plans": len(planes)})
    yield dg.Output(
        labels,
        output_name="qa_labels",
        metadata={
            "plans": len(composite),
            "composite_gpr": md_table(composite[["plan_key", *LABEL_COLUMNS]])
            if len(composite)
            else dg.MetadataValue.md("_(none)_"),
        },
    )


@dg.asset(
    group_name=PSQA,
    deps=["raw_inbox"],
    kinds={"parquet"},
    owners=[OWNER_PHYSICS],
    code_version="1",
    description="The clinic QA system's result exports (CSV in the inbox) de-identified into one table: "
    "patient pseudonym, remapped plan UID, beam (-1 = composite), criterion, GPR.",
)
def qa_results_table(
    context: dg.AssetExecutionContext, storage: PsqaStorage, deid: DeidentificationResource
) -> pd.DataFrame:
    from ml.data.inbox import scan_sources
    from ml.data.quarantine import Quarantine, write_log

    p = deid.pseudonymizer()
    scan = scan_sources(storage.sources(), p, settle_seconds=0)
    frames, rejected, records = [], 0, []
    quarantine = Quarantine(storage.quarantine)
    for name, s in scan.scans.items():
        for ref in s.qa_tables:
            try:
                df, bad = read_qa_results(s.root / ref.relpath, p)
            except ValueError as exc:
                records.append(
                    quarantine.put(
                        s.root / ref.relpath,
                        reason="invalid_content",
                        detail=str(exc),
                        source="qa_results",
                        move=scan.writable[name],
                        relpath=ref.relpath,
                    )
                )
                continue
            frames.append(df)
            rejected += bad
    write_log(storage.quarantine_log, "qa_results", context.run.run_id, records)
    out = pd.concat(frames, ignore_index=True) if frames else typed_frame([], QA_TABLE_COLUMNS)
    out = out.drop_duplicates(["plan_uid", "beam", "criterion"], keep="last")
    out = out.sort_values(["plan_uid", "beam", "criterion"]).reset_index(drop=True)
    context.add_output_metadata(
        {
            "rows": len(out),
            "plans": int(out["plan_uid"].nunique()),
            "rejected_rows": rejected,
            "files_quarantined": len(records),
            "by_criterion": counts_table(out["criterion"], "criterion"),
        }
    )
    return out


psqa_common = dict(group_name=PSQA, owners=[OWNER_ML], automation_condition=lake_automation_condition, code_version="1")


def _gather(parts) -> pd.DataFrame:
    frames = [df for _, df in sorted((parts or {}).items()) if df is not None and len(df)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


@dg.asset(
    ins={"parts": all_partitions_in("plan_complexity")},
    kinds={"parquet"},
    description="Plan-complexity feature table of every plan (the tabular modality).",
    **psqa_common,
)
def psqa_features(context: dg.AssetExecutionContext, parts: dict[str, pd.DataFrame]) -> pd.DataFrame:
    df = _gather(parts)
    if len(df):
        df = df.sort_values("plan_key").reset_index(drop=True)
    context.add_output_metadata({"plans": len(df)})
    return df


@dg.asset(
    ins={"parts": all_partitions_in("qa_labels")},
    kinds={"parquet"},
    description="Composite-plane labels of every measured plan: GPR per criterion and DD statistics.",
    **psqa_common,
)
def psqa_labels(context: dg.AssetExecutionContext, parts: dict[str, pd.DataFrame]) -> pd.DataFrame:
    df = _gather(parts)
    df = (
        df[df["beam"] == -1].sort_values("plan_key").reset_index(drop=True)
        if len(df)
        else typed_frame([], LABEL_TABLE_COLUMNS)
    )
    md = {"plans": len(df)}
    if len(df):
        desc = df[list(LABEL_COLUMNS)].describe(percentiles=[0.05, 0.25, 0.5]).T.reset_index()
        md["gpr_distribution"] = md_table(desc)
        md["fail_rate_2_2"] = float((df["gpr_2_2"] < 90).mean())
    context.add_output_metadata(md)
    return df


@dg.asset(
    ins={"parts": all_partitions_in("qa_planes")},
    kinds={"parquet"},
    description="Manifest of every plan's QA planes.",
    **psqa_common,
)
def psqa_planes(context: dg.AssetExecutionContext, parts: dict[str, pd.DataFrame]) -> pd.DataFrame:
    df = _gather(parts)
    df = df.sort_values("plan_key").reset_index(drop=True) if len(df) else typed_frame([], PLANES_COLUMNS)
    context.add_output_metadata({"plans": len(df)})
    return df


@dg.asset(
    kinds={"parquet"},
    description=(
        "Plan-level train/val/test split (70/15/15), grouped by patient and stratified on GPR < 90 % at 2%/2mm. "
        "Stable: assignments of earlier rounds never change, new patients are added (ml.psqa.split)."
    ),
    **psqa_common,
)
def psqa_split(context: dg.AssetExecutionContext, storage: PsqaStorage, psqa_labels: pd.DataFrame) -> pd.DataFrame:
    from ml.psqa.split import assign_splits

    previous = storage.tables / "psqa_split.parquet"
    existing = pd.read_parquet(previous) if previous.exists() else None
    if len(psqa_labels) == 0:
        return pd.DataFrame(columns=["plan_key", "patient_id", "stratum", "split"])
    split = assign_splits(psqa_labels, existing, seed=0)
    summary = split.groupby(["split", "stratum"]).size().unstack(fill_value=0).reset_index()
    context.add_output_metadata(
        {
            "plans": len(split),
            "new_plans": len(split) - (0 if existing is None else len(existing)),
            "by_split": md_table(summary),
        }
    )
    return split


@dg.asset(
    kinds={"numpy", "parquet"},
    group_name=PSQA,
    owners=[OWNER_ML],
    code_version="1",
    description="The training pack (dataset.parquet + images.npy + dd.npy + meta.json, content-addressed under "
    "lake/psqa/packs/<digest>) that `python -m ml bmmqa train --data` reads, also on a GPU node.",
)
def psqa_pack(
    context: dg.AssetExecutionContext,
    storage: PsqaStorage,
    psqa_features: pd.DataFrame,
    psqa_labels: pd.DataFrame,
    psqa_planes: pd.DataFrame,
    psqa_split: pd.DataFrame,
) -> pd.DataFrame:
    from ml.psqa.complexity import PLAN_METRICS
    from ml.psqa.pack import MACHINE_COLUMNS, build_pack

    feature_columns = [c for c in PLAN_METRICS if c in psqa_features.columns]
    categorical = [c for c in MACHINE_COLUMNS if c in psqa_features.columns]
    digest_src = json.dumps(
        {
            "planes": psqa_planes[["plan_key", "sha256"]].values.tolist(),
            "split": psqa_split[["plan_key", "split"]].values.tolist(),
            "labels": psqa_labels[["plan_key", *LABEL_COLUMNS]].round(6).values.tolist(),
            "features": psqa_features[["plan_key", *feature_columns]].round(9).astype(str).values.tolist(),
            **(
                {"categorical": psqa_features[["plan_key", *categorical]].fillna("").astype(str).values.tolist()}
                if categorical
                else {}
            ),
        },
        sort_keys=True,
    )
    digest = sha256_bytes(digest_src.encode())[:16]
    out = storage.lake / "psqa" / "packs" / digest
    if not (out / "meta.json").exists():
        build_pack(
            out,
            psqa_planes,
            psqa_features,
            psqa_labels,
            psqa_split,
            storage.lake,
            feature_columns,
            categorical_columns=categorical,
        )
    meta = json.loads((out / "meta.json").read_text())
    table = pd.read_parquet(out / "dataset.parquet")
    counts = table["split"].value_counts().to_dict()
    context.add_output_metadata(
        {
            "pack_dir": dg.MetadataValue.path(str(out)),
            "digest": digest,
            "plans": len(table),
            **{f"n_{k}": int(v) for k, v in counts.items()},
            "features": len(meta["feature_columns"]),
            "one_hot_features": dg.MetadataValue.json(meta.get("one_hot_columns", [])),
        }
    )
    return pd.DataFrame(
        [
            {
                "pack_dir": str(out),
                "digest": digest,
                "plans": len(table),
                "n_train": int(counts.get("train", 0)),
                "n_val": int(counts.get("val", 0)),
                "n_test": int(counts.get("test", 0)),
                "dataset_sha256": sha256_file(out / "dataset.parquet"),
            }
        ]
    )


AGREEMENT_COLUMNS = {
    "plan_key": "str",
    "plan_uid": "str",
    "criterion": "str",
    "gpr_pipeline": "float64",
    "gpr_clinic": "float64",
    "diff_pp": "float64",
}


@dg.asset(
    kinds={"parquet"},
    deps=["qa_results_table"],
    description=(
        "Our gamma labels (composite) next to the clinic QA system's reported GPR for the same plan and criterion. "
        "A clinic without a QA export gets an empty table."
    ),
    **psqa_common,
)
def qa_label_agreement(
    context: dg.AssetExecutionContext, storage: PsqaStorage, psqa_labels: pd.DataFrame
) -> pd.DataFrame:
    from ml.psqa.dataset import CRITERIA

    path = storage.tables / "qa_results_table.parquet"
    clinic = pd.read_parquet(path) if path.exists() else typed_frame([], QA_TABLE_COLUMNS)
    clinic = clinic[(clinic["beam"] == -1) & clinic["criterion"].isin(CRITERIA)]
    rows = []
    if len(psqa_labels) and len(clinic):
        ours = psqa_labels.melt(
            id_vars=["plan_key", "plan_uid"],
            value_vars=list(LABEL_COLUMNS),
            var_name="column",
            value_name="gpr_pipeline",
        )
        ours["criterion"] = ours["column"].map(dict(zip(LABEL_COLUMNS, CRITERIA, strict=True)))
        m = ours.merge(clinic.rename(columns={"gpr": "gpr_clinic"}), on=["plan_uid", "criterion"])
        m["diff_pp"] = m["gpr_pipeline"] - m["gpr_clinic"]
        rows = m[list(AGREEMENT_COLUMNS)].to_dict("records")
    out = typed_frame(rows, AGREEMENT_COLUMNS).sort_values(["plan_key", "criterion"]).reset_index(drop=True)
    md = {"pairs": len(out), "plans": int(out["plan_key"].nunique())}
    if len(out):
        md["max_abs_diff_pp"] = float(out["diff_pp"].abs().max())
        md["by_criterion"] = md_table(out.groupby("criterion")["diff_pp"].describe().reset_index(), floatfmt=".3f")
    context.add_output_metadata(md)
    return out
