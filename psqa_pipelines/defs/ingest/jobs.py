import dagster as dg

from psqa_pipelines.lib.partitions import studies_partitions

ingest_study_job = dg.define_asset_job(
    name="ingest_study_job",
    selection=dg.AssetSelection.assets("study_files", "study_series", "study_volumes"),
    partitions_def=studies_partitions,
    description="De-identify, index and preprocess one study (one partition). A study with an RT Plan also "
    "gets a `plans` partition, whose plan-QA assets (`plan_qa_job`) run after this one.",
)

inbox_triage_job = dg.define_asset_job(
    name="inbox_triage_job",
    selection=dg.AssetSelection.assets("inbox_triage"),
    description="Quarantine inbox files that belong to no study.",
)

qa_results_job = dg.define_asset_job(
    name="qa_results_job",
    selection=dg.AssetSelection.assets("qa_results_table"),
    description="De-identify the QA system's result exports (CSV) found in the inbox into one table.",
)
