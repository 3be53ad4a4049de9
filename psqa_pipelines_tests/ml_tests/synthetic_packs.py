"""A small synthetic BMMQA training pack for the trainer and engine tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy.ndimage import gaussian_filter

from ml.psqa.dataset import LABEL_COLUMNS, write_pack

#: A small BMMQA network (fast on the CPU).
SMALL = {"enc_widths": [8, 16, 32, 64], "dec_widths": [16, 8, 8, 8]}


def synthetic_pack(root: Path, n: int = 120, size: int = 32) -> Path:
    """120 plans (72 train / 24 val / 24 test): GPR depends on table features AND image texture,
    DD on the image."""
    rng = np.random.default_rng(0)
    img = gaussian_filter(rng.normal(size=(n, 2, size, size)), sigma=(0, 0, 2, 2)).astype(np.float32)
    feats = rng.normal(size=(n, 6))
    base = 96 - 3 * np.tanh(feats[:, 0]) - 2 * (feats[:, 1] > 1) - 8 * img[:, 0].std(axis=(1, 2))
    gpr = np.stack([base + 2, base + 1, base + 0.5, base - 2], axis=1).clip(50, 100)
    dd = (3 * img[:, :1] - 2 * img[:, 1:]).astype(np.float32)
    df = pd.DataFrame(feats, columns=[f"f{i}" for i in range(6)])
    df.loc[::7, "f5"] = np.nan
    for j, c in enumerate(LABEL_COLUMNS):
        df[c] = gpr[:, j]
    df["plan_key"] = [f"p{i}" for i in range(n)]
    k = np.arange(n) % 5
    df["split"] = np.where(k == 0, "val", np.where(k == 1, "test", "train"))
    df["image_index"] = np.arange(n)
    write_pack(
        root,
        df,
        img,
        dd,
        {
            "feature_columns": [f"f{i}" for i in range(6)],
            "criteria": ["3%/3mm", "3%/2mm", "2%/3mm", "2%/2mm"],
            "channels": ["dose", "fluence"],
            "spacing_mm": 4.0,
        },
    )
    return root
