"""Unit tests of ml.data.openkbp (sparse CSV format, axes, patient folders)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ml.data.openkbp import (
    CT_OFFSET,
    N_VOXELS,
    SHAPE,
    OpenKBPError,
    canonical_geometry,
    dense,
    from_canonical_array,
    list_patient_files,
    load_patient,
    read_sparse,
    read_voxel_dimensions,
    to_canonical_array,
    write_sparse,
)

REAL_PATIENT = Path(__file__).resolve().parents[3] / "shared/datasets/openkbp/train-pats/pt_1"


def _ball(centre, radius) -> np.ndarray:
    z, y, x = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    return (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 <= radius**2


@pytest.fixture(scope="module")
def dose_array() -> np.ndarray:
    rng = np.random.default_rng(0)
    arr = np.zeros(SHAPE, np.float32)
    ball = _ball((64, 60, 70), 22)
    arr[ball] = rng.uniform(0.01, 75.0, int(ball.sum())).astype(np.float32)
    return arr


# -- sparse CSV --------------------------------------------------------------------------
def test_write_read_sparse_values_round_trip(tmp_path, dose_array):
    p = tmp_path / "dose.csv"
    write_sparse(p, dose_array)
    assert p.read_text().splitlines()[0] == ",data"
    idx, values = read_sparse(p)
    assert idx.dtype == np.int64 and values.dtype == np.float32
    assert idx.size == int(np.count_nonzero(dose_array))
    assert np.all(np.diff(idx) > 0)  # C-order flat indices
    back = dense(idx, values)
    assert back.shape == SHAPE
    np.testing.assert_array_equal(back, dose_array)


def test_write_sparse_with_mask(tmp_path, dose_array):
    mask = _ball((64, 60, 70), 10)
    p = tmp_path / "masked.csv"
    write_sparse(p, dose_array, mask=mask)
    idx, values = read_sparse(p)
    np.testing.assert_array_equal(dense(idx, values), np.where(mask, dose_array, 0))
    assert idx.size == int(np.count_nonzero(dose_array[mask]))


def _write_mask_csv(path: Path, mask: np.ndarray) -> None:
    """The OpenKBP mask form: indices with an empty data column."""
    idx = np.flatnonzero(mask.reshape(-1))
    text = ",data\n" + "".join(f"{i},\n" for i in idx)
    data = text.encode()
    path.write_bytes(gzip.compress(data, compresslevel=1, mtime=0) if path.name.endswith(".gz") else data)


def _write_values_csv(path: Path, idx: np.ndarray, values: np.ndarray) -> None:
    gz = {"method": "gzip", "compresslevel": 1, "mtime": 0} if path.name.endswith(".gz") else None
    pd.DataFrame({"data": values}, index=idx).to_csv(path, compression=gz)


def test_read_sparse_mask_form(tmp_path):
    mask = _ball((10, 20, 30), 5) | _ball((100, 90, 80), 3)
    p = tmp_path / "PTV70.csv"
    _write_mask_csv(p, mask)
    idx, values = read_sparse(p)
    assert values is None
    back = dense(idx, values, np.bool_)
    assert back.dtype == np.bool_
    np.testing.assert_array_equal(back, mask)


def test_read_sparse_empty_files(tmp_path):
    p = tmp_path / "empty.csv"
    p.write_text("")
    idx, values = read_sparse(p)
    assert idx.size == 0 and values is None
    p.write_text(",data\n")  # header only: an empty mask
    idx, values = read_sparse(p)
    assert idx.size == 0 and idx.dtype == np.int64
    assert not dense(idx, values, np.bool_).any()


def test_write_read_sparse_all_zero(tmp_path):
    # e.g. a predicted dose that is zero everywhere inside the mask
    p = tmp_path / "zero.csv"
    write_sparse(p, np.zeros(SHAPE, np.float32))
    idx, values = read_sparse(p)
    np.testing.assert_array_equal(dense(idx, values), np.zeros(SHAPE, np.float32))


def test_canonical_array_axes():
    # small non-cubic array: (rows=y, cols=x, slices running inferior)
    arr = np.arange(4 * 5 * 6).reshape(4, 5, 6)
    canon = to_canonical_array(arr)
    assert canon.shape == (6, 4, 5)  # [z, y, x]
    for y, x, s in [(0, 0, 0), (1, 2, 3), (3, 4, 5), (2, 0, 1)]:
        assert canon[6 - 1 - s, y, x] == arr[y, x, s]  # the last (most inferior) slice is z = 0
    np.testing.assert_array_equal(from_canonical_array(canon), arr)
    assert canon.flags.c_contiguous and from_canonical_array(canon).flags.c_contiguous


def test_canonical_array_round_trip_full_size(dose_array):
    canon = to_canonical_array(dose_array)
    np.testing.assert_array_equal(from_canonical_array(canon), dose_array)
    np.testing.assert_array_equal(to_canonical_array(from_canonical_array(canon)), canon)
    assert not np.array_equal(canon, dose_array)  # it is not the identity


def test_canonical_geometry_centres_grid():
    g = canonical_geometry((3.906, 3.5, 2.5))  # (row = y, column = x, slice) spacing
    assert g["spacing"] == (3.5, 3.906, 2.5)
    np.testing.assert_allclose(g["origin"], [-63.5 * 3.5, -63.5 * 3.906, -63.5 * 2.5])


# -- patient folders ---------------------------------------------------------------------
def _write_patient(folder: Path, ext: str, dose: np.ndarray) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    body = _ball((64, 64, 64), 24)
    hu = np.full(SHAPE, -CT_OFFSET, np.int16)  # voxels absent from ct.csv are -1024 HU (air)
    hu[body] = rng.integers(-200, 1500, int(body.sum()))
    stored = (hu.astype(np.int32) + CT_OFFSET).reshape(-1)
    idx = np.flatnonzero(stored)
    _write_values_csv(folder / f"ct{ext}", idx, stored[idx].astype(float))
    didx = np.flatnonzero(dose.reshape(-1))
    _write_values_csv(folder / f"dose{ext}", didx, dose.reshape(-1)[didx].astype(np.float64))
    pdm = _ball((64, 60, 70), 30)
    _write_mask_csv(folder / f"possible_dose_mask{ext}", pdm)
    ptv = _ball((64, 60, 70), 8)
    _write_mask_csv(folder / f"PTV70{ext}", ptv)
    vd = "3.906000000000000139e+00\n3.906000000000000139e+00\n2.500000000000000000e+00\n"
    (folder / f"voxel_dimensions{ext}").write_bytes(
        gzip.compress(vd.encode(), mtime=0) if ext.endswith(".gz") else vd.encode()
    )
    # a file the loader must ignore
    (folder / "notes.txt").write_text("not a csv")
    return {"hu": hu, "pdm": pdm, "ptv": ptv}


@pytest.mark.parametrize("ext", [".csv", ".csv.gz"])
def test_load_patient(tmp_path, dose_array, ext):
    folder = tmp_path / "pt_7"
    truth = _write_patient(folder, ext, dose_array)
    assert set(list_patient_files(folder)) == {"ct", "dose", "possible_dose_mask", "PTV70", "voxel_dimensions"}
    pat = load_patient(folder)
    assert pat.ct_hu.dtype == np.int16
    np.testing.assert_array_equal(pat.ct_hu, truth["hu"])
    assert pat.dose.dtype == np.float32
    np.testing.assert_array_equal(pat.dose, dose_array)
    assert pat.possible_dose_mask.dtype == np.bool_
    np.testing.assert_array_equal(pat.possible_dose_mask, truth["pdm"])
    assert set(pat.structures) == {"PTV70"}
    np.testing.assert_array_equal(pat.structures["PTV70"], truth["ptv"])
    assert pat.voxel_dimensions == (3.906, 3.906, 2.5)


def test_load_patient_without_dose(tmp_path, dose_array):
    folder = tmp_path / "pt_8"
    _write_patient(folder, ".csv", dose_array)
    (folder / "dose.csv").unlink()
    with pytest.raises(OpenKBPError) as exc:
        load_patient(folder)
    assert exc.value.reason == "incomplete_patient" and "dose" in exc.value.detail
    assert load_patient(folder, require_dose=False).dose is None


@pytest.mark.parametrize("name", ["ct", "possible_dose_mask", "voxel_dimensions"])
def test_missing_required_file(tmp_path, dose_array, name):
    folder = tmp_path / "pt_9"
    _write_patient(folder, ".csv", dose_array)
    (folder / f"{name}.csv").unlink()
    with pytest.raises(OpenKBPError) as exc:
        load_patient(folder)
    assert exc.value.reason == "incomplete_patient"
    assert name in exc.value.detail


@pytest.mark.parametrize("bad_index", [N_VOXELS, -1])
def test_out_of_range_index(tmp_path, bad_index):
    p = tmp_path / "PTV56.csv"
    p.write_text(f",data\n5,\n{bad_index},\n")
    with pytest.raises(OpenKBPError) as exc:
        read_sparse(p)
    assert exc.value.reason == "invalid_content"


def test_out_of_range_index_in_patient(tmp_path, dose_array):
    folder = tmp_path / "pt_10"
    _write_patient(folder, ".csv", dose_array)
    with open(folder / "dose.csv", "a") as f:
        f.write(f"{N_VOXELS + 3},1.5\n")
    with pytest.raises(OpenKBPError) as exc:
        load_patient(folder)
    assert exc.value.reason == "invalid_content"


def test_non_integer_index_and_missing_column(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text(",data\n1.5,2.0\n")
    with pytest.raises(OpenKBPError) as exc:
        read_sparse(p)
    assert exc.value.reason == "invalid_content"
    p.write_text(",value\n1,2.0\n")
    with pytest.raises(OpenKBPError) as exc:
        read_sparse(p)
    assert exc.value.reason == "invalid_content"


@pytest.mark.parametrize("garbage", ["random", "truncated"])
def test_corrupted_gz_is_unreadable(tmp_path, dose_array, garbage):
    folder = tmp_path / "pt_11"
    _write_patient(folder, ".csv.gz", dose_array)
    ct = folder / "ct.csv.gz"
    if garbage == "random":
        ct.write_bytes(b"\x1f\x8b\x08\x00" + np.random.default_rng(0).bytes(2000))
    else:
        ct.write_bytes(ct.read_bytes()[:500])
    with pytest.raises(OpenKBPError) as exc:
        load_patient(folder)
    assert exc.value.reason == "unreadable"


def test_ct_and_dose_value_ranges(tmp_path, dose_array):
    folder = tmp_path / "pt_12"
    _write_patient(folder, ".csv", dose_array)
    _write_values_csv(folder / "dose.csv", np.array([3, 4]), np.array([1.0, 200.0]))
    with pytest.raises(OpenKBPError) as exc:
        load_patient(folder)
    assert exc.value.reason == "invalid_content"
    _write_values_csv(folder / "dose.csv", np.array([3, 4]), np.array([1.0, 2.0]))
    _write_values_csv(folder / "ct.csv", np.array([3, 4]), np.array([-5.0, 100.0]))
    with pytest.raises(OpenKBPError) as exc:
        load_patient(folder)
    assert exc.value.reason == "invalid_content"


@pytest.mark.parametrize("text", ["1\n2\n", "1\n-2\n3\n", "a\nb\nc\n"])
def test_bad_voxel_dimensions(tmp_path, text):
    p = tmp_path / "voxel_dimensions.csv"
    p.write_text(text)
    with pytest.raises(OpenKBPError) as exc:
        read_voxel_dimensions(p)
    assert exc.value.reason in ("invalid_content", "unreadable")


def test_voxel_dimensions_one_line(tmp_path):
    p = tmp_path / "voxel_dimensions.csv"
    p.write_text("3.906, 3.906, 2.5\n")
    assert read_voxel_dimensions(p) == (3.906, 3.906, 2.5)


# -- real data ---------------------------------------------------------------------------
@pytest.mark.shared
@pytest.mark.skipif(not REAL_PATIENT.is_dir(), reason="needs ../shared OpenKBP data")
def test_real_openkbp_patient(tmp_path):
    from ml.data.ingest import pack_openkbp_patient, unpack_openkbp
    from ml.utils.io import save_npz_deterministic

    pat = load_patient(REAL_PATIENT)
    assert pat.voxel_dimensions == pytest.approx((3.906, 3.906, 2.5))
    assert 60.0 < float(pat.dose.max()) < 90.0
    dosed = pat.dose > 0
    assert dosed.any()
    assert not np.any(dosed & ~pat.possible_dose_mask)  # the possible-dose mask covers the dose
    assert "PTV70" in pat.structures and pat.structures["PTV70"].any()
    # the prescription goes to PTV70: its median dose is close to 70 Gy
    assert 60.0 < float(np.median(pat.dose[pat.structures["PTV70"]])) < 80.0
    assert pat.ct_hu.min() >= -1024 and pat.ct_hu.max() > 500

    arrays = pack_openkbp_patient(pat)
    data = save_npz_deterministic(tmp_path / "p.npz", arrays)
    assert (tmp_path / "p.npz").read_bytes() == data
    assert save_npz_deterministic(tmp_path / "q.npz", pack_openkbp_patient(pat)) == data
    back = unpack_openkbp(tmp_path / "p.npz")
    np.testing.assert_array_equal(back.ct_hu, pat.ct_hu)
    assert back.ct_hu.dtype == np.int16
    np.testing.assert_array_equal(back.dose, pat.dose)
    np.testing.assert_array_equal(back.possible_dose_mask, pat.possible_dose_mask)
    assert set(back.structures) == set(pat.structures)
    for name, mask in pat.structures.items():
        np.testing.assert_array_equal(back.structures[name], mask, err_msg=name)
    assert back.voxel_dimensions == pat.voxel_dimensions
