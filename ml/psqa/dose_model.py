"""Planar dose of MLC beams: an analytic pencil-beam model (numpy + scipy.special only).

A beam's dose plane is computed in the isocentre plane, perpendicular to the beam (the QA
"perpendicular field-by-field" geometry), on the grid of ``ml.psqa.fluence`` (pixel ``(r, c)``
centred at ``y = (r - (size-1)/2) * spacing``, ``x = (c - (size-1)/2) * spacing``; rows = BLD y,
columns = BLD x). Values are **point doses at the pixel centres**, in Gy.

Model (``DoseModel`` holds every parameter; the TPS and the "machine" are two instances):

* **fluence** of one aperture = a union of rectangles, one per open leaf pair: pair ``p`` spans
  ``[y0_p, y1_p]`` (its leaf boundaries clipped to the Y jaws) and, along x, the open interval
  widened by the **dosimetric leaf gap** of the rounded leaf ends, ``[a_p - DLG/2, b_p + DLG/2]``,
  clipped to the X jaws. A pair is open when ``b_p - a_p > 1e-6`` mm; closed pairs get no DLG.
  Per MU the open rectangles carry ``1 - t`` and the jaw rectangle ``t`` (**MLC transmission**),
  so open area gets 1 and leaf-blocked area inside the jaws ``t``; outside the jaws 0;
* **tongue-and-groove** (``tg_width_mm`` > 0; the machine only, the TPS model has 0): along each
  boundary between two adjacent pairs that lies inside the Y jaws, where exactly one of the two
  pairs is open (x outside the intersection of their open intervals), a strip of width
  ``tg_width_mm`` on the open side of the boundary is shadowed by the neighbour's tongue and gets
  transmission only. Segments whose adjacent pairs have identical extents are unaffected;
* **output factor** per segment: the head-scatter factor ``Sc(s) = (1 - A exp(-s/L)) /
  (1 - A exp(-s_ref/L))`` of the segment's equivalent square ``s = 4 area / perimeter`` (Sterling,
  on the effective open area), which multiplies the segment's MU; phantom scatter comes from the
  kernel's scatter component, so the total output factor rises with field size;
* **kernel**: a normalised double Gaussian ``(1 - w) G(sigma_p) + w G(sigma_s)`` (primary incl.
  source size, and phantom scatter). ``detector_sigma_mm`` (measurement only) convolves both
  terms with the detector's Gaussian response (``sigma -> sqrt(sigma^2 + sigma_det^2)``);
* the convolution of a rectangle with a Gaussian is separable and analytic
  (``[Phi((x1-x)/s) - Phi((x0-x)/s)] [Phi((y1-y)/s) - Phi((y0-y)/s)]``), so a beam's plane is
  ``Y^T diag(weights) X`` over all its rectangles: exact for sub-millimetre leaf shifts, no fine
  grid, no FFT, and sampling-free (the point dose at each pixel centre);
* **calibration**: ``gy_per_mu`` Gy/MU on the central axis of a ``reference_field_mm`` square
  open field (jaw-defined, Sc = 1); each model is normalised at that field (a machine is
  calibrated to its TPS model at the reference field; mismatches appear in small fields).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import ndtr

from ml.psqa.fluence import pixel_centres
from ml.psqa.plan import Beam, Plan

__all__ = [
    "DoseModel",
    "beam_dose",
    "central_axis_output",
    "equivalent_square_mm",
    "field_dose",
    "head_scatter_factor",
    "plan_dose",
]

OPEN_EPS_MM = 1e-6


@dataclass(frozen=True)
class DoseModel:
    """Dosimetric parameters of one beam model (defaults: the TPS model of a 6 MV linac)."""

    dlg_mm: float = 1.5  # dosimetric leaf gap (rounded leaf ends): each open leaf end moves DLG/2 outwards
    transmission: float = 0.015  # MLC transmission (fraction of open fluence)
    primary_sigma_mm: float = 2.5  # primary Gaussian incl. source size (penumbra)
    scatter_sigma_mm: float = 25.0  # phantom-scatter Gaussian
    scatter_weight: float = 0.12  # weight of the scatter Gaussian
    gy_per_mu: float = 0.009  # Gy/MU on axis of the reference field at the QA depth
    reference_field_mm: float = 100.0  # calibration field (square side)
    head_scatter_amplitude: float = 0.12  # A of Sc(s)
    head_scatter_length_mm: float = 60.0  # L of Sc(s)
    tg_width_mm: float = 0.0  # tongue-and-groove strip width (0: not modelled, as in the TPS)
    detector_sigma_mm: float = 0.0  # Gaussian detector response (0: point dose)

    def terms(self) -> tuple[tuple[float, float], ...]:
        """``((weight, sigma_mm), ...)`` of the (detector-broadened) kernel."""
        d2 = float(self.detector_sigma_mm) ** 2
        return (
            (1.0 - self.scatter_weight, float(np.sqrt(self.primary_sigma_mm**2 + d2))),
            (float(self.scatter_weight), float(np.sqrt(self.scatter_sigma_mm**2 + d2))),
        )

    def norm(self) -> float:
        """Central-axis kernel response of the reference field (per unit fluence)."""
        h = self.reference_field_mm / 2.0
        return float(sum(w * (ndtr(h / s) - ndtr(-h / s)) ** 2 for w, s in self.terms()))


def head_scatter_factor(eq_square_mm, model: DoseModel = DoseModel()) -> np.ndarray:
    """Head-scatter factor Sc of a field of equivalent square ``eq_square_mm`` (1 at the reference field)."""
    s = np.asarray(eq_square_mm, float)
    a, lam = model.head_scatter_amplitude, model.head_scatter_length_mm
    ref = 1.0 - a * np.exp(-model.reference_field_mm / lam)
    return (1.0 - a * np.exp(-np.maximum(s, 0.0) / lam)) / ref


def _union_perimeter(lo, hi, y0, y1, is_open) -> np.ndarray:
    """Perimeter of the union of each aperture's open pair rectangles; arrays ``(S, P)``, pairs in y order."""
    g = np.where(is_open, hi - lo, 0.0)
    w = np.where(is_open, y1 - y0, 0.0)
    p = 2.0 * (g + w).sum(axis=1)
    if lo.shape[1] > 1:
        both = is_open[:, :-1] & is_open[:, 1:] & (np.abs(y1[:, :-1] - y0[:, 1:]) <= OPEN_EPS_MM)
        ov = np.clip(np.minimum(hi[:, :-1], hi[:, 1:]) - np.maximum(lo[:, :-1], lo[:, 1:]), 0.0, None)
        p = p - 2.0 * np.where(both, ov, 0.0).sum(axis=1)
    return p


def equivalent_square_mm(lo, hi, y0, y1, is_open) -> np.ndarray:
    """``4 A / P`` per aperture (0 for a closed aperture); arrays ``(S, P)``."""
    area = np.where(is_open, (hi - lo) * (y1 - y0), 0.0).sum(axis=1)
    per = _union_perimeter(lo, hi, y0, y1, is_open)
    return np.where(per > 0, 4.0 * area / np.where(per > 0, per, 1.0), 0.0)


def _profiles(lo: np.ndarray, hi: np.ndarray, centres: np.ndarray, sigma: float) -> np.ndarray:
    """(n, m): Gaussian-blurred indicator of ``[lo_i, hi_i]`` at ``centres``."""
    c = centres[None, :]
    return ndtr((hi[:, None] - c) / sigma) - ndtr((lo[:, None] - c) / sigma)


def _rects_dose(rects: np.ndarray, weights: np.ndarray, centres: np.ndarray, model: DoseModel) -> np.ndarray:
    """``sum_i weights_i * (rect_i (x) kernel)`` at the grid points; ``rects`` rows ``(x0, x1, y0, y1)``."""
    n = centres.size
    out = np.zeros((n, n))
    keep = (rects[:, 1] > rects[:, 0]) & (rects[:, 3] > rects[:, 2]) & (weights != 0)
    if not keep.any():
        return out
    r, w = rects[keep], weights[keep]
    for tw, sigma in model.terms():
        if tw == 0.0:
            continue
        xs = _profiles(r[:, 0], r[:, 1], centres, sigma)  # (k, nx)
        ys = _profiles(r[:, 2], r[:, 3], centres, sigma)  # (k, ny)
        out += tw * (ys.T @ (w[:, None] * xs))
    return out


def _aperture_arrays(beam: Beam, model: DoseModel):
    """Effective geometry of the beam's MU-carrying apertures as ``(S, P)`` arrays."""
    aps = [ap for ap in beam.apertures() if ap.mu > 0]
    bnd = np.asarray(beam.leaf_boundaries, float)
    if not aps:
        return None
    mu = np.array([ap.mu for ap in aps])
    a = np.array([ap.mlc_a for ap in aps], float)
    b = np.array([ap.mlc_b for ap in aps], float)
    jx = np.array([ap.jaw_x for ap in aps], float)
    jy = np.array([ap.jaw_y for ap in aps], float)
    is_open = (b - a) > OPEN_EPS_MM
    half = model.dlg_mm / 2.0
    lo = np.clip(a - half, jx[:, :1], jx[:, 1:])
    hi = np.clip(b + half, jx[:, :1], jx[:, 1:])
    hi = np.maximum(hi, lo)
    y0 = np.clip(bnd[None, :-1], jy[:, :1], jy[:, 1:])
    y1 = np.maximum(np.clip(bnd[None, 1:], jy[:, :1], jy[:, 1:]), y0)
    is_open &= (hi - lo > OPEN_EPS_MM) & (y1 - y0 > OPEN_EPS_MM)
    return mu, lo, hi, y0, y1, is_open, jx, jy, bnd


def _tg_rects(lo, hi, y0, y1, is_open, jy, bnd, width: float, seg_weight: np.ndarray):
    """Negative/positive strips of the tongue-and-groove model (see module docstring)."""
    S, P = lo.shape
    if P < 2 or width <= 0:
        return np.zeros((0, 4)), np.zeros(0)
    yb = bnd[1:-1][None, :].repeat(S, 0)  # boundary between pair p and p+1
    inside = (yb > jy[:, :1] + OPEN_EPS_MM) & (yb < jy[:, 1:] - OPEN_EPS_MM)
    op, oq = is_open[:, :-1], is_open[:, 1:]
    same = op & oq & (np.abs(lo[:, :-1] - lo[:, 1:]) <= OPEN_EPS_MM) & (np.abs(hi[:, :-1] - hi[:, 1:]) <= OPEN_EPS_MM)
    act = inside & (op | oq) & ~same
    if not act.any():
        return np.zeros((0, 4)), np.zeros(0)
    s_idx, p_idx = np.nonzero(act)
    q_idx = p_idx + 1
    b_y = yb[s_idx, p_idx]
    lp, hp, lq, hq = lo[s_idx, p_idx], hi[s_idx, p_idx], lo[s_idx, q_idx], hi[s_idx, q_idx]
    opn_p, opn_q = op[s_idx, p_idx], oq[s_idx, p_idx]
    both = opn_p & opn_q
    il, ih = np.maximum(lp, lq), np.minimum(hp, hq)
    il, ih = np.where(both, il, 0.0), np.where(both, np.maximum(ih, il), 0.0)
    below = (np.maximum(b_y - width, y0[s_idx, p_idx]), b_y)  # in pair p
    above = (b_y, np.minimum(b_y + width, y1[s_idx, q_idx]))  # in pair q
    w = seg_weight[s_idx]
    rects, weights = [], []
    # strip in p: -(I_p) + (I_p & I_q); strip in q: -(I_q) + (I_p & I_q)
    for (yy0, yy1), (x0, x1, sel, sign) in (
        (below, (lp, hp, opn_p, -1.0)),
        (below, (il, ih, both, 1.0)),
        (above, (lq, hq, opn_q, -1.0)),
        (above, (il, ih, both, 1.0)),
    ):
        rects.append(np.stack([np.where(sel, x0, 0.0), np.where(sel, x1, 0.0), yy0, yy1], axis=1))
        weights.append(sign * w * sel)
    return np.concatenate(rects), np.concatenate(weights)


def beam_dose(beam: Beam, model: DoseModel = DoseModel(), size: int = 128, spacing_mm: float = 2.0) -> np.ndarray:
    """``(size, size)`` dose plane (Gy) of one beam (module docstring), rows = BLD y, cols = BLD x."""
    centres = pixel_centres(size, spacing_mm)
    geo = _aperture_arrays(beam, model)
    if geo is None:
        return np.zeros((int(size), int(size)))
    mu, lo, hi, y0, y1, is_open, jx, jy, bnd = geo
    _S, _P = lo.shape
    t = float(model.transmission)
    sc = head_scatter_factor(equivalent_square_mm(lo, hi, y0, y1, is_open), model)
    w_open = mu * sc * (1.0 - t)  # per segment
    s_idx, p_idx = np.nonzero(is_open)
    rects = [np.stack([lo[s_idx, p_idx], hi[s_idx, p_idx], y0[s_idx, p_idx], y1[s_idx, p_idx]], axis=1)]
    weights = [w_open[s_idx]]
    if t > 0:  # leaf transmission inside the jaws
        rects.append(np.concatenate([jx, jy], axis=1))
        weights.append(mu * t)
    if model.tg_width_mm > 0:
        r, w = _tg_rects(lo, hi, y0, y1, is_open, jy, bnd, float(model.tg_width_mm), w_open)
        rects.append(r)
        weights.append(w)
    dose = _rects_dose(np.concatenate(rects), np.concatenate(weights), centres, model)
    return dose * (model.gy_per_mu / model.norm())


def plan_dose(
    plan: Plan, model: DoseModel = DoseModel(), size: int = 128, spacing_mm: float = 2.0
) -> dict[int, np.ndarray]:
    """``{beam number: dose plane}`` for every beam of the plan."""
    return {b.number: beam_dose(b, model, size, spacing_mm) for b in plan.beams}


def field_dose(
    x1: float,
    x2: float,
    y1: float,
    y2: float,
    mu: float = 100.0,
    model: DoseModel = DoseModel(),
    size: int = 128,
    spacing_mm: float = 2.0,
    leaf_boundaries=None,
) -> np.ndarray:
    """Dose of a single MLC-defined rectangular segment (all pairs within ``[y1, y2]`` open over
    ``[x1, x2]``, jaws at the field edges + 5 mm in x and at ``y1, y2``); for sanity checks."""
    from ml.psqa.plan import ControlPoint
    from ml.psqa.sequencing import MLC_BOUNDARIES_MM

    bnd = np.asarray(MLC_BOUNDARIES_MM if leaf_boundaries is None else leaf_boundaries, float)
    mid = (bnd[:-1] + bnd[1:]) / 2.0
    inside = (mid > y1) & (mid < y2)
    a = np.where(inside, x1, x1)
    b = np.where(inside, x2, x1)
    cps = [
        ControlPoint(i, w, 0.0, 0.0, (x1 - 5.0, x2 + 5.0), (y1, y2), a.astype(float), b.astype(float))
        for i, w in enumerate((0.0, 1.0))
    ]
    beam = Beam(number=1, name="F", meterset_mu=float(mu), leaf_boundaries=bnd, control_points=cps, delivery="STATIC")
    return beam_dose(beam, model, size, spacing_mm)


def central_axis_output(side_mm: float, model: DoseModel = DoseModel()) -> float:
    """Total output factor (dose per MU on axis, relative to the reference field) of a square
    MLC-defined field of side ``side_mm`` centred on the axis (Sc x phantom scatter x penumbra)."""
    h = side_mm / 2.0
    # evaluate the analytic dose at the origin: an odd-size grid has a pixel centred at 0
    d = field_dose(-h, h, -h, h, mu=1.0, model=model, size=5, spacing_mm=1.0)
    return float(d[2, 2] / model.gy_per_mu)
