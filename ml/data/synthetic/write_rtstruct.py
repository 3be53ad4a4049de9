"""The RT Structure Set of a synthetic H&N study: exact polygons of the phantom's ROIs on every CT slice."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ml.data.dicom.writers import (
    CT_IMAGE_STORAGE,
    RT_STRUCT_STORAGE,
    closed_planar_contour,
    image_reference,
    referenced_frame_of_reference,
    structure_set_roi,
    write_dataset,
)
from ml.data.synthetic.anatomy import ROI_NAMES
from ml.data.synthetic.geometry import ds_mm
from ml.data.synthetic.grid import CTGrid
from ml.data.synthetic.headers import StudyHeader
from ml.data.synthetic.layout import clear_dcm_files, rtstruct_path

__all__ = ["ROI_COLORS", "ROI_TYPES", "RTSTRUCT_SERIES_NUMBER", "contour_data", "write_rtstruct"]

RTSTRUCT_SERIES_NUMBER = 3
ROI_COLORS = {
    "BODY": (0, 255, 0),
    "PTV70": (255, 0, 0),
    "PTV56": (255, 128, 0),
    "Brainstem": (0, 128, 255),
    "SpinalCord": (255, 255, 0),
    "Parotid_L": (0, 255, 255),
    "Parotid_R": (255, 0, 255),
    "Mandible": (200, 200, 160),
}
ROI_TYPES = {"BODY": "EXTERNAL", "PTV70": "PTV", "PTV56": "PTV"}  # the others are ORGAN


def contour_data(poly: np.ndarray, z: str) -> str:
    """ContourData of a polygon on the slice at ``z`` (its DS string): ``x\\y\\z\\x\\y\\z...``."""
    return "\\".join(f"{ds_mm(x)}\\{ds_mm(y)}\\{z}" for x, y in poly)


def write_rtstruct(
    study: Path,
    header: StudyHeader,
    grid: CTGrid,
    polygons: dict[str, list[list[np.ndarray]]],
    ct_series_uid: str,
    ct_sop_uids: list[str],
    *,
    sop_uid: str,
    series_uid: str,
) -> Path:
    """Write the structure set of ``polygons`` (ROI -> slice k -> polygons) referencing the CT series."""
    ds = header.dataset(
        sop_class=RT_STRUCT_STORAGE,
        sop_uid=sop_uid,
        modality="RTSTRUCT",
        series_uid=series_uid,
        series_number=RTSTRUCT_SERIES_NUMBER,
    )
    ds.StructureSetLabel = "HN_PLAN"
    ds.StructureSetName = "HN_PLAN"
    ds.StructureSetDate = ds.StudyDate
    ds.StructureSetTime = header.study_time
    images = [image_reference(CT_IMAGE_STORAGE, uid) for uid in ct_sop_uids]
    ds.ReferencedFrameOfReferenceSequence = [
        referenced_frame_of_reference(header.frame_of_reference_uid, header.study_uid, ct_series_uid, images)
    ]
    _set_rois(ds, header, grid, polygons, ct_sop_uids)
    ds.ApprovalStatus = "UNAPPROVED"
    clear_dcm_files(study / "RTSTRUCT")
    path = rtstruct_path(study, header.phi)
    write_dataset(ds, path)
    return path


def _set_rois(
    ds, header: StudyHeader, grid: CTGrid, polygons: dict[str, list[list[np.ndarray]]], ct_sop_uids: list[str]
) -> None:
    """StructureSetROI, ROIContour and RTROIObservations sequences, one item per ROI of ``ROI_NAMES``."""
    ssroi, roic, obs = [], [], []
    for number, name in enumerate(ROI_NAMES, start=1):
        contours = _roi_contours(polygons[name], grid, ct_sop_uids)
        items = structure_set_roi(
            number,
            name,
            header.frame_of_reference_uid,
            contours=contours,
            color=ROI_COLORS[name],
            interpreted_type=ROI_TYPES.get(name, "ORGAN"),
        )
        for seq, it in zip((ssroi, roic, obs), items, strict=True):
            seq.append(it)
    ds.StructureSetROISequence = ssroi
    ds.ROIContourSequence = roic
    ds.RTROIObservationsSequence = obs


def _roi_contours(per_slice: list[list[np.ndarray]], grid: CTGrid, ct_sop_uids: list[str]) -> list:
    """One CLOSED_PLANAR contour item per polygon, numbered from 1, referencing its CT slice."""
    contours: list = []
    for k in range(grid.n_slices):
        for poly in per_slice[k]:
            image = image_reference(CT_IMAGE_STORAGE, ct_sop_uids[k])
            contours.append(
                closed_planar_contour(image, len(contours) + 1, len(poly), contour_data(poly, grid.z_strings[k]))
            )
    return contours
