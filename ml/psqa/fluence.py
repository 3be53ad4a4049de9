"""Fluence (MU) maps from plan geometry, in the isocentre plane (numpy only).

Grid convention (shared with the dose-plane simulator; keep it exact):

* a map is a ``(size, size)`` float64 array ``F[r, c]`` in MU;
* rows ``r`` run along IEC beam-limiting-device **y** (perpendicular to leaf motion, the axis of
  ``Beam.leaf_boundaries`` and of the Y jaws), ascending: row 0 is the most negative y;
* columns ``c`` run along IEC BLD **x** (leaf motion, X jaws, ``mlc_a`` -> ``mlc_b``), ascending;
* pixel ``(r, c)`` is the square of side ``spacing_mm`` centred at

      y = (r - (size - 1) / 2) * spacing_mm,   x = (c - (size - 1) / 2) * spacing_mm

  in mm at the isocentre plane (SAD), so the grid is centred on the beam axis and spans
  ``[-size/2 * spacing, +size/2 * spacing]`` on both axes (see ``pixel_centres``);
* each pixel holds the **area average** of the fluence over the pixel: a leaf pair covering a
  pixel partly along x (leaf end inside the pixel) or along y (leaf boundary or Y jaw inside the
  pixel) contributes its exact covered area fraction. Consequently ``F.sum() * spacing**2`` equals
  ``sum(MU_j * A_j)`` exactly for apertures inside the grid;
* the collimator angle is **ignored** (BEV in BLD coordinates, no rotation), as is the gantry angle:
  ``plan_fluence`` is the "perpendicular composite" (all beams summed in their own BLD frames);
* no penumbra, no output factors, no tongue-and-groove: an ideal, geometric fluence. With
  ``transmission = t`` the area inside the jaws but blocked by leaves gets ``t`` per MU (MLC
  transmission); outside the jaws the fluence is 0 (jaw transmission ignored).

The apertures are ``Beam.apertures()`` (step-and-shoot segments or VMAT control-arc midpoints,
see ``ml.psqa.plan``), each weighted by its MU.
"""

from __future__ import annotations

import numpy as np

from ml.psqa.plan import Aperture, Beam, Plan

__all__ = ["aperture_coverage", "beam_fluence", "pixel_centres", "plan_fluence"]


def _check_grid(spacing_mm: float, size: int) -> None:
    if not (np.isfinite(spacing_mm) and spacing_mm > 0):
        raise ValueError(f"spacing_mm must be a positive number, got {spacing_mm!r}")
    if int(size) != size or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")


def pixel_centres(size: int, spacing_mm: float) -> np.ndarray:
    """Centres (mm) of the ``size`` pixels along one axis: ``(i - (size - 1)/2) * spacing``."""
    _check_grid(spacing_mm, size)
    return (np.arange(int(size), dtype=float) - (int(size) - 1) / 2.0) * float(spacing_mm)


def _overlap_fraction(lo: np.ndarray, hi: np.ndarray, centres: np.ndarray, spacing: float) -> np.ndarray:
    """(k, n) fraction of each pixel ``[c - s/2, c + s/2]`` covered by each interval ``[lo_k, hi_k]``."""
    lo = np.asarray(lo, float)[:, None]
    hi = np.asarray(hi, float)[:, None]
    p0 = (centres - spacing / 2.0)[None, :]
    p1 = (centres + spacing / 2.0)[None, :]
    return np.clip(np.minimum(hi, p1) - np.maximum(lo, p0), 0.0, None) / spacing


def _pair_rows(aperture: Aperture, leaf_boundaries: np.ndarray) -> tuple[np.ndarray, ...]:
    """(x_lo, x_hi, y_lo, y_hi) of each leaf pair's open rectangle, clipped to the jaws."""
    lo, hi, _ = aperture.open_intervals(leaf_boundaries)
    jy0, jy1 = aperture.jaw_y
    y0 = np.clip(leaf_boundaries[:-1], jy0, jy1)
    y1 = np.maximum(np.clip(leaf_boundaries[1:], jy0, jy1), y0)
    return lo, hi, y0, y1


def aperture_coverage(
    aperture: Aperture, leaf_boundaries: np.ndarray, spacing_mm: float = 2.0, size: int = 128, transmission: float = 0.0
) -> np.ndarray:
    """Per-MU fluence of one aperture on the grid: the open area fraction of each pixel
    (``1`` fully open, ``0`` blocked), plus ``transmission`` x the blocked-by-leaves fraction
    inside the jaws. Multiply by ``aperture.mu`` for MU."""
    _check_grid(spacing_mm, size)
    if not 0.0 <= transmission <= 1.0:
        raise ValueError(f"transmission must be in [0, 1], got {transmission!r}")
    centres = pixel_centres(size, spacing_mm)
    bnd = np.asarray(leaf_boundaries, float)
    lo, hi, y0, y1 = _pair_rows(aperture, bnd)
    keep = (hi > lo) & (y1 > y0)
    if keep.any():
        oy = _overlap_fraction(y0[keep], y1[keep], centres, spacing_mm)  # (k, size) rows
        ox = _overlap_fraction(lo[keep], hi[keep], centres, spacing_mm)  # (k, size) cols
        open_cov = oy.T @ ox
    else:
        open_cov = np.zeros((int(size), int(size)))
    if transmission > 0.0:
        jx0, jx1 = aperture.jaw_x
        jy0, jy1 = aperture.jaw_y
        jaw = np.outer(
            _overlap_fraction([jy0], [jy1], centres, spacing_mm)[0],
            _overlap_fraction([jx0], [jx1], centres, spacing_mm)[0],
        )
        # open area lies inside the jaws, so open pixels get (1 - t) + t = 1 per MU
        return (1.0 - transmission) * open_cov + transmission * jaw
    return open_cov


def beam_fluence(beam: Beam, spacing_mm: float = 2.0, size: int = 128, transmission: float = 0.0) -> np.ndarray:
    """``(size, size)`` MU map of one beam in the isocentre plane: ``sum_j MU_j * coverage_j`` over
    ``beam.apertures()`` (grid and conventions in the module docstring; collimator ignored)."""
    _check_grid(spacing_mm, size)
    out = np.zeros((int(size), int(size)))
    bnd = np.asarray(beam.leaf_boundaries, float)
    for ap in beam.apertures():
        out += ap.mu * aperture_coverage(ap, bnd, spacing_mm, size, transmission)
    return out


def plan_fluence(plan: Plan, spacing_mm: float = 2.0, size: int = 128, transmission: float = 0.0) -> np.ndarray:
    """Sum of ``beam_fluence`` over the plan's beams, each in its own BLD frame at the isocentre
    (no gantry/collimator rotation: the "perpendicular composite")."""
    _check_grid(spacing_mm, size)
    out = np.zeros((int(size), int(size)))
    for beam in plan.beams:
        out += beam_fluence(beam, spacing_mm, size, transmission)
    return out
