from psqa_pipelines.resources.compute import ComputeResource
from psqa_pipelines.resources.deid import DeidentificationResource
from psqa_pipelines.resources.mlflow import MlflowResource
from psqa_pipelines.resources.parquet_io import LakeParquetIOManager
from psqa_pipelines.resources.storage import PsqaStorage

__all__ = [
    "ComputeResource",
    "DeidentificationResource",
    "LakeParquetIOManager",
    "MlflowResource",
    "PsqaStorage",
]
