"""The code location: every domain's Definitions merged, plus the shared resources.

Resources are built once from the environment (``PSQA_HOME`` and friends, see
``psqa_pipelines.settings``); tests build their own with temporary folders.
"""


import os

import dagster as dg

from psqa_pipelines.contour_dose import definitions as contour_dose
from psqa_pipelines.ingest import definitions as ingest
from psqa_pipelines.lake import definitions as lake
from psqa_pipelines.preprocess import definitions as preprocess
from psqa_pipelines.psqa import definitions as psqa
from psqa_pipelines.resources import (
    ComputeResource,
    DeidentificationResource,
    LakeParquetIOManager,
    MlflowResource,
    PsqaStorage,
)


def build_resources(storage: PsqaStorage | None = None, mlflow: MlflowResource | None = None) -> dict:
    storage = storage or PsqaStorage()
    secret = dg.EnvVar("PSQA_DEID_SECRET") if os.environ.get("PSQA_DEID_SECRET") else ""
    return {
        "storage": storage,
        "io_manager": LakeParquetIOManager(storage=storage),
        "deid": DeidentificationResource(secret=secret),
        "mlflow": mlflow or MlflowResource(),
        "compute": ComputeResource(),
    }


automation = dg.AutomationConditionSensorDefinition(
    name="lake_automation",
    target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description="Evaluates automation conditions (rebuilds lake-wide tables after studies land).",
)


def build_defs(resources: dict | None = None) -> dg.Definitions:
    return dg.Definitions.merge(
        ingest.defs,
        preprocess.defs,
        lake.defs,
        psqa.defs,
        contour_dose.defs,
        dg.Definitions(sensors=[automation], resources=resources or build_resources()),
    )


defs = build_defs()
