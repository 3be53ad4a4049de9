import dagster as dg

from psqa_pipelines.contour_dose.assets import (
    contour_dose_cache,
    contour_dose_cases,
    contour_dose_split,
    contour_dose_split_is_sound,
)
from psqa_pipelines.contour_dose.evaluation import contour_dose_evaluation, contour_dose_exports, contour_dose_predictions
from psqa_pipelines.contour_dose.jobs import train_contour_dose_job
from psqa_pipelines.contour_dose.training import training_assets

defs = dg.Definitions(
    assets=[contour_dose_cases, contour_dose_split, contour_dose_cache, *training_assets, contour_dose_predictions,
            contour_dose_evaluation, contour_dose_exports],
    asset_checks=[contour_dose_split_is_sound],
    jobs=[train_contour_dose_job],
)
