"""OpenKBP challenge scores (dose score, DVH score) and cumulative DVH curves.

Re-implements the scoring of the official evaluator, ``DoseEvaluator`` in
``provided_code/dose_evaluation_class.py`` of github.com/ababier/open-kbp (MIT), as described in
``shared/docs/domain-notes.md`` §1.1. The formulas are the same; only the bookkeeping differs:
plain dicts and a long DataFrame instead of object-dtype wide frames.

* **Dose score** (per patient) = ``sum(|ref - pred|)`` over **all** voxels divided by the number
  of voxels in the possible-dose mask (pdm). The reference dose is zero outside the pdm, so this is
  the MAE inside the pdm **only when the prediction is also zero outside the pdm**. The official
  baseline multiplies its prediction by the pdm before scoring; do the same with
  :func:`mask_prediction`. The challenge dose score is the nan-mean over patients (Gy).
* **DVH metrics** are computed on ``dose[roi_mask]``. The mask is the structure alone, not
  intersected with the pdm. ROIs that are absent or empty are skipped.
  - OARs: ``D_0.1_cc = percentile(roi_dose, 100 - n / roi_size * 100)`` with
    ``n = max(1, round(100 / voxel_volume_mm3))``. ``round`` is numpy's half-to-even. The second
    OAR metric is ``mean``.
  - Targets: ``D_99 = percentile(roi_dose, 1)``, ``D_95 = percentile(roi_dose, 5)`` and
    ``D_1 = percentile(roi_dose, 99)``.
  - All percentiles use numpy's default linear interpolation.
* **DVH score** = nan-mean of ``|ref_metric - pred_metric|`` pooled over every patient x
  (metric, ROI) entry that exists. It is not a mean of per-patient means.

Doses are cast to float64 before scoring. The official loader reads the CSVs into float64, and the
official frames are object dtype, which is why it casts to float before ``nanmean``.

Only numpy and pandas are imported, so the module can run on the GPU node.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ml.data.roi_names import OARS, OPENKBP_ROIS, TARGETS

__all__ = [
    "LONG_COLUMNS",
    "OAR_METRICS",
    "TARGET_METRICS",
    "TARGET_PERCENTILES",
    "ScoringCase",
    "d_tenth_cc_percentile",
    "dose_score",
    "dvh_curve",
    "dvh_metrics",
    "mask_prediction",
    "metrics_for_roi",
    "official_metric_keys",
    "score_case",
    "score_patients",
    "summarise",
    "voxels_in_tenth_cc",
]

OAR_METRICS: tuple[str, ...] = ("D_0.1_cc", "mean")
TARGET_METRICS: tuple[str, ...] = ("D_99", "D_95", "D_1")
# dose received by x % of the volume = the (100 - x)-th percentile of the ROI dose
TARGET_PERCENTILES: dict[str, float] = {"D_99": 1.0, "D_95": 5.0, "D_1": 99.0}
LONG_COLUMNS = ("patient_id", "roi", "metric", "reference", "prediction", "abs_error", "dose_score")

MetricKey = tuple[str, str]  # (roi, metric)


def metrics_for_roi(roi: str) -> tuple[str, ...]:
    """The official metric names for a ROI: OAR metrics, target metrics, or ``()`` if not scored."""
    if roi in OARS:
        return OAR_METRICS
    if roi in TARGETS:
        return TARGET_METRICS
    return ()


def official_metric_keys(rois: Sequence[str] = OPENKBP_ROIS) -> list[MetricKey]:
    """All (roi, metric) pairs the evaluator can score, in its column order (ROI-major)."""
    return [(roi, m) for roi in rois for m in metrics_for_roi(roi)]


def mask_prediction(prediction: np.ndarray, possible_dose_mask: np.ndarray) -> np.ndarray:
    """Zero the prediction outside the possible-dose mask, as the official baseline does.

    Equivalent to ``prediction * possible_dose_mask`` in ``network_functions.py::predict_dose``.
    Apply it before :func:`dose_score`. Without it, dose outside the pdm inflates the score.
    """
    pred = np.asarray(prediction)
    pdm = np.asarray(possible_dose_mask, dtype=bool).reshape(pred.shape)
    return np.where(pdm, pred, np.zeros((), dtype=pred.dtype))


def dose_score(reference: np.ndarray, prediction: np.ndarray, possible_dose_mask: np.ndarray) -> float:
    """Official per-patient dose score (Gy): ``sum(|ref - pred|) over ALL voxels / n_voxels(pdm)``.

    The numerator is not restricted to the pdm. Pass a prediction that is already zeroed outside
    it (:func:`mask_prediction`); that is what makes the score the MAE inside the pdm. An empty pdm
    returns NaN; the official code would divide by zero.
    """
    ref = np.asarray(reference, dtype=np.float64).ravel()
    pred = np.asarray(prediction, dtype=np.float64).ravel()
    if ref.shape != pred.shape:
        raise ValueError(f"reference and prediction differ in size: {ref.size} vs {pred.size}")
    n_pdm = int(np.count_nonzero(possible_dose_mask))
    if n_pdm == 0:
        return float("nan")
    return float(np.sum(np.abs(ref - pred)) / n_pdm)


def voxels_in_tenth_cc(voxel_dimensions: Sequence[float]) -> int:
    """``n = max(1, round(100 / voxel_volume))``, the number of voxels in 0.1 cc (100 mm³).

    The voxel volume is ``prod(voxel_dimensions)`` in mm³. Rounding is half-to-even, as
    ``np.round`` does: 2.5 rounds to 2 and 12.5 to 12. The usual 3.906 x 3.906 x 2.5 mm voxel
    (38.1 mm³) gives 3.
    """
    voxel_volume = np.prod(np.asarray(voxel_dimensions, dtype=np.float64))
    if not voxel_volume > 0:
        raise ValueError(f"voxel volume must be positive, got {voxel_volume}")
    return int(np.maximum(1.0, np.round(100.0 / voxel_volume)))


def d_tenth_cc_percentile(n_voxels: int, roi_size: int) -> float:
    """Percentile for D_0.1_cc: ``100 - n / roi_size * 100``, kept in the same float order.

    A ROI smaller than ``n`` voxels gives a negative percentile. The official code would raise a
    ValueError there; this function clips it to 0, so D_0.1_cc becomes the ROI minimum.
    """
    return max(0.0, 100 - n_voxels / roi_size * 100)


def _roi_values(roi: str, roi_dose: np.ndarray, n_tenth_cc: int) -> dict[str, float]:
    """Official DVH metrics of one ROI's dose values (1-D float64, non-empty)."""
    if roi in OARS:
        q = d_tenth_cc_percentile(n_tenth_cc, roi_dose.size)
        return {"D_0.1_cc": float(np.percentile(roi_dose, q)), "mean": float(roi_dose.mean())}
    qs = [TARGET_PERCENTILES[m] for m in TARGET_METRICS]
    return dict(zip(TARGET_METRICS, (float(v) for v in np.percentile(roi_dose, qs)), strict=True))


def dvh_metrics(
    dose: np.ndarray,
    structures: Mapping[str, np.ndarray],
    voxel_dimensions: Sequence[float],
    rois: Sequence[str] = OPENKBP_ROIS,
) -> dict[MetricKey, float]:
    """Official DVH metrics ``{(roi, metric): Gy}`` of ``dose`` on each present, non-empty ROI.

    ``structures`` maps ROI name to a boolean mask with the dose's shape. Names outside
    ``rois``, or that are neither OAR nor target, are ignored. The masks are not intersected with
    the pdm, matching the official code. The metric names are ``D_0.1_cc`` and ``mean`` for OARs
    and ``D_99``, ``D_95`` and ``D_1`` for PTVs. The formulas are in the module docstring.
    """
    flat = np.asarray(dose, dtype=np.float64).ravel()
    n_tenth_cc = voxels_in_tenth_cc(voxel_dimensions)
    out: dict[MetricKey, float] = {}
    for roi in rois:
        if roi not in structures or not metrics_for_roi(roi):
            continue
        mask = np.asarray(structures[roi], dtype=bool).ravel()
        if mask.shape != flat.shape:
            raise ValueError(f"{roi}: mask size {mask.size} != dose size {flat.size}")
        if not mask.any():
            continue  # not contoured: the official evaluator skips it (NaN entry)
        for metric, value in _roi_values(roi, flat[mask], n_tenth_cc).items():
            out[(roi, metric)] = value
    return out


@dataclass
class ScoringCase:
    """One patient to score: reference and predicted dose on the same grid, with its masks."""

    patient_id: str
    reference: np.ndarray
    prediction: np.ndarray
    possible_dose_mask: np.ndarray
    structures: dict[str, np.ndarray] = field(default_factory=dict)
    voxel_dimensions: Sequence[float] = (3.906, 3.906, 2.5)


def _as_case(case: ScoringCase | Mapping) -> ScoringCase:
    if isinstance(case, ScoringCase):
        return case
    return ScoringCase(**{k: case[k] for k in ScoringCase.__dataclass_fields__ if k in case})


def _nanmean(values: np.ndarray) -> float:
    """``np.nanmean`` that returns NaN instead of warning when nothing is finite."""
    arr = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(arr)) if np.any(~np.isnan(arr)) else float("nan")


def score_case(case: ScoringCase | Mapping) -> pd.DataFrame:
    """Long DataFrame (``LONG_COLUMNS``) for one patient.

    There is one row per (roi, metric) present in the reference structures. A patient without
    any scored ROI gets one row with ``roi``/``metric`` None, so its dose score is kept.
    """
    c = _as_case(case)
    ds = dose_score(c.reference, c.prediction, c.possible_dose_mask)
    ref = dvh_metrics(c.reference, c.structures, c.voxel_dimensions)
    pred = dvh_metrics(c.prediction, c.structures, c.voxel_dimensions)
    rows = [(c.patient_id, roi, m, ref[(roi, m)], pred[(roi, m)]) for roi, m in ref]
    if not rows:
        rows = [(c.patient_id, None, None, np.nan, np.nan)]
    df = pd.DataFrame(rows, columns=list(LONG_COLUMNS[:5]))
    df["reference"] = df["reference"].astype(np.float64)
    df["prediction"] = df["prediction"].astype(np.float64)
    df["abs_error"] = (df["reference"] - df["prediction"]).abs()
    df["dose_score"] = np.float64(ds)
    return df


def summarise(per_patient: pd.DataFrame) -> dict[str, float | int]:
    """Challenge summary of a long DataFrame from :func:`score_patients`.

    * ``dose_score`` = nan-mean over patients of the per-patient dose scores.
    * ``dvh_score`` = nan-mean of ``abs_error`` pooled over all patient x (metric, ROI) rows.
    * ``n_patients`` = number of distinct patient ids.
    """
    per = per_patient.groupby("patient_id", sort=False)["dose_score"].first()
    return {
        "dose_score": _nanmean(per.to_numpy(dtype=np.float64)),
        "dvh_score": _nanmean(per_patient["abs_error"].to_numpy(dtype=np.float64)),
        "n_patients": int(per.size),
    }


def score_patients(cases: Iterable[ScoringCase | Mapping]) -> tuple[pd.DataFrame, dict[str, float | int]]:
    """Score many patients as the official ``DoseEvaluator`` does.

    Each case is a :class:`ScoringCase`, or a mapping with its field names. Returns:

    * a long DataFrame with columns ``patient_id, roi, metric, reference, prediction, abs_error,
      dose_score``. There is one row per patient x present (roi, metric). ``dose_score`` is the
      patient's dose score, repeated on each of that patient's rows.
    * ``{"dose_score", "dvh_score", "n_patients"}`` (see :func:`summarise`).

    Every value is float64: the official object-dtype frames need a cast before ``nanmean``.
    """
    frames = [score_case(c) for c in cases]
    if not frames:
        dtypes = {c: object if c in LONG_COLUMNS[:3] else np.float64 for c in LONG_COLUMNS}
        empty = pd.DataFrame({c: pd.Series(dtype=d) for c, d in dtypes.items()})
        return empty, {"dose_score": float("nan"), "dvh_score": float("nan"), "n_patients": 0}
    per_patient = pd.concat(frames, ignore_index=True)
    return per_patient, summarise(per_patient)


def dvh_curve(
    dose: np.ndarray, mask: np.ndarray, bins: int | Sequence[float] | np.ndarray = 200
) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative DVH, ``(dose_levels_Gy, volume_percent)``, where ``V(d) = 100 * #{dose >= d} / #roi``.

    ``bins`` is either the number of equally spaced levels from 0 to the ROI maximum, or an explicit
    array of dose levels. An empty mask returns NaN volumes.
    """
    roi = np.asarray(dose, dtype=np.float64)[np.asarray(mask, dtype=bool)]
    if isinstance(bins, (int, np.integer)):
        top = float(roi.max()) if roi.size else 0.0
        levels = np.linspace(0.0, top, int(bins))
    else:
        levels = np.asarray(bins, dtype=np.float64)
    if roi.size == 0:
        return levels, np.full(levels.shape, np.nan)
    ordered = np.sort(roi)
    above = ordered.size - np.searchsorted(ordered, levels, side="left")
    return levels, 100.0 * above / ordered.size
