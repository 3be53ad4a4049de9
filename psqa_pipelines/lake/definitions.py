import dagster as dg

from psqa_pipelines.lake.assets import file_index, quarantine_table, series_index, study_index, volume_manifest
from psqa_pipelines.lake.checks import build_lake_checks

lake_tables_job = dg.define_asset_job(
    name="lake_tables_job",
    selection=dg.AssetSelection.groups("lake_tables"),
    description="Rebuild the lake-wide tables from all study partitions.",
)

defs = dg.Definitions(
    assets=[file_index, series_index, volume_manifest, study_index, quarantine_table],
    asset_checks=build_lake_checks(),
    jobs=[lake_tables_job],
)
