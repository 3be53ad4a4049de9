"""Training-curve and summary plots of the glioma family (PNG bytes; matplotlib on Agg via ``ml.viz``).

* :func:`kendall_sigma_png` -- the learned Kendall sigma per task over epochs (``sigma_<task>``
  history columns of ``ml.glioma.train``): a larger sigma = a task the model down-weights;
* :func:`modality_weights_png` -- the learned modality fusion weights (``w_<sequence>``) over epochs;
* :func:`missing_modality_png` -- mean Dice and AUC per removed-sequence subset
  (``ml.glioma.selection.missing_modality_table``);
* :func:`ablation_png` -- AUC per task and mean Dice per variant (``ml.glioma.selection.ablation_table``).

Evaluation plots on predictions (reliability, ROC, confusion) live in ``ml.glioma.evaluate``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ml.viz import figure_grid, png_bytes

__all__ = ["ablation_png", "kendall_sigma_png", "missing_modality_png", "modality_weights_png"]


def _curves_png(history: pd.DataFrame, prefix: str, ylabel: str, title: str) -> bytes | None:
    cols = [c for c in history.columns if c.startswith(prefix) and history[c].notna().any()]
    if not cols or "epoch" not in history.columns:
        return None
    plt, fig, axes = figure_grid(1, 1, 3.8)
    ax = axes[0, 0]
    for c in cols:
        ax.plot(history["epoch"], history[c], marker="o", ms=3, lw=1.2, label=c.removeprefix(prefix))
    ax.set_xlabel("epoch", fontsize=7)
    ax.set_ylabel(ylabel, fontsize=7)
    ax.set_title(title, fontsize=8)
    ax.tick_params(labelsize=6)
    ax.legend(fontsize=6)
    return png_bytes(plt, fig)


def kendall_sigma_png(history: pd.DataFrame, title: str = "Kendall uncertainty weighting") -> bytes | None:
    """sigma per task (``sigma_<task>`` columns) against the epoch; None without such columns."""
    return _curves_png(history, "sigma_", "sigma (learned task uncertainty)", title)


def modality_weights_png(history: pd.DataFrame, title: str = "modality fusion weights") -> bytes | None:
    """Normalised fusion weight per sequence (``w_<sequence>`` columns) against the epoch."""
    return _curves_png(history, "w_", "fusion weight", title)


def _bars(ax, labels: list[str], series: dict[str, np.ndarray]) -> None:
    x = np.arange(len(labels))
    width = 0.8 / max(len(series), 1)
    for i, (name, values) in enumerate(series.items()):
        ax.bar(x + i * width - 0.4 + width / 2, np.nan_to_num(values, nan=0.0), width=width, label=name)
    ax.set_xticks(x, labels, fontsize=6, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.tick_params(labelsize=6)
    ax.legend(fontsize=6)


def missing_modality_png(table: pd.DataFrame) -> bytes | None:
    """Bars of ``dice_mean`` and ``auc_<task>`` per ``removed`` subset (the full input first)."""
    if table is None or table.empty:
        return None
    metrics = [c for c in ("dice_mean", "auc_idh", "auc_codel", "auc_grade", "auc_histology") if c in table]
    plt, fig, axes = figure_grid(1, 1, 4.6)
    ax = axes[0, 0]
    _bars(ax, [str(r) for r in table["removed"]], {m: table[m].to_numpy(float) for m in metrics})
    ax.set_xlabel("sequences removed", fontsize=7)
    ax.set_title("missing-modality robustness (out-of-fold)", fontsize=8)
    return png_bytes(plt, fig)


def ablation_png(table: pd.DataFrame) -> bytes | None:
    """Bars of ``dice_mean`` and ``auc_<task>`` per ``variant``."""
    if table is None or table.empty:
        return None
    metrics = [c for c in ("dice_mean", "auc_idh", "auc_codel", "auc_grade", "auc_histology") if c in table]
    plt, fig, axes = figure_grid(1, 1, 4.6)
    ax = axes[0, 0]
    _bars(ax, [str(v) for v in table["variant"]], {m: table[m].to_numpy(float) for m in metrics})
    ax.set_title("ablation (out-of-fold, same folds)", fontsize=8)
    return png_bytes(plt, fig)
