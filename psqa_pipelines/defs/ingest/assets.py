"""Ingestion assets: the landing folders -> de-identified study copies and index tables.

The heavy lifting (parsing, validation, de-identification, quarantine) is ``ml.data.ingest``;
these assets pick the study, call it and publish tables, counts and checks.
"""

import dagster as dg
import pandas as pd

from ml.data.dicom.headers import REASONS
from ml.data.inbox import scan_sources, write_receipt
from ml.data.phi import dicom_phi_violations, table_phi_violations
from ml.data.quarantine import Quarantine, records_frame, write_log
from psqa_pipelines.constants import INGEST, OWNER_DATA
from psqa_pipelines.lib.metadata import counts_table, md_table
from psqa_pipelines.lib.partitions import studies_partitions
from psqa_pipelines.resources import DeidentificationResource, PsqaStorage

raw_inbox = dg.AssetSpec(
    key="raw_inbox",
    group_name=INGEST,
    description=(
        "Landing folder `$PSQA_HOME/inbox` (DICOM CT/MR/RTSTRUCT/RTDOSE/RTPLAN, NIfTI, OpenKBP "
        "CSV folders) and the configured OpenKBP directory. Identified data: nothing here is "
        "ever shown in the UI; the `inbox_sensor` turns it into study partitions."
    ),
    kinds={"dicom", "nifti", "folder"},
    owners=[OWNER_DATA],
)


@dg.asset(
    group_name=INGEST,
    deps=[raw_inbox],
    kinds={"python", "parquet"},
    owners=[OWNER_DATA],
    description=(
        "Quarantines inbox files that belong to no study (not DICOM, unreadable, no "
        "StudyInstanceUID). Output: this batch's quarantine rows (sha256, reason, time)."
    ),
    code_version="1",
)
def inbox_triage(
    context: dg.AssetExecutionContext, storage: PsqaStorage, deid: DeidentificationResource
) -> pd.DataFrame:
    storage.ensure_dirs()
    p = deid.pseudonymizer()
    scan = scan_sources(storage.sources(), p, settle_seconds=storage.inbox_settle_seconds)
    quarantine = Quarantine(storage.quarantine)
    records = []
    for name, source_scan in scan.scans.items():
        for ref in source_scan.unattributed:
            reason = ref.detail if ref.detail in REASONS else "unattributable"
            records.append(
                quarantine.put(
                    source_scan.root / ref.relpath,
                    reason=reason,
                    detail="belongs to no study",
                    source="unknown",
                    move=scan.writable[name],
                    relpath=ref.relpath,
                )
            )
    write_log(storage.quarantine_log, "triage", context.run.run_id, records)
    df = records_frame(records)
    context.add_output_metadata(
        {
            "files_seen": len(records),
            "files_quarantined": len(records),
            "files_ingested": 0,
            "reasons": counts_table(df["reason"], "reason"),
        }
    )
    return df


@dg.multi_asset(
    outs={
        "study_files": dg.AssetOut(
            group_name=INGEST,
            kinds={"dicom", "parquet"},
            owners=[OWNER_DATA],
            code_version="1",
            description=(
                "One row per ingested file of the study: pseudonymous ids, modality, SOP class, "
                "remapped UIDs, geometry, the stored de-identified copy and both sha256 (stored "
                "copy and source file). Copies live under `lake/studies/<study>/`."
            ),
        ),
        "study_series": dg.AssetOut(
            group_name=INGEST,
            kinds={"dicom", "parquet"},
            owners=[OWNER_DATA],
            code_version="1",
            description=(
                "One row per image series or RT object of the study: grid, orientation, frame of "
                "reference, references between objects (RTSTRUCT/RTDOSE -> CT), ROI names, dose "
                "maximum, MRI sequence label."
            ),
        ),
    },
    partitions_def=studies_partitions,
    deps=[raw_inbox],
    check_specs=[
        dg.AssetCheckSpec(
            "files_accounted_for",
            asset="study_files",
            blocking=True,
            description="files seen = files ingested + files quarantined",
        ),
        dg.AssetCheckSpec(
            "deidentified",
            asset="study_files",
            blocking=True,
            description="stored copies and table rows satisfy the no-PHI rule",
        ),
    ],
)
def study_files(context: dg.AssetExecutionContext, storage: PsqaStorage, deid: DeidentificationResource):
    """De-identify and index one study (partition = pseudonymous study key)."""
    from ml.data.ingest import ingest_study

    storage.ensure_dirs()
    deid.warn_if_dev(context.log)
    key = context.partition_key
    p = deid.pseudonymizer()
    scan = scan_sources(storage.sources(), p, settle_seconds=0)
    found = scan.studies.get(key)
    if found is None:
        raise dg.Failure(
            description=f"Study {key} is not present in any landing folder any more; the "
            "previously ingested copy (if any) is kept unchanged.",
        )
    source_name, group = found
    result = ingest_study(
        group,
        storage.lake,
        Quarantine(storage.quarantine),
        p,
        move_bad=scan.writable[source_name],
        require_dose=storage.openkbp_require_dose,
    )
    write_log(storage.quarantine_log, key, context.run.run_id, result.quarantined)
    write_receipt(
        storage.state,
        key,
        result.fingerprint_after,
        files_seen=result.files_seen,
        files_ingested=result.files_ingested,
        files_quarantined=len(result.quarantined),
    )

    qdf = records_frame(result.quarantined)
    common = {
        "source": result.source,
        "patient_id": result.patient_id,
        "files_seen": result.files_seen,
        "files_ingested": result.files_ingested,
        "files_quarantined": len(result.quarantined),
    }
    yield dg.Output(
        result.files,
        output_name="study_files",
        metadata={
            **common,
            "modalities": counts_table(result.files["modality"], "modality"),
            "quarantine": md_table(qdf[["reason", "detail", "sha256"]])
            if len(qdf)
            else dg.MetadataValue.md("_(none)_"),
            **({f"deid/{k}": v for k, v in result.stats.items()}),
        },
    )
    yield dg.Output(
        result.series,
        output_name="study_series",
        metadata={
            "series": md_table(
                result.series[
                    [
                        "modality",
                        "sequence",
                        "object_key",
                        "n_slices",
                        "spacing_x",
                        "spacing_y",
                        "spacing_z",
                        "roi_names",
                        "dose_max",
                    ]
                ]
            ),
            "n_objects": len(result.series),
        },
    )
    balanced = result.files_seen == result.files_ingested + len(result.quarantined)
    yield dg.AssetCheckResult(
        check_name="files_accounted_for",
        asset_key="study_files",
        passed=balanced,
        metadata=common,
    )
    problems = table_phi_violations(result.files) + table_phi_violations(result.series)
    stored = result.files.loc[result.files["source"] == "dicom", "stored_path"].unique().tolist()
    for rel in stored:
        problems += [f"{rel}: {msg}" for msg in dicom_phi_violations(storage.lake / rel)]
    yield dg.AssetCheckResult(
        check_name="deidentified",
        asset_key="study_files",
        passed=not problems,
        metadata={
            "stored_dicom_files_checked": len(stored),
            "violations": len(problems),
            "first_violations": dg.MetadataValue.md("\n".join(f"- {x}" for x in problems[:10]) or "_(none)_"),
        },
    )
