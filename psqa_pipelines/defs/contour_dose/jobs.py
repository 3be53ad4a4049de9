"""``train_contour_dose``: split + cache -> every model (GPU-tagged run) -> predictions, evaluation, exports."""

import dagster as dg

from psqa_pipelines.constants import CONTOUR_DOSE, CONTOUR_DOSE_TRAINING
from psqa_pipelines.resources.compute import GPU_RUN_TAGS

train_contour_dose_job = dg.define_asset_job(
    name="train_contour_dose",
    selection=dg.AssetSelection.groups(CONTOUR_DOSE, CONTOUR_DOSE_TRAINING),
    tags=GPU_RUN_TAGS,
    description="Cases + split + compact cache -> Baseline, DL-Baseline, Seq-Human, Seq-Automated, Multi-Automated "
    "and the product model -> test predictions -> OpenKBP scores and seed tables -> DICOM/NIfTI exports. "
    "Hyper-parameters per model in the Launchpad (ContourDoseTrainSettings).",
)
