"""The header every synthetic DICOM object starts from, with the planted PHI in it.

``base_dataset`` fills the SOP Common, General Study/Series/Equipment and Patient modules and a
private block (group 0x0009, creator ``PSQA_TEST``) that repeats the patient's name and ID, so a
de-identifier that keeps private tags leaks them. :class:`StudyHeader` holds what all objects of
one study share. pydicom is imported when a dataset is built.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass

from ml.data.dicom.writers import file_meta
from ml.data.synthetic.planted_phi import PlantedPHI

__all__ = ["PRIVATE_CREATOR", "PRIVATE_GROUP", "StudyHeader", "base_dataset", "patient_age"]

PRIVATE_GROUP = 0x0009
PRIVATE_CREATOR = "PSQA_TEST"


@dataclass(frozen=True)
class StudyHeader:
    """What every object of one synthetic study shares."""

    phi: PlantedPHI
    study_uid: str
    frame_of_reference_uid: str
    study_date: _dt.date
    study_time: str
    sex: str

    def dataset(self, *, sop_class: str, sop_uid: str, modality: str, series_uid: str, series_number: int):
        """``base_dataset`` of one object of this study."""
        return base_dataset(
            self.phi,
            sop_class=sop_class,
            sop_uid=sop_uid,
            modality=modality,
            study_uid=self.study_uid,
            series_uid=series_uid,
            series_number=series_number,
            study_date=self.study_date,
            study_time=self.study_time,
            sex=self.sex,
        )


def patient_age(birth: str, on: _dt.date) -> str:
    """DICOM AS of a patient born on ``birth`` (YYYYMMDD) at the date ``on``, e.g. ``"063Y"``."""
    b = _dt.datetime.strptime(birth, "%Y%m%d").date()
    years = on.year - b.year - ((on.month, on.day) < (b.month, b.day))
    return f"{max(0, min(999, years)):03d}Y"


def base_dataset(
    phi: PlantedPHI,
    *,
    sop_class: str,
    sop_uid: str,
    modality: str,
    study_uid: str,
    series_uid: str,
    series_number: int,
    study_date: _dt.date,
    study_time: str,
    sex: str,
):
    """A new dataset with file meta, SOP, study, series, equipment and patient modules and PHI."""
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.file_meta = file_meta(sop_class, sop_uid, "PSQA_SAMPLE_1")
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    _set_dates(ds, study_date, study_time)
    _set_study_and_series(ds, phi, modality, study_uid, series_uid, series_number)
    _set_patient(ds, phi, sex, study_date)
    _plant_private_block(ds, phi)
    return ds


def _set_dates(ds, study_date: _dt.date, study_time: str) -> None:
    d = study_date.strftime("%Y%m%d")
    ds.StudyDate = d
    ds.SeriesDate = d
    ds.ContentDate = d
    ds.StudyTime = study_time
    ds.SeriesTime = study_time
    ds.ContentTime = study_time


def _set_study_and_series(
    ds, phi: PlantedPHI, modality: str, study_uid: str, series_uid: str, series_number: int
) -> None:
    ds.AccessionNumber = phi.accession_number
    ds.Modality = modality
    ds.Manufacturer = "PSQA Synthetic Imaging"
    ds.InstitutionName = phi.institution_name
    ds.InstitutionAddress = phi.institution_address
    ds.ReferringPhysicianName = phi.referring_physician
    ds.StudyDescription = phi.study_description
    ds.SeriesDescription = phi.series_description
    ds.OperatorsName = phi.operator_name
    ds.ManufacturerModelName = "HN-Phantom Generator"
    ds.SoftwareVersions = "psqa-sample-data 1"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = phi.study_id
    ds.SeriesNumber = series_number


def _set_patient(ds, phi: PlantedPHI, sex: str, study_date: _dt.date) -> None:
    from pydicom.dataset import Dataset

    ds.PatientName = phi.patient_name
    ds.PatientID = phi.patient_id
    ds.PatientBirthDate = phi.birth_date
    ds.PatientSex = sex
    ds.OtherPatientIDs = phi.other_patient_id
    other = Dataset()
    other.PatientID = phi.other_patient_id
    other.TypeOfPatientID = "TEXT"
    ds.OtherPatientIDsSequence = [other]
    ds.PatientAge = patient_age(phi.birth_date, study_date)
    ds.PatientAddress = phi.patient_address


def _plant_private_block(ds, phi: PlantedPHI) -> None:
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(0x01, "LO", phi.patient_name)
    block.add_new(0x02, "LO", phi.patient_id)
