"""Synthetic head-and-neck radiotherapy studies written as real DICOM, with planted PHI.

``generate_hn_study`` writes one patient: a CT image series (one file per axial slice), an RT
Structure Set whose contours are exact polygons of analytic shapes, and an RT Dose grid that
looks like an IMRT head-and-neck plan. Every file carries the same, deliberately distinctive,
made-up patient-identifying values (:class:`PlantedPHI`) in the standard attributes and in a
private block, and the study folder and file names contain them too, so that a test can
grep everything the pipeline writes downstream and prove de-identification.

The returned :class:`StudyTruth` holds what was written plus the analytic ground truth:
the CT in HU, a boolean mask per ROI on the CT grid (point-in-polygon of the very polygons
that were written, evaluated at voxel centres, so a correct rasteriser reproduces them), and
the dose on its own grid.

Conventions: arrays are ``[z, y, x]`` with the slice index in order of increasing z; origins
and spacings are ``(x, y, z)`` in mm in DICOM LPS (x to the patient's left, y posterior,
z superior); the patient lies head first supine (HFS). The phantom is ``anatomy.HNPhantom``.

Everything is deterministic: the same arguments give byte-identical files (fixed dates,
seeded RNGs, UIDs derived from the seed with ``pydicom.uid.generate_uid(entropy_srcs=...)``).

Only numpy and scipy are needed at import time; pydicom is imported inside the writers.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ml.data.synthetic.anatomy import ROI_NAMES, HNPhantom, rasterise, simulate_scan
from ml.data.synthetic.dose import PlanDose, plan_dose
from ml.data.synthetic.grid import ct_grid
from ml.data.synthetic.headers import StudyHeader
from ml.data.synthetic.layout import study_dir
from ml.data.synthetic.planted_phi import PlantedPHI, make_phi
from ml.data.synthetic.uids import StudyUids
from ml.data.synthetic.write_ct import write_ct_series
from ml.data.synthetic.write_rtdose import write_rtdose
from ml.data.synthetic.write_rtstruct import write_rtstruct

__all__ = ["StudyTruth", "generate_hn_cohort", "generate_hn_study"]


@dataclass
class StudyTruth:
    study_dir: Path
    phi: PlantedPHI
    study_instance_uid: str
    frame_of_reference_uid: str
    ct_series_uid: str
    ct_files: list[Path]  # in slice order (increasing z), matching hu[k]
    rtstruct_file: Path | None
    rtdose_file: Path | None
    roi_names: list[str]
    masks: dict[str, np.ndarray]  # bool [z, y, x] on the CT grid
    hu: np.ndarray  # int16 [z, y, x]
    dose_gy: np.ndarray | None  # float64 [z, y, x] on the dose grid
    dose_origin: tuple[float, float, float] | None
    dose_spacing: tuple[float, float, float] | None
    ct_origin: tuple[float, float, float]
    ct_spacing: tuple[float, float, float]
    ct_sop_uids: list[str] | None = None  # in slice order
    rtstruct_sop_uid: str | None = None
    rtdose_sop_uid: str | None = None
    prescription_gy: float = 70.0
    seed: int = 0


def generate_hn_study(
    out_dir: str | Path,
    *,
    seed: int = 0,
    phi: PlantedPHI | None = None,
    matrix: int = 128,
    pixel_spacing_mm: float = 3.0,
    n_slices: int = 64,
    slice_thickness_mm: float = 3.0,
    with_rtstruct: bool = True,
    with_dose: bool = True,
    prescription_gy: float = 70.0,
    folder_name: str | None = None,
) -> StudyTruth:
    """Write one synthetic head-and-neck study (CT + RTSTRUCT + RTDOSE) and return its truth.

    The study goes to ``out_dir / (folder_name or f"{family}_{patient_id}")`` (the default
    folder name holds PHI, as hospital exports often do) with subfolders ``CT/``,
    ``RTSTRUCT/`` and ``RTDOSE/``; ``*.dcm`` files already in those subfolders are removed.
    """
    _check_arguments(matrix, n_slices, pixel_spacing_mm, slice_thickness_mm, prescription_gy)
    seed = int(seed)
    phi = phi if phi is not None else make_phi(seed)
    study = study_dir(out_dir, phi, folder_name)
    uid = StudyUids(seed, phi)
    header = _draw_study_header(seed, phi, uid)
    grid = ct_grid(matrix, pixel_spacing_mm, n_slices, slice_thickness_mm)
    phantom = HNPhantom.for_grid(seed, grid)
    sampled = rasterise(phantom, grid)
    stored = simulate_scan(sampled.hu, grid, phantom.noise_sd, seed)

    ct_series_uid = uid("series", "CT")
    ct_sop = [uid("CT", k) for k in range(n_slices)]
    ct_files = write_ct_series(study, header, grid, stored, ct_sop, ct_series_uid)
    rs_file = rs_uid = None
    if with_rtstruct:
        rs_uid = uid("RTSTRUCT")
        rs_file = write_rtstruct(
            study,
            header,
            grid,
            sampled.polygons,
            ct_series_uid,
            ct_sop,
            sop_uid=rs_uid,
            series_uid=uid("series", "RTSTRUCT"),
        )
    rd_file = rd_uid = dose = None
    if with_dose:
        dose = plan_dose(sampled.masks, grid, prescription_gy)
        rd_uid = uid("RTDOSE")
        rd_file = write_rtdose(
            study,
            header,
            grid,
            dose,
            sop_uid=rd_uid,
            series_uid=uid("series", "RTDOSE"),
            plan_uid=uid("RTPLAN"),
            rtstruct_uid=rs_uid,
        )
    return StudyTruth(
        study_dir=study,
        phi=phi,
        study_instance_uid=header.study_uid,
        frame_of_reference_uid=header.frame_of_reference_uid,
        ct_series_uid=ct_series_uid,
        ct_files=ct_files,
        rtstruct_file=rs_file,
        rtdose_file=rd_file,
        roi_names=list(ROI_NAMES),
        masks=sampled.masks,
        hu=stored - np.int16(1024),  # int16 HU, exactly what the files decode to
        **_dose_truth(dose),
        ct_origin=grid.origin,
        ct_spacing=grid.spacing,
        ct_sop_uids=ct_sop,
        rtstruct_sop_uid=rs_uid,
        rtdose_sop_uid=rd_uid,
        prescription_gy=float(prescription_gy),
        seed=seed,
    )


def _check_arguments(
    matrix: int, n_slices: int, pixel_spacing_mm: float, slice_thickness_mm: float, prescription_gy: float
) -> None:
    if matrix < 16 or n_slices < 4:
        raise ValueError("need matrix >= 16 and n_slices >= 4")
    if pixel_spacing_mm <= 0 or slice_thickness_mm <= 0 or prescription_gy <= 0:
        raise ValueError("spacings and prescription must be positive")


def _draw_study_header(seed: int, phi: PlantedPHI, uid: StudyUids) -> StudyHeader:
    """The study's UIDs and its seeded date, time and patient sex."""
    prng = np.random.default_rng([seed, 0xD1C0])
    study_date = _dt.date(2019, 1, 1) + _dt.timedelta(days=int(prng.integers(0, 1800)))
    hh, mm = int(prng.integers(7, 17)), int(prng.integers(0, 60))
    study_time = f"{hh:02d}{mm:02d}{int(prng.integers(0, 60)):02d}"
    sex = "F" if prng.random() < 0.35 else "M"
    return StudyHeader(
        phi=phi,
        study_uid=uid("study"),
        frame_of_reference_uid=uid("frame-of-reference"),
        study_date=study_date,
        study_time=study_time,
        sex=sex,
    )


def _dose_truth(dose: PlanDose | None) -> dict:
    if dose is None:
        return {"dose_gy": None, "dose_origin": None, "dose_spacing": None}
    return {"dose_gy": dose.gy, "dose_origin": dose.origin, "dose_spacing": dose.spacing}


def generate_hn_cohort(out_dir: str | Path, n_studies: int = 3, *, seed: int = 0, **kwargs) -> list[StudyTruth]:
    """``n_studies`` independent patients with seeds ``seed + i`` (own PHI, own anatomy)."""
    for bad in ("phi", "folder_name"):
        if kwargs.get(bad) is not None:
            raise ValueError(f"{bad!r} is per study; call generate_hn_study for that")
    kwargs.pop("phi", None)
    kwargs.pop("folder_name", None)
    return [generate_hn_study(out_dir, seed=seed + i, **kwargs) for i in range(int(n_studies))]
