"""PSQA jobs and the retraining schedule.

``train_psqa`` (GPU-tagged: ``psqa/gpu=true`` is limited by the instance's run-tag concurrency)
refreshes the split and the pack, trains BMMQA and every baseline, evaluates them, writes the
Shapley report and runs the champion/challenger promotion. ``psqa_retrain_schedule`` launches it
on a cron (``PSQA_RETRAIN_CRON``, default Monday 02:00) but only when at least
``PSQA_RETRAIN_MIN_NEW_PLANS`` (default 20) labelled plans arrived since the current BMMQA model
was trained; otherwise the tick is skipped with the counts as the reason.
"""

import os

import dagster as dg

from psqa_pipelines.constants import PSQA_TRAINING
from psqa_pipelines.resources.compute import GPU_RUN_TAGS

PSQA_TABLES = ("psqa_features", "psqa_labels", "psqa_planes", "qa_label_agreement")

psqa_tables_job = dg.define_asset_job(
    name="psqa_tables_job",
    selection=dg.AssetSelection.assets(*PSQA_TABLES),
    description="Rebuild the PSQA lake-wide tables (features, labels, plane manifest, label agreement).",
)

train_psqa_job = dg.define_asset_job(
    name="train_psqa",
    selection=dg.AssetSelection.assets("psqa_split", "psqa_pack") | dg.AssetSelection.groups(PSQA_TRAINING),
    tags=GPU_RUN_TAGS,
    description="Split + pack -> BMMQA and baselines -> evaluation, Shapley report, champion/challenger promotion.",
)

retrain_bmmqa_job = dg.define_asset_job(
    name="retrain_bmmqa",
    selection=dg.AssetSelection.assets("psqa_split", "psqa_pack", "psqa_model_bmmqa", "psqa_shapley_report",
                                       "psqa_challenger_eval", "psqa_champion"),
    tags=GPU_RUN_TAGS,
    description="The scheduled retraining: split + pack -> BMMQA (challenger) -> Shapley report -> promotion if it "
                "beats the champion on the fixed test split (baselines are retrained by `train_psqa`).",
)


def _metadata_int(instance: dg.DagsterInstance, asset: str, key: str) -> int | None:
    ev = instance.get_latest_materialization_event(dg.AssetKey(asset))
    if ev is None or ev.asset_materialization is None:
        return None
    value = ev.asset_materialization.metadata.get(key)
    return None if value is None else int(value.value)


def new_plans_since_training(instance: dg.DagsterInstance) -> tuple[int, int]:
    """(labelled plans now, plans in the pack the current BMMQA model was trained on)."""
    return (_metadata_int(instance, "psqa_labels", "plans") or 0,
            _metadata_int(instance, "psqa_model_bmmqa", "n_plans") or 0)


def min_new_plans() -> int:
    return int(os.environ.get("PSQA_RETRAIN_MIN_NEW_PLANS", "20"))


@dg.schedule(
    name="psqa_retrain_schedule",
    job=retrain_bmmqa_job,
    cron_schedule=os.environ.get("PSQA_RETRAIN_CRON", "0 2 * * 1"),
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Retrains BMMQA on a cron when at least PSQA_RETRAIN_MIN_NEW_PLANS new labelled plans arrived.",
)
def psqa_retrain_schedule(context: dg.ScheduleEvaluationContext):
    now, trained = new_plans_since_training(context.instance)
    need = min_new_plans()
    if now - trained < need:
        return dg.SkipReason(f"{now - trained} new labelled plans since the last training ({now} now, {trained} "
                             f"trained on); need {need}")
    return dg.RunRequest(run_key=f"retrain:{now}", tags={"psqa/new_plans": str(now - trained)})
