"""Paired variant comparisons of the glioma ablation study: bootstrap CIs of Dice and AUC
differences (ml.glioma.evaluate.paired_*), the ablation table's deltas and ECE before/after
temperature scaling (ml.glioma.selection)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ml.glioma.data import PRED_COLUMNS
from ml.glioma.evaluate import auc_ci, paired_auc_delta, paired_mean_delta
from ml.glioma.selection import ablation_table, uncalibrated, variant_summary


def test_paired_mean_delta_finds_a_constant_gain_and_not_noise():
    rng = np.random.default_rng(0)
    a = rng.uniform(0.3, 0.9, 80)
    d, lo, hi, p = paired_mean_delta(a, a + 0.05)
    assert d == pytest.approx(0.05) and lo == pytest.approx(0.05) and hi == pytest.approx(0.05)
    assert p == 0.0
    d, lo, hi, p = paired_mean_delta(a, a + rng.normal(0, 0.05, 80))
    assert lo < 0 < hi and p > 0.05
    assert all(np.isnan(v) for v in paired_mean_delta([0.5], [0.6]))


def test_paired_auc_delta_is_signed_and_narrower_than_separate_cis():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 120)
    weak = y * 0.6 + rng.normal(0, 0.5, 120)
    strong = y * 2.0 + rng.normal(0, 0.5, 120)
    d, lo, hi, p = paired_auc_delta(y, weak, strong)
    assert d > 0.1 and lo > 0 and p < 0.01
    d2, _, hi2, _ = paired_auc_delta(y, strong, weak)
    assert d2 == pytest.approx(-d) and hi2 < 0
    d, lo, hi, p = paired_auc_delta(y, weak, weak)
    assert d == 0 and lo == 0 and hi == 0 and p == 1.0
    # paired: a small perturbation of the same scores has a much narrower difference CI than the AUC CI
    near = weak + rng.normal(0, 0.05, 120)
    _, lo, hi, _ = paired_auc_delta(y, weak, near)
    _, a_lo, a_hi = auc_ci(y, weak)
    assert hi - lo < 0.5 * (a_hi - a_lo)
    # multi-class scores (n, K) go through the macro one-vs-rest AUC
    y3 = rng.integers(0, 3, 90)
    good = np.eye(3)[y3] + rng.uniform(0, 0.8, (90, 3))
    flat = rng.uniform(0, 1, (90, 3))
    d, lo, _, _ = paired_auc_delta(y3, flat, good)
    assert d > 0.2 and lo > 0


def _preds(ids, y, score, dice, fold=0):
    df = pd.DataFrame({"patient_id": ids, "fold": fold, "dice": dice})
    for c in PRED_COLUMNS:
        df[c] = 0.5
    df["p_idh_mutant"] = score
    df["raw_p_idh_mutant"] = np.clip(score * 1.5 - 0.25, 0, 1)  # overconfident before temperature
    return df


def test_ablation_table_has_paired_deltas_and_ece_before_after_temperature():
    rng = np.random.default_rng(2)
    n = 60
    ids = [f"P{i:03d}" for i in range(n)]
    y = rng.integers(0, 2, n)
    labels = pd.DataFrame({"patient_id": ids, "idh": y, "codel": -1, "grade": -1, "histology": -1})
    good = np.clip(0.5 + 0.35 * (2 * y - 1) + rng.normal(0, 0.15, n), 0, 1)
    bad = rng.uniform(0, 1, n)
    dice = rng.uniform(0.5, 0.9, n)
    oofs = {"gmmas": _preds(ids, y, good, dice), "worse": _preds(ids, y, bad, dice - 0.1)}
    t = ablation_table(oofs, labels, n_boot=300).set_index("variant")
    assert t.at["gmmas", "delta_dice_mean"] == 0 and t.at["gmmas", "delta_auc_idh"] == 0
    assert t.at["worse", "delta_dice_mean"] == pytest.approx(-0.1)
    assert t.at["worse", "delta_dice_mean_hi"] == pytest.approx(-0.1)
    assert t.at["worse", "delta_auc_idh"] < 0 and t.at["worse", "delta_auc_idh_hi"] < 0
    assert t.at["worse", "delta_auc_idh_p"] < 0.05
    assert np.isnan(t.at["worse", "delta_auc_codel"])  # no known labels
    s = variant_summary(oofs["gmmas"], labels, n_boot=50)
    assert s["ece_raw_idh"] != pytest.approx(s["ece_idh"])
    raw = uncalibrated(oofs["gmmas"])
    assert np.allclose(raw["p_idh_mutant"], oofs["gmmas"]["raw_p_idh_mutant"])
