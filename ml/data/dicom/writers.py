"""Shared pieces of the DICOM writers: file meta, RT Dose grid + pixel modules, atomic writes.

Used by the synthetic study generator (``ml.data.synthetic``), the IMRT QA simulator
(``ml.psqa.rt_writers``) and the prediction exports (``ml.contour_dose.export``), so there is
one implementation of:

* ``quantise_dose`` -- Gy -> unsigned integers (uint32 or uint16) with a ``DoseGridScaling``
  (negative doses clip to 0; a value that does not fit raises instead of wrapping);
* ``dose_grid_scaling_for`` -- the scaling a dose maximum needs for a given bit depth;
* ``file_meta`` -- the Part 10 file meta information (explicit VR little endian);
* ``set_rt_dose_grid`` -- Image Plane, Image Pixel, Multi-frame and RT Dose modules of an RT Dose
  dataset (geometry, ``GridFrameOffsetVector`` relative to the first frame, pixel data);
* ``image_reference`` / ``referenced_frame_of_reference`` / ``closed_planar_contour`` /
  ``structure_set_roi`` -- the RT Structure Set pieces (the referenced CT series, one
  CLOSED_PLANAR contour, and the three per-ROI items: StructureSetROI, ROIContour,
  RTROIObservations);
* ``write_dataset`` / ``atomic_write`` -- serialise in memory, temporary file next to the target,
  ``os.replace`` (readers never see a half-written file; same dataset -> same bytes).

Decimal strings may be passed as ``str`` (written verbatim, so a caller keeps its historical
formatting byte for byte) or as numbers (formatted with ``format_ds``). pydicom is imported
lazily.
"""

from __future__ import annotations

import io
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ml.data.dicom.headers import CT_IMAGE, MR_IMAGE, RT_DOSE, RT_PLAN, RT_STRUCT

__all__ = [
    "CT_IMAGE_STORAGE",
    "DOSE_GRID_SCALING",
    "MR_IMAGE_STORAGE",
    "RT_DOSE_STORAGE",
    "RT_PLAN_STORAGE",
    "RT_STRUCT_STORAGE",
    "STUDY_COMPONENT_SOP_CLASS",
    "atomic_write",
    "closed_planar_contour",
    "dose_grid_scaling_for",
    "file_meta",
    "format_ds",
    "image_reference",
    "quantise_dose",
    "referenced_frame_of_reference",
    "set_rt_dose_grid",
    "structure_set_roi",
    "write_dataset",
]

# the SOP class UIDs are those of ml.data.dicom.headers, under their writers' names
CT_IMAGE_STORAGE = CT_IMAGE
MR_IMAGE_STORAGE = MR_IMAGE
RT_STRUCT_STORAGE = RT_STRUCT
RT_DOSE_STORAGE = RT_DOSE
RT_PLAN_STORAGE = RT_PLAN
STUDY_COMPONENT_SOP_CLASS = "1.2.840.10008.3.1.2.3.1"  # conventional in RTReferencedStudySequence

DOSE_GRID_SCALING = 1e-6  # Gy per stored unit: 1 uGy steps, up to 4294 Gy in uint32

_DTYPES = {32: np.uint32, 16: np.uint16}


def format_ds(v: float, decimals: int = 6) -> str:
    """A DICOM DS string (<= 16 characters) of ``v`` with at most ``decimals`` decimals; no '-0'."""
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"{v!r} is not a finite DS value")
    for d in range(int(decimals), -1, -1):
        s = f"{v:.{d}f}"
        if "." in s:
            s = s.rstrip("0").rstrip(".")
        if s in ("-0", ""):
            s = "0"
        if len(s) <= 16:
            return s
    raise ValueError(f"{v!r} does not fit a DS")


def _ds(v: str | float, decimals: int = 6) -> str:
    return v if isinstance(v, str) else format_ds(v, decimals)


def quantise_dose(
    dose_gy: np.ndarray, scaling: float = DOSE_GRID_SCALING, *, bits: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """(stored unsigned array, the Gy values it decodes to) for ``DoseGridScaling = scaling``.

    Negative doses are clipped to 0 and NaN becomes 0; a dose above ``(2**bits - 1) * scaling``
    raises ``ValueError`` (see ``dose_grid_scaling_for``).
    """
    if bits not in _DTYPES:
        raise ValueError(f"bits must be 16 or 32, got {bits}")
    scaling = float(scaling)
    if not scaling > 0:
        raise ValueError(f"DoseGridScaling must be positive, got {scaling}")
    units = np.rint(np.clip(np.nan_to_num(np.asarray(dose_gy, float), nan=0.0), 0.0, None) / scaling)
    if units.size and float(units.max()) > 2**bits - 1:
        raise ValueError(
            f"dose {float(units.max()) * scaling:.6g} Gy does not fit {bits} bits at DoseGridScaling {scaling:g}"
        )
    stored = units.astype(_DTYPES[bits])
    return stored, stored.astype(np.float64) * scaling


def dose_grid_scaling_for(max_gy: float, bits: int = 32) -> str:
    """The ``DoseGridScaling`` (as its DS string) for a dose maximum of ``max_gy``.

    ``DOSE_GRID_SCALING`` (1e-6 Gy) when the maximum fits; otherwise ``max_gy / (2**bits - 1)``
    rounded *up* to 4 significant digits (so the maximum still fits). Quantise with
    ``float(returned string)`` so the stored values decode exactly as a reader decodes them.
    """
    if bits not in _DTYPES:
        raise ValueError(f"bits must be 16 or 32, got {bits}")
    top = 2**bits - 1
    max_gy = float(max_gy) if math.isfinite(float(max_gy)) else 0.0
    if max_gy <= top * DOSE_GRID_SCALING:
        return "1e-06"
    need = max_gy / top
    exp = math.floor(math.log10(need)) - 3
    mant = math.ceil(need / 10.0**exp - 1e-9)
    s = f"{mant}e{exp}"
    while float(s) * top < max_gy:  # guard against float rounding in the mantissa
        mant += 1
        s = f"{mant}e{exp}"
    return s


def file_meta(sop_class: str, sop_uid: str, implementation_version_name: str | None = None):
    """Part 10 file meta information for an explicit VR little endian dataset."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    if implementation_version_name:
        meta.ImplementationVersionName = implementation_version_name
    return meta


def set_rt_dose_grid(
    ds,
    stored: np.ndarray,
    *,
    position: Sequence[str | float],
    orientation: Sequence[str | float],
    pixel_spacing: Sequence[str | float],
    frame_offsets: Sequence[str | float],
    slice_thickness: str | float,
    dose_grid_scaling: str | float,
    frame_of_reference_uid: str,
    position_reference_indicator: str = "",
    summation_type: str = "PLAN",
    dose_type: str = "PHYSICAL",
    dose_units: str = "GY",
    heterogeneity_correction: str | None = "IMAGE",
):
    """Fill the geometry, pixel and RT Dose attributes of an RT Dose dataset (returns ``ds``).

    ``stored`` is ``[frames, rows, cols]`` (or ``[rows, cols]`` for one frame), uint32 or
    uint16, already quantised with ``dose_grid_scaling``. ``position`` is the
    ImagePositionPatient of the first frame, ``pixel_spacing`` is (row spacing, column spacing)
    and ``frame_offsets`` the GridFrameOffsetVector (first value 0: offsets along the normal
    of ``orientation``, PS3.3 C.8.8.3.2).
    """
    from pydicom.tag import Tag

    stored = np.asarray(stored)
    if stored.ndim == 2:
        stored = stored[None]
    if stored.ndim != 3:
        raise ValueError(f"stored dose must be 2D or 3D, got shape {stored.shape}")
    if stored.dtype == np.uint32:
        bits, little = 32, "<u4"
    elif stored.dtype == np.uint16:
        bits, little = 16, "<u2"
    else:
        raise ValueError(f"stored dose must be uint32 or uint16, got {stored.dtype}")
    frames, rows, cols = stored.shape
    if len(frame_offsets) != frames:
        raise ValueError(f"{len(frame_offsets)} frame offsets for {frames} frames")
    ds.SliceThickness = _ds(slice_thickness)
    ds.ImagePositionPatient = [_ds(v) for v in position]
    ds.ImageOrientationPatient = [_ds(v, 8) for v in orientation]
    ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.PositionReferenceIndicator = position_reference_indicator
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.NumberOfFrames = int(frames)
    ds.FrameIncrementPointer = Tag(0x3004, 0x000C)  # GridFrameOffsetVector
    ds.Rows = int(rows)
    ds.Columns = int(cols)
    ds.PixelSpacing = [_ds(v) for v in pixel_spacing]
    ds.BitsAllocated = bits
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.DoseUnits = dose_units
    ds.DoseType = dose_type
    ds.DoseSummationType = summation_type
    if heterogeneity_correction:
        ds.TissueHeterogeneityCorrection = heterogeneity_correction
    ds.GridFrameOffsetVector = [_ds(v) for v in frame_offsets]
    ds.DoseGridScaling = _ds(dose_grid_scaling, 8)
    ds.PixelData = np.ascontiguousarray(stored, dtype=little).tobytes()
    ds["PixelData"].VR = "OW"
    return ds


def image_reference(sop_class: str, sop_uid: str):
    """A (ReferencedSOPClassUID, ReferencedSOPInstanceUID) item, e.g. of a ContourImageSequence."""
    from pydicom.dataset import Dataset

    r = Dataset()
    r.ReferencedSOPClassUID = str(sop_class)
    r.ReferencedSOPInstanceUID = str(sop_uid)
    return r


def referenced_frame_of_reference(frame_of_reference_uid: str, study_uid: str, series_uid: str, images: Sequence):
    """The ReferencedFrameOfReferenceSequence item of an RT Structure Set: frame of reference ->
    study -> the CT series and every one of its ``images`` (``image_reference`` items)."""
    from pydicom.dataset import Dataset

    series_ref = Dataset()
    series_ref.SeriesInstanceUID = series_uid
    series_ref.ContourImageSequence = list(images)
    study_ref = Dataset()
    study_ref.ReferencedSOPClassUID = STUDY_COMPONENT_SOP_CLASS
    study_ref.ReferencedSOPInstanceUID = study_uid
    study_ref.RTReferencedSeriesSequence = [series_ref]
    for_ref = Dataset()
    for_ref.FrameOfReferenceUID = frame_of_reference_uid
    for_ref.RTReferencedStudySequence = [study_ref]
    return for_ref


def closed_planar_contour(image, number: int, n_points: int, contour_data: str):
    """One ContourSequence item: a CLOSED_PLANAR polygon of ``n_points`` on the CT image
    ``image`` (an ``image_reference``); ``contour_data`` is the backslash-joined x\\y\\z string."""
    from pydicom.dataset import Dataset

    c = Dataset()
    c.ContourImageSequence = [image]
    c.ContourGeometricType = "CLOSED_PLANAR"
    c.NumberOfContourPoints = int(n_points)
    c.ContourNumber = int(number)
    c.ContourData = contour_data
    return c


def structure_set_roi(
    number: int,
    name: str,
    frame_of_reference_uid: str,
    *,
    contours: Sequence,
    color: Sequence[int],
    interpreted_type: str = "ORGAN",
    algorithm: str = "MANUAL",
    description: str | None = None,
    empty_sequence: bool = True,
):
    """The three items one ROI needs in an RT Structure Set -> (StructureSetROISequence item,
    ROIContourSequence item, RTROIObservationsSequence item). ``empty_sequence=False`` leaves
    ContourSequence out when there is no contour (rather than writing an empty one)."""
    from pydicom.dataset import Dataset

    item = Dataset()
    item.ROINumber = number
    item.ReferencedFrameOfReferenceUID = frame_of_reference_uid
    item.ROIName = name
    item.ROIGenerationAlgorithm = algorithm
    if description is not None:
        item.ROIGenerationDescription = description
    rc = Dataset()
    rc.ROIDisplayColor = [int(v) for v in color]
    if contours or empty_sequence:
        rc.ContourSequence = list(contours)
    rc.ReferencedROINumber = number
    ob = Dataset()
    ob.ObservationNumber = number
    ob.ReferencedROINumber = number
    ob.RTROIInterpretedType = interpreted_type
    ob.ROIInterpreter = ""
    return item, rc, ob


def atomic_write(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to a temporary file next to ``path`` and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def write_dataset(ds, path: str | os.PathLike) -> Path:
    """Serialise a dataset (DICOM Part 10, its file meta's transfer syntax) and write it atomically."""
    from pydicom import dcmwrite

    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return atomic_write(Path(path), buf.getvalue())
