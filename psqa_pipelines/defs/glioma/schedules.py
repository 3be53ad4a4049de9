"""The weekly glioma retraining: ``glioma_schedule`` runs ``glioma_job`` on Sundays at 03:00 (off by default;
switch it on in the UI). The import is idempotent, so a week without new cases retrains on the same data
and the champion alias moves only if the new version wins (``glioma_challenger_eval``)."""

import dagster as dg

from psqa_pipelines.defs.glioma import jobs

GLIOMA_CRON = "0 3 * * 0"

glioma_schedule = dg.ScheduleDefinition(
    name="glioma_schedule",
    job=jobs.glioma_job,
    cron_schedule=GLIOMA_CRON,
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Weekly glioma retraining (import, CV, evaluation, reports, champion/challenger); stopped by default.",
)
