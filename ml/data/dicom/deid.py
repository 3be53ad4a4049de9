"""De-identification of DICOM datasets (PS3.15 Annex E Basic Application Level Confidentiality
Profile) with keyed-hash pseudonyms and consistent UID remapping.

What this implements, attribute by attribute:

* **Table E.1-1 actions** for the attributes listed in ``BASIC_PROFILE`` below (the Basic
  Profile's identifying attributes that occur in CT/MR/RT objects and their requests): ``X``
  remove, ``Z`` replace with an empty value, ``D`` replace with a dummy/pseudonym, ``U``
  replace the UID consistently, ``K`` keep.
* **Safety nets beyond the table** (the profile says any attribute "that may contain
  identifying information" must be handled; we do it by VR instead of by enumerating):

  - every private (odd-group) element is removed (no "Retain Safe Private" option);
  - every ``PN`` (person name) anywhere, also inside sequences, is emptied;
  - every ``DA``/``DT``/``TM`` (date/time) is emptied (no "Retain Longitudinal Temporal
    Information" option: ingestion time is recorded separately);
  - every free-text VR (``LO, SH, LT, ST, UT, UC, AE, AS, UN``) is removed unless it is in
    ``SAFE_TEXT`` (manufacturer, model, kernel, code sequences, ...); ROI names are replaced by
    a canonical vocabulary name (or ``ROI_<n>``), beam names by ``BEAM<n>``;
  - every ``UI`` that is not a class/transfer-syntax/coding-scheme UID is remapped to
    ``2.25.<128-bit keyed hash>`` (so references between CT, RTSTRUCT, RTDOSE and RTPLAN of a
    study stay consistent, and the same input always gives the same output);
  - overlay and curve groups (``60xx``, ``50xx``) are removed.
* Patient identity: ``PatientName`` and ``PatientID`` become the keyed-hash patient pseudonym
  (action ``D``); ``PatientIdentityRemoved`` = ``YES`` and ``DeidentificationMethod(Code
  Sequence)`` (CID 7050 code 113100) are added.
* Files flagged ``BurnedInAnnotation = YES`` cannot be cleaned without pixel processing; the
  ingester quarantines them (see ``needs_pixel_cleaning``).

The secret for the keyed hash (HMAC-SHA256) is passed in by the caller (the pipeline reads it
from ``PSQA_DEID_SECRET`` in ``psqa_pipelines.settings``); without one, a documented development
default is used so the demo runs out of the box, and the caller is told (``is_dev_secret``) so
that it can log a warning. Without the secret the pseudonyms cannot be linked back to the source identifiers.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = [
    "BASIC_PROFILE",
    "DEID_METHOD",
    "DEV_SECRET",
    "SAFE_TEXT",
    "DeidReport",
    "DicomDeidentifier",
    "Pseudonymizer",
    "needs_pixel_cleaning",
    "patient_key_of",
    "resolve_secret",
]

DEV_SECRET = "psqa-dev-secret-not-for-clinical-use"

# (group, element) -> action.  Subset of PS3.15 Table E.1-1 relevant to RT / CT / MR objects.
BASIC_PROFILE: dict[tuple[int, int], str] = {
    # General Study / Patient / Visit
    (0x0008, 0x0050): "Z",  # Accession Number
    (0x0008, 0x0080): "X",  # Institution Name
    (0x0008, 0x0081): "X",  # Institution Address
    (0x0008, 0x0082): "X",  # Institution Code Sequence
    (0x0008, 0x0090): "Z",  # Referring Physician's Name
    (0x0008, 0x0092): "X",  # Referring Physician's Address
    (0x0008, 0x0094): "X",  # Referring Physician's Telephone Numbers
    (0x0008, 0x0096): "X",  # Referring Physician Identification Sequence
    (0x0008, 0x1010): "X",  # Station Name
    (0x0008, 0x1030): "X",  # Study Description
    (0x0008, 0x103E): "X",  # Series Description
    (0x0008, 0x1040): "X",  # Institutional Department Name
    (0x0008, 0x1048): "X",  # Physician(s) of Record
    (0x0008, 0x1049): "X",  # Physician(s) of Record Identification Sequence
    (0x0008, 0x1050): "X",  # Performing Physician's Name
    (0x0008, 0x1052): "X",  # Performing Physician Identification Sequence
    (0x0008, 0x1060): "X",  # Name of Physician(s) Reading Study
    (0x0008, 0x1062): "X",  # Physician(s) Reading Study Identification Sequence
    (0x0008, 0x1070): "X",  # Operators' Name
    (0x0008, 0x1072): "X",  # Operator Identification Sequence
    (0x0008, 0x1080): "X",  # Admitting Diagnoses Description
    (0x0008, 0x1084): "X",  # Admitting Diagnoses Code Sequence
    (0x0008, 0x1110): "X",  # Referenced Study Sequence
    (0x0008, 0x1111): "X",  # Referenced Performed Procedure Step Sequence
    (0x0008, 0x1120): "X",  # Referenced Patient Sequence
    (0x0008, 0x2111): "X",  # Derivation Description
    (0x0008, 0x4000): "X",  # Identifying Comments
    (0x0010, 0x0010): "D",  # Patient's Name -> pseudonym
    (0x0010, 0x0020): "D",  # Patient ID -> pseudonym
    (0x0010, 0x0021): "X",  # Issuer of Patient ID
    (0x0010, 0x0030): "Z",  # Patient's Birth Date
    (0x0010, 0x0032): "X",  # Patient's Birth Time
    (0x0010, 0x0040): "Z",  # Patient's Sex
    (0x0010, 0x0050): "X",  # Patient's Insurance Plan Code Sequence
    (0x0010, 0x1000): "X",  # Other Patient IDs
    (0x0010, 0x1001): "X",  # Other Patient Names
    (0x0010, 0x1002): "X",  # Other Patient IDs Sequence
    (0x0010, 0x1005): "X",  # Patient's Birth Name
    (0x0010, 0x1010): "X",  # Patient's Age
    (0x0010, 0x1020): "X",  # Patient's Size
    (0x0010, 0x1030): "X",  # Patient's Weight
    (0x0010, 0x1040): "X",  # Patient's Address
    (0x0010, 0x1060): "X",  # Patient's Mother's Birth Name
    (0x0010, 0x1090): "X",  # Medical Record Locator
    (0x0010, 0x2150): "X",  # Country of Residence
    (0x0010, 0x2152): "X",  # Region of Residence
    (0x0010, 0x2154): "X",  # Patient's Telephone Numbers
    (0x0010, 0x2160): "X",  # Ethnic Group
    (0x0010, 0x2180): "X",  # Occupation
    (0x0010, 0x21B0): "X",  # Additional Patient History
    (0x0010, 0x21F0): "X",  # Patient's Religious Preference
    (0x0010, 0x4000): "X",  # Patient Comments
    # (0x0018, 0x1000) Device Serial Number: the profile's D option, a keyed pseudonym (see _walk), so a
    # QA device keeps one identity across plans (a PSQA feature) without its serial leaving the inbox
    (0x0018, 0x1030): "X",  # Protocol Name
    (0x0018, 0x1400): "X",  # Acquisition Device Processing Description
    (0x0018, 0x4000): "X",  # Acquisition Comments
    (0x0018, 0x9424): "X",  # Acquisition Protocol Description
    (0x0020, 0x0010): "Z",  # Study ID
    (0x0020, 0x4000): "X",  # Image Comments
    (0x0020, 0x9158): "X",  # Frame Comments
    (0x0032, 0x1032): "X",  # Requesting Physician
    (0x0032, 0x1033): "X",  # Requesting Service
    (0x0032, 0x1060): "X",  # Requested Procedure Description
    (0x0032, 0x4000): "X",  # Study Comments
    (0x0038, 0x0010): "X",  # Admission ID
    (0x0038, 0x0300): "X",  # Current Patient Location
    (0x0038, 0x0400): "X",  # Patient's Institution Residence
    (0x0038, 0x4000): "X",  # Visit Comments
    (0x0040, 0x0006): "X",  # Scheduled Performing Physician's Name
    (0x0040, 0x0241): "X",  # Performed Station AE Title
    (0x0040, 0x0242): "X",  # Performed Station Name
    (0x0040, 0x0243): "X",  # Performed Location
    (0x0040, 0x0253): "X",  # Performed Procedure Step ID
    (0x0040, 0x0254): "X",  # Performed Procedure Step Description
    (0x0040, 0x0275): "X",  # Request Attributes Sequence
    (0x0040, 0x1001): "X",  # Requested Procedure ID
    (0x0040, 0x2016): "X",  # Placer Order Number / Imaging Service Request
    (0x0040, 0x2017): "X",  # Filler Order Number / Imaging Service Request
    (0x0040, 0xA123): "X",  # Person Name
    (0x0040, 0xA730): "X",  # Content Sequence
    (0x0088, 0x0140): "U",  # Storage Media File-set UID
    (0x3006, 0x0002): "D",  # Structure Set Label
    (0x3006, 0x0004): "X",  # Structure Set Name
    (0x3006, 0x0006): "X",  # Structure Set Description
    (0x3006, 0x0028): "X",  # ROI Description
    (0x3006, 0x0038): "X",  # ROI Generation Description
    (0x3006, 0x00A6): "Z",  # ROI Interpreter
    (0x3006, 0x0088): "X",  # ROI Observation Description
    (0x300A, 0x0002): "D",  # RT Plan Label
    (0x300A, 0x0003): "X",  # RT Plan Name
    (0x300A, 0x0004): "X",  # RT Plan Description
    (0x300A, 0x000E): "X",  # Prescription Description
    (0x300A, 0x0016): "X",  # Dose Reference Description
    (0x300A, 0x00C3): "X",  # Beam Description
    (0x300A, 0x01B2): "X",  # Setup Technique Description
    (0x300A, 0x0196): "X",  # Fixation Device Description
    (0x300E, 0x0008): "X",  # Reviewer Name
    (0x4000, 0x0010): "X",  # Arbitrary
    (0x4000, 0x4000): "X",  # Text Comments
    (0x4008, 0x0042): "X",  # Results ID Issuer
    (0x4008, 0x0102): "X",  # Interpretation Recorder
    (0x4008, 0x010A): "X",  # Interpretation Transcriber
    (0x4008, 0x010C): "X",  # Interpretation Author
    (0x4008, 0x0114): "X",  # Physician Approving Interpretation
    (0x4008, 0x0119): "X",  # Distribution Name
    (0x4008, 0x011A): "X",  # Distribution Address
    (0x0002, 0x0016): "X",  # Source Application Entity Title (file meta)
    (0x0002, 0x0100): "X",  # Private Information Creator UID
    (0x0002, 0x0102): "X",  # Private Information
}

# Free-text attributes that carry no identity and that downstream steps need (keywords).
SAFE_TEXT = frozenset(
    {
        "Manufacturer",
        "ManufacturerModelName",
        "SoftwareVersions",
        "ConvolutionKernel",
        "SequenceName",
        "ImplementationVersionName",
        "SpecificCharacterSet",
        "CodeValue",
        "CodingSchemeDesignator",
        "CodingSchemeVersion",
        "CodeMeaning",
        "LongCodeValue",
        "URNCodeValue",
        "ContextIdentifier",
        "MappingResource",
        "DeidentificationMethod",
        "PatientIdentityRemoved",
        "LongitudinalTemporalInformationModified",
        "DoseUnits",
        "DoseType",
        "DoseSummationType",
        "PrimaryDosimeterUnit",
        "RadiationType",
        "BeamType",
        "RTBeamLimitingDeviceType",
        "RTROIInterpretedType",
        "ROIGenerationAlgorithm",
        "ContourGeometricType",
        "TreatmentDeliveryType",
        "GantryRotationDirection",
        "BeamLimitingDeviceRotationDirection",
        "PatientSupportRotationDirection",
        "TableTopEccentricRotationDirection",
        "FluenceMode",
        "ApprovalStatus",
        "DoseReferenceStructureType",
        "DoseReferenceType",
        "PlanIntent",
        "RTPlanGeometry",
        "ContrastBolusRoute",
        "ScanningSequence",
        "SequenceVariant",
        "ScanOptions",
        "MRAcquisitionType",
        "ImageType",
        "BodyPartExamined",
        "PatientPosition",
        "PhotometricInterpretation",
        "RescaleType",
        "Modality",
        "ROIName",
        "BeamName",
        "TreatmentMachineName",
        "StructureSetLabel",
        "RTPlanLabel",
        "PatientName",
        "PatientID",
    }
)

_TEXT_VRS = frozenset({"LO", "SH", "LT", "ST", "UT", "UC", "AE", "AS", "UN"})
_DATE_VRS = frozenset({"DA", "DT", "TM"})
_CLASS_UID_KEYWORD = re.compile(
    r"(ClassUID|TransferSyntaxUID|CodingSchemeUID|ContextGroupExtensionCreatorUID|MappingResourceUID|ContextUID)$"
)
_STANDARD_UID_ROOT = "1.2.840.10008."

DEID_METHOD = "PS3.15 Basic Profile; keyed-hash pseudonyms; UIDs remapped"


def resolve_secret(secret: str | None = None) -> tuple[str, bool]:
    """Return (secret, is_dev_default): ``secret``, or the development secret when none is given."""
    if secret:
        return secret, secret == DEV_SECRET
    return DEV_SECRET, True


class Pseudonymizer:
    """Keyed hashes: the same (namespace, value) always maps to the same pseudonym."""

    def __init__(self, secret: str | None = None) -> None:
        self.secret, self.is_dev_secret = resolve_secret(secret)
        self._key = self.secret.encode("utf-8")

    def digest(self, namespace: str, value: str) -> str:
        msg = f"{namespace}\x00{value}".encode()
        return hmac.new(self._key, msg, hashlib.sha256).hexdigest()

    def pseudonym(self, namespace: str, value: str, prefix: str, length: int = 16) -> str:
        return f"{prefix}{self.digest(namespace, value)[:length]}"

    def patient(self, patient_key: str) -> str:
        return self.pseudonym("patient", patient_key, "pt-")

    def study(self, source: str, study_key: str) -> str:
        """Partition key of a study. ``source`` is dcm | nii | kbp."""
        return self.pseudonym(f"study:{source}", study_key, f"{source}-")

    def uid(self, uid: str) -> str:
        # 2.25 root: a UUID-derived UID (PS3.5 B.2); 128 bits -> at most 39 digits.
        return "2.25." + str(int(self.digest("uid", uid)[:32], 16))

    def short(self, namespace: str, value: str, prefix: str = "") -> str:
        return self.pseudonym(namespace, value, prefix, length=12)


@dataclass
class DeidReport:
    removed: int = 0
    emptied: int = 0
    replaced: int = 0
    uids_remapped: int = 0
    private_removed: int = 0
    notes: list[str] = field(default_factory=list)


def patient_key_of(ds) -> str:
    """The identity a patient pseudonym is derived from (PatientID, else name+birth date)."""
    pid = str(ds.get("PatientID", "") or "").strip()
    if pid:
        return f"id:{pid}"
    name = str(ds.get("PatientName", "") or "").strip()
    dob = str(ds.get("PatientBirthDate", "") or "").strip()
    if name or dob:
        return f"name:{name}|{dob}"
    return f"study:{ds.get('StudyInstanceUID', '')}"


def needs_pixel_cleaning(ds) -> bool:
    return str(ds.get("BurnedInAnnotation", "")).upper() == "YES"


def _is_class_uid(keyword: str, value: str) -> bool:
    return bool(_CLASS_UID_KEYWORD.search(keyword or "")) or value.startswith(_STANDARD_UID_ROOT)


class DicomDeidentifier:
    """Apply the profile to a pydicom ``Dataset`` in place.

    ``roi_name_map`` maps an original ROI name to the stored one (canonical vocabulary);
    names it does not know become ``ROI_<ROINumber>``.
    """

    def __init__(self, pseudonymizer: Pseudonymizer, roi_name_map: Callable[[str], str | None] | None = None) -> None:
        self.p = pseudonymizer
        self.roi_name_map = roi_name_map

    def deidentify(self, ds) -> DeidReport:
        from pydicom.dataset import Dataset
        from pydicom.sequence import Sequence

        report = DeidReport()
        patient_pseudonym = self.p.patient(patient_key_of(ds))
        self._walk(ds, report, patient_pseudonym)
        if hasattr(ds, "file_meta") and ds.file_meta is not None:
            self._walk(ds.file_meta, report, patient_pseudonym, is_meta=True)
        ds.PatientName = patient_pseudonym
        ds.PatientID = patient_pseudonym
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = DEID_METHOD
        code = Dataset()
        code.CodeValue = "113100"
        code.CodingSchemeDesignator = "DCM"
        code.CodeMeaning = "Basic Application Confidentiality Profile"
        ds.DeidentificationMethodCodeSequence = Sequence([code])
        return report

    # -- traversal ----------------------------------------------------------------------
    def _walk(self, ds, report: DeidReport, patient_pseudonym: str, is_meta: bool = False) -> None:
        for tag in list(ds.keys()):
            elem = ds[tag]
            group, element = tag.group, tag.element
            if tag.is_private:
                del ds[tag]
                report.private_removed += 1
                continue
            if 0x5000 <= group <= 0x50FF or 0x6000 <= group <= 0x60FF:
                del ds[tag]
                report.removed += 1
                continue
            keyword = elem.keyword or ""
            vr = elem.VR
            action = BASIC_PROFILE.get((group, element))
            if action == "X":
                del ds[tag]
                report.removed += 1
                continue
            if action == "Z":
                elem.value = None if vr != "SQ" else []
                report.emptied += 1
                continue
            if action == "D":
                self._dummy(ds, elem, keyword, patient_pseudonym)
                report.replaced += 1
                continue
            if vr == "SQ":
                for item in elem.value or []:
                    self._walk(item, report, patient_pseudonym)
                continue
            if vr == "UI":
                self._remap_uid(elem, keyword, report)
                continue
            if vr == "PN":
                elem.value = None
                report.emptied += 1
                continue
            if vr in _DATE_VRS:
                if elem.value not in (None, "", b""):
                    elem.value = None
                    report.emptied += 1
                continue
            if vr in _TEXT_VRS:
                if keyword == "ROIName":
                    self._roi_name(ds, elem)
                    report.replaced += 1
                elif keyword == "BeamName":
                    elem.value = f"BEAM{ds.get('BeamNumber', '')}"
                    report.replaced += 1
                elif keyword == "TreatmentMachineName":
                    elem.value = self.p.short("machine", str(elem.value or ""), "M-")[:16]
                    report.replaced += 1
                elif keyword == "DeviceSerialNumber":
                    elem.value = self.p.short("device", str(elem.value or ""), "D-")[:16]
                    report.replaced += 1
                elif keyword not in SAFE_TEXT:
                    del ds[tag]
                    report.removed += 1
                continue

    def _dummy(self, ds, elem, keyword: str, patient_pseudonym: str) -> None:
        if keyword in ("PatientName", "PatientID"):
            elem.value = patient_pseudonym
        elif keyword == "StructureSetLabel":
            elem.value = "RTSTRUCT"
        elif keyword == "RTPlanLabel":
            elem.value = "PLAN"
        else:
            elem.value = "ANONYMIZED"

    def _remap_uid(self, elem, keyword: str, report: DeidReport) -> None:
        value = elem.value
        if value in (None, ""):
            return
        values = list(value) if elem.VM > 1 else [value]
        out = []
        for v in values:
            v = str(v)
            if _is_class_uid(keyword, v):
                out.append(v)
            else:
                out.append(self.p.uid(v))
                report.uids_remapped += 1
        elem.value = out if elem.VM > 1 else out[0]

    def _roi_name(self, ds, elem) -> None:
        original = str(elem.value or "")
        mapped = self.roi_name_map(original) if self.roi_name_map else None
        elem.value = mapped or f"ROI_{ds.get('ROINumber', '')}"
