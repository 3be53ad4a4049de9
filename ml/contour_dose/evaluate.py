"""Evaluate trained contour + dose models on held-out patients (spec §B.7-B.8, ``domain-notes`` §1.1).

Metrics only: predictions come from ``ml.contour_dose.predict.predict_cases`` (every model on
every case, saved as ``<out>/<variant>/<patient>.npz``).

* ``evaluate``: per model the official OpenKBP dose and DVH scores (``ml.metrics.openkbp``);
  the seed's DVH-MAE table (Brainstem, SpinalCord, parotids x D0.1cc, Dmean) across Baseline /
  Seq-Human / Seq-Automated / Multi-Automated with relative differences and one-sided paired
  t-tests (Multi-Automated < Seq-Automated, Bonferroni); Dice and HD95 per OAR for contour-only
  vs Multi-Automated (``ml.metrics.contours``: MONAI's HD95 definition, mm), with tests.
* ``case_figure_png`` / ``dvh_png``: best / median / worst cases and DVH curves.

numpy/pandas/torch for prediction; scipy (tests, distances) and matplotlib (figures) are
imported lazily.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

from ml.contour_dose.cache import Cache, Entry
from ml.contour_dose.variants import MODEL_NAMES, VARIANTS

__all__ = [
    "CONTOUR_VARIANTS",
    "DOSE_VARIANTS",
    "case_figure_png",
    "dvh_png",
    "evaluate",
    "markdown_tables",
    "ranked_cases",
    "variants_needing",
]

DOSE_VARIANTS = ("dose-only", "seq-human", "seq-automated", "multi-automated", "product")
CONTOUR_VARIANTS = ("contour-only", "multi-automated", "product")


def _load_pred(path: str | os.PathLike) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _reference(entry: Entry) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    return entry.full(entry.dose), entry.full(entry.pdm), {n: entry.full(m) for n, m in entry.rois.items()}


def _spacing_zyx(entry: Entry) -> tuple[float, float, float]:
    row_mm, col_mm, slice_mm = entry.voxel_dimensions
    return (slice_mm, row_mm, col_mm)


def evaluate(predictions: pd.DataFrame, cache_dir: str | os.PathLike) -> dict:
    """-> {"scores": DataFrame per model (dose/DVH score), "dvh": {variant: long DataFrame},
    "dvh_table", "dvh_tests", "contours": {variant: per-patient DataFrame}, "contour_table",
    "per_patient": DataFrame (variant, patient_id, dose_score, mean_dice)}."""
    from ml.contour_dose import stats
    from ml.metrics.contours import dice, hd95
    from ml.metrics.openkbp import score_patients

    cache = Cache.open(cache_dir)
    dvh, contour_rows, scores, per_patient = {}, {}, [], []
    for variant, grp in predictions.groupby("variant", sort=False):
        cases, crow = [], []
        for _, r in grp.iterrows():
            entry = cache.load(r["patient_id"])
            pred = _load_pred(r["path"])
            ref, pdm, rois = _reference(entry)
            if "dose" in pred:
                cases.append(
                    {
                        "patient_id": r["patient_id"],
                        "reference": ref,
                        "prediction": pred["dose"],
                        "possible_dose_mask": pdm,
                        "structures": rois,
                        "voxel_dimensions": entry.voxel_dimensions,
                    }
                )
            if "labels" in pred:
                for i, name in enumerate(pred["rois"], start=1):
                    name = str(name)
                    if name not in rois:
                        continue
                    p = pred["labels"] == i
                    crow.append(
                        {
                            "patient_id": r["patient_id"],
                            "roi": name,
                            "dice": dice(p, rois[name]),
                            "hd95": hd95(p, rois[name], _spacing_zyx(entry)),
                        }
                    )
        row = {"variant": variant, "model": MODEL_NAMES[variant], "patients": len(grp)}
        if cases:
            long, summary = score_patients(cases)
            dvh[variant] = long
            row.update({"dose_score": summary["dose_score"], "dvh_score": summary["dvh_score"]})
            pp = long.groupby("patient_id")["dose_score"].first()
            per_patient += [{"variant": variant, "patient_id": p, "dose_score": float(v)} for p, v in pp.items()]
        if crow:
            cdf = pd.DataFrame(crow)
            contour_rows[variant] = cdf
            row.update(
                {
                    "mean_dice": float(cdf["dice"].mean()),
                    "mean_hd95_mm": float(cdf["hd95"].replace(np.inf, np.nan).mean()),
                }
            )
        scores.append(row)
    result = {
        "scores": pd.DataFrame(scores),
        "dvh": dvh,
        "contours": contour_rows,
        "per_patient": pd.DataFrame(per_patient),
    }
    seed_models = {
        MODEL_NAMES[v]: dvh[v] for v in ("dose-only", "seq-human", "seq-automated", "multi-automated") if v in dvh
    }
    if "Baseline" in seed_models:
        result["dvh_table"] = stats.dvh_mae_table(seed_models, baseline="Baseline")
        if "Multi-Automated" in seed_models and "Seq-Automated" in seed_models:
            result["dvh_tests"] = stats.dvh_tests(seed_models, "Multi-Automated", "Seq-Automated")
    if "contour-only" in contour_rows and "multi-automated" in contour_rows:
        result["contour_table"] = stats.contour_table(
            {"DL-Baseline": contour_rows["contour-only"], "Multi-Automated": contour_rows["multi-automated"]},
            models=("DL-Baseline", "Multi-Automated"),
        )
    return result


def markdown_tables(res: dict) -> dict[str, str]:
    """The seed's tables of an ``evaluate`` result as markdown, by file name: ``scores.md`` (dose /
    DVH score, mean Dice and HD95 per model), ``dvh_mae_table.md`` (DVH-MAE per ROI and metric with
    relative differences; a dagger marks the Multi-Automated cells significant after Bonferroni),
    ``dvh_tests.md`` (one-sided paired t-tests, Multi-Automated < Seq-Automated) and
    ``contour_table.md`` (Dice / HD95 per OAR)."""
    from ml.contour_dose import stats

    tables = {"scores.md": stats.to_markdown(res["scores"].set_index("model"), decimals=4)}
    if "dvh_table" in res:
        tables["dvh_mae_table.md"] = stats.to_markdown(
            stats.format_dvh_table(res["dvh_table"], res.get("dvh_tests"), marked="Multi-Automated")
        )
    if "dvh_tests" in res:
        tests = res["dvh_tests"].rename(columns={"mean_a": "MAE Multi-Automated", "mean_b": "MAE Seq-Automated"})
        for col in ("p", "p_bonferroni"):  # small p-values keep their magnitude
            tests[col] = [f"{v:.2g}" for v in tests[col]]
        tables["dvh_tests.md"] = stats.to_markdown(tests)  # (ROI, metric) rows
    if "contour_table" in res:
        tables["contour_table.md"] = stats.to_markdown(stats.format_contour_table(res["contour_table"]))
    return tables


def ranked_cases(per_patient: pd.DataFrame, variant: str) -> dict[str, str]:
    """Best / median / worst patient of ``variant`` by dose score (spec §B.8 item 5)."""
    d = per_patient[per_patient["variant"] == variant].sort_values("dose_score").reset_index(drop=True)
    if d.empty:
        return {}
    return {
        "best": d.iloc[0]["patient_id"],
        "median": d.iloc[len(d) // 2]["patient_id"],
        "worst": d.iloc[-1]["patient_id"],
    }


def case_figure_png(entry: Entry, pred: dict[str, np.ndarray], title: str) -> bytes:
    """CT | reference dose | predicted dose | error, and contours over CT (reference vs predicted)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref, _pdm, rois = _reference(entry)
    ct = entry.full(entry.ct, -1024)
    z = int(np.argmax(ref.sum(axis=(1, 2)))) if ref.any() else ct.shape[0] // 2
    panels = [("CT", ct[z], "gray", (-400, 600)), ("reference dose (Gy)", ref[z], "jet", (0, 75))]
    if "dose" in pred:
        panels += [
            ("predicted dose (Gy)", pred["dose"][z], "jet", (0, 75)),
            ("error (Gy)", pred["dose"][z] - ref[z], "RdBu_r", (-15, 15)),
        ]
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(3.2 * (len(panels) + 1), 3.4))
    for ax, (name, img, cmap, (lo, hi)) in zip(axes, panels, strict=False):
        im = ax.imshow(img, cmap=cmap, vmin=lo, vmax=hi)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
        fig.colorbar(im, ax=ax, fraction=0.046)
    ax = axes[-1]
    ax.imshow(ct[z], cmap="gray", vmin=-400, vmax=600)
    colors = plt.get_cmap("tab10")
    for i, (_name, m) in enumerate(sorted(rois.items())):
        if m[z].any():
            ax.contour(m[z], levels=[0.5], colors=[colors(i % 10)], linewidths=1.0)
    if "labels" in pred:
        for i, name in enumerate(pred["rois"], start=1):
            m = pred["labels"][z] == i
            if m.any():
                ax.contour(
                    m,
                    levels=[0.5],
                    colors=[colors(sorted(rois).index(str(name)) % 10 if str(name) in rois else 9)],
                    linewidths=1.0,
                    linestyles="dashed",
                )
    ax.set_title("contours: reference solid, predicted dashed", fontsize=8)
    ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()


def dvh_png(
    entry: Entry,
    preds: dict[str, np.ndarray],
    title: str,
    rois: tuple[str, ...] = ("Brainstem", "SpinalCord", "LeftParotid", "RightParotid", "PTV70"),
) -> bytes:
    """Cumulative DVHs: reference (solid) vs each model's predicted dose (dashed) per ROI."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ml.metrics.openkbp import dvh_curve

    ref, _, masks = _reference(entry)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.get_cmap("tab10")
    styles = ["--", ":", "-.", (0, (5, 1)), (0, (1, 1))]
    for i, name in enumerate(r for r in rois if r in masks):
        lv, vol = dvh_curve(ref, masks[name])
        ax.plot(lv, vol, color=colors(i), lw=1.8, label=f"{name} (reference)")
        for j, (model, dose) in enumerate(preds.items()):
            lv, vol = dvh_curve(dose, masks[name])
            ax.plot(
                lv,
                vol,
                color=colors(i),
                lw=1.0,
                ls=styles[j % len(styles)],
                label=f"{name} ({model})" if i == 0 else None,
            )
    ax.set_xlabel("dose (Gy)")
    ax.set_ylabel("volume (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()


def variants_needing(task: str) -> tuple[str, ...]:
    return tuple(v for v, s in VARIANTS.items() if task in s["tasks"])
