"""``lake_tables_job``: rebuild the lake-wide tables (the automation sensor does this on its own)."""

import dagster as dg

from psqa_pipelines.constants import LAKE

lake_tables_job = dg.define_asset_job(
    name="lake_tables_job",
    selection=dg.AssetSelection.groups(LAKE),
    description="Rebuild the lake-wide tables from all study partitions.",
)
