"""OpenKBP challenge data: sparse CSV reading/writing and conversion to the canonical grid.

Format (``domain-notes.md`` §1.2): one folder per patient; ``ct``, ``dose`` and
``possible_dose_mask`` plus one file per contoured ROI, each a sparse CSV with header
``,data`` whose first column is a flat C-order index into a 128x128x128 array (masks have an
empty ``data`` column); ``voxel_dimensions.csv`` holds three floats in mm. Files may be plain,
``.xz`` or ``.gz`` (pandas decompresses by extension). CT is stored as HU + 1024, dose in Gy.

Axes: array axis 0 is image rows (y, anterior->posterior), axis 1 columns (x, right->left),
axis 2 slices running *inferior*. ``to_canonical_array`` maps to the pipeline's ``[z, y, x]``
with z running superior (``arr.transpose(2, 0, 1)[::-1]``); ``from_canonical_array`` inverts it
for the submission format.

Only numpy and pandas are needed (this module runs on the GPU node).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ml.data.roi_names import OPENKBP_ROIS

__all__ = [
    "CT_OFFSET",
    "N_VOXELS",
    "REQUIRED_FILES",
    "SHAPE",
    "OpenKBPError",
    "OpenKBPPatient",
    "canonical_geometry",
    "dense",
    "from_canonical_array",
    "list_patient_files",
    "load_patient",
    "read_sparse",
    "read_voxel_dimensions",
    "to_canonical_array",
    "write_sparse",
]

SHAPE = (128, 128, 128)
N_VOXELS = int(np.prod(SHAPE))
CT_OFFSET = 1024  # stored value = HU + 1024
REQUIRED_FILES = ("ct", "possible_dose_mask", "voxel_dimensions")
_SUFFIX = re.compile(r"\.csv(\.xz|\.gz)?$")


class OpenKBPError(ValueError):
    """A patient folder is incomplete or a file is malformed (carries a reason code)."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


def list_patient_files(folder: str | os.PathLike) -> dict[str, Path]:
    """Map logical name (``ct``, ``dose``, ``PTV70``...) to the file in ``folder``."""
    out: dict[str, Path] = {}
    for p in sorted(Path(folder).iterdir()):
        if p.is_file() and _SUFFIX.search(p.name):
            out[_SUFFIX.sub("", p.name)] = p
    return out


def read_sparse(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """(flat indices int64, values float32 or None for a mask)."""
    try:
        df = pd.read_csv(path, index_col=0, engine="c")
    except pd.errors.EmptyDataError:
        return np.zeros(0, dtype=np.int64), None
    except Exception as exc:  # noqa: BLE001 - corrupt compression, bad CSV...
        raise OpenKBPError("unreadable", f"{Path(path).name}: {type(exc).__name__}") from None
    idx = df.index.to_numpy()
    if idx.size and idx.dtype.kind not in "iu":  # a header-only file has an untyped empty index
        raise OpenKBPError("invalid_content", f"{Path(path).name}: non-integer voxel indices")
    idx = idx.astype(np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= N_VOXELS):
        raise OpenKBPError("invalid_content", f"{Path(path).name}: voxel index out of range")
    if "data" not in df.columns:
        raise OpenKBPError("invalid_content", f"{Path(path).name}: no data column")
    col = df["data"]
    if col.isnull().all():
        return idx, None
    values = col.to_numpy(dtype=np.float32, na_value=np.nan)
    if not np.all(np.isfinite(values)):
        raise OpenKBPError("invalid_content", f"{Path(path).name}: non-finite values")
    return idx, values


def dense(idx: np.ndarray, values: np.ndarray | None, dtype=np.float32) -> np.ndarray:
    out = np.zeros(N_VOXELS, dtype=dtype)
    out[idx] = 1 if values is None else values
    return out.reshape(SHAPE)


def read_voxel_dimensions(path: str | os.PathLike) -> tuple[float, float, float]:
    try:
        vals = pd.read_csv(path, header=None, sep=r"[\s,]+", engine="python").to_numpy().ravel()
    except Exception as exc:  # noqa: BLE001
        raise OpenKBPError("unreadable", f"voxel_dimensions: {type(exc).__name__}") from None
    try:
        vals = np.asarray([float(v) for v in vals if str(v) != "nan"])
    except (TypeError, ValueError):
        raise OpenKBPError("invalid_content", "voxel_dimensions needs three positive numbers") from None
    if vals.size != 3 or np.any(~np.isfinite(vals)) or np.any(vals <= 0):
        raise OpenKBPError("invalid_content", "voxel_dimensions needs three positive numbers")
    return float(vals[0]), float(vals[1]), float(vals[2])


@dataclass
class OpenKBPPatient:
    ct_hu: np.ndarray  # int16 HU, OpenKBP axes
    dose: np.ndarray | None  # float32 Gy
    possible_dose_mask: np.ndarray  # bool
    structures: dict[str, np.ndarray] = field(default_factory=dict)  # bool masks (canonical names)
    voxel_dimensions: tuple[float, float, float] = (3.906, 3.906, 2.5)


def load_patient(folder: str | os.PathLike, require_dose: bool = True) -> OpenKBPPatient:
    files = list_patient_files(folder)
    missing = [n for n in REQUIRED_FILES if n not in files]
    if require_dose and "dose" not in files:
        missing.append("dose")
    if missing:
        raise OpenKBPError("incomplete_patient", "missing " + ",".join(missing))
    vd = read_voxel_dimensions(files["voxel_dimensions"])
    idx, val = read_sparse(files["ct"])
    if val is None:
        raise OpenKBPError("invalid_content", "ct has no values")
    # stored values are HU + 1024; a few patients carry extended-range HU for metal (up to
    # ~28000): kept as is (int16 holds up to 32767 HU), models clip when normalising
    if val.min() < 0 or val.max() > 32767 + CT_OFFSET:
        raise OpenKBPError("invalid_content", "ct values outside the int16 HU range")
    ct = (dense(idx, val, np.float32) - CT_OFFSET).astype(np.int16)
    dose = None
    if "dose" in files:
        idx, val = read_sparse(files["dose"])
        dose = dense(idx, val, np.float32)
        if dose.min() < 0 or dose.max() > 150:
            raise OpenKBPError("invalid_content", "dose outside 0..150 Gy")
    idx, _ = read_sparse(files["possible_dose_mask"])
    pdm = dense(idx, None, np.bool_)
    structures = {}
    for name in OPENKBP_ROIS:
        if name in files:
            idx, _ = read_sparse(files[name])
            structures[name] = dense(idx, None, np.bool_)
    return OpenKBPPatient(ct, dose, pdm, structures, vd)


def to_canonical_array(arr: np.ndarray) -> np.ndarray:
    """OpenKBP (rows, cols, inferior slices) -> pipeline [z (superior), y, x]."""
    return np.ascontiguousarray(arr.transpose(2, 0, 1)[::-1])


def from_canonical_array(arr: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(arr[::-1].transpose(1, 2, 0))


def canonical_geometry(voxel_dimensions: tuple[float, float, float]) -> dict:
    """Spacing (x, y, z) and an origin that centres the grid on 0 (OpenKBP has no origin)."""
    dy, dx, dz = voxel_dimensions
    spacing = (dx, dy, dz)
    origin = tuple(-(n - 1) / 2.0 * s for n, s in zip(SHAPE[::-1], spacing, strict=True))
    return {"spacing": spacing, "origin": origin}


def write_sparse(path: str | os.PathLike, arr: np.ndarray, mask: np.ndarray | None = None) -> None:
    """Write a dose array in the submission format (non-zero voxels, optionally masked)."""
    flat = np.asarray(arr, dtype=np.float64).reshape(-1)
    if mask is not None:
        flat = flat * np.asarray(mask, dtype=bool).reshape(-1)
    idx = np.nonzero(flat)[0]
    df = pd.DataFrame({"data": flat[idx]}, index=idx)
    df.to_csv(path)
