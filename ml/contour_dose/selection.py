"""The champion/challenger rule of the contour + dose family's registered models.

Each registered version carries its held-out metrics as version tags (``contour_dose_evaluation``):
``test_dose_score`` (OpenKBP dose score, mean absolute error in Gy: lower is better) and
``test_mean_dice`` (mean Dice over the model's ROIs: higher is better), and the digest of the cache
(patients, split, preprocessing) it was evaluated on.

Rule (``champion_decision``): no champion -> promote. Otherwise both versions must have been
evaluated on the same cache digest (the same held-out patients): a comparison across splits says
nothing, so the champion stays and the reason says to re-evaluate it. On the same split the
challenger is promoted iff it is no worse on every task metric both versions have (by more than
``tolerance``) and better on at least one -- a multi-task model may not buy a better dose with
worse contours, or the reverse.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

__all__ = ["METRICS", "champion_decision"]

#: version-tag metric -> True when higher is better
METRICS = {"test_dose_score": False, "test_mean_dice": True}


def _num(x) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return math.nan
    return v


def champion_decision(
    challenger: Mapping[str, str | float], champion: Mapping[str, str | float] | None, tolerance: float = 0.0
) -> dict:
    """``challenger``/``champion``: version tags (metrics and ``cache_digest``). Returns
    ``promote`` (bool), ``reason`` and, per compared metric, the two values."""
    if champion is None:
        return {"promote": True, "reason": "no champion yet"}
    if str(challenger.get("cache_digest", "")) != str(champion.get("cache_digest", "")):
        return {
            "promote": False,
            "reason": "evaluated on different data (cache digests differ): champion stays; re-evaluate the champion "
            "on the current split to compare",
        }
    better, worse, compared = [], [], {}
    for metric, higher in METRICS.items():
        a, b = _num(challenger.get(metric)), _num(champion.get(metric))
        if math.isnan(a) or math.isnan(b):
            continue
        compared[metric] = (a, b)
        gain = (a - b) if higher else (b - a)
        if gain > tolerance:
            better.append(metric)
        elif gain < -tolerance:
            worse.append(metric)
    if not compared:
        return {"promote": False, "reason": "no metric both versions have: champion stays"}
    values = "; ".join(f"{m} {a:.4f} vs {b:.4f}" for m, (a, b) in compared.items())
    if worse:
        return {"promote": False, "reason": f"worse on {', '.join(worse)} ({values}): champion stays", **compared}
    if not better:
        return {"promote": False, "reason": f"not better on any metric ({values}): champion stays", **compared}
    return {"promote": True, "reason": f"better on {', '.join(better)}, worse on none ({values})", **compared}
