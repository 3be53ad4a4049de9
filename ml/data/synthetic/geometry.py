"""Plane geometry of the synthetic phantoms: DS strings, polygons, voxel masks, smooth profiles.

Coordinates are millimetres. Polygons are ``[n, 2]`` arrays of ``(x, y)`` vertices; masks are
evaluated at voxel centres ``(ys[j], xs[i])`` and indexed ``[y, x]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ml.data.dicom.writers import format_ds

__all__ = [
    "ELLIPSE_VERTICES",
    "capped_width",
    "ds_mm",
    "ellipse_mask",
    "ellipse_polygon",
    "ellipsoid_section",
    "horseshoe_polygon",
    "polygons_mask",
    "round_polygon",
    "smooth_lerp",
]

ELLIPSE_VERTICES = 96


def ds_mm(v: float) -> str:
    """A length or coordinate as the synthetic studies write it: a DS with at most 4 decimals."""
    return format_ds(v, 4)


def ellipse_polygon(cx: float, cy: float, a: float, b: float, n: int = ELLIPSE_VERTICES) -> np.ndarray:
    t = np.arange(n) * (2.0 * math.pi / n)
    return np.stack([cx + a * np.cos(t), cy + b * np.sin(t)], axis=1)


def horseshoe_polygon(
    cx: float, cy: float, a_out: float, b_out: float, a_in: float, b_in: float, ext: float
) -> np.ndarray:
    """Closed polygon of an anterior (-y) elliptic arch: outer arc, then inner arc back."""
    t_out = np.linspace(math.pi - ext, 2.0 * math.pi + ext, 72)
    t_in = np.linspace(2.0 * math.pi + ext, math.pi - ext, 56)
    outer = np.stack([cx + a_out * np.cos(t_out), cy + b_out * np.sin(t_out)], axis=1)
    inner = np.stack([cx + a_in * np.cos(t_in), cy + b_in * np.sin(t_in)], axis=1)
    return np.concatenate([outer, inner], axis=0)


def round_polygon(poly: np.ndarray) -> np.ndarray:
    """Round vertices to what the DS strings in ContourData will say (so masks match files)."""
    return np.array([[float(ds_mm(x)), float(ds_mm(y))] for x, y in poly], dtype=float)


def polygons_mask(polys: Sequence[np.ndarray], xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon of voxel centres ``(ys[j], xs[i])`` -> bool [ny, nx]."""
    out = np.zeros((ys.size, xs.size), dtype=bool)
    for poly in polys:
        x1, y1 = poly[:, 0], poly[:, 1]
        x2, y2 = np.roll(x1, -1), np.roll(y1, -1)
        i0, i1 = np.searchsorted(xs, x1.min()), np.searchsorted(xs, x1.max(), side="right")
        j0, j1 = np.searchsorted(ys, y1.min()), np.searchsorted(ys, y1.max(), side="right")
        if i1 <= i0 or j1 <= j0:
            continue
        px = xs[i0:i1]
        py = ys[j0:j1][:, None]  # [ny, 1] against edges [E]
        crosses = (y1 <= py) != (y2 <= py)  # [ny, E]
        dy = np.where(y2 == y1, 1.0, y2 - y1)
        xint = x1 + (py - y1) * (x2 - x1) / dy  # [ny, E]
        xint = np.where(crosses, xint, -np.inf)
        count = (xint[:, None, :] > px[None, :, None]).sum(axis=2)  # [ny, nx]
        out[j0:j1, i0:i1] ^= (count % 2).astype(bool)
    return out


def ellipse_mask(X: np.ndarray, Y: np.ndarray, cx: float, cy: float, a: float, b: float) -> np.ndarray:
    if a <= 0 or b <= 0:
        return np.zeros(X.shape, dtype=bool)
    return ((X - cx) / a) ** 2 + ((Y - cy) / b) ** 2 <= 1.0


def capped_width(z: float, lo: float, hi: float, cap_lo: float = 0.0, cap_hi: float = 0.0) -> float:
    """Width factor of a z-extent [lo, hi) with elliptic caps of the given lengths; 0 outside."""
    if not lo <= z < hi:
        return 0.0
    if cap_hi > 0 and z > hi - cap_hi:
        u = (z - (hi - cap_hi)) / cap_hi
        return math.sqrt(max(0.0, 1.0 - u * u))
    if cap_lo > 0 and z < lo + cap_lo:
        u = ((lo + cap_lo) - z) / cap_lo
        return math.sqrt(max(0.0, 1.0 - u * u))
    return 1.0


def ellipsoid_section(z: float, zc: float, c: float) -> float:
    """Relative size of the cross-section at ``z`` of an ellipsoid centred at ``zc``, semi-axis ``c``."""
    u = (z - zc) / c
    return math.sqrt(1.0 - u * u) if abs(u) < 1.0 else 0.0


def smooth_lerp(z: float, z0: float, z1: float, v0: float, v1: float) -> float:
    """``v0`` at ``z0`` to ``v1`` at ``z1`` along a half cosine; constant outside."""
    u = min(1.0, max(0.0, (z - z0) / (z1 - z0)))
    u = 0.5 - 0.5 * math.cos(math.pi * u)  # smooth
    return v0 + (v1 - v0) * u
