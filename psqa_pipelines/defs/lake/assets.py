"""Lake-wide tables: the per-study partitions gathered into the tables models read.

They update on their own (declarative automation) whenever a study partition is
materialised; partitions that failed or were never materialised are skipped, not fatal.
"""

import dagster as dg
import pandas as pd

from ml.data.ingest import FILE_COLUMNS, SERIES_COLUMNS
from ml.data.preprocess import MANIFEST_COLUMNS
from ml.data.quarantine import read_log
from ml.utils.tables import typed_frame
from psqa_pipelines.constants import LAKE, OWNER_DATA
from psqa_pipelines.lib.automation import lake_automation_condition
from psqa_pipelines.lib.metadata import counts_table, md_table
from psqa_pipelines.lib.partitions import all_partitions_in
from psqa_pipelines.resources import PsqaStorage

STUDY_COLUMNS = {
    "study_key": "str",
    "patient_id": "str",
    "source": "str",
    "modalities": "str",
    "n_series": "int64",
    "n_volumes": "int64",
    "has_ct": "bool",
    "has_structures": "bool",
    "has_dose": "bool",
    "has_mr": "bool",
    "has_plan": "bool",
    "roi_names": "str",
    "mr_sequences": "str",
}


def _concat(parts: dict[str, pd.DataFrame] | None, columns: dict[str, str]) -> pd.DataFrame:
    frames = [df for _, df in sorted((parts or {}).items()) if df is not None and len(df)]
    if not frames:
        return typed_frame([], columns)
    return pd.concat(frames, ignore_index=True)[list(columns)]


common = dict(group_name=LAKE, owners=[OWNER_DATA], automation_condition=lake_automation_condition, code_version="1")


@dg.asset(
    ins={"parts": all_partitions_in("study_files")},
    kinds={"parquet"},
    description="DICOM/NIfTI/OpenKBP file index: one row per ingested file of every study "
    "(pseudonymous ids, modality, SOP class, geometry, sha256 of stored copy and source).",
    **common,
)
def file_index(context: dg.AssetExecutionContext, parts: dict[str, pd.DataFrame]) -> pd.DataFrame:
    df = _concat(parts, FILE_COLUMNS)
    context.add_output_metadata(
        {
            "studies": int(df["study_key"].nunique()),
            "by_modality": counts_table(df["modality"], "modality"),
            "by_source": counts_table(df["source"], "source"),
        }
    )
    return df


@dg.asset(
    ins={"parts": all_partitions_in("study_series")},
    kinds={"parquet"},
    description="Series/object table: one row per image series or RT object of every study.",
    **common,
)
def series_index(context: dg.AssetExecutionContext, parts: dict[str, pd.DataFrame]) -> pd.DataFrame:
    df = _concat(parts, SERIES_COLUMNS)
    context.add_output_metadata(
        {"studies": int(df["study_key"].nunique()), "by_modality": counts_table(df["modality"], "modality")}
    )
    return df


@dg.asset(
    ins={"parts": all_partitions_in("study_volumes")},
    kinds={"parquet", "nifti"},
    description="Volume manifest: every preprocessed volume (path, shape, spacing, origin, sha256, grid id) "
    "of every study. Models read volumes through this table, never through the IO manager.",
    **common,
)
def volume_manifest(context: dg.AssetExecutionContext, parts: dict[str, pd.DataFrame]) -> pd.DataFrame:
    df = _concat(parts, MANIFEST_COLUMNS)
    context.add_output_metadata(
        {"studies": int(df["study_key"].nunique()), "by_kind": counts_table(df["kind"], "kind")}
    )
    return df


@dg.asset(
    kinds={"parquet"},
    description="Study catalogue: one row per study with its modalities, ROIs, MRI sequences and volume count.",
    **common,
)
def study_index(
    context: dg.AssetExecutionContext, series_index: pd.DataFrame, volume_manifest: pd.DataFrame
) -> pd.DataFrame:
    rows = []
    vol_counts = volume_manifest.groupby("study_key").size().to_dict() if len(volume_manifest) else {}
    for key, grp in series_index.groupby("study_key", sort=True):
        mods = set(grp["modality"])
        rois = sorted({r for cell in grp["roi_names"] for r in cell.split(",") if r})
        seqs = sorted({s for s in grp["sequence"] if s and s != "seg"})
        rows.append(
            {
                "study_key": key,
                "patient_id": grp["patient_id"].iloc[0],
                "source": grp["source"].iloc[0],
                "modalities": ",".join(sorted(mods)),
                "n_series": len(grp),
                "n_volumes": vol_counts.get(key, 0),
                "has_ct": "CT" in mods,
                "has_structures": bool(rois),
                "has_dose": "RTDOSE" in mods or bool(grp["dose_units"].astype(bool).any()),
                "has_mr": "MR" in mods,
                "has_plan": "RTPLAN" in mods,
                "roi_names": ",".join(rois),
                "mr_sequences": ",".join(seqs),
            }
        )
    df = typed_frame(rows, STUDY_COLUMNS)
    context.add_output_metadata(
        {
            "studies": len(df),
            "by_source": counts_table(df["source"], "source"),
            "preview": md_table(df.drop(columns=["patient_id"]), max_rows=15),
        }
    )
    return df


@dg.asset(
    deps=["study_files", "inbox_triage"],
    kinds={"parquet"},
    description="Every quarantined file (sha256 hex, reason code, detail, time, study key): the "
    "consolidated quarantine log. The files themselves sit in $PSQA_HOME/quarantine/<sha>/.",
    **common,
)
def quarantine_table(context: dg.AssetExecutionContext, storage: PsqaStorage) -> pd.DataFrame:
    df = read_log(storage.quarantine_log)
    context.add_output_metadata(
        {
            "files": len(df),
            "distinct_files": int(df["sha256"].nunique()) if len(df) else 0,
            "by_reason": counts_table(df["reason"], "reason"),
            "latest": md_table(df.tail(10)[["quarantined_at", "reason", "detail", "study_key", "sha256"]]),
        }
    )
    return df


LAKE_TABLES = {
    "file_index": FILE_COLUMNS,
    "series_index": SERIES_COLUMNS,
    "volume_manifest": MANIFEST_COLUMNS,
    "study_index": STUDY_COLUMNS,
}
