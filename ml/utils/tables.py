"""Typed pandas frames: every table the pipeline writes has a declared column -> kind schema."""

from __future__ import annotations

import pandas as pd

__all__ = ["schema_violations", "typed_frame"]


def typed_frame(rows: list[dict], columns: dict[str, str]) -> pd.DataFrame:
    """Build a frame with exactly ``columns`` (kind: str | int64 | float64 | bool)."""
    df = pd.DataFrame(rows, columns=list(columns))
    for col, kind in columns.items():
        if kind == "str":
            df[col] = df[col].fillna("").astype("str")
        elif kind == "int64":
            df[col] = pd.to_numeric(df[col], errors="coerce").fillna(0).astype("int64")
        elif kind == "bool":
            df[col] = df[col].fillna(False).astype("bool")
        else:
            df[col] = pd.to_numeric(df[col], errors="coerce").astype("float64")
    return df


def schema_violations(df: pd.DataFrame, columns: dict[str, str]) -> list[str]:
    """Missing/unexpected columns and wrong kinds (pandas 3 ``str`` dtype counts as str)."""
    problems = []
    missing = [c for c in columns if c not in df.columns]
    extra = [c for c in df.columns if c not in columns]
    if missing:
        problems.append(f"missing columns: {missing}")
    if extra:
        problems.append(f"unexpected columns: {extra}")
    for col, kind in columns.items():
        if col not in df.columns:
            continue
        dtype = df[col].dtype
        ok = {
            "str": pd.api.types.is_string_dtype(dtype) or dtype == "object",
            "int64": pd.api.types.is_integer_dtype(dtype),
            "float64": pd.api.types.is_float_dtype(dtype),
            "bool": pd.api.types.is_bool_dtype(dtype),
        }[kind]
        if not ok:
            problems.append(f"{col}: expected {kind}, got {dtype}")
    return problems
