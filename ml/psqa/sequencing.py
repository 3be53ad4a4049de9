"""MLC model and step-and-shoot leaf sequencing (numpy only).

MLC model (Varian Millennium 120-like): 60 leaf pairs moving along IEC BLD x, with
``LeafPositionBoundaries`` (``MLC_BOUNDARIES_MM``) of 10 x 10 mm outer pairs, 40 x 5 mm central
pairs and 10 x 10 mm outer pairs, spanning y = -200 .. +200 mm at the isocentre plane.

Leaf sequencing: the **unidirectional leaf-sweep** of Bortfeld, Boyer, Schlegel, Kahler &
Waldron (Int J Radiat Oncol Biol Phys 28:723, 1994, "Realization and verification of
three-dimensional conformal radiotherapy with modulated fields"; the step-and-shoot form of the
sliding-window decomposition also in Spirou & Chui, Med Phys 21:1031, 1994). For one leaf pair and
an integer intensity profile ``I_0 .. I_{J-1}`` on bixels ``[e_j, e_{j+1}]`` (``I_{-1} = 0``):

* ``P(j) = sum_{i<=j} max(0, I_i - I_{i-1})`` (cumulative positive increments) and
  ``N(j) = P(j) - I(j)`` (cumulative negative increments) are both non-decreasing;
* during monitor unit ("level") ``k = 1 .. K`` the leading leaf (bank B, X2 side) has passed every
  bixel with ``N(j) <= k - 1`` and the trailing leaf (bank A, X1 side) every bixel with
  ``P(j) <= k - 1``, so the open bixels ``{j: N(j) <= k - 1 < k <= P(j)}`` form one interval and
  bixel ``j`` is open during exactly ``P(j) - N(j) = I_j`` levels;
* both leaves only ever move in +x (unidirectional), and a pair needs ``P(J-1)`` levels (its
  "total number of monitor units", TNMU), the minimum for a unidirectional delivery.

All pairs sweep in synchrony: level ``k`` of the beam is the leaf configuration of every pair at
level ``k``; a pair that has finished (``k > TNMU``) waits closed at the right edge of its last
non-zero bixel. Consecutive levels with identical leaf configurations are merged into one segment
whose weight is the number of levels it spans, so ``sum_s units_s * open_s(p, j) == I[p, j]``
exactly, the beam delivers ``max_p TNMU_p`` levels and has at most that many segments (each of
``units_s * mu_per_level`` MU). Closed pairs have ``mlc_a == mlc_b``; pairs that never open are
parked (closed) at a fixed position. The sequencing is exact: no smoothing, no minimum segment
size, no tongue-and-groove synchronisation (so tongue-and-groove effects are not suppressed).

``beam_from_levels`` turns the segments into an ``ml.psqa.plan.Beam``: two control points per
segment with identical leaves (cumulative meterset weights ``0 .. 1``), jaws (ASYMX/ASYMY) fitted
to the union of the open leaf pairs (X: leaf-end extent plus a margin, Y: the outer boundaries of
the open pairs), constant over the beam.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ml.data.dicom.writers import format_ds
from ml.psqa.plan import Beam, ControlPoint

__all__ = [
    "MLC_BOUNDARIES_MM",
    "N_LEAF_PAIRS",
    "Segment",
    "beam_from_levels",
    "format_ds",
    "segments_fluence",
    "sweep_sequence",
]

#: LeafPositionBoundaries (mm): 10 x 10 mm, 40 x 5 mm, 10 x 10 mm (Millennium 120-like).
MLC_BOUNDARIES_MM: np.ndarray = np.concatenate(
    [np.arange(-200.0, -100.0, 10.0), np.arange(-100.0, 100.0, 5.0), np.arange(100.0, 200.1, 10.0)]
)
N_LEAF_PAIRS: int = len(MLC_BOUNDARIES_MM) - 1  # 60


@dataclass
class Segment:
    """One step-and-shoot segment: ``units`` intensity levels through leaves ``(mlc_a, mlc_b)``."""

    units: int
    mlc_a: np.ndarray  # (n_pairs,) bank A (X1) positions, mm
    mlc_b: np.ndarray  # (n_pairs,) bank B (X2) positions, mm

    @property
    def open(self) -> np.ndarray:
        return self.mlc_b > self.mlc_a


def sweep_sequence(levels: np.ndarray, x_edges: np.ndarray, park_mm: float = 0.0) -> list[Segment]:
    """Bortfeld-Boyer unidirectional sweep of an integer intensity map (module docstring).

    ``levels``: ``(n_pairs, J)`` non-negative integers, row ``p`` the profile of leaf pair ``p`` on
    the bixels ``[x_edges[j], x_edges[j + 1]]`` (``x_edges``: ``J + 1`` increasing values, mm).
    Pairs whose row is all zero stay closed at ``park_mm``. Returns the merged segments in
    delivery order; ``sum_s s.units * [x_edges[j], x_edges[j+1]] inside [s.mlc_a[p], s.mlc_b[p]]``
    equals ``levels[p, j]``.
    """
    lv = np.asarray(levels)
    if lv.ndim != 2:
        raise ValueError("levels must be 2-D (n_pairs, n_bixels)")
    if np.any(lv < 0) or not np.all(np.equal(np.mod(lv, 1), 0)):
        raise ValueError("levels must be non-negative integers")
    lv = lv.astype(np.int64)
    edges = np.asarray(x_edges, float)
    n_pairs, n_bix = lv.shape
    if edges.shape != (n_bix + 1,) or np.any(np.diff(edges) <= 0):
        raise ValueError("x_edges must have n_bixels + 1 increasing values")
    inc = np.diff(np.concatenate([np.zeros((n_pairs, 1), np.int64), lv], axis=1), axis=1)
    pos = np.cumsum(np.maximum(inc, 0), axis=1)  # P(j)
    neg = pos - lv  # N(j)
    tnmu = pos[:, -1] if n_bix else np.zeros(n_pairs, np.int64)
    k_max = int(tnmu.max()) if n_pairs else 0
    if k_max == 0:
        return []
    ks = np.arange(1, k_max + 1)
    a = np.full((k_max, n_pairs), float(park_mm))
    b = np.full((k_max, n_pairs), float(park_mm))
    for p in np.nonzero(tnmu > 0)[0]:
        nz = np.nonzero(lv[p])[0]
        end = edges[nz[-1] + 1]
        ia = np.searchsorted(pos[p], ks, side="left")  # first bixel with P >= k
        ib = np.searchsorted(neg[p], ks - 1, side="right") - 1  # last bixel with N <= k - 1
        active = ks <= tnmu[p]
        a[:, p] = np.where(active, edges[np.minimum(ia, n_bix)], end)
        b[:, p] = np.where(active, edges[np.minimum(ib + 1, n_bix)], end)
    segments: list[Segment] = []
    for k in range(k_max):
        if segments and np.array_equal(segments[-1].mlc_a, a[k]) and np.array_equal(segments[-1].mlc_b, b[k]):
            segments[-1].units += 1
        else:
            segments.append(Segment(units=1, mlc_a=a[k].copy(), mlc_b=b[k].copy()))
    return segments


def segments_fluence(segments: list[Segment], x_edges: np.ndarray) -> np.ndarray:
    """``(n_pairs, J)`` integer map ``sum_s units_s * [bixel j open in pair p]`` (bixel fully inside
    the open interval), the inverse of ``sweep_sequence`` on its own bixel grid."""
    edges = np.asarray(x_edges, float)
    if not segments:
        return np.zeros((0, len(edges) - 1), np.int64)
    out = np.zeros((len(segments[0].mlc_a), len(edges) - 1), np.int64)
    lo, hi = edges[:-1][None, :], edges[1:][None, :]
    for s in segments:
        inside = (s.mlc_a[:, None] <= lo + 1e-9) & (s.mlc_b[:, None] >= hi - 1e-9) & s.open[:, None]
        out += s.units * inside
    return out


def beam_from_levels(
    segments: list[Segment],
    *,
    number: int,
    name: str,
    mu_per_level: float,
    gantry_angle: float,
    leaf_boundaries: np.ndarray = MLC_BOUNDARIES_MM,
    jaw_margin_x_mm: float = 1.0,
    energy_mv: float = 6.0,
    treatment_machine: str = "",
) -> Beam:
    """A step-and-shoot ``Beam`` from sequenced segments (two control points per segment).

    MU and weights are rounded as the RT Plan will store them (``format_ds``), so a written and
    re-read plan is identical to this object. Jaws: X from the open leaf ends +- ``jaw_margin_x_mm``
    (rounded outwards to 0.1 mm), Y at the outer boundaries of the pairs that open at least once.
    """
    if not segments:
        raise ValueError("a beam needs at least one segment")
    bnd = np.asarray(leaf_boundaries, float)
    opened = np.array([s.open for s in segments])
    any_open = opened.any(axis=0)
    if not any_open.any():
        raise ValueError("no leaf pair ever opens")
    a_all = np.array([s.mlc_a for s in segments])
    b_all = np.array([s.mlc_b for s in segments])
    x1 = float(np.floor((a_all[opened].min() - jaw_margin_x_mm) * 10.0) / 10.0)
    x2 = float(np.ceil((b_all[opened].max() + jaw_margin_x_mm) * 10.0) / 10.0)
    rows = np.nonzero(any_open)[0]
    y1, y2 = float(bnd[rows[0]]), float(bnd[rows[-1] + 1])
    total_units = int(sum(s.units for s in segments))
    meterset = float(format_ds(total_units * float(mu_per_level), 4))
    cps: list[ControlPoint] = []
    done = 0
    for s in segments:
        for units in (done, done + s.units):
            w = float(format_ds(units / total_units, 12))
            cps.append(
                ControlPoint(
                    index=len(cps),
                    cumulative_meterset_weight=w,
                    gantry_angle=float(gantry_angle),
                    collimator_angle=0.0,
                    jaw_x=(x1, x2),
                    jaw_y=(y1, y2),
                    mlc_a=s.mlc_a.astype(float).copy(),
                    mlc_b=s.mlc_b.astype(float).copy(),
                )
            )
        done += s.units
    return Beam(
        number=int(number),
        name=str(name),
        meterset_mu=meterset,
        leaf_boundaries=bnd.copy(),
        control_points=cps,
        energy_mv=float(energy_mv),
        delivery="STATIC" if len(segments) == 1 else "STEP_AND_SHOOT",
        treatment_machine=str(treatment_machine),
    )
