import dagster as dg

from psqa_pipelines.partitions import studies_partitions

ingest_study_job = dg.define_asset_job(
    name="ingest_study_job",
    selection=dg.AssetSelection.assets("study_files", "study_series", "study_volumes"),
    partitions_def=studies_partitions,
    description="De-identify, index and preprocess one study (one partition).",
)

inbox_triage_job = dg.define_asset_job(
    name="inbox_triage_job",
    selection=dg.AssetSelection.assets("inbox_triage"),
    description="Quarantine inbox files that belong to no study.",
)
