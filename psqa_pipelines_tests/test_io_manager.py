"""The Parquet IO manager: paths, metadata, fan-in of partitions (one, many, missing)."""

import dagster as dg
import pandas as pd
import pyarrow.parquet as pq
import pytest

from psqa_pipelines.resources import LakeParquetIOManager, PsqaStorage

parts = dg.StaticPartitionsDefinition(["a", "b", "c"])


@dg.asset(partitions_def=parts)
def per_part(context: dg.AssetExecutionContext) -> pd.DataFrame:
    return pd.DataFrame({"part": [context.partition_key] * 3, "x": [1.0, 2.0, 3.0]})


@dg.asset(ins={"per_part": dg.AssetIn(metadata={"allow_missing_partitions": True, "fan_in": True})})
def gathered(per_part: dict[str, pd.DataFrame]) -> pd.DataFrame:
    return pd.concat(per_part.values(), ignore_index=True) if per_part else pd.DataFrame({"part": [], "x": []})


def test_partitioned_paths_metadata_and_fan_in(tmp_path):
    storage = PsqaStorage(home=str(tmp_path))
    resources = {"io_manager": LakeParquetIOManager(storage=storage)}
    with dg.instance_for_test() as instance:
        res = dg.materialize([per_part], partition_key="a", resources=resources, instance=instance)
        path = storage.tables / "per_part" / "a.parquet"
        assert path.exists()
        md = res.asset_materializations_for_node("per_part")[0].metadata
        assert md["dagster/row_count"].value == 3
        cols = [c.name for c in md["dagster/column_schema"].value.columns]
        assert cols == ["part", "x"]
        # one partition present: the fan-in input is still a dict
        res = dg.materialize([per_part, gathered], selection=[gathered], resources=resources, instance=instance)
        out = pd.read_parquet(storage.tables / "gathered.parquet")
        assert sorted(set(out["part"])) == ["a"] and len(out) == 3
        # two of three present, one missing: skipped, not fatal
        dg.materialize([per_part], partition_key="c", resources=resources, instance=instance)
        dg.materialize([per_part, gathered], selection=[gathered], resources=resources, instance=instance)
        out = pd.read_parquet(storage.tables / "gathered.parquet")
        assert sorted(set(out["part"])) == ["a", "c"]
    # deterministic bytes: no pandas metadata or timestamps in the file
    assert pq.read_schema(path).metadata is None


def test_compute_resource_plans_cpu_here():
    import torch

    from psqa_pipelines.resources import ComputeResource

    plan = ComputeResource().plan()
    if not torch.cuda.is_available():
        assert plan.device == "cpu" and plan.amp_dtype == "off" and plan.num_workers >= 0
        with pytest.raises(dg.Failure):
            ComputeResource(device="cuda").plan()
    with pytest.raises(dg.Failure):
        ComputeResource(amp="fp8").plan()
