"""Small, dependency-light figures (matplotlib Agg) returned as PNG bytes.

Used for Dagster metadata previews and MLflow artifacts; no dagster or mlflow here.
"""

from __future__ import annotations

import io

import numpy as np

__all__ = ["ct_preview_png", "figure_grid", "mr_preview_png", "pick_slice", "png_bytes", "study_preview_png"]

_COLORS = {
    "Body": "#bbbbbb",
    "PTV70": "#ff2d2d",
    "PTV63": "#ff9f1a",
    "PTV56": "#ffe14d",
    "Brainstem": "#4dd2ff",
    "SpinalCord": "#3d7dff",
    "RightParotid": "#39d353",
    "LeftParotid": "#b84dff",
    "Mandible": "#f5f5dc",
    "Esophagus": "#ff66c4",
    "Larynx": "#00e5c0",
}


def figure_grid(nrows: int, ncols: int, size: float = 3.2):
    """``(pyplot, figure, axes[nrows][ncols])`` on the Agg backend, ``size`` inches per panel."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows), squeeze=False)
    return plt, fig, axes


def png_bytes(plt, fig, dpi: int = 80) -> bytes:
    """The figure as PNG bytes (no software tag, so the same figure gives the same bytes); closes it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def pick_slice(masks: dict[str, np.ndarray], n_slices: int) -> int:
    """Axial slice with the largest target area (else largest structure area, else middle)."""
    targets = [m for k, m in masks.items() if k.startswith("PTV")]
    pool = targets or [m for k, m in masks.items() if k != "Body"] or list(masks.values())
    if not pool:
        return n_slices // 2
    area = sum(m.reshape(m.shape[0], -1).sum(axis=1) for m in pool)
    return int(np.argmax(area)) if np.any(area) else n_slices // 2


def ct_preview_png(
    ct: np.ndarray,
    masks: dict[str, np.ndarray],
    dose: np.ndarray | None,
    spacing: tuple[float, float, float],
    title: str = "",
) -> bytes:
    """Axial CT slice (soft-tissue window) with ROI outlines and a dose colour wash."""
    k = pick_slice(masks, ct.shape[0])
    plt, fig, axes = figure_grid(1, 1, 4.5)
    ax = axes[0, 0]
    extent = (0, ct.shape[2] * spacing[0], ct.shape[1] * spacing[1], 0)
    ax.imshow(ct[k], cmap="gray", vmin=-160, vmax=240, extent=extent, interpolation="nearest")
    body = np.argwhere(ct[k] > -500)
    if len(body):
        (y0, x0), (y1, x1) = body.min(axis=0), body.max(axis=0)
        m = 8
        ax.set_xlim(max(x0 - m, 0) * spacing[0], min(x1 + m, ct.shape[2]) * spacing[0])
        ax.set_ylim(min(y1 + m, ct.shape[1]) * spacing[1], max(y0 - m, 0) * spacing[1])
    if dose is not None and np.max(dose) > 0:
        d = np.ma.masked_less(dose[k], 0.1 * float(np.max(dose)))
        im = ax.imshow(d, cmap="jet", alpha=0.3, extent=extent, vmin=0, vmax=float(np.max(dose)))
        cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
        cb.set_label("dose (Gy)")
    handles = []
    for name, m in sorted(masks.items()):
        if not m[k].any():
            continue
        color = _COLORS.get(name, "#ffffff")
        ax.contour(m[k].astype(float), levels=[0.5], colors=[color], linewidths=1.0, extent=extent, origin="upper")
        handles.append(plt.Line2D([0], [0], color=color, lw=2, label=name))
    if handles:
        ax.legend(handles=handles, loc="lower left", fontsize=6, framealpha=0.6)
    ax.set_title(title or f"axial slice {k}", fontsize=8)
    ax.set_xlabel("mm (patient right -> left)", fontsize=7)
    ax.tick_params(labelsize=6)
    return png_bytes(plt, fig)


def mr_preview_png(mr: dict[str, np.ndarray], seg: np.ndarray | None, title: str = "") -> bytes:
    """The co-registered sequences side by side on one axial slice (largest lesion area)."""
    names = [s for s in ("t1", "t1c", "t2", "flair") if s in mr]
    ref = mr[names[0]]
    if seg is not None and np.any(seg):
        k = int(np.argmax((seg > 0).reshape(seg.shape[0], -1).sum(axis=1)))
    else:
        k = ref.shape[0] // 2
    plt, fig, axes = figure_grid(1, len(names), 2.6)
    for ax, name in zip(axes[0], names, strict=True):
        sl = mr[name][k]
        lo, hi = np.percentile(sl, [1, 99]) if np.any(sl) else (0, 1)
        ax.imshow(sl, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1)
        if seg is not None and np.any(seg[k]):
            ax.contour((seg[k] > 0).astype(float), levels=[0.5], colors=["#ff3030"], linewidths=0.8)
        ax.set_title(name, fontsize=8)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=8)
    return png_bytes(plt, fig)


def study_preview_png(preview: dict, title: str = "") -> bytes | None:
    if preview.get("ct") is not None:
        return ct_preview_png(
            preview["ct"], preview.get("masks") or {}, preview.get("dose"), preview.get("spacing", (1, 1, 1)), title
        )
    if preview.get("mr"):
        return mr_preview_png(preview["mr"], preview.get("seg"), title)
    return None
