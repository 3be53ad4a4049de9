"""Reading DICOM files defensively and summarising what ingestion needs from them.

``read_dataset`` never lets pydicom's warnings or exception texts escape: both may quote
element values (names, dates) and would end up in logs. Every failure becomes an
``IngestError`` with a reason code from ``REASONS`` and a detail string we wrote ourselves.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "CT_IMAGE",
    "IMAGE_MODALITIES",
    "MR_IMAGE",
    "REASONS",
    "RT_DOSE",
    "RT_PLAN",
    "RT_STRUCT",
    "SUPPORTED_SOP_CLASSES",
    "DicomInstance",
    "IngestError",
    "dataset_to_bytes",
    "decode_pixels",
    "quiet_pydicom",
    "read_dataset",
    "summarize",
    "validate_pixels",
]

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
RT_DOSE = "1.2.840.10008.5.1.4.1.1.481.2"
RT_STRUCT = "1.2.840.10008.5.1.4.1.1.481.3"
RT_PLAN = "1.2.840.10008.5.1.4.1.1.481.5"
SUPPORTED_SOP_CLASSES = {
    CT_IMAGE: "CT",
    MR_IMAGE: "MR",
    RT_DOSE: "RTDOSE",
    RT_STRUCT: "RTSTRUCT",
    RT_PLAN: "RTPLAN",
}
IMAGE_MODALITIES = ("CT", "MR")

# reason code -> human description (no values from the file ever go into these)
REASONS = {
    "not_dicom": "not a DICOM file (no DICM preamble and no parseable dataset)",
    "unreadable": "DICOM parser failed on the file",
    "truncated": "file ends before the pixel data / dataset is complete",
    "missing_required_tags": "required attributes are missing or empty",
    "unsupported_sop_class": "SOP class not handled by this pipeline",
    "burned_in_annotation": "BurnedInAnnotation=YES: pixel data may carry PHI",
    "pixel_decode_failed": "pixel data could not be decoded",
    "duplicate_file": "identical copy of a file already ingested in this study",
    "duplicate_sop_instance": "another file with the same SOP Instance UID but different content",
    "inconsistent_series": "image series geometry is inconsistent",
    "dangling_reference": "RT object references nothing ingested in this study",
    "invalid_content": "file content is inconsistent with its own header",
    "incomplete_patient": "required files of the patient are missing",
    "unattributable": "file could not be attributed to any study",
    "unrecognised_sequence": "MRI sequence (T1/T1c/T2/FLAIR/seg) could not be identified",
    "ambiguous_sequence": "several files claim the same MRI sequence of one case",
}


class IngestError(Exception):
    """A file (or a group of files) cannot be ingested; carries a reason code."""

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown reason {reason!r}")
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


@contextlib.contextmanager
def quiet_pydicom():
    """Silence pydicom warnings and its logger (they may echo element values).

    Value validation on reading is switched off inside the block (``reading_validation_mode =
    IGNORE``): in pydicom's default WARN mode it only warns, and those warnings are silenced here
    anyway, while checking every value of an RT Plan's thousands of leaf positions costs about a
    third of its parse time. A value that cannot be converted still raises."""
    import logging

    from pydicom import config

    logger = logging.getLogger("pydicom")
    old_level, old_prop = logger.level, logger.propagate
    old_mode = config.settings.reading_validation_mode
    logger.setLevel(logging.CRITICAL + 1)
    logger.propagate = False
    config.settings.reading_validation_mode = config.IGNORE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        config.settings.reading_validation_mode = old_mode
        logger.setLevel(old_level)
        logger.propagate = old_prop


def read_dataset(path: str | os.PathLike, *, stop_before_pixels: bool = False, specific_tags: list | None = None):
    """Read a DICOM file; files without preamble/meta are accepted only if they look like a
    real dataset (SOP Class UID and Study Instance UID present)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    path = Path(path)
    with quiet_pydicom():
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, specific_tags=specific_tags)
        except InvalidDicomError:
            ds = None
        except (EOFError, OSError) as exc:
            raise IngestError("truncated", type(exc).__name__) from None
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types on bad files
            raise IngestError("unreadable", type(exc).__name__) from None
        if ds is None:
            try:
                ds = pydicom.dcmread(
                    path, stop_before_pixels=stop_before_pixels, force=True, specific_tags=specific_tags
                )
            except Exception:  # noqa: BLE001
                raise IngestError("not_dicom") from None
            try:
                looks_real = bool(ds.get("SOPClassUID")) and bool(ds.get("StudyInstanceUID"))
            except Exception:  # noqa: BLE001
                looks_real = False
            if not looks_real:
                raise IngestError("not_dicom")
        try:
            # force pydicom to parse every element now so that lazy failures surface here
            if not stop_before_pixels and specific_tags is None:
                for _ in ds.iterall():
                    pass
        except Exception as exc:  # noqa: BLE001
            raise IngestError("unreadable", f"parse error ({type(exc).__name__})") from None
    return ds


def _get(ds, keyword, default=None):
    try:
        value = ds.get(keyword, default)
    except Exception:  # noqa: BLE001 - malformed element values raise on access
        return default
    return default if value is None else value


def _floats(value, n: int | None = None) -> tuple[float, ...] | None:
    if value is None or value == "":
        return None
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        value = [value]
    try:
        vals = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    if n is not None and len(vals) != n:
        return None
    if not all(np.isfinite(vals)):
        return None
    return vals


@dataclass
class DicomInstance:
    """Header facts about one DICOM file (original identifiers: keep in memory only)."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    modality: str  # CT | MR | RTDOSE | RTSTRUCT | RTPLAN
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    transfer_syntax: str
    rows: int = 0
    columns: int = 0
    number_of_frames: int = 1
    pixel_spacing: tuple[float, float] | None = None  # (row spacing, column spacing) mm
    image_position: tuple[float, float, float] | None = None
    image_orientation: tuple[float, ...] | None = None
    slice_thickness: float | None = None
    referenced_series_uids: tuple[str, ...] = ()
    referenced_frame_uids: tuple[str, ...] = ()
    referenced_plan_uids: tuple[str, ...] = ()
    extra: dict = field(default_factory=dict)


def _sequence(ds, keyword):
    seq = _get(ds, keyword, None)
    return list(seq) if seq else []


def summarize(ds, path: Path) -> DicomInstance:
    """Extract and validate the attributes ingestion needs. Raises IngestError."""
    sop_class = str(_get(ds, "SOPClassUID", "") or "")
    if not sop_class:
        meta = getattr(ds, "file_meta", None)
        media_class = str(_get(meta, "MediaStorageSOPClassUID", "") or "") if meta is not None else ""
        if media_class and media_class not in SUPPORTED_SOP_CLASSES:
            raise IngestError("unsupported_sop_class", _sop_class_name(media_class))
        raise IngestError("missing_required_tags", "SOPClassUID")
    if sop_class not in SUPPORTED_SOP_CLASSES:
        raise IngestError("unsupported_sop_class", _sop_class_name(sop_class))
    modality = SUPPORTED_SOP_CLASSES[sop_class]
    missing = [k for k in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID") if not _get(ds, k)]
    if missing:
        raise IngestError("missing_required_tags", ",".join(missing))
    meta = getattr(ds, "file_meta", None)
    tsyntax = str(_get(meta, "TransferSyntaxUID", "") if meta is not None else "") or ""
    inst = DicomInstance(
        path=path,
        sop_class_uid=sop_class,
        sop_instance_uid=str(ds.SOPInstanceUID),
        modality=modality,
        study_uid=str(ds.StudyInstanceUID),
        series_uid=str(ds.SeriesInstanceUID),
        frame_of_reference_uid=str(_get(ds, "FrameOfReferenceUID", "") or ""),
        transfer_syntax=tsyntax,
    )
    if modality in IMAGE_MODALITIES or modality == "RTDOSE":
        _image_geometry(ds, inst)
    if modality == "RTSTRUCT":
        _rtstruct_refs(ds, inst)
    elif modality == "RTDOSE":
        inst.referenced_plan_uids = tuple(
            str(_get(item, "ReferencedSOPInstanceUID", ""))
            for item in _sequence(ds, "ReferencedRTPlanSequence")
            if _get(item, "ReferencedSOPInstanceUID")
        )
        if not _get(ds, "DoseGridScaling"):
            raise IngestError("missing_required_tags", "DoseGridScaling")
        if inst.number_of_frames > 1:
            offsets = _floats(_get(ds, "GridFrameOffsetVector"))
            if offsets is None or len(offsets) != inst.number_of_frames:
                raise IngestError("missing_required_tags", "GridFrameOffsetVector")
    elif modality == "RTPLAN":
        beams = _sequence(ds, "BeamSequence")
        if not beams:
            raise IngestError("missing_required_tags", "BeamSequence")
        inst.extra["n_beams"] = len(beams)
        _check_plan_beams(beams)
    return inst


def _check_plan_beams(beams) -> None:
    """Control-point sequences must be complete (a cut file often ends inside one)."""
    for beam in beams:
        cps = _sequence(beam, "ControlPointSequence")
        try:
            declared = int(_get(beam, "NumberOfControlPoints", len(cps)))
        except (TypeError, ValueError):
            raise IngestError("invalid_content", "NumberOfControlPoints") from None
        if declared != len(cps):
            raise IngestError("truncated", f"beam has {len(cps)} of {declared} control points")
        if len(cps) < 2:
            raise IngestError("invalid_content", "beam with fewer than 2 control points")
        iso = _get(cps[0], "IsocenterPosition")
        if iso is not None and _floats(iso, 3) is None:
            raise IngestError("invalid_content", "IsocenterPosition needs 3 values")


def _image_geometry(ds, inst: DicomInstance) -> None:
    rows, cols = _get(ds, "Rows"), _get(ds, "Columns")
    spacing = _floats(_get(ds, "PixelSpacing"), 2)
    ipp = _floats(_get(ds, "ImagePositionPatient"), 3)
    iop = _floats(_get(ds, "ImageOrientationPatient"), 6)
    missing = [
        name
        for name, v in (
            ("Rows", rows),
            ("Columns", cols),
            ("PixelSpacing", spacing),
            ("ImagePositionPatient", ipp),
            ("ImageOrientationPatient", iop),
        )
        if not v
    ]
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        missing.append("PixelData")
    if inst.modality == "CT" and not inst.frame_of_reference_uid:
        missing.append("FrameOfReferenceUID")
    if missing:
        raise IngestError("missing_required_tags", ",".join(missing))
    if min(spacing) <= 0:
        raise IngestError("invalid_content", "non-positive PixelSpacing")
    row, col = np.asarray(iop[:3]), np.asarray(iop[3:])
    if abs(np.linalg.norm(row) - 1) > 1e-2 or abs(np.linalg.norm(col) - 1) > 1e-2 or abs(row @ col) > 1e-2:
        raise IngestError("invalid_content", "ImageOrientationPatient is not orthonormal")
    try:
        nframes = int(_get(ds, "NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        raise IngestError("invalid_content", "NumberOfFrames") from None
    inst.rows, inst.columns, inst.number_of_frames = int(rows), int(cols), nframes
    inst.pixel_spacing = (spacing[0], spacing[1])
    inst.image_position = ipp
    inst.image_orientation = iop
    thick = _floats(_get(ds, "SliceThickness"), 1)
    inst.slice_thickness = thick[0] if thick else None
    if inst.modality in IMAGE_MODALITIES and nframes > 1:
        raise IngestError("unsupported_sop_class", "multi-frame image in a single-frame SOP class")
    _check_pixel_length(ds, inst)


def _check_pixel_length(ds, inst: DicomInstance) -> None:
    """For native (uncompressed) transfer syntaxes the pixel data length is known exactly."""
    from pydicom.uid import UID

    if "PixelData" not in ds:
        return
    ts = UID(inst.transfer_syntax) if inst.transfer_syntax else None
    if ts is not None and ts.is_compressed:
        return  # checked by decoding (validate_pixels)
    try:
        raw = ds.PixelData
    except Exception:  # noqa: BLE001
        raise IngestError("truncated", "PixelData unreadable") from None
    if raw is None:
        raise IngestError("truncated", "PixelData empty")
    bits = int(_get(ds, "BitsAllocated", 0) or 0)
    spp = int(_get(ds, "SamplesPerPixel", 1) or 1)
    if bits <= 0:
        raise IngestError("missing_required_tags", "BitsAllocated")
    expected = inst.rows * inst.columns * inst.number_of_frames * spp * bits // 8
    if len(raw) < expected:
        raise IngestError("truncated", f"PixelData has {len(raw)} of {expected} bytes")


def validate_pixels(ds, inst: DicomInstance) -> None:
    """Decode compressed pixel data once so that broken encodings are caught at ingestion."""
    from pydicom.uid import UID

    if "PixelData" not in ds or not inst.transfer_syntax or not UID(inst.transfer_syntax).is_compressed:
        return
    try:
        decode_pixels(ds, inst.path)
    except IngestError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise IngestError("pixel_decode_failed", type(exc).__name__) from None


def decode_pixels(ds, path: Path | None = None) -> np.ndarray:
    """Pixel array via pydicom; falls back to GDCM (SimpleITK) for syntaxes pydicom cannot decode."""
    with quiet_pydicom():
        try:
            return ds.pixel_array
        except Exception:  # noqa: BLE001
            if path is None:
                raise IngestError("pixel_decode_failed", "no decoder") from None
    import SimpleITK as sitk

    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.SetImageIO("GDCMImageIO")
        img = reader.Execute()
    except Exception:  # noqa: BLE001
        raise IngestError("pixel_decode_failed", "no decoder could read the pixel data") from None
    arr = sitk.GetArrayFromImage(img)
    # GDCM applies rescale slope/intercept; undo so callers can treat both paths alike
    slope = float(_get(ds, "RescaleSlope", 1) or 1)
    inter = float(_get(ds, "RescaleIntercept", 0) or 0)
    if slope != 1 or inter != 0:
        arr = np.round((arr - inter) / slope)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    return arr


def _rtstruct_refs(ds, inst: DicomInstance) -> None:
    series, frames = [], []
    for fr in _sequence(ds, "ReferencedFrameOfReferenceSequence"):
        if _get(fr, "FrameOfReferenceUID"):
            frames.append(str(fr.FrameOfReferenceUID))
        for st in _sequence(fr, "RTReferencedStudySequence"):
            for se in _sequence(st, "RTReferencedSeriesSequence"):
                if _get(se, "SeriesInstanceUID"):
                    series.append(str(se.SeriesInstanceUID))
    for roi in _sequence(ds, "StructureSetROISequence"):
        if _get(roi, "ReferencedFrameOfReferenceUID"):
            frames.append(str(roi.ReferencedFrameOfReferenceUID))
    if not _sequence(ds, "StructureSetROISequence"):
        raise IngestError("missing_required_tags", "StructureSetROISequence")
    inst.referenced_series_uids = tuple(dict.fromkeys(series))
    inst.referenced_frame_uids = tuple(dict.fromkeys(frames))


def _sop_class_name(uid: str) -> str:
    from pydicom.uid import UID

    try:
        name = UID(uid).name
    except Exception:  # noqa: BLE001
        name = ""
    # only standard names (from pydicom's dictionary), never arbitrary strings from the file
    return name if name and name != uid else "non-standard SOP class"


def dataset_to_bytes(ds) -> bytes:
    """Serialise a dataset as a conformant Part 10 file (with meta)."""
    buf = io.BytesIO()
    with quiet_pydicom():
        ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
