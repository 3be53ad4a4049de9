import dagster as dg

from psqa_pipelines.ingest.assets import inbox_triage, raw_inbox, study_files
from psqa_pipelines.ingest.jobs import inbox_triage_job, ingest_study_job
from psqa_pipelines.ingest.sensors import inbox_sensor

defs = dg.Definitions(
    assets=[raw_inbox, inbox_triage, study_files],
    jobs=[ingest_study_job, inbox_triage_job],
    sensors=[inbox_sensor],
)
