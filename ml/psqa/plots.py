"""PSQA figures as PNG bytes (matplotlib Agg): predicted vs measured, Bland-Altman, modality
contribution curves over epochs, example dose-difference maps."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ml.viz import figure_grid, png_bytes

__all__ = ["bland_altman_png", "contribution_curves_png", "dd_examples_png", "scatter_png", "shapley_bars_png"]


def _legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6)


def scatter_png(preds: dict[str, np.ndarray], true: np.ndarray, criterion: str) -> bytes:
    """Predicted vs measured GPR, one panel per model variant."""
    n = len(preds)
    plt, fig, axes = figure_grid(1, n, 2.8)
    lo = float(min(true.min(), *(p.min() for p in preds.values()))) - 1
    for ax, (name, p) in zip(axes[0], preds.items(), strict=True):
        fail = true < 90
        ax.scatter(true[~fail], p[~fail], s=10, alpha=0.7, label="pass")
        ax.scatter(true[fail], p[fail], s=14, c="tab:red", alpha=0.8, label="GPR < 90 %")
        ax.plot([lo, 100], [lo, 100], "k--", lw=0.8)
        ax.axhline(90, color="gray", lw=0.5)
        ax.axvline(90, color="gray", lw=0.5)
        mae = float(np.mean(np.abs(p - true)))
        ax.set_title(f"{name}\nMAE {mae:.2f} %", fontsize=8)
        ax.set_xlabel(f"measured GPR {criterion} (%)", fontsize=7)
        ax.set_ylabel("predicted (%)", fontsize=7)
        ax.set_xlim(lo, 100.5)
        ax.set_ylim(lo, 100.5)
        ax.tick_params(labelsize=6)
    _legend(axes[0][0])
    return png_bytes(plt, fig)


def bland_altman_png(pred: np.ndarray, true: np.ndarray, title: str) -> bytes:
    plt, fig, axes = figure_grid(1, 1, 3.6)
    ax = axes[0, 0]
    mean, diff = (pred + true) / 2, pred - true
    bias, sd = float(diff.mean()), float(diff.std(ddof=1)) if len(diff) > 1 else 0.0
    ax.scatter(mean, diff, s=10, alpha=0.7)
    for y, style in ((bias, "-"), (bias + 1.96 * sd, "--"), (bias - 1.96 * sd, "--")):
        ax.axhline(y, color="k", ls=style, lw=0.8)
    ax.set_title(f"{title}: bias {bias:.2f}, LoA +-{1.96 * sd:.2f} %", fontsize=8)
    ax.set_xlabel("mean of predicted and measured GPR (%)", fontsize=7)
    ax.set_ylabel("predicted - measured (%)", fontsize=7)
    ax.tick_params(labelsize=6)
    return png_bytes(plt, fig)


def contribution_curves_png(history: pd.DataFrame, title: str = "") -> bytes:
    """psi (share of the Shapley contributions, signed: below 0 the modality hurts, see
    ``ml.psqa.shapley.contribution_shares``) per task and modality, task weights and attention."""
    plt, fig, axes = figure_grid(1, 3, 3.0)
    e = history["epoch"]
    for ax, task in zip(axes[0][:2], ("gpr", "dd"), strict=True):
        for m, c in (("image", "tab:blue"), ("table", "tab:orange")):
            col = f"psi_{task}_{m}"
            if col in history:
                ax.plot(e, history[col], color=c, label=m)
        ax.set_title(f"Shapley contribution share, task {task.upper()}", fontsize=8)
        ax.axhline(0, color="k", lw=0.5)
        ax.axhline(1, color="k", lw=0.5, ls=":")
        ax.set_xlabel("epoch", fontsize=7)
        _legend(ax)
        ax.tick_params(labelsize=6)
    ax = axes[0][2]
    for col, label in (
        ("lambda_gpr", "lambda GPR"),
        ("lambda_dd", "lambda DD"),
        ("alpha_image", "attention image"),
        ("k_gpr_table", "k GPR table"),
        ("k_dd_image", "k DD image"),
    ):
        if col in history:
            ax.plot(e, history[col], label=label)
    ax.set_title("task weights, attention, loss factors", fontsize=8)
    ax.set_xlabel("epoch", fontsize=7)
    _legend(ax)
    ax.tick_params(labelsize=6)
    if title:
        fig.suptitle(title, fontsize=8)
    return png_bytes(plt, fig)


def dd_examples_png(planned: np.ndarray, true_dd: np.ndarray, pred_dd: np.ndarray, labels: list[str]) -> bytes:
    """Rows = plans; columns = planned dose, measured - planned, predicted, prediction error."""
    n = len(labels)
    plt, fig, axes = figure_grid(n, 4, 2.2)
    lim = float(np.percentile(np.abs(true_dd), 99.5)) or 1.0
    for i in range(n):
        panels = [
            (planned[i], "planned dose (rel.)", "viridis", None),
            (true_dd[i], "measured - planned (%)", "RdBu_r", lim),
            (pred_dd[i], "predicted DD (%)", "RdBu_r", lim),
            (pred_dd[i] - true_dd[i], "prediction error (%)", "RdBu_r", lim),
        ]
        for j, (img, title, cmap, vmax) in enumerate(panels):
            ax = axes[i][j]
            kw = {"vmin": -vmax, "vmax": vmax} if vmax else {}
            im = ax.imshow(img, cmap=cmap, **kw)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=7)
            if j == 0:
                ax.set_ylabel(labels[i], fontsize=7)
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=5)
    return png_bytes(plt, fig)


def shapley_bars_png(summary: pd.DataFrame, per_plan: pd.DataFrame | None = None) -> bytes:
    """Mean Shapley contribution per task and modality for each split (bars), and the per-plan
    distribution on the test split (box plots)."""
    tasks = sorted(summary["task"].unique()) if len(summary) else []
    plt, fig, axes = figure_grid(1, 2, 3.2)
    ax = axes[0][0]
    splits = [s for s in ("train", "val", "test") if s in set(summary["split"])]
    width = 0.8 / max(len(splits), 1)
    labels = [f"{t}/{m}" for t in tasks for m in ("image", "table")]
    for i, sp in enumerate(splits):
        sub = summary[summary["split"] == sp].set_index("task")
        vals = [float(sub.loc[t, f"phi_{m}"]) for t in tasks for m in ("image", "table")]
        ax.bar(np.arange(len(labels)) + i * width, vals, width, label=sp)
    ax.set_xticks(np.arange(len(labels)) + width * (len(splits) - 1) / 2, labels, fontsize=6)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_title("mean Shapley contribution (error reduction)", fontsize=8)
    _legend(ax)
    ax.tick_params(labelsize=6)
    ax = axes[0][1]
    if per_plan is not None and len(per_plan):
        test = per_plan[per_plan["split"] == "test"] if (per_plan["split"] == "test").any() else per_plan
        data = [test.loc[test["task"] == t, f"phi_{m}"].to_numpy() for t in tasks for m in ("image", "table")]
        ax.boxplot(data, tick_labels=labels)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_title("per-plan contributions (test)", fontsize=8)
        ax.tick_params(labelsize=6)
    return png_bytes(plt, fig)
