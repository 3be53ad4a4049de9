"""The code location: the ``defs/`` folder (loaded by convention) plus the shared resources and
the automation sensor.

``dg.load_defs`` imports every module under ``psqa_pipelines/defs/`` (one folder per
domain: ingest, preprocess, lake, psqa, contour_dose) and registers each module-level asset,
asset check, job, sensor and schedule exactly once. Resources are built from the environment
(``PSQA_HOME`` and friends, read only by ``psqa_pipelines.settings``); tests build their own with
temporary folders.
"""

import dagster as dg

from psqa_pipelines.resources import (
    ComputeResource,
    DeidentificationResource,
    LakeParquetIOManager,
    MlflowResource,
    PsqaStorage,
)
from psqa_pipelines.settings import deid_secret_config


def build_resources(storage: PsqaStorage | None = None, mlflow: MlflowResource | None = None) -> dict:
    storage = storage or PsqaStorage()
    return {
        "storage": storage,
        "io_manager": LakeParquetIOManager(storage=storage),
        "deid": DeidentificationResource(secret=deid_secret_config()),
        "mlflow": mlflow or MlflowResource(),
        "compute": ComputeResource(),
    }


lake_automation = dg.AutomationConditionSensorDefinition(
    name="lake_automation",
    target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description="Evaluates automation conditions (rebuilds lake-wide tables after studies land).",
)


def load_domain_defs() -> dg.Definitions:
    """Everything under ``psqa_pipelines/defs/``, loaded from the package itself (``dg.load_defs``
    on the ``psqa_pipelines.defs`` module), so a non-editable install (a wheel in the user-code image,
    no ``pyproject.toml`` beside it) loads the same code location as the checkout."""
    import psqa_pipelines.defs

    return dg.load_defs(defs_root=psqa_pipelines.defs)


def build_defs(resources: dict | None = None) -> dg.Definitions:
    return dg.Definitions.merge(
        load_domain_defs(),
        dg.Definitions(sensors=[lake_automation], resources=resources or build_resources()),
    )


defs = build_defs()
