"""A patient-level train/val/test split for the contour + dose models (fixed by seed, stable).

The OpenKBP challenge split is by patient number (train 1-200, validation 201-240); only the
169 complete training patients are available here, so they are re-split by patient. Order is
a keyed hash of the patient id (seed-dependent, independent of listing order); counts are
``round(n * fraction)`` for val and test (169 -> 135 / 17 / 17 with the default 0.8/0.1/0.1).
An existing assignment is never changed: newly arrived patients are appended to the split
furthest below its target share, so every model trained later sees the same test patients.
"""

from __future__ import annotations

import hashlib

import pandas as pd

__all__ = ["DEFAULT_FRACTIONS", "SPLITS", "patient_split"]

SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)


def _h(text: str, seed: int) -> str:
    return hashlib.sha256(f"contour-dose:{seed}:{text}".encode()).hexdigest()


def patient_split(
    patient_ids: list[str],
    existing: pd.DataFrame | None = None,
    *,
    seed: int = 0,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
) -> pd.DataFrame:
    """-> DataFrame(patient_id, split) covering ``patient_ids`` (and keeping ``existing`` rows)."""
    if abs(sum(fractions) - 1) > 1e-6 or min(fractions) < 0:
        raise ValueError(f"fractions must be non-negative and sum to 1, got {fractions}")
    ids = sorted(set(patient_ids), key=lambda p: _h(p, seed))
    known = (
        {} if existing is None or existing.empty else dict(zip(existing["patient_id"], existing["split"], strict=True))
    )
    new = [p for p in ids if p not in known]
    if not known:
        n = len(ids)
        n_val, n_test = round(n * fractions[1]), round(n * fractions[2])
        if n >= 3:
            n_val, n_test = max(n_val, 1), max(n_test, 1)
        out = dict.fromkeys(ids[:n_test], "test")
        out.update(dict.fromkeys(ids[n_test : n_test + n_val], "val"))
        out.update(dict.fromkeys(ids[n_test + n_val :], "train"))
    else:
        out = dict(known)
        counts = {s: sum(1 for v in known.values() if v == s) for s in SPLITS}
        for p in new:
            total = sum(counts.values()) + 1
            deficit = {s: fractions[i] * total - counts[s] for i, s in enumerate(SPLITS)}
            s = max(SPLITS, key=lambda k: (deficit[k], -SPLITS.index(k)))
            out[p] = s
            counts[s] += 1
    df = pd.DataFrame({"patient_id": list(out), "split": list(out.values())})
    return df.sort_values(["split", "patient_id"]).reset_index(drop=True)
