"""Unit tests of ml.data.dicom.rtdose.read_dose (values, geometry, frame-offset conventions)."""

from __future__ import annotations

import copy

import numpy as np
import pydicom
import pytest

from ml.data.dicom.headers import IngestError
from ml.data.dicom.rtdose import read_dose
from ml.data.synthetic import StudyTruth, generate_hn_study

SMALL = dict(matrix=64, pixel_spacing_mm=6.0, n_slices=32, slice_thickness_mm=6.0)


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> StudyTruth:
    return generate_hn_study(tmp_path_factory.mktemp("hn_dose"), seed=3, **SMALL)


@pytest.fixture(scope="module")
def dose_ds(study) -> pydicom.Dataset:
    return pydicom.dcmread(study.rtdose_file)


@pytest.fixture()
def ds(dose_ds) -> pydicom.Dataset:
    return copy.deepcopy(dose_ds)


def _frames(ds) -> np.ndarray:
    return np.frombuffer(ds.PixelData, dtype="<u4").reshape(int(ds.NumberOfFrames), int(ds.Rows), int(ds.Columns))


def _ds_list(values) -> list[str]:
    return [f"{v:.4f}".rstrip("0").rstrip(".") for v in values]


def _assert_truth(vol, study):
    assert vol.array.dtype == np.float32
    assert vol.array.shape == study.dose_gy.shape
    np.testing.assert_allclose(vol.array, study.dose_gy, atol=1e-4, rtol=0)
    np.testing.assert_allclose(vol.origin, study.dose_origin, atol=1e-6)
    np.testing.assert_allclose(vol.spacing, study.dose_spacing, atol=1e-6)
    np.testing.assert_allclose(vol.direction, np.eye(3).reshape(-1), atol=1e-12)


def test_read_generated_dose(study, dose_ds):
    vol = read_dose(dose_ds, study.rtdose_file)
    _assert_truth(vol, study)
    assert vol.meta == {"dose_units": "GY", "dose_type": "PHYSICAL", "dose_summation_type": "PLAN"}
    assert 60.0 < float(vol.array.max()) < 90.0


def test_dose_grid_scaling_is_applied(study, ds):
    ds.DoseGridScaling = "2e-06"
    vol = read_dose(ds)
    np.testing.assert_allclose(vol.array, 2 * study.dose_gy, atol=2e-4, rtol=0)


def test_frames_stored_in_decreasing_order(study, ds):
    """Top frame first, relative offsets 0, -dz, -2dz ... from the top frame's IPP."""
    frames = _frames(ds)
    n = frames.shape[0]
    dz = study.dose_spacing[2]
    ipp = [float(v) for v in ds.ImagePositionPatient]
    top_z = ipp[2] + (n - 1) * dz
    ds.ImagePositionPatient = _ds_list([ipp[0], ipp[1], top_z])
    ds.GridFrameOffsetVector = _ds_list([-k * dz for k in range(n)])
    ds.PixelData = np.ascontiguousarray(frames[::-1]).tobytes()
    vol = read_dose(ds)
    _assert_truth(vol, study)


def test_absolute_frame_offsets(study, ds):
    """First offset = z of the first frame (PS3.3 C.8.8.3.2, axial grids only)."""
    n = int(ds.NumberOfFrames)
    z0 = float(ds.ImagePositionPatient[2])
    assert z0 != 0
    ds.GridFrameOffsetVector = _ds_list([z0 + k * study.dose_spacing[2] for k in range(n)])
    _assert_truth(read_dose(ds), study)


def test_absolute_frame_offsets_in_decreasing_order(study, ds):
    frames = _frames(ds)
    n = frames.shape[0]
    dz = study.dose_spacing[2]
    ipp = [float(v) for v in ds.ImagePositionPatient]
    top_z = ipp[2] + (n - 1) * dz
    ds.ImagePositionPatient = _ds_list([ipp[0], ipp[1], top_z])
    ds.GridFrameOffsetVector = _ds_list([top_z - k * dz for k in range(n)])
    ds.PixelData = np.ascontiguousarray(frames[::-1]).tobytes()
    _assert_truth(read_dose(ds), study)


def _feet_first(ds, study, z_shift: float = 0.0) -> tuple[np.ndarray, float]:
    """Re-express the grid with IOP [-1,0,0, 0,1,0] (normal -z), frames stored along the normal.

    Returns the truth dose in the new storage order and the top z. Column i of the new grid is
    column (ncol-1-i) of the original; frame k is original frame (n-1-k). ``z_shift`` moves
    the grid along z (the generated grid is symmetric about z = 0, which can hide sign errors).
    """
    frames = _frames(ds)
    n, _, ncol = frames.shape
    ipp = [float(v) for v in ds.ImagePositionPatient]
    dx = study.dose_spacing[0]
    top_z = ipp[2] + (n - 1) * study.dose_spacing[2] + z_shift
    ds.ImageOrientationPatient = ["-1", "0", "0", "0", "1", "0"]
    ds.ImagePositionPatient = _ds_list([ipp[0] + (ncol - 1) * dx, ipp[1], top_z])
    ds.PixelData = np.ascontiguousarray(frames[::-1, :, ::-1]).tobytes()
    return study.dose_gy[::-1, :, ::-1], top_z


def test_feet_first_grid_relative_offsets(study, ds):
    expected, top_z = _feet_first(ds, study)
    n = int(ds.NumberOfFrames)
    ds.GridFrameOffsetVector = _ds_list([k * study.dose_spacing[2] for k in range(n)])
    vol = read_dose(ds)
    np.testing.assert_allclose(vol.direction, [-1, 0, 0, 0, 1, 0, 0, 0, -1], atol=1e-12)
    np.testing.assert_allclose(vol.array, expected, atol=1e-4, rtol=0)
    x_last = study.dose_origin[0] + (expected.shape[2] - 1) * study.dose_spacing[0]
    np.testing.assert_allclose(vol.origin, [x_last, study.dose_origin[1], top_z], atol=1e-6)
    # every voxel centre is where the truth says it is
    k, j, i = 3, 4, 5
    world = vol.index_to_world([i, j, k])
    truth_ijk = (world - np.asarray(study.dose_origin)) / np.asarray(study.dose_spacing)
    np.testing.assert_allclose(truth_ijk, np.rint(truth_ijk), atol=1e-9)
    ti, tj, tk = np.rint(truth_ijk).astype(int)
    assert vol.array[k, j, i] == pytest.approx(study.dose_gy[tk, tj, ti], abs=1e-4)


def test_feet_first_grid_absolute_offsets_match_relative(study, ds):
    """Absolute offsets are z coordinates; on a grid whose normal is -z they decrease."""
    rel = copy.deepcopy(ds)
    _feet_first(rel, study, z_shift=17.0)
    n = int(rel.NumberOfFrames)
    dz = study.dose_spacing[2]
    rel.GridFrameOffsetVector = _ds_list([k * dz for k in range(n)])
    expected = read_dose(rel)

    _, top_z = _feet_first(ds, study, z_shift=17.0)
    ds.GridFrameOffsetVector = _ds_list([top_z - k * dz for k in range(n)])
    vol = read_dose(ds)
    assert expected.origin[2] == pytest.approx(top_z)
    np.testing.assert_allclose(vol.origin, expected.origin, atol=1e-6)
    np.testing.assert_allclose(vol.direction, expected.direction, atol=1e-12)
    np.testing.assert_allclose(vol.spacing, expected.spacing, atol=1e-9)
    np.testing.assert_array_equal(vol.array, expected.array)


@pytest.mark.parametrize(
    "offsets",
    [
        lambda n, dz: [k * dz for k in range(n - 1)] + [(n - 1) * dz + 3.0],  # last gap too large
        lambda n, dz: [0.0, dz / 2] + [k * dz for k in range(2, n)],  # one half gap
        lambda n, dz: [k * k * 0.5 for k in range(n)],  # growing gaps
    ],
    ids=["last-gap", "half-gap", "quadratic"],
)
def test_non_uniform_offsets_are_invalid(ds, offsets, study):
    n = int(ds.NumberOfFrames)
    ds.GridFrameOffsetVector = _ds_list(offsets(n, study.dose_spacing[2]))
    with pytest.raises(IngestError) as exc:
        read_dose(ds)
    assert exc.value.reason == "invalid_content"
    assert "non-uniform" in exc.value.detail


def test_non_monotonic_and_repeated_offsets_are_invalid(ds, study):
    n = int(ds.NumberOfFrames)
    dz = study.dose_spacing[2]
    offs = [k * dz for k in range(n)]
    offs[4], offs[5] = offs[5], offs[4]
    ds.GridFrameOffsetVector = _ds_list(offs)
    with pytest.raises(IngestError, match="monotonic") as exc:
        read_dose(ds)
    assert exc.value.reason == "invalid_content"
    offs = [k * dz for k in range(n)]
    offs[6] = offs[5]
    ds.GridFrameOffsetVector = _ds_list(offs)
    with pytest.raises(IngestError, match="repeated") as exc:
        read_dose(ds)
    assert exc.value.reason == "invalid_content"


def test_offset_count_must_match_frames(ds):
    ds.GridFrameOffsetVector = list(ds.GridFrameOffsetVector)[:-1]
    with pytest.raises(IngestError) as exc:
        read_dose(ds)
    assert exc.value.reason == "invalid_content"


def test_absolute_offsets_on_non_axial_grid_are_invalid(ds):
    # a coronal grid (normal along y) with a first offset that is not 0
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "0", "-1"]
    n = int(ds.NumberOfFrames)
    ds.GridFrameOffsetVector = _ds_list([10.0 + 6.0 * k for k in range(n)])
    with pytest.raises(IngestError, match="non-axial") as exc:
        read_dose(ds)
    assert exc.value.reason == "invalid_content"


def test_single_frame_dose(study, ds):
    frames = _frames(ds)
    ds.NumberOfFrames = 1
    del ds.GridFrameOffsetVector
    ds.PixelData = np.ascontiguousarray(frames[10]).tobytes()
    vol = read_dose(ds)
    assert vol.array.shape == (1,) + study.dose_gy.shape[1:]
    np.testing.assert_allclose(vol.array[0], study.dose_gy[10], atol=1e-4, rtol=0)
    assert vol.spacing[2] == study.dose_spacing[2]  # from SliceThickness
