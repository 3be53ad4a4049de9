"""RT Dose grids as ``Volume`` objects (values in Gy when ``DoseUnits`` is GY).

GridFrameOffsetVector handling follows PS3.3 C.8.8.3.2: a first value of 0 means offsets
relative to ImagePositionPatient along the slice normal; otherwise the values are absolute
z coordinates (allowed for axial grids only). Frames stored in decreasing order are flipped so
that the volume's k axis points along the normal. Non-uniform frame spacing is an error (a
Cartesian grid cannot represent it without resampling, which would hide a broken export).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ml.data.dicom.headers import IngestError, decode_pixels
from ml.data.volume import Volume

__all__ = ["read_dose", "referenced_beam_number"]


def read_dose(ds, path: Path | None = None) -> Volume:
    rows, cols = int(ds.Rows), int(ds.Columns)
    nframes = int(ds.get("NumberOfFrames", 1) or 1)
    arr = np.asarray(decode_pixels(ds, path))
    arr = arr.reshape(nframes, rows, cols).astype(np.float64)
    scaling = float(ds.get("DoseGridScaling", 1.0) or 1.0)
    dose = (arr * scaling).astype(np.float32)
    iop = [float(v) for v in ds.ImageOrientationPatient]
    row, col = np.asarray(iop[:3]), np.asarray(iop[3:])
    normal = np.cross(row, col)
    ipp = np.asarray([float(v) for v in ds.ImagePositionPatient])
    ps = [float(v) for v in ds.PixelSpacing]
    if nframes > 1:
        offsets = np.asarray([float(v) for v in ds.GridFrameOffsetVector])
        if len(offsets) != nframes:
            raise IngestError("invalid_content", "GridFrameOffsetVector length differs from NumberOfFrames")
        if offsets[0] != 0:
            if not np.allclose(np.abs(normal), [0, 0, 1], atol=1e-4):
                raise IngestError("invalid_content", "absolute frame offsets on a non-axial dose grid")
            # absolute z -> offset along the normal (normal[2] is +1 or -1 here)
            offsets = (offsets - ipp[2]) * normal[2]
        gaps = np.diff(offsets)
        if np.any(gaps == 0):
            raise IngestError("invalid_content", "repeated dose frame offsets")
        if np.all(gaps < 0):
            dose = dose[::-1]
            offsets = offsets[::-1]
            gaps = -gaps[::-1]
        elif not np.all(gaps > 0):
            raise IngestError("invalid_content", "dose frame offsets are not monotonic")
        med = float(np.median(gaps))
        if np.any(np.abs(gaps - med) > max(0.01 * med, 0.05)):
            raise IngestError("invalid_content", "non-uniform dose frame spacing")
        origin = ipp + normal * offsets[0]
        dz = med
    else:
        origin = ipp
        dz = float(ds.get("SliceThickness", 0) or 0) or 1.0
    direction = np.column_stack([row, col, normal]).reshape(-1)
    return Volume(
        array=np.ascontiguousarray(dose),
        spacing=(ps[1], ps[0], dz),
        origin=tuple(origin),  # type: ignore[arg-type]
        direction=tuple(direction),  # type: ignore[arg-type]
        meta={
            "dose_units": str(ds.get("DoseUnits", "") or ""),
            "dose_type": str(ds.get("DoseType", "") or ""),
            "dose_summation_type": str(ds.get("DoseSummationType", "") or ""),
        },
    )


def referenced_beam_number(ds) -> int:
    """Beam number a per-beam RT Dose refers to (-1 for plan/composite doses)."""
    for rp in ds.get("ReferencedRTPlanSequence", []) or []:
        for fg in rp.get("ReferencedFractionGroupSequence", []) or []:
            for rb in fg.get("ReferencedBeamSequence", []) or []:
                if rb.get("ReferencedBeamNumber") is not None:
                    return int(rb.ReferencedBeamNumber)
    return -1
