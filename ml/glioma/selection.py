"""Pooled out-of-fold summaries for model selection: one number set per variant, the ablation and
missing-modality tables, and the champion/challenger rule of the registered ``glioma-gmmas`` model.

Inputs are the frames ``ml.glioma.cv`` writes (pooled OOF predictions with ``dice``; the
``missing_<subset>.csv`` rows with ``removed``) and the labels frame of ``ml.glioma.data.read_labels``.
The metrics themselves come from ``ml.glioma.evaluate`` (bootstrap AUC CIs, balanced accuracy).

Pooled score (``pooled_score``): the mean of the mean OOF Dice and the AUC of every task with a
defined AUC (both classes among the held-out patients) -- one "higher is better" number in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd

from ml.glioma.data import PRED_COLUMNS
from ml.glioma.evaluate import classification_table, paired_auc_delta, paired_mean_delta, task_arrays

__all__ = [
    "SUMMARY_TASKS",
    "ablation_table",
    "champion_decision",
    "first_patients",
    "missing_modality_table",
    "paired_deltas",
    "pooled_score",
    "uncalibrated",
    "variant_summary",
]

SUMMARY_TASKS = ("idh", "codel", "grade", "histology")


def first_patients(folds: pd.DataFrame, n: int) -> pd.DataFrame:
    """The first ``n`` labelled patients of a folds table (``patient_id, fold``), taken round-robin over
    the folds in patient order so every fold keeps patients (demos and tests on a few cases); the
    unlabelled pool (fold -1) is left out."""
    lab = folds[folds["fold"] >= 0].sort_values(["fold", "patient_id"])
    lab = lab.assign(_rank=lab.groupby("fold").cumcount()).sort_values(["_rank", "fold"])
    return lab.head(max(n, 0)).drop(columns="_rank").sort_values("patient_id").reset_index(drop=True)


def _finite(x) -> bool:
    try:
        return x is not None and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def pooled_score(summary: Mapping[str, float]) -> float:
    """Mean of ``dice_mean`` and the finite ``auc_<task>`` values of a :func:`variant_summary` (NaN if none)."""
    vals = [summary.get("dice_mean")] + [summary.get(f"auc_{t}") for t in SUMMARY_TASKS]
    vals = [float(v) for v in vals if _finite(v)]
    return float(np.mean(vals)) if vals else float("nan")


def uncalibrated(preds: pd.DataFrame) -> pd.DataFrame:
    """The predictions before temperature scaling: every ``raw_<column>`` (``ml.glioma.predict``:
    softmax of the aggregated logits, T = 1, no MC dropout) under the scored column name."""
    df = preds.copy()
    for c in PRED_COLUMNS:
        if f"raw_{c}" in df:
            df[c] = df[f"raw_{c}"]
    return df


def variant_summary(preds: pd.DataFrame, labels: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> dict:
    """One prediction set (OOF rows, optionally with ``dice``) -> ``n_patients, dice_mean, dice_std``,
    per task ``auc_<task>, auc_lo_<task>, auc_hi_<task>, bacc_<task>, ece_<task>`` (after temperature
    scaling), ``ece_raw_<task>`` (before it, when the ``raw_`` columns are there) and ``score``
    (:func:`pooled_score`)."""
    out: dict = {"n_patients": int(preds["patient_id"].nunique()) if len(preds) else 0}
    dice = preds["dice"].dropna().to_numpy(float) if "dice" in preds else np.zeros(0)
    out["dice_mean"] = float(dice.mean()) if len(dice) else float("nan")
    out["dice_std"] = float(dice.std()) if len(dice) else float("nan")
    table = classification_table(preds, labels, n_boot=n_boot, seed=seed).set_index("task") if len(preds) else None
    has_raw = any(f"raw_{c}" in preds for c in PRED_COLUMNS)
    raw = (
        classification_table(uncalibrated(preds), labels, n_boot=0, seed=seed).set_index("task")
        if len(preds) and has_raw
        else None
    )
    for t in SUMMARY_TASKS:
        row = table.loc[t] if table is not None and t in table.index else None
        for key, col in (
            ("auc", "auc"),
            ("auc_lo", "auc_lo"),
            ("auc_hi", "auc_hi"),
            ("bacc", "balanced_accuracy"),
            ("ece", "ece"),
        ):
            out[f"{key}_{t}"] = float(row[col]) if row is not None else float("nan")
        out[f"ece_raw_{t}"] = float(raw.at[t, "ece"]) if raw is not None and t in raw.index else float("nan")
    out["score"] = pooled_score(out)
    return out


def paired_deltas(
    ref: pd.DataFrame, var: pd.DataFrame, labels: pd.DataFrame, n_boot: int = 1000, seed: int = 0
) -> dict[str, float]:
    """Variant minus reference on the patients both predicted (paired bootstrap over patients,
    ``ml.glioma.evaluate.paired_mean_delta`` / ``paired_auc_delta``): ``delta_dice_mean`` with
    ``_lo, _hi, _p`` and the same for ``delta_auc_<task>``."""
    out: dict[str, float] = {}
    if "dice" in ref and "dice" in var:
        d = ref[["patient_id", "dice"]].merge(var[["patient_id", "dice"]], on="patient_id", suffixes=("_r", "_v"))
        d = d.dropna()
        vals = paired_mean_delta(d["dice_r"], d["dice_v"], n_boot=n_boot, seed=seed)
    else:
        vals = (float("nan"),) * 4
    key = "delta_dice_mean"
    out.update(dict(zip((key, f"{key}_lo", f"{key}_hi", f"{key}_p"), vals, strict=True)))
    for t in SUMMARY_TASKS:
        yr, pr, ir = task_arrays(ref, labels, t)
        _, pv, iv = task_arrays(var, labels, t)
        common = sorted(set(ir) & set(iv))
        key = f"delta_auc_{t}"
        if len(common) < 2:
            vals = (float("nan"),) * 4
        else:
            ai, bi = {p: i for i, p in enumerate(ir)}, {p: i for i, p in enumerate(iv)}
            a = [ai[p] for p in common]
            b = [bi[p] for p in common]
            vals = paired_auc_delta(yr[a], pr[a], pv[b], n_boot=n_boot, seed=seed)
        out.update(dict(zip((key, f"{key}_lo", f"{key}_hi", f"{key}_p"), vals, strict=True)))
    return out


def ablation_table(
    oofs: Mapping[str, pd.DataFrame],
    labels: pd.DataFrame,
    reference: str = "gmmas",
    n_boot: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per variant (``{variant: pooled OOF frame}``, in order): :func:`variant_summary` plus
    the differences to ``reference`` -- ``delta_dice_mean`` and ``delta_auc_<task>`` with paired
    bootstrap CIs and p-values (:func:`paired_deltas`), ``delta_score`` (NaN when ``reference``
    is absent). Compare variants only on the same folds and patients."""
    rows = [{"variant": v, **variant_summary(df, labels, n_boot, seed)} for v, df in oofs.items()]
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    ref_df = oofs.get(reference)
    deltas = [
        paired_deltas(ref_df, oofs[v], labels, n_boot, seed) if ref_df is not None else {} for v in table["variant"]
    ]
    table = pd.concat([table, pd.DataFrame(deltas, index=table.index)], axis=1)
    ref = table[table["variant"] == reference]
    for col in ("dice_mean", *(f"auc_{t}" for t in SUMMARY_TASKS), "score"):
        if f"delta_{col}" in table:  # the paired estimate (patients both variants predicted) stays
            continue
        base = float(ref[col].iloc[0]) if len(ref) else float("nan")
        table[f"delta_{col}"] = table[col] - base
    return table


def missing_modality_table(
    oof: pd.DataFrame, missing: pd.DataFrame, labels: pd.DataFrame, n_boot: int = 200, seed: int = 0
) -> pd.DataFrame:
    """Dice and AUC per removed-sequence subset: a ``removed = "none"`` row from the full-input OOF
    predictions, then one row per ``removed`` value of the ``missing_<subset>.csv`` rows
    (``ml.glioma.cv``: the held-out folds predicted again with those sequences' fusion weights
    zeroed), with ``delta_dice_mean`` / ``delta_score`` against the full input."""
    parts = [("none", oof)] if len(oof) else []
    if len(missing) and "removed" in missing:
        parts += [(str(r), g) for r, g in missing.groupby("removed", sort=True)]
    rows = [{"removed": r, **variant_summary(df, labels, n_boot, seed)} for r, df in parts]
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    full = table[table["removed"] == "none"]
    for col in ("dice_mean", "score"):
        base = float(full[col].iloc[0]) if len(full) else float("nan")
        table[f"delta_{col}"] = table[col] - base
    return table


def champion_decision(
    challenger: Mapping[str, float], champion: Mapping[str, float] | None, margin: float = 0.0
) -> dict:
    """Whether the challenger takes the champion alias.

    Each side is ``{"oof_score": ..., "val_loss": ...}`` (either may be missing/NaN). When both sides
    have an ``oof_score`` (pooled OOF mean of Dice and AUCs, higher is better) it decides: promote iff
    the challenger's is larger by more than ``margin``. Otherwise both sides' ``val_loss`` (the
    trainer's best validation loss, lower is better) decides: promote iff smaller by more than
    ``margin``. No champion: promote. No comparable metric: keep the champion.
    Returns ``promote, metric, challenger_value, champion_value, reason``."""
    if champion is None:
        v = challenger.get("oof_score") if _finite(challenger.get("oof_score")) else challenger.get("val_loss")
        return {
            "promote": True,
            "metric": "oof_score" if _finite(challenger.get("oof_score")) else "val_loss",
            "challenger_value": float(v) if _finite(v) else float("nan"),
            "champion_value": float("nan"),
            "reason": "no champion yet",
        }
    for metric, higher in (("oof_score", True), ("val_loss", False)):
        a, b = challenger.get(metric), champion.get(metric)
        if _finite(a) and _finite(b):
            a, b = float(a), float(b)
            better = a > b + margin if higher else a < b - margin
            word = "higher" if higher else "lower"
            return {
                "promote": bool(better),
                "metric": metric,
                "challenger_value": a,
                "champion_value": b,
                "reason": f"{metric} {a:.4f} vs champion {b:.4f} ({word} is better, margin {margin:g}): "
                + ("challenger wins" if better else "champion stays"),
            }
    return {
        "promote": False,
        "metric": "",
        "challenger_value": float("nan"),
        "champion_value": float("nan"),
        "reason": "no metric both versions have (oof_score or val_loss): champion stays",
    }
