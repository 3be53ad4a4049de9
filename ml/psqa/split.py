"""A plan-level train/val/test split that never leaks and never reshuffles.

* Unit = plan (several plans of one patient all go to the same split: the patient pseudonym
  is the grouping key, so a patient's later plans cannot leak into another split).
* Stratified on "failing" (GPR < 90 % at the stratification criterion, default 2%/2mm).
* Stable: an existing assignment is never changed; new patients are assigned one by one (in
  keyed-hash order, deterministic) to the split that is furthest below its target share within
  the patient's stratum. Retraining on new plans therefore keeps the test set of earlier
  rounds fixed, and champion/challenger comparisons stay fair.
"""

from __future__ import annotations

import hashlib

import pandas as pd

__all__ = ["DEFAULT_FRACTIONS", "SPLITS", "assign_splits"]

SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.7, 0.15, 0.15)


def _h(text: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{text}".encode()).hexdigest()


def assign_splits(
    plans: pd.DataFrame,
    existing: pd.DataFrame | None = None,
    *,
    seed: int = 0,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
    strat_column: str = "gpr_2_2",
    threshold: float = 90.0,
) -> pd.DataFrame:
    """``plans``: plan_key, patient_id, <strat_column>. Returns plan_key, patient_id, stratum, split."""
    plans = plans[["plan_key", "patient_id", strat_column]].copy()
    plans["stratum"] = (plans[strat_column] < threshold).map({True: "fail", False: "pass"})
    known: dict[str, str] = {}  # patient -> split
    if existing is not None and len(existing):
        for pid, split in zip(existing["patient_id"], existing["split"], strict=True):
            known.setdefault(pid, split)
    # a patient's stratum: failing if any of their plans fails (rare patients matter most)
    pat = plans.groupby("patient_id")["stratum"].agg(lambda s: "fail" if (s == "fail").any() else "pass")
    counts = {st: dict.fromkeys(SPLITS, 0) for st in ("fail", "pass")}
    for pid, st in pat.items():
        if pid in known:
            counts[st][known[pid]] += 1
    new = sorted((p for p in pat.index if p not in known), key=lambda p: _h(p, seed))
    for pid in new:
        st = pat[pid]
        total = sum(counts[st].values()) + 1
        deficit = {sp: fractions[i] * total - counts[st][sp] for i, sp in enumerate(SPLITS)}
        split = max(SPLITS, key=lambda sp: (deficit[sp], -SPLITS.index(sp)))
        known[pid] = split
        counts[st][split] += 1
    plans["split"] = plans["patient_id"].map(known)
    return plans[["plan_key", "patient_id", "stratum", "split"]].sort_values("plan_key").reset_index(drop=True)
