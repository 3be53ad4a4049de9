"""ml.glioma.evaluate: segmentation metrics, ECE, bootstrap AUC, classification tables, baselines,
radiomics features (synthetic shapes and 3 real lgg-mri patients) and plots."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from ml.glioma.data import PRED_COLUMNS, TASKS
from ml.glioma.evaluate import (
    auc,
    auc_ci,
    binary_metrics,
    classification_table,
    compare_table,
    confusion,
    confusion_png,
    dice,
    ece,
    hd95,
    majority_baseline,
    radiomics_baseline,
    radiomics_features,
    reliability_curve,
    reliability_png,
    roc_png,
    segmentation_table,
)

LGG = Path("/work/shared/datasets/lgg-mri")
PNG = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------- segmentation
def _square(shape=(1, 40, 40), r0=10, c0=10, side=10) -> np.ndarray:
    m = np.zeros(shape, np.uint8)
    m[:, r0 : r0 + side, c0 : c0 + side] = 1
    return m


def test_dice_and_hd95_on_offset_squares():
    a, b = _square(c0=10), _square(c0=14)  # 10 x 10 squares, one slice, shifted 4 columns
    assert dice(a, b) == pytest.approx(2 * 60 / 200)
    # one slice: every voxel is surface; per row the distances are 4,3,2,1 and six 0s in each direction,
    # so the pooled 95th percentile is the shift
    assert hd95(a, b) == pytest.approx(4.0)
    assert hd95(a, b, spacing=(1.0, 1.0, 0.5)) == pytest.approx(2.0)
    assert dice(a, a) == 1.0 and hd95(a, a) == 0.0
    empty = np.zeros_like(a)
    assert dice(empty, empty) == 1.0 and hd95(empty, empty) == 0.0
    assert dice(a, empty) == 0.0 and np.isnan(hd95(a, empty))


def _brute_hd95(p: np.ndarray, t: np.ndarray) -> float:
    def surf(m):
        pad = np.pad(m, 1)
        inner = np.ones_like(m, bool)
        for ax in range(3):
            for sh in (-1, 1):
                inner &= np.roll(pad, sh, axis=ax)[1:-1, 1:-1, 1:-1]
        return np.argwhere(m & ~inner).astype(float)

    sp, st = surf(p), surf(t)
    d = np.sqrt(((sp[:, None, :] - st[None, :, :]) ** 2).sum(-1))
    return float(np.percentile(np.concatenate([d.min(axis=1), d.min(axis=0)]), 95))


def test_hd95_matches_brute_force_on_3d_shapes():
    z, y, x = np.mgrid[:12, :20, :20]
    ball = (z - 6) ** 2 + (y - 10) ** 2 + (x - 10) ** 2 <= 16
    box = (abs(z - 5) <= 2) & (abs(y - 9) <= 4) & (abs(x - 12) <= 3)
    assert hd95(ball, box) == pytest.approx(_brute_hd95(ball, box))
    table = segmentation_table({"a": ball, "b": box, "only_pred": box}, {"a": box, "b": box})
    assert list(table["patient_id"]) == ["a", "b"]
    assert table.loc[1, "dice"] == 1.0 and table.loc[0, "true_voxels"] == int(box.sum())
    assert table.loc[0, "pred_voxels"] == int(ball.sum())


# ---------------------------------------------------------------------------------------------- calibration
def test_ece_zero_for_calibrated_bins():
    # 4 at p=0.75 (3 positive) and 20 at p=0.45 -> predicts class 0 with confidence 0.55 (11 negatives)
    p = np.r_[np.full(4, 0.75), np.full(20, 0.45)]
    y = np.r_[[1, 1, 1, 0], np.zeros(11), np.ones(9)]
    assert ece(y, p) == pytest.approx(0.0, abs=1e-12)


def test_ece_known_miscalibrated_value_binary_and_multiclass():
    # 4 at p=0.85 with half correct: |0.5 - 0.85| = 0.35; 6 at p=0.35 (class 0, conf 0.65), half correct: 0.15
    p = np.r_[np.full(4, 0.85), np.full(6, 0.35)]
    y = np.r_[[1, 1, 0, 0], [0, 0, 0, 1, 1, 1]]
    assert ece(y, p) == pytest.approx(0.4 * 0.35 + 0.6 * 0.15)
    # same confidences as 3-class rows
    P = np.r_[np.tile([0.05, 0.10, 0.85], (4, 1)), np.tile([0.65, 0.20, 0.15], (6, 1))]
    y3 = np.r_[[2, 2, 0, 1], [0, 0, 0, 1, 2, 1]]
    assert ece(y3, P) == pytest.approx(0.23)
    curve = reliability_curve(y3, P)
    assert len(curve) == 10 and curve["count"].sum() == 10
    assert curve.loc[8, "count"] == 4 and curve.loc[8, "acc"] == pytest.approx(0.5)
    assert curve.loc[6, "count"] == 6 and curve.loc[6, "conf"] == pytest.approx(0.65)


def test_ece_bins_are_right_closed():
    # conf exactly 0.5 (binary p=0.5 -> class 0) falls in (0.4, 0.5]; 1.0 falls in (0.9, 1.0]
    curve = reliability_curve([0, 1], [0.5, 1.0])
    assert curve.loc[4, "count"] == 1 and curve.loc[4, "acc"] == 1.0
    assert curve.loc[9, "count"] == 1


# ---------------------------------------------------------------------------------------------- discrimination
def _scores(n: int, seed: int, shift: float = 1.0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    return y, rng.normal(size=n) + shift * y


def test_auc_matches_sklearn_binary_and_macro_ovr():
    y, p = _scores(80, 1)
    p[:10] = np.round(p[:10])  # ties
    assert auc(y, p) == pytest.approx(roc_auc_score(y, p))
    rng = np.random.default_rng(2)
    y3 = rng.integers(0, 3, 90)
    P = rng.dirichlet([1, 1, 1], 90)
    P[np.arange(90), y3] += 0.3
    P /= P.sum(axis=1, keepdims=True)
    assert auc(y3, P) == pytest.approx(roc_auc_score(y3, P, multi_class="ovr", average="macro"))
    assert np.isnan(auc(np.ones(5), np.linspace(0, 1, 5)))


def test_auc_ci_contains_point_and_narrows_with_n():
    y, p = _scores(40, 3)
    a, lo, hi = auc_ci(y, p, n_boot=1000, seed=0)
    assert lo <= a <= hi and 0 <= lo < hi <= 1
    assert auc_ci(y, p, n_boot=1000, seed=0) == (a, lo, hi)  # seeded
    y2, p2 = _scores(800, 3)
    a2, lo2, hi2 = auc_ci(y2, p2, n_boot=1000, seed=0)
    assert lo2 <= a2 <= hi2
    assert hi2 - lo2 < 0.5 * (hi - lo)


def test_binary_metrics_and_confusion():
    y = np.array([1, 1, 1, 0, 0, 0, 0, 1])
    p = np.array([0.9, 0.6, 0.2, 0.1, 0.5, 0.3, 0.2, 0.5])
    m = binary_metrics(y, p)  # yhat = 1 1 0 0 1 0 0 1 -> TP 3, FN 1, TN 3, FP 1
    assert m["sensitivity"] == 0.75 and m["specificity"] == 0.75 and m["balanced_accuracy"] == 0.75
    assert m["accuracy"] == 0.75 and m["f1"] == pytest.approx(6 / 8) and m["n"] == 8 and m["n_pos"] == 4
    cm = confusion(y, (p >= 0.5).astype(int), [0, 1], ["neg", "pos"])
    assert cm.loc["pos", "pos"] == 3 and cm.loc["neg", "pos"] == 1 and cm.to_numpy().sum() == 8


# ---------------------------------------------------------------------------------------------- tables
def _cohort(n: int = 60, seed: int = 0):
    """Labels, folds and features where f_idh separates IDH, f_codel 1p/19q and f_hist histology."""
    rng = np.random.default_rng(seed)
    ids = [f"p{i:03d}" for i in range(n)]
    idh = rng.integers(0, 2, n)
    codel = rng.integers(0, 2, n)
    grade = rng.integers(0, 2, n)
    hist = rng.integers(0, 3, n)
    labels = pd.DataFrame({"patient_id": ids, "histology": hist, "grade": grade, "idh": idh, "codel": codel})
    labels.loc[0, "idh"] = -1
    labels.loc[1, "histology"] = -1
    feats = pd.DataFrame(
        {
            "patient_id": ids,
            "f_idh": 3.0 * idh + rng.normal(0, 0.5, n),
            "f_codel": 3.0 * codel + rng.normal(0, 0.5, n),
            "f_hist": 3.0 * hist + rng.normal(0, 0.5, n),
            "noise": rng.normal(size=n),
            "mostly_nan": np.where(rng.random(n) < 0.8, np.nan, 1.0),
        }
    )
    folds = pd.DataFrame({"patient_id": ids, "fold": np.arange(n) % 5})
    return labels, folds, feats


def test_radiomics_baseline_separates_and_is_out_of_fold():
    labels, folds, feats = _cohort()
    unl = pd.DataFrame({"patient_id": ["u0"], "fold": [-1]})
    feats_u = pd.concat([feats, feats.iloc[[2]].assign(patient_id="u0")], ignore_index=True)
    preds = radiomics_baseline(feats_u, labels, pd.concat([folds, unl], ignore_index=True))
    assert set(PRED_COLUMNS) <= set(preds.columns)
    assert preds.set_index("patient_id").loc["u0", "fold"] == -1
    table = classification_table(preds, labels, n_boot=200).set_index("task")
    assert table.loc["idh", "auc"] > 0.9 and table.loc["codel", "auc"] > 0.9
    assert table.loc["histology", "auc"] > 0.9
    assert table.loc["idh", "n"] == 59 and table.loc["histology", "n"] == 59  # -1 rows excluded
    assert table.loc["grade", "auc"] < 0.8  # no signal for grade
    hist = preds[["p_astrocytoma", "p_oligoastrocytoma", "p_oligodendroglioma"]].to_numpy()
    np.testing.assert_allclose(hist.sum(axis=1), 1.0)
    # by construction: rewriting the held-out fold's labels (every task) cannot change its predictions
    held = folds.loc[folds["fold"] == 2, "patient_id"]
    flipped = labels.copy()
    sel = flipped["patient_id"].isin(held)
    for t in ("idh", "codel", "grade"):
        flipped.loc[sel, t] = 1 - flipped.loc[sel, t].clip(lower=0)
    flipped.loc[sel, "histology"] = (flipped.loc[sel, "histology"].clip(lower=0) + 1) % 3
    again = radiomics_baseline(feats, flipped, folds)
    a = preds[preds["patient_id"].isin(held)].set_index("patient_id")[PRED_COLUMNS]
    b = again[again["patient_id"].isin(held)].set_index("patient_id")[PRED_COLUMNS]
    pd.testing.assert_frame_equal(a.sort_index(), b.sort_index())
    # ... while the other folds' predictions do change (they trained on those labels)
    other = again[~again["patient_id"].isin(held)].set_index("patient_id")[PRED_COLUMNS].sort_index()
    base = preds[(~preds["patient_id"].isin(held)) & (preds["fold"] >= 0)].set_index("patient_id")[PRED_COLUMNS]
    assert not np.allclose(other.to_numpy(), base.sort_index().to_numpy())


def test_majority_baseline_frequencies_and_auc_half():
    labels, folds, _ = _cohort()
    preds = majority_baseline(labels, folds)
    assert len(preds) == len(folds)
    train = labels[folds["fold"] != 0]
    expected = (train.loc[train["idh"] >= 0, "idh"] == 1).mean()
    assert np.allclose(preds.loc[preds["fold"] == 0, "p_idh_mutant"], expected)
    for k in range(5):  # within a fold every patient has the same score: AUC 0.5
        f = preds[preds["fold"] == k]
        assert classification_table(f, labels, n_boot=10).set_index("task").loc["idh", "auc"] == pytest.approx(0.5)
    # pooled over folds: at or below 0.5 (a fold with more positives trained on fewer -> lower score)
    table = classification_table(preds, labels, n_boot=100).set_index("task")
    assert table.loc["idh", "auc"] <= 0.5 and table.loc["histology", "auc"] <= 0.5


def test_classification_table_uses_cv_rows_and_compare_table():
    labels, folds, _ = _cohort(40)
    rng = np.random.default_rng(5)
    preds = pd.DataFrame({"patient_id": labels["patient_id"], "fold": folds["fold"]})
    preds["p_idh_mutant"] = np.where(labels["idh"] == 1, 0.9, 0.1)
    for c in ("p_codel", "p_grade_g3"):
        preds[c] = rng.random(len(preds))
    onehot = np.eye(3)[labels["histology"].clip(lower=0)]
    for k, name in enumerate(TASKS["histology"]):
        preds[f"p_{name}"] = 0.8 * onehot[:, k] + 0.2 / 3
    final = preds.assign(fold=-1, p_idh_mutant=0.5)  # final-model rows must be ignored
    table = classification_table(pd.concat([preds, final]), labels, n_boot=200)
    assert list(table["task"]) == ["idh", "codel", "grade", "histology"]
    assert {"n", "n_pos", "auc", "auc_lo", "auc_hi", "balanced_accuracy", "sensitivity", "specificity", "ece"} <= set(
        table.columns
    )
    t = table.set_index("task")
    assert t.loc["idh", "auc"] == 1.0 and t.loc["idh", "sensitivity"] == 1.0 and t.loc["idh", "specificity"] == 1.0
    assert t.loc["idh", "ece"] == pytest.approx(0.1)
    assert t.loc["histology", "balanced_accuracy"] == 1.0 and np.isnan(t.loc["histology", "sensitivity"])
    assert t.loc["histology", "ece"] == pytest.approx(1 - (0.8 + 0.2 / 3))
    with pytest.raises(ValueError):
        classification_table(pd.concat([preds, preds]), labels, n_boot=10)
    long = compare_table({"model": table, "majority": classification_table(majority_baseline(labels, folds), labels)})
    assert len(long) == 8 and long.loc[0, "auc_ci"].startswith("1.00 [")
    wide = compare_table({"model": table}, wide=True)
    assert list(wide.columns) == ["idh", "codel", "grade", "histology"] and wide.index.tolist() == ["model"]
    for png in (
        reliability_png(preds, labels, "idh", preds_after=preds.assign(p_idh_mutant=0.7)),
        reliability_png(preds, labels, "histology"),
        roc_png({"model": preds, "majority": majority_baseline(labels, folds)}, labels, "idh"),
        roc_png({"model": preds}, labels, "histology"),
        confusion_png(preds, labels, "histology"),
        confusion_png(preds, labels, "grade"),
    ):
        assert png.startswith(PNG)


# ---------------------------------------------------------------------------------------------- radiomics
def test_radiomics_shape_features_disc_vs_ellipse():
    yy, xx = np.mgrid[:64, :64]
    disc = ((yy - 32) ** 2 + (xx - 32) ** 2 <= 15**2)[None]
    ellipse = (((yy - 32) / 25.0) ** 2 + ((xx - 32) / 6.0) ** 2 <= 1)[None]
    img = np.full((1, 3, 64, 64), 100.0)
    img[0, :, 2:62, 2:62] = 100.0
    img[0, :, disc[0]] = 200.0
    fd = radiomics_features(img, disc)
    fe = radiomics_features(img, ellipse)
    assert fd["volume_voxels"] == disc.sum() and fd["n_tumour_slices"] == 1 and fd["n_components"] == 1
    assert 0.85 < fd["circularity"] <= 1.05 and fe["circularity"] < 0.7 * fd["circularity"]
    assert fd["eccentricity"] < 0.1 and fe["eccentricity"] > 0.9
    assert fd["solidity"] > 0.9 and fe["solidity"] > 0.85
    assert fd["perimeter"] == pytest.approx(2 * np.pi * 15, rel=0.1)
    assert fd["t1_mean"] == 200.0 and fd["flair_tumour_brain_ratio"] == pytest.approx(2.0)
    assert np.isnan(fd["t1c_skewness"])  # constant intensity inside the tumour
    # two separate blobs over 3 slices
    two = np.zeros((3, 32, 32), bool)
    two[0:2, 2:8, 2:8] = True
    two[1:3, 20:30, 20:30] = True
    f2 = radiomics_features(np.ones((3, 4, 32, 32)), two, present=[True, False, True, True])
    assert f2["n_components"] == 2 and f2["n_tumour_slices"] == 3 and f2["largest_area"] == 136
    assert np.isnan(f2["t1c_mean"]) and f2["flair_mean"] == 1.0  # C=4 -> SEQUENCES names; absent -> NaN
    empty = radiomics_features(np.ones((2, 3, 8, 8)), np.zeros((2, 8, 8)))
    assert empty["volume_voxels"] == 0 and np.isnan(empty["circularity"])


def test_radiomics_features_on_real_lgg_patients():
    pdir = LGG / "patients"
    if not pdir.is_dir():
        pytest.skip(f"{pdir} not available")
    meta = pd.read_csv(LGG / "labels.csv").set_index("patient_id")
    rows = []
    for path in sorted(pdir.glob("*.npz"))[:3]:
        with np.load(path) as z:
            img, msk = z["image"], z["mask"]
        f = radiomics_features(img, msk)
        assert f["volume_voxels"] == msk.sum() > 0
        assert f["n_tumour_slices"] == meta.loc[path.stem, "n_tumour_slices"]
        for k in ("circularity", "solidity", "extent", "eccentricity", "surface_to_volume", "flair_mean"):
            assert np.isfinite(f[k]), k
        assert 0 < f["solidity"] <= 1 and 0 < f["extent"] <= 1 and 0 <= f["eccentricity"] < 1
        assert f["flair_tumour_brain_ratio"] > 1.0  # FLAIR abnormality is hyperintense
        rows.append({"patient_id": path.stem, **f})
    assert len(pd.DataFrame(rows)) == 3


def test_roc_png_one_class_no_warning():
    """A task with one class among the scored patients draws no curve and raises no warning."""
    import warnings

    labels = pd.DataFrame(
        {"patient_id": ["a", "b"], "histology": [0, 0], "grade": [1, 1], "idh": [1, 1], "codel": [0, 0]}
    )
    preds = pd.DataFrame(
        {"patient_id": ["a", "b"], "fold": [0, 0], "p_idh_mutant": [0.2, 0.8], "p_codel": [0.1, 0.3],
         "p_grade_g3": [0.5, 0.6], "p_oligodendroglioma": [0.2, 0.3], "p_astrocytoma": [0.5, 0.4],
         "p_oligoastrocytoma": [0.3, 0.3]}
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        png = roc_png({"m": preds}, labels, "idh")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
