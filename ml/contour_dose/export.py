"""Clinic-openable exports of predicted dose and contours: DICOM RT Dose, RT Structure Set, NIfTI.

Both DICOM objects are written on the *reference CT's* frame of reference and reference that
series, so a treatment planning system or DICOM viewer that has the CT opens them on it:

* ``export_rtdose`` -- the predicted dose (a ``Volume`` in Gy on any grid, e.g. the model's
  3.906 x 3.906 x 2.5 mm one) is resampled onto the CT grid *as the CT is stored* (linear, 0
  outside the prediction), so ImagePositionPatient / ImageOrientationPatient / PixelSpacing /
  Rows / Columns are the CT's and ``GridFrameOffsetVector`` holds the CT slice offsets along the
  slice normal (first 0). Stored as uint32 (or uint16) with ``DoseGridScaling``; DoseUnits GY,
  DoseType PHYSICAL, DoseSummationType PLAN. ``ReferencedRTPlanSequence`` is written only when
  a plan UID is given (PS3.3 makes it Type 1C for PLAN; a prediction has no plan, and the
  common TPS imports accept its absence).
* ``export_rtstruct`` -- one ROI per mask (boolean ``[z, y, x]`` on the canonical CT grid),
  CLOSED_PLANAR contours per slice in LPS mm, each referencing the CT image it lies on (found
  through the CT files' ImagePositionPatient, whatever their order or orientation).

Contour extraction and the round trip. Each slice is padded by one background voxel (so every
contour closes) and contoured with marching squares (contourpy) at level 0.5 on the voxel-centre
lattice. Every vertex is the midpoint of a lattice edge between a voxel inside and one outside,
so voxel centres never lie on the polygon (the closest edge is >= 0.35 voxel away), and the
contours separate the mask's voxel centres from the others exactly. Nested contours (holes,
islands in holes) are written as separate contours. The ingest's rasteriser
(``ml.data.dicom.rtstruct``: voxel centre inside, even-odd rule across the contours of a slice)
therefore gives back *exactly* the exported mask, which the tests check voxel for voxel.
Collinear vertices (runs along straight voxel edges and 45-degree staircases) are dropped,
which does not change the polygon.

Every object says what it is: Manufacturer "psqa_pipelines", SoftwareVersions "psqa_pipelines"
(plus the model version when given), and a ContentDescription / SeriesDescription stating that it
is an AI prediction not for clinical use. Patient, study and frame-of-reference identifiers are
copied from the reference CT (so exports of a de-identified CT stay de-identified); series and
SOP instance UIDs are new (``pydicom.uid.generate_uid``).

pydicom, SimpleITK (through ``ml.data.volume``), nibabel and contourpy are imported lazily.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ml.data.dicom.writers import (
    RT_DOSE_STORAGE,
    RT_PLAN_STORAGE,
    RT_STRUCT_STORAGE,
    closed_planar_contour,
    dose_grid_scaling_for,
    file_meta,
    format_ds,
    image_reference,
    quantise_dose,
    referenced_frame_of_reference,
    set_rt_dose_grid,
    structure_set_roi,
    write_dataset,
)
from ml.data.volume import Volume, resample_to, to_canonical, write_nifti

__all__ = [
    "DISCLAIMER",
    "CtReference",
    "RtstructExport",
    "export_nifti",
    "export_rtdose",
    "export_rtstruct",
    "export_study",
    "label_map",
    "mask_slice_polygons",
    "read_ct_reference",
]

log = logging.getLogger(__name__)

DISCLAIMER = "AI prediction - NOT FOR CLINICAL USE"
MANUFACTURER = "psqa_pipelines"
_IMPLEMENTATION_VERSION = "PSQA_EXPORT_1"

# copied from the reference CT when present (patient, general study, SOP common character set,
# de-identification markers); the Type 2 ones are written empty when the CT lacks them
_COPY_TAGS = (
    "SpecificCharacterSet",
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "StudyDescription",
)
_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)

_PALETTE = (
    (255, 0, 0),
    (0, 200, 0),
    (0, 128, 255),
    (255, 200, 0),
    (255, 0, 255),
    (0, 255, 255),
    (255, 128, 0),
    (128, 0, 255),
    (0, 255, 128),
    (255, 128, 192),
    (160, 160, 255),
    (200, 200, 120),
)


# ---------------------------------------------------------------------------------------
# reference CT
# ---------------------------------------------------------------------------------------
@dataclass
class CtReference:
    """The headers of a CT series, sorted along the slice normal, and its stored grid."""

    paths: list[Path]
    headers: list  # pydicom datasets without pixel data, same order as ``paths``
    grid: Volume  # zero-valued, on the CT grid as stored: direction (row, column, normal)
    positions: np.ndarray  # slice positions along the normal (mm), increasing

    @property
    def first(self):
        return self.headers[0]

    @property
    def frame_of_reference_uid(self) -> str:
        return str(self.first.FrameOfReferenceUID)

    @property
    def series_instance_uid(self) -> str:
        return str(self.first.SeriesInstanceUID)

    @property
    def study_instance_uid(self) -> str:
        return str(self.first.StudyInstanceUID)

    @property
    def normal(self) -> np.ndarray:
        return self.grid.direction_matrix[:, 2]


def read_ct_reference(paths: Sequence[str | os.PathLike]) -> CtReference:
    """Read (headers only) and check the CT slices an export refers to; any file order."""
    import pydicom

    from ml.data.dicom.headers import quiet_pydicom

    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("no reference CT files")
    with quiet_pydicom():
        headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    first = headers[0]
    for tag in (
        "SOPInstanceUID",
        "SeriesInstanceUID",
        "StudyInstanceUID",
        "FrameOfReferenceUID",
        "ImagePositionPatient",
        "ImageOrientationPatient",
        "PixelSpacing",
        "Rows",
        "Columns",
    ):
        missing = [p.name for p, h in zip(paths, headers, strict=True) if not h.get(tag)]
        if missing:
            raise ValueError(f"reference CT file(s) without {tag}: {missing[:3]}")
    for key in ("SeriesInstanceUID", "FrameOfReferenceUID", "StudyInstanceUID"):
        values = {str(h.get(key)) for h in headers}
        if len(values) != 1:
            raise ValueError(f"reference CT files span {len(values)} different {key} values; pass one series")
    iop0 = np.asarray([float(v) for v in first.ImageOrientationPatient])
    ps0 = np.asarray([float(v) for v in first.PixelSpacing])
    for h in headers[1:]:
        if (int(h.Rows), int(h.Columns)) != (int(first.Rows), int(first.Columns)):
            raise ValueError("reference CT slices differ in matrix size")
        if not np.allclose([float(v) for v in h.ImageOrientationPatient], iop0, atol=1e-4):
            raise ValueError("reference CT slices differ in orientation")
        if not np.allclose([float(v) for v in h.PixelSpacing], ps0, atol=1e-3):
            raise ValueError("reference CT slices differ in pixel spacing")
    row, col = iop0[:3], iop0[3:]
    normal = np.cross(row, col)
    pos = np.asarray([np.dot([float(v) for v in h.ImagePositionPatient], normal) for h in headers])
    order = np.argsort(pos, kind="stable")
    pos = pos[order]
    if len(pos) > 1:
        gaps = np.diff(pos)
        if np.any(gaps < 0.01):
            raise ValueError("reference CT has duplicate slice positions")
        dz = float(np.median(gaps))
        if np.any(np.abs(gaps - dz) > max(0.01 * dz, 0.05)):
            raise ValueError("reference CT slice spacing is not uniform (missing slices?)")
    else:
        dz = float(first.get("SliceThickness", 0) or 0) or 1.0
    headers = [headers[i] for i in order]
    paths = [paths[i] for i in order]
    shape = (len(headers), int(first.Rows), int(first.Columns))
    grid = Volume(
        array=np.broadcast_to(np.uint8(0), shape),
        spacing=(float(ps0[1]), float(ps0[0]), dz),
        origin=tuple(float(v) for v in headers[0].ImagePositionPatient),  # type: ignore[arg-type]
        direction=tuple(np.column_stack([row, col, normal]).reshape(-1)),  # type: ignore[arg-type]
    )
    return CtReference(paths=paths, headers=headers, grid=grid, positions=pos)


def _new_dataset(
    ref: CtReference,
    *,
    sop_class: str,
    modality: str,
    series_description: str,
    series_number: int,
    model_version: str | None,
    when: _dt.datetime | None,
    sop_instance_uid: str | None,
    series_instance_uid: str | None,
):
    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid

    sop_uid = sop_instance_uid or generate_uid()
    ds = Dataset()
    ds.file_meta = file_meta(sop_class, sop_uid, _IMPLEMENTATION_VERSION)
    src = ref.first
    for tag in _COPY_TAGS:
        if tag in src:
            ds[tag] = copy.deepcopy(src[tag])
    for tag in _TYPE2:
        if tag not in ds:
            setattr(ds, tag, "")
    when = when or _dt.datetime.now()
    d, t = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate = d
    ds.InstanceCreationTime = t
    ds.SeriesDate = ds.ContentDate = d
    ds.SeriesTime = ds.ContentTime = t
    ds.Modality = modality
    ds.SeriesInstanceUID = series_instance_uid or generate_uid()
    ds.SeriesNumber = int(series_number)
    ds.SeriesDescription = _lo(series_description)
    ds.OperatorsName = ""
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = "psqa_pipelines contour_dose"
    ds.SoftwareVersions = [MANUFACTURER, _lo(model_version)] if model_version else MANUFACTURER
    ds.InstanceNumber = 1
    return ds


def _lo(text: str) -> str:
    """A LO value: at most 64 characters, no backslash."""
    return str(text).replace("\\", "/")[:64]


def _content_description(description: str) -> str:
    text = str(description or "").strip()
    if "not for clinical use" in text.lower():
        return _lo(text)
    return _lo(f"{DISCLAIMER}: {text}" if text else DISCLAIMER)


# ---------------------------------------------------------------------------------------
# RT Dose
# ---------------------------------------------------------------------------------------
def export_rtdose(
    dose: Volume,
    reference_ct_paths: Sequence[str | os.PathLike],
    out_path: str | os.PathLike,
    *,
    description: str = "predicted dose",
    series_description: str = "AI predicted dose (not for clinical use)",
    series_number: int = 901,
    referenced_plan_uid: str | None = None,
    referenced_structure_set_uid: str | None = None,
    bits: int = 32,
    crop_to_dose: bool = False,
    model_version: str | None = None,
    when: _dt.datetime | None = None,
    sop_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
) -> Path:
    """Write ``dose`` (Gy, any grid) as an RT Dose on the reference CT's grid; returns the path.

    The dose is resampled onto the CT grid as stored (linear, 0 outside ``dose``; negative
    values and NaN become 0). ``crop_to_dose`` keeps only the CT sub-grid around the non-zero
    dose (one voxel margin; same spacing, orientation and voxel positions as the CT) to make
    the file smaller. ``description`` goes to ContentDescription and DoseComment, prefixed with
    the not-for-clinical-use disclaimer unless it already says so.
    """
    from pydicom.dataset import Dataset

    ref = read_ct_reference(reference_ct_paths)
    src = Volume(
        np.nan_to_num(np.asarray(dose.array, dtype=np.float32), nan=0.0), dose.spacing, dose.origin, dose.direction
    )
    on_ct = resample_to(src, ref.grid, interpolation="linear", default_value=0.0, dtype=np.float32)
    arr = np.maximum(on_ct.array, 0.0)
    nz, ny, nx = arr.shape
    k0, k1, j0, j1, i0, i1 = 0, nz, 0, ny, 0, nx
    if crop_to_dose and np.any(arr > 0):
        nzk, nzj, nzi = np.nonzero(arr > 0)
        k0, k1 = max(int(nzk.min()) - 1, 0), min(int(nzk.max()) + 2, nz)
        j0, j1 = max(int(nzj.min()) - 1, 0), min(int(nzj.max()) + 2, ny)
        i0, i1 = max(int(nzi.min()) - 1, 0), min(int(nzi.max()) + 2, nx)
        arr = arr[k0:k1, j0:j1, i0:i1]
    if not np.any(arr > 0):
        log.warning("export_rtdose: the predicted dose is zero everywhere on the CT grid")
    scaling = dose_grid_scaling_for(float(arr.max()) if arr.size else 0.0, bits)
    stored, _ = quantise_dose(arr, float(scaling), bits=bits)

    first = ref.first
    if (i0, j0, k0) == (0, 0, 0):  # the CT's own DS strings: an exact match
        position: list = [str(v) for v in first.ImagePositionPatient]
    else:
        position = [float(v) for v in ref.grid.index_to_world([i0, j0, k0])]
    # uniform offsets along the normal, as the dose was resampled (the CT passed the 1 % check)
    offsets = ref.grid.spacing[2] * np.arange(k1 - k0)
    ds = _new_dataset(
        ref,
        sop_class=RT_DOSE_STORAGE,
        modality="RTDOSE",
        series_description=series_description,
        series_number=series_number,
        model_version=model_version,
        when=when,
        sop_instance_uid=sop_instance_uid,
        series_instance_uid=series_instance_uid,
    )
    set_rt_dose_grid(
        ds,
        stored,
        position=position,
        orientation=[str(v) for v in first.ImageOrientationPatient],
        pixel_spacing=[str(v) for v in first.PixelSpacing],
        frame_offsets=[format_ds(v, 4) for v in offsets],
        slice_thickness=format_ds(ref.grid.spacing[2], 4),
        dose_grid_scaling=scaling,
        frame_of_reference_uid=ref.frame_of_reference_uid,
        position_reference_indicator=str(first.get("PositionReferenceIndicator", "") or ""),
        summation_type="PLAN",
        dose_type="PHYSICAL",
        dose_units="GY",
        heterogeneity_correction=None,
    )
    ds.ContentDescription = _content_description(description)
    ds.DoseComment = ds.ContentDescription
    if referenced_plan_uid:
        plan = Dataset()
        plan.ReferencedSOPClassUID = RT_PLAN_STORAGE
        plan.ReferencedSOPInstanceUID = referenced_plan_uid
        ds.ReferencedRTPlanSequence = [plan]
    if referenced_structure_set_uid:
        ss = Dataset()
        ss.ReferencedSOPClassUID = RT_STRUCT_STORAGE
        ss.ReferencedSOPInstanceUID = referenced_structure_set_uid
        ds.ReferencedStructureSetSequence = [ss]
    return write_dataset(ds, out_path)


# ---------------------------------------------------------------------------------------
# RT Structure Set
# ---------------------------------------------------------------------------------------
@dataclass
class RtstructExport:
    path: Path
    rois: list[str]  # exported, in ROI number order (ROINumber = position + 1)
    n_contours: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # name -> reason (not written)


def mask_slice_polygons(mask2d: np.ndarray) -> list[np.ndarray]:
    """Closed polygons (each ``(N, 2)`` as (column, row) voxel indices) outlining a 2D mask.

    Marching squares at 0.5 on the padded mask (module docstring): the even-odd union of the
    polygons holds exactly the voxel centres of the mask. The closing vertex is not repeated
    and collinear vertices are removed.
    """
    import contourpy

    m = np.asarray(mask2d, dtype=bool)
    if not m.any():
        return []
    padded = np.pad(m, 1).astype(np.float64)
    gen = contourpy.contour_generator(z=padded, name="serial", line_type=contourpy.LineType.Separate)
    out = []
    for line in gen.lines(0.5):
        pts = np.asarray(line, dtype=np.float64)
        if len(pts) > 1 and np.array_equal(pts[0], pts[-1]):
            pts = pts[:-1]
        pts = _drop_collinear(pts)
        if len(pts) >= 3:
            out.append(pts - 1.0)  # undo the padding
    return out


def _drop_collinear(pts: np.ndarray) -> np.ndarray:
    """Remove vertices lying on the straight segment between their neighbours (exact: the
    vertices are on the half-voxel lattice, so twice their coordinates are integers)."""
    if len(pts) < 4:
        return pts
    q = np.rint(pts * 2.0).astype(np.int64)
    prev, nxt = np.roll(q, 1, axis=0), np.roll(q, -1, axis=0)
    a, b = q - prev, nxt - q
    cross = a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]
    dot = a[:, 0] * b[:, 0] + a[:, 1] * b[:, 1]
    keep = (cross != 0) | (dot <= 0)
    return pts[keep] if keep.sum() >= 3 else pts


def _slice_map(ct: Volume, ref: CtReference) -> list[int]:
    """For each slice k of the canonical grid ``ct``, the index (into ``ref``) of its CT image."""
    n = ref.normal
    if not np.allclose(np.abs(n), [0.0, 0.0, 1.0], atol=1e-4):
        raise ValueError("RTSTRUCT export needs an axial reference CT (slice normal along z)")
    z_ct = np.asarray([float(h.ImagePositionPatient[2]) for h in ref.headers])
    z_mask = ct.origin[2] + ct.spacing[2] * np.arange(ct.array.shape[0])
    tol = 0.25 * ref.grid.spacing[2]
    idx = np.abs(z_mask[:, None] - z_ct[None, :]).argmin(axis=1)
    err = np.abs(z_ct[idx] - z_mask)
    bad = np.nonzero(err > tol)[0]
    if bad.size:
        k = int(bad[0])
        raise ValueError(
            f"mask slice {k} (z={z_mask[k]:.2f} mm) is {err[k]:.2f} mm from the nearest CT image; "
            "masks must be on the CT's slice positions (resample them nearest-neighbour first)"
        )
    if len(set(idx.tolist())) != len(idx):
        raise ValueError("several mask slices map to one CT image; the mask grid is finer than the CT")
    return [int(i) for i in idx]


def export_rtstruct(
    masks: Mapping[str, np.ndarray],
    ct: Volume,
    reference_ct_paths: Sequence[str | os.PathLike],
    out_path: str | os.PathLike,
    colors: Mapping[str, Sequence[int]] | None = None,
    *,
    roi_types: Mapping[str, str] | None = None,
    label: str = "AI_CONTOURS",
    description: str = "predicted contours",
    series_description: str = "AI predicted contours (not for clinical use)",
    series_number: int = 902,
    keep_empty: bool = False,
    model_version: str | None = None,
    when: _dt.datetime | None = None,
    sop_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
) -> RtstructExport:
    """Write ``masks`` (name -> ``[z, y, x]`` array on ``ct``'s grid, non-zero = inside) as an RT
    Structure Set referencing the CT series of ``reference_ct_paths``.

    ``ct`` is the CT volume the masks live on (canonical grid; another orientation is brought
    to canonical first); its slices must be the CT images' planes (in-plane resampling is
    fine). ROIs are numbered in the order of ``masks``; ``colors`` maps names to RGB (default
    palette otherwise) and ``roi_types`` to RTROIInterpretedType (default ORGAN). An empty mask
    is skipped and reported in ``RtstructExport.skipped`` (or, with ``keep_empty``, written as
    an ROI without contours); no non-empty mask at all is a ``ValueError``.
    """
    ref = read_ct_reference(reference_ct_paths)
    identity = np.allclose(ct.direction_matrix, np.eye(3), atol=1e-4)
    ct_c = ct if identity else to_canonical(ct)
    prepared: dict[str, np.ndarray] = {}
    for name, m in masks.items():
        m = np.asarray(m)
        if m.shape != ct.array.shape:
            raise ValueError(f"mask {name!r} has shape {m.shape}, the CT grid is {ct.array.shape}")
        m = m != 0
        prepared[str(name)] = m if identity else to_canonical(ct.with_array(m)).array
    slice_to_ct = _slice_map(ct_c, ref)
    z_ct = [str(h.ImagePositionPatient[2]) for h in ref.headers]

    def image_ref(h):
        return image_reference(h.SOPClassUID, h.SOPInstanceUID)

    for_uid = ref.frame_of_reference_uid
    ds = _new_dataset(
        ref,
        sop_class=RT_STRUCT_STORAGE,
        modality="RTSTRUCT",
        series_description=series_description,
        series_number=series_number,
        model_version=model_version,
        when=when,
        sop_instance_uid=sop_instance_uid,
        series_instance_uid=series_instance_uid,
    )
    ds.ContentDescription = _content_description(description)
    ds.StructureSetLabel = str(label)[:16]
    ds.StructureSetName = _lo(label)
    ds.StructureSetDescription = ds.ContentDescription
    ds.StructureSetDate = ds.ContentDate
    ds.StructureSetTime = ds.ContentTime
    ds.ReferencedFrameOfReferenceSequence = [
        referenced_frame_of_reference(
            for_uid, ref.study_instance_uid, ref.series_instance_uid, [image_ref(h) for h in ref.headers]
        )
    ]

    ssroi, roic, obs = [], [], []
    exported: list[str] = []
    n_contours: dict[str, int] = {}
    skipped: dict[str, str] = {}
    for name, m in prepared.items():
        if not m.any() and not keep_empty:
            skipped[name] = "empty mask: no voxel on any slice, nothing to contour"
            log.info("export_rtstruct: ROI %r skipped (empty mask)", name)
            continue
        number = len(exported) + 1
        contours = []
        for k in np.nonzero(m.reshape(m.shape[0], -1).any(axis=1))[0]:
            h = ref.headers[slice_to_ct[int(k)]]
            zs = z_ct[slice_to_ct[int(k)]]
            for poly in mask_slice_polygons(m[k]):
                ijk = np.column_stack([poly, np.full(len(poly), float(k))])
                xy = ct_c.index_to_world(ijk)[:, :2]
                data = "\\".join(f"{format_ds(x, 4)}\\{format_ds(y, 4)}\\{zs}" for x, y in xy)
                contours.append(closed_planar_contour(image_ref(h), len(contours) + 1, len(poly), data))
        color = (colors or {}).get(name) or _PALETTE[(number - 1) % len(_PALETTE)]
        items = structure_set_roi(
            number,
            _lo(name),
            for_uid,
            contours=contours,
            color=color,
            interpreted_type=(roi_types or {}).get(name, "ORGAN"),
            algorithm="AUTOMATIC",
            description=_lo(f"psqa_pipelines {DISCLAIMER}"),
            empty_sequence=False,
        )
        for seq, it in zip((ssroi, roic, obs), items, strict=True):
            seq.append(it)
        exported.append(name)
        n_contours[name] = len(contours)
    if not exported:
        raise ValueError(f"no non-empty mask to export (skipped: {sorted(skipped)})")
    ds.StructureSetROISequence = ssroi
    ds.ROIContourSequence = roic
    ds.RTROIObservationsSequence = obs
    ds.ApprovalStatus = "UNAPPROVED"
    path = write_dataset(ds, out_path)
    return RtstructExport(path=path, rois=exported, n_contours=n_contours, skipped=skipped)


# ---------------------------------------------------------------------------------------
# NIfTI and the whole study
# ---------------------------------------------------------------------------------------
def export_nifti(volume: Volume, path: str | os.PathLike) -> Path:
    """``volume`` as NIfTI-1 (``.nii`` or deterministic ``.nii.gz``; RAS on disk, see ``ml.data.volume``)."""
    return write_nifti(volume, path)


def label_map(masks: Mapping[str, np.ndarray]) -> tuple[np.ndarray, dict[int, str]]:
    """One integer label per ROI (1, 2, ... in the order of ``masks``) painted largest ROI first,
    so that a small structure inside a large one (an organ in BODY) keeps its label where they
    overlap. Returns (uint8 or uint16 ``[z, y, x]`` array, {label: name})."""
    names = list(masks)
    if not names:
        raise ValueError("no masks")
    dtype = np.uint8 if len(names) < 256 else np.uint16
    shape = np.asarray(masks[names[0]]).shape
    out = np.zeros(shape, dtype=dtype)
    sizes = {n: int(np.count_nonzero(masks[n])) for n in names}
    for n in sorted(names, key=lambda n: (-sizes[n], names.index(n))):
        out[np.asarray(masks[n]) != 0] = names.index(n) + 1
    return out, {i + 1: n for i, n in enumerate(names)}


def export_study(
    out_dir: str | os.PathLike,
    ct: Volume,
    reference_ct_paths: Sequence[str | os.PathLike],
    *,
    dose: Volume | None = None,
    masks: Mapping[str, np.ndarray] | None = None,
    colors: Mapping[str, Sequence[int]] | None = None,
    prefix: str = "pred",
    model_version: str | None = None,
    when: _dt.datetime | None = None,
) -> dict[str, Path]:
    """Write the predicted dose and/or contours of one study into ``out_dir``.

    Files (keys of the returned dict): ``rtstruct`` ``RS_<prefix>.dcm``, ``rtdose``
    ``RD_<prefix>.dcm`` (referencing the structure set), ``dose_nifti`` ``dose_<prefix>.nii.gz``
    (float32 Gy on ``ct``'s grid, as in the RT Dose), ``labels_nifti`` ``labels_<prefix>.nii.gz``
    (``label_map``) and ``labels_json`` ``labels_<prefix>.json`` ({label: ROI name} plus the
    ROIs skipped from the RT Structure Set and why).
    """
    if dose is None and not masks:
        raise ValueError("nothing to export: give a dose and/or masks")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    when = when or _dt.datetime.now()
    paths: dict[str, Path] = {}
    rs_uid = None
    if masks:
        from pydicom.uid import generate_uid

        rs_uid = generate_uid()
        rs = export_rtstruct(
            masks,
            ct,
            reference_ct_paths,
            out / f"RS_{prefix}.dcm",
            colors,
            model_version=model_version,
            when=when,
            sop_instance_uid=rs_uid,
        )
        paths["rtstruct"] = rs.path
        labels, names = label_map(masks)
        paths["labels_nifti"] = export_nifti(ct.with_array(labels), out / f"labels_{prefix}.nii.gz")
        from ml.utils.io import atomic_write_text

        meta = {"labels": {str(k): v for k, v in names.items()}, "rtstruct_skipped": rs.skipped, "note": DISCLAIMER}
        paths["labels_json"] = atomic_write_text(
            out / f"labels_{prefix}.json", json.dumps(meta, indent=2, sort_keys=True) + "\n"
        )
    if dose is not None:
        paths["rtdose"] = export_rtdose(
            dose,
            reference_ct_paths,
            out / f"RD_{prefix}.dcm",
            referenced_structure_set_uid=rs_uid,
            model_version=model_version,
            when=when,
        )
        src = Volume(
            np.nan_to_num(np.asarray(dose.array, dtype=np.float32), nan=0.0), dose.spacing, dose.origin, dose.direction
        )
        on_ct = resample_to(src, ct, interpolation="linear", default_value=0.0, dtype=np.float32)
        paths["dose_nifti"] = export_nifti(
            on_ct.with_array(np.maximum(on_ct.array, 0.0).astype(np.float32)), out / f"dose_{prefix}.nii.gz"
        )
    return paths
