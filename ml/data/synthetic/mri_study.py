"""Synthetic multi-sequence brain MRI as real DICOM MR series (with planted PHI).

A glioma phantom (``mri_phantom``) -- brain (white/grey matter), ventricles, a lesion with
necrotic core, enhancing rim and oedema -- is sampled per sequence with textbook relative
contrasts:

=========  ====  ====  ===  =========  =======  =====  ========
sequence    WM    GM   CSF  oedema     rim      core   notes
=========  ====  ====  ===  =========  =======  =====  ========
T1          high  mid  low  low-mid    mid      low
T1c         high  mid  low  low-mid    **high** low    gadolinium (ContrastBolusAgent set)
T2          low   mid  high **high**   mid      high
FLAIR       low   mid  low  **high**   mid      mid    CSF suppressed
=========  ====  ====  ===  =========  =======  =====  ========

T1, T1c and T2 share one axial grid; FLAIR is acquired on its own grid (thicker slices,
shifted field of view) so that co-registration has real work to do. Each series carries the
sequence the way scanners do (SeriesDescription, ProtocolName, EchoTime/RepetitionTime/
InversionTime, ContrastBolusAgent). The lesion label map (1 necrosis, 2 oedema, 3 enhancing,
BraTS 2023 convention) on the T1c grid is returned as truth.

Used by tests of the DICOM MR ingestion path; the GMMAS issue builds its cohort generator on it.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ml.data.dicom.writers import MR_IMAGE_STORAGE
from ml.data.synthetic.headers import StudyHeader
from ml.data.synthetic.layout import mr_path, mr_series_dir, study_dir
from ml.data.synthetic.mri_phantom import (
    Lesion,
    draw_lesion,
    label_map,
    sequence_image,
    tissues,
)
from ml.data.synthetic.planted_phi import PlantedPHI, make_phi
from ml.data.synthetic.uids import StudyUids, uid_from

__all__ = ["SEQUENCES", "MRSequence", "MRStudyTruth", "generate_mr_study"]


@dataclass(frozen=True)
class MRSequence:
    """How a scanner labels and parameterises one sequence's series."""

    description: str
    protocol: str
    echo_time: float  # ms
    repetition_time: float  # ms
    inversion_time: float | None = None  # ms
    contrast_agent: str | None = None


SEQUENCES = {  # in acquisition (series number) order
    "t1": MRSequence("T1 AX SE", "T1_AX", 12.0, 500.0),
    "t1c": MRSequence("T1 AX POST GAD", "T1_AX_POST", 12.0, 500.0, contrast_agent="Gadobutrol"),
    "t2": MRSequence("T2 AX TSE", "T2_TSE_AX", 100.0, 4000.0),
    "flair": MRSequence("FLAIR AX", "FLAIR_AX", 120.0, 9000.0, inversion_time=2500.0),
}


@dataclass
class MRStudyTruth:
    study_dir: Path
    phi: PlantedPHI
    study_instance_uid: str
    series_files: dict[str, list[Path]] = field(default_factory=dict)  # sequence -> files (slice order)
    label_map: np.ndarray | None = None  # [z, y, x] on the T1c grid
    grids: dict[str, dict] = field(default_factory=dict)  # sequence -> origin/spacing/shape (x, y, z)


@dataclass(frozen=True)
class _SeriesGrid:
    origin: np.ndarray  # (x, y, z) of the first voxel centre, mm
    pixel_spacing: float
    slice_thickness: float
    matrix: int
    zs: np.ndarray

    def coordinates(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """World ``(X, Y, Z)`` of every voxel centre, each ``[z, y, x]``."""
        xs = self.origin[0] + np.arange(self.matrix) * self.pixel_spacing
        ys = self.origin[1] + np.arange(self.matrix) * self.pixel_spacing
        Z, Y, X = np.meshgrid(self.zs, ys, xs, indexing="ij")
        return X, Y, Z

    def truth(self) -> dict:
        return {
            "origin": tuple(self.origin),
            "spacing": (self.pixel_spacing, self.pixel_spacing, self.slice_thickness),
            "shape": (self.matrix, self.matrix, len(self.zs)),
        }


def generate_mr_study(
    out_dir: str | Path,
    *,
    seed: int = 0,
    phi: PlantedPHI | None = None,
    matrix: int = 96,
    pixel_spacing_mm: float = 2.2,
    n_slices: int = 40,
    slice_thickness_mm: float = 3.5,
    flair_slice_thickness_mm: float = 5.0,
    flair_shift_mm: tuple[float, float, float] = (2.0, -3.0, 1.5),
    folder_name: str | None = None,
) -> MRStudyTruth:
    """Write T1, T1c, T2 and FLAIR series of one synthetic glioma patient and return the truth."""
    rng = np.random.default_rng(seed)
    phi = phi or make_phi(seed + 7000)
    folder = study_dir(out_dir, phi, folder_name, suffix="_MR")
    uids = StudyUids(seed, phi)
    header = StudyHeader(
        phi=phi,
        study_uid=uids("mr-study"),
        frame_of_reference_uid=uids("mr-frame"),
        study_date=_dt.date(2021, 3, 1) + _dt.timedelta(days=int(seed) % 300),
        study_time="101500",
        sex="F",
    )
    lesion = draw_lesion(rng)
    truth = MRStudyTruth(study_dir=folder, phi=phi, study_instance_uid=header.study_uid)
    for number, seq in enumerate(SEQUENCES, start=1):
        flair = seq == "flair"
        grid = _series_grid(
            matrix,
            pixel_spacing_mm,
            n_slices,
            slice_thickness_mm,
            flair_slice_thickness_mm if flair else slice_thickness_mm,
            flair_shift_mm if flair else (0.0, 0.0, 0.0),
        )
        img = _sequence_volume(grid, lesion, seq, rng, truth)
        truth.grids[seq] = grid.truth()
        truth.series_files[seq] = _write_series(folder, header, grid, img, seq, number, uids("mr-series", seq))
    return truth


def _series_grid(
    matrix: int,
    pixel_spacing_mm: float,
    n_slices: int,
    slice_thickness_mm: float,
    dz: float,
    shift_mm: tuple[float, float, float],
) -> _SeriesGrid:
    """The grid of one series: slices ``dz`` apart over the length of ``n_slices`` x ``slice_thickness_mm``."""
    nz = round(n_slices * slice_thickness_mm / dz)
    origin = np.array(
        [-(matrix - 1) / 2 * pixel_spacing_mm, -(matrix - 1) / 2 * pixel_spacing_mm, -(nz - 1) / 2 * dz]
    ) + np.asarray(shift_mm)
    zs = origin[2] + np.arange(nz) * dz
    return _SeriesGrid(origin=origin, pixel_spacing=pixel_spacing_mm, slice_thickness=dz, matrix=matrix, zs=zs)


def _sequence_volume(
    grid: _SeriesGrid, lesion: Lesion, seq: str, rng: np.random.Generator, truth: MRStudyTruth
) -> np.ndarray:
    """The ``seq`` image (uint16) on ``grid``; the T1c grid also gives ``truth.label_map``."""
    t = tissues(*grid.coordinates(), lesion)
    img = sequence_image(t, seq, rng).astype(np.uint16)
    if seq == "t1c":
        truth.label_map = label_map(t)
    return img


def _write_series(
    folder: Path, header: StudyHeader, grid: _SeriesGrid, img: np.ndarray, seq: str, number: int, series_uid: str
) -> list[Path]:
    """One file per slice, in slice order."""
    sub = mr_series_dir(folder, number, seq)
    sub.mkdir(parents=True, exist_ok=True)
    files = []
    for k in range(len(grid.zs)):
        ds = _slice_dataset(header, grid, img[k], seq, number, k, series_uid)
        path = mr_path(sub, header.phi, seq, k + 1)
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def _slice_dataset(
    header: StudyHeader, grid: _SeriesGrid, pixels: np.ndarray, seq: str, number: int, k: int, series_uid: str
):
    ds = header.dataset(
        sop_class=MR_IMAGE_STORAGE,
        sop_uid=uid_from(header.study_uid, seq, str(k)),
        modality="MR",
        series_uid=series_uid,
        series_number=number,
    )
    _set_sequence(ds, SEQUENCES[seq])
    ds.FrameOfReferenceUID = header.frame_of_reference_uid
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.InstanceNumber = k + 1
    ds.ImagePositionPatient = [f"{v:.4f}" for v in (grid.origin[0], grid.origin[1], grid.zs[k])]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [grid.pixel_spacing, grid.pixel_spacing]
    ds.SliceThickness = grid.slice_thickness
    ds.SliceLocation = f"{grid.zs[k]:.4f}"
    ds.PatientPosition = "HFS"
    _set_pixels(ds, grid, pixels)
    return ds


def _set_sequence(ds, meta: MRSequence) -> None:
    ds.SeriesDescription = meta.description
    ds.ProtocolName = meta.protocol
    ds.EchoTime = meta.echo_time
    ds.RepetitionTime = meta.repetition_time
    if meta.inversion_time:
        ds.InversionTime = meta.inversion_time
    if meta.contrast_agent:
        ds.ContrastBolusAgent = meta.contrast_agent
    ds.ScanningSequence = "SE" if not meta.inversion_time else ["SE", "IR"]
    ds.MagneticFieldStrength = 3.0


def _set_pixels(ds, grid: _SeriesGrid, pixels: np.ndarray) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = grid.matrix
    ds.Columns = grid.matrix
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
