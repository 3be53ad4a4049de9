"""The seed's evaluation tables: DVH-MAE per metric, contour Dice/HD95, and paired one-sided tests.

Source: Kim, Khalifa, Purdie, McIntosh 2024 (seed 002), summarised in
``shared/docs/seed-methods.md`` §1.9 and §B.7–B.8.

* **DVH-MAE row** (ROI, metric) = mean over patients of ``|DVH(pred dose) - DVH(ref dose)|``.
  Both DVHs use the clinical (reference) contour. The DVH metric definitions are the official
  OpenKBP ones (:mod:`ml.metrics.openkbp`).
* **Average** row = unweighted mean of the metric rows. The seed's tables satisfy this, checked
  arithmetically in §B.7.
* **Rel. diff. vs Baseline (%)** = ``(Baseline - Model) / Baseline * 100``. A positive value
  means the model has lower error than the baseline.
  - The paper computes it from the Average *as printed*, rounded half-up to 3 decimals.
  - Example from Table 3: Multi-Automated's Average 10.1085 is printed 10.109, which gives
    -7.132 %. The unrounded mean gives -7.124 %.
  - ``decimals=3`` reproduces the paper's numbers.
* **Tests**: one-sided paired t-tests (``scipy.stats.ttest_rel``) on per-patient values, with
  α = 0.05 and a Bonferroni correction.
  - ``p_bonf = min(1, p * m)``, where m is the number of metrics actually tested in that family
    (those with at least 2 finite pairs).
  - DVH family: every DVH metric, Multi-Automated vs Seq-Automated.
  - Contour families: every ROI, once for Dice and once for HD95, Multi-Automated vs
    DL-Baseline.
  - The † marks significance.

numpy and pandas only at import; scipy is imported inside the test function.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from decimal import ROUND_HALF_UP, Decimal

import numpy as np
import pandas as pd

__all__ = [
    "AVERAGE",
    "DAGGER",
    "METRIC_DISPLAY",
    "ROI_DISPLAY",
    "SEED_CONTOUR_ROIS",
    "SEED_DVH_ROIS",
    "SEED_DVH_ROWS",
    "contour_table",
    "dvh_errors_wide",
    "dvh_mae_table",
    "dvh_tests",
    "format_contour_table",
    "format_dvh_table",
    "paired_one_sided_tests",
    "rel_diff_label",
    "relative_difference",
    "round_half_up",
    "row_mae",
    "summarise_mae_rows",
    "to_markdown",
]

SEED_DVH_ROIS: tuple[str, ...] = ("Brainstem", "SpinalCord", "LeftParotid", "RightParotid")
SEED_DVH_ROWS: list[tuple[str, str]] = [(roi, m) for roi in SEED_DVH_ROIS for m in ("D_0.1_cc", "mean")]
SEED_CONTOUR_ROIS: tuple[str, ...] = SEED_DVH_ROIS

ROI_DISPLAY: dict[str, str] = {
    "Brainstem": "Brain stem",
    "SpinalCord": "Spinal cord",
    "LeftParotid": "Left parotid",
    "RightParotid": "Right parotid",
    "Esophagus": "Esophagus",
    "Larynx": "Larynx",
    "Mandible": "Mandible",
}
METRIC_DISPLAY: dict[str, str] = {
    "D_0.1_cc": "D0.1cc",
    "mean": "Dmean",
    "D_99": "D99",
    "D_95": "D95",
    "D_1": "D1",
}
AVERAGE = "Average"
DAGGER = "†"


def rel_diff_label(baseline: str = "Baseline") -> str:
    """Row label of the relative-difference row, ``"Rel. diff. vs <baseline> (%)"``."""
    return f"Rel. diff. vs {baseline} (%)"


def round_half_up(value: float, decimals: int) -> float:
    """Round as printed tables do: 10.1085 becomes 10.109. NaN and inf pass through unchanged."""
    if not np.isfinite(value):
        return float(value)
    q = Decimal(1).scaleb(-decimals)
    return float(Decimal(repr(float(value))).quantize(q, rounding=ROUND_HALF_UP))


def relative_difference(baseline_value: float, model_value: float) -> float:
    """``(baseline - model) / baseline * 100`` in percent. Positive means the model is better."""
    return float((baseline_value - model_value) / baseline_value * 100.0)


# ---------------------------------------------------------------------------------------------
# DVH-MAE table


def _row_index(rows: Sequence[tuple[str, str]]) -> pd.MultiIndex:
    return pd.MultiIndex.from_tuples(list(rows), names=["roi", "metric"])


def dvh_errors_wide(long_df: pd.DataFrame, rows: Sequence[tuple[str, str]] = SEED_DVH_ROWS) -> pd.DataFrame:
    """Per-patient ``|pred - ref|``. Index is patient_id; columns are (roi, metric) in ``rows`` order.

    ``long_df`` is the long DataFrame from :func:`ml.metrics.openkbp.score_patients`. A
    patient without a ROI gets NaN in that column.
    """
    df = long_df.dropna(subset=["roi", "metric"])
    wide = df.pivot(index="patient_id", columns=["roi", "metric"], values="abs_error")
    return wide.reindex(columns=_row_index(rows)).astype(np.float64)


def row_mae(long_df: pd.DataFrame, rows: Sequence[tuple[str, str]] = SEED_DVH_ROWS) -> pd.Series:
    """DVH-MAE per (roi, metric): mean over patients of ``abs_error``, skipping missing ROIs (NaN)."""
    return dvh_errors_wide(long_df, rows).mean(axis=0, skipna=True)


def summarise_mae_rows(row_maes: pd.DataFrame, baseline: str = "Baseline", decimals: int | None = None) -> pd.DataFrame:
    """Append the seed's ``Average`` row and ``Rel. diff. vs <baseline> (%)`` row.

    ``row_maes`` has one row per (roi, metric) and one column per model, holding per-row MAEs
    (for example typed from a paper table). The rows added:

    * Average = unweighted mean of the metric rows. With ``decimals``, it is rounded half-up as
      printed.
    * Rel. diff. = ``(Average[baseline] - Average[model]) / Average[baseline] * 100``. It is NaN
      in the baseline's own column.
    """
    if baseline not in row_maes.columns:
        raise KeyError(f"baseline column {baseline!r} not in {list(row_maes.columns)}")
    avg = row_maes.astype(np.float64).mean(axis=0, skipna=True)
    if decimals is not None:
        avg = avg.map(lambda v: round_half_up(v, decimals))
    rel = pd.Series({m: relative_difference(avg[baseline], avg[m]) for m in avg.index})
    rel[baseline] = np.nan
    extra = pd.DataFrame([avg, rel], index=_extra_index(row_maes.index, [AVERAGE, rel_diff_label(baseline)]))
    return pd.concat([row_maes.astype(np.float64), extra[row_maes.columns]])


def _extra_index(like: pd.Index, labels: list[str]) -> pd.Index:
    """Index for summary rows: ``(label, "")`` under a MultiIndex, plain labels otherwise."""
    if isinstance(like, pd.MultiIndex):
        pad = ("",) * (like.nlevels - 1)
        return pd.MultiIndex.from_tuples([(lab, *pad) for lab in labels], names=like.names)
    return pd.Index(labels, name=like.name)


def dvh_mae_table(
    dvh_by_model: Mapping[str, pd.DataFrame],
    baseline: str = "Baseline",
    rows: Sequence[tuple[str, str]] = SEED_DVH_ROWS,
    decimals: int | None = None,
) -> pd.DataFrame:
    """Seed Table 2/3 layout: DVH-MAE (Gy) per (roi, metric), plus Average and Rel. diff. rows.

    ``dvh_by_model`` maps a model name to its long DataFrame from ``score_patients``. Columns
    come out in the mapping's order, and ``baseline`` must be one of them.
    """
    maes = pd.DataFrame({name: row_mae(df, rows) for name, df in dvh_by_model.items()})
    maes.index = _row_index(rows)
    return summarise_mae_rows(maes, baseline=baseline, decimals=decimals)


# ---------------------------------------------------------------------------------------------
# paired one-sided t-tests with Bonferroni


def _paired_values(a: pd.Series, b: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Values of a and b aligned on their index, keeping only pairs where both are finite."""
    pair = pd.concat({"a": a, "b": b}, axis=1, join="inner").astype(np.float64)
    keep = np.isfinite(pair.to_numpy()).all(axis=1)
    return pair["a"].to_numpy()[keep], pair["b"].to_numpy()[keep]


def _ttest_rel(x: np.ndarray, y: np.ndarray, alternative: str) -> tuple[float, float]:
    from scipy import stats  # lazy

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # zero-variance differences -> nan / inf
        res = stats.ttest_rel(x, y, alternative=alternative)
    return float(res.statistic), float(res.pvalue)


def paired_one_sided_tests(
    errors_a: pd.DataFrame | Mapping[object, Sequence[float]],
    errors_b: pd.DataFrame | Mapping[object, Sequence[float]],
    alternative: str = "less",
    alpha: float = 0.05,
) -> pd.DataFrame:
    """Paired t-test per metric (column) of A vs B, Bonferroni-corrected over the tested metrics.

    Rows are paired units (patients), aligned on the index; columns are metrics. For each metric
    shared by A and B:

    * pairs with a non-finite value are dropped;
    * ``scipy.stats.ttest_rel(a, b, alternative=...)`` is run. ``"less"`` tests
      ``mean(a - b) < 0``, that is, A has smaller errors;
    * metrics with fewer than 2 pairs get ``t = p = NaN`` and are not counted in m.

    The result has one row per metric, with columns ``n, mean_a, mean_b, t, p, p_bonferroni,
    significant``. ``p_bonferroni = min(1, p * m)`` and significant means
    ``p_bonferroni < alpha``.
    """
    a, b = pd.DataFrame(errors_a), pd.DataFrame(errors_b)
    metrics = [c for c in a.columns if c in b.columns]
    records = []
    for metric in metrics:
        x, y = _paired_values(a[metric], b[metric])
        t, p = _ttest_rel(x, y, alternative) if x.size >= 2 else (np.nan, np.nan)
        mean_a = float(x.mean()) if x.size else np.nan
        mean_b = float(y.mean()) if y.size else np.nan
        records.append({"n": int(x.size), "mean_a": mean_a, "mean_b": mean_b, "t": t, "p": p})
    out = pd.DataFrame(records, index=pd.Index(metrics), columns=["n", "mean_a", "mean_b", "t", "p"])
    n_tests = int(out["p"].notna().sum())
    out["p_bonferroni"] = np.minimum(1.0, out["p"].astype(np.float64) * n_tests)
    out["significant"] = (out["p_bonferroni"] < alpha).astype(bool)
    return out


def dvh_tests(
    dvh_by_model: Mapping[str, pd.DataFrame],
    model: str,
    reference: str,
    rows: Sequence[tuple[str, str]] = SEED_DVH_ROWS,
    alternative: str = "less",
    alpha: float = 0.05,
) -> pd.DataFrame:
    """Per DVH metric: is ``model``'s absolute error smaller than ``reference``'s? (Bonferroni over rows)."""
    wide_m = dvh_errors_wide(dvh_by_model[model], rows)
    wide_r = dvh_errors_wide(dvh_by_model[reference], rows)
    return paired_one_sided_tests(wide_m, wide_r, alternative=alternative, alpha=alpha)


# ---------------------------------------------------------------------------------------------
# contour table


def _contour_wide(df: pd.DataFrame, metric: str, rois: Sequence[str]) -> pd.DataFrame:
    pid = "patient_id" if "patient_id" in df.columns else "patient"
    wide = df.pivot(index=pid, columns="roi", values=metric)
    return wide.reindex(columns=list(rois)).astype(np.float64)


_CONTOUR_METRICS = (("dice", "Dice", "greater"), ("hd95", "HD95", "less"))


def contour_table(
    per_patient_contour_metrics: Mapping[str, pd.DataFrame],
    models: tuple[str, str] | None = None,
    rois: Sequence[str] = SEED_CONTOUR_ROIS,
    alpha: float = 0.05,
) -> pd.DataFrame:
    """Seed Table 4/5 layout: mean Dice and HD95 (mm) per ROI for (baseline, model), plus Average.

    ``per_patient_contour_metrics`` maps each model to a long DataFrame with columns
    ``patient_id`` (or ``patient``), ``roi``, ``dice`` and ``hd95``. ``models`` is
    ``(baseline, model)``, by default the first two keys.

    * ROI row = mean over patients. NaN is skipped; inf propagates, so a missed structure shows.
    * Average = unweighted mean of the ROI rows.
    * Tests, Bonferroni-corrected across ROIs separately for each metric: Dice uses
      ``alternative="greater"`` (model better = higher); HD95 uses ``"less"``.

    The columns form a MultiIndex ``(Dice|HD95, baseline|model|p_bonferroni|significant)``.
    """
    base, model = models or tuple(per_patient_contour_metrics)[:2]
    index = pd.Index(list(rois) + [AVERAGE], name="roi")
    cols: dict[tuple[str, str], pd.Series] = {}
    for metric, label, alternative in _CONTOUR_METRICS:
        wide = {m: _contour_wide(per_patient_contour_metrics[m], metric, rois) for m in (base, model)}
        for m in (base, model):
            means = wide[m].mean(axis=0, skipna=True)
            cols[(label, m)] = pd.concat([means, pd.Series({AVERAGE: means.mean()})]).reindex(index)
        tests = paired_one_sided_tests(wide[model], wide[base], alternative=alternative, alpha=alpha)
        cols[(label, "p_bonferroni")] = tests["p_bonferroni"].reindex(index)
        cols[(label, "significant")] = tests["significant"].reindex(index, fill_value=False).astype(bool)
    return pd.DataFrame(cols, index=index)


# ---------------------------------------------------------------------------------------------
# display


def _fmt(value: object, decimals: int) -> str:
    if isinstance(value, (bool, np.bool_)):
        return DAGGER if value else ""
    if isinstance(value, (int, np.integer)):
        return str(int(value))  # counts (patients, n) stay integers
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return "—" if np.isnan(v) else f"{v:.{decimals}f}"
    return "" if value is None else str(value)


def _display(label: object) -> str:
    text = str(label)
    return ROI_DISPLAY.get(text, METRIC_DISPLAY.get(text, text))


def format_dvh_table(
    table: pd.DataFrame, tests: pd.DataFrame | None = None, marked: str | None = None, decimals: int = 3
) -> pd.DataFrame:
    """Strings for a :func:`dvh_mae_table` result.

    A dagger goes on the ``marked`` column for the rows where ``tests`` are significant.
    """
    out = table.map(lambda v: _fmt(v, decimals))
    if tests is not None and marked is not None:
        for key in tests.index[tests["significant"].to_numpy(dtype=bool)]:
            if key in out.index:
                out.loc[key, marked] = f"{out.loc[key, marked]} {DAGGER}"
    return out


def format_contour_table(table: pd.DataFrame, decimals: int = 3) -> pd.DataFrame:
    """Strings in the seed's layout (``DSC``/``HD`` per model). A dagger marks significant model values."""
    out = pd.DataFrame(index=table.index)
    for label in dict.fromkeys(lab for lab, _ in table.columns):
        models = [m for lab, m in table.columns if lab == label and m not in ("p_bonferroni", "significant")]
        for i, m in enumerate(models):
            col = table[(label, m)].map(lambda v: _fmt(v, decimals))
            if i == len(models) - 1:  # the compared model carries the marks
                sig = table[(label, "significant")].to_numpy(dtype=bool)
                col = col.where(~sig, col + f" {DAGGER}")
            out[f"{label} {m}"] = col
    return out


def to_markdown(df: pd.DataFrame, decimals: int = 3) -> str:
    """Markdown (pipe table) with display names, ``decimals`` places, "—" for NaN and † for True.

    Cells are formatted here and tabulate number parsing is off, so 29.610 keeps its zero.

    A (roi, metric) MultiIndex becomes ``ROI`` and ``metric`` columns. MultiIndex columns are
    joined with a space.
    """
    out = df.map(lambda v: _fmt(v, decimals))
    if isinstance(out.columns, pd.MultiIndex):
        out.columns = [" ".join(str(p) for p in col if str(p)) for col in out.columns]
    if isinstance(out.index, pd.MultiIndex):
        nlev = out.index.nlevels
        names = ["ROI", "metric"] if nlev == 2 else [f"level_{i}" for i in range(nlev)]
        labels = pd.DataFrame([[_display(p) for p in key] for key in out.index], columns=names)
        out = pd.concat([labels, out.reset_index(drop=True)], axis=1)
        return out.to_markdown(index=False, disable_numparse=True)
    out.index = [_display(i) for i in out.index]
    return out.to_markdown(disable_numparse=True)
