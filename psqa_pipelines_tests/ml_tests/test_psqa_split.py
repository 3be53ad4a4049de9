"""The plan-level split: grouped by patient, stratified on failing plans, stable across rounds."""

import numpy as np
import pandas as pd

from ml.psqa.split import assign_splits


def _plans(n_patients: int, seed: int, start: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(start, start + n_patients):
        for k in range(int(rng.integers(1, 3))):
            rows.append(
                {
                    "plan_key": f"plan-{p}-{k}",
                    "patient_id": f"pat-{p}",
                    "gpr_2_2": float(rng.choice([85.0, 97.0], p=[0.15, 0.85])),
                }
            )
    return pd.DataFrame(rows)


def test_split_groups_patients_and_stratifies():
    plans = _plans(300, 0)
    s = assign_splits(plans, seed=0)
    assert len(s) == len(plans) and s["split"].notna().all()
    assert (s.groupby("patient_id")["split"].nunique() == 1).all()
    shares = s.drop_duplicates("patient_id")["split"].value_counts(normalize=True)
    assert abs(shares["train"] - 0.7) < 0.03 and abs(shares["test"] - 0.15) < 0.03
    fail_pats = s[s["stratum"] == "fail"].drop_duplicates("patient_id")
    fail_share = fail_pats["split"].value_counts(normalize=True)
    assert abs(fail_share["test"] - 0.15) < 0.06 and abs(fail_share["train"] - 0.7) < 0.08


def test_split_is_stable_when_plans_are_added():
    first = _plans(100, 1)
    s1 = assign_splits(first, seed=0)
    more = pd.concat([first, _plans(40, 2, start=100)], ignore_index=True)
    s2 = assign_splits(more, s1, seed=0)
    old = s2[s2["plan_key"].isin(s1["plan_key"])].set_index("plan_key")["split"]
    assert old.equals(s1.set_index("plan_key")["split"].loc[old.index])
    # a later plan of a known patient joins that patient's split
    late = pd.DataFrame([{"plan_key": "plan-3-9", "patient_id": "pat-3", "gpr_2_2": 99.0}])
    s3 = assign_splits(pd.concat([more, late], ignore_index=True), s2, seed=0)
    assert s3.set_index("plan_key").loc["plan-3-9", "split"] == s2[s2["patient_id"] == "pat-3"]["split"].iloc[0]
    # deterministic
    assert assign_splits(more, s1, seed=0).equals(s2)
