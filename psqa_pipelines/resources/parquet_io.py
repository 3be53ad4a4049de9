"""Parquet IO manager on pyarrow (pandas DataFrames in, Parquet files out).

Paths: ``<lake>/tables/<asset key path>.parquet`` for unpartitioned assets and
``<lake>/tables/<asset key path>/<partition>.parquet`` for partitioned ones. Writes are atomic
and deterministic (``ml.utils.io.write_parquet_atomic``). Each output records
``dagster/row_count`` and ``dagster/column_schema`` (rendered as a schema table in the UI).
Only tables go through here: volumes are files referenced by manifest tables.
"""

import dagster as dg
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from upath import UPath

from ml.utils.io import write_parquet_atomic
from psqa_pipelines.lib.column_docs import describe_column
from psqa_pipelines.resources.storage import PsqaStorage


def table_schema(df: pd.DataFrame) -> dg.TableSchema:
    """Arrow type and description (``describe_column``: literal entry or name pattern) of each column."""
    schema = pa.Schema.from_pandas(df, preserve_index=False)
    return dg.TableSchema(
        columns=[dg.TableColumn(name=f.name, type=str(f.type), description=describe_column(f.name)) for f in schema]
    )


class ParquetIO(dg.UPathIOManager):
    extension = ".parquet"

    def dump_to_path(self, context: dg.OutputContext, obj: pd.DataFrame, path: UPath) -> None:
        if not isinstance(obj, pd.DataFrame):
            raise TypeError(f"{context.asset_key.to_user_string()}: expected a DataFrame, got {type(obj).__name__}")
        write_parquet_atomic(str(path), obj)

    def load_from_path(self, context: dg.InputContext, path: UPath) -> pd.DataFrame:
        if not path.exists():
            raise FileNotFoundError(str(path))
        return pq.read_table(str(path)).to_pandas()

    def load_input(self, context: dg.InputContext):
        """A fan-in input of an asset with no partitions yet (no plan study ingested: the `plans`
        set is empty) is ``{}``, not ``None`` (the base class), so the lake-wide table is built
        empty instead of the run failing its input type check."""
        loaded = super().load_input(context)
        if loaded is None and (context.definition_metadata or {}).get("fan_in") and context.has_asset_partitions:
            return {}
        return loaded

    def load_partitions(self, context: dg.InputContext):
        """Fan-in inputs (metadata ``fan_in=True``) always get ``{partition: DataFrame}``, also
        when only one partition exists (the base class would return the bare DataFrame)."""
        loaded = super().load_partitions(context)
        meta = context.definition_metadata or {}
        if meta.get("fan_in") and not isinstance(loaded, dict):
            keys = context.asset_partition_keys
            return {} if loaded is None else {keys[0]: loaded}
        return loaded

    def get_metadata(self, context: dg.OutputContext, obj: pd.DataFrame) -> dict:
        if not isinstance(obj, pd.DataFrame):
            return {}
        return {
            "dagster/row_count": dg.MetadataValue.int(len(obj)),
            "dagster/column_schema": dg.MetadataValue.table_schema(table_schema(obj)),
        }


class LakeParquetIOManager(dg.ConfigurableIOManagerFactory):
    """Parquet tables under the storage resource's ``lake/tables`` (or ``base_dir``)."""

    storage: PsqaStorage
    base_dir: str = ""

    def create_io_manager(self, context) -> ParquetIO:
        base = UPath(self.base_dir or str(self.storage.tables))
        base.mkdir(parents=True, exist_ok=True)
        return ParquetIO(base_path=base)
