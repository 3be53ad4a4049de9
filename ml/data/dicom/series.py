"""Image series assembly: validation of slice geometry and loading into a ``Volume``.

Validation rules (each failure quarantines the *whole* series; we never interpolate over a
missing slice or guess an orientation):

* all slices share Rows/Columns, PixelSpacing (1e-3 mm) and ImageOrientationPatient (1e-4);
* slices are ordered by their position along the slice normal ``n = row x col``
  (``d = IPP . n``), never by InstanceNumber or file name;
* no two slices at the same position (0.01 mm), which catches duplicated slices with new UIDs;
* uniform spacing: every gap is within 1 % (and 0.05 mm) of the median gap, which catches
  missing slices;
* in-plane positions constant (IPP projected on the row and column directions within 0.1 mm),
  which catches gantry-tilted / sheared stacks that a Cartesian grid cannot represent.

Loading decodes slices with pydicom (native transfer syntaxes with a zero-copy ``frombuffer``
fast path), applies each slice's own rescale slope/intercept and returns float32 values (HU for
CT).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ml.data.dicom.headers import DicomInstance, IngestError, decode_pixels, quiet_pydicom
from ml.data.volume import Volume

__all__ = ["SeriesGeometry", "load_series_volume", "validate_series"]


@dataclass
class SeriesGeometry:
    rows: int
    columns: int
    n_slices: int
    spacing: tuple[float, float, float]  # x, y, z mm
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    positions: list[float]  # along the normal, sorted


def _orientation(iop) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    row = np.asarray(iop[:3], dtype=float)
    col = np.asarray(iop[3:], dtype=float)
    return row, col, np.cross(row, col)


def validate_series(instances: list[DicomInstance]) -> tuple[list[DicomInstance], SeriesGeometry]:
    """Sort the slices of one image series and check that they form a regular grid."""
    if not instances:
        raise IngestError("inconsistent_series", "empty series")
    first = instances[0]
    for inst in instances[1:]:
        if (inst.rows, inst.columns) != (first.rows, first.columns):
            raise IngestError("inconsistent_series", "slices differ in matrix size")
        if not np.allclose(inst.pixel_spacing, first.pixel_spacing, atol=1e-3):
            raise IngestError("inconsistent_series", "slices differ in pixel spacing")
        if not np.allclose(inst.image_orientation, first.image_orientation, atol=1e-4):
            raise IngestError("inconsistent_series", "mixed orientation")
    row, col, normal = _orientation(first.image_orientation)
    pos = np.array([np.dot(inst.image_position, normal) for inst in instances])
    order = np.argsort(pos, kind="stable")
    ordered = [instances[i] for i in order]
    pos = pos[order]
    if len(ordered) > 1:
        gaps = np.diff(pos)
        if np.any(gaps < 0.01):
            raise IngestError("inconsistent_series", "duplicate slice positions")
        med = float(np.median(gaps))
        if np.any(np.abs(gaps - med) > max(0.01 * med, 0.05)):
            raise IngestError("inconsistent_series", "non-uniform slice spacing (missing slices?)")
        ipp = np.array([inst.image_position for inst in ordered])
        inplane = np.stack([ipp @ row, ipp @ col], axis=1)
        if np.any(np.abs(inplane - inplane[0]) > 0.1):
            raise IngestError("inconsistent_series", "slice positions drift in-plane (tilted or sheared stack)")
        dz = med
    else:
        dz = float(first.slice_thickness or 1.0)
        if dz <= 0:
            dz = 1.0
    ps = first.pixel_spacing  # (row spacing, column spacing)
    direction = np.column_stack([row, col, normal]).reshape(-1)
    geom = SeriesGeometry(
        rows=first.rows,
        columns=first.columns,
        n_slices=len(ordered),
        spacing=(float(ps[1]), float(ps[0]), float(dz)),
        origin=tuple(float(v) for v in ordered[0].image_position),  # type: ignore[arg-type]
        direction=tuple(float(v) for v in direction),
        positions=[float(p) for p in pos],
    )
    return ordered, geom


# ---------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------
_NATIVE = {
    "1.2.840.10008.1.2": "<",  # implicit little
    "1.2.840.10008.1.2.1": "<",  # explicit little
    "1.2.840.10008.1.2.2": ">",  # explicit big
}


def _read_slice(path: str) -> tuple[np.ndarray, float, float, tuple[float, ...], tuple[float, ...]]:
    import pydicom

    with quiet_pydicom():
        ds = pydicom.dcmread(path)
    ts = str(ds.file_meta.get("TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else ""
    rows, cols = int(ds.Rows), int(ds.Columns)
    bits = int(ds.BitsAllocated)
    if ts in _NATIVE and bits in (8, 16, 32) and int(ds.get("SamplesPerPixel", 1)) == 1:
        signed = int(ds.get("PixelRepresentation", 0)) == 1
        dtype = np.dtype(f"{_NATIVE[ts]}{'i' if signed else 'u'}{bits // 8}")
        arr = np.frombuffer(ds.PixelData, dtype=dtype, count=rows * cols).reshape(rows, cols)
        bits_stored = int(ds.get("BitsStored", bits))
        if signed and bits_stored < bits:
            # sign-extend values stored in fewer bits than allocated (the shift is relative to
            # the int32 working type, whose sign bit is bit 31)
            shift = 32 - bits_stored
            arr = (arr.astype(np.int32) << shift) >> shift
    else:
        arr = decode_pixels(ds, Path(path))
    slope = float(ds.get("RescaleSlope", 1) or 1)
    inter = float(ds.get("RescaleIntercept", 0) or 0)
    ipp = tuple(float(v) for v in ds.ImagePositionPatient)
    iop = tuple(float(v) for v in ds.ImageOrientationPatient)
    return arr, slope, inter, ipp, iop


def load_series_volume(paths: list[str | os.PathLike]) -> Volume:
    """Read the slices of one series (any order) into a float32 Volume (HU for CT).

    Slices are ordered by position along the normal; the slice spacing is the median gap.
    This assumes a series that passed ``validate_series`` (ingestion guarantees it for the
    stored copies). One process on purpose: the native-syntax fast path decodes >1000
    512x512 slices/s, and process or thread pools measured slower (pickling the arrays, the
    GIL in pydicom's parser) -- see ``benchmarks/ingest.py``.
    """
    paths = [str(p) for p in paths]
    if not paths:
        raise ValueError("no slices")
    slices = [_read_slice(p) for p in paths]
    row, col, normal = _orientation(slices[0][4])
    pos = np.array([np.dot(s[3], normal) for s in slices])
    order = np.argsort(pos, kind="stable")
    first = slices[order[0]]
    rows, cols = first[0].shape
    out = np.empty((len(slices), rows, cols), dtype=np.float32)
    for k, idx in enumerate(order):
        arr, slope, inter, _, _ = slices[idx]
        if arr.shape != (rows, cols):
            raise IngestError("inconsistent_series", "slices differ in matrix size")
        np.multiply(arr, slope, out=out[k], casting="unsafe")
        out[k] += inter
    import pydicom

    with quiet_pydicom():
        ds0 = pydicom.dcmread(paths[order[0]], stop_before_pixels=True)
    ps = [float(v) for v in ds0.PixelSpacing]
    if len(slices) > 1:
        dz = float(np.median(np.diff(pos[order])))
    else:
        dz = float(ds0.get("SliceThickness", 1.0) or 1.0)
    direction = np.column_stack([row, col, normal]).reshape(-1)
    return Volume(
        array=out,
        spacing=(ps[1], ps[0], dz),
        origin=first[3],
        direction=tuple(direction),
        meta={"modality": str(ds0.get("Modality", ""))},
    )
