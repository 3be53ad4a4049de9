"""Honest evaluation of the glioma family: metrics, baselines and plots on *given* predictions.

Nothing here runs a model. Inputs are the shared frames of ``ml.glioma.data``:

* predictions frame -- ``patient_id, fold`` (-1 = final model) and ``PRED_COLUMNS`` (probabilities),
  optionally ``u_*``, ``tumour_voxels``, ``n_slices``;
* labels frame -- ``patient_id`` + int codes ``histology, grade, idh, codel`` (index into
  ``TASKS[task]``; -1 = unknown, such rows are excluded per task);
* masks -- ``dict patient_id -> (S, H, W)`` 0/1 arrays.

Task -> score mapping (positive class = code 1): ``idh`` -> ``p_idh_mutant`` (Mutant), ``codel``
-> ``p_codel`` (codel), ``grade`` -> ``p_grade_g3`` (G3); ``histology`` -> 3-class probabilities in
``TASKS["histology"]`` order (astrocytoma, oligoastrocytoma, oligodendroglioma) from
``p_astrocytoma, p_oligoastrocytoma, p_oligodendroglioma`` (rows renormalised to sum 1).

Which prediction rows are scored (``classification_table``): when the frame holds any
cross-validation row (``fold >= 0``) only those are used (out-of-fold = honest); otherwise all rows
(an external test set scored by the final model). A patient may appear once among the scored rows.

Geometry: lgg-mri records no pixel spacing, slice thickness or orientation, so HD95 on it is in
in-plane pixels (128 x 128 grid) with unit slice spacing and tumour volumes are voxel counts.

Baselines produce predictions frames with the same columns, so ``classification_table`` scores
them identically: ``majority_baseline`` (training-fold class frequencies; AUC 0.5 by construction)
and ``radiomics_baseline`` (shape + first-order features, logistic regression, out-of-fold; the
dataset authors, Buda et al. 2019, found tumour shape features associated with the genomic
subtypes).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import ndimage, stats
from scipy.spatial import ConvexHull, QhullError

from ml.glioma.data import LGG_CHANNELS, PRED_COLUMNS, SEQUENCES, TASKS
from ml.viz import figure_grid, png_bytes

__all__ = [
    "BINARY_TASKS",
    "HISTOLOGY_COLUMNS",
    "TASK_COLUMN",
    "auc",
    "auc_ci",
    "binary_metrics",
    "classification_table",
    "compare_table",
    "confusion",
    "confusion_png",
    "dice",
    "ece",
    "hd95",
    "majority_baseline",
    "paired_auc_delta",
    "paired_mean_delta",
    "radiomics_baseline",
    "radiomics_features",
    "reliability_curve",
    "reliability_png",
    "roc_png",
    "scored_rows",
    "segmentation_table",
    "task_arrays",
]

#: binary task -> probability column of the positive class (code 1)
TASK_COLUMN = {"idh": "p_idh_mutant", "codel": "p_codel", "grade": "p_grade_g3"}
BINARY_TASKS = ("idh", "codel", "grade")
#: histology probability columns in TASKS["histology"] order
HISTOLOGY_COLUMNS = tuple(f"p_{name}" for name in TASKS["histology"])
_UNCERTAINTY_COLUMNS = ("u_idh", "u_codel", "u_grade", "u_histology")
_TABLE_TASKS = ("idh", "codel", "grade", "histology")


# ----------------------------------------------------------------------------------------------
# segmentation
# ----------------------------------------------------------------------------------------------
def dice(pred: np.ndarray, true: np.ndarray) -> float:
    """Volume Dice ``2|P & T| / (|P| + |T|)`` over all voxels (all slices of a patient).

    Masks are binarised with ``> 0``. Both empty -> 1.0 (the prediction agrees with "no tumour");
    exactly one empty -> 0.0.
    """
    p, t = np.asarray(pred) > 0, np.asarray(true) > 0
    if p.shape != t.shape:
        raise ValueError(f"shape mismatch: pred {p.shape} vs true {t.shape}")
    denom = int(p.sum()) + int(t.sum())
    if denom == 0:
        return 1.0
    return float(2.0 * np.logical_and(p, t).sum() / denom)


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with a face neighbour outside it (volume border counts as outside)."""
    struct = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=struct, border_value=0)


def hd95(pred: np.ndarray, true: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> float:
    """95th percentile of the symmetric surface distance between two masks (3D stacks).

    Surfaces are the mask voxels with a face neighbour outside the mask (the stack border counts as
    outside, so the first and last slices of a tumour are surface). The distances from every pred
    surface voxel to the nearest true surface voxel and from every true surface voxel to the nearest
    pred surface voxel (``scipy.ndimage.distance_transform_edt`` with ``sampling=spacing``) are
    pooled and their 95th percentile (numpy linear interpolation) is returned -- the medpy
    definition. Units are those of ``spacing`` (axis order of the array: slice, row, column);
    with the default (1, 1, 1) they are voxels. lgg-mri has no geometry: HD95 there is in in-plane
    pixels with unit slice spacing. Both empty -> 0.0; exactly one empty -> NaN.
    """
    p, t = np.asarray(pred) > 0, np.asarray(true) > 0
    if p.shape != t.shape:
        raise ValueError(f"shape mismatch: pred {p.shape} vs true {t.shape}")
    if len(spacing) != p.ndim:
        raise ValueError(f"spacing {tuple(spacing)} does not match mask dimension {p.ndim}")
    if not p.any() and not t.any():
        return 0.0
    if not p.any() or not t.any():
        return float("nan")
    sp, st = _surface(p), _surface(t)
    sampling = tuple(float(s) for s in spacing)
    dist_to_t = ndimage.distance_transform_edt(~st, sampling=sampling)
    dist_to_p = ndimage.distance_transform_edt(~sp, sampling=sampling)
    d = np.concatenate([dist_to_t[sp], dist_to_p[st]])
    return float(np.percentile(d, 95))


def segmentation_table(
    pred_masks: Mapping[str, np.ndarray],
    true_masks: Mapping[str, np.ndarray],
    spacing: Mapping[str, Sequence[float]] | None = None,
) -> pd.DataFrame:
    """One row per patient present in both dicts (sorted): ``patient_id, dice, hd95, true_voxels,
    pred_voxels``. ``spacing`` (optional, patient -> (slice, row, col) mm) sets HD95 units; default
    voxels."""
    rows = []
    for pid in sorted(set(pred_masks) & set(true_masks)):
        p, t = np.asarray(pred_masks[pid]) > 0, np.asarray(true_masks[pid]) > 0
        sp = tuple(spacing[pid]) if spacing and pid in spacing else (1.0,) * p.ndim
        if not all(np.isfinite(sp)):
            sp = (1.0,) * p.ndim
        rows.append(
            {
                "patient_id": pid,
                "dice": dice(p, t),
                "hd95": hd95(p, t, sp),
                "true_voxels": int(t.sum()),
                "pred_voxels": int(p.sum()),
            }
        )
    return pd.DataFrame(rows, columns=["patient_id", "dice", "hd95", "true_voxels", "pred_voxels"])


# ----------------------------------------------------------------------------------------------
# calibration
# ----------------------------------------------------------------------------------------------
def _as_probs(probs) -> np.ndarray:
    """1-D probability of the positive class -> (n, 2) ``[1-p, p]``; (n, K) passes through."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim == 1:
        return np.stack([1.0 - p, p], axis=1)
    if p.ndim != 2:
        raise ValueError(f"probs must be (n,) or (n, K), got {p.shape}")
    return p


def reliability_curve(y_true, probs, n_bins: int = 10) -> pd.DataFrame:
    """Confidence reliability bins as used by the ECE (spec 1.8).

    Confidence = max class probability, prediction = its argmax (ties -> lower class index, so a
    binary p = 0.5 predicts class 0). Bins are equal-width ``(lo, hi]`` with edges
    ``np.linspace(0, 1, n_bins + 1)`` (the GMMAS ``INFER_ECE.py`` comparisons; a confidence of
    exactly 0 falls in no bin, impossible for a max probability). Returns one row per bin:
    ``lo, hi, count, conf`` (mean confidence), ``acc`` (accuracy), ``gap = acc - conf`` (NaN for
    empty bins).
    """
    p = _as_probs(probs)
    y = np.asarray(y_true).astype(np.int64).ravel()
    if len(y) != len(p):
        raise ValueError(f"{len(y)} labels vs {len(p)} probability rows")
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        inb = (conf > lo) & (conf <= hi)
        n = int(inb.sum())
        c = float(conf[inb].mean()) if n else float("nan")
        a = float(correct[inb].mean()) if n else float("nan")
        rows.append({"lo": float(lo), "hi": float(hi), "count": n, "conf": c, "acc": a, "gap": a - c})
    return pd.DataFrame(rows)


def ece(y_true, probs, n_bins: int = 10) -> float:
    """Expected calibration error, spec 1.8: ``sum_m |B_m|/n * |acc(B_m) - conf(B_m)|`` over the
    equal-width confidence bins of :func:`reliability_curve` (default 10). ``probs``: 1-D
    probability of the positive class (binary) or (n, K) class probabilities; ``y_true`` int codes.
    Empty input -> NaN."""
    y = np.asarray(y_true).ravel()
    if len(y) == 0:
        return float("nan")
    curve = reliability_curve(y, probs, n_bins)
    used = curve[curve["count"] > 0]
    return float((used["count"] / len(y) * (used["acc"] - used["conf"]).abs()).sum())


# ----------------------------------------------------------------------------------------------
# discrimination
# ----------------------------------------------------------------------------------------------
def _auc_rows(pos: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUC per row of (B, n) ``pos`` (bool) and ``scores`` (ties count 1/2);
    NaN for rows with one class only."""
    ranks = stats.rankdata(scores, axis=1)
    n_pos = pos.sum(axis=1).astype(np.float64)
    n_neg = pos.shape[1] - n_pos
    with np.errstate(invalid="ignore", divide="ignore"):
        a = ((ranks * pos).sum(axis=1) - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    a[(n_pos == 0) | (n_neg == 0)] = np.nan
    return a


def _auc_matrix(y: np.ndarray, p: np.ndarray, idx: np.ndarray, classes: np.ndarray | None) -> np.ndarray:
    """AUC of each resample ``idx`` (B, n); multi-class = macro OvR over ``classes``."""
    yb = y[idx]
    if p.ndim == 1:
        return _auc_rows(yb == 1, p[idx])
    per = np.stack([_auc_rows(yb == k, p[idx, k]) for k in classes], axis=0)
    return per.mean(axis=0)  # NaN when a class is absent in a resample


def _prepare_auc(y, p) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    y = np.asarray(y).astype(np.int64).ravel()
    p = np.asarray(p, dtype=np.float64)
    if p.ndim == 2 and p.shape[1] == 1:
        p = p[:, 0]
    if p.ndim == 2 and p.shape[1] == 2:
        p = p[:, 1]
    if len(y) != len(p):
        raise ValueError(f"{len(y)} labels vs {len(p)} score rows")
    classes = None
    if p.ndim == 2:
        classes = np.array([k for k in range(p.shape[1]) if (y == k).any() and (y != k).any()], dtype=np.int64)
    return y, p, classes


def auc(y, p) -> float:
    """ROC AUC. Binary: ``p`` 1-D score of class 1 (or (n, 2)); multi-class: ``p`` (n, K) and the
    macro mean of one-vs-rest AUCs over the classes present in ``y`` (a class absent from ``y`` has
    no AUC and is left out). NaN when ``y`` holds one class only."""
    y, p, classes = _prepare_auc(y, p)
    if len(y) == 0 or (classes is not None and len(classes) < 2):
        return float("nan")
    return float(_auc_matrix(y, p, np.arange(len(y))[None, :], classes)[0])


def auc_ci(y, p, n_boot: int = 2000, seed: int = 0, alpha: float = 0.05) -> tuple[float, float, float]:
    """``(auc, lo, hi)``: point AUC (:func:`auc`) and the percentile bootstrap interval over
    patients (``n_boot`` resamples with replacement, ``numpy.random.default_rng(seed)``, quantiles
    ``alpha/2`` and ``1 - alpha/2``). Resamples missing a class (for multi-class: any class present
    in ``y``) have no AUC and are skipped. NaNs when the point AUC is undefined or fewer than 10
    resamples are usable."""
    y, p, classes = _prepare_auc(y, p)
    point = auc(y, p)
    if not np.isfinite(point):
        return float("nan"), float("nan"), float("nan")
    if n_boot <= 0:  # the point estimate only
        return point, float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    n = len(y)
    vals = []
    chunk = max(1, min(n_boot, 2_000_000 // max(n, 1)))
    done = 0
    while done < n_boot:
        b = min(chunk, n_boot - done)
        vals.append(_auc_matrix(y, p, rng.integers(0, n, size=(b, n)), classes))
        done += b
    v = np.concatenate(vals)
    v = v[np.isfinite(v)]
    if len(v) < 10:
        return point, float("nan"), float("nan")
    lo, hi = np.quantile(v, [alpha / 2.0, 1.0 - alpha / 2.0])
    return point, float(lo), float(hi)


def _boot_summary(point: float, deltas: np.ndarray, alpha: float) -> tuple[float, float, float, float]:
    d = deltas[np.isfinite(deltas)]
    if not np.isfinite(point) or len(d) < 10:
        return point, float("nan"), float("nan"), float("nan")
    lo, hi = np.quantile(d, [alpha / 2.0, 1.0 - alpha / 2.0])
    # two-sided bootstrap p-value of "no difference": twice the smaller tail mass at 0
    p = min(1.0, 2.0 * min(float((d <= 0).mean()), float((d >= 0).mean())))
    return float(point), float(lo), float(hi), p


def paired_mean_delta(a, b, n_boot: int = 2000, seed: int = 0, alpha: float = 0.05):
    """``(mean(b - a), lo, hi, p)`` for per-patient paired values (e.g. Dice of a variant ``b``
    against the reference ``a`` on the same patients): percentile bootstrap over patients and the
    two-sided bootstrap p-value of a zero difference. NaNs with fewer than 2 pairs."""
    d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    d = d[np.isfinite(d)]
    if len(d) < 2:
        return float("nan"), float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    boots = d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(axis=1)
    return _boot_summary(float(d.mean()), boots, alpha)


def paired_auc_delta(y, p_a, p_b, n_boot: int = 2000, seed: int = 0, alpha: float = 0.05):
    """``(AUC(b) - AUC(a), lo, hi, p)``: two score sets on the same patients (``y`` int codes;
    scores as in :func:`auc`), each bootstrap resample of patients scoring both (the paired
    design: the CI of the difference is much narrower than two separate CIs would suggest)."""
    y, pa, classes = _prepare_auc(y, p_a)
    _, pb, _ = _prepare_auc(y, p_b)
    point = auc(y, pb) - auc(y, pa)
    if not np.isfinite(point):
        return float("nan"), float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(y), size=(n_boot, len(y)))
    return _boot_summary(point, _auc_matrix(y, pb, idx, classes) - _auc_matrix(y, pa, idx, classes), alpha)


def binary_metrics(y, p, threshold: float = 0.5) -> dict[str, float]:
    """Threshold metrics of a binary score: call positive when ``p >= threshold`` (default 0.5).

    Returns ``balanced_accuracy`` (mean of sensitivity and specificity), ``sensitivity`` (TP/P),
    ``specificity`` (TN/N), ``accuracy``, ``f1`` (2TP / (2TP + FP + FN)), ``n``, ``n_pos``.
    A rate whose denominator is 0 is NaN (so is the balanced accuracy then).
    """
    y = np.asarray(y).astype(np.int64).ravel()
    yhat = (np.asarray(p, dtype=np.float64).ravel() >= threshold).astype(np.int64)
    tp = int(((y == 1) & (yhat == 1)).sum())
    tn = int(((y == 0) & (yhat == 0)).sum())
    fp = int(((y == 0) & (yhat == 1)).sum())
    fn = int(((y == 1) & (yhat == 0)).sum())
    n_pos, n_neg = tp + fn, tn + fp
    sens = tp / n_pos if n_pos else float("nan")
    spec = tn / n_neg if n_neg else float("nan")
    return {
        "balanced_accuracy": (sens + spec) / 2.0,
        "sensitivity": sens,
        "specificity": spec,
        "accuracy": (tp + tn) / len(y) if len(y) else float("nan"),
        "f1": 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else float("nan"),
        "n": len(y),
        "n_pos": int(n_pos),
    }


def confusion(y, yhat, labels: Sequence, names: Sequence[str] | None = None) -> pd.DataFrame:
    """Confusion counts: rows = true ``labels``, columns = predicted ``labels`` (values outside
    ``labels`` are not counted); ``names`` (default ``labels``) name the rows/columns."""
    y, yhat = np.asarray(y).ravel(), np.asarray(yhat).ravel()
    names = list(names) if names is not None else list(labels)
    m = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for i, a in enumerate(labels):
        for j, b in enumerate(labels):
            m[i, j] = int(((y == a) & (yhat == b)).sum())
    return pd.DataFrame(m, index=pd.Index(names, name="true"), columns=pd.Index(names, name="predicted"))


# ----------------------------------------------------------------------------------------------
# frames -> arrays, tables
# ----------------------------------------------------------------------------------------------
def scored_rows(preds: pd.DataFrame) -> pd.DataFrame:
    """The prediction rows to score: the cross-validation rows (``fold >= 0``) when there are any,
    else all rows. Raises ValueError when a patient appears twice among them."""
    out = preds
    if "fold" in preds.columns and (preds["fold"] >= 0).any():
        out = preds.loc[preds["fold"] >= 0]
    dup = out["patient_id"].duplicated()
    if dup.any():
        raise ValueError(f"patients predicted more than once: {sorted(out.loc[dup, 'patient_id'])[:5]}")
    return out


def task_arrays(preds: pd.DataFrame, labels: pd.DataFrame, task: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``(y, P, patient_ids)`` for one task: int codes (unknown -1 excluded) and (n, K) class
    probabilities (binary: ``[1-p, p]``; histology in ``TASKS`` order, renormalised), inner-joined
    on ``patient_id`` over :func:`scored_rows`; patients with a NaN probability are dropped."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {list(TASKS)}")
    cols = list(HISTOLOGY_COLUMNS) if task == "histology" else [TASK_COLUMN[task]]
    df = scored_rows(preds)[["patient_id", *cols]].merge(labels[["patient_id", task]], on="patient_id", how="inner")
    df = df.loc[(df[task] >= 0) & df[cols].notna().all(axis=1)].sort_values("patient_id")
    y = df[task].to_numpy(np.int64)
    if task == "histology":
        P = df[cols].to_numpy(np.float64)
        s = P.sum(axis=1, keepdims=True)
        P = np.where(s > 0, P / np.where(s > 0, s, 1.0), 1.0 / P.shape[1])
    else:
        P = _as_probs(df[cols[0]].to_numpy(np.float64))
    return y, P, df["patient_id"].tolist()


def classification_table(preds: pd.DataFrame, labels: pd.DataFrame, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """One row per task (idh, codel, grade, histology): ``task, n, n_pos, auc, auc_lo, auc_hi,
    balanced_accuracy, sensitivity, specificity, accuracy, f1, ece``.

    Binary tasks: AUC of the positive-class probability with the bootstrap CI of :func:`auc_ci`
    (``n_boot``, ``seed``); threshold metrics at 0.5 (:func:`binary_metrics`); ECE (10 bins) on
    ``[1-p, p]``. Histology: macro one-vs-rest AUC, balanced accuracy = mean per-class recall of the
    argmax (classes present in the labels), accuracy, ECE on the 3-class probabilities;
    ``n_pos``, sensitivity, specificity and F1 are NaN. Rows with label -1 are excluded per task.
    """
    rows = []
    for task in _TABLE_TASKS:
        y, P, _ = task_arrays(preds, labels, task)
        row: dict = {"task": task, "n": len(y)}
        if task == "histology":
            a, lo, hi = auc_ci(y, P, n_boot=n_boot, seed=seed)
            yhat = P.argmax(axis=1) if len(y) else np.zeros(0, np.int64)
            recalls = [float((yhat[y == k] == k).mean()) for k in range(P.shape[1]) if (y == k).any()]
            row.update(
                n_pos=float("nan"),
                auc=a,
                auc_lo=lo,
                auc_hi=hi,
                balanced_accuracy=float(np.mean(recalls)) if recalls else float("nan"),
                sensitivity=float("nan"),
                specificity=float("nan"),
                accuracy=float((yhat == y).mean()) if len(y) else float("nan"),
                f1=float("nan"),
            )
        else:
            a, lo, hi = auc_ci(y, P[:, 1], n_boot=n_boot, seed=seed)
            m = binary_metrics(y, P[:, 1])
            row.update(
                n_pos=m["n_pos"],
                auc=a,
                auc_lo=lo,
                auc_hi=hi,
                balanced_accuracy=m["balanced_accuracy"],
                sensitivity=m["sensitivity"],
                specificity=m["specificity"],
                accuracy=m["accuracy"],
                f1=m["f1"],
            )
        row["ece"] = ece(y, P) if len(y) else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def _fmt(x: float, nd: int = 2) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.{nd}f}"


def compare_table(tables: Mapping[str, pd.DataFrame], wide: bool = False) -> pd.DataFrame:
    """Models x tasks from :func:`classification_table` outputs (``{model name: table}``).

    Long (default): ``model, task, n, auc, auc_lo, auc_hi, auc_ci`` (string ``"0.81 [0.70, 0.90]"``,
    ``n/a`` for undefined), ``balanced_accuracy, ece`` -- in the given model order and table task
    order. ``wide=True``: index ``model``, one column per task holding the ``auc_ci`` string (for
    README/docs tables).
    """
    rows = []
    for model, t in tables.items():
        for r in t.itertuples(index=False):
            rows.append(
                {
                    "model": model,
                    "task": r.task,
                    "n": int(r.n),
                    "auc": float(r.auc),
                    "auc_lo": float(r.auc_lo),
                    "auc_hi": float(r.auc_hi),
                    "auc_ci": f"{_fmt(r.auc)} [{_fmt(r.auc_lo)}, {_fmt(r.auc_hi)}]",
                    "balanced_accuracy": float(r.balanced_accuracy),
                    "ece": float(r.ece),
                }
            )
    long = pd.DataFrame(
        rows, columns=["model", "task", "n", "auc", "auc_lo", "auc_hi", "auc_ci", "balanced_accuracy", "ece"]
    )
    if not wide:
        return long
    tasks = list(dict.fromkeys(long["task"]))
    w = long.pivot(index="model", columns="task", values="auc_ci").reindex(index=list(tables), columns=tasks)
    w.columns.name = None
    return w


# ----------------------------------------------------------------------------------------------
# baselines
# ----------------------------------------------------------------------------------------------
def _empty_predictions(patient_ids: Sequence[str], fold: int) -> pd.DataFrame:
    df = pd.DataFrame({"patient_id": list(patient_ids), "fold": np.full(len(patient_ids), fold, np.int64)})
    for c in PRED_COLUMNS:
        df[c] = np.nan
    for c in _UNCERTAINTY_COLUMNS:
        df[c] = np.nan
    df["tumour_voxels"] = pd.array([pd.NA] * len(df), dtype="Int64")
    df["n_slices"] = pd.array([pd.NA] * len(df), dtype="Int64")
    return df


def _fold_splits(folds: pd.DataFrame) -> list[tuple[int, list[str], list[str]]]:
    """``(fold, train ids, held-out ids)``: each CV fold k >= 0 against the other CV folds, and,
    when present, fold -1 (unlabelled / final-model patients) against all CV folds."""
    f = folds[["patient_id", "fold"]].drop_duplicates("patient_id")
    cv = f.loc[f["fold"] >= 0]
    out = []
    for k in sorted(cv["fold"].unique()):
        out.append(
            (int(k), cv.loc[cv["fold"] != k, "patient_id"].tolist(), cv.loc[cv["fold"] == k, "patient_id"].tolist())
        )
    rest = f.loc[f["fold"] < 0, "patient_id"].tolist()
    if rest:
        out.append((-1, cv["patient_id"].tolist(), rest))
    return out


def _set_task_probs(df: pd.DataFrame, task: str, probs: np.ndarray) -> None:
    """Write (n, K) class probabilities of ``task`` into the prediction columns of ``df``."""
    if task == "histology":
        for k, col in enumerate(HISTOLOGY_COLUMNS):
            df[col] = probs[:, k]
    else:
        df[TASK_COLUMN[task]] = probs[:, 1]


def _known(labels: pd.DataFrame, ids: Sequence[str], task: str) -> pd.DataFrame:
    lab = labels.loc[labels["patient_id"].isin(set(ids)), ["patient_id", task]]
    return lab.loc[lab[task] >= 0]


def majority_baseline(labels: pd.DataFrame, folds: pd.DataFrame) -> pd.DataFrame:
    """Predictions frame of the class-frequency baseline.

    For each held-out fold (see ``folds``: ``patient_id, fold``; fold -1 patients are predicted from
    all CV folds and keep fold -1) every patient gets the same probabilities: the class frequencies
    among the training-fold patients with a known label (uniform when none). Within a fold all
    patients share one score, so the per-fold AUC is 0.5 by construction (ties count 1/2). Pooled
    over folds (what ``classification_table`` scores) it is *at or below* 0.5: a fold holding more
    positives leaves fewer in its training folds and so gets a lower score (the known negative bias
    of prior-only predictions under cross-validation; e.g. 0.42 on a 60-patient random cohort).
    It sets the floor for the balanced accuracy (0.5) and shows the ECE of prevalence-only
    predictions.
    Uncertainties, ``tumour_voxels`` and ``n_slices`` are NA.
    """
    parts = []
    for k, train, test in _fold_splits(folds):
        df = _empty_predictions(test, k)
        for task, vocab in TASKS.items():
            y = _known(labels, train, task)[task].to_numpy(np.int64)
            freq = np.bincount(y, minlength=len(vocab)).astype(np.float64)
            freq = freq / freq.sum() if freq.sum() > 0 else np.full(len(vocab), 1.0 / len(vocab))
            _set_task_probs(df, task, np.tile(freq, (len(df), 1)))
        parts.append(df)
    return pd.concat(parts, ignore_index=True) if parts else _empty_predictions([], -1)


def _perimeter(mask2d: np.ndarray) -> float:
    """Perimeter of a 2D mask in pixels: boundary pixels weighted by their neighbourhood
    configuration (1 for straight runs, sqrt 2 for diagonal, (1 + sqrt 2)/2 for corners -- the
    scikit-image ``perimeter`` estimator, 4-connected boundary)."""
    m = mask2d.astype(bool)
    eroded = ndimage.binary_erosion(m, structure=ndimage.generate_binary_structure(2, 1), border_value=0)
    border = (m & ~eroded).astype(np.int64)
    kernel = np.array([[10, 2, 10], [2, 1, 2], [10, 2, 10]])
    conv = ndimage.convolve(border, kernel, mode="constant", cval=0)
    weights = np.zeros(50)
    weights[[5, 7, 15, 17, 25, 27]] = 1.0
    weights[[21, 33]] = math.sqrt(2.0)
    weights[[13, 23]] = (1.0 + math.sqrt(2.0)) / 2.0
    return float(weights[np.clip(conv, 0, 49)].sum())


def _channel_names(n_channels: int, channels: Sequence[str] | None) -> list[str]:
    if channels is not None:
        if len(channels) != n_channels:
            raise ValueError(f"{len(channels)} channel names for {n_channels} channels")
        return list(channels)
    if n_channels == len(SEQUENCES):
        return list(SEQUENCES)
    if n_channels == len(LGG_CHANNELS):
        return [LGG_CHANNELS[i] for i in range(n_channels)]
    return [f"c{i}" for i in range(n_channels)]


def radiomics_features(
    image: np.ndarray,
    mask: np.ndarray,
    channels: Sequence[str] | None = None,
    present: Sequence[bool] | None = None,
) -> dict[str, float]:
    """Shape and first-order intensity features of the tumour in one patient.

    ``image`` (S, C, H, W) float/uint8, ``mask`` (S, H, W) 0/1. Channel names: ``channels``, else
    ``SEQUENCES`` for C = 4 and lgg-mri's (t1, flair, t1c) for C = 3. ``present`` (C,) marks
    acquired channels; absent or all-zero channels get NaN intensity features (an imputer fills them).

    Units are voxels/pixels (lgg-mri has no geometry). Shape (empty mask -> 0 volume, NaN others):

    * ``volume_voxels``, ``n_tumour_slices``, ``n_components`` (3D, 26-connected);
    * ``surface_to_volume``: exposed voxel faces (6-neighbourhood) / voxels;
    * on the slice with the largest tumour area: ``largest_area``, ``perimeter`` (pixels, see
      ``_perimeter``), ``circularity = 4 pi A / P^2`` (1 for a disc, smaller when elongated or
      irregular), ``solidity`` (area / convex hull area of the pixel squares, ``ConvexHull``),
      ``extent`` (area / bounding box area), ``eccentricity`` (``sqrt(1 - l2/l1)`` of the pixel
      coordinate covariance eigenvalues; 0 disc, -> 1 line), ``major_axis`` / ``minor_axis``
      (``4 sqrt(l)``).

    Intensity per channel ``<ch>_``: ``mean, std, p10, p50, p90, skewness, kurtosis`` (Fisher,
    scipy) inside the mask, and against the brain outside the tumour (non-zero voxels of the
    channel outside the mask): ``tumour_brain_ratio`` (mean ratio; for non-negative intensities such
    as lgg-mri's uint8, NaN when the brain mean is <= 0, e.g. z-scored input) and
    ``tumour_brain_contrast = (mean_tumour - mean_brain) / std_brain`` (any intensity scale).
    """
    img = np.asarray(image)
    m = np.asarray(mask) > 0
    if img.ndim != 4 or m.shape != (img.shape[0], *img.shape[2:]):
        raise ValueError(f"image (S, C, H, W) and mask (S, H, W) expected, got {img.shape} and {m.shape}")
    names = _channel_names(img.shape[1], channels)
    pres = np.ones(img.shape[1], bool) if present is None else np.asarray(present, bool)
    nan = float("nan")
    f: dict[str, float] = {}
    vol = int(m.sum())
    areas = m.reshape(m.shape[0], -1).sum(axis=1)
    f["volume_voxels"] = float(vol)
    f["n_tumour_slices"] = float((areas > 0).sum())
    if vol:
        _, ncomp = ndimage.label(m, structure=np.ones((3, 3, 3), bool))
        padded = np.pad(m, 1).astype(np.int8)
        faces = sum(int(np.abs(np.diff(padded, axis=ax)).sum()) for ax in range(3))
        k = int(np.argmax(areas))
        sl = m[k]
        area = float(areas[k])
        perim = _perimeter(sl)
        rr, cc = np.nonzero(sl)
        corners = np.concatenate(
            [np.stack([rr + dr, cc + dc], axis=1) for dr in (-0.5, 0.5) for dc in (-0.5, 0.5)]
        ).astype(np.float64)
        try:
            hull_area = float(ConvexHull(corners).volume)
        except (QhullError, ValueError):
            hull_area = nan
        bbox = float((rr.max() - rr.min() + 1) * (cc.max() - cc.min() + 1))
        if len(rr) > 1:
            ev = np.sort(np.linalg.eigvalsh(np.cov(np.stack([rr, cc]).astype(np.float64))))[::-1]
            ev = np.clip(ev, 0.0, None)
            ecc = math.sqrt(1.0 - ev[1] / ev[0]) if ev[0] > 0 else 0.0
        else:
            ev, ecc = np.zeros(2), 0.0
        f.update(
            n_components=float(ncomp),
            surface_to_volume=faces / vol,
            largest_area=area,
            perimeter=perim,
            circularity=4.0 * math.pi * area / perim**2 if perim > 0 else nan,
            solidity=area / hull_area if hull_area and np.isfinite(hull_area) else nan,
            extent=area / bbox,
            eccentricity=float(ecc),
            major_axis=4.0 * math.sqrt(ev[0]),
            minor_axis=4.0 * math.sqrt(ev[1]),
        )
    else:
        for key in ("surface_to_volume", "largest_area", "perimeter", "circularity", "solidity", "extent"):
            f[key] = nan
        f.update(n_components=0.0, eccentricity=nan, major_axis=nan, minor_axis=nan)
    for c, name in enumerate(names):
        ch = img[:, c].astype(np.float64)
        keys = (
            "mean",
            "std",
            "p10",
            "p50",
            "p90",
            "skewness",
            "kurtosis",
            "tumour_brain_ratio",
            "tumour_brain_contrast",
        )
        if not pres[c] or not np.any(ch) or not vol:
            f.update({f"{name}_{k}": nan for k in keys})
            continue
        v = ch[m]
        p10, p50, p90 = np.percentile(v, [10, 50, 90])
        brain = ch[(~m) & (ch != 0)]
        mt = float(v.mean())
        mb = float(brain.mean()) if brain.size else nan
        sb = float(brain.std()) if brain.size else nan
        const = float(v.std()) == 0.0
        f.update(
            {
                f"{name}_mean": mt,
                f"{name}_std": float(v.std()),
                f"{name}_p10": float(p10),
                f"{name}_p50": float(p50),
                f"{name}_p90": float(p90),
                f"{name}_skewness": nan if const else float(stats.skew(v)),
                f"{name}_kurtosis": nan if const else float(stats.kurtosis(v)),
                f"{name}_tumour_brain_ratio": mt / mb if np.isfinite(mb) and mb > 0 else nan,
                f"{name}_tumour_brain_contrast": (mt - mb) / sb if np.isfinite(sb) and sb > 0 else nan,
            }
        )
    return f


def radiomics_baseline(
    features: pd.DataFrame, labels: pd.DataFrame, folds: pd.DataFrame, seed: int = 0
) -> pd.DataFrame:
    """Out-of-fold predictions frame of a logistic-regression radiomics model.

    ``features``: ``patient_id`` + numeric feature columns (e.g. one :func:`radiomics_features`
    dict per patient). For each held-out fold (``folds``: ``patient_id, fold``; see
    ``majority_baseline`` for fold -1) and each task, ``Pipeline(SimpleImputer(median),
    StandardScaler, LogisticRegression(class_weight="balanced", C=1.0, max_iter=2000,
    random_state=seed))`` is fit on the training-fold patients with a known label only, then
    predicts the held-out patients: imputation medians, scaling and weights never see the held-out
    fold. A feature column entirely NaN in a training set is imputed as 0
    (``keep_empty_features=True``, so train and held-out widths agree); classes absent from a
    training set get probability 0 (a single training class -> its frequency, like the majority
    baseline). Patients without a feature row are not predicted.
    """
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    feat = features.drop_duplicates("patient_id").set_index("patient_id")
    feat = feat.select_dtypes(include=[np.number]).astype(np.float64)
    parts = []
    for k, train, test in _fold_splits(folds):
        test = [p for p in test if p in feat.index]
        if not test:
            continue
        df = _empty_predictions(test, k)
        x_test = feat.loc[test].to_numpy()
        for task, vocab in TASKS.items():
            known = _known(labels, [p for p in train if p in feat.index], task)
            y = known[task].to_numpy(np.int64)
            probs = np.zeros((len(test), len(vocab)))
            if len(np.unique(y)) < 2:
                freq = np.bincount(y, minlength=len(vocab)).astype(np.float64)
                probs[:] = freq / freq.sum() if freq.sum() > 0 else 1.0 / len(vocab)
            else:
                pipe = Pipeline(
                    [
                        ("impute", SimpleImputer(strategy="median", keep_empty_features=True)),
                        ("scale", StandardScaler()),
                        (
                            "logreg",
                            LogisticRegression(class_weight="balanced", C=1.0, max_iter=2000, random_state=seed),
                        ),
                    ]
                )
                pipe.fit(feat.loc[known["patient_id"]].to_numpy(), y)
                pr = pipe.predict_proba(x_test)
                for j, cls in enumerate(pipe.classes_):
                    probs[:, int(cls)] = pr[:, j]
            _set_task_probs(df, task, probs)
        parts.append(df)
    return pd.concat(parts, ignore_index=True) if parts else _empty_predictions([], -1)


# ----------------------------------------------------------------------------------------------
# plots (PNG bytes)
# ----------------------------------------------------------------------------------------------
def reliability_png(
    preds: pd.DataFrame,
    labels: pd.DataFrame,
    task: str,
    preds_after: pd.DataFrame | None = None,
    names: tuple[str, str] = ("before", "after"),
    n_bins: int = 10,
) -> bytes:
    """Reliability diagram of one task: per confidence bin, accuracy vs mean confidence (with the
    diagonal) on top and bin counts below, ECE in the title. ``preds_after`` adds a second
    prediction set (e.g. after temperature scaling / Tumor-CutMix) on the same axes, named by
    ``names``."""
    sets = [(names[0] if preds_after is not None else "model", preds)]
    if preds_after is not None:
        sets.append((names[1], preds_after))
    plt, fig, axes = figure_grid(2, 1, 3.6)
    ax, axc = axes[0, 0], axes[1, 0]
    ax.plot([0, 1], [0, 1], color="#888888", ls="--", lw=1)
    width = 1.0 / n_bins / (len(sets) + 1)
    titles = []
    for i, (name, p) in enumerate(sets):
        y, P, _ = task_arrays(p, labels, task)
        curve = reliability_curve(y, P, n_bins)
        e = ece(y, P, n_bins)
        used = curve[curve["count"] > 0]
        ax.plot(used["conf"], used["acc"], marker="o", lw=1.2, label=f"{name} (ECE {_fmt(e, 3)})")
        axc.bar(curve["lo"] + (i + 0.5) * width, curve["count"], width=width, align="edge", label=name)
        titles.append(f"{name} ECE={_fmt(e, 3)}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (max class probability)", fontsize=7)
    ax.set_ylabel("accuracy", fontsize=7)
    ax.legend(fontsize=6, loc="upper left")
    ax.set_title(f"{task}: " + ", ".join(titles), fontsize=8)
    axc.set_xlim(0, 1)
    axc.set_xlabel("confidence bin", fontsize=7)
    axc.set_ylabel("patients", fontsize=7)
    for a in (ax, axc):
        a.tick_params(labelsize=6)
    return png_bytes(plt, fig)


def roc_png(preds_by_model: Mapping[str, pd.DataFrame], labels: pd.DataFrame, task: str) -> bytes:
    """ROC curves of one task for several models (``{name: predictions frame}``), AUC in the
    legend. Histology: one-vs-rest curve per class (line style = class), macro AUC in the legend."""
    from sklearn.metrics import roc_curve

    plt, fig, axes = figure_grid(1, 1, 4.2)
    ax = axes[0, 0]
    ax.plot([0, 1], [0, 1], color="#888888", ls="--", lw=1)
    styles = ["-", "--", ":"]
    for i, (name, p) in enumerate(preds_by_model.items()):
        color = f"C{i % 10}"
        y, P, _ = task_arrays(p, labels, task)
        if task == "histology":
            a = auc(y, P)
            for k, cls in enumerate(TASKS["histology"]):
                pos = y == k
                if pos.any() and (~pos).any():
                    fpr, tpr, _ = roc_curve(pos, P[:, k])
                    lab = f"{name} (macro AUC {_fmt(a)})" if k == 0 else None
                    ax.plot(fpr, tpr, color=color, ls=styles[k % 3], lw=1.2, label=lab)
                    ax.plot([], [], color="#444444", ls=styles[k % 3], label=cls if i == 0 else None)
        elif (y == 1).any() and (y == 0).any():
            fpr, tpr, _ = roc_curve(y, P[:, 1])
            ax.plot(fpr, tpr, color=color, lw=1.4, label=f"{name} (AUC {_fmt(auc(y, P[:, 1]))}, n={len(y)})")
    ax.set_xlabel("1 - specificity", fontsize=7)
    ax.set_ylabel("sensitivity", fontsize=7)
    ax.set_title(f"ROC: {task}", fontsize=8)
    ax.tick_params(labelsize=6)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6, loc="lower right")
    else:  # one class only among the scored patients: no curve to draw
        ax.text(0.5, 0.5, "ROC undefined: one class only", ha="center", va="center", fontsize=7)
    return png_bytes(plt, fig)


def confusion_png(preds: pd.DataFrame, labels: pd.DataFrame, task: str, threshold: float = 0.5) -> bytes:
    """Confusion matrix heat map with counts for one task (binary: call at ``p >= threshold``,
    default 0.5; histology: argmax)."""
    y, P, _ = task_arrays(preds, labels, task)
    vocab = TASKS[task]
    yhat = P.argmax(axis=1) if task == "histology" else (P[:, 1] >= threshold).astype(np.int64)
    cm = confusion(y, yhat, list(range(len(vocab))), vocab).to_numpy()
    plt, fig, axes = figure_grid(1, 1, 3.6)
    ax = axes[0, 0]
    ax.imshow(cm, cmap="Blues")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(
                j,
                i,
                str(cm[i, j]),
                ha="center",
                va="center",
                fontsize=8,
                color="white" if cm[i, j] > cm.max() / 2 else "black",
            )
    ax.set_xticks(range(len(vocab)), vocab, fontsize=6, rotation=20)
    ax.set_yticks(range(len(vocab)), vocab, fontsize=6)
    ax.set_xlabel("predicted", fontsize=7)
    ax.set_ylabel("true", fontsize=7)
    ax.set_title(f"{task} (n={len(y)})", fontsize=8)
    return png_bytes(plt, fig)
