"""Round trips of the prediction exports (ml.contour_dose.export) through the repo's own readers.

A synthetic H&N study (ml.data.synthetic) gives the CT, the reference masks (its RTSTRUCT
rasterised onto the canonical CT, as the preprocess step does) and a dose (its RTDOSE resampled
onto the CT). The dose is resampled to a coarser 3.906 x 3.906 x 2.5 mm "model grid" to stand in
for a prediction; RT Dose + RT Structure Set exports are read back with ``read_dose`` and
``rasterize_rtstruct`` onto the same CT.

Masks must come back *identical* (not just Dice >= 0.99): the exporter's marching-squares
polygons at level 0.5 pass through midpoints between inside and outside voxel centres, so the
ingest's centre-inside / even-odd rasteriser recovers every voxel exactly (module docstring of
ml.contour_dose.export). The dose must match the model-grid dose resampled to the CT within 1 %
of its maximum (the brief); in fact only the 1e-6 Gy quantisation separates them, which is
checked too (1e-5 of the maximum).

The CT is exported both as generated (head first supine, IOP [1,0,0,0,1,0]) and rewritten feet
first (IOP [-1,0,0,0,1,0]: columns run to the patient's right and the slice normal points
inferior), with the files passed in reversed order, to exercise the stored-vs-canonical
mapping.
"""

from __future__ import annotations

import datetime as _dt
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest

from ml.contour_dose.export import (
    DISCLAIMER,
    export_rtdose,
    export_rtstruct,
    export_study,
    label_map,
    mask_slice_polygons,
)
from ml.data.dicom.rtdose import read_dose
from ml.data.dicom.rtstruct import rasterize_rtstruct
from ml.data.dicom.series import load_series_volume
from ml.data.dicom.writers import dose_grid_scaling_for, quantise_dose
from ml.data.synthetic import generate_hn_study
from ml.data.volume import Volume, read_nifti, resample_to, to_canonical

MODEL_SPACING = (3.906, 3.906, 2.5)
WHEN = _dt.datetime(2024, 5, 6, 7, 8, 9)


@dataclass
class Case:
    orientation: str
    ct_files: list[Path]  # as passed to the exporters (reversed order)
    ct: Volume  # canonical CT
    masks: dict[str, np.ndarray]  # from the study's RTSTRUCT, on ct
    model_dose: Volume  # on the model grid
    expected_dose: Volume  # model_dose resampled to ct (linear, 0 outside)
    headers: dict[str, pydicom.Dataset]  # CT SOPInstanceUID -> header


def _feet_first(src: list[Path], dst: Path) -> list[Path]:
    """The same CT (same world geometry, SOP UIDs and voxels) stored feet first."""
    dst.mkdir(parents=True, exist_ok=True)
    out = []
    for p in src:
        ds = pydicom.dcmread(p)
        arr = ds.pixel_array[:, ::-1]
        cols, ps = int(ds.Columns), float(ds.PixelSpacing[1])
        ipp = [float(v) for v in ds.ImagePositionPatient]
        ds.ImagePositionPatient = [
            f"{ipp[0] + (cols - 1) * ps:.4f}",
            str(ds.ImagePositionPatient[1]),
            str(ds.ImagePositionPatient[2]),
        ]
        ds.ImageOrientationPatient = ["-1", "0", "0", "0", "1", "0"]
        ds.PatientPosition = "FFS"
        ds.PixelData = np.ascontiguousarray(arr).astype("<i2").tobytes()
        q = dst / p.name
        ds.save_as(q, enforce_file_format=True)
        out.append(q)
    return out


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory):
    return generate_hn_study(
        tmp_path_factory.mktemp("export_study"),
        seed=3,
        matrix=96,
        pixel_spacing_mm=2.5,
        n_slices=32,
        slice_thickness_mm=3.0,
    )


@pytest.fixture(scope="module", params=["HFS", "FFS"])
def case(request, study, tmp_path_factory: pytest.TempPathFactory) -> Case:
    files = list(study.ct_files)
    if request.param == "FFS":
        files = _feet_first(files, tmp_path_factory.mktemp("ffs_ct"))
    # the preprocess step's recipe (ml.data.preprocess._dicom)
    ct = to_canonical(load_series_volume(files))
    if request.param == "FFS":  # really stored differently, but the same canonical CT
        assert load_series_volume(files).direction != ct.direction
        hfs = to_canonical(load_series_volume(study.ct_files))
        assert hfs.same_grid(ct, atol=1e-4) and np.array_equal(hfs.array, ct.array)
    masks = rasterize_rtstruct(pydicom.dcmread(study.rtstruct_file), ct)
    assert set(masks) == set(study.roi_names)
    rd = pydicom.dcmread(study.rtdose_file)
    dose = resample_to(
        to_canonical(read_dose(rd, study.rtdose_file)), ct, interpolation="linear", default_value=0.0, dtype=np.float32
    )
    # a coarser "model grid" covering the CT
    extent = np.asarray(ct.shape_xyz) * np.asarray(ct.spacing)
    shape_xyz = np.ceil(extent / np.asarray(MODEL_SPACING)).astype(int)
    grid = Volume(np.zeros(tuple(shape_xyz[::-1]), np.uint8), MODEL_SPACING, ct.origin)
    model = resample_to(dose, grid, interpolation="linear", default_value=0.0, dtype=np.float32)
    expected = resample_to(model, ct, interpolation="linear", default_value=0.0, dtype=np.float32)
    assert float(expected.array.max()) > 50.0
    headers = {str(h.SOPInstanceUID): h for h in (pydicom.dcmread(p, stop_before_pixels=True) for p in files)}
    return Case(request.param, files[::-1], ct, masks, model, expected, headers)


def _dose_on_ct(path: Path, ct: Volume) -> np.ndarray:
    ds = pydicom.dcmread(path)
    return resample_to(
        to_canonical(read_dose(ds, path)), ct, interpolation="linear", default_value=0.0, dtype=np.float32
    ).array


def _some_ct(case: Case) -> pydicom.Dataset:
    return next(iter(case.headers.values()))


# -- RT Dose ---------------------------------------------------------------------------------
def test_rtdose_roundtrip(case: Case, tmp_path: Path) -> None:
    path = export_rtdose(case.model_dose, case.ct_files, tmp_path / "RD.dcm", when=WHEN)
    got = _dose_on_ct(path, case.ct)
    exp = case.expected_dose.array
    dmax = float(exp.max())
    err = float(np.abs(got - exp).max())
    assert err <= 0.01 * dmax  # the brief's tolerance
    assert err <= 1e-5 * dmax  # what is actually lost: the 1e-6 Gy quantisation

    ds = pydicom.dcmread(path)
    ct = _some_ct(case)
    assert ds.SOPClassUID == pydicom.uid.RTDoseStorage and ds.Modality == "RTDOSE"
    for tag in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "StudyInstanceUID",
        "StudyID",
        "AccessionNumber",
        "FrameOfReferenceUID",
    ):
        assert ds[tag].value == ct[tag].value, tag
    assert ds.SeriesInstanceUID != ct.SeriesInstanceUID and ds.SOPInstanceUID not in case.headers
    assert (ds.DoseUnits, ds.DoseType, ds.DoseSummationType) == ("GY", "PHYSICAL", "PLAN")
    assert "ReferencedRTPlanSequence" not in ds
    assert ds.Manufacturer == "psqa_pipelines" and ds.SoftwareVersions == "psqa_pipelines"
    assert "NOT FOR CLINICAL USE" in ds.ContentDescription.upper()
    assert "not for clinical use" in ds.SeriesDescription.lower()
    # the CT grid as stored: in-plane geometry of every slice, one frame per CT image
    assert (ds.Rows, ds.Columns) == (ct.Rows, ct.Columns)
    assert list(ds.ImageOrientationPatient) == list(ct.ImageOrientationPatient)
    assert list(ds.PixelSpacing) == list(ct.PixelSpacing)
    iop = np.asarray(ds.ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    frames = np.asarray(ds.ImagePositionPatient, float) + np.outer(np.asarray(ds.GridFrameOffsetVector, float), normal)
    ct_ipp = sorted(
        (np.asarray(h.ImagePositionPatient, float) for h in case.headers.values()), key=lambda v: float(v @ normal)
    )
    assert int(ds.NumberOfFrames) == len(case.headers) and float(ds.GridFrameOffsetVector[0]) == 0.0
    np.testing.assert_allclose(frames, np.asarray(ct_ipp), atol=1e-3)


def test_rtdose_cropped_uint16(case: Case, tmp_path: Path) -> None:
    path = export_rtdose(
        case.model_dose,
        case.ct_files,
        tmp_path / "RD16.dcm",
        bits=16,
        crop_to_dose=True,
        model_version="ctan-seed002",
        referenced_plan_uid="1.2.3.4",
        description="CTAN seed 002",
    )
    ds = pydicom.dcmread(path)
    assert ds.BitsAllocated == 16 and ds.Rows * ds.Columns * int(ds.NumberOfFrames) < 96 * 96 * 32
    assert list(ds.SoftwareVersions) == ["psqa_pipelines", "ctan-seed002"]
    assert ds.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID == "1.2.3.4"
    assert ds.ContentDescription.startswith(DISCLAIMER) and "CTAN seed 002" in ds.ContentDescription
    got = _dose_on_ct(path, case.ct)
    exp = case.expected_dose.array
    # uint16: half a DoseGridScaling step (max / 65535) of rounding, and nothing outside the crop
    assert float(np.abs(got - exp).max()) <= 0.5 * float(ds.DoseGridScaling) + 1e-4


# -- RT Structure Set ------------------------------------------------------------------------
def test_rtstruct_roundtrip(case: Case, tmp_path: Path) -> None:
    res = export_rtstruct(case.masks, case.ct, case.ct_files, tmp_path / "RS.dcm", when=WHEN)
    assert res.rois == list(case.masks) and res.skipped == {}
    ds = pydicom.dcmread(res.path)
    back = rasterize_rtstruct(ds, case.ct)
    assert set(back) == set(case.masks)
    for name, mask in case.masks.items():
        assert mask.any()
        assert np.array_equal(back[name], mask), (name, int((back[name] ^ mask).sum()))

    ct = _some_ct(case)
    assert ds.SOPClassUID == pydicom.uid.RTStructureSetStorage and ds.Modality == "RTSTRUCT"
    assert ds.PatientID == ct.PatientID and ds.StudyInstanceUID == ct.StudyInstanceUID
    assert ds.SeriesInstanceUID != ct.SeriesInstanceUID
    for_ref = ds.ReferencedFrameOfReferenceSequence[0]
    assert for_ref.FrameOfReferenceUID == ct.FrameOfReferenceUID
    study_ref = for_ref.RTReferencedStudySequence[0]
    assert study_ref.ReferencedSOPInstanceUID == ct.StudyInstanceUID
    series_ref = study_ref.RTReferencedSeriesSequence[0]
    assert series_ref.SeriesInstanceUID == ct.SeriesInstanceUID
    assert {r.ReferencedSOPInstanceUID for r in series_ref.ContourImageSequence} == set(case.headers)
    assert all(r.ReferencedSOPClassUID == pydicom.uid.CTImageStorage for r in series_ref.ContourImageSequence)
    assert [r.ROIName for r in ds.StructureSetROISequence] == list(case.masks)
    assert all(r.ReferencedFrameOfReferenceUID == ct.FrameOfReferenceUID for r in ds.StructureSetROISequence)
    assert all(o.RTROIInterpretedType == "ORGAN" for o in ds.RTROIObservationsSequence)
    n = 0
    for rc in ds.ROIContourSequence:
        assert len(rc.ROIDisplayColor) == 3
        for c in rc.ContourSequence:
            assert c.ContourGeometricType == "CLOSED_PLANAR"
            pts = np.asarray(c.ContourData, float).reshape(-1, 3)
            assert len(pts) == c.NumberOfContourPoints >= 3
            img = case.headers[c.ContourImageSequence[0].ReferencedSOPInstanceUID]
            assert np.all(pts[:, 2] == float(img.ImagePositionPatient[2]))  # on the referenced image plane
            n += 1
    assert n == sum(res.n_contours.values()) > 0


def test_hole_and_island_roundtrip(case: Case, tmp_path: Path) -> None:
    nz, ny, nx = case.ct.array.shape
    ring = np.zeros((nz, ny, nx), bool)
    ring[10:14, 20:60, 30:70] = True
    ring[10:14, 28:52, 38:62] = False  # the hole
    ring[11:13, 36:44, 46:54] = True  # an island in the hole
    res = export_rtstruct({"Ring": ring}, case.ct, case.ct_files, tmp_path / "RS.dcm")
    ds = pydicom.dcmread(res.path)
    assert res.n_contours["Ring"] == 2 * 2 + 2 * 3  # outer + hole, plus the island on 2 slices
    assert np.array_equal(rasterize_rtstruct(ds, case.ct)["Ring"], ring)


def test_random_masks_roundtrip_exactly(case: Case, tmp_path: Path) -> None:
    """Salt-and-pepper masks: single voxels, diagonal (saddle) neighbours, one-voxel holes."""
    rng = np.random.default_rng(7)
    nz, ny, nx = case.ct.array.shape
    masks = {}
    for name, density in (("Sparse", 0.15), ("Half", 0.5), ("Dense", 0.85)):
        m = np.zeros((nz, ny, nx), bool)
        m[3:6, 10:40, 50:90] = rng.random((3, 30, 40)) < density
        masks[name] = m
    edge = np.zeros((nz, ny, nx), bool)
    edge[0, :, :] = True  # the whole first slice, touching every border of the grid
    edge[-1, 0, :] = True  # one border row on the last slice
    masks["Edge"] = edge
    res = export_rtstruct(masks, case.ct, case.ct_files, tmp_path / "RS.dcm")
    back = rasterize_rtstruct(pydicom.dcmread(res.path), case.ct)
    for name, m in masks.items():
        assert np.array_equal(back[name], m), (name, int((back[name] ^ m).sum()))


def test_empty_mask_is_skipped(case: Case, tmp_path: Path) -> None:
    nz, ny, nx = case.ct.array.shape
    box = np.zeros((nz, ny, nx), bool)
    box[5:8, 40:50, 40:50] = True
    empty = np.zeros_like(box)
    res = export_rtstruct({"Box": box, "Empty": empty}, case.ct, case.ct_files, tmp_path / "RS.dcm")
    assert res.rois == ["Box"] and "empty mask" in res.skipped["Empty"]
    ds = pydicom.dcmread(res.path)
    assert [r.ROIName for r in ds.StructureSetROISequence] == ["Box"]
    assert set(rasterize_rtstruct(ds, case.ct)) == {"Box"}

    kept = export_rtstruct(
        {"Box": box, "Empty": empty}, case.ct, case.ct_files, tmp_path / "RS_keep.dcm", keep_empty=True
    )
    ds = pydicom.dcmread(kept.path)
    assert kept.rois == ["Box", "Empty"] and kept.n_contours["Empty"] == 0
    assert "ContourSequence" not in ds.ROIContourSequence[1]
    assert set(rasterize_rtstruct(ds, case.ct)) == {"Box"}  # an ROI without contours rasterises to nothing

    with pytest.raises(ValueError, match="no non-empty mask"):
        export_rtstruct({"Empty": empty}, case.ct, case.ct_files, tmp_path / "RS_none.dcm")
    assert not (tmp_path / "RS_none.dcm").exists()


def test_mask_grid_must_match_ct_slices(case: Case, tmp_path: Path) -> None:
    ct = case.ct
    shifted = Volume(np.zeros(ct.array.shape, np.int16), ct.spacing, (ct.origin[0], ct.origin[1], ct.origin[2] + 1.2))
    m = np.zeros(ct.array.shape, bool)
    m[4, 10:20, 10:20] = True
    with pytest.raises(ValueError, match="CT's slice positions"):
        export_rtstruct({"Box": m}, shifted, case.ct_files, tmp_path / "RS.dcm")
    with pytest.raises(ValueError, match="shape"):
        export_rtstruct({"Box": m[:-1]}, ct, case.ct_files, tmp_path / "RS.dcm")


# -- validity, study export, full ingest --------------------------------------------------------
_REQUIRED = {  # a basic subset of the Type 1/2 attributes of the two IODs
    "common": (
        "SOPClassUID",
        "SOPInstanceUID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "Modality",
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyDate",
        "StudyTime",
        "ReferringPhysicianName",
        "StudyID",
        "AccessionNumber",
        "SeriesNumber",
        "Manufacturer",
        "OperatorsName",
    ),
    "RTDOSE": (
        "FrameOfReferenceUID",
        "PositionReferenceIndicator",
        "ImagePositionPatient",
        "ImageOrientationPatient",
        "PixelSpacing",
        "SliceThickness",
        "SamplesPerPixel",
        "PhotometricInterpretation",
        "Rows",
        "Columns",
        "BitsAllocated",
        "BitsStored",
        "HighBit",
        "PixelRepresentation",
        "NumberOfFrames",
        "FrameIncrementPointer",
        "GridFrameOffsetVector",
        "DoseUnits",
        "DoseType",
        "DoseSummationType",
        "DoseGridScaling",
        "PixelData",
    ),
    "RTSTRUCT": (
        "StructureSetLabel",
        "StructureSetDate",
        "StructureSetTime",
        "ReferencedFrameOfReferenceSequence",
        "StructureSetROISequence",
        "ROIContourSequence",
        "RTROIObservationsSequence",
    ),
}


def test_exports_are_valid_dicom(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pydicom import config

    monkeypatch.setattr(config.settings, "reading_validation_mode", config.RAISE)
    monkeypatch.setattr(config.settings, "writing_validation_mode", config.RAISE)
    rd = export_rtdose(case.model_dose, case.ct_files, tmp_path / "RD.dcm")
    rs = export_rtstruct(case.masks, case.ct, case.ct_files, tmp_path / "RS.dcm").path
    for path, modality in ((rd, "RTDOSE"), (rs, "RTSTRUCT")):
        ds = pydicom.dcmread(path)  # no force: a Part 10 file with preamble and meta
        for elem in ds.iterall():  # decode (and validate) every value
            _ = elem.value
        assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.Modality == modality
        for tag in _REQUIRED["common"] + _REQUIRED[modality]:
            assert tag in ds, (modality, tag)
        for uid in (ds.SOPInstanceUID, ds.SeriesInstanceUID):
            assert pydicom.uid.UID(uid).is_valid
        assert not [e for e in ds if e.tag.is_private]
    assert pydicom.dcmread(rd).pixel_array.shape == (len(case.headers), 96, 96)


def test_export_study(case: Case, tmp_path: Path) -> None:
    masks = {n: case.masks[n] for n in ("BODY", "PTV70", "Parotid_L")}
    masks["Nothing"] = np.zeros_like(masks["BODY"])
    paths = export_study(
        tmp_path / "out", case.ct, case.ct_files, dose=case.model_dose, masks=masks, model_version="v1", when=WHEN
    )
    assert set(paths) == {"rtdose", "rtstruct", "dose_nifti", "labels_nifti", "labels_json"}
    assert all(p.is_file() and p.parent == tmp_path / "out" for p in paths.values())
    rd, rs = pydicom.dcmread(paths["rtdose"]), pydicom.dcmread(paths["rtstruct"])
    assert rd.ReferencedStructureSetSequence[0].ReferencedSOPInstanceUID == rs.SOPInstanceUID
    assert rd.ContentDate == rs.StructureSetDate == "20240506"
    nii = read_nifti(paths["dose_nifti"])
    assert nii.same_grid(case.ct)
    np.testing.assert_allclose(nii.array, case.expected_dose.array, atol=1e-6)
    np.testing.assert_allclose(_dose_on_ct(paths["rtdose"], case.ct), nii.array, atol=1e-5)
    labels = read_nifti(paths["labels_nifti"])
    meta = json.loads(paths["labels_json"].read_text())
    assert meta["labels"] == {"1": "BODY", "2": "PTV70", "3": "Parotid_L", "4": "Nothing"}
    assert "Nothing" in meta["rtstruct_skipped"]
    lab = labels.array
    assert lab.dtype == np.uint8 and labels.same_grid(case.ct)
    names = ["BODY", "PTV70", "Parotid_L"]
    assert np.array_equal(lab > 0, np.logical_or.reduce([masks[n] for n in names])) and not np.any(lab == 4)
    for i, n in enumerate(names, start=1):  # where ROIs overlap, the smallest one's label shows
        smaller = [o for o in names if masks[o].sum() < masks[n].sum()]
        visible = masks[n] & ~np.logical_or.reduce([masks[o] for o in smaller]) if smaller else masks[n]
        assert visible.any() and np.all(lab[visible] == i), n


def test_full_ingest_roundtrip(case: Case, tmp_path: Path) -> None:
    """CT + exported RTDOSE/RTSTRUCT dropped in a landing folder -> ingest (de-identification) ->
    preprocess: the lake's mask and dose volumes are the exported ones."""
    from ml.data.dicom.deid import Pseudonymizer
    from ml.data.inbox import scan_landing_folder
    from ml.data.ingest import ingest_study
    from ml.data.preprocess import preprocess_study
    from ml.data.quarantine import Quarantine
    from ml.data.roi_names import canonical_roi_name

    land = tmp_path / "landing"
    land.mkdir()
    for p in case.ct_files:
        shutil.copy(p, land / p.name)
    export_rtdose(case.model_dose, case.ct_files, land / "RD_pred.dcm")
    export_rtstruct(case.masks, case.ct, case.ct_files, land / "RS_pred.dcm")
    p = Pseudonymizer("export-test-secret")
    scan = scan_landing_folder(land, p, use_cache=False)
    assert len(scan.studies) == 1 and not scan.unattributed
    ((key, group),) = scan.studies.items()
    lake = tmp_path / "lake"
    res = ingest_study(group, lake, Quarantine(tmp_path / "quarantine"), p, move_bad=False)
    assert res.quarantined == [] and sorted(res.series["modality"]) == ["CT", "RTDOSE", "RTSTRUCT"]
    man = preprocess_study(key, "dicom", res.files, res.series, lake).manifest
    rows = {(r.kind, r.name): lake / r.path for r in man.itertuples()}
    ct = read_nifti(rows[("ct", "CT")])
    assert ct.same_grid(case.ct)
    for name, mask in case.masks.items():
        got = read_nifti(rows[("mask", canonical_roi_name(name))]).array.astype(bool)
        assert np.array_equal(got, mask), name
    dose = read_nifti(rows[("dose", "PLAN")]).array
    assert float(np.abs(dose - case.expected_dose.array).max()) <= 1e-5 * float(case.expected_dose.array.max())


# -- helpers -------------------------------------------------------------------------------------
def test_mask_slice_polygons_basic() -> None:
    m = np.zeros((5, 6), bool)
    assert mask_slice_polygons(m) == []
    m[2, 3] = True  # one voxel: a diamond through the 4 edge midpoints
    (poly,) = mask_slice_polygons(m)
    assert sorted(map(tuple, poly.tolist())) == [(2.5, 2.0), (3.0, 1.5), (3.0, 2.5), (3.5, 2.0)]
    m[1:4, 1:5] = True  # a 3 x 4 rectangle: collinear vertices removed -> an octagon
    (poly,) = mask_slice_polygons(m)
    assert len(poly) == 8


def test_label_map_paints_small_structures_on_top() -> None:
    big = np.zeros((1, 4, 4), bool)
    big[0, :, :] = True
    small = np.zeros_like(big)
    small[0, 1, 1] = True
    lab, names = label_map({"small": small, "big": big})
    assert names == {1: "small", 2: "big"} and lab[0, 1, 1] == 1 and (lab == 2).sum() == 15


def test_dose_quantisation_helpers() -> None:
    assert dose_grid_scaling_for(70.0, 32) == "1e-06"
    s = dose_grid_scaling_for(70.0, 16)
    assert 70.0 / 65535 <= float(s) <= 70.0 / 65535 * 1.001
    stored, gy = quantise_dose(np.array([-1.0, np.nan, 0.0, 35.0, 70.0]), float(s), bits=16)
    assert stored.dtype == np.uint16 and stored[:3].tolist() == [0, 0, 0] and stored[-1] <= 65535
    assert abs(gy[-1] - 70.0) <= float(s) / 2
    with pytest.raises(ValueError, match="does not fit"):
        quantise_dose(np.array([70.0]), 1e-6, bits=16)
    s = dose_grid_scaling_for(1e4, 32)  # > 4294 Gy: the 1e-6 default no longer fits
    assert quantise_dose(np.array([1e4]), float(s))[0][0] <= 2**32 - 1


def test_export_module_is_light() -> None:
    code = (
        "import sys, ml.contour_dose.export\n"
        "bad = [m for m in ('dagster', 'mlflow', 'pydicom', 'SimpleITK', 'contourpy', 'nibabel') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
