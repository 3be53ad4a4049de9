"""Contour + dose data assets: cases from the preprocessed lake -> patient split -> compact cache.

The heavy lifting is in ``ml.contour_dose.lake`` (the same cache format the GPU node's
``python -m ml contour-dose train --data CACHE`` reads).
"""

import dagster as dg
import pandas as pd

from psqa_pipelines.constants import CONTOUR_DOSE, OWNER_ML
from psqa_pipelines.lib.metadata import counts_table, md_table
from psqa_pipelines.resources import PsqaStorage

common = dict(group_name=CONTOUR_DOSE, owners=[OWNER_ML], code_version="1")


@dg.asset(
    kinds={"parquet"},
    description=(
        "One row per study usable by the contour + dose models: the canonical CT, possible-dose mask, planned dose "
        "and ROI masks from `volume_manifest` (OpenKBP and DICOM alike), with a status (ok / no_dose / no_oars) and "
        "a digest of the source volumes."
    ),
    **common,
)
def contour_dose_cases(context: dg.AssetExecutionContext, volume_manifest: pd.DataFrame) -> pd.DataFrame:
    from ml.contour_dose.lake import cases_from_manifest

    cases = cases_from_manifest(volume_manifest)
    context.add_output_metadata(
        {
            "cases": len(cases),
            "usable": int(cases["status"].str.startswith("ok").sum()) if len(cases) else 0,
            "by_status": counts_table(cases["status"], "status") if len(cases) else md_table(pd.DataFrame()),
            "by_source": counts_table(cases["source"], "source") if len(cases) else md_table(pd.DataFrame()),
        }
    )
    return cases


@dg.asset(
    kinds={"parquet"},
    description=(
        "Patient-level train/val/test split of the usable cases (0.8/0.1/0.1, fixed by seed 0: 169 OpenKBP patients "
        "-> 135/17/17). Stable: earlier assignments never change, new patients are appended (ml.contour_dose.split). "
        "Every contour + dose model trains and is evaluated on this one split."
    ),
    **common,
)
def contour_dose_split(
    context: dg.AssetExecutionContext, storage: PsqaStorage, contour_dose_cases: pd.DataFrame
) -> pd.DataFrame:
    from ml.contour_dose.split import patient_split

    previous = storage.tables / "contour_dose_split.parquet"
    existing = pd.read_parquet(previous) if previous.exists() else None
    usable = (
        contour_dose_cases[contour_dose_cases["status"].str.startswith("ok")]
        if len(contour_dose_cases)
        else contour_dose_cases
    )
    if existing is not None:  # a patient that left the lake keeps its place (its split never moves)
        existing = existing[["patient_id", "split"]]
    split = (
        patient_split(list(usable["case_id"]), existing, seed=0)
        if len(usable)
        else pd.DataFrame(columns=["patient_id", "split"])
    )
    context.add_output_metadata(
        {
            "patients": len(split),
            "new_patients": len(split) - (0 if existing is None else len(existing)),
            "by_split": dg.MetadataValue.json(split["split"].value_counts().to_dict() if len(split) else {}),
        }
    )
    return split


@dg.asset(
    kinds={"numpy", "parquet"},
    description=(
        "The compact training cache under lake/contour_dose/cache (int16 CT, bit-packed masks, float16 dose, cropped "
        "to the body; index.parquet + meta.json + split.parquet). Incremental: unchanged cases are reused. This folder "
        "is what a GPU node needs: `python -m ml contour-dose train --data <cache>`."
    ),
    **common,
)
def contour_dose_cache(
    context: dg.AssetExecutionContext,
    storage: PsqaStorage,
    contour_dose_cases: pd.DataFrame,
    contour_dose_split: pd.DataFrame,
) -> pd.DataFrame:
    from ml.contour_dose.lake import build_cache
    from ml.utils.io import sha256_bytes

    cache_dir = storage.lake / "contour_dose" / "cache"
    index, skipped = build_cache(
        contour_dose_cases, storage.lake, cache_dir, split=contour_dose_split, log=context.log.warning
    )
    split = pd.read_parquet(cache_dir / "split.parquet")
    digest = sha256_bytes(
        "|".join(
            sorted(
                f"{p}:{d}:{s}"
                for p, d, s in zip(
                    index["patient_id"],
                    index["digest"],
                    index["patient_id"].map(dict(zip(split["patient_id"], split["split"], strict=True))),
                    strict=True,
                )
            )
        ).encode()
    )[:16]
    total = int(index["bytes"].sum())
    context.add_output_metadata(
        {
            "patients": len(index),
            "skipped": len(skipped),
            "bytes": total,
            "mb_per_patient": round(total / max(len(index), 1) / 1e6, 3),
            "digest": digest,
            "cache_dir": dg.MetadataValue.path(str(cache_dir)),
            "skipped_cases": md_table(pd.DataFrame(skipped)) if skipped else "none",
        }
    )
    return pd.DataFrame(
        [
            {
                "cache_dir": str(cache_dir),
                "digest": digest,
                "patients": len(index),
                "bytes": total,
                "train": int((split["split"] == "train").sum()),
                "val": int((split["split"] == "val").sum()),
                "test": int((split["split"] == "test").sum()),
            }
        ]
    )
