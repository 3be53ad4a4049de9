"""Checks on the lake-wide tables: schema, the no-PHI rule, NaNs in key columns, geometry."""

import dagster as dg
import numpy as np
import pandas as pd

from ml.data.phi import table_phi_violations
from ml.data.quarantine import QUARANTINE_COLUMNS
from ml.utils.tables import schema_violations
from psqa_pipelines.defs.lake.assets import LAKE_TABLES

KEY_COLUMNS = {
    "file_index": ["study_key", "sha256", "stored_path", "modality"],
    "series_index": ["study_key", "object_key", "modality"],
    "volume_manifest": ["study_key", "path", "sha256", "grid_id", "vmin", "vmax", "vmean"],
    "study_index": ["study_key", "source"],
    "quarantine_table": ["sha256", "reason", "quarantined_at"],
}


def _checks_for(table: str, columns: dict[str, str] | None) -> list:
    checks = []
    if columns is not None:

        @dg.asset_check(asset=table, name="schema", description=f"{table} has exactly the declared columns and types")
        def schema(value: pd.DataFrame) -> dg.AssetCheckResult:
            problems = schema_violations(value, columns)
            return dg.AssetCheckResult(passed=not problems, metadata={"problems": dg.MetadataValue.json(problems)})

        checks.append(schema)

    @dg.asset_check(
        asset=table,
        name="no_phi",
        blocking=True,
        description="identifier columns hold pseudonyms/remapped UIDs; no name- or date-like text",
    )
    def no_phi(value: pd.DataFrame) -> dg.AssetCheckResult:
        problems = table_phi_violations(value)
        return dg.AssetCheckResult(passed=not problems, metadata={"problems": dg.MetadataValue.json(problems)})

    @dg.asset_check(asset=table, name="no_missing_keys", description="key columns have no NaN/empty values")
    def no_missing_keys(value: pd.DataFrame) -> dg.AssetCheckResult:
        bad = {}
        for col in KEY_COLUMNS[table]:
            if col not in value:
                continue
            s = value[col]
            n = int(s.isna().sum()) + (int((s.astype(str) == "").sum()) if not pd.api.types.is_numeric_dtype(s) else 0)
            if pd.api.types.is_float_dtype(s):
                n += int((~np.isfinite(s.fillna(0))).sum())
            if n:
                bad[col] = n
        return dg.AssetCheckResult(passed=not bad, metadata={"rows": len(value), "bad": dg.MetadataValue.json(bad)})

    checks += [no_phi, no_missing_keys]
    return checks


@dg.asset_check(
    asset="volume_manifest",
    name="grids_consistent",
    description="within each study, every volume shares the grid of the volume it references",
)
def grids_consistent(volume_manifest: pd.DataFrame) -> dg.AssetCheckResult:
    bad = []
    for key, grp in volume_manifest.groupby("study_key"):
        grids = grp.set_index("volume_key")["grid_id"].to_dict()
        for _, row in grp.iterrows():
            if row["reference_key"] in grids and grids[row["reference_key"]] != row["grid_id"]:
                bad.append(f"{key}/{row['volume_key']}")
    return dg.AssetCheckResult(passed=not bad, metadata={"mismatched": dg.MetadataValue.json(bad[:50])})


def build_lake_checks() -> list:
    """schema, no_phi and no_missing_keys for every lake-wide table and the quarantine table."""
    checks = []
    for table, columns in LAKE_TABLES.items():
        checks += _checks_for(table, columns)
    quarantine_columns = {c: ("int64" if c == "size_bytes" else "str") for c in QUARANTINE_COLUMNS}
    checks += _checks_for("quarantine_table", quarantine_columns)
    return checks


lake_table_checks = build_lake_checks()
