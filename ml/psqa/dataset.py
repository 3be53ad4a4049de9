"""The BMMQA training pack: what the Dagster assets write and ``python -m ml bmmqa`` reads.

Layout of a pack directory (plain files, so it can be shipped to a GPU node with only
torch/numpy/pandas/pyarrow)::

    dataset.parquet   one row per plan: plan_key, split (train|val|test), the GPR labels
                      ``gpr_3_3, gpr_3_2, gpr_2_3, gpr_2_2`` (percent), the complexity features
                      (columns listed in meta.json), ``image_index`` (row of the arrays)
    images.npy        (N, C, H, W) float32: channel 0 planned composite dose / its max,
                      channel 1 composite fluence / its max (``meta.json: channels``)
    dd.npy            (N, 1, H, W) float32: measured - planned composite, % of planned max
    meta.json         {"feature_columns": [...], "criteria": [...], "channels": [...],
                       "spacing_mm": s, "dd_units": "% of planned max"}

Tabular preprocessing (fit on the training plans only, stored with the model): median
imputation, a 0/1 missingness column for every feature that has missing values in train,
then z-scoring; constant columns get std 1. One-hot columns of categorical plan values
(``<column>=<value>``, e.g. ``treatment_machine=LINAC_A``, ``ml.psqa.pack``) are ordinary 0/1
features here; a pack that lacks one of the model's one-hot columns (a value it has never seen)
reads it as 0.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

__all__ = [
    "CRITERIA",
    "LABEL_COLUMNS",
    "ONE_HOT_SEP",
    "PRIMARY",
    "Pack",
    "TabularScaler",
    "Tensors",
    "criterion_column",
    "load_pack",
    "tensors_for",
    "write_pack",
]

CRITERIA = ("3%/3mm", "3%/2mm", "2%/3mm", "2%/2mm")
LABEL_COLUMNS = ("gpr_3_3", "gpr_3_2", "gpr_2_3", "gpr_2_2")
PRIMARY = "gpr_2_2"  # early stopping / headline criterion
ONE_HOT_SEP = "="  # one-hot feature columns are named <column>=<value>


def criterion_column(criterion: str) -> str:
    dose, dta = criterion.replace("mm", "").split("%/")
    return f"gpr_{int(float(dose))}_{int(float(dta))}"


@dataclass
class TabularScaler:
    columns: list[str]
    median: list[float]
    mean: list[float]
    std: list[float]
    missing_indicators: list[str]

    @classmethod
    def fit(cls, df: pd.DataFrame, columns: list[str]) -> TabularScaler:
        x = df[columns].astype("float64")
        med = x.median().fillna(0.0)
        ind = [c for c in columns if x[c].isna().any()]
        filled = x.fillna(med)
        mean = filled.mean()
        std = filled.std(ddof=0).replace(0.0, 1.0).fillna(1.0)
        return cls(columns, med.tolist(), mean.tolist(), std.tolist(), ind)

    def transform(self, df: pd.DataFrame) -> np.ndarray:
        absent = [c for c in self.columns if c not in df.columns]
        if any(ONE_HOT_SEP not in c for c in absent):
            raise KeyError(f"feature columns missing: {[c for c in absent if ONE_HOT_SEP not in c]}")
        if absent:  # one-hot columns of values these rows never take
            df = df.assign(**dict.fromkeys(absent, 0.0))
        x = df[self.columns].astype("float64")
        miss = [x[c].isna().to_numpy(dtype=np.float32) for c in self.missing_indicators]
        x = x.fillna(pd.Series(self.median, index=self.columns))
        z = (x - pd.Series(self.mean, index=self.columns)) / pd.Series(self.std, index=self.columns)
        z = np.clip(z.to_numpy(dtype=np.float32), -10, 10)
        return np.concatenate([z, np.stack(miss, axis=1)], axis=1) if miss else z

    @property
    def n_features(self) -> int:
        return len(self.columns) + len(self.missing_indicators)

    def to_dict(self) -> dict:
        return dict(
            columns=self.columns,
            median=self.median,
            mean=self.mean,
            std=self.std,
            missing_indicators=self.missing_indicators,
        )

    @classmethod
    def from_dict(cls, d: dict) -> TabularScaler:
        return cls(**d)


@dataclass
class Pack:
    root: Path
    table: pd.DataFrame
    images: np.ndarray
    dd: np.ndarray
    meta: dict

    @property
    def feature_columns(self) -> list[str]:
        return list(self.meta["feature_columns"])

    def split(self, name: str) -> pd.DataFrame:
        return self.table[self.table["split"] == name]

    def dd_for(self, rows: pd.DataFrame) -> np.ndarray:
        """The measured dose-difference maps of ``rows`` (N, 1, H, W)."""
        return np.asarray(self.dd[rows["image_index"].to_numpy()])


def load_pack(root: str | os.PathLike, mmap: bool = False) -> Pack:
    root = Path(root)
    table = pd.read_parquet(root / "dataset.parquet")
    meta = json.loads((root / "meta.json").read_text())
    images = np.load(root / "images.npy", mmap_mode="r" if mmap else None)
    dd = np.load(root / "dd.npy", mmap_mode="r" if mmap else None)
    if len(images) != len(dd) or table["image_index"].max() >= len(images):
        raise ValueError("pack arrays and table disagree")
    return Pack(root, table, images, dd, meta)


def write_pack(root: str | os.PathLike, table: pd.DataFrame, images: np.ndarray, dd: np.ndarray, meta: dict) -> Path:
    """Write a pack atomically per file (used by the Dagster asset and tests)."""
    from ml.utils.io import atomic_path, atomic_write_json, write_parquet_atomic

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for name, arr in (("images.npy", images), ("dd.npy", dd)):
        with atomic_path(root / name, suffix=".npy") as tmp:
            np.save(tmp, np.ascontiguousarray(arr, dtype=np.float32))
    write_parquet_atomic(root / "dataset.parquet", table)
    atomic_write_json(root / "meta.json", meta)
    return root


@dataclass
class Tensors:
    """Model inputs and labels of a set of pack rows (CPU tensors)."""

    image: torch.Tensor
    table: torch.Tensor
    gpr: torch.Tensor
    dd: torch.Tensor
    keys: list[str]


def tensors_for(pack: Pack, rows: pd.DataFrame, scaler: TabularScaler, label_columns=LABEL_COLUMNS) -> Tensors:
    idx = rows["image_index"].to_numpy()
    return Tensors(
        image=torch.from_numpy(np.asarray(pack.images[idx], dtype=np.float32)),
        table=torch.from_numpy(scaler.transform(rows)),
        gpr=torch.from_numpy(rows[list(label_columns)].to_numpy(dtype=np.float32, copy=True)),
        dd=torch.from_numpy(np.asarray(pack.dd[idx], dtype=np.float32)),
        keys=rows["plan_key"].astype(str).tolist(),
    )
