"""Plan-complexity metrics of external-beam MLC plans (numpy only).

Inputs are ``ml.psqa.plan`` objects. Every aperture-based metric is evaluated on the beam's
MU-weighted apertures ``Beam.apertures()``: step-and-shoot segments, or for VMAT/dynamic beams
the control-arc midpoints (Masi 2013, doi:10.1118/1.4810969), each carrying the MU delivered
between its two control points. Beam values are MU-weighted means over apertures; plan values
are MU-weighted means over beams (weights = beam meterset) unless the column says otherwise
(see ``PLAN_AGGREGATION``). Canonical collection of the definitions: UCoMX (Cavinato et al.,
Med Phys 2024).

Geometry of one aperture (all in mm at the isocentre plane, IEC BLD coordinates):

* leaf pair ``i`` spans ``[b_i, b_{i+1}]`` in y (``leaf_boundaries``); its *effective* rectangle is
  ``[l_i, r_i] x [y0_i, y1_i]`` with ``l_i = clip(mlc_a_i, X1, X2)``, ``r_i = clip(mlc_b_i, X1, X2)``
  (leaf ends clipped to the X jaws) and ``y0_i, y1_i`` the leaf boundaries clipped to the Y jaws;
  ``g_i = r_i - l_i`` is the effective gap and ``w_i = y1_i - y0_i`` the effective width;
* a pair is **open** when ``g_i > 0`` and ``w_i > 0`` (``EPS_MM``): closed pairs and pairs outside
  the Y jaws are excluded from every per-pair statistic (gaps, SAS, LSV);
* area ``A = sum_i g_i * w_i`` over open pairs;
* perimeter ``P`` = exact perimeter of the union of the open rectangles:
  ``P = sum_open (2 w_i + 2 g_i) - 2 sum_{i, i+1 both open and touching} overlap(I_i, I_{i+1})``
  (each pair contributes its two leaf-end edges and its two side edges; the part of a side edge
  shared with the neighbouring open pair is interior and removed twice). It counts leaf ends,
  exposed leaf sides and jaw-defined edges alike.

Jaws-only beams (no MLC) are read by ``read_plan`` as one "leaf pair" spanning +-200 mm whose
"leaves" sit on the X jaws, so all definitions above apply unchanged (a rectangle).

Apertures with zero open area (all leaves closed) still count for ``n_segments``, the area
statistics (area 0), AAV (0) and MCS (0); shape metrics that need an area (LSV, SAS, gaps, edge
metric, irregularity) are MU-weighted over the apertures with an open area only.

Choices where the literature leaves room (all in ``METRIC_DOCS`` too):

* LSV: ``span`` (McNiven's ``pos_max``) is max - min of a bank's positions over the open pairs of
  *that aperture*, and "adjacent" means consecutive open pairs, as in UCoMX and the public ports we
  read; a beam-wide span would give larger LSV values;
* AAV's denominator is McNiven's leaf-wise envelope of the beam (per pair: most retracted leaf
  positions x the y-extent of its jaw-clipped rows), whereas Du's PM and ``field_area_union_mm2``
  use the exact union area; the two coincide unless a pair has disjoint openings over the beam;
* ``edge_metric`` is the perimeter/area form ("aperture complexity", Younge 2016 / UMRO); Younge
  2012's edge penalty counted the MLC side-edge length only (leaf ends are included here);
* gaps (SAS, leaf-gap statistics) are the effective, jaw-clipped gaps ``g_i``;
* ``modulation_index`` is Webb's fluence MI (see ``modulation_index``), not Park 2014's MI_s.

A beam with zero MU (or no aperture carrying MU) gives NaN for every MU-weighted metric; the
counting / mechanical columns (``total_mu``, ``n_control_points``, ``n_segments``, leaf travel,
arc length) stay defined. No numpy warnings are emitted (divisions are guarded).
"""

from __future__ import annotations

import math

import numpy as np

from ml.psqa.fluence import aperture_coverage
from ml.psqa.plan import Aperture, Beam, Plan

__all__ = [
    "BEAM_METRICS",
    "EPS_MM",
    "METRIC_DOCS",
    "MI_F_MAX",
    "MI_SPACING_MM",
    "MOVING_LEAF_MM",
    "PLAN_AGGREGATION",
    "PLAN_METRICS",
    "SAS_THRESHOLDS_MM",
    "SMALL_APERTURE_MM2",
    "beam_metrics",
    "complexity_tables",
    "modulation_index",
    "plan_metrics",
]

EPS_MM = 1e-6  # a gap or width <= EPS_MM is "closed"
MOVING_LEAF_MM = 1e-3  # a leaf whose total travel exceeds this "moves" (same tolerance as plan.py)
SMALL_APERTURE_MM2 = 400.0  # 4 cm^2 (fraction_small_segments)
SAS_THRESHOLDS_MM = (5.0, 10.0, 20.0)
MI_SPACING_MM = 2.0  # fluence grid for the Webb modulation index
MI_F_MAX = 2.0  # MI = integral_0^F_MAX Z(f) df (Webb 2003)
_MI_MAX_SIZE = 1024

#: Column names of the per-beam table, in order. Formula and reference of each in ``METRIC_DOCS``.
BEAM_METRICS: tuple[str, ...] = (
    "total_mu",
    "n_control_points",
    "n_segments",
    "mu_per_segment",
    "mcs",
    "lsv",
    "aav",
    "mean_area_mm2",
    "min_area_mm2",
    "fraction_small_segments",
    "sas_5",
    "sas_10",
    "sas_20",
    "edge_metric",
    "aperture_irregularity",
    "plan_modulation",
    "mean_leaf_gap_mm",
    "min_leaf_gap_mm",
    "leaf_travel_mm",
    "n_moving_leaves",
    "leaf_travel_per_moving_leaf",
    "leaf_travel_per_mu",
    "jaw_x_mm",
    "jaw_y_mm",
    "jaw_area_mm2",
    "field_area_union_mm2",
    "field_eq_square_mm",
    "arc_length_deg",
    "mean_gantry_spacing_deg",
    "modulation_index",
)

#: Column names of the per-plan table: plan-only columns, then every beam column aggregated.
PLAN_METRICS: tuple[str, ...] = ("n_beams", "mu_per_gy") + BEAM_METRICS

#: One line per column: definition (beam level) and primary reference.
METRIC_DOCS: dict[str, str] = {
    "n_beams": "number of treatment beams in the plan",
    "mu_per_gy": "plan MU per fraction / dose per fraction (prescription_gy / fractions); NaN without "
    "a prescription and a fraction count",
    "total_mu": "beam meterset (MU per fraction); plan: sum",
    "n_control_points": "number of control points; plan: sum",
    "n_segments": "number of apertures with MU > 0 (segments, or VMAT control arcs); plan: sum",
    "mu_per_segment": "total_mu / n_segments (MUCA for VMAT); plan: sum MU / sum segments",
    "mcs": "MCS = sum_j MU_j LSV_j AAV_j / sum_j MU_j (McNiven 2010, doi:10.1118/1.3276775; VMAT: Masi 2013)",
    "lsv": "MU-weighted LSV_j = LSV_A x LSV_B, LSV_bank = mean_k (span - |p_k - p_k+1|)/span over "
    "consecutive open pairs, span = max - min of that bank over the aperture's open pairs (McNiven 2010)",
    "aav": "MU-weighted AAV_j = A_j / A_max, A_max = sum_i (max_j r_ij - min_j l_ij)(max_j y1_ij - min_j y0_ij) "
    "over the beam's apertures where pair i is open (McNiven 2010; UCoMX area form)",
    "mean_area_mm2": "MU-weighted mean aperture area sum_i g_i w_i (MFA)",
    "min_area_mm2": "smallest aperture area carrying MU; plan: min",
    "fraction_small_segments": "fraction of the MU delivered through apertures with area < 4 cm^2",
    "sas_5": "MU-weighted fraction of open pairs with effective gap < 5 mm (Crowe 2014, doi:10.1007/s13246-014-0274-9)",
    "sas_10": "as sas_5 with 10 mm",
    "sas_20": "as sas_5 with 20 mm",
    "edge_metric": "MU-weighted P_j / A_j in 1/mm, P = aperture perimeter (Younge 2012 doi:10.1118/1.4762566, "
    "'aperture complexity' form of Younge 2016 doi:10.1120/jacmp.v17i4.6241 / UMRO)",
    "aperture_irregularity": "MU-weighted AI_j = P_j^2 / (4 pi A_j) (1 for a circle); plan: plan irregularity PI "
    "(Du 2014, doi:10.1118/1.4861821)",
    "plan_modulation": "beam modulation BM = 1 - sum_j MU_j A_j / (MU A_union); plan: PM = MU-weighted BM (Du 2014)",
    "mean_leaf_gap_mm": "MU-weighted mean (over open pairs) effective leaf gap",
    "min_leaf_gap_mm": "smallest effective gap of an open pair over the beam's apertures; plan: min",
    "leaf_travel_mm": "sum over both banks, all leaves and consecutive control points of |delta position| "
    "(Masi 2013); plan: sum",
    "n_moving_leaves": "leaves (both banks) with total travel > 1e-3 mm; plan: sum",
    "leaf_travel_per_moving_leaf": "leaf_travel_mm / n_moving_leaves (0 if none move); plan: ratio of sums",
    "leaf_travel_per_mu": "leaf_travel_mm / total_mu (LTMU, UCoMX); plan: ratio of sums",
    "jaw_x_mm": "MU-weighted X jaw opening X2 - X1 (400 mm when the plan has no X jaws)",
    "jaw_y_mm": "MU-weighted Y jaw opening Y2 - Y1",
    "jaw_area_mm2": "MU-weighted jaw rectangle area",
    "field_area_union_mm2": "area of the union of the beam's apertures (exact rectilinear union)",
    "field_eq_square_mm": "4 A_union / P_union (equivalent square of the union aperture)",
    "arc_length_deg": "sum of |delta gantry| (shortest way) over control points; plan: sum",
    "mean_gantry_spacing_deg": "arc_length_deg / (n_control_points - 1)",
    "modulation_index": "Webb 2003 fluence MI = integral_0^2 Z(f) df on the beam's 2 mm fluence map "
    "(doi:10.1088/0031-9155/48/14/301); see modulation_index()",
}

# how each beam column becomes a plan column (default: MU-weighted mean over beams)
_SUM = ("total_mu", "n_control_points", "n_segments", "leaf_travel_mm", "n_moving_leaves", "arc_length_deg")
_MIN = ("min_area_mm2", "min_leaf_gap_mm")
PLAN_AGGREGATION: dict[str, str] = {
    m: (
        "sum"
        if m in _SUM
        else "min"
        if m in _MIN
        else "ratio"
        if m in ("mu_per_segment", "leaf_travel_per_moving_leaf", "leaf_travel_per_mu")
        else "mu_weighted_mean"
    )
    for m in BEAM_METRICS
}

_NAN = float("nan")


# ---------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------
def _div(a: float, b: float, default: float = _NAN) -> float:
    return float(a) / float(b) if b and np.isfinite(b) and b != 0 else default


def _wmean(values, weights) -> float:
    """Weighted mean over entries with a finite value and a positive weight; NaN if none."""
    v = np.asarray(values, float)
    w = np.asarray(weights, float)
    ok = np.isfinite(v) & np.isfinite(w) & (w > 0)
    if not ok.any():
        return _NAN
    sw = w[ok].sum()
    return float((v[ok] * w[ok]).sum() / sw) if sw > 0 else _NAN


def _nanmin(values) -> float:
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    return float(v.min()) if v.size else _NAN


class _ApGeom:
    """Effective geometry of one aperture (see module docstring)."""

    __slots__ = ("area", "gap", "hi", "jaw_x", "jaw_y", "lo", "mu", "open", "perimeter", "width", "y0", "y1")

    def __init__(self, ap: Aperture, boundaries: np.ndarray):
        self.mu = float(ap.mu)
        self.lo, self.hi, _ = ap.open_intervals(boundaries)
        self.y0 = np.clip(boundaries[:-1], ap.jaw_y[0], ap.jaw_y[1])
        self.y1 = np.maximum(np.clip(boundaries[1:], ap.jaw_y[0], ap.jaw_y[1]), self.y0)
        self.gap = self.hi - self.lo
        self.width = self.y1 - self.y0
        self.open = (self.gap > EPS_MM) & (self.width > EPS_MM)
        self.area = float(np.sum(self.gap * self.width, where=self.open))
        self.perimeter = _perimeter(self.lo, self.hi, self.y0, self.y1, self.open)
        self.jaw_x = float(ap.jaw_x[1] - ap.jaw_x[0])
        self.jaw_y = float(ap.jaw_y[1] - ap.jaw_y[0])


def _perimeter(lo, hi, y0, y1, is_open) -> float:
    """Exact perimeter of the union of the open pair rectangles (pairs ordered in y)."""
    g = np.where(is_open, hi - lo, 0.0)
    w = np.where(is_open, y1 - y0, 0.0)
    p = 2.0 * float(np.sum(g + w))
    if len(lo) > 1:
        both = is_open[:-1] & is_open[1:] & (np.abs(y1[:-1] - y0[1:]) <= EPS_MM)
        ov = np.clip(np.minimum(hi[:-1], hi[1:]) - np.maximum(lo[:-1], lo[1:]), 0.0, None)
        p -= 2.0 * float(np.sum(ov, where=both))
    return p


def _bank_lsv(pos: np.ndarray) -> float:
    """McNiven's per-bank LSV: mean over consecutive open pairs of (span - |p_k - p_k+1|) / span,
    span = max - min of the bank's positions over the open pairs; 1 for < 2 pairs or a flat bank."""
    if pos.size < 2:
        return 1.0
    span = float(pos.max() - pos.min())
    if span <= EPS_MM:
        return 1.0
    return float(np.mean((span - np.abs(np.diff(pos))) / span))


def _lsv(g: _ApGeom) -> float:
    if not g.open.any():
        return _NAN
    return _bank_lsv(g.lo[g.open]) * _bank_lsv(g.hi[g.open])


def _union_area_perimeter(rects: np.ndarray) -> tuple[float, float]:
    """Area and perimeter of the union of axis-aligned rectangles ``(x0, x1, y0, y1)`` (exact, on the
    coordinate-compressed grid of all rectangle edges)."""
    if rects.size == 0:
        return 0.0, 0.0
    r = np.round(np.asarray(rects, float), 6)
    xs = np.unique(np.concatenate([r[:, 0], r[:, 1]]))
    ys = np.unique(np.concatenate([r[:, 2], r[:, 3]]))
    ix0, ix1 = np.searchsorted(xs, r[:, 0]), np.searchsorted(xs, r[:, 1])
    iy0, iy1 = np.searchsorted(ys, r[:, 2]), np.searchsorted(ys, r[:, 3])
    d = np.zeros((len(ys), len(xs)), dtype=np.int64)  # 2-D difference array
    np.add.at(d, (iy0, ix0), 1)
    np.add.at(d, (iy0, ix1), -1)
    np.add.at(d, (iy1, ix0), -1)
    np.add.at(d, (iy1, ix1), 1)
    cover = (np.cumsum(np.cumsum(d, axis=0), axis=1) > 0)[:-1, :-1]  # cell (y_k..y_k+1, x_m..x_m+1)
    dx, dy = np.diff(xs), np.diff(ys)
    area = float(np.sum(cover * dy[:, None] * dx[None, :]))
    c = np.pad(cover, 1)
    horizontal = float(np.sum((c[1:, 1:-1] != c[:-1, 1:-1]) * dx[None, :]))
    vertical = float(np.sum((c[1:-1, 1:] != c[1:-1, :-1]) * dy[:, None]))
    return area, horizontal + vertical


def _rects(geoms: list[_ApGeom]) -> np.ndarray:
    out = [np.stack([g.lo[g.open], g.hi[g.open], g.y0[g.open], g.y1[g.open]], axis=1) for g in geoms]
    return np.concatenate(out) if out else np.zeros((0, 4))


def _envelope_area(geoms: list[_ApGeom]) -> float:
    """McNiven's A_max: per pair, the bounding rectangle of its open rectangles over the beam."""
    opened = np.array([g.open for g in geoms])
    if not opened.any():
        return 0.0
    inf = np.inf
    xmin = np.where(opened, [g.lo for g in geoms], inf).min(axis=0)
    xmax = np.where(opened, [g.hi for g in geoms], -inf).max(axis=0)
    ymin = np.where(opened, [g.y0 for g in geoms], inf).min(axis=0)
    ymax = np.where(opened, [g.y1 for g in geoms], -inf).max(axis=0)
    used = opened.any(axis=0)
    return float(np.sum((xmax[used] - xmin[used]) * (ymax[used] - ymin[used])))


def _gantry_arc(beam: Beam) -> float:
    g = np.array([cp.gantry_angle for cp in beam.control_points], float)
    if g.size < 2:
        return 0.0
    d = (np.diff(g) + 180.0) % 360.0 - 180.0
    return float(np.abs(d).sum())


def _leaf_travel(beam: Beam) -> tuple[float, int]:
    cps = beam.control_points
    if len(cps) < 2:
        return 0.0, 0
    pos = np.array([np.concatenate([cp.mlc_a, cp.mlc_b]) for cp in cps], float)
    per_leaf = np.abs(np.diff(pos, axis=0)).sum(axis=0)
    return float(per_leaf.sum()), int(np.count_nonzero(per_leaf > MOVING_LEAF_MM))


# ---------------------------------------------------------------------------------------
# modulation index (Webb 2003)
# ---------------------------------------------------------------------------------------
def modulation_index(beam: Beam, spacing_mm: float = MI_SPACING_MM, f_max: float = MI_F_MAX) -> float:
    """Fluence modulation index of Webb (PMB 48:2051, 2003, doi:10.1088/0031-9155/48/14/301).

    ``MI = integral_0^f_max Z(f) df`` with ``Z(f) = (1/N) * #{neighbouring pixel pairs with
    |F_p - F_q| > f * sigma}``, where the pairs are the x, y and both diagonal neighbours (each pair
    counted once), ``sigma`` is the standard deviation of the fluence ``F`` and ``N`` the number of
    pixels. The integral is evaluated exactly: each pair contributes ``min(|F_p - F_q| / sigma, f_max)``.

    Choices at our resolution (documented because Webb's beamlet maps were coarser): ``F`` is the
    geometric fluence ``beam_fluence`` at ``spacing_mm`` (2 mm) on a grid covering the field; the
    statistics (``sigma``, ``N``, the pairs) are restricted to the *interior* of the field, the pixels
    fully covered by at least one aperture, so the field outline and the partial pixels on it do not
    count as modulation (an open rectangle gives MI = 0 whatever its alignment with the pixels).
    MI grows with finer sampling; compare values at one spacing only. NaN without interior pixels or
    MU. (Park 2014's leaf-speed MI_s is VMAT-only; the fluence form applies to IMRT and VMAT alike.)
    """
    aps = [ap for ap in beam.apertures() if ap.mu > 0]
    if not aps:
        return _NAN
    bnd = np.asarray(beam.leaf_boundaries, float)
    geoms = [_ApGeom(ap, bnd) for ap in aps]
    rects = _rects(geoms)
    if rects.size == 0:
        return _NAN
    extent = float(np.abs(rects).max())
    size = min(2 * math.ceil(extent / spacing_mm) + 4, _MI_MAX_SIZE)
    fluence = np.zeros((size, size))
    interior = np.zeros((size, size), dtype=bool)
    for ap in aps:
        cov = aperture_coverage(ap, bnd, spacing_mm, size)
        fluence += ap.mu * cov
        interior |= cov >= 1.0 - 1e-9
    n = int(interior.sum())
    if n < 2:
        return _NAN
    vals = fluence[interior]
    sigma = float(vals.std())
    if not sigma > 1e-12 * max(float(vals.max()), 1.0):
        return 0.0
    total = 0.0
    for dr, dc in ((0, 1), (1, 0), (1, 1), (1, -1)):  # each neighbouring pair once
        rp, rq = slice(0, size - dr), slice(dr, size)
        cp, cq = (slice(0, size - dc), slice(dc, size)) if dc >= 0 else (slice(-dc, size), slice(0, size + dc))
        both = interior[rp, cp] & interior[rq, cq]
        diff = np.abs(fluence[rp, cp] - fluence[rq, cq])[both]
        total += float(np.minimum(diff / sigma, f_max).sum())
    return total / n


# ---------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------
def beam_metrics(beam: Beam) -> dict[str, float]:
    """All ``BEAM_METRICS`` of one beam (definitions in ``METRIC_DOCS`` and the module docstring)."""
    bnd = np.asarray(beam.leaf_boundaries, float)
    aps = [ap for ap in beam.apertures() if ap.mu > 0]
    geoms = [_ApGeom(ap, bnd) for ap in aps]
    lt, n_moving = _leaf_travel(beam)
    arc = _gantry_arc(beam)
    n_cp = len(beam.control_points)
    total_mu = float(beam.meterset_mu)
    out: dict[str, float] = dict.fromkeys(BEAM_METRICS, _NAN)
    out.update(
        total_mu=total_mu,
        n_control_points=float(n_cp),
        n_segments=float(len(geoms)),
        leaf_travel_mm=lt,
        n_moving_leaves=float(n_moving),
        leaf_travel_per_moving_leaf=_div(lt, n_moving, 0.0),
        arc_length_deg=arc,
        mean_gantry_spacing_deg=_div(arc, n_cp - 1, 0.0),
    )
    ap_mu_total = float(sum(g.mu for g in geoms))
    if not (total_mu > 0 and ap_mu_total > 0):
        return out

    mu = np.array([g.mu for g in geoms])
    area = np.array([g.area for g in geoms])
    is_open = area > 0
    mu_open = np.where(is_open, mu, 0.0)

    # MCS / LSV / AAV (McNiven 2010)
    a_max = _envelope_area(geoms)
    aav = area / a_max if a_max > 0 else np.zeros_like(area)
    lsv = np.array([_lsv(g) for g in geoms])
    mcs = np.where(is_open, np.nan_to_num(lsv) * aav, 0.0)

    # per-pair statistics over open pairs
    gap_mean = np.full(len(geoms), _NAN)
    gap_min = np.full(len(geoms), _NAN)
    sas = {x: np.full(len(geoms), _NAN) for x in SAS_THRESHOLDS_MM}
    for j, g in enumerate(geoms):
        gaps = g.gap[g.open]
        if gaps.size:
            gap_mean[j] = gaps.mean()
            gap_min[j] = gaps.min()
            for x in SAS_THRESHOLDS_MM:
                sas[x][j] = np.count_nonzero(gaps < x) / gaps.size
    perim = np.array([g.perimeter for g in geoms])
    safe_area = np.where(is_open, area, 1.0)
    edge = np.where(is_open, perim / safe_area, _NAN)
    ai = np.where(is_open, perim**2 / (4.0 * np.pi * safe_area), _NAN)

    # union aperture (Du 2014 PM, field size)
    u_area, u_perim = _union_area_perimeter(_rects(geoms))
    bm = 1.0 - float(np.sum(mu * area)) / (ap_mu_total * u_area) if u_area > 0 else _NAN

    out.update(
        mu_per_segment=_div(total_mu, len(geoms)),
        mcs=_wmean(mcs, mu),
        lsv=_wmean(lsv, mu_open),
        aav=_wmean(aav, mu),
        mean_area_mm2=_wmean(area, mu),
        min_area_mm2=float(area.min()),
        fraction_small_segments=float(np.sum(mu[area < SMALL_APERTURE_MM2]) / ap_mu_total),
        sas_5=_wmean(sas[5.0], mu_open),
        sas_10=_wmean(sas[10.0], mu_open),
        sas_20=_wmean(sas[20.0], mu_open),
        edge_metric=_wmean(edge, mu_open),
        aperture_irregularity=_wmean(ai, mu_open),
        plan_modulation=bm,
        mean_leaf_gap_mm=_wmean(gap_mean, mu_open),
        min_leaf_gap_mm=_nanmin(gap_min),
        leaf_travel_per_mu=_div(lt, total_mu),
        jaw_x_mm=_wmean([g.jaw_x for g in geoms], mu),
        jaw_y_mm=_wmean([g.jaw_y for g in geoms], mu),
        jaw_area_mm2=_wmean([g.jaw_x * g.jaw_y for g in geoms], mu),
        field_area_union_mm2=u_area,
        field_eq_square_mm=_div(4.0 * u_area, u_perim),
        modulation_index=modulation_index(beam),
    )
    return out


def _aggregate(rows: list[dict[str, float]]) -> dict[str, float]:
    mu = np.array([r["total_mu"] for r in rows], float)
    out: dict[str, float] = {}
    for m in BEAM_METRICS:
        vals = np.array([r[m] for r in rows], float)
        how = PLAN_AGGREGATION[m]
        if how == "sum":
            out[m] = float(np.nansum(vals)) if vals.size else 0.0
        elif how == "min":
            out[m] = _nanmin(vals)
        elif how == "mu_weighted_mean":
            out[m] = _wmean(vals, mu)
    sums = {k: sum(r[k] for r in rows) for k in ("total_mu", "n_segments", "leaf_travel_mm", "n_moving_leaves")}
    out["mu_per_segment"] = _div(sums["total_mu"], sums["n_segments"])
    out["leaf_travel_per_moving_leaf"] = _div(sums["leaf_travel_mm"], sums["n_moving_leaves"], 0.0)
    out["leaf_travel_per_mu"] = _div(sums["leaf_travel_mm"], sums["total_mu"])
    return out


def _plan_row(plan: Plan, rows: list[dict[str, float]]) -> dict[str, float]:
    agg = _aggregate(rows)
    dpf = plan.dose_per_fraction_gy
    row = {"n_beams": float(len(plan.beams)), "mu_per_gy": _div(agg["total_mu"], dpf) if dpf else _NAN}
    row.update({m: agg[m] for m in BEAM_METRICS})
    return row


def plan_metrics(plan: Plan) -> dict[str, float]:
    """All ``PLAN_METRICS``: beam metrics aggregated over beams (``PLAN_AGGREGATION``: sums for
    counts/MU/leaf travel/arc length, minima for the min columns, ratios of sums for the per-X
    ratios, MU-weighted means otherwise; Du's PI and PM are exactly these MU-weighted means) plus
    ``n_beams`` and ``mu_per_gy``."""
    return _plan_row(plan, [beam_metrics(b) for b in plan.beams])


def complexity_tables(plan: Plan) -> tuple[list[dict], dict]:
    """(per-beam rows ``{"beam_number", *BEAM_METRICS}``, per-plan row ``{*PLAN_METRICS}``)."""
    rows = [beam_metrics(b) for b in plan.beams]
    beam_rows = [{"beam_number": int(b.number), **r} for b, r in zip(plan.beams, rows, strict=True)]
    return beam_rows, _plan_row(plan, rows)
