import dagster as dg

from psqa_pipelines.psqa.assets import (
    labels_match_clinic_qa,
    plan_qa,
    psqa_features,
    psqa_labels,
    psqa_pack,
    psqa_planes,
    psqa_split,
    qa_label_agreement,
    qa_results_table,
    split_has_no_leaks,
)
from psqa_pipelines.psqa.evaluation import (
    challenger_beats_champion,
    psqa_challenger_eval,
    psqa_champion,
    psqa_evaluation,
    psqa_shapley_report,
)
from psqa_pipelines.psqa.jobs import psqa_retrain_schedule, psqa_tables_job, retrain_bmmqa_job, train_psqa_job
from psqa_pipelines.psqa.training import training_assets

defs = dg.Definitions(
    assets=[plan_qa, qa_results_table, psqa_features, psqa_labels, psqa_planes, qa_label_agreement, psqa_split,
            psqa_pack, *training_assets, psqa_evaluation, psqa_shapley_report, psqa_challenger_eval, psqa_champion],
    asset_checks=[labels_match_clinic_qa, split_has_no_leaks, challenger_beats_champion],
    jobs=[psqa_tables_job, train_psqa_job, retrain_bmmqa_job],
    schedules=[psqa_retrain_schedule],
)
