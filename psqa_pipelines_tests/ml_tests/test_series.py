"""Unit tests of ml.data.dicom.series (validation, loading) and ml.data.dicom.headers (reading)."""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.filewriter import dcmwrite
from pydicom.uid import ExplicitVRBigEndian, ImplicitVRLittleEndian, generate_uid

from ml.data.dicom.headers import REASONS, DicomInstance, IngestError, read_dataset, summarize
from ml.data.dicom.series import load_series_volume, validate_series
from ml.data.synthetic import StudyTruth, generate_hn_study

SMALL = dict(matrix=64, pixel_spacing_mm=6.0, n_slices=32, slice_thickness_mm=6.0)


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> StudyTruth:
    return generate_hn_study(tmp_path_factory.mktemp("hn_series"), seed=3, **SMALL)


def _instances(paths) -> list[DicomInstance]:
    return [summarize(read_dataset(p), Path(p)) for p in paths]


@pytest.fixture(scope="module")
def instances(study) -> list[DicomInstance]:
    return _instances(study.ct_files)


def _edited_copy(
    study: StudyTruth,
    dest: Path,
    edit: Callable[[int, pydicom.Dataset], None] | None = None,
    drop: tuple[int, ...] = (),
) -> list[Path]:
    """Copy the CT series (slice order) to ``dest``, applying ``edit(k, ds)`` to each slice."""
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for k, p in enumerate(study.ct_files):
        if k in drop:
            continue
        target = dest / p.name
        if edit is None:
            shutil.copyfile(p, target)
        else:
            ds = pydicom.dcmread(p)
            edit(k, ds)
            ds.save_as(target, enforce_file_format=True)
        out.append(target)
    return out


# -- summarize ------------------------------------------------------------------------------
def test_summarize_ct_slice(study, instances):
    inst = instances[0]
    assert inst.modality == "CT"
    assert inst.sop_instance_uid == study.ct_sop_uids[0]
    assert inst.study_uid == study.study_instance_uid
    assert inst.series_uid == study.ct_series_uid
    assert inst.frame_of_reference_uid == study.frame_of_reference_uid
    assert inst.transfer_syntax == "1.2.840.10008.1.2.1"
    assert (inst.rows, inst.columns) == (64, 64)
    assert inst.pixel_spacing == (6.0, 6.0)
    assert inst.image_position == study.ct_origin
    assert inst.image_orientation == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    assert inst.slice_thickness == 6.0


def test_summarize_rt_objects(study):
    rs = summarize(read_dataset(study.rtstruct_file), study.rtstruct_file)
    assert rs.modality == "RTSTRUCT"
    assert rs.referenced_series_uids == (study.ct_series_uid,)
    assert rs.referenced_frame_uids == (study.frame_of_reference_uid,)
    rd = summarize(read_dataset(study.rtdose_file), study.rtdose_file)
    assert rd.modality == "RTDOSE"
    assert rd.number_of_frames == study.dose_gy.shape[0]
    assert len(rd.referenced_plan_uids) == 1


# -- validate_series ----------------------------------------------------------------------
def _check_geometry(ordered, geom, study):
    assert [i.sop_instance_uid for i in ordered] == study.ct_sop_uids
    assert geom.n_slices == len(study.ct_files)
    assert (geom.rows, geom.columns) == study.hu.shape[1:]
    np.testing.assert_allclose(geom.spacing, study.ct_spacing, atol=1e-9)
    np.testing.assert_allclose(geom.origin, study.ct_origin, atol=1e-9)
    np.testing.assert_allclose(geom.direction, np.eye(3).reshape(-1), atol=1e-12)
    assert geom.positions == sorted(geom.positions)
    np.testing.assert_allclose(np.diff(geom.positions), study.ct_spacing[2], atol=1e-9)


def test_validate_series_accepts_generated_ct(study, instances):
    _check_geometry(*validate_series(list(instances)), study)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_validate_series_sorts_shuffled_slices_by_position(study, instances, seed):
    shuffled = list(instances)
    random.Random(seed).shuffle(shuffled)
    assert [i.sop_instance_uid for i in shuffled] != study.ct_sop_uids
    _check_geometry(*validate_series(shuffled), study)


def test_validate_series_ignores_instance_number_and_file_name(study, tmp_path):
    # instance numbers run superior -> inferior in the generated data; scramble them further
    def edit(k, ds):
        ds.InstanceNumber = (k * 7) % 32 + 1

    paths = _edited_copy(study, tmp_path, edit)
    renamed = []
    for n, p in enumerate(reversed(paths)):
        q = p.with_name(f"{n:03d}.dcm")
        p.rename(q)
        renamed.append(q)
    _check_geometry(*validate_series(_instances(sorted(renamed))), study)


def test_validate_series_single_slice_uses_slice_thickness(instances):
    _, geom = validate_series([instances[4]])
    assert geom.spacing[2] == 6.0
    assert geom.n_slices == 1


def test_validate_series_empty():
    with pytest.raises(IngestError) as exc:
        validate_series([])
    assert exc.value.reason == "inconsistent_series"


def _set_iop(k, ds):
    if k == 10:
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "0.9962", "-0.0872"]  # 5 degree tilt


def _shift_x(k, ds):
    if k == 12:
        ipp = [float(v) for v in ds.ImagePositionPatient]
        ds.ImagePositionPatient = [f"{ipp[0] + 2.0:g}", f"{ipp[1]:g}", f"{ipp[2]:g}"]


def _crop(k, ds):
    if k == 20:
        arr = ds.pixel_array[:48, :56]
        ds.Rows, ds.Columns = arr.shape
        ds.PixelData = np.ascontiguousarray(arr).astype("<i2").tobytes()


def _spacing(k, ds):
    if k == 3:
        ds.PixelSpacing = ["6.5", "6.5"]


def _position_off(k, ds):
    if k == 7:  # 1 mm along z: not a missing slice, but spacing no longer uniform
        ipp = [float(v) for v in ds.ImagePositionPatient]
        ds.ImagePositionPatient = [f"{ipp[0]:g}", f"{ipp[1]:g}", f"{ipp[2] + 1.0:g}"]


@pytest.mark.parametrize(
    "edit, drop, detail",
    [
        (None, (15,), "missing slices"),
        (None, (1,), "missing slices"),
        (_set_iop, (), "mixed orientation"),
        (_shift_x, (), "drift in-plane"),
        (_crop, (), "matrix size"),
        (_spacing, (), "pixel spacing"),
        (_position_off, (), "non-uniform"),
    ],
    ids=["gap-middle", "gap-near-end", "orientation", "in-plane-drift", "matrix-size", "pixel-spacing", "uneven-z"],
)
def test_validate_series_rejects_inconsistent_series(study, tmp_path, edit, drop, detail):
    paths = _edited_copy(study, tmp_path / "s", edit, drop)
    insts = _instances(paths)  # every slice on its own is fine
    random.Random(0).shuffle(insts)
    with pytest.raises(IngestError) as exc:
        validate_series(insts)
    assert exc.value.reason == "inconsistent_series"
    assert detail in exc.value.detail


def test_validate_series_rejects_duplicated_slice_with_new_uid(study, tmp_path):
    paths = _edited_copy(study, tmp_path / "s")
    ds = pydicom.dcmread(paths[9])
    new_uid = generate_uid(entropy_srcs=["duplicate-slice-test"])
    ds.SOPInstanceUID = new_uid
    ds.file_meta.MediaStorageSOPInstanceUID = new_uid
    dup = tmp_path / "s" / "dup.dcm"
    ds.save_as(dup, enforce_file_format=True)
    insts = _instances([*paths, dup])
    assert len({i.sop_instance_uid for i in insts}) == len(insts)  # all UIDs distinct
    with pytest.raises(IngestError) as exc:
        validate_series(insts)
    assert exc.value.reason == "inconsistent_series"
    assert "duplicate" in exc.value.detail


# -- load_series_volume -------------------------------------------------------------------
def test_load_series_volume_returns_truth(study):
    paths = list(study.ct_files)
    random.Random(5).shuffle(paths)
    vol = load_series_volume(paths)
    assert vol.array.dtype == np.float32
    np.testing.assert_array_equal(vol.array, study.hu.astype(np.float32))
    assert vol.spacing == study.ct_spacing
    assert vol.origin == study.ct_origin
    assert vol.direction == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    assert vol.meta["modality"] == "CT"


def _write_reencoded(src: Path, dest: Path, syntax) -> None:
    ds = pydicom.dcmread(src)
    arr = ds.pixel_array
    ds.file_meta.TransferSyntaxUID = syntax
    big = syntax == ExplicitVRBigEndian
    # OW pixel data is written as stored: byte-swap it ourselves for big endian
    ds.PixelData = arr.astype(">i2" if big else "<i2").tobytes()
    dcmwrite(dest, ds, implicit_vr=syntax == ImplicitVRLittleEndian, little_endian=not big, force_encoding=True)


@pytest.mark.parametrize("syntax", [ExplicitVRBigEndian, ImplicitVRLittleEndian], ids=["big-endian", "implicit"])
def test_reencoded_slices_decode_the_same(study, tmp_path, syntax):
    paths = _edited_copy(study, tmp_path / "s")
    for k in (0, 13, 31):
        _write_reencoded(study.ct_files[k], paths[k], syntax)
        ds = pydicom.dcmread(paths[k], stop_before_pixels=True)
        assert ds.file_meta.TransferSyntaxUID == syntax
    inst = summarize(read_dataset(paths[13]), paths[13])
    assert inst.transfer_syntax == syntax
    assert inst.image_position == tuple(float(v) for v in pydicom.dcmread(study.ct_files[13]).ImagePositionPatient)
    validate_series(_instances(paths))
    vol = load_series_volume(paths)
    np.testing.assert_array_equal(vol.array, study.hu.astype(np.float32))
    assert vol.origin == study.ct_origin


def test_load_series_applies_per_slice_rescale(study, tmp_path):
    # slice 4 stores HU directly (intercept 0) and slice 5 stores HU/2+512 with slope 2
    def edit(k, ds):
        hu = study.hu[k].astype(np.int32)
        if k == 4:
            ds.RescaleIntercept = "0"
            ds.PixelData = hu.astype("<i2").tobytes()
        elif k == 5:
            even = hu - (hu % 2)
            ds.RescaleSlope = "2"
            ds.RescaleIntercept = "-1024"
            ds.PixelData = ((even + 1024) // 2).astype("<i2").tobytes()

    paths = _edited_copy(study, tmp_path / "s", edit)
    vol = load_series_volume(paths)
    expected = study.hu.astype(np.float32)
    expected[5] = expected[5] - (study.hu[5] % 2)
    np.testing.assert_array_equal(vol.array, expected)


def test_load_series_sign_extends_12_bit_signed(study, tmp_path):
    # BitsAllocated 16, BitsStored 12, signed: -5 stored in 12 bits is 0x0FFB, which must read -5
    def edit(k, ds):
        if k == 2:
            vals = np.full((64, 64), -5, dtype=np.int16)
            vals[0, :4] = [2047, -2048, 0, 1]
            ds.BitsStored = 12
            ds.HighBit = 11
            ds.RescaleIntercept = "0"
            ds.PixelData = (vals.astype(np.uint16) & 0x0FFF).astype("<u2").tobytes()

    paths = _edited_copy(study, tmp_path / "s", edit)
    vol = load_series_volume(paths)
    assert np.all(vol.array[2, 1:] == -5)
    np.testing.assert_array_equal(vol.array[2, 0, :4], [2047, -2048, 0, 1])
    np.testing.assert_array_equal(vol.array[3], study.hu[3])


def test_load_series_volume_rejects_empty():
    with pytest.raises(ValueError):
        load_series_volume([])


# -- read_dataset / summarize reason codes ----------------------------------------------------
def _reason(path: Path) -> str:
    with pytest.raises(IngestError) as exc:
        summarize(read_dataset(path), Path(path))
    assert exc.value.reason in REASONS
    return exc.value.reason


def test_random_bytes_are_not_dicom(tmp_path):
    p = tmp_path / "random.dcm"
    p.write_bytes(np.random.default_rng(0).bytes(4096))
    assert _reason(p) == "not_dicom"
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    assert _reason(empty) == "not_dicom"
    text = tmp_path / "notes.txt"
    text.write_text("Patient: Smith^John\n" * 20)
    assert _reason(text) == "not_dicom"


@pytest.mark.parametrize("cut", [2, 1000, 4096])
def test_ct_truncated_in_pixel_data(study, tmp_path, cut):
    data = study.ct_files[5].read_bytes()
    p = tmp_path / "cut.dcm"
    p.write_bytes(data[:-cut])
    assert _reason(p) == "truncated"


def test_ct_missing_image_position(study, tmp_path):
    ds = pydicom.dcmread(study.ct_files[3])
    del ds.ImagePositionPatient
    p = tmp_path / "noipp.dcm"
    ds.save_as(p, enforce_file_format=True)
    assert _reason(p) == "missing_required_tags"
    with pytest.raises(IngestError, match="ImagePositionPatient"):
        summarize(read_dataset(p), p)


@pytest.mark.parametrize("keyword", ["FrameOfReferenceUID", "PixelSpacing", "SeriesInstanceUID", "PixelData"])
def test_ct_missing_other_required_tags(study, tmp_path, keyword):
    ds = pydicom.dcmread(study.ct_files[3])
    delattr(ds, keyword)
    p = tmp_path / "missing.dcm"
    ds.save_as(p, enforce_file_format=True)
    assert _reason(p) == "missing_required_tags"


def test_non_orthonormal_orientation_is_invalid(study, tmp_path):
    ds = pydicom.dcmread(study.ct_files[3])
    ds.ImageOrientationPatient = ["1", "0", "0", "0.5", "1", "0"]
    p = tmp_path / "iop.dcm"
    ds.save_as(p, enforce_file_format=True)
    assert _reason(p) == "invalid_content"


@pytest.mark.parametrize("name", ["test-SR.dcm", "SC_rgb_small_odd.dcm"])
def test_unsupported_sop_classes(name):
    path = Path(get_testdata_file(name))
    assert _reason(path) == "unsupported_sop_class"


def test_unsupported_sop_class_from_examples():
    import pydicom.examples

    path = pydicom.examples.get_path("rgb_color")  # ultrasound
    assert _reason(path) == "unsupported_sop_class"


def test_truncated_rtplan():
    path = Path(get_testdata_file("rtplan_truncated.dcm"))
    assert _reason(path) == "truncated"
    # the complete plan is fine
    good = Path(get_testdata_file("rtplan.dcm"))
    assert summarize(read_dataset(good), good).modality == "RTPLAN"


def test_ingest_error_reason_codes_are_checked():
    with pytest.raises(ValueError):
        IngestError("no_such_reason")
    err = IngestError("truncated", "x")
    assert err.reason == "truncated" and err.detail == "x" and str(err) == "truncated: x"
