"""Contour + dose asset checks: the patient split every model trains and is evaluated on."""

import dagster as dg
import pandas as pd


@dg.asset_check(
    asset="contour_dose_split", blocking=True, description="No patient in two splits; train and val are non-empty."
)
def contour_dose_split_is_sound(contour_dose_split: pd.DataFrame) -> dg.AssetCheckResult:
    split = contour_dose_split
    per = split.groupby("patient_id")["split"].nunique() if len(split) else pd.Series(dtype=int)
    counts = contour_dose_split["split"].value_counts().to_dict() if len(contour_dose_split) else {}
    ok = bool((per <= 1).all() and counts.get("train", 0) > 0 and counts.get("val", 0) > 0)
    return dg.AssetCheckResult(
        passed=ok, metadata={"patients_in_two_splits": int((per > 1).sum()), "by_split": dg.MetadataValue.json(counts)}
    )
