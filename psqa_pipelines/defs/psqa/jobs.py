"""PSQA jobs.

``train_psqa`` (GPU-tagged: ``psqa/gpu=true`` is limited by the instance's run-tag concurrency)
refreshes the split and the pack, trains BMMQA and every baseline, evaluates them, writes the
Shapley report and runs the champion/challenger promotion. ``retrain_bmmqa`` is what
``psqa_retrain_schedule`` (``schedules.py``) launches.
"""

import dagster as dg

from psqa_pipelines.constants import PSQA_TRAINING
from psqa_pipelines.lib.partitions import plans_partitions
from psqa_pipelines.resources.compute import GPU_RUN_TAGS

PSQA_TABLES = ("psqa_features", "psqa_labels", "psqa_planes", "qa_label_agreement")
PLAN_QA_ASSETS = ("plan_complexity", "beam_complexity", "qa_planes", "qa_labels")

plan_qa_job = dg.define_asset_job(
    name="plan_qa_job",
    selection=dg.AssetSelection.assets(*PLAN_QA_ASSETS),
    partitions_def=plans_partitions,
    description="One plan study (a `plans` partition): complexity features, QA planes and gamma labels of its RT "
    "Plans, from the study tables its ingestion run wrote.",
)

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
    selection=dg.AssetSelection.assets(
        "psqa_split", "psqa_pack", "psqa_model_bmmqa", "psqa_shapley_report", "psqa_challenger_eval", "psqa_champion"
    ),
    tags=GPU_RUN_TAGS,
    description="The scheduled retraining: split + pack -> BMMQA (challenger) -> Shapley report -> promotion if it "
    "beats the champion on the fixed test split (baselines are retrained by `train_psqa`).",
)
