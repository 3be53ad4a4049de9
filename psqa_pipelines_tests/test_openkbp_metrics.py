"""OpenKBP challenge scores, contour metrics (Dice/HD95) and the seed's evaluation tables.

The real-data tests (3 OpenKBP training patients under ../shared) compare the vectorised scorer
against a literal, loop-based re-statement of the official evaluator. The official evaluator is
``DoseEvaluator`` in ababier/open-kbp ``provided_code/dose_evaluation_class.py``. The comparison
is written independently here and skips when ../shared is absent.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from ml.contour_dose.stats import (
    AVERAGE,
    SEED_DVH_ROWS,
    contour_table,
    dvh_errors_wide,
    dvh_mae_table,
    dvh_tests,
    format_contour_table,
    format_dvh_table,
    paired_one_sided_tests,
    rel_diff_label,
    relative_difference,
    round_half_up,
    summarise_mae_rows,
    to_markdown,
)
from ml.data.roi_names import OARS, OPENKBP_ROIS, TARGETS
from ml.metrics.contours import dice, hausdorff, hd95, surface, surface_distances
from ml.metrics.openkbp import (
    LONG_COLUMNS,
    ScoringCase,
    d_tenth_cc_percentile,
    dose_score,
    dvh_curve,
    dvh_metrics,
    mask_prediction,
    score_patients,
    voxels_in_tenth_cc,
)
from psqa_pipelines_tests.conftest import OPENKBP_DIR, needs_openkbp

# ---------------------------------------------------------------------------------------------
# dose score and DVH metrics on hand-computed arrays


def test_dose_score_sums_all_voxels_over_pdm_count():
    ref = np.zeros((2, 2, 2))
    pdm = np.zeros((2, 2, 2), bool)
    pdm[0] = True  # 4 voxels
    ref[0] = [[10.0, 20.0], [30.0, 40.0]]
    pred = np.zeros_like(ref)
    pred[0] = [[11.0, 18.0], [30.0, 44.0]]  # |diff| = 1, 2, 0, 4
    assert dose_score(ref, pred, pdm) == pytest.approx(7 / 4, abs=1e-12)
    # dose outside the pdm counts in the numerator (official behaviour) until it is masked away
    leaky = pred.copy()
    leaky[1, 1, 1] = 8.0
    assert dose_score(ref, leaky, pdm) == pytest.approx(15 / 4, abs=1e-12)
    assert dose_score(ref, mask_prediction(leaky, pdm), pdm) == pytest.approx(7 / 4, abs=1e-12)
    # zero prediction: the mean reference dose inside the pdm
    assert dose_score(ref, np.zeros_like(ref), pdm) == pytest.approx(25.0, abs=1e-12)
    assert np.isnan(dose_score(ref, pred, np.zeros_like(pdm)))
    with pytest.raises(ValueError):
        dose_score(ref, pred[0], pdm)


def test_mask_prediction_keeps_dtype_and_zeroes_outside():
    pred = np.arange(8, dtype=np.float32).reshape(2, 2, 2)
    pdm = np.zeros((2, 2, 2), bool)
    pdm[1, 0, 1] = True
    out = mask_prediction(pred, pdm)
    assert out.dtype == np.float32 and out.sum() == 5.0 and out[1, 0, 1] == 5.0


@pytest.mark.parametrize(
    ("dims", "n"),
    [
        ((3.906, 3.906, 2.5), 3),  # 38.14 mm³ -> 2.62 -> 3
        ((4.0, 5.0, 2.0), 2),  # 40 mm³ -> 2.5 -> 2 (numpy rounds half to even)
        ((2.0, 2.0, 2.0), 12),  # 8 mm³ -> 12.5 -> 12
        ((2.0, 2.0, 2.5), 10),  # 10 mm³ -> 10
        ((10.0, 10.0, 10.0), 1),  # 1000 mm³ -> 0.1 -> 0 -> max(1, .)
    ],
)
def test_voxels_in_tenth_cc_rounding(dims, n):
    assert voxels_in_tenth_cc(dims) == n


def _one_roi(values, roi, shape=(4, 4, 4)):
    """A dose grid whose ROI ``roi`` holds exactly ``values`` (the rest of the grid is 1000 Gy)."""
    dose = np.full(int(np.prod(shape)), 1000.0)
    mask = np.zeros(dose.size, bool)
    mask[: len(values)] = True
    dose[: len(values)] = values
    return dose.reshape(shape), {roi: mask.reshape(shape)}


def test_oar_d_tenth_cc_and_mean_by_hand():
    values = np.arange(10, 0, -1, dtype=float)  # 10..1, order must not matter
    dose, structures = _one_roi(values, "Brainstem")
    # 40 mm³ voxels: n = 2 -> percentile 100 - 2/10*100 = 80 -> sorted index 0.8*9 = 7.2 -> 8 + 0.2
    m = dvh_metrics(dose, structures, (4.0, 5.0, 2.0))
    assert set(m) == {("Brainstem", "D_0.1_cc"), ("Brainstem", "mean")}
    assert m[("Brainstem", "D_0.1_cc")] == pytest.approx(8.2, abs=1e-12)
    assert m[("Brainstem", "mean")] == pytest.approx(5.5, abs=1e-12)
    # 38.1 mm³ voxels: n = 3 -> percentile 70 -> index 6.3 -> 7.3
    m = dvh_metrics(dose, structures, (3.906, 3.906, 2.5))
    assert m[("Brainstem", "D_0.1_cc")] == pytest.approx(7.3, abs=1e-12)


def test_oar_smaller_than_tenth_cc_is_clipped_to_minimum():
    # official code would call np.percentile with a negative q (ValueError); we return the minimum
    assert d_tenth_cc_percentile(3, 2) == 0.0
    dose, structures = _one_roi([4.0, 6.0], "SpinalCord")
    m = dvh_metrics(dose, structures, (3.906, 3.906, 2.5))
    assert m[("SpinalCord", "D_0.1_cc")] == 4.0
    # exactly n voxels: q = 0 -> minimum as well
    dose, structures = _one_roi([4.0, 6.0, 9.0], "SpinalCord")
    assert dvh_metrics(dose, structures, (3.906, 3.906, 2.5))[("SpinalCord", "D_0.1_cc")] == 4.0


def test_target_metrics_by_hand():
    values = np.linspace(100.0, 0.0, 11)  # 0, 10, ..., 100 (reversed)
    dose, structures = _one_roi(values, "PTV70")
    m = dvh_metrics(dose, structures, (3.906, 3.906, 2.5))
    # percentiles 1, 5, 99 of 11 equally spaced values: indices 0.1, 0.5, 9.9 -> 1, 5, 99
    expected = {("PTV70", "D_99"): 1.0, ("PTV70", "D_95"): 5.0, ("PTV70", "D_1"): 99.0}
    assert m == pytest.approx(expected, abs=1e-12)


def test_dvh_metrics_skips_missing_empty_and_unknown_rois_and_ignores_pdm():
    dose, structures = _one_roi([1.0, 2.0, 3.0, 4.0], "Larynx")
    structures["Mandible"] = np.zeros_like(structures["Larynx"])  # present but empty
    structures["Body"] = np.ones_like(structures["Larynx"])  # not a scored ROI
    m = dvh_metrics(dose, structures, (3.906, 3.906, 2.5))
    assert set(m) == {("Larynx", "D_0.1_cc"), ("Larynx", "mean")}
    assert m[("Larynx", "mean")] == 2.5  # no pdm involved anywhere
    with pytest.raises(ValueError):
        dvh_metrics(dose, {"Larynx": np.ones(3, bool)}, (1, 1, 1))


def test_score_patients_pools_dvh_errors_and_averages_dose_scores():
    shape = (4, 4, 4)
    pdm = np.ones(shape, bool)
    # patient A: one OAR (2 metrics), prediction off by +1 Gy everywhere -> |Δ| = 1, 1
    ref_a, s_a = _one_roi(np.arange(1.0, 11.0), "Brainstem", shape)
    ref_a = np.where(s_a["Brainstem"], ref_a, 0.0)
    # patient B: one PTV (3 metrics), prediction off by +4 Gy -> |Δ| = 4, 4, 4
    ref_b, s_b = _one_roi(np.linspace(60, 70, 11), "PTV70", shape)
    ref_b = np.where(s_b["PTV70"], ref_b, 0.0)
    cases = [
        ScoringCase("A", ref_a, ref_a + 1.0, pdm, s_a, (4.0, 5.0, 2.0)),
        dict(
            patient_id="B",
            reference=ref_b,
            prediction=ref_b + 4.0,
            possible_dose_mask=pdm,
            structures=s_b,
            voxel_dimensions=(4.0, 5.0, 2.0),
        ),
    ]
    per, summary = score_patients(cases)
    assert list(per.columns) == list(LONG_COLUMNS)
    assert per["abs_error"].dtype == np.float64 and per["reference"].dtype == np.float64
    assert per["abs_error"].to_numpy() == pytest.approx([1, 1, 4, 4, 4], abs=1e-12)
    assert summary["n_patients"] == 2
    assert summary["dose_score"] == pytest.approx((1.0 + 4.0) / 2, abs=1e-12)
    # pooled over the 5 entries (2.8), not the mean of per-patient means (2.5)
    assert summary["dvh_score"] == pytest.approx(14 / 5, abs=1e-12)


def test_score_patients_keeps_patient_without_rois_and_handles_empty_input():
    pdm = np.ones((2, 2, 2), bool)
    per, summary = score_patients([ScoringCase("X", np.ones((2, 2, 2)), np.zeros((2, 2, 2)), pdm, {})])
    assert len(per) == 1 and per["roi"].isna().all()
    assert summary["dose_score"] == 1.0 and np.isnan(summary["dvh_score"]) and summary["n_patients"] == 1
    per, summary = score_patients([])
    assert per.empty and summary["n_patients"] == 0 and np.isnan(summary["dose_score"])


def test_dvh_curve_cumulative_volume():
    dose = np.array([0.0, 10.0, 20.0, 30.0, 99.0])
    mask = np.array([True, True, True, True, False])
    levels, vol = dvh_curve(dose, mask, bins=[0.0, 10.0, 15.0, 30.0, 31.0])
    assert vol == pytest.approx([100.0, 75.0, 50.0, 25.0, 0.0])
    levels, vol = dvh_curve(dose, mask, bins=4)
    assert levels == pytest.approx([0.0, 10.0, 20.0, 30.0]) and vol[0] == 100.0 and vol[-1] == 25.0
    assert np.all(np.diff(vol) <= 0)
    _, vol = dvh_curve(dose, np.zeros(5, bool), bins=3)
    assert np.isnan(vol).all()


def test_metric_modules_import_without_scipy_or_simpleitk():
    code = (
        "import sys, ml.metrics.openkbp, ml.metrics.contours, ml.contour_dose.stats;"
        "print(sorted(m for m in ('scipy', 'SimpleITK', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------------
# comparison with a literal re-statement of the official DoseEvaluator on real patients

_OFFICIAL_METRICS = {
    **{oar: ["D_0.1_cc", "mean"] for oar in OARS},
    **{t: ["D_99", "D_95", "D_1"] for t in TARGETS},
}


def _official_dvh_into(frame: pd.DataFrame, patient_id: str, dose: np.ndarray, case: ScoringCase) -> None:
    """One patient's DVH metrics written cell by cell into a wide object-dtype frame (official style)."""
    voxel_size = np.prod(np.asarray(case.voxel_dimensions, dtype=np.float64))
    voxels_within_tenths_cc = np.maximum(1, np.round(100 / voxel_size))
    for roi in OPENKBP_ROIS:  # full_roi_list order
        if roi not in case.structures:
            continue
        flat_mask = case.structures[roi].astype(bool).flatten()
        if not flat_mask.any():
            continue
        roi_dose = dose[flat_mask]
        for metric in _OFFICIAL_METRICS[roi]:
            if metric == "D_0.1_cc":
                value = np.percentile(roi_dose, 100 - voxels_within_tenths_cc / len(roi_dose) * 100)
            elif metric == "mean":
                value = roi_dose.mean()
            elif metric == "D_99":
                value = np.percentile(roi_dose, 1)
            elif metric == "D_95":
                value = np.percentile(roi_dose, 5)
            elif metric == "D_1":
                value = np.percentile(roi_dose, 99)
            else:
                raise AssertionError(metric)
            frame.at[patient_id, (metric, roi)] = value


def _official_scores(cases: list[ScoringCase]):
    """Loop-based port of ``DoseEvaluator.evaluate`` + ``get_scores`` (object frames, cast at the end)."""
    columns = [(m, roi) for roi, ms in _OFFICIAL_METRICS.items() for m in ms]
    ids = [c.patient_id for c in cases]
    dose_errors = pd.Series(index=ids, data=None, dtype=float)
    reference_df = pd.DataFrame(index=ids, columns=columns)
    prediction_df = reference_df.copy()
    for case in cases:
        reference = np.asarray(case.reference, dtype=np.float64).flatten()
        predicted = np.asarray(case.prediction, dtype=np.float64).flatten()
        _official_dvh_into(reference_df, case.patient_id, reference, case)
        dose_errors[case.patient_id] = np.sum(np.abs(reference - predicted)) / np.sum(case.possible_dose_mask)
        _official_dvh_into(prediction_df, case.patient_id, predicted, case)
    dose_score_ = np.nanmean(dose_errors)
    dvh_errors = np.abs(reference_df.astype(float) - prediction_df.astype(float))
    return dose_score_, np.nanmean(dvh_errors.values), dose_errors, reference_df, prediction_df


REAL_PATIENTS = ("pt_1", "pt_4", "pt_7")  # different ROI sets: pt_4 lacks PTV56/63, pt_7 lacks Brainstem


@pytest.fixture(scope="module")
def real_cases() -> list[ScoringCase]:
    from ml.data.openkbp import load_patient

    cases = []
    for pt in REAL_PATIENTS:
        p = load_patient(OPENKBP_DIR / pt)
        pred = mask_prediction(np.roll(p.dose.astype(np.float64) * 0.97, 2, axis=0), p.possible_dose_mask)
        cases.append(ScoringCase(pt, p.dose, pred, p.possible_dose_mask, p.structures, p.voxel_dimensions))
    return cases


@pytest.mark.shared
@needs_openkbp
def test_scores_equal_official_port_on_real_patients(real_cases):
    per, summary = score_patients(real_cases)
    off_dose, off_dvh, off_errors, off_ref, off_pred = _official_scores(real_cases)
    assert summary["n_patients"] == 3
    assert abs(summary["dose_score"] - off_dose) <= 1e-9
    assert abs(summary["dvh_score"] - off_dvh) <= 1e-9
    by_patient = per.groupby("patient_id")["dose_score"].first()
    for pid in off_errors.index:
        assert abs(by_patient[pid] - off_errors[pid]) <= 1e-9
    # every official cell: present in ours exactly when it is non-NaN there, and equal
    ours = per.set_index(["patient_id", "metric", "roi"])
    n_cells = 0
    for pid in off_ref.index:
        for metric, roi in off_ref.columns:
            cell = off_ref.at[pid, (metric, roi)]
            ref_v = float(cell) if pd.notna(cell) else np.nan
            key = (pid, metric, roi)
            if np.isnan(ref_v):
                assert key not in ours.index
                continue
            n_cells += 1
            assert abs(ours.at[key, "reference"] - ref_v) <= 1e-9
            assert abs(ours.at[key, "prediction"] - float(off_pred.at[pid, (metric, roi)])) <= 1e-9
    assert n_cells == len(per) > 3 * 10
    assert summary["dose_score"] > 0.1 and summary["dvh_score"] > 0.1  # the perturbation is visible


@pytest.mark.shared
@needs_openkbp
def test_zero_prediction_dose_score_is_mean_reference_dose_in_pdm(real_cases):
    for case in real_cases:
        ref = case.reference.astype(np.float64)
        assert not np.any(ref[~case.possible_dose_mask])  # reference is zero outside the pdm
        expected = ref[case.possible_dose_mask].mean()
        zero = dose_score(ref, np.zeros_like(ref), case.possible_dose_mask)
        assert zero == pytest.approx(expected, rel=1e-12)
        assert dose_score(ref, ref, case.possible_dose_mask) == 0.0


# ---------------------------------------------------------------------------------------------
# contour metrics


def _sphere(shape, centre_mm, radius_mm, spacing):
    grids = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing, strict=True)], indexing="ij")
    return sum((g - c) ** 2 for g, c in zip(grids, centre_mm, strict=True)) <= radius_mm**2


def test_dice_by_hand_and_empty_masks():
    a = np.zeros((3, 3, 3), bool)
    b = np.zeros((3, 3, 3), bool)
    a[0, 0, :] = True  # 3 voxels
    b[0, 0, :] = True
    b[1, 0, :2] = True  # 5 voxels, 3 shared
    assert dice(a, b) == pytest.approx(6 / 8)
    assert dice(a, a) == 1.0
    assert np.isnan(dice(np.zeros_like(a), np.zeros_like(a)))
    assert dice(a, np.zeros_like(a)) == 0.0


def test_surface_is_mask_voxels_with_an_outside_6_neighbour():
    m = np.zeros((5, 5, 5), bool)
    m[1:4, 1:4, 1:4] = True
    s = surface(m)
    assert s.sum() == 26 and not s[2, 2, 2]
    full = np.ones((4, 4, 4), bool)  # array border counts as outside
    assert surface(full).sum() == 4**3 - 2**3


def test_hausdorff_identical_masks_is_zero():
    sp = (2.5, 1.2, 1.2)
    a = _sphere((20, 30, 30), (25.0, 18.0, 18.0), 9.0, sp)
    assert hausdorff(a, a, sp) == 0.0 and hd95(a, a, sp) == 0.0
    d_ab, d_ba = surface_distances(a, a, sp)
    assert d_ab.size == d_ba.size == surface(a).sum() and not d_ab.any()


@pytest.mark.parametrize(("axis", "shift"), [(1, 4), (2, 3), (0, 2)])
def test_hausdorff_of_offset_spheres_is_the_offset(axis, shift):
    sp = (2.5, 1.0, 1.0)
    shape = (24, 48, 48)
    a = _sphere(shape, (30.0, 24.0, 24.0), 10.0, sp)
    b = np.roll(a, shift, axis=axis)  # exact translate, far from the border
    offset = shift * sp[axis]
    diag = float(np.sqrt(np.sum(np.square(sp))))
    hd = hausdorff(a, b, sp)
    assert offset - diag <= hd <= offset + 1e-9
    assert hausdorff(a, b, sp, reduction="pooled") == hd  # percentile 100: both reductions agree
    h95 = hd95(a, b, sp)
    assert 0 < h95 <= hd
    assert hausdorff(a, b, sp, percentile=95, reduction="directed") == pytest.approx(
        np.percentile(surface_distances(a, b, sp)[0], 95)
    )
    assert hausdorff(a, b, sp, percentile=95, reduction="pooled") == pytest.approx(
        np.percentile(np.concatenate(surface_distances(a, b, sp)), 95)
    )


def test_hausdorff_empty_mask_conventions():
    a = _sphere((10, 10, 10), (5.0, 5.0, 5.0), 3.0, (1, 1, 1))
    e = np.zeros_like(a)
    assert np.isnan(hausdorff(e, e, 1.0)) and np.isnan(hd95(e, e, 1.0))
    assert hausdorff(a, e, 1.0) == np.inf and hd95(e, a, 1.0) == np.inf
    d_ab, d_ba = surface_distances(a, e, 1.0)
    assert np.isinf(d_ab).all() and d_ab.size == surface(a).sum() and d_ba.size == 0
    with pytest.raises(ValueError):
        hausdorff(a, a, 1.0, percentile=101)
    with pytest.raises(ValueError):
        hausdorff(a, a[:-1], 1.0)


def _ellipsoid_blobs(shape, spacing, centres, radii):
    m = np.zeros(shape, bool)
    grids = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing, strict=True)], indexing="ij")
    for c, r in zip(centres, radii, strict=True):
        m |= sum(((g - ci) / ri) ** 2 for g, ci, ri in zip(grids, c, r, strict=True)) <= 1.0
    return m


@pytest.mark.parametrize("seed", range(5))
def test_hausdorff_matches_simpleitk_on_random_blobs(seed):
    sitk = pytest.importorskip("SimpleITK")
    rng = np.random.default_rng(seed)
    sp = (2.5, 3.906, 3.906)  # array axes (z, y, x)
    shape = (32, 28, 28)
    extent = np.array(shape) * np.array(sp)
    k = int(rng.integers(1, 4))
    centres = rng.uniform(0.3, 0.7, size=(k, 3)) * extent
    radii = rng.uniform(8.0, 20.0, size=(k, 3))
    a = _ellipsoid_blobs(shape, sp, centres, radii)
    b = _ellipsoid_blobs(
        shape, sp, centres + rng.normal(0, 4.0, size=(k, 3)), radii * rng.uniform(0.8, 1.2, size=(k, 3))
    )

    def img(m):
        im = sitk.GetImageFromArray(m.astype(np.uint8))
        im.SetSpacing(tuple(float(s) for s in sp[::-1]))  # SimpleITK spacing is (x, y, z)
        return im

    f = sitk.HausdorffDistanceImageFilter()
    f.Execute(img(a), img(b))
    diag = float(np.sqrt(np.sum(np.square(sp))))
    assert abs(hausdorff(a, b, sp) - f.GetHausdorffDistance()) <= diag


def test_hausdorff_fast_path_equals_full_grid():
    """Cropping to the surfaces' bounding box must not change any distance."""
    from scipy.ndimage import distance_transform_edt

    sp = (2.5, 3.906, 3.906)
    a = _sphere((40, 40, 40), (50.0, 70.0, 80.0), 25.0, sp)
    b = _sphere((40, 40, 40), (45.0, 80.0, 70.0), 20.0, sp)
    sa, sb = surface(a), surface(b)
    full_ab = distance_transform_edt(~sb, sampling=sp)[sa]
    full_ba = distance_transform_edt(~sa, sampling=sp)[sb]
    d_ab, d_ba = surface_distances(a, b, sp)
    np.testing.assert_allclose(d_ab, full_ab, rtol=0, atol=1e-12)
    np.testing.assert_allclose(d_ba, full_ba, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# the seed's tables and tests

TABLE3 = pd.DataFrame(
    {
        "Baseline": [18.340, 3.098, 25.766, 2.191, 5.092, 8.068, 5.236, 7.699],
        "Seq-Human": [28.388, 4.227, 29.890, 2.481, 5.184, 7.674, 5.211, 7.722],
        "Seq-Automated": [29.610, 3.467, 31.571, 2.523, 5.379, 8.062, 4.563, 8.025],
        "Multi-Automated": [29.922, 3.634, 21.748, 2.438, 4.573, 7.193, 4.279, 7.081],
    },
    index=pd.MultiIndex.from_tuples(SEED_DVH_ROWS, names=["roi", "metric"]),
)


def test_seed_dvh_rows_order():
    assert SEED_DVH_ROWS == [
        ("Brainstem", "D_0.1_cc"),
        ("Brainstem", "mean"),
        ("SpinalCord", "D_0.1_cc"),
        ("SpinalCord", "mean"),
        ("LeftParotid", "D_0.1_cc"),
        ("LeftParotid", "mean"),
        ("RightParotid", "D_0.1_cc"),
        ("RightParotid", "mean"),
    ]


def test_table3_average_and_relative_differences_as_printed():
    t = summarise_mae_rows(TABLE3, baseline="Baseline", decimals=3)
    avg = t.loc[(AVERAGE, "")]
    assert avg.tolist() == [9.436, 11.347, 11.650, 10.109]  # 10.1085 printed half-up as 10.109
    rel = t.loc[(rel_diff_label("Baseline"), "")]
    assert np.isnan(rel["Baseline"])
    assert [round_half_up(v, 3) for v in rel.iloc[1:]] == [-20.252, -23.463, -7.132]
    assert len(t) == len(TABLE3) + 2 and list(t.columns) == list(TABLE3.columns)
    md = to_markdown(t)
    assert "| 29.610 " in md and "| 11.650 " in md and "| -7.132 " in md and "Brain stem" in md


def test_table3_unrounded_average_is_the_plain_row_mean():
    t = summarise_mae_rows(TABLE3, baseline="Baseline")
    assert t.loc[(AVERAGE, "")].to_numpy() == pytest.approx([9.43625, 11.347125, 11.65, 10.1085], abs=1e-12)
    rel = t.loc[(rel_diff_label(), "")].iloc[1:].to_numpy()
    assert rel == pytest.approx([-20.252, -23.463, -7.132], abs=0.01)


def test_table2_relative_differences_from_printed_averages():
    got = [relative_difference(3.900, m) for m in (3.641, 4.301, 3.528)]
    # the paper prints +6.641, −10.28, +9.538
    assert [round_half_up(v, 3) for v in got] == [6.641, -10.282, 9.538]


def _long_errors(rng, n_patients, rows, scale, offset=0.0):
    recs = []
    for i in range(n_patients):
        for roi, metric in rows:
            ref = float(rng.uniform(10, 60))
            err = float(abs(rng.normal(offset, scale)))
            recs.append((f"pt_{i}", roi, metric, ref, ref + err, err, 1.0))
    return pd.DataFrame(recs, columns=list(LONG_COLUMNS))


def test_dvh_mae_table_from_long_frames():
    rng = np.random.default_rng(0)
    base = _long_errors(rng, 6, SEED_DVH_ROWS, 2.0)
    model = _long_errors(rng, 6, SEED_DVH_ROWS, 1.0)
    model = model[~((model["patient_id"] == "pt_0") & (model["roi"] == "Brainstem"))]  # pt_0 lacks Brainstem
    t = dvh_mae_table({"Baseline": base, "Multi": model})
    exp = base.groupby(["roi", "metric"])["abs_error"].mean()
    for key in SEED_DVH_ROWS:
        assert t.loc[key, "Baseline"] == pytest.approx(exp[key])
    bs = model[(model["roi"] == "Brainstem") & (model["metric"] == "mean")]["abs_error"]
    assert len(bs) == 5 and t.loc[("Brainstem", "mean"), "Multi"] == pytest.approx(bs.mean())
    avg = t.loc[(AVERAGE, "")]
    assert avg["Multi"] == pytest.approx(t.iloc[:8]["Multi"].mean())
    expected_rel = (avg["Baseline"] - avg["Multi"]) / avg["Baseline"] * 100
    assert t.loc[(rel_diff_label(), ""), "Multi"] == pytest.approx(expected_rel)
    wide = dvh_errors_wide(model)
    assert wide.shape == (6, 8) and np.isnan(wide.loc["pt_0", ("Brainstem", "mean")])
    md = to_markdown(format_dvh_table(t))
    assert "Brain stem" in md and "D0.1cc" in md and "Rel. diff. vs Baseline (%)" in md and "—" in md


def test_paired_tests_detect_a_better_model_but_not_noise():
    rng = np.random.default_rng(42)
    n = 30
    ids = [f"pt_{i}" for i in range(n)]
    b = pd.DataFrame({m: rng.uniform(3, 6, n) for m in ("better", "noise", "tiny")}, index=ids)
    a = pd.DataFrame(
        {
            "better": b["better"] - 1.0 + rng.normal(0, 0.3, n),
            "noise": b["noise"] + rng.normal(0, 1.0, n),
            "tiny": np.r_[1.0, np.full(n - 1, np.nan)],  # a single pair: not tested
        },
        index=ids,
    )
    a = a.iloc[::-1]  # pairing is by patient id, not by position
    res = paired_one_sided_tests(a, b, alternative="less", alpha=0.05)
    for metric in ("better", "noise"):
        direct = sps.ttest_rel(a.loc[ids, metric], b[metric], alternative="less")
        assert res.at[metric, "t"] == pytest.approx(direct.statistic, rel=1e-12)
        assert res.at[metric, "p"] == pytest.approx(direct.pvalue, rel=1e-12)
        assert res.at[metric, "p_bonferroni"] == pytest.approx(min(1.0, 2 * direct.pvalue), rel=1e-12)
    assert bool(res.at["better", "significant"]) and not bool(res.at["noise", "significant"])
    assert res.at["tiny", "n"] == 1 and np.isnan(res.at["tiny", "p"]) and not res.at["tiny", "significant"]
    # the other direction is not significant for the better model
    assert not paired_one_sided_tests(a, b, alternative="greater").at["better", "significant"]


def test_dvh_tests_between_models():
    rng = np.random.default_rng(3)
    worse = _long_errors(rng, 20, SEED_DVH_ROWS, 3.0, offset=4.0)
    better = worse.copy()
    better["abs_error"] = better["abs_error"] * 0.5
    res = dvh_tests({"Multi": better, "Seq": worse}, model="Multi", reference="Seq")
    assert list(res.index) == SEED_DVH_ROWS and res["significant"].all()
    table = dvh_mae_table({"Seq": worse, "Multi": better}, baseline="Seq")
    marked = format_dvh_table(table, res, marked="Multi")
    assert marked.loc[("Brainstem", "mean"), "Multi"].endswith("†")


def test_contour_table_marks_significant_rois():
    rng = np.random.default_rng(7)
    rois = ("Brainstem", "SpinalCord", "LeftParotid", "RightParotid")
    recs = {"DL-Baseline": [], "Multi-Automated": []}
    for i in range(25):
        for roi in rois:
            d0 = float(rng.uniform(0.6, 0.8))
            h0 = float(rng.uniform(10, 40))
            better = roi == "Brainstem"
            d1 = d0 + (0.05 + rng.normal(0, 0.01) if better else rng.normal(0, 0.02))
            h1 = h0 - (8 + rng.normal(0, 2) if better else rng.normal(0, 3))
            recs["DL-Baseline"].append((f"pt_{i}", roi, d0, h0))
            recs["Multi-Automated"].append((f"pt_{i}", roi, d1, h1))
    frames = {m: pd.DataFrame(r, columns=["patient_id", "roi", "dice", "hd95"]) for m, r in recs.items()}
    t = contour_table(frames)
    assert list(t.index) == [*rois, AVERAGE]
    base_dice = frames["DL-Baseline"].groupby("roi")["dice"].mean()
    assert t.loc["SpinalCord", ("Dice", "DL-Baseline")] == pytest.approx(base_dice["SpinalCord"])
    assert t.loc[AVERAGE, ("Dice", "DL-Baseline")] == pytest.approx(base_dice[list(rois)].mean())
    hd_col = ("HD95", "Multi-Automated")
    assert t.loc[AVERAGE, hd_col] == pytest.approx(t.loc[list(rois), hd_col].mean())
    assert t[("Dice", "significant")].tolist() == [True, False, False, False, False]
    assert t[("HD95", "significant")].tolist() == [True, False, False, False, False]
    # Bonferroni across the 4 ROIs of each metric
    w = {m: f.pivot(index="patient_id", columns="roi", values="dice") for m, f in frames.items()}
    p = sps.ttest_rel(w["Multi-Automated"]["Brainstem"], w["DL-Baseline"]["Brainstem"], alternative="greater").pvalue
    assert t.loc["Brainstem", ("Dice", "p_bonferroni")] == pytest.approx(min(1.0, 4 * p), rel=1e-12)
    shown = format_contour_table(t)
    assert list(shown.columns) == [
        "Dice DL-Baseline",
        "Dice Multi-Automated",
        "HD95 DL-Baseline",
        "HD95 Multi-Automated",
    ]
    assert shown.loc["Brainstem", "Dice Multi-Automated"].endswith("†")
    assert "†" not in shown.loc["SpinalCord", "HD95 Multi-Automated"]
    md = to_markdown(shown)
    assert md.count("†") == 2 and "Brain stem" in md and "Average" in md
