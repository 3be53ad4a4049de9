"""Unit tests of ml.data.dicom.deid (PS3.15 Basic Profile with keyed pseudonyms) and ROI names."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest

from ml.data.dicom.deid import (
    DEV_SECRET,
    DicomDeidentifier,
    Pseudonymizer,
    needs_pixel_cleaning,
    patient_key_of,
    resolve_secret,
)
from ml.data.dicom.headers import dataset_to_bytes
from ml.data.phi import PATIENT_ID, REMAPPED_UID, dicom_phi_violations
from ml.data.roi_names import canonical_roi_name, swap_left_right
from ml.data.synthetic import StudyTruth, generate_hn_study

SMALL = dict(matrix=32, pixel_spacing_mm=12.0, n_slices=16, slice_thickness_mm=12.0)
CANONICAL_ROIS = ["Body", "PTV70", "PTV56", "Brainstem", "SpinalCord", "LeftParotid", "RightParotid", "Mandible"]


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> StudyTruth:
    return generate_hn_study(tmp_path_factory.mktemp("hn_deid"), seed=3, **SMALL)


def _all_files(study: StudyTruth) -> list[Path]:
    return [*study.ct_files, study.rtstruct_file, study.rtdose_file]


def _original_uids(path: Path) -> set[str]:
    """Every instance-level UID in the original file (UI elements that are not class UIDs)."""
    ds = pydicom.dcmread(path)
    uids = set()
    for elem in [*ds.file_meta.iterall(), *ds.iterall()]:
        if elem.VR == "UI" and elem.value and not (elem.keyword or "").endswith(("ClassUID", "TransferSyntaxUID")):
            values = elem.value if elem.VM > 1 else [elem.value]
            uids.update(str(v) for v in values if not str(v).startswith("1.2.840.10008."))
    return uids


def _deidentify(path: Path, secret: str = "s1") -> tuple[pydicom.Dataset, bytes]:
    ds = pydicom.dcmread(path)
    DicomDeidentifier(Pseudonymizer(secret), roi_name_map=canonical_roi_name).deidentify(ds)
    data = dataset_to_bytes(ds)
    return pydicom.dcmread(io.BytesIO(data)), data


@pytest.fixture(scope="module")
def deidentified(study) -> dict[Path, tuple[pydicom.Dataset, bytes]]:
    return {p: _deidentify(p) for p in _all_files(study)}


def test_every_file_is_clean(study, deidentified):
    phi = [s.lower().encode("latin-1") for s in study.phi.strings()]
    assert len(phi) > 15
    expected_pid = Pseudonymizer("s1").patient(f"id:{study.phi.patient_id}")
    assert PATIENT_ID.match(expected_pid)
    for path, (ds, data) in deidentified.items():
        low = data.lower()
        leaked = [s for s in phi if s in low]
        assert not leaked, (path.name, leaked)
        for uid in _original_uids(path):
            assert uid.encode() not in data, (path.name, uid)
        assert not any(e.tag.is_private for e in ds.iterall()), path.name
        assert not any(e.tag.is_private for e in ds.file_meta)
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.PatientID == expected_pid
        assert str(ds.PatientName) == expected_pid
        assert re.fullmatch(r"pt-[0-9a-f]{16}", ds.PatientID)
        assert ds.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
        for kw in (
            "PatientBirthDate",
            "StudyDate",
            "ContentTime",
            "AccessionNumber",
            "StudyID",
            "ReferringPhysicianName",
        ):
            assert not ds.get(kw), (path.name, kw)
        for kw in (
            "InstitutionName",
            "InstitutionAddress",
            "OtherPatientIDs",
            "OtherPatientIDsSequence",
            "PatientAddress",
            "PatientAge",
            "StudyDescription",
            "SeriesDescription",
            "OperatorsName",
        ):
            assert kw not in ds, (path.name, kw)
        uid_keywords = ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"]
        if ds.Modality != "RTSTRUCT":  # the structure set holds its frame in a sequence
            uid_keywords.append("FrameOfReferenceUID")
        for kw in uid_keywords:
            assert REMAPPED_UID.match(str(ds.get(kw))), (path.name, kw)
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        # what downstream steps need survives
        assert ds.Modality in ("CT", "RTSTRUCT", "RTDOSE")
        assert ds.SOPClassUID == pydicom.dcmread(path, stop_before_pixels=True).SOPClassUID
        assert ds.Manufacturer == "PSQA Synthetic Imaging"


def test_pixel_data_and_geometry_are_untouched(study, deidentified):
    for path in (study.ct_files[3], study.rtdose_file):
        ds, _ = deidentified[path]
        orig = pydicom.dcmread(path)
        assert ds.PixelData == orig.PixelData
        assert ds.ImagePositionPatient == orig.ImagePositionPatient
        assert ds.PixelSpacing == orig.PixelSpacing
    ds, _ = deidentified[study.rtdose_file]
    assert ds.DoseUnits == "GY" and float(ds.DoseGridScaling) == 1e-6
    assert list(ds.GridFrameOffsetVector) == list(pydicom.dcmread(study.rtdose_file).GridFrameOffsetVector)


def test_references_stay_consistent(study, deidentified):
    ct = [deidentified[p][0] for p in study.ct_files]
    rs = deidentified[study.rtstruct_file][0]
    rd = deidentified[study.rtdose_file][0]
    ct_uids = [d.SOPInstanceUID for d in ct]
    assert len(set(ct_uids)) == len(ct_uids)
    ref_series = rs.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert [i.ReferencedSOPInstanceUID for i in ref_series.ContourImageSequence] == ct_uids
    assert ref_series.SeriesInstanceUID == ct[0].SeriesInstanceUID
    # per-contour image references point at the CT slice of the contour's plane
    z_to_uid = {float(d.ImagePositionPatient[2]): d.SOPInstanceUID for d in ct}
    n_checked = 0
    for rc in rs.ROIContourSequence:
        for c in rc.ContourSequence:
            z = float(c.ContourData[2])
            assert c.ContourImageSequence[0].ReferencedSOPInstanceUID == z_to_uid[z]
            n_checked += 1
    assert n_checked > 10
    study_ref = rs.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0]
    assert study_ref.ReferencedSOPClassUID == "1.2.840.10008.3.1.2.3.1"  # class UID kept
    assert study_ref.ReferencedSOPInstanceUID == ct[0].StudyInstanceUID
    for_uid = ct[0].FrameOfReferenceUID
    assert {d.FrameOfReferenceUID for d in ct} == {for_uid}
    assert rs.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID == for_uid
    assert {r.ReferencedFrameOfReferenceUID for r in rs.StructureSetROISequence} == {for_uid}
    assert rd.FrameOfReferenceUID == for_uid
    assert rd.ReferencedStructureSetSequence[0].ReferencedSOPInstanceUID == rs.SOPInstanceUID
    assert {d.StudyInstanceUID for d in [*ct, rs, rd]} == {ct[0].StudyInstanceUID}
    assert len({ct[0].SeriesInstanceUID, rs.SeriesInstanceUID, rd.SeriesInstanceUID}) == 3


def test_roi_names_are_canonical(deidentified, study):
    rs = deidentified[study.rtstruct_file][0]
    assert [str(r.ROIName) for r in rs.StructureSetROISequence] == CANONICAL_ROIS
    assert rs.StructureSetLabel == "RTSTRUCT"
    assert "StructureSetName" not in rs
    assert {o.RTROIInterpretedType for o in rs.RTROIObservationsSequence} == {"EXTERNAL", "PTV", "ORGAN"}


def test_unknown_roi_names_become_roi_number(study):
    ds = pydicom.dcmread(study.rtstruct_file)
    ds.StructureSetROISequence[2].ROIName = "Dr Quaxzor boost"
    ds.StructureSetROISequence[3].ROIName = "GTV"
    DicomDeidentifier(Pseudonymizer("s1"), roi_name_map=canonical_roi_name).deidentify(ds)
    names = [str(r.ROIName) for r in ds.StructureSetROISequence]
    assert names[2] == "ROI_3" and names[3] == "ROI_4"
    assert b"quaxzor" not in dataset_to_bytes(ds).lower()
    ds = pydicom.dcmread(study.rtstruct_file)
    DicomDeidentifier(Pseudonymizer("s1")).deidentify(ds)  # no map: every name is replaced
    assert [str(r.ROIName) for r in ds.StructureSetROISequence] == [f"ROI_{i}" for i in range(1, 9)]


def test_phi_checker_accepts_written_files(deidentified, tmp_path):
    for n, (_, data) in enumerate(deidentified.values()):
        p = tmp_path / f"{n:03d}.dcm"
        p.write_bytes(data)
        assert dicom_phi_violations(p) == []


def test_phi_checker_flags_original_files(study):
    for path in (study.ct_files[0], study.rtstruct_file, study.rtdose_file):
        problems = dicom_phi_violations(path)
        assert "PatientIdentityRemoved is not YES" in problems
        assert "PatientID is not a pseudonym" in problems
        assert any(p.startswith("private element") for p in problems)
        assert any("UID not remapped" in p for p in problems)
        assert any("date/time" in p for p in problems)


def test_pseudonyms_are_keyed_and_deterministic(study):
    path = study.ct_files[2]
    a, data_a = _deidentify(path, "s1")
    b, data_b = _deidentify(path, "s1")
    c, _ = _deidentify(path, "s2")
    assert data_a == data_b  # same secret: byte-identical output
    for kw in ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
        assert a.get(kw) == b.get(kw), kw
        assert a.get(kw) != c.get(kw), kw
    assert PATIENT_ID.match(c.PatientID)
    # the same UID maps to the same pseudonym in every file of the study
    rs, _ = _deidentify(study.rtstruct_file, "s1")
    assert rs.StudyInstanceUID == a.StudyInstanceUID


def test_pseudonymizer_shapes():
    p = Pseudonymizer("s1")
    assert p.patient("id:X") == p.patient("id:X") != p.patient("id:Y")
    assert re.fullmatch(r"pt-[0-9a-f]{16}", p.patient("id:X"))
    assert re.fullmatch(r"dcm-[0-9a-f]{16}", p.study("dcm", "k"))
    uid = p.uid("1.2.3.4")
    assert REMAPPED_UID.match(uid) and len(uid) <= 64
    assert p.uid("1.2.3.4") != Pseudonymizer("s2").uid("1.2.3.4")
    assert not p.is_dev_secret


def test_resolve_secret(monkeypatch):
    assert resolve_secret() == (DEV_SECRET, True)
    assert resolve_secret("abc") == ("abc", False)
    assert resolve_secret(DEV_SECRET) == (DEV_SECRET, True)
    # ml takes the secret as an argument only: the environment is the pipeline's business
    monkeypatch.setenv("PSQA_DEID_SECRET", "from-env")
    assert resolve_secret() == (DEV_SECRET, True)
    assert Pseudonymizer().is_dev_secret
    assert Pseudonymizer().patient("id:1") == Pseudonymizer(DEV_SECRET).patient("id:1")
    assert Pseudonymizer().patient("id:1") != Pseudonymizer("from-env").patient("id:1")


def test_patient_key_fallbacks(study):
    ds = pydicom.dcmread(study.ct_files[0], stop_before_pixels=True)
    assert patient_key_of(ds) == f"id:{study.phi.patient_id}"
    ds.PatientID = ""
    assert patient_key_of(ds) == f"name:{study.phi.patient_name}|{study.phi.birth_date}"
    ds.PatientName = ""
    ds.PatientBirthDate = ""
    assert patient_key_of(ds) == f"study:{study.study_instance_uid}"


def test_burned_in_annotation_flag(study):
    ds = pydicom.dcmread(study.ct_files[0], stop_before_pixels=True)
    assert not needs_pixel_cleaning(ds)
    ds.BurnedInAnnotation = "YES"
    assert needs_pixel_cleaning(ds)


def test_nested_person_names_dates_and_private_tags_are_removed(study):
    from pydicom.dataset import Dataset

    ds = pydicom.dcmread(study.ct_files[0])
    item = Dataset()
    item.ReferencedSOPInstanceUID = study.ct_sop_uids[1]
    item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    item.add_new(0x0040A123, "PN", "Nested^Personname")
    item.add_new(0x00080020, "DA", "20200101")
    item.add_new(0x00111010, "LO", "private nested")
    item.add_new(0x00181030, "LO", "Protocol Quaxzorvath")
    item.ContentCreatorName = "Creator^Nestedname"  # a PN the profile table does not list
    ds.SourceImageSequence = [item]
    ds.ContentCreatorName = "Creator^Toplevelname"
    ds.add_new(0x60003000, "OW", b"\x00\x01" * 8)  # overlay data
    # private elements of non-text VRs (a text-VR rule alone would not remove them)
    block = ds.private_block(0x0019, "ACME_SCANNER", create=True)
    block.add_new(0x10, "UL", 123456)
    block.add_new(0x11, "OB", b"Quaxzorvath-blob")
    block.add_new(0x12, "DS", "42.5")
    inner = Dataset()
    inner.add_new(0x00080100, "SH", "X")
    block.add_new(0x13, "SQ", [inner])
    ds.file_meta.SourceApplicationEntityTitle = "HOSPXAETITLE"
    DicomDeidentifier(Pseudonymizer("s1")).deidentify(ds)
    data = dataset_to_bytes(ds).lower()
    for s in (
        b"personname",
        b"20200101",
        b"private nested",
        b"quaxzorvath",
        study.ct_sop_uids[1].encode(),
        b"nestedname",
        b"toplevelname",
        b"acme_scanner",
        b"hospxaetitle",
    ):
        assert s not in data, s
    assert not any(e.tag.is_private for e in ds.iterall())
    assert "SourceApplicationEntityTitle" not in ds.file_meta
    assert not ds.get("ContentCreatorName")
    nested = ds.SourceImageSequence[0]
    assert nested.ReferencedSOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    assert REMAPPED_UID.match(nested.ReferencedSOPInstanceUID)
    assert 0x60003000 not in ds


# -- canonical ROI names ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, expected",
    [
        ("Parotid_L", "LeftParotid"),
        ("Lt Parotid", "LeftParotid"),
        ("L Parotid", "LeftParotid"),
        ("Parotid Left", "LeftParotid"),
        ("LEFT_PAROTID", "LeftParotid"),
        ("R_Parotid", "RightParotid"),
        ("Parotid_R", "RightParotid"),
        ("Rt-Parotid", "RightParotid"),
        ("RightParotid", "RightParotid"),
        ("BrainStem", "Brainstem"),
        ("Brain Stem", "Brainstem"),
        ("PTV_7000", "PTV70"),
        ("PTV70", "PTV70"),
        ("ptv 56", "PTV56"),
        ("PTV_56Gy", "PTV56"),
        ("PTV 63", "PTV63"),
        ("PTV_6300", "PTV63"),
        ("PTV66", "PTV66"),
        ("External", "Body"),
        ("BODY", "Body"),
        ("Skin", "Body"),
        ("SpinalCord", "SpinalCord"),
        ("Spinal_Cord", "SpinalCord"),
        ("Cord", "SpinalCord"),
        ("Mandible", "Mandible"),
        ("Esophagus", "Esophagus"),
        ("Larynx", "Larynx"),
        ("GTV", None),
        ("CTV_70", None),
        ("Parotids", None),
        ("Dr Smith notes", None),
        ("", None),
    ],
)
def test_canonical_roi_name(name, expected):
    assert canonical_roi_name(name) == expected


def test_swap_left_right():
    assert swap_left_right("LeftParotid") == "RightParotid"
    assert swap_left_right("RightParotid") == "LeftParotid"
    assert swap_left_right("PTV70") == "PTV70"


def test_study_masks_are_not_trivial(study):
    # guards the fixture: the small study still has every ROI, so the name checks above mean something
    assert all(np.any(study.masks[n]) for n in study.roi_names)


def test_device_serial_number_becomes_a_keyed_pseudonym(study):
    """The QA device's serial (a PSQA plan feature) keeps one identity per device, never its value."""
    out = []
    for serial in ("SN-4711-ACME", "SN-4711-ACME", "SN-0815-ACME"):
        ds = pydicom.dcmread(study.ct_files[0])
        ds.DeviceSerialNumber = serial
        DicomDeidentifier(Pseudonymizer("s1")).deidentify(ds)
        assert b"4711" not in dataset_to_bytes(ds) and b"0815" not in dataset_to_bytes(ds)
        out.append(ds.DeviceSerialNumber)
    assert out[0] == out[1] != out[2] and out[0].startswith("D-")


def test_phi_checker_skips_numbers_but_not_names_in_any_encoding(deidentified, tmp_path):
    """The checker leaves numeric and binary elements unconverted (speed), yet still finds a name
    nested in a sequence, a name written with VR UN (pydicom converts it to PN), a private
    element whatever its VR, and behaves the same on implicit-VR files."""
    from pydicom.dataelem import DataElement
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ImplicitVRLittleEndian

    _, data = next(iter(deidentified.values()))
    for implicit in (False, True):
        p = tmp_path / "clean.dcm"
        p.write_bytes(data)
        ds = pydicom.dcmread(p)
        item = Dataset()
        item.add(DataElement(0x00081070, "PN", "Quaxzor^Operator"))  # OperatorsName, nested
        item.add(DataElement(0x00181152, "IS", "42"))  # Exposure: a number, fine
        ds.add(DataElement(0x00081110, "SQ", Sequence([item])))  # ReferencedStudySequence
        ds.add(DataElement(0x00091010, "DS", "1.5"))  # private, numeric: still reported
        ds.add(DataElement(0x00081050, "UN", b"Quaxzor^Physician"))  # PerformingPhysicianName as UN
        if implicit:
            ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
            ds.remove_private_tags()
            ds.add_new(0x00091010, "DS", "1.5")
        out = tmp_path / f"dirty{int(implicit)}.dcm"
        ds.save_as(out, enforce_file_format=True)
        problems = dicom_phi_violations(out)
        assert "person name in OperatorsName" in problems, problems
        assert "person name in PerformingPhysicianName" in problems, problems
        assert "private element (0009,1010)" in problems, problems
        assert not any("Exposure" in q for q in problems)
