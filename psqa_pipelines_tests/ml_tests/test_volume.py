"""Unit tests of ml.data.volume: canonical orientation, resampling and NIfTI round trips."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import SimpleITK as sitk

from ml.data.volume import (
    Volume,
    is_axis_aligned,
    read_nifti,
    resample_to,
    to_canonical,
    write_nifti,
)

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def _signed_permutations() -> list[tuple[float, ...]]:
    """All 48 axis-aligned direction matrices (proper and improper), row-major."""
    out = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1.0, -1.0), repeat=3):
            m = np.zeros((3, 3))
            for col, row in enumerate(perm):
                m[row, col] = signs[col]  # column ``col`` = world direction of voxel axis col
            out.append(tuple(float(v) for v in m.reshape(-1)))
    return out


DIRECTIONS = _signed_permutations()


def _direction_id(d: tuple[float, ...]) -> str:
    m = np.asarray(d).reshape(3, 3)
    return "".join(
        ("+" if m[int(np.argmax(np.abs(m[:, c]))), c] > 0 else "-") + "xyz"[int(np.argmax(np.abs(m[:, c])))]
        for c in range(3)
    )


def _random_volume(direction: tuple[float, ...], seed: int = 0) -> Volume:
    rng = np.random.default_rng(seed)
    # distinct sizes and spacings per axis so that a wrong permutation cannot go unnoticed
    arr = rng.integers(-1000, 2000, size=(5, 6, 7)).astype(np.int16)  # [k, j, i]
    return Volume(arr, spacing=(0.75, 1.25, 2.5), origin=(-12.5, 30.25, 7.0), direction=direction)


def _all_ijk(vol: Volume) -> np.ndarray:
    nx, ny, nz = vol.shape_xyz
    k, j, i = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    return np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1)


# -- to_canonical ---------------------------------------------------------------------------
@pytest.mark.parametrize("direction", DIRECTIONS, ids=[_direction_id(d) for d in DIRECTIONS])
def test_to_canonical_matches_sitk_dicom_orient(direction):
    vol = _random_volume(direction)
    assert is_axis_aligned(vol)
    canon = to_canonical(vol)
    ref = sitk.DICOMOrient(vol.to_sitk(), "LPS")

    assert canon.direction == IDENTITY
    np.testing.assert_allclose(ref.GetDirection(), IDENTITY, atol=1e-12)
    ref_arr = sitk.GetArrayFromImage(ref)
    assert canon.array.shape == ref_arr.shape
    assert canon.array.dtype == vol.array.dtype
    np.testing.assert_array_equal(canon.array, ref_arr)
    np.testing.assert_allclose(canon.spacing, ref.GetSpacing(), atol=1e-9)
    np.testing.assert_allclose(canon.origin, ref.GetOrigin(), atol=1e-9)
    # the values are just rearranged, never interpolated
    assert sorted(canon.array.ravel().tolist()) == sorted(vol.array.ravel().tolist())


@pytest.mark.parametrize("direction", DIRECTIONS, ids=[_direction_id(d) for d in DIRECTIONS])
def test_to_canonical_preserves_world_coordinates_of_voxel_centres(direction):
    vol = _random_volume(direction, seed=1)
    canon = to_canonical(vol)
    ijk = _all_ijk(vol)
    world = vol.index_to_world(ijk)
    new_ijk = canon.world_to_index(world)
    rounded = np.rint(new_ijk)
    np.testing.assert_allclose(new_ijk, rounded, atol=1e-9)  # voxel centres land on voxel centres
    rounded = rounded.astype(int)
    assert np.all(rounded >= 0) and np.all(rounded < np.asarray(canon.shape_xyz))
    # index_to_world of corresponding voxels is equal
    np.testing.assert_allclose(canon.index_to_world(rounded), world, atol=1e-9)
    old_vals = vol.array[ijk[:, 2], ijk[:, 1], ijk[:, 0]]
    new_vals = canon.array[rounded[:, 2], rounded[:, 1], rounded[:, 0]]
    np.testing.assert_array_equal(new_vals, old_vals)
    # a bijection: every canonical voxel is hit exactly once
    flat = np.ravel_multi_index((rounded[:, 2], rounded[:, 1], rounded[:, 0]), canon.array.shape)
    assert np.unique(flat).size == flat.size == canon.array.size


def test_to_canonical_identity_is_unchanged():
    vol = _random_volume(IDENTITY)
    canon = to_canonical(vol)
    np.testing.assert_array_equal(canon.array, vol.array)
    assert canon.origin == vol.origin and canon.spacing == vol.spacing


def test_to_canonical_keeps_meta():
    vol = _random_volume(DIRECTIONS[5])
    vol.meta["modality"] = "CT"
    assert to_canonical(vol).meta == {"modality": "CT"}


def _rotation_z(deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _rotation_x(deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


@pytest.mark.parametrize("rot", [_rotation_z(20.0), _rotation_x(-15.0) @ _rotation_z(35.0)], ids=["z20", "x-15z35"])
def test_to_canonical_oblique_resamples_linear_field_exactly(rot):
    # an oblique grid sampling a field that is linear in world coordinates: linear
    # interpolation reproduces it exactly wherever the canonical voxel lies inside the input
    shape_zyx = (10, 12, 14)
    spacing = (2.0, 2.5, 3.0)
    origin = (5.0, -7.0, 11.0)
    grad = np.array([0.7, -1.3, 2.1])
    probe = Volume(np.zeros(shape_zyx, np.float32), spacing, origin, tuple(rot.reshape(-1)))
    ijk = _all_ijk(probe)
    field = (probe.index_to_world(ijk) @ grad + 100.0).reshape(shape_zyx)
    vol = probe.with_array(field.astype(np.float32))
    assert not is_axis_aligned(vol)

    canon = to_canonical(vol)
    assert canon.direction == IDENTITY
    assert canon.array.dtype == np.float32
    # the canonical grid covers the world bounding box of the input
    corners = np.array(list(itertools.product(*[(0, n - 1) for n in vol.shape_xyz])), dtype=float)
    world_corners = vol.index_to_world(corners)
    np.testing.assert_allclose(canon.origin, world_corners.min(axis=0), atol=1e-6)
    far = canon.index_to_world(np.asarray(canon.shape_xyz, dtype=float) - 1)
    assert np.all(far >= world_corners.max(axis=0) - 1e-6)

    cijk = _all_ijk(canon)
    cworld = canon.index_to_world(cijk)
    back = vol.world_to_index(cworld)
    inside = np.all((back >= 1e-6) & (back <= np.asarray(vol.shape_xyz) - 1 - 1e-6), axis=1)
    assert inside.sum() > 100
    got = canon.array[cijk[:, 2], cijk[:, 1], cijk[:, 0]]
    np.testing.assert_allclose(got[inside], cworld[inside] @ grad + 100.0, atol=2e-3)
    # outside the input the default value is the input minimum
    assert np.all(got[~inside] >= float(field.min()) - 1e-3)


# -- NIfTI -------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32])
@pytest.mark.parametrize("direction", [IDENTITY, DIRECTIONS[13], DIRECTIONS[42]], ids=["identity", "perm13", "perm42"])
def test_nifti_round_trip_is_exact(tmp_path, dtype, direction):
    rng = np.random.default_rng(7)
    if np.dtype(dtype).kind == "f":
        arr = rng.normal(0, 500, size=(5, 6, 7)).astype(dtype)
    else:
        info = np.iinfo(dtype)
        arr = rng.integers(info.min, info.max, size=(5, 6, 7), endpoint=True).astype(dtype)
    vol = Volume(arr, spacing=(0.75, 1.25, 2.5), origin=(-12.5, 30.25, 7.0), direction=direction)
    path = write_nifti(vol, tmp_path / "v.nii.gz")
    back = read_nifti(path)
    assert back.array.dtype == np.dtype(dtype)
    assert back.array.shape == arr.shape
    np.testing.assert_array_equal(back.array, arr)
    assert back.spacing == vol.spacing
    assert back.origin == vol.origin
    np.testing.assert_array_equal(np.asarray(back.direction), np.asarray(vol.direction))


def test_nifti_round_trip_oblique(tmp_path):
    rot = _rotation_x(-15.0) @ _rotation_z(35.0)
    arr = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    vol = Volume(arr, spacing=(0.9, 1.1, 3.0), origin=(1.5, -2.5, 40.0), direction=tuple(rot.reshape(-1)))
    back = read_nifti(write_nifti(vol, tmp_path / "o.nii"))
    np.testing.assert_array_equal(back.array, arr)
    np.testing.assert_allclose(back.spacing, vol.spacing, atol=1e-5)
    np.testing.assert_allclose(back.origin, vol.origin, atol=1e-4)
    np.testing.assert_allclose(back.direction, vol.direction, atol=1e-6)


def test_nifti_is_ras_on_disk(tmp_path):
    import nibabel as nib

    vol = Volume(np.zeros((2, 3, 4), np.int16), spacing=(1.0, 2.0, 3.0), origin=(10.0, 20.0, 30.0))
    img = nib.load(str(write_nifti(vol, tmp_path / "r.nii.gz")))
    # LPS (10, 20, 30) is RAS (-10, -20, 30); i runs to patient left = -x in RAS
    np.testing.assert_allclose(img.affine[:3, 3], [-10.0, -20.0, 30.0])
    np.testing.assert_allclose(np.diag(img.affine)[:3], [-1.0, -2.0, 3.0])
    assert img.shape == (4, 3, 2)


def test_nifti_bool_written_as_uint8(tmp_path):
    mask = np.zeros((3, 4, 5), bool)
    mask[1, 2, 3] = True
    back = read_nifti(write_nifti(Volume(mask, (1.0, 1.0, 1.0)), tmp_path / "m.nii.gz"))
    assert back.array.dtype == np.uint8
    np.testing.assert_array_equal(back.array.astype(bool), mask)


def test_write_nifti_is_deterministic(tmp_path):
    rng = np.random.default_rng(3)
    vol = Volume(rng.normal(size=(6, 7, 8)).astype(np.float32), (1.0, 1.5, 2.0), (3.0, 4.0, 5.0), DIRECTIONS[20])
    a = write_nifti(vol, tmp_path / "a.nii.gz").read_bytes()
    b = write_nifti(vol, tmp_path / "b.nii.gz").read_bytes()
    assert a == b
    assert a[:2] == b"\x1f\x8b"  # gzip
    assert a[4:8] == b"\x00\x00\x00\x00"  # mtime 0 in the gzip header
    # overwriting in place gives the same bytes again and leaves no temporary files
    assert write_nifti(vol, tmp_path / "a.nii.gz").read_bytes() == a
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.nii.gz", "b.nii.gz"]


# -- resample_to -------------------------------------------------------------------------
def _smooth_volume(direction=IDENTITY) -> Volume:
    rng = np.random.default_rng(11)
    arr = rng.normal(size=(6, 7, 8)).astype(np.float32)
    return Volume(arr, spacing=(1.5, 2.0, 2.5), origin=(-4.0, 3.0, 12.0), direction=direction)


@pytest.mark.parametrize("interpolation", ["linear", "nearest", "bspline"])
def test_resample_to_same_grid_is_noop(interpolation):
    vol = _smooth_volume(DIRECTIONS[9])
    ref = Volume(np.zeros(vol.array.shape, np.uint8), vol.spacing, vol.origin, vol.direction)
    out = resample_to(vol, ref, interpolation=interpolation)
    assert out.array.dtype == vol.array.dtype
    np.testing.assert_array_equal(out.array, vol.array)
    assert out.same_grid(ref, atol=1e-9)
    ints = vol.with_array((vol.array * 100).astype(np.int16))
    out = resample_to(ints, ref, interpolation=interpolation)
    np.testing.assert_array_equal(out.array, ints.array)
    assert out.array.dtype == np.int16


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("direction", [IDENTITY, DIRECTIONS[13]], ids=["identity", "perm13"])
def test_resample_onto_grid_shifted_by_one_voxel(axis, direction):
    vol = _smooth_volume(direction)
    step = vol.direction_matrix[:, axis] * vol.spacing[axis]  # one voxel along voxel axis ``axis``
    ref = Volume(np.zeros(vol.array.shape, np.uint8), vol.spacing, tuple(np.asarray(vol.origin) + step), vol.direction)
    np_axis = 2 - axis
    n = vol.array.shape[np_axis]
    src = [slice(None)] * 3
    dst = [slice(None)] * 3
    src[np_axis] = slice(1, n)
    dst[np_axis] = slice(0, n - 1)
    last = [slice(None)] * 3
    last[np_axis] = n - 1

    near = resample_to(vol, ref, interpolation="nearest", default_value=-99.0)
    np.testing.assert_array_equal(near.array[tuple(dst)], vol.array[tuple(src)])
    assert np.all(near.array[tuple(last)] == -99.0)
    lin = resample_to(vol, ref, interpolation="linear", default_value=-99.0)
    np.testing.assert_allclose(lin.array[tuple(dst)], vol.array[tuple(src)], atol=1e-5)
    assert np.all(lin.array[tuple(last)] == -99.0)
    assert lin.same_grid(ref, atol=1e-9)


def test_resample_bool_mask_stays_bool_and_int_linear_becomes_float():
    mask = np.zeros((6, 7, 8), bool)
    mask[2:4, 2:5, 3:6] = True
    vol = Volume(mask, (1.0, 1.0, 1.0))
    ref = Volume(np.zeros((6, 7, 8), np.uint8), (1.0, 1.0, 1.0), origin=(1.0, 0.0, 0.0))
    out = resample_to(vol, ref, interpolation="nearest")
    assert out.array.dtype == bool
    np.testing.assert_array_equal(out.array[:, :, :-1], mask[:, :, 1:])
    ints = Volume(np.arange(6 * 7 * 8, dtype=np.int16).reshape(6, 7, 8), (1.0, 1.0, 1.0))
    half = Volume(np.zeros((6, 7, 8), np.uint8), (1.0, 1.0, 1.0), origin=(0.5, 0.0, 0.0))
    out = resample_to(ints, half, interpolation="linear")
    assert out.array.dtype == np.float32
    # halfway between neighbours along x: the mean of the two (x is the fastest axis, step 1)
    np.testing.assert_allclose(out.array[:, :, :-1], ints.array[:, :, :-1] + 0.5, atol=1e-4)


def test_volume_validation():
    with pytest.raises(ValueError):
        Volume(np.zeros((3, 3)), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError):
        Volume(np.zeros((3, 3, 3)), (1.0, 0.0, 1.0))
    with pytest.raises(ValueError):
        Volume(np.zeros((3, 3, 3)), (1.0, 1.0))
