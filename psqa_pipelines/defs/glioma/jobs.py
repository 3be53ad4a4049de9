"""``glioma_job``: the whole glioma group (GPU-tagged run): import -> labels, folds -> training directory ->
final GMMAS + cross-validation -> evaluation with baselines, ablation, missing-modality study, reports ->
champion/challenger promotion. ``glioma_schedule`` (``schedules.py``) launches it weekly."""

import dagster as dg

from psqa_pipelines.constants import GLIOMA
from psqa_pipelines.resources.compute import GPU_RUN_TAGS

glioma_job = dg.define_asset_job(
    name="glioma_job",
    selection=dg.AssetSelection.groups(GLIOMA),
    tags=GPU_RUN_TAGS,
    description="lgg-mri + brain-mri-samples -> glioma lake, labels, folds -> training dir -> GMMAS (final model, "
    "registered glioma-gmmas) + patient-level CV -> evaluation vs baselines, ablation, missing-modality study, "
    "per-patient reports -> champion alias if the challenger wins. Hyper-parameters in the Launchpad.",
)
