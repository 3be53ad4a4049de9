"""Tests of the synthetic head-and-neck DICOM generator (ml.data.synthetic)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from ml.data.dicom.writers import CT_IMAGE_STORAGE, RT_DOSE_STORAGE, RT_STRUCT_STORAGE
from ml.data.synthetic import (
    ROI_NAMES,
    PlantedPHI,
    StudyTruth,
    generate_hn_cohort,
    generate_hn_study,
    make_phi,
)

RX = 70.0


# -- fixtures ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> StudyTruth:
    return generate_hn_study(tmp_path_factory.mktemp("hn"), seed=0)


@pytest.fixture(scope="module")
def ct_datasets(study: StudyTruth) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in study.ct_files]


@pytest.fixture(scope="module")
def rtstruct(study: StudyTruth) -> pydicom.Dataset:
    assert study.rtstruct_file is not None
    return pydicom.dcmread(study.rtstruct_file)


@pytest.fixture(scope="module")
def rtdose(study: StudyTruth) -> pydicom.Dataset:
    assert study.rtdose_file is not None
    return pydicom.dcmread(study.rtdose_file)


def _all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int((a & b).sum()) / s


def _ct_voxel_world(study: StudyTruth, mask: np.ndarray) -> np.ndarray:
    k, j, i = np.nonzero(mask)
    o, s = np.asarray(study.ct_origin), np.asarray(study.ct_spacing)
    return np.stack([i, j, k], axis=1) * s + o


def _dose_at(study: StudyTruth, xyz: np.ndarray) -> np.ndarray:
    """Nearest-neighbour dose at world points (all inside the dose grid)."""
    assert study.dose_gy is not None and study.dose_origin and study.dose_spacing
    idx = np.rint((xyz - np.asarray(study.dose_origin)) / np.asarray(study.dose_spacing)).astype(int)
    nz, ny, nx = study.dose_gy.shape
    assert (idx >= 0).all() and (idx < np.array([nx, ny, nz])).all()
    return study.dose_gy[idx[:, 2], idx[:, 1], idx[:, 0]]


# -- files and SOP classes -----------------------------------------------------------------
def test_files_exist_and_read_without_force(study: StudyTruth) -> None:
    files = _all_files(study.study_dir)
    assert len(study.ct_files) == 64
    assert len(files) == 64 + 1 + 1
    assert set(files) == {*study.ct_files, study.rtstruct_file, study.rtdose_file}
    assert {p.parent.name for p in study.ct_files} == {"CT"}
    assert study.rtstruct_file.parent.name == "RTSTRUCT" and study.rtstruct_file.name.startswith("RS.")
    assert study.rtdose_file.parent.name == "RTDOSE" and study.rtdose_file.name.startswith("RD.")
    expected = {"CT": CT_IMAGE_STORAGE, "RTSTRUCT": RT_STRUCT_STORAGE, "RTDOSE": RT_DOSE_STORAGE}
    for p in files:
        ds = pydicom.dcmread(p)  # no force=True: needs a proper preamble + file meta
        sop = expected[p.parent.name]
        assert ds.SOPClassUID == sop
        assert ds.file_meta.MediaStorageSOPClassUID == sop
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.Modality == p.parent.name
        assert ds.StudyInstanceUID == study.study_instance_uid


def test_ct_geometry(study: StudyTruth, ct_datasets: list[pydicom.Dataset]) -> None:
    zs = [float(ds.ImagePositionPatient[2]) for ds in ct_datasets]
    assert zs == sorted(zs)  # truth.ct_files is in slice (increasing z) order
    np.testing.assert_allclose(np.diff(zs), 3.0, atol=1e-6)
    assert len({ds.SOPInstanceUID for ds in ct_datasets}) == 64
    assert study.ct_sop_uids == [ds.SOPInstanceUID for ds in ct_datasets]
    assert sorted(int(ds.InstanceNumber) for ds in ct_datasets) == list(range(1, 65))
    first = ct_datasets[0]
    np.testing.assert_allclose([float(v) for v in first.ImagePositionPatient], study.ct_origin)
    for ds in ct_datasets:
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert [float(v) for v in ds.PixelSpacing] == [3.0, 3.0]
        assert float(ds.SliceThickness) == 3.0
        assert float(ds.SliceLocation) == float(ds.ImagePositionPatient[2])
        assert ds.FrameOfReferenceUID == study.frame_of_reference_uid
        assert ds.SeriesInstanceUID == study.ct_series_uid
        assert ds.PatientPosition == "HFS"
        assert (ds.Rows, ds.Columns) == (128, 128)
        assert ds.BitsAllocated == 16 and ds.PixelRepresentation == 1
        assert ds.PhotometricInterpretation == "MONOCHROME2"
    # image centred on 0 in x/y
    x0 = study.ct_origin[0]
    assert abs(x0 + (x0 + 127 * 3.0)) < 1e-6
    assert study.ct_spacing == (3.0, 3.0, 3.0)


def test_hu_roundtrip(study: StudyTruth, ct_datasets: list[pydicom.Dataset]) -> None:
    hu = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in ct_datasets])
    assert hu.shape == study.hu.shape == (64, 128, 128)
    assert np.abs(hu - study.hu).max() <= 0.5


def test_hu_anatomy_plausible(study: StudyTruth) -> None:
    hu, m = study.hu.astype(float), study.masks
    assert np.median(hu[~m["BODY"]]) < -950
    assert 800 < np.median(hu[m["Mandible"]]) < 1300
    assert 20 < np.median(hu[m["SpinalCord"]]) < 50
    parotid = np.median(hu[m["Parotid_L"] | m["Parotid_R"]])
    assert -20 < parotid < 25 and parotid < 40
    bone = (hu > 500) & m["BODY"]
    assert bone.sum() > 1000  # skull, mandible, vertebrae
    # the body cross-section shrinks from head to neck
    area = m["BODY"].sum(axis=(1, 2))
    assert area[10] < area[45]


def test_simpleitk_reads_series(study: StudyTruth) -> None:
    sitk = pytest.importorskip("SimpleITK")
    reader = sitk.ImageSeriesReader()
    names = reader.GetGDCMSeriesFileNames(str(study.ct_files[0].parent))
    assert len(names) == 64
    reader.SetFileNames(names)
    img = reader.Execute()
    np.testing.assert_allclose(img.GetOrigin(), study.ct_origin, atol=1e-4)
    np.testing.assert_allclose(img.GetSpacing(), study.ct_spacing, atol=1e-4)
    np.testing.assert_allclose(img.GetDirection(), np.eye(3).ravel(), atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), study.hu)


# -- RTSTRUCT --------------------------------------------------------------------------------
def test_rtstruct_references(study: StudyTruth, rtstruct: pydicom.Dataset) -> None:
    ct_uids = set(study.ct_sop_uids)
    z_of = {u: study.ct_origin[2] + k * 3.0 for k, u in enumerate(study.ct_sop_uids)}
    (for_ref,) = rtstruct.ReferencedFrameOfReferenceSequence
    assert for_ref.FrameOfReferenceUID == study.frame_of_reference_uid
    (study_ref,) = for_ref.RTReferencedStudySequence
    assert study_ref.ReferencedSOPInstanceUID == study.study_instance_uid
    (series_ref,) = study_ref.RTReferencedSeriesSequence
    assert series_ref.SeriesInstanceUID == study.ct_series_uid
    listed = [it.ReferencedSOPInstanceUID for it in series_ref.ContourImageSequence]
    assert set(listed) == ct_uids
    assert all(it.ReferencedSOPClassUID == CT_IMAGE_STORAGE for it in series_ref.ContourImageSequence)

    names = {r.ROINumber: r.ROIName for r in rtstruct.StructureSetROISequence}
    assert list(names.values()) == study.roi_names == list(ROI_NAMES)
    for r in rtstruct.StructureSetROISequence:
        assert r.ReferencedFrameOfReferenceUID == study.frame_of_reference_uid
    types = {o.ReferencedROINumber: o.RTROIInterpretedType for o in rtstruct.RTROIObservationsSequence}
    for num, name in names.items():
        want = {"BODY": "EXTERNAL", "PTV70": "PTV", "PTV56": "PTV"}.get(name, "ORGAN")
        assert types[num] == want
    assert {rc.ReferencedROINumber for rc in rtstruct.ROIContourSequence} == set(names)
    for rc in rtstruct.ROIContourSequence:
        assert len(rc.ROIDisplayColor) == 3
        assert len(rc.ContourSequence) > 0, names[rc.ReferencedROINumber]
        for c in rc.ContourSequence:
            assert c.ContourGeometricType == "CLOSED_PLANAR"
            pts = np.asarray(c.ContourData, dtype=float).reshape(-1, 3)
            assert len(pts) == int(c.NumberOfContourPoints) >= 64
            (img,) = c.ContourImageSequence
            assert img.ReferencedSOPInstanceUID in ct_uids
            assert np.all(pts[:, 2] == pytest.approx(z_of[img.ReferencedSOPInstanceUID]))


def _rasterise(rtstruct: pydicom.Dataset, study: StudyTruth) -> dict[str, np.ndarray]:
    """An independent rasteriser (matplotlib's point-in-polygon, even-odd per slice)."""
    from matplotlib.path import Path as MplPath

    nz, ny, nx = study.hu.shape
    ox, oy, oz = study.ct_origin
    sx, sy, sz = study.ct_spacing
    xx, yy = np.meshgrid(ox + sx * np.arange(nx), oy + sy * np.arange(ny))
    centres = np.stack([xx.ravel(), yy.ravel()], axis=1)
    names = {r.ROINumber: r.ROIName for r in rtstruct.StructureSetROISequence}
    out = {}
    for rc in rtstruct.ROIContourSequence:
        m = np.zeros((nz, ny, nx), dtype=bool)
        for c in rc.ContourSequence:
            pts = np.asarray(c.ContourData, dtype=float).reshape(-1, 3)
            k = round((pts[0, 2] - oz) / sz)
            inside = MplPath(pts[:, :2]).contains_points(centres).reshape(ny, nx)
            m[k] ^= inside
        out[names[rc.ReferencedROINumber]] = m
    return out


def test_contours_reproduce_truth_masks(study: StudyTruth, rtstruct: pydicom.Dataset) -> None:
    raster = _rasterise(rtstruct, study)
    for name in ROI_NAMES:
        truth = study.masks[name]
        assert truth.dtype == bool and truth.shape == study.hu.shape
        assert truth.sum() > 100, name
        assert _dice(raster[name], truth) > 0.99, name
    assert study.masks["BODY"].sum() > 50_000


def test_structures_are_anatomically_placed(study: StudyTruth) -> None:
    m = study.masks
    body = m["BODY"]
    for name in ROI_NAMES:
        assert not (m[name] & ~body).any(), f"{name} leaves BODY"
    # nothing touches the grid border
    assert not body[:, [0, -1], :].any() and not body[:, :, [0, -1]].any()

    def centroid(name: str) -> np.ndarray:
        return _ct_voxel_world(study, m[name]).mean(axis=0)

    assert centroid("Parotid_L")[0] > 20 > -20 > centroid("Parotid_R")[0]  # LPS: +x = left
    assert centroid("Brainstem")[2] > centroid("SpinalCord")[2]
    assert centroid("Mandible")[1] < centroid("SpinalCord")[1]  # anterior = -y


# -- RTDOSE ----------------------------------------------------------------------------------
def test_rtdose(study: StudyTruth, rtdose: pydicom.Dataset) -> None:
    assert rtdose.FrameOfReferenceUID == study.frame_of_reference_uid
    assert rtdose.DoseUnits == "GY" and rtdose.DoseType == "PHYSICAL"
    assert rtdose.DoseSummationType == "PLAN"
    assert rtdose.FrameIncrementPointer == pydicom.tag.Tag(0x3004, 0x000C)
    assert rtdose.BitsAllocated == 32 and rtdose.PixelRepresentation == 0
    (plan,) = rtdose.ReferencedRTPlanSequence
    assert plan.ReferencedSOPClassUID == "1.2.840.10008.5.1.4.1.1.481.5"
    dose = rtdose.pixel_array.astype(np.float64) * float(rtdose.DoseGridScaling)
    assert dose.shape == study.dose_gy.shape == (int(rtdose.NumberOfFrames), rtdose.Rows, rtdose.Columns)
    assert np.abs(dose - study.dose_gy).max() < 1e-3
    offsets = [float(v) for v in rtdose.GridFrameOffsetVector]
    assert offsets[0] == 0.0
    np.testing.assert_allclose(np.diff(offsets), study.dose_spacing[2])
    ipp = [float(v) for v in rtdose.ImagePositionPatient]
    np.testing.assert_allclose(ipp, study.dose_origin)
    np.testing.assert_allclose([float(v) for v in rtdose.PixelSpacing], study.dose_spacing[:2])
    assert study.dose_spacing[0] == 2 * study.ct_spacing[0]

    # plan-like dose
    assert 1.0 * RX <= dose.max() <= 1.15 * RX
    d70 = _dose_at(study, _ct_voxel_world(study, study.masks["PTV70"]))
    assert np.median(d70) >= 0.95 * RX
    assert np.percentile(d70, 5) >= 0.85 * RX
    only56 = study.masks["PTV56"] & ~study.masks["PTV70"]
    assert 0.75 * RX <= np.median(_dose_at(study, _ct_voxel_world(study, only56))) <= 0.88 * RX
    cord = _dose_at(study, _ct_voxel_world(study, study.masks["SpinalCord"]))
    assert cord.max() < 45.0
    # zero outside the body: the dose grid nodes are CT voxel centres
    nz, ny, nx = dose.shape
    kk, jj, ii = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    world = np.stack([ii, jj, kk], axis=-1) * np.asarray(study.dose_spacing) + np.asarray(study.dose_origin)
    ct_idx = np.rint((world - np.asarray(study.ct_origin)) / np.asarray(study.ct_spacing)).astype(int)
    inside = study.masks["BODY"][ct_idx[..., 2], ct_idx[..., 1], ct_idx[..., 0]]
    assert (dose[~inside] == 0).all()
    assert (dose[inside] > 0).all()
    # the grid covers the whole body (body voxels on the dose-grid border would be cut)
    assert not inside[:, [0, -1], :].any() and not inside[:, :, [0, -1]].any()


# -- PHI ------------------------------------------------------------------------------------
def test_phi_planted_in_every_file(study: StudyTruth) -> None:
    phi = study.phi
    assert phi.patient_id in study.study_dir.name
    assert phi.family_name in study.study_dir.name
    strings = phi.strings()
    assert len(strings) >= 13
    for s in (phi.patient_name, phi.patient_id, phi.birth_date, phi.study_id, phi.family_name):
        assert s in strings
    for p in _all_files(study.study_dir):
        raw = p.read_bytes()
        missing = [s for s in strings if s.encode("latin-1") not in raw]
        assert not missing, (p.name, missing)
        ds = pydicom.dcmread(p)
        assert ds.PatientName == phi.patient_name
        assert ds.PatientID == phi.patient_id
        assert ds.PatientBirthDate == phi.birth_date
        assert ds.AccessionNumber == phi.accession_number
        assert ds.InstitutionName == phi.institution_name
        assert ds.InstitutionAddress == phi.institution_address
        assert ds.ReferringPhysicianName == phi.referring_physician
        assert ds.OperatorsName == phi.operator_name
        assert ds.StudyDescription == phi.study_description
        assert ds.SeriesDescription == phi.series_description
        assert ds.OtherPatientIDs == phi.other_patient_id
        assert ds.PatientAddress == phi.patient_address
        assert ds.StudyID == phi.study_id
        assert ds.PatientSex in ("M", "F") and ds.PatientAge.endswith("Y")
        block = ds.private_block(0x0009, "PSQA_TEST")
        assert block[0x01].value == phi.patient_name


def test_make_phi() -> None:
    a, b = make_phi(0), make_phi(0)
    assert a == b and isinstance(a, PlantedPHI)
    c = make_phi(1)
    assert a != c
    assert not set(a.strings()) & set(c.strings())
    for s in a.strings():
        assert len(s) >= 5, s
    assert len(a.birth_date) == 8 and a.birth_date.isdigit()
    assert a.patient_name.count("^") >= 1 and len(a.family_name) >= 5


def test_explicit_phi_and_folder_name(tmp_path: Path) -> None:
    phi = make_phi(42)
    tr = generate_hn_study(
        tmp_path,
        seed=3,
        phi=phi,
        folder_name="export",
        matrix=48,
        n_slices=12,
        pixel_spacing_mm=5.0,
        slice_thickness_mm=5.0,
        with_dose=False,
    )
    assert tr.phi == phi and tr.study_dir == tmp_path / "export"
    assert tr.rtdose_file is None and tr.dose_gy is None
    assert len(_all_files(tr.study_dir)) == 12 + 1
    assert pydicom.dcmread(tr.ct_files[0]).PatientID == phi.patient_id


# -- determinism and variation ---------------------------------------------------------------
def test_deterministic_bytes(tmp_path: Path, study: StudyTruth) -> None:
    again = generate_hn_study(tmp_path, seed=0)
    a, b = _all_files(study.study_dir), _all_files(again.study_dir)
    assert [p.relative_to(study.study_dir) for p in a] == [p.relative_to(again.study_dir) for p in b]
    for pa, pb in zip(a, b, strict=False):
        assert pa.read_bytes() == pb.read_bytes(), pa.name
    np.testing.assert_array_equal(again.hu, study.hu)
    np.testing.assert_array_equal(again.dose_gy, study.dose_gy)


def test_seeds_differ(tmp_path: Path, study: StudyTruth) -> None:
    other = generate_hn_study(tmp_path, seed=1)
    assert other.phi != study.phi
    assert other.study_dir.name != study.study_dir.name
    assert other.study_instance_uid != study.study_instance_uid
    assert other.frame_of_reference_uid != study.frame_of_reference_uid
    assert other.ct_series_uid != study.ct_series_uid
    assert not set(other.ct_sop_uids) & set(study.ct_sop_uids)
    assert other.rtstruct_sop_uid != study.rtstruct_sop_uid
    assert other.rtdose_sop_uid != study.rtdose_sop_uid
    assert not np.array_equal(other.masks["PTV70"], study.masks["PTV70"])
    assert not np.array_equal(other.hu, study.hu)


def test_cohort(tmp_path: Path) -> None:
    cohort = generate_hn_cohort(
        tmp_path, n_studies=3, seed=10, matrix=64, pixel_spacing_mm=4.0, n_slices=32, slice_thickness_mm=6.0
    )
    assert len(cohort) == 3
    assert len({t.study_dir for t in cohort}) == 3
    assert len({t.phi.patient_id for t in cohort}) == 3
    assert len({t.study_instance_uid for t in cohort}) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(t.study_dir.name for t in cohort)
    single = generate_hn_study(
        tmp_path / "single", seed=11, matrix=64, pixel_spacing_mm=4.0, n_slices=32, slice_thickness_mm=6.0
    )
    assert single.phi == cohort[1].phi
    np.testing.assert_array_equal(single.hu, cohort[1].hu)
    ptv_x = [_ct_voxel_world(t, t.masks["PTV70"]).mean(axis=0)[0] for t in cohort]
    assert len({round(x, 3) for x in ptv_x}) == 3
    with pytest.raises(ValueError):
        generate_hn_cohort(tmp_path, n_studies=2, phi=make_phi(0))


@pytest.mark.parametrize(
    "geometry",
    [
        dict(matrix=64, pixel_spacing_mm=4.0, n_slices=32, slice_thickness_mm=6.0),
        dict(matrix=48, pixel_spacing_mm=3.0, n_slices=16, slice_thickness_mm=3.0),
        dict(matrix=192, pixel_spacing_mm=1.5, n_slices=48, slice_thickness_mm=4.0),
    ],
)
def test_other_geometries(tmp_path: Path, geometry: dict) -> None:
    tr = generate_hn_study(tmp_path, seed=4, **geometry)
    n, m = geometry["n_slices"], geometry["matrix"]
    assert tr.hu.shape == (n, m, m)
    body = tr.masks["BODY"]
    assert not body[:, [0, -1], :].any() and not body[:, :, [0, -1]].any()
    for name in ROI_NAMES:
        assert tr.masks[name].any(), name
    assert 1.0 * RX <= tr.dose_gy.max() <= 1.15 * RX
    ds = pydicom.dcmread(tr.rtstruct_file)
    assert all(len(rc.ContourSequence) > 0 for rc in ds.ROIContourSequence)


def test_module_imports_no_pipeline_stack() -> None:
    code = (
        "import sys, ml.data.synthetic\n"
        "bad = [m for m in ('dagster', 'mlflow', 'torch') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
