"""ml.glioma.split.cv_folds: patient-level, stratified on IDH x 1p/19q, deterministic, with an
unlabelled pool."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ml.glioma.split import cv_folds, strata


def _labels(n: int = 88, seed: int = 3) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    idh = rng.choice(["WT", "Mutant", None], size=n, p=[0.25, 0.7, 0.05])
    codel = rng.choice(["non-codel", "codel", None], size=n, p=[0.7, 0.25, 0.05])
    df = pd.DataFrame(
        {
            "patient_id": [f"pt-{i:016x}" for i in range(n)],
            "histology": rng.choice(["astrocytoma", "oligodendroglioma"], size=n),
            "grade": rng.choice(["G2", "G3"], size=n),
            "idh": idh,
            "codel": codel,
        }
    )
    unlabelled = pd.DataFrame(
        {"patient_id": [f"pt-{i:016x}" for i in range(n, n + 4)], **{c: [None] * 4 for c in df.columns[1:]}}
    )
    return pd.concat([df, unlabelled], ignore_index=True)


def test_folds_are_patient_level_stratified_and_deterministic():
    labels = _labels()
    folds = cv_folds(labels, n_folds=5, seed=0)
    assert len(folds) == len(labels) and not folds["patient_id"].duplicated().any()
    assert folds.groupby("patient_id")["fold"].nunique().max() == 1
    pool = folds[folds["fold"] == -1]
    assert len(pool) == 4  # every label unknown -> unlabelled pool
    lab = folds[folds["fold"] >= 0]
    assert set(lab["fold"]) == set(range(5))
    per = lab.groupby(["stratum", "fold"]).size().unstack(fill_value=0).reindex(columns=range(5), fill_value=0)
    assert ((per.max(axis=1) - per.min(axis=1)) <= 1).all(), per
    sizes = lab["fold"].value_counts()
    assert sizes.max() - sizes.min() <= 1
    assert {"unknown/non-codel", "Mutant/codel", "WT/non-codel"} <= set(lab["stratum"])

    # same seed -> same folds, whatever the row order; another seed -> another assignment
    shuffled = labels.sample(frac=1.0, random_state=1).reset_index(drop=True)
    pd.testing.assert_frame_equal(cv_folds(shuffled, n_folds=5, seed=0), folds)
    assert not cv_folds(labels, n_folds=5, seed=1)["fold"].equals(folds["fold"])


def test_integer_codes_and_validation():
    codes = pd.DataFrame({"patient_id": ["a", "b", "c"], "idh": [1, 0, -1], "codel": [1, -1, -1]})
    st = strata(codes).set_index("patient_id")
    assert list(st["stratum"]) == ["Mutant/codel", "WT/unknown", "unknown/unknown"]
    assert list(st["labelled"]) == [True, True, False]
    assert cv_folds(codes, n_folds=2).set_index("patient_id").loc["c", "fold"] == -1
    with pytest.raises(ValueError, match="duplicate"):
        cv_folds(pd.concat([codes, codes]), n_folds=2)
    with pytest.raises(ValueError, match="n_folds"):
        cv_folds(codes, n_folds=1)
