"""Partitions shared by the domains: the dynamic ``studies`` partitions and the fan-in input
that reads every partition of a per-study asset."""

import dagster as dg

from psqa_pipelines.constants import STUDIES_PARTITION

# One partition per study, keyed by its pseudonymous id (dcm-/nii-/kbp-<16 hex>): the keys are
# keyed hashes, so they never reveal a patient or study identifier.
studies_partitions = dg.DynamicPartitionsDefinition(name=STUDIES_PARTITION)


def all_partitions_in(asset: str) -> dg.AssetIn:
    """Input that loads every materialised partition of ``asset`` as ``{partition: DataFrame}``.

    Missing or failed partitions are skipped (``allow_missing_partitions``), and the Parquet IO
    manager returns a dict even when only one partition exists (``fan_in``)."""
    return dg.AssetIn(key=asset, metadata={"allow_missing_partitions": True, "fan_in": True})
