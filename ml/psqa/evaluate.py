"""Evaluation of GPR predictions and dose-difference maps (numpy/pandas/torch only).

Per criterion: MAE, RMSE, Pearson r, Spearman rho, bias; on the subset of plans whose measured
GPR < 90 % (the action limit): MAE; failure detection at the 90 % action limit with the
predicted GPR as score: sensitivity, specificity (predicted < 90 = fail), ROC AUC
(Mann-Whitney, ties counted half). DD maps: SSIM per plan (data range = range of the
measured map, at least 1 %), reported as mean and max ("peak"), and MAE in % of max dose.
Always compare against the predict-the-training-mean baseline: GPR distributions are skewed.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

ACTION_LIMIT = 90.0


def _rank(x: np.ndarray) -> np.ndarray:
    return pd.Series(x).rank(method="average").to_numpy()


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 3 or np.std(a) == 0 or np.std(b) == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return pearson(_rank(a), _rank(b))


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """AUC of ``scores`` for ``positive`` (True = failing plan); higher score = more likely fail."""
    pos, neg = scores[positive], scores[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    r = _rank(np.concatenate([pos, neg]))
    return float((r[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def gpr_metrics(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    pred, true = np.asarray(pred, float), np.asarray(true, float)
    err = pred - true
    fail = true < ACTION_LIMIT
    pred_fail = pred < ACTION_LIMIT
    out = {
        "n": float(len(true)),
        "mae": float(np.mean(np.abs(err))) if len(err) else float("nan"),
        "rmse": float(np.sqrt(np.mean(err**2))) if len(err) else float("nan"),
        "bias": float(np.mean(err)) if len(err) else float("nan"),
        "pearson": pearson(pred, true),
        "spearman": spearman(pred, true),
        "n_fail": float(fail.sum()),
        "mae_fail": float(np.mean(np.abs(err[fail]))) if fail.any() else float("nan"),
        "sensitivity": float(np.mean(pred_fail[fail])) if fail.any() else float("nan"),
        "specificity": float(np.mean(~pred_fail[~fail])) if (~fail).any() else float("nan"),
        "auc": roc_auc(-pred, fail),
    }
    return out


def dd_metrics(pred: np.ndarray, true: np.ndarray, mask: np.ndarray | None = None) -> dict[str, float]:
    """``pred``/``true``: (N, 1, H, W) dose-difference maps (% of max)."""
    import torch

    from ml.metrics.image import ssim

    p = torch.as_tensor(np.asarray(pred, np.float64))
    t = torch.as_tensor(np.asarray(true, np.float64))
    rng = (t.flatten(1).max(1).values - t.flatten(1).min(1).values).clamp_min(1.0)
    per = ssim(p, t, rng, reduction="none").numpy()
    diff = np.abs(np.asarray(pred) - np.asarray(true))
    mae = float((diff * mask).sum() / max(mask.sum(), 1)) if mask is not None else float(diff.mean())
    return {"ssim_mean": float(per.mean()), "ssim_max": float(per.max()), "ssim_min": float(per.min()),
            "mae": mae, "per_plan_ssim": per}


def evaluation_table(pred: pd.DataFrame, true: pd.DataFrame, criteria_columns: list[str],
                     criteria_names: list[str]) -> pd.DataFrame:
    rows = []
    for col, name in zip(criteria_columns, criteria_names, strict=True):
        m = gpr_metrics(pred[col].to_numpy(), true[col].to_numpy())
        rows.append({"criterion": name, **m})
    return pd.DataFrame(rows)
