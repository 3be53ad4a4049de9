"""The compact contour + dose training cache.

One compressed ``.npz`` per patient plus ``index.parquet`` and ``meta.json``::

    CACHE/meta.json                 version, ROI order, grid
    CACHE/index.parquet             patient_id, file, sha256, bytes, z/y/x crop box, rois, has_dose
    CACHE/patients/<patient_id>.npz ct (int16 HU), rois (bit-packed [R, z, y, x]), pdm (bit-packed),
                                    dose (float16 Gy), box, full_shape, voxel_dimensions

Arrays are in the pipeline's canonical ``[z, y, x]`` order (z superior; see
``ml.data.openkbp.to_canonical_array``), cropped to the box that holds the body
(CT > -500 HU), the possible-dose mask and every ROI, so a patient costs ~0.3 MB instead of
the ~20 MB of dense arrays. Dose is float16: the rounding error is at most 0.031 Gy above
32 Gy (half a float16 ulp), 0.016 Gy below, far under the ~2.5 Gy scores being measured.

``load_entry`` restores the full in-plane grid (128 x 128 for OpenKBP) but keeps only the
cropped slice range, so a 2D trainer can stack slices from every patient directly.
Only numpy, pandas and pyarrow are needed (the GPU node has nothing else).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ml.data.roi_names import OARS, OPENKBP_ROIS, TARGETS

__all__ = [
    "BODY_HU",
    "CACHE_VERSION",
    "MODEL_INPLANE",
    "MODEL_SPACING_XYZ",
    "PRESCRIPTIONS",
    "ROI_ORDER",
    "Cache",
    "CacheError",
    "Entry",
    "arrays_from_volumes",
    "crop_box",
    "entry_from_arrays",
    "entry_from_openkbp",
    "model_grid",
    "openkbp_arrays",
    "pack_arrays",
    "pack_openkbp_dir",
    "write_entry",
    "write_index",
]

CACHE_VERSION = 1
ROI_ORDER = OPENKBP_ROIS  # 7 OARs then PTV56, PTV63, PTV70
PRESCRIPTIONS = {"PTV70": 70.0, "PTV63": 63.0, "PTV56": 56.0}
BODY_HU = -500.0


class CacheError(ValueError):
    pass


@dataclass
class Entry:
    """One patient, canonical [z, y, x], full in-plane grid, slices ``z0:z0 + n``."""

    patient_id: str
    ct: np.ndarray  # int16 HU [n, H, W]
    rois: dict[str, np.ndarray]  # bool [n, H, W], canonical names
    pdm: np.ndarray  # bool [n, H, W]
    dose: np.ndarray | None  # float32 Gy [n, H, W]
    z0: int
    full_shape: tuple[int, int, int]
    voxel_dimensions: tuple[float, float, float]  # OpenKBP order: (row mm, col mm, slice mm)
    meta: dict = field(default_factory=dict)

    @property
    def n_slices(self) -> int:
        return int(self.ct.shape[0])

    def full(self, arr: np.ndarray, fill=0) -> np.ndarray:
        """Put a [n, H, W] array back into the full [Z, H, W] grid."""
        out = np.full(self.full_shape, fill, dtype=arr.dtype)
        out[self.z0 : self.z0 + self.n_slices] = arr
        return out


def crop_box(ct_hu: np.ndarray, pdm: np.ndarray, masks: Iterable[np.ndarray], margin: int = 2) -> np.ndarray:
    """[[z0, z1], [y0, y1], [x0, x1]] (half-open) holding body, pdm and ROIs, plus a margin."""
    keep = (ct_hu > BODY_HU) | pdm
    for m in masks:
        keep |= m
    if not keep.any():
        raise CacheError("empty volume: no body, possible-dose mask or ROI voxels")
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.nonzero(keep.any(axis=other))[0]
        box.append([max(int(idx[0]) - margin, 0), min(int(idx[-1]) + 1 + margin, keep.shape[axis])])
    return np.asarray(box, dtype=np.int32)


def _crop(arr: np.ndarray, box: np.ndarray) -> np.ndarray:
    return arr[box[0, 0] : box[0, 1], box[1, 0] : box[1, 1], box[2, 0] : box[2, 1]]


def pack_arrays(
    patient_id: str,
    ct_hu: np.ndarray,
    pdm: np.ndarray,
    rois: dict[str, np.ndarray],
    dose: np.ndarray | None,
    voxel_dimensions,
) -> dict[str, np.ndarray]:
    """Canonical full arrays -> the stored arrays of one cache file."""
    if ct_hu.ndim != 3 or pdm.shape != ct_hu.shape:
        raise CacheError(f"{patient_id}: CT {ct_hu.shape} and pdm {pdm.shape} must be equal 3D shapes")
    unknown = sorted(set(rois) - set(ROI_ORDER))
    if unknown:
        raise CacheError(f"{patient_id}: unknown ROI names {unknown}")
    for name, m in rois.items():
        if m.shape != ct_hu.shape:
            raise CacheError(f"{patient_id}: ROI {name} shape {m.shape} != CT {ct_hu.shape}")
    if dose is not None and (dose.shape != ct_hu.shape or not np.all(np.isfinite(dose)) or dose.min() < 0):
        raise CacheError(f"{patient_id}: dose must be finite, non-negative and on the CT grid")
    present = [n for n in ROI_ORDER if n in rois and rois[n].any()]
    box = crop_box(ct_hu, pdm, (rois[n] for n in present))
    stack = np.stack([_crop(rois[n], box) for n in present]) if present else np.zeros((0,), bool)
    arrays = {
        "ct": np.clip(_crop(ct_hu, box), -32768, 32767).astype(np.int16),
        "pdm": np.packbits(_crop(pdm, box).astype(bool).reshape(-1)),
        "rois": np.packbits(stack.astype(bool).reshape(-1)),
        "roi_names": np.asarray(present, dtype="U16"),
        "box": box,
        "full_shape": np.asarray(ct_hu.shape, dtype=np.int32),
        "voxel_dimensions": np.asarray(voxel_dimensions, dtype=np.float64),
    }
    if dose is not None:
        arrays["dose"] = np.minimum(_crop(dose, box), 65000).astype(np.float16)
    return arrays


def entry_from_arrays(patient_id: str, z: dict[str, np.ndarray], full_inplane: bool = True) -> Entry:
    box = np.asarray(z["box"], dtype=np.int64)
    full_shape = tuple(int(v) for v in z["full_shape"])
    cshape = tuple(int(b[1] - b[0]) for b in box)
    n = int(np.prod(cshape))
    names = [str(s) for s in z["roi_names"]]
    stack = np.unpackbits(z["rois"], count=n * len(names)).astype(bool).reshape((len(names), *cshape))
    pdm = np.unpackbits(z["pdm"], count=n).astype(bool).reshape(cshape)
    ct = z["ct"]
    dose = z["dose"].astype(np.float32) if "dose" in z else None
    if full_inplane:  # restore the in-plane grid, keep the slice crop
        H, W = full_shape[1], full_shape[2]
        ys, xs = slice(box[1, 0], box[1, 1]), slice(box[2, 0], box[2, 1])

        def place(a, fill, dtype):
            out = np.full((cshape[0], H, W), fill, dtype=dtype)
            out[:, ys, xs] = a
            return out

        ct = place(ct, -1024, np.int16)
        pdm = place(pdm, False, bool)
        stack = np.stack([place(s, False, bool) for s in stack]) if len(names) else stack
        dose = place(dose, 0.0, np.float32) if dose is not None else None
    return Entry(
        patient_id=patient_id,
        ct=ct,
        rois={nm: stack[i] for i, nm in enumerate(names)},
        pdm=pdm,
        dose=dose,
        z0=int(box[0, 0]),
        full_shape=full_shape,
        voxel_dimensions=tuple(float(v) for v in z["voxel_dimensions"]),
        meta={k: tuple(float(v) for v in z[k]) for k in ("grid_origin", "grid_spacing") if k in z},
    )


MODEL_SPACING_XYZ = (3.906, 3.906, 2.5)  # the OpenKBP grid (mm)
MODEL_INPLANE = 128


def model_grid(ct, spacing_xyz=MODEL_SPACING_XYZ, inplane: int = MODEL_INPLANE):
    """The OpenKBP-like grid for a canonical CT ``Volume``: 3.906 x 3.906 x 2.5 mm, 128 x 128
    in-plane centred on the body's centroid (500 mm field of view), slices covering the CT."""
    from ml.data.volume import Volume

    body = ct.array > BODY_HU
    if not body.any():
        raise CacheError("CT has no body voxels (nothing above -500 HU)")
    _, jj, ii = np.nonzero(body)
    centre_ij = np.array([ii.mean(), jj.mean()])
    sp = np.asarray(ct.spacing, float)
    centre = np.asarray(ct.origin, float)[:2] + centre_ij * sp[:2]  # canonical: identity direction
    nz = max(int(np.floor((ct.array.shape[0] - 1) * sp[2] / spacing_xyz[2])) + 1, 1)
    origin = (
        centre[0] - (inplane - 1) / 2 * spacing_xyz[0],
        centre[1] - (inplane - 1) / 2 * spacing_xyz[1],
        float(ct.origin[2]),
    )
    return Volume(np.zeros((nz, inplane, inplane), np.uint8), spacing_xyz, origin)


def arrays_from_volumes(
    patient_id: str, ct, masks: dict, dose=None, pdm=None, spacing_xyz=MODEL_SPACING_XYZ
) -> tuple[dict[str, np.ndarray], object]:
    """Canonical ``Volume`` objects from the preprocessed lake (DICOM or NIfTI studies) -> cache arrays
    on the model grid, and that grid (a ``Volume`` of zeros) for mapping predictions back.

    CT is resampled linearly (-1024 HU outside), masks by nearest neighbour, dose linearly.
    Without a possible-dose mask (DICOM studies have none) the body (CT > -500 HU) is used [I]:
    OpenKBP's mask is the body region that may receive dose.
    """
    from ml.data.volume import resample_to

    grid = model_grid(ct, spacing_xyz)
    ct_m = resample_to(ct, grid, "linear", default_value=-1024.0, dtype=np.float32).array
    ct_m = np.clip(np.rint(ct_m), -32768, 32767).astype(np.int16)
    rois = {}
    for name, vol in masks.items():
        if name in ROI_ORDER:
            rois[name] = resample_to(vol.with_array(vol.array.astype(np.uint8)), grid, "nearest").array.astype(bool)
    if pdm is not None:
        pdm_m = resample_to(pdm.with_array(pdm.array.astype(np.uint8)), grid, "nearest").array.astype(bool)
    else:
        pdm_m = ct_m > BODY_HU
    dose_m = None
    if dose is not None:
        dose_m = np.maximum(resample_to(dose, grid, "linear", 0.0, np.float32).array, 0)
    # OpenKBP order of voxel_dimensions: (row = y, col = x, slice = z)
    vd = (spacing_xyz[1], spacing_xyz[0], spacing_xyz[2])
    arrays = pack_arrays(patient_id, ct_m, pdm_m, rois, dose_m, vd)
    arrays["grid_origin"] = np.asarray(grid.origin, dtype=np.float64)
    arrays["grid_spacing"] = np.asarray(grid.spacing, dtype=np.float64)
    return arrays, grid


def entry_from_openkbp(patient_id: str, patient) -> Entry:
    """An ``OpenKBPPatient`` (OpenKBP axes) -> an in-memory ``Entry`` (no file written)."""
    arrays = openkbp_arrays(patient_id, patient)
    return entry_from_arrays(patient_id, arrays)


def openkbp_arrays(patient_id: str, patient) -> dict[str, np.ndarray]:
    from ml.data.openkbp import to_canonical_array

    rois = {n: to_canonical_array(m) for n, m in patient.structures.items() if n in ROI_ORDER}
    dose = to_canonical_array(patient.dose) if patient.dose is not None else None
    return pack_arrays(
        patient_id,
        to_canonical_array(patient.ct_hu),
        to_canonical_array(patient.possible_dose_mask),
        rois,
        dose,
        patient.voxel_dimensions,
    )


# ---------------------------------------------------------------------------------------
# the cache directory
# ---------------------------------------------------------------------------------------
def write_entry(cache_dir: str | os.PathLike, patient_id: str, arrays: dict[str, np.ndarray]) -> dict:
    from ml.utils.io import save_npz_deterministic, sha256_bytes

    rel = f"patients/{patient_id}.npz"
    data = save_npz_deterministic(Path(cache_dir) / rel, arrays)
    box = arrays["box"]
    return {
        "patient_id": patient_id,
        "file": rel,
        "sha256": sha256_bytes(data),
        "bytes": len(data),
        "z0": int(box[0, 0]),
        "z1": int(box[0, 1]),
        "y0": int(box[1, 0]),
        "y1": int(box[1, 1]),
        "x0": int(box[2, 0]),
        "x1": int(box[2, 1]),
        "rois": ",".join(str(s) for s in arrays["roi_names"]),
        "has_dose": "dose" in arrays,
    }


def write_index(cache_dir: str | os.PathLike, rows: list[dict], **meta: object) -> pd.DataFrame:
    from ml.utils.io import atomic_write_json, write_parquet_atomic

    index = pd.DataFrame(rows).sort_values("patient_id", key=_natural_key).reset_index(drop=True)
    write_parquet_atomic(Path(cache_dir) / "index.parquet", index)
    atomic_write_json(
        Path(cache_dir) / "meta.json",
        {
            "version": CACHE_VERSION,
            "roi_order": list(ROI_ORDER),
            "oars": list(OARS),
            "targets": list(TARGETS),
            "prescriptions": PRESCRIPTIONS,
            "n_patients": len(index),
            "bytes": int(index["bytes"].sum()),
            **meta,
        },
    )
    return index


def _natural_key(s: pd.Series) -> pd.Series:
    return s.map(lambda v: (str(v).rstrip("0123456789"), int(str(v)[len(str(v).rstrip("0123456789")) :] or -1)))


def pack_openkbp_dir(
    data_dir: str | os.PathLike, cache_dir: str | os.PathLike, require_dose: bool = True, log=print
) -> tuple[pd.DataFrame, list[dict]]:
    """``python -m ml contour-dose pack``: every ``pt_N/`` folder under ``data_dir`` -> the cache.

    Incomplete or malformed patients are skipped and reported (returned as ``skipped`` rows),
    never fatal for the others.
    """
    from ml.data.openkbp import OpenKBPError, load_patient

    data_dir, cache_dir = Path(data_dir), Path(cache_dir)
    folders = sorted((p for p in data_dir.iterdir() if p.is_dir()), key=lambda p: _natural_key(pd.Series([p.name]))[0])
    if not folders:
        raise CacheError(f"no patient folders under {data_dir}")
    rows, skipped = [], []
    for i, folder in enumerate(folders):
        try:
            patient = load_patient(folder, require_dose=require_dose)
            rows.append(write_entry(cache_dir, folder.name, openkbp_arrays(folder.name, patient)))
        except (OpenKBPError, CacheError) as exc:
            skipped.append({"patient_id": folder.name, "reason": str(exc)})
            log(f"skipped {folder.name}: {exc}")
        if (i + 1) % 20 == 0:
            log(f"packed {i + 1}/{len(folders)}")
    if not rows:
        raise CacheError(f"no usable patients under {data_dir} ({len(skipped)} skipped)")
    index = write_index(cache_dir, rows, source=str(data_dir), skipped=skipped)
    return index, skipped


@dataclass
class Cache:
    root: Path
    index: pd.DataFrame
    meta: dict

    @classmethod
    def open(cls, root: str | os.PathLike) -> Cache:
        root = Path(root)
        if not (root / "meta.json").exists():
            raise CacheError(f"{root} is not a contour-dose cache (no meta.json); run `python -m ml contour-dose pack`")
        meta = json.loads((root / "meta.json").read_text())
        if meta.get("version") != CACHE_VERSION:
            raise CacheError(f"cache version {meta.get('version')} != {CACHE_VERSION}: rebuild it")
        return cls(root, pd.read_parquet(root / "index.parquet"), meta)

    @property
    def patient_ids(self) -> list[str]:
        return list(self.index["patient_id"])

    def load(self, patient_id: str) -> Entry:
        row = self.index[self.index["patient_id"] == patient_id]
        if row.empty:
            raise CacheError(f"patient {patient_id} is not in the cache")
        with np.load(self.root / row["file"].iloc[0], allow_pickle=False) as z:
            return entry_from_arrays(patient_id, {k: z[k] for k in z.files})
