"""Partitions shared by the domains: the dynamic ``studies`` partitions and the fan-in input
that reads every partition of a per-study asset."""

import dagster as dg

from psqa_pipelines.constants import PLANS_PARTITION, STUDIES_PARTITION

# One partition per study, keyed by its pseudonymous id (dcm-/nii-/kbp-<16 hex>): the keys are
# keyed hashes, so they never reveal a patient or study identifier.
studies_partitions = dg.DynamicPartitionsDefinition(name=STUDIES_PARTITION)

# The studies that carry an RT Plan, under the same keys: the plan-QA assets are partitioned by
# these only, so a CT, NIfTI or OpenKBP study never shows as a "missing" plan-QA partition. Their
# per-study inputs map key to key (``same_study``).
plans_partitions = dg.DynamicPartitionsDefinition(name=PLANS_PARTITION)


def same_study(asset: str) -> dg.AssetIn:
    """Input from a ``studies``-partitioned asset into a ``plans``-partitioned one: the same key."""
    return dg.AssetIn(key=asset, partition_mapping=dg.IdentityPartitionMapping())


def all_partitions_in(asset: str) -> dg.AssetIn:
    """Input that loads every materialised partition of ``asset`` as ``{partition: DataFrame}``.

    Missing or failed partitions are skipped (``allow_missing_partitions``), and the Parquet IO
    manager returns a dict even when only one partition exists (``fan_in``)."""
    return dg.AssetIn(key=asset, metadata={"allow_missing_partitions": True, "fan_in": True})
