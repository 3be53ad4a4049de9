"""Glioma asset checks: the label table and the cross-validation folds every model relies on, and the
blocking champion/challenger gate in front of ``glioma_champion``."""

import dagster as dg
import pandas as pd


@dg.asset_check(
    asset="glioma_labels",
    additional_ins={"glioma_cases": dg.AssetIn("glioma_cases")},
    blocking=True,
    description="Label values within the vocabulary, one row per patient, every patient known to glioma_cases.",
)
def glioma_labels_are_sound(glioma_labels: pd.DataFrame, glioma_cases: pd.DataFrame) -> dg.AssetCheckResult:
    from ml.glioma.data import TASKS

    labels = glioma_labels
    outside = {
        t: int((labels[t].notna() & ~labels[t].isin(TASKS[t])).sum()) if t in labels else len(labels) for t in TASKS
    }
    duplicates = int(labels["patient_id"].duplicated().sum())
    known = set(glioma_cases["patient_id"])
    unknown = int((~labels["patient_id"].isin(known)).sum())
    without_labels = len(known - set(labels["patient_id"]))
    ok = not any(outside.values()) and duplicates == 0 and unknown == 0 and without_labels == 0
    return dg.AssetCheckResult(
        passed=bool(ok),
        metadata={
            "values_outside_vocabulary": dg.MetadataValue.json(outside),
            "duplicate_patients": duplicates,
            "patients_unknown_to_glioma_cases": unknown,
            "cases_without_label_row": without_labels,
        },
    )


@dg.asset_check(
    asset="glioma_folds",
    additional_ins={"glioma_labels": dg.AssetIn("glioma_labels")},
    blocking=True,
    description="No patient in two folds; every labelled patient has a fold, unlabelled ones are in the pool (-1).",
)
def glioma_folds_are_sound(glioma_folds: pd.DataFrame, glioma_labels: pd.DataFrame) -> dg.AssetCheckResult:
    folds = glioma_folds
    per = folds.groupby("patient_id")["fold"].nunique() if len(folds) else pd.Series(dtype=int)
    in_two = int((per > 1).sum()) + int(folds["patient_id"].duplicated().sum())
    missing = len(set(glioma_labels["patient_id"]) - set(folds["patient_id"]))
    counts = folds.loc[folds["fold"] >= 0, "fold"].value_counts()
    spread = int(counts.max() - counts.min()) if len(counts) else 0
    ok = in_two == 0 and missing == 0 and spread <= 1
    return dg.AssetCheckResult(
        passed=bool(ok),
        metadata={
            "patients_in_two_folds": in_two,
            "patients_without_fold": missing,
            "fold_size_spread": spread,
            "by_fold": dg.MetadataValue.json({str(k): int(v) for k, v in sorted(counts.items())}),
        },
    )


@dg.asset_check(
    asset="glioma_challenger_eval",
    blocking=True,
    description="Blocks the glioma-gmmas champion alias unless the challenger beats the champion (pooled OOF score, "
    "else best validation loss).",
)
def glioma_challenger_beats_champion(glioma_challenger_eval: pd.DataFrame) -> dg.AssetCheckResult:
    r = glioma_challenger_eval.iloc[0]
    return dg.AssetCheckResult(
        passed=bool(r["promote"]),
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={
            "reason": str(r["reason"]),
            "metric": str(r["metric"]),
            "challenger_version": str(r["challenger_version"]),
            "champion_version": str(r["champion_version"]),
        },
    )
