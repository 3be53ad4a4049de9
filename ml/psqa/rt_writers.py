"""DICOM RT Plan / RT Dose writers and the QA-results CSV of the QA simulator (numpy + pydicom).

Headers, UIDs and planted PHI come from ``ml.data.synthetic`` (``headers.StudyHeader``,
``uids.StudyUids``, ``planted_phi.PlantedPHI``) so that every file carries the same identifying
values (standard attributes and a private block) as the synthetic CT studies, and
de-identification tests stay meaningful.

Plane geometry of every RT Dose written here (single frame, coronal plane through the isocentre):

* ``ImageOrientationPatient = [1, 0, 0, 0, 0, -1]``, ``PixelSpacing = [s, s]``,
  ``GridFrameOffsetVector = [0]``, ``NumberOfFrames = 1``;
* the pixel array is stored exactly as the fluence grid of ``ml.psqa.fluence`` (rows = IEC BLD y
  ascending, columns = BLD x ascending); the mapping to the patient (QA phantom) frame, isocentre
  at the origin, is ``x_patient = x_BLD``, ``y_patient = 0``, ``z_patient = -y_BLD``, so pixel
  ``(r, c)`` lies at ``(x, y, z) = ((c - (n-1)/2) s, 0, -(r - (n-1)/2) s)`` and
  ``ImagePositionPatient`` (pixel (0, 0)) is ``(-(n-1)/2 s, 0, +(n-1)/2 s)``;
* dose is stored as unsigned 32-bit integers with ``DoseGridScaling = 1e-6`` Gy.

Files are serialised in memory and moved into place atomically (temporary file in the same
folder + ``os.replace``); the same inputs give byte-identical files. Quantisation, the RT Dose
grid/pixel modules and the atomic write are the shared ones of ``ml.data.dicom.writers``.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
from pathlib import Path

import numpy as np

from ml.data.dicom import writers as _w
from ml.data.dicom.writers import DOSE_GRID_SCALING, RT_DOSE_STORAGE, RT_PLAN_STORAGE, atomic_write, write_dataset
from ml.data.synthetic.headers import StudyHeader
from ml.psqa.plan import Plan
from ml.psqa.sequencing import format_ds

__all__ = [
    "DOSE_GRID_SCALING",
    "QA_CSV_COLUMNS",
    "atomic_write",
    "quantise_dose",
    "rt_dose_dataset",
    "rt_plan_dataset",
    "write_dataset",
    "write_qa_csv",
]

QA_CSV_COLUMNS = (
    "PatientID",
    "PatientName",
    "PlanLabel",
    "PlanSOPInstanceUID",
    "BeamNumber",
    "Criterion",
    "GPR",
    "Device",
    "MeasuredOn",
)
_MANUFACTURER_TPS = "PSQA Synthetic TPS"
_MANUFACTURER_QA = "PSQA Synthetic Dosimetry"


def quantise_dose(dose_gy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(stored uint32 array, the Gy values it decodes to); negative doses are clipped to 0."""
    return _w.quantise_dose(dose_gy, DOSE_GRID_SCALING, bits=32)


def _header(
    header: StudyHeader,
    *,
    sop_class: str,
    sop_uid: str,
    modality: str,
    series_uid: str,
    series_number: int,
    content_date: _dt.date | None = None,
    content_time: str | None = None,
):
    ds = header.dataset(
        sop_class=sop_class, sop_uid=sop_uid, modality=modality, series_uid=series_uid, series_number=series_number
    )
    ds.file_meta.ImplementationVersionName = "PSQA_QASIM_1"
    if content_date is not None:
        ds.SeriesDate = ds.ContentDate = content_date.strftime("%Y%m%d")
    if content_time is not None:
        ds.SeriesTime = ds.ContentTime = content_time
    ds.SoftwareVersions = "psqa-qa-simulator 1"
    return ds


def _device(kind: str, n_pairs: int = 1, boundaries=None):
    from pydicom.dataset import Dataset

    d = Dataset()
    d.RTBeamLimitingDeviceType = kind
    d.NumberOfLeafJawPairs = n_pairs
    if boundaries is not None:
        d.LeafPositionBoundaries = [format_ds(v, 4) for v in boundaries]
    return d


def _position(kind: str, values) -> object:
    from pydicom.dataset import Dataset

    d = Dataset()
    d.RTBeamLimitingDeviceType = kind
    d.LeafJawPositions = [format_ds(v, 4) for v in values]
    return d


def rt_plan_dataset(
    plan: Plan,
    header: StudyHeader,
    *,
    sop_uid: str,
    series_uid: str,
    plan_date: _dt.date,
    plan_time: str,
    dose_reference_uid: str,
    beam_doses_gy: dict[int, float] | None = None,
):
    """RT Plan Storage dataset of a step-and-shoot photon ``plan`` (all devices in every control point)."""
    from pydicom.dataset import Dataset

    ds = _header(
        header,
        sop_class=RT_PLAN_STORAGE,
        sop_uid=sop_uid,
        modality="RTPLAN",
        series_uid=series_uid,
        series_number=1,
        content_date=plan_date,
        content_time=plan_time,
    )
    ds.Manufacturer = _MANUFACTURER_TPS
    ds.ManufacturerModelName = "PSQA QA simulator (TPS model)"
    ds.FrameOfReferenceUID = header.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.RTPlanLabel = plan.label
    ds.RTPlanName = plan.label
    ds.RTPlanDescription = f"IMRT step-and-shoot {plan.meta.get('site', '')}".strip()
    ds.InstanceNumber = 1
    ds.RTPlanDate = plan_date.strftime("%Y%m%d")
    ds.RTPlanTime = plan_time
    ds.RTPlanGeometry = "PATIENT"
    ds.PlanIntent = "CURATIVE"
    ds.ApprovalStatus = "APPROVED"
    ds.ReviewDate = ds.RTPlanDate
    ds.ReviewTime = plan_time
    ds.ReviewerName = header.phi.operator_name

    setup = Dataset()
    setup.PatientPosition = "HFS"
    setup.PatientSetupNumber = 1
    setup.SetupTechnique = "ISOCENTRIC"
    ds.PatientSetupSequence = [setup]

    dref = Dataset()
    dref.DoseReferenceNumber = 1
    dref.DoseReferenceUID = dose_reference_uid
    dref.DoseReferenceStructureType = "SITE"
    dref.DoseReferenceDescription = "PTV"
    dref.DoseReferenceType = "TARGET"
    if plan.dose_per_fraction_gy is not None:
        dref.DeliveryMaximumDose = format_ds(plan.dose_per_fraction_gy * (plan.fractions or 1) * 1.07, 4)
    if plan.prescription_gy is not None:
        dref.TargetPrescriptionDose = format_ds(plan.prescription_gy, 4)
    ds.DoseReferenceSequence = [dref]

    tol = Dataset()
    tol.ToleranceTableNumber = 1
    tol.ToleranceTableLabel = "IMRT"
    ds.ToleranceTableSequence = [tol]

    fg = Dataset()
    fg.FractionGroupNumber = 1
    fg.NumberOfFractionsPlanned = int(plan.fractions or 1)
    fg.NumberOfBeams = len(plan.beams)
    fg.NumberOfBrachyApplicationSetups = 0
    refs = []
    for beam in plan.beams:
        rb = Dataset()
        if beam_doses_gy is not None and beam.number in beam_doses_gy:
            rb.BeamDose = format_ds(beam_doses_gy[beam.number], 6)
        rb.BeamMeterset = format_ds(beam.meterset_mu, 4)
        rb.ReferencedBeamNumber = int(beam.number)
        refs.append(rb)
    fg.ReferencedBeamSequence = refs
    rdr = Dataset()
    rdr.ReferencedDoseReferenceNumber = 1
    fg.ReferencedDoseReferenceSequence = [rdr]
    ds.FractionGroupSequence = [fg]

    beams = []
    for beam in plan.beams:
        b = Dataset()
        b.Manufacturer = _MANUFACTURER_TPS
        b.InstitutionName = header.phi.institution_name
        b.InstitutionAddress = header.phi.institution_address
        b.TreatmentMachineName = beam.treatment_machine or "LINAC"
        b.PrimaryDosimeterUnit = "MU"
        b.SourceAxisDistance = format_ds(beam.sad_mm, 4)
        b.BeamLimitingDeviceSequence = [
            _device("ASYMX"),
            _device("ASYMY"),
            _device("MLCX", beam.n_pairs, beam.leaf_boundaries),
        ]
        b.BeamNumber = int(beam.number)
        b.BeamName = beam.name
        b.BeamDescription = f"IMRT field {beam.number}"
        b.BeamType = "STATIC"  # step-and-shoot: leaves static while the beam is on
        b.RadiationType = "PHOTON"
        b.TreatmentDeliveryType = "TREATMENT"
        b.NumberOfWedges = 0
        b.NumberOfCompensators = 0
        b.NumberOfBoli = 0
        b.NumberOfBlocks = 0
        b.FinalCumulativeMetersetWeight = "1"
        cps = []
        for cp in beam.control_points:
            c = Dataset()
            c.ControlPointIndex = int(cp.index)
            if cp.index == 0:
                c.NominalBeamEnergy = format_ds(beam.energy_mv, 2)
                c.DoseRateSet = "600"
            c.BeamLimitingDevicePositionSequence = [
                _position("ASYMX", cp.jaw_x),
                _position("ASYMY", cp.jaw_y),
                _position("MLCX", np.concatenate([cp.mlc_a, cp.mlc_b])),
            ]
            if cp.index == 0:
                c.GantryAngle = format_ds(cp.gantry_angle, 2)
                c.GantryRotationDirection = "NONE"
                c.BeamLimitingDeviceAngle = format_ds(cp.collimator_angle, 2)
                c.BeamLimitingDeviceRotationDirection = "NONE"
                c.PatientSupportAngle = "0"
                c.PatientSupportRotationDirection = "NONE"
                c.TableTopEccentricAngle = "0"
                c.TableTopEccentricRotationDirection = "NONE"
                c.IsocenterPosition = ["0", "0", "0"]
                c.SourceToSurfaceDistance = "900"
            c.CumulativeMetersetWeight = format_ds(cp.cumulative_meterset_weight, 12)
            cps.append(c)
        b.NumberOfControlPoints = len(cps)
        b.ControlPointSequence = cps
        b.ReferencedPatientSetupNumber = 1
        b.ReferencedToleranceTableNumber = 1
        beams.append(b)
    ds.BeamSequence = beams
    return ds


def rt_dose_dataset(
    stored: np.ndarray,
    header: StudyHeader,
    *,
    sop_uid: str,
    series_uid: str,
    series_number: int,
    instance_number: int,
    plan_sop_uid: str,
    beam_number: int | None,
    summation: str,
    spacing_mm: float,
    content_date: _dt.date,
    content_time: str,
    measured: bool,
    device: str = "",
):
    """A single-frame coronal RT Dose (module docstring) of ``stored`` (uint32, DoseGridScaling 1e-6)."""
    from pydicom.dataset import Dataset

    rows, cols = stored.shape
    ds = _header(
        header,
        sop_class=RT_DOSE_STORAGE,
        sop_uid=sop_uid,
        modality="RTDOSE",
        series_uid=series_uid,
        series_number=series_number,
        content_date=content_date,
        content_time=content_time,
    )
    if measured:
        ds.Manufacturer = _MANUFACTURER_QA
        # "<model> <serial>": the model in ManufacturerModelName, the serial in DeviceSerialNumber
        # (as a real array exports them; de-identification keeps the model, pseudonymises the serial)
        parts = device.split()
        ds.ManufacturerModelName = " ".join(parts[:-1]) if len(parts) > 1 else (device or "QA array")
        ds.DeviceSerialNumber = parts[-1] if len(parts) > 1 else ""
    else:
        ds.Manufacturer = _MANUFACTURER_TPS
        ds.ManufacturerModelName = "PSQA QA simulator (TPS model)"
    ds.InstanceNumber = int(instance_number)
    s = float(spacing_mm)
    _w.set_rt_dose_grid(
        ds,
        np.asarray(stored, dtype=np.uint32),
        position=[format_ds(-(cols - 1) / 2.0 * s, 4), "0", format_ds((rows - 1) / 2.0 * s, 4)],
        orientation=["1", "0", "0", "0", "0", "-1"],
        pixel_spacing=[format_ds(s, 4), format_ds(s, 4)],
        frame_offsets=["0"],
        slice_thickness=format_ds(s, 4),
        dose_grid_scaling=format_ds(DOSE_GRID_SCALING, 8),  # "0.000001"
        frame_of_reference_uid=header.frame_of_reference_uid,
        summation_type=summation,
    )
    ds.DoseComment = ("measured" if measured else "planned") + (
        f" beam {beam_number}" if beam_number is not None else " composite"
    )
    ref = Dataset()
    ref.ReferencedSOPClassUID = RT_PLAN_STORAGE
    ref.ReferencedSOPInstanceUID = plan_sop_uid
    if beam_number is not None:
        rb = Dataset()
        rb.ReferencedBeamNumber = int(beam_number)
        rfg = Dataset()
        rfg.ReferencedFractionGroupNumber = 1
        rfg.ReferencedBeamSequence = [rb]
        ref.ReferencedFractionGroupSequence = [rfg]
    ds.ReferencedRTPlanSequence = [ref]
    return ds


def write_qa_csv(path: Path, rows: list[dict]) -> Path:
    """The QA system export: one row per (plan, beam or "ALL", criterion), columns ``QA_CSV_COLUMNS``."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(QA_CSV_COLUMNS), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: r[k] for k in QA_CSV_COLUMNS})
    return atomic_write(Path(path), buf.getvalue().encode("utf-8"))
