"""Unit tests of ml.data.mri: sequence labels, z-score normalisation and co-registration."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataset import Dataset

from ml.data.mri import coregister, foreground_mask, sequence_from_dicom, sequence_from_text, zscore
from ml.data.volume import Volume, resample_to


@pytest.mark.parametrize(
    "name, expected",
    [
        # BraTS 2023
        ("BraTS-GLI-00001-000-t1n.nii.gz", "t1"),
        ("BraTS-GLI-00001-000-t1c.nii.gz", "t1c"),
        ("BraTS-GLI-00001-000-t2w.nii.gz", "t2"),
        ("BraTS-GLI-00001-000-t2f.nii.gz", "flair"),
        ("BraTS-GLI-00001-000-seg.nii.gz", "seg"),
        # TCGA (BraTS 2017 style)
        ("TCGA-DU-7294_t1_bet.nii.gz", "t1"),
        ("TCGA-DU-7294_t1c_bet.nii.gz", "t1c"),
        ("TCGA-DU-7294_fla_bet.nii.gz", "flair"),
        ("TCGA-DU-7294_t2_bet.nii.gz", "t2"),
        ("TCGA-DU-7294_seg_algorithmic_fusion.nii.gz", "seg"),
        # clinical exports
        ("MRHR_T1_AX_POST_GAD_6_t1c.nii.gz", "t1c"),
        ("MRHR_FLAIR_AX_3_fla.nii.gz", "flair"),
        ("T1_AX_4_t1.nii.gz", "t1"),
        ("MRHR_T2_AX_SE_2_tse2d1_11_t2.nii.gz", "t2"),
        ("T1 AX POST GAD", "t1c"),
        ("Ax T2 FLAIR", "flair"),
        ("BRAIN_T1W_3D", "t1"),
        # unknown
        ("localizer.nii.gz", None),
        ("DWI_b1000.nii.gz", None),
        ("", None),
    ],
)
def test_sequence_from_text(name, expected):
    assert sequence_from_text(name) == expected


def test_sequence_from_text_contrast_flag():
    assert sequence_from_text("T1_AX_4_t1.nii.gz", has_contrast=True) == "t1c"
    assert sequence_from_text("T2_AX.nii.gz", has_contrast=True) == "t2"


def test_sequence_from_dicom():
    ds = Dataset()
    ds.SeriesDescription = "AX T1 MPRAGE"
    assert sequence_from_dicom(ds) == "t1"
    ds.ContrastBolusAgent = "Gadovist"
    assert sequence_from_dicom(ds) == "t1c"
    # no useful text: fall back on timing parameters
    ds = Dataset()
    ds.SeriesDescription = "Series 5"
    ds.InversionTime = 2500
    ds.EchoTime = 120
    ds.RepetitionTime = 9000
    assert sequence_from_dicom(ds) == "flair"
    ds.InversionTime = 0
    assert sequence_from_dicom(ds) == "t2"
    ds.EchoTime = 10
    ds.RepetitionTime = 500
    assert sequence_from_dicom(ds) == "t1"


# -- zscore ----------------------------------------------------------------------------------
def test_zscore_over_mask():
    rng = np.random.default_rng(0)
    arr = rng.normal(300.0, 40.0, size=(20, 24, 28)).astype(np.float32)
    mask = np.zeros(arr.shape, bool)
    mask[4:16, 5:20, 6:22] = True
    arr[~mask] = rng.normal(2000.0, 500.0, size=int((~mask).sum()))  # would skew unmasked stats
    out, mean, std = zscore(arr, mask)
    assert out.dtype == np.float32
    assert abs(float(out[mask].mean())) < 1e-5
    assert abs(float(out[mask].std()) - 1.0) < 1e-5
    assert np.all(out[~mask] == 0)
    assert mean == pytest.approx(float(arr[mask].mean()), rel=1e-5)
    assert std == pytest.approx(float(arr[mask].std()), rel=1e-5)
    np.testing.assert_allclose(out[mask], (arr[mask] - mean) / std, rtol=1e-5, atol=1e-5)


def test_zscore_default_mask_is_nonzero_foreground():
    rng = np.random.default_rng(1)
    arr = np.zeros((16, 16, 16), np.float32)
    arr[4:12, 4:12, 4:12] = rng.uniform(50, 150, size=(8, 8, 8))
    out, mean, _ = zscore(arr)
    fg = arr > 0
    assert abs(float(out[fg].mean())) < 1e-5 and abs(float(out[fg].std()) - 1) < 1e-5
    assert np.all(out[~fg] == 0)
    assert mean == pytest.approx(float(arr[fg].mean()), rel=1e-6)


def test_foreground_mask_otsu_when_background_is_not_zero():
    arr = np.full((16, 16, 16), 10.0, np.float32)
    arr[4:12, 4:12, 4:12] = 500.0
    np.testing.assert_array_equal(foreground_mask(arr), arr > 100)


def test_zscore_constant_and_empty():
    arr = np.full((4, 4, 4), 7.0, np.float32)
    out, mean, std = zscore(arr, np.ones(arr.shape, bool))
    assert std == 1.0 and mean == 7.0 and np.all(out == 0)
    out, mean, std = zscore(arr, np.zeros(arr.shape, bool))
    assert np.all(out == 0) and (mean, std) == (0.0, 1.0)


# -- co-registration --------------------------------------------------------------------------
_RNG = np.random.default_rng(0)
_N_BLOBS = 12
_CENTRES = _RNG.uniform(-45, 45, size=(_N_BLOBS, 3))
_SIGMAS = _RNG.uniform(3.0, 7.0, _N_BLOBS)
_AMPS = _RNG.uniform(0.5, 1.5, _N_BLOBS)
SHIFT = np.array([4.0, -3.0, 2.0])  # mm, world (LPS)


def _phantom(world: np.ndarray) -> np.ndarray:
    out = np.zeros(world.shape[:-1])
    for c, s, a in zip(_CENTRES, _SIGMAS, _AMPS, strict=True):
        out += a * np.exp(-((world - c) ** 2).sum(-1) / (2 * s * s))
    return 100.0 * out


def _sampled(shape_xyz, spacing, origin, shift=(0.0, 0.0, 0.0)) -> Volume:
    probe = Volume(np.zeros(tuple(shape_xyz[::-1]), np.uint8), spacing, origin)
    nx, ny, nz = shape_xyz
    k, j, i = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    world = probe.index_to_world(np.stack([i, j, k], axis=-1))
    return probe.with_array(_phantom(world - np.asarray(shift)).astype(np.float32))


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


@pytest.fixture(scope="module")
def pair() -> tuple[Volume, Volume]:
    t1c = _sampled((64, 64, 64), (2.0, 2.0, 2.0), (-63.0, -63.0, -63.0))
    # other grid: 3 mm voxels, another origin and extent; content moved by SHIFT in world space
    flair = _sampled((48, 46, 50), (3.0, 3.0, 3.0), (-74.0, -62.0, -80.0), shift=SHIFT)
    return t1c, flair


@pytest.fixture(scope="module")
def registered(pair):
    t1c, flair = pair
    seg = t1c.with_array((t1c.array > 60).astype(np.uint8) + (t1c.array > 110).astype(np.uint8))
    return coregister({"flair": flair, "t1c": t1c, "seg": seg})


def test_coregister_aligns_translated_flair(pair, registered):
    t1c, flair = pair
    out, report = registered
    assert report["t1c"] == {"role": "reference", "registered": False}
    assert report["flair"]["registered"] is True
    f = out["flair"]
    assert f.same_grid(t1c, atol=1e-9)
    assert f.array.dtype == np.float32
    naive = _corr(resample_to(flair, t1c).array, t1c.array)
    after = _corr(f.array, out["t1c"].array)
    assert after > 0.95
    assert after > naive + 0.05, (naive, after)
    # the recovered rigid transform is the translation (fixed -> moving points: + SHIFT)
    params = np.asarray(report["flair"]["parameters"])
    np.testing.assert_allclose(params[:3], 0.0, atol=0.02)  # rotation (rad)
    np.testing.assert_allclose(params[3:], SHIFT, atol=0.5)


def test_coregister_without_rigid_resamples_through_world(pair):
    t1c, flair = pair
    out, report = coregister({"t1c": t1c, "flair": flair}, rigid=False)
    assert report["flair"]["registered"] is False
    np.testing.assert_allclose(out["flair"].array, resample_to(flair, t1c).array, atol=1e-4)


def test_coregister_unshifted_pair_stays_put(pair):
    t1c, _ = pair
    flair = _sampled((48, 46, 50), (3.0, 3.0, 3.0), (-74.0, -62.0, -80.0))
    out, report = coregister({"t1c": t1c, "flair": flair})
    np.testing.assert_allclose(report["flair"]["parameters"][3:], 0.0, atol=0.5)
    assert _corr(out["flair"].array, t1c.array) > 0.99


def test_seg_on_reference_grid_stays_integer(registered, pair):
    t1c, _ = pair
    out, report = registered
    seg = out["seg"]
    assert report["seg"]["registered"] is False and report["seg"]["reason"] == "same grid"
    assert seg.array.dtype == np.uint8
    assert set(np.unique(seg.array).tolist()) == {0, 1, 2}
    expected = (t1c.array > 60).astype(np.uint8) + (t1c.array > 110).astype(np.uint8)
    np.testing.assert_array_equal(seg.array, expected)


def test_seg_on_other_grid_is_resampled_nearest(pair):
    t1c, flair = pair
    seg = flair.with_array((flair.array > 60).astype(np.int16) * 3)
    out, report = coregister({"t1c": t1c, "seg": seg})
    assert report["seg"]["registered"] is False
    assert out["seg"].array.dtype == np.int16
    assert set(np.unique(out["seg"].array).tolist()) == {0, 3}  # no interpolated labels


def test_reference_choice_and_canonical_grid(pair):
    t1c, flair = pair
    flipped = Volume(
        np.ascontiguousarray(flair.array[:, ::-1, :]),
        flair.spacing,
        tuple(np.asarray(flair.origin) + np.array([0.0, (flair.array.shape[1] - 1) * 3.0, 0.0])),
        (1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0),
    )
    out, report = coregister({"flair": flipped, "t2": t1c}, rigid=False)
    assert report["flair"]["role"] == "reference"  # t1c and t1 absent: FLAIR before T2
    assert out["flair"].direction == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    np.testing.assert_array_equal(out["flair"].array, flair.array)
    np.testing.assert_allclose(out["flair"].origin, flair.origin)
    with pytest.raises(ValueError):
        coregister({"seg": t1c})
