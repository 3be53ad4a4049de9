"""Helpers that turn results into Dagster metadata (markdown tables, inline PNGs)."""

from __future__ import annotations

import base64

import dagster as dg
import pandas as pd


def md_table(df: pd.DataFrame, max_rows: int = 20, floatfmt: str = ".4g") -> dg.MetadataValue:
    if df is None or len(df) == 0:
        return dg.MetadataValue.md("_(empty)_")
    shown = df.head(max_rows)
    text = shown.to_markdown(index=False, floatfmt=floatfmt)
    if len(df) > max_rows:
        text += f"\n\n_{len(df) - max_rows} more rows_"
    return dg.MetadataValue.md(text)


def md_png(png: bytes | None, alt: str = "preview") -> dg.MetadataValue:
    if not png:
        return dg.MetadataValue.md("_(no preview)_")
    b64 = base64.b64encode(png).decode("ascii")
    return dg.MetadataValue.md(f"![{alt}](data:image/png;base64,{b64})")


def counts_table(series: pd.Series, label: str) -> dg.MetadataValue:
    if series is None or len(series) == 0:
        return dg.MetadataValue.md("_(none)_")
    vc = series.value_counts().sort_index()
    return md_table(pd.DataFrame({label: vc.index, "count": vc.values}))
