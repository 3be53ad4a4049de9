"""The CT image series of a synthetic H&N study: one file per axial slice, instance 1 most superior."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ml.data.dicom.writers import CT_IMAGE_STORAGE, write_dataset
from ml.data.synthetic.geometry import ds_mm
from ml.data.synthetic.grid import CTGrid
from ml.data.synthetic.headers import StudyHeader
from ml.data.synthetic.layout import clear_dcm_files, ct_path

__all__ = ["CT_SERIES_NUMBER", "ct_slice_dataset", "instance_number", "write_ct_series"]

CT_SERIES_NUMBER = 2


def write_ct_series(
    study: Path, header: StudyHeader, grid: CTGrid, stored: np.ndarray, sop_uids: list[str], series_uid: str
) -> list[Path]:
    """Write ``stored[k]`` (int16, HU + 1024) of every slice; the files in slice order (increasing z)."""
    clear_dcm_files(study / "CT")
    files: list[Path] = []
    for k in range(grid.n_slices):
        ds = ct_slice_dataset(header, grid, k, stored[k], sop_uids[k], series_uid)
        path = ct_path(study, header.phi, instance_number(grid, k))
        write_dataset(ds, path)
        files.append(path)
    return files


def instance_number(grid: CTGrid, k: int) -> int:
    """Scanned head first: instance 1 is the most superior slice (``k = n_slices - 1``)."""
    return grid.n_slices - k


def ct_slice_dataset(header: StudyHeader, grid: CTGrid, k: int, pixels: np.ndarray, sop_uid: str, series_uid: str):
    """The CT Image dataset of slice ``k`` (in order of increasing z)."""
    ds = header.dataset(
        sop_class=CT_IMAGE_STORAGE,
        sop_uid=sop_uid,
        modality="CT",
        series_uid=series_uid,
        series_number=CT_SERIES_NUMBER,
    )
    _set_acquisition(ds, header, grid)
    _set_image_plane(ds, header, grid, k)
    _set_pixels(ds, grid, pixels)
    return ds


def _set_acquisition(ds, header: StudyHeader, grid: CTGrid) -> None:
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.AcquisitionDate = ds.StudyDate
    ds.AcquisitionTime = header.study_time
    ds.BodyPartExamined = "HEADNECK"
    ds.ScanOptions = "HELICAL MODE"
    ds.SliceThickness = ds_mm(grid.slice_thickness)
    ds.KVP = "120"
    ds.DataCollectionDiameter = "500"
    ds.ReconstructionDiameter = ds_mm(grid.matrix * grid.pixel_spacing)
    ds.GantryDetectorTilt = "0"
    ds.TableHeight = "160"
    ds.RotationDirection = "CW"
    ds.XRayTubeCurrent = 300
    ds.ExposureTime = 1000
    ds.ConvolutionKernel = "STANDARD"
    ds.PatientPosition = "HFS"
    ds.AcquisitionNumber = 1


def _set_image_plane(ds, header: StudyHeader, grid: CTGrid, k: int) -> None:
    ds.InstanceNumber = instance_number(grid, k)
    ds.ImagePositionPatient = [ds_mm(grid.x0), ds_mm(grid.x0), grid.z_strings[k]]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = header.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = grid.z_strings[k]
    ps = ds_mm(grid.pixel_spacing)
    ds.PixelSpacing = [ps, ps]


def _set_pixels(ds, grid: CTGrid, pixels: np.ndarray) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = grid.matrix
    ds.Columns = grid.matrix
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.PixelData = np.ascontiguousarray(pixels).astype("<i2").tobytes()
    ds["PixelData"].VR = "OW"
