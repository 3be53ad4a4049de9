"""PSQA asset checks: label agreement with the clinic's QA system, a leak-free split, and the
blocking champion/challenger gate in front of ``psqa_champion``."""

import dagster as dg
import pandas as pd


@dg.asset_check(
    asset="qa_label_agreement",
    description=(
        "Our gamma labels reproduce the clinic's QA results: >= 95 % of composite (plan, criterion) pairs within "
        "1 percentage point (a different QA device or gamma software shows up here first)."
    ),
)
def labels_match_clinic_qa(qa_label_agreement: pd.DataFrame) -> dg.AssetCheckResult:
    if len(qa_label_agreement) == 0:
        return dg.AssetCheckResult(passed=True, metadata={"pairs": 0, "note": "no clinic QA results to compare"})
    within = float((qa_label_agreement["diff_pp"].abs() <= 1.0).mean())
    return dg.AssetCheckResult(
        passed=within >= 0.95,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "pairs": len(qa_label_agreement),
            "fraction_within_1pp": within,
            "max_abs_diff_pp": float(qa_label_agreement["diff_pp"].abs().max()),
        },
    )


@dg.asset_check(asset="psqa_split", description="No patient appears in two splits; every labelled plan has a split.")
def split_has_no_leaks(psqa_split: pd.DataFrame) -> dg.AssetCheckResult:
    per_patient = psqa_split.groupby("patient_id")["split"].nunique() if len(psqa_split) else pd.Series(dtype=int)
    leaks = int((per_patient > 1).sum())
    return dg.AssetCheckResult(
        passed=bool(leaks == 0 and psqa_split["split"].notna().all()),
        metadata={
            "patients_in_two_splits": leaks,
            "plans": len(psqa_split),
            "by_split": dg.MetadataValue.json(psqa_split["split"].value_counts().to_dict() if len(psqa_split) else {}),
        },
    )


@dg.asset_check(
    asset="psqa_challenger_eval",
    blocking=True,
    description="Blocks promotion unless the challenger beats the champion on the fixed test split.",
)
def challenger_beats_champion(psqa_challenger_eval: pd.DataFrame) -> dg.AssetCheckResult:
    r = psqa_challenger_eval.iloc[0]
    return dg.AssetCheckResult(
        passed=bool(r["promote"]),
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={
            "reason": str(r["reason"]),
            "challenger_version": str(r["challenger_version"]),
            "champion_version": str(r["champion_version"]),
        },
    )
