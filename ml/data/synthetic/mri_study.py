"""Synthetic multi-sequence brain MRI as real DICOM MR series (with planted PHI).

A glioma phantom defined in world millimetres -- brain (white/grey matter), ventricles, a
lesion with necrotic core, enhancing rim and oedema -- is sampled per sequence with textbook
relative contrasts:

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

from ml.data.synthetic.hn_study import PlantedPHI, _base_dataset, _Uids, make_phi

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
# tissue -> relative intensity per sequence (WM, GM, CSF, oedema, rim, core, background)
_CONTRAST = {
    "t1": (0.85, 0.60, 0.20, 0.45, 0.55, 0.25),
    "t1c": (0.85, 0.60, 0.20, 0.45, 1.00, 0.25),
    "t2": (0.35, 0.55, 1.00, 0.85, 0.60, 0.90),
    "flair": (0.40, 0.60, 0.08, 0.95, 0.65, 0.55),
}
_SERIES = {
    "t1": dict(desc="T1 AX SE", protocol="T1_AX", te=12.0, tr=500.0, ti=None, contrast=None),
    "t1c": dict(desc="T1 AX POST GAD", protocol="T1_AX_POST", te=12.0, tr=500.0, ti=None, contrast="Gadobutrol"),
    "t2": dict(desc="T2 AX TSE", protocol="T2_TSE_AX", te=100.0, tr=4000.0, ti=None, contrast=None),
    "flair": dict(desc="FLAIR AX", protocol="FLAIR_AX", te=120.0, tr=9000.0, ti=2500.0, contrast=None),
}


@dataclass
class MRStudyTruth:
    study_dir: Path
    phi: PlantedPHI
    study_instance_uid: str
    series_files: dict[str, list[Path]] = field(default_factory=dict)  # sequence -> files (slice order)
    label_map: np.ndarray | None = None  # [z, y, x] on the T1c grid
    grids: dict[str, dict] = field(default_factory=dict)  # sequence -> origin/spacing/shape (x, y, z)


def _tissues(X, Y, Z, rng_params) -> dict[str, np.ndarray]:
    cx, cy, cz, r_les = rng_params
    brain = (X / 70.0) ** 2 + (Y / 85.0) ** 2 + (Z / 60.0) ** 2 <= 1.0
    wm = (X / 52.0) ** 2 + (Y / 66.0) ** 2 + (Z / 44.0) ** 2 <= 1.0
    vent = ((np.abs(X) - 9.0) / 6.0) ** 2 + (Y / 22.0) ** 2 + ((Z - 5.0) / 12.0) ** 2 <= 1.0
    d = np.sqrt((X - cx) ** 2 + (Y - cy) ** 2 + (Z - cz) ** 2)
    core = brain & (d <= 0.45 * r_les)
    rim = brain & (d <= r_les) & ~core
    oedema = brain & (d <= 1.9 * r_les) & ~core & ~rim
    return {"brain": brain, "wm": wm & brain, "csf": vent & brain, "core": core, "rim": rim, "oedema": oedema}


def _image(t: dict[str, np.ndarray], seq: str, rng: np.random.Generator) -> np.ndarray:
    wm, gm, csf, oed, rim, core = _CONTRAST[seq]
    img = np.zeros(t["brain"].shape, dtype=np.float64)
    img[t["brain"]] = gm
    img[t["wm"]] = wm
    img[t["csf"]] = csf
    img[t["oedema"]] = oed
    img[t["rim"]] = rim
    img[t["core"]] = core
    img = img * 1000.0
    img[t["brain"]] += rng.normal(0.0, 15.0, size=int(t["brain"].sum()))
    return np.clip(img, 0, 4000)


def generate_mr_study(out_dir: str | Path, *, seed: int = 0, phi: PlantedPHI | None = None,
                      matrix: int = 96, pixel_spacing_mm: float = 2.2, n_slices: int = 40,
                      slice_thickness_mm: float = 3.5, flair_slice_thickness_mm: float = 5.0,
                      flair_shift_mm: tuple[float, float, float] = (2.0, -3.0, 1.5),
                      folder_name: str | None = None) -> MRStudyTruth:
    from pydicom.uid import generate_uid

    rng = np.random.default_rng(seed)
    phi = phi or make_phi(seed + 7000)
    folder = Path(out_dir) / (folder_name or f"{phi.family_name}_{phi.patient_id}_MR")
    uids = _Uids(seed, phi)
    study_uid = uids("mr-study")
    frame = uids("mr-frame")
    lesion = (float(rng.uniform(-25, 25)), float(rng.uniform(-30, 20)), float(rng.uniform(-15, 15)),
              float(rng.uniform(9, 15)))
    truth = MRStudyTruth(study_dir=folder, phi=phi, study_instance_uid=study_uid)
    date = _dt.date(2021, 3, 1) + _dt.timedelta(days=int(seed) % 300)
    for number, seq in enumerate(("t1", "t1c", "t2", "flair"), start=1):
        dz = flair_slice_thickness_mm if seq == "flair" else slice_thickness_mm
        nz = int(round(n_slices * slice_thickness_mm / dz))
        shift = np.asarray(flair_shift_mm if seq == "flair" else (0.0, 0.0, 0.0))
        origin = np.array([-(matrix - 1) / 2 * pixel_spacing_mm, -(matrix - 1) / 2 * pixel_spacing_mm,
                           -(nz - 1) / 2 * dz]) + shift
        xs = origin[0] + np.arange(matrix) * pixel_spacing_mm
        ys = origin[1] + np.arange(matrix) * pixel_spacing_mm
        zs = origin[2] + np.arange(nz) * dz
        Z, Y, X = np.meshgrid(zs, ys, xs, indexing="ij")
        tissues = _tissues(X, Y, Z, lesion)
        img = _image(tissues, seq, rng).astype(np.uint16)
        if seq == "t1c":
            label = np.zeros(img.shape, dtype=np.uint8)
            label[tissues["oedema"]] = 2
            label[tissues["rim"]] = 3
            label[tissues["core"]] = 1
            truth.label_map = label
        truth.grids[seq] = {"origin": tuple(origin), "spacing": (pixel_spacing_mm, pixel_spacing_mm, dz),
                            "shape": (matrix, matrix, nz)}
        series_uid = uids("mr-series", seq)
        meta = _SERIES[seq]
        files = []
        sub = folder / f"{number:02d}_{seq.upper()}"
        sub.mkdir(parents=True, exist_ok=True)
        for k in range(nz):
            sop = str(generate_uid(entropy_srcs=[study_uid, seq, str(k)]))
            ds = _base_dataset(phi, sop_class=MR_IMAGE_STORAGE, sop_uid=sop, modality="MR", study_uid=study_uid,
                               series_uid=series_uid, series_number=number, study_date=date,
                               study_time="101500", sex="F")
            ds.SeriesDescription = meta["desc"]
            ds.ProtocolName = meta["protocol"]
            ds.FrameOfReferenceUID = frame
            ds.EchoTime = meta["te"]
            ds.RepetitionTime = meta["tr"]
            if meta["ti"]:
                ds.InversionTime = meta["ti"]
            if meta["contrast"]:
                ds.ContrastBolusAgent = meta["contrast"]
            ds.ScanningSequence = "SE" if not meta["ti"] else ["SE", "IR"]
            ds.MagneticFieldStrength = 3.0
            ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
            ds.InstanceNumber = k + 1
            ds.ImagePositionPatient = [f"{v:.4f}" for v in (origin[0], origin[1], zs[k])]
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            ds.PixelSpacing = [pixel_spacing_mm, pixel_spacing_mm]
            ds.SliceThickness = dz
            ds.SliceLocation = f"{zs[k]:.4f}"
            ds.PatientPosition = "HFS"
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.Rows = matrix
            ds.Columns = matrix
            ds.BitsAllocated = 16
            ds.BitsStored = 16
            ds.HighBit = 15
            ds.PixelRepresentation = 0
            ds.PixelData = np.ascontiguousarray(img[k]).tobytes()
            path = sub / f"MR.{phi.patient_id}.{seq}.{k + 1:03d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
        truth.series_files[seq] = files
    return truth
