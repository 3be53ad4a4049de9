"""Evaluation of GPR predictions and dose-difference maps (numpy/pandas/torch only).

Per criterion: MAE, RMSE, Pearson r, Spearman rho, bias; on the subset of plans whose measured
GPR < 90 % (the action limit): MAE; failure detection at the 90 % action limit with the
predicted GPR as score: sensitivity, specificity (predicted < 90 = fail), ROC AUC
(Mann-Whitney, ties counted half). DD maps: SSIM per plan (data range = range of the
measured map, at least 1 %), reported as mean and max ("peak"), and MAE in % of max dose.
Always compare against the constant baselines, predict-the-training-mean and
predict-the-training-median: GPR distributions are skewed (a long tail of failing plans), and the
median is the constant that minimises the MAE, so it is the harder of the two to beat in MAE.

Seeds: ``seed_summary`` turns one table per training seed into mean and 95 % confidence
half-width per model and metric (Student t-interval over the seeds, ``mean_ci``), the form every
comparison table with 3-5 seeds per variant takes (``benchmarks/psqa_ablation.py --seeds``).

Metrics only: every function here takes predictions (``ml.psqa.predict``), never a model.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = [
    "ACTION_LIMIT",
    "ablation_table",
    "compare_models",
    "dd_metrics",
    "evaluation_table",
    "gpr_metrics",
    "mean_ci",
    "mean_predictor_metrics",
    "median_predictor_metrics",
    "pearson",
    "roc_auc",
    "seed_summary",
    "seed_summary_markdown",
    "shapley_summary",
    "spearman",
    "split_metrics",
]

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
    return {
        "ssim_mean": float(per.mean()),
        "ssim_max": float(per.max()),
        "ssim_min": float(per.min()),
        "mae": mae,
        "per_plan_ssim": per,
    }


def evaluation_table(
    pred: pd.DataFrame, true: pd.DataFrame, criteria_columns: list[str], criteria_names: list[str]
) -> pd.DataFrame:
    rows = []
    for col, name in zip(criteria_columns, criteria_names, strict=True):
        m = gpr_metrics(pred[col].to_numpy(), true[col].to_numpy())
        rows.append({"criterion": name, **m})
    return pd.DataFrame(rows)


def mean_predictor_metrics(train_labels: pd.DataFrame, test_labels: pd.DataFrame, column: str) -> dict[str, float]:
    """The predict-the-training-mean baseline every GPR model must beat."""
    pred = np.full(len(test_labels), float(train_labels[column].mean()))
    return gpr_metrics(pred, test_labels[column].to_numpy())


def median_predictor_metrics(train_labels: pd.DataFrame, test_labels: pd.DataFrame, column: str) -> dict[str, float]:
    """The predict-the-training-median baseline: the best constant in MAE (GPR is skewed)."""
    pred = np.full(len(test_labels), float(train_labels[column].median()))
    return gpr_metrics(pred, test_labels[column].to_numpy())


def mean_ci(values, level: float = 0.95) -> tuple[float, float]:
    """(mean, half-width of the two-sided Student t-interval at ``level``) of ``values`` (e.g. one
    metric over training seeds); NaN values are ignored; the half-width is NaN for fewer than 2."""
    from scipy import stats

    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return float("nan"), float("nan")
    mean = float(x.mean())
    if len(x) < 2:
        return mean, float("nan")
    sem = float(x.std(ddof=1)) / np.sqrt(len(x))
    return mean, float(stats.t.ppf(0.5 + level / 2, len(x) - 1) * sem)


def seed_summary(tables: pd.DataFrame, metrics: list[str] | None = None, level: float = 0.95) -> pd.DataFrame:
    """Mean and CI half-width over seeds per model: ``tables`` stacks one comparison table per seed
    (columns ``seed``, ``model`` and metric columns, e.g. ``ablation_table`` outputs); the result has
    one row per model (first-seen order) with ``n_seeds``, ``<metric>`` (mean) and
    ``<metric> CI95`` (the t-interval half-width, ``mean_ci``; the suffix follows ``level``)."""
    if metrics is None:
        metrics = [c for c in tables.columns if c not in ("seed", "model") and pd.api.types.is_numeric_dtype(tables[c])]
    suffix = f" CI{round(100 * level)}"
    rows = []
    for model, g in tables.groupby("model", sort=False):
        row: dict = {"model": model, "n_seeds": int(g["seed"].nunique())}
        for m in metrics:
            mean, half = mean_ci(g[m].to_numpy(dtype=float), level)
            row[m], row[m + suffix] = mean, half
        rows.append(row)
    return pd.DataFrame(rows)


def seed_summary_markdown(summary: pd.DataFrame, metrics: list[str], fmt: str = ".3f", level: float = 0.95) -> str:
    """The ``seed_summary`` as a markdown table of ``mean ± half-width`` cells."""
    suffix = f" CI{round(100 * level)}"
    cells = pd.DataFrame({"model": summary["model"], "seeds": summary["n_seeds"]})
    for m in metrics:
        if m not in summary:
            continue

        def cell(r, m=m):
            mean, half = r[m], r[m + suffix]
            if not np.isfinite(mean):
                return "—"
            return f"{mean:{fmt}} ± {half:{fmt}}" if np.isfinite(half) else f"{mean:{fmt}}"

        cells[m] = summary.apply(cell, axis=1)
    return cells.to_markdown(index=False)


def split_metrics(
    pred: pd.DataFrame, dd_pred: np.ndarray | None, rows: pd.DataFrame, true_dd: np.ndarray | None, split: str = "test"
) -> dict:
    """Metrics of one model's predictions (``ml.psqa.predict.predict``) on a split: GPR metrics per
    criterion (failing plans included) and DD SSIM/MAE (``python -m ml bmmqa evaluate``)."""
    from ml.psqa.dataset import CRITERIA, LABEL_COLUMNS

    result: dict = {"split": split, "n": len(rows)}
    if f"pred_{LABEL_COLUMNS[0]}" in pred:
        for col, name in zip(LABEL_COLUMNS, CRITERIA, strict=True):
            result[name] = gpr_metrics(pred[f"pred_{col}"].to_numpy(), rows[col].to_numpy())
    if dd_pred is not None and true_dd is not None:
        m = dd_metrics(dd_pred, true_dd)
        m.pop("per_plan_ssim")
        result["dd"] = m
    return result


def ablation_table(
    predictions: dict[str, tuple[pd.DataFrame, np.ndarray | None]],
    rows_t: pd.DataFrame,
    true_dd: np.ndarray,
    train_rows: pd.DataFrame,
) -> pd.DataFrame:
    """One row per model (+ the mean and the median predictor): the comparison on the test split.

    ``predictions``: {model: (GPR frame, DD maps)} from ``ml.psqa.predict.predict_models`` on the
    rows ``rows_t`` (whose measured DD maps are ``true_dd``); ``train_rows`` give the constant
    predictors (training mean, training median).
    """
    from ml.psqa.dataset import CRITERIA, LABEL_COLUMNS

    rows = []
    for variant, (df, dd) in predictions.items():
        row: dict = {"model": variant}
        if "pred_gpr_2_2" in df:
            for col, crit in zip(LABEL_COLUMNS, CRITERIA, strict=True):
                m = gpr_metrics(df[f"pred_{col}"].to_numpy(), rows_t[col].to_numpy())
                row[f"MAE {crit}"] = m["mae"]
            m22 = gpr_metrics(df["pred_gpr_2_2"].to_numpy(), rows_t["gpr_2_2"].to_numpy())
            row.update(
                {
                    "MAE GPR<90 (2%/2mm)": m22["mae_fail"],
                    "AUC fail (2%/2mm)": m22["auc"],
                    "sens (2%/2mm)": m22["sensitivity"],
                    "spec (2%/2mm)": m22["specificity"],
                    "Spearman (2%/2mm)": m22["spearman"],
                }
            )
        if dd is not None:
            d = dd_metrics(dd, true_dd)
            row.update({"DD SSIM mean": d["ssim_mean"], "DD SSIM max": d["ssim_max"], "DD MAE (%)": d["mae"]})
        rows.append(row)
    for name, fn in (("mean predictor", mean_predictor_metrics), ("median predictor", median_predictor_metrics)):
        base: dict = {"model": name}
        for col, crit in zip(LABEL_COLUMNS, CRITERIA, strict=True):
            base[f"MAE {crit}"] = fn(train_rows, rows_t, col)["mae"]
        base["MAE GPR<90 (2%/2mm)"] = fn(train_rows, rows_t, "gpr_2_2")["mae_fail"]
        rows.append(base)
    return pd.DataFrame(rows)


def shapley_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Mean contributions per split and task, with each modality's share psi of them
    (``ml.psqa.shapley.contribution_shares``, the balancer's rule: signed, a modality that hurts
    has a negative share)."""
    from ml.psqa.shapley import contribution_shares

    if table.empty:
        return pd.DataFrame(columns=["split", "task", "phi_image", "phi_table", "share_image", "share_table", "n"])
    g = table.groupby(["split", "task"], sort=True)
    out = g[["phi_image", "phi_table"]].mean().reset_index()
    shares = contribution_shares(out[["phi_image", "phi_table"]].to_numpy(dtype=float).T)
    out["share_image"], out["share_table"] = shares[0], shares[1]
    out["n"] = g.size().to_numpy()
    return out


def compare_models(
    challenger: pd.DataFrame,
    champion: pd.DataFrame | None,
    rows: pd.DataFrame,
    split: str = "test",
    metric: str = "gpr_2_2",
    margin: float = 0.0,
) -> dict:
    """Champion/challenger decision on one (fixed) split: the challenger is promoted when its MAE
    at ``metric`` is lower than the champion's by more than ``margin`` percentage points (ties keep
    the champion). Without a champion the challenger is promoted. ``challenger``/``champion`` are
    the two models' predictions (``ml.psqa.predict.predict``) on the same ``rows`` of one pack."""
    if not len(rows):
        raise ValueError(f"the pack has no {split!r} rows to compare on")
    true = rows[metric].to_numpy()
    result = {"split": split, "metric": metric, "n": len(rows), "margin": float(margin)}
    for role, df in (("challenger", challenger), ("champion", champion)):
        if df is None:
            result[f"{role}_mae"] = float("nan")
            result[f"{role}_n_fail"] = float("nan")
            continue
        m = gpr_metrics(df[f"pred_{metric}"].to_numpy(), true)
        result[f"{role}_mae"] = m["mae"]
        result[f"{role}_auc"] = m["auc"]
    if champion is None:
        result["promote"], result["reason"] = True, "no champion yet"
    else:
        gain = result["champion_mae"] - result["challenger_mae"]
        result["promote"] = bool(gain > margin)
        result["reason"] = (
            f"challenger MAE {result['challenger_mae']:.3f} vs champion {result['champion_mae']:.3f} "
            f"(gain {gain:+.3f} pp, margin {margin:g})"
        )
    return result
