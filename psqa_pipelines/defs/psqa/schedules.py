"""The PSQA retraining schedule.

``psqa_retrain_schedule`` launches ``retrain_bmmqa`` on a cron (``PSQA_RETRAIN_CRON``, default
Monday 02:00) but only when at least ``PSQA_RETRAIN_MIN_NEW_PLANS`` (default 20) labelled plans
arrived since the current BMMQA model was trained; otherwise the tick is skipped with the counts
as the reason. Both settings come from ``psqa_pipelines.settings``.
"""

import dagster as dg

from psqa_pipelines.defs.psqa import jobs
from psqa_pipelines.settings import retrain_cron, retrain_min_new_plans


def _metadata_int(instance: dg.DagsterInstance, asset: str, key: str) -> int | None:
    ev = instance.get_latest_materialization_event(dg.AssetKey(asset))
    if ev is None or ev.asset_materialization is None:
        return None
    value = ev.asset_materialization.metadata.get(key)
    return None if value is None else int(value.value)


def new_plans_since_training(instance: dg.DagsterInstance) -> tuple[int, int]:
    """(labelled plans now, plans in the pack the current BMMQA model was trained on)."""
    return (
        _metadata_int(instance, "psqa_labels", "plans") or 0,
        _metadata_int(instance, "psqa_model_bmmqa", "n_plans") or 0,
    )


@dg.schedule(
    name="psqa_retrain_schedule",
    job=jobs.retrain_bmmqa_job,
    cron_schedule=retrain_cron(),
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Retrains BMMQA on a cron when at least PSQA_RETRAIN_MIN_NEW_PLANS new labelled plans arrived.",
)
def psqa_retrain_schedule(context: dg.ScheduleEvaluationContext):
    now, trained = new_plans_since_training(context.instance)
    need = retrain_min_new_plans()
    if now - trained < need:
        return dg.SkipReason(
            f"{now - trained} new labelled plans since the last training ({now} now, {trained} trained on); need {need}"
        )
    return dg.RunRequest(run_key=f"retrain:{now}", tags={"psqa/new_plans": str(now - trained)})
