"""Plan-complexity metrics (ml.psqa.complexity) and geometric fluence maps (ml.psqa.fluence).

Hand-computed toy apertures on a 10-pair x 10-mm MLC, then the real RT Plans shipped in the
pymedphys wheel (a Monaco VMAT plan and static square fields).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pydicom
import pymedphys
import pytest

from ml.psqa.complexity import (
    BEAM_METRICS,
    METRIC_DOCS,
    PLAN_AGGREGATION,
    PLAN_METRICS,
    beam_metrics,
    complexity_tables,
    modulation_index,
    plan_metrics,
)
from ml.psqa.fluence import aperture_coverage, beam_fluence, pixel_centres, plan_fluence
from ml.psqa.plan import Beam, ControlPoint, Plan, read_plan

BND = np.arange(-50.0, 50.1, 10.0)  # 10 leaf pairs of 10 mm, y in [-50, 50]
N = len(BND) - 1
OPEN = (-200.0, 200.0)


def _cp(i, w, a, b, jaw_x=OPEN, jaw_y=OPEN, gantry=0.0) -> ControlPoint:
    a = np.broadcast_to(np.asarray(a, float), (N,)).copy()
    b = np.broadcast_to(np.asarray(b, float), (N,)).copy()
    return ControlPoint(
        index=i,
        cumulative_meterset_weight=w,
        gantry_angle=gantry,
        collimator_angle=0.0,
        jaw_x=jaw_x,
        jaw_y=jaw_y,
        mlc_a=a,
        mlc_b=b,
    )


def _sns_beam(segments, number=1, jaw_x=OPEN, jaw_y=OPEN, boundaries=BND) -> Beam:
    """Step-and-shoot beam from [(mlc_a, mlc_b, mu), ...]: two control points per segment."""
    total = float(sum(mu for _, _, mu in segments))
    cps, w = [], 0.0
    for a, b, mu in segments:
        cps.append(_cp(len(cps), w / total if total else 0.0, a, b, jaw_x, jaw_y))
        w += mu
        cps.append(_cp(len(cps), w / total if total else 0.0, a, b, jaw_x, jaw_y))
    return Beam(
        number=number,
        name=f"B{number}",
        meterset_mu=total,
        leaf_boundaries=boundaries,
        control_points=cps,
        delivery="STEP_AND_SHOOT" if len(segments) > 1 else "STATIC",
    )


def _plan(*beams, rx=None, fractions=None) -> Plan:
    return Plan(label="toy", beams=list(beams), prescription_gy=rx, fractions=fractions)


# ---------------------------------------------------------------------------------------
# API shape
# ---------------------------------------------------------------------------------------
def test_columns_are_documented_and_tables_have_them():
    assert set(PLAN_METRICS) == set(BEAM_METRICS) | {"n_beams", "mu_per_gy"}
    assert set(METRIC_DOCS) == set(PLAN_METRICS)
    assert set(PLAN_AGGREGATION) == set(BEAM_METRICS)
    plan = _plan(_sns_beam([(-20, 20, 100.0)], number=3), _sns_beam([(-10, 10, 50.0)], number=7))
    rows, row = complexity_tables(plan)
    assert [r["beam_number"] for r in rows] == [3, 7]
    assert all(list(r) == ["beam_number", *BEAM_METRICS] for r in rows)
    assert list(row) == list(PLAN_METRICS)
    assert row == plan_metrics(plan)
    assert all(isinstance(v, float) for v in row.values())


# ---------------------------------------------------------------------------------------
# hand-computed toy apertures
# ---------------------------------------------------------------------------------------
def test_rectangle():
    m = beam_metrics(_sns_beam([(-20, 20, 100.0)]))  # 40 mm x 100 mm
    area, perim = 40.0 * 100.0, 2 * (40.0 + 100.0)
    assert m["lsv"] == 1.0 and m["aav"] == 1.0 and m["mcs"] == 1.0
    assert m["mean_area_mm2"] == pytest.approx(area) and m["min_area_mm2"] == pytest.approx(area)
    assert m["field_area_union_mm2"] == pytest.approx(area)
    assert m["edge_metric"] == pytest.approx(perim / area)
    assert m["aperture_irregularity"] == pytest.approx(perim**2 / (4 * math.pi * area))
    assert m["field_eq_square_mm"] == pytest.approx(4 * area / perim)
    assert m["plan_modulation"] == pytest.approx(0.0, abs=1e-12)
    assert m["mean_leaf_gap_mm"] == 40.0 and m["min_leaf_gap_mm"] == 40.0
    assert (m["sas_5"], m["sas_10"], m["sas_20"]) == (0.0, 0.0, 0.0)
    assert m["n_segments"] == 1 and m["n_control_points"] == 2 and m["mu_per_segment"] == 100.0
    assert m["leaf_travel_mm"] == 0.0 and m["leaf_travel_per_moving_leaf"] == 0.0
    assert m["modulation_index"] == 0.0
    assert m["fraction_small_segments"] == 0.0
    assert m["jaw_x_mm"] == 400.0 and m["jaw_y_mm"] == 400.0


def test_rectangle_clipped_by_jaws():
    # leaves +-30 but X jaws (-20, 15); Y jaws (-25, 25) cut two pairs in half, 4 pairs outside
    m = beam_metrics(_sns_beam([(-30, 30, 10.0)], jaw_x=(-20.0, 15.0), jaw_y=(-25.0, 25.0)))
    assert m["mean_area_mm2"] == pytest.approx(35.0 * 50.0)
    assert m["edge_metric"] == pytest.approx(2 * (35 + 50) / (35 * 50))
    assert m["mcs"] == pytest.approx(1.0) and m["aav"] == pytest.approx(1.0)
    assert m["mean_leaf_gap_mm"] == pytest.approx(35.0)
    assert m["jaw_x_mm"] == 35.0 and m["jaw_y_mm"] == 50.0 and m["jaw_area_mm2"] == 35.0 * 50.0
    assert m["field_eq_square_mm"] == pytest.approx(4 * 35 * 50 / (2 * (35 + 50)))


@pytest.mark.parametrize("gap, sas", [(4.0, (1.0, 1.0, 1.0)), (50.0, (0.0, 0.0, 0.0)), (12.0, (0.0, 0.0, 1.0))])
def test_sas_uniform_gap(gap, sas):
    m = beam_metrics(_sns_beam([(-gap / 2, gap / 2, 100.0)]))
    assert (m["sas_5"], m["sas_10"], m["sas_20"]) == sas


def test_sas_gaps_exclude_closed_and_out_of_jaw_pairs():
    a = np.zeros(N)
    b = np.array([3.0, 3.0, 4.0, 8.0, 15.0, 50.0, 0.0, 0.0, 60.0, 2.0])  # pairs 6, 7 closed
    # Y jaws (-50, 30): pair 8 (y 30..40) and 9 (40..50) are outside, whatever their gap
    m = beam_metrics(_sns_beam([(a, b, 100.0)], jaw_y=(-50.0, 30.0)))
    gaps = np.array([3.0, 3.0, 4.0, 8.0, 15.0, 50.0])  # the six open pairs inside the jaws
    assert m["sas_5"] == pytest.approx(3 / 6)
    assert m["sas_10"] == pytest.approx(4 / 6)
    assert m["sas_20"] == pytest.approx(5 / 6)
    assert m["mean_leaf_gap_mm"] == pytest.approx(gaps.mean())
    assert m["min_leaf_gap_mm"] == 3.0
    assert m["mean_area_mm2"] == pytest.approx(gaps.sum() * 10.0)


def test_two_segments_mu_weighting_aav_pm_and_leaf_travel():
    beam = _sns_beam([(-20, 20, 30.0), (-10, 10, 10.0)])  # 4000 mm2 @ 30 MU, 2000 mm2 @ 10 MU
    m = beam_metrics(beam)
    assert m["n_segments"] == 2 and m["n_control_points"] == 4 and m["mu_per_segment"] == 20.0
    assert m["mean_area_mm2"] == pytest.approx((30 * 4000 + 10 * 2000) / 40)
    assert m["min_area_mm2"] == pytest.approx(2000.0)
    assert m["aav"] == pytest.approx((30 * 1.0 + 10 * 0.5) / 40)  # A_max = 4000
    assert m["lsv"] == pytest.approx(1.0)
    assert m["mcs"] == pytest.approx(0.875)
    assert m["plan_modulation"] == pytest.approx(1 - (30 * 4000 + 10 * 2000) / (40 * 4000))  # 0.125
    assert m["edge_metric"] == pytest.approx((30 * 280 / 4000 + 10 * 240 / 2000) / 40)
    ai = lambda p, a: p**2 / (4 * math.pi * a)  # noqa: E731
    assert m["aperture_irregularity"] == pytest.approx((30 * ai(280, 4000) + 10 * ai(240, 2000)) / 40)
    assert m["mean_leaf_gap_mm"] == pytest.approx((30 * 40 + 10 * 20) / 40)
    assert m["min_leaf_gap_mm"] == 20.0
    # the move between the segments: 20 leaves x 10 mm
    assert m["leaf_travel_mm"] == pytest.approx(200.0)
    assert m["n_moving_leaves"] == 20 and m["leaf_travel_per_moving_leaf"] == pytest.approx(10.0)
    assert m["leaf_travel_per_mu"] == pytest.approx(200.0 / 40)


def test_disjoint_segments_union_vs_envelope():
    beam = _sns_beam([(-40, -20, 10.0), (20, 40, 10.0)])  # two 20 x 100 strips
    m = beam_metrics(beam)
    assert m["field_area_union_mm2"] == pytest.approx(4000.0)  # true union, not the 8000 envelope
    assert m["plan_modulation"] == pytest.approx(1 - (10 * 2000 + 10 * 2000) / (20 * 4000))  # 0.5
    assert m["aav"] == pytest.approx(2000 / 8000)  # McNiven's A_max: leaf-wise max positions
    assert m["field_eq_square_mm"] == pytest.approx(4 * 4000 / (2 * 240))


def test_staircase_lsv_and_perimeter():
    a = np.zeros(N)
    b = np.zeros(N)  # closed pairs everywhere ...
    a[3:7] = [0.0, 10.0, 20.0, 30.0]  # ... except a staircase in pairs 3-6
    b[3:7] = 50.0
    m = beam_metrics(_sns_beam([(a, b, 100.0)]))
    # bank A: span 30, three steps of 10 -> (30 - 10)/30 each; bank B flat -> 1
    assert m["lsv"] == pytest.approx(2 / 3)
    assert m["aav"] == pytest.approx(1.0)
    assert m["mcs"] == pytest.approx(2 / 3)
    area = (50 + 40 + 30 + 20) * 10.0
    perim = 40 + 20 + 50 + 40 + 30  # right edge, top, bottom, 4 leaf ends on the left, 3 steps
    assert m["mean_area_mm2"] == pytest.approx(area)
    assert m["edge_metric"] == pytest.approx(perim / area)
    assert m["aperture_irregularity"] == pytest.approx(perim**2 / (4 * math.pi * area))
    assert m["field_eq_square_mm"] == pytest.approx(4 * area / perim)  # union perimeter = same outline


def test_zigzag_bank_has_zero_lsv():
    a = np.array([0.0, 20.0] * 5)
    m = beam_metrics(_sns_beam([(a, 50.0, 100.0)]))
    assert m["lsv"] == pytest.approx(0.0) and m["mcs"] == pytest.approx(0.0)


def test_dynamic_leaf_travel_and_gantry():
    a0, b0 = np.full(N, -20.0), np.full(N, 20.0)
    a1, b1 = a0.copy(), np.full(N, 25.0)
    a1[:5] = -10.0
    beam = Beam(
        number=1,
        name="arc",
        meterset_mu=50.0,
        leaf_boundaries=BND,
        delivery="VMAT",
        control_points=[_cp(0, 0.0, a0, b0, gantry=355.0), _cp(1, 1.0, a1, b1, gantry=5.0)],
    )
    m = beam_metrics(beam)
    assert m["leaf_travel_mm"] == pytest.approx(5 * 10 + 10 * 5)
    assert m["n_moving_leaves"] == 15
    assert m["leaf_travel_per_moving_leaf"] == pytest.approx(100 / 15)
    assert m["arc_length_deg"] == pytest.approx(10.0) and m["mean_gantry_spacing_deg"] == pytest.approx(10.0)
    # one control arc, aperture at its midpoint: a = -15 (5 pairs) / -20, b = 22.5
    assert m["n_segments"] == 1
    assert m["mean_area_mm2"] == pytest.approx((5 * 37.5 + 5 * 42.5) * 10)


def test_jaws_only_beam():
    bnd = np.array([-200.0, 200.0])
    cps = [
        ControlPoint(i, float(i), 0.0, 0.0, (-30.0, 30.0), (-20.0, 20.0), np.array([-30.0]), np.array([30.0]))
        for i in range(2)
    ]
    m = beam_metrics(Beam(1, "jaws", 100.0, bnd, cps, delivery="STATIC"))
    assert m["mean_area_mm2"] == pytest.approx(2400.0)
    assert m["mcs"] == 1.0 and m["lsv"] == 1.0
    assert m["edge_metric"] == pytest.approx(200 / 2400)
    assert m["mean_leaf_gap_mm"] == 60.0 and m["jaw_area_mm2"] == 2400.0


def test_zero_mu_beam_is_nan_without_warnings():
    dead = _sns_beam([(-20, 20, 0.0)], number=2)
    m = beam_metrics(dead)
    assert m["total_mu"] == 0.0 and m["n_segments"] == 0 and m["n_control_points"] == 2
    for k in (
        "mcs",
        "lsv",
        "aav",
        "mean_area_mm2",
        "sas_5",
        "edge_metric",
        "aperture_irregularity",
        "plan_modulation",
        "mean_leaf_gap_mm",
        "jaw_x_mm",
        "modulation_index",
        "mu_per_segment",
    ):
        assert math.isnan(m[k]), k
    live = _sns_beam([(-20, 20, 30.0), (-10, 10, 10.0)], number=1)
    p = plan_metrics(_plan(live, dead))
    ref = beam_metrics(live)
    for k in ("mcs", "aav", "mean_area_mm2", "edge_metric", "plan_modulation", "min_area_mm2", "mu_per_segment"):
        assert p[k] == pytest.approx(ref[k]), k
    assert p["n_beams"] == 2 and p["n_control_points"] == 6
    assert math.isnan(plan_metrics(_plan(dead))["mcs"])


def test_closed_aperture_with_mu():
    beam = _sns_beam([(-20, 20, 30.0), (0.0, 0.0, 10.0)])  # second segment all closed
    m = beam_metrics(beam)
    assert m["n_segments"] == 2 and m["min_area_mm2"] == 0.0
    assert m["mcs"] == pytest.approx(30 / 40)  # the closed aperture scores 0
    assert m["edge_metric"] == pytest.approx(280 / 4000)  # shape metrics over open apertures only
    assert m["fraction_small_segments"] == pytest.approx(10 / 40)


def test_plan_aggregation_and_mu_per_gy():
    b1 = _sns_beam([(-20, 20, 100.0)], number=1)  # MCS 1
    b2 = _sns_beam([(-20, 20, 150.0), (-10, 10, 150.0)], number=2)  # MCS 0.75
    p = plan_metrics(_plan(b1, b2, rx=60.0, fractions=30))
    assert p["total_mu"] == 400.0 and p["n_segments"] == 3 and p["n_beams"] == 2
    assert p["mu_per_gy"] == pytest.approx(400.0 / 2.0)
    assert p["mcs"] == pytest.approx((100 * 1.0 + 300 * 0.75) / 400)
    assert p["mu_per_segment"] == pytest.approx(400 / 3)
    assert p["min_area_mm2"] == pytest.approx(2000.0)
    assert p["leaf_travel_mm"] == pytest.approx(200.0)
    assert p["leaf_travel_per_moving_leaf"] == pytest.approx(10.0)
    assert math.isnan(plan_metrics(_plan(b1))["mu_per_gy"])


# ---------------------------------------------------------------------------------------
# fluence maps
# ---------------------------------------------------------------------------------------
def test_pixel_centres_convention():
    assert pixel_centres(4, 2.0).tolist() == [-3.0, -1.0, 1.0, 3.0]
    assert pixel_centres(3, 2.5).tolist() == [-2.5, 0.0, 2.5]


def test_fluence_rectangle_inside_outside_and_integral():
    beam = _sns_beam([(-20.0, 30.0, 100.0)], jaw_y=(-10.0, 20.0))  # x -20..30, y -10..20
    f = beam_fluence(beam, spacing_mm=2.0, size=64)
    x = pixel_centres(64, 2.0)
    inside = (x[:, None] > -10) & (x[:, None] < 20) & (x[None, :] > -20) & (x[None, :] < 30)
    assert np.all(f[inside] == pytest.approx(100.0))
    assert np.all(f[~inside] == 0.0)
    assert f.sum() * 4.0 == pytest.approx(100.0 * 50 * 30, rel=1e-12)  # MU x area / pixel area


def test_fluence_partial_pixels_and_orientation():
    # right leaf end at x = 30.5 (pixel [30, 32] a quarter open); Y jaw at 15 (pixel [14, 16] half open)
    beam = _sns_beam([(-20.0, 30.5, 100.0)], jaw_y=(-10.0, 15.0))
    f = beam_fluence(beam, spacing_mm=2.0, size=64)
    x = pixel_centres(64, 2.0)
    c31, r15, r0, c0 = (int(np.argmin(np.abs(x - v))) for v in (31, 15, 1, 1))
    assert f[r0, c31] == pytest.approx(25.0)  # rows = y, cols = x
    assert f[r15, c0] == pytest.approx(50.0)
    assert f[r15, c31] == pytest.approx(12.5)
    assert f.sum() * 4.0 == pytest.approx(100.0 * 50.5 * 25, rel=1e-12)
    # leaf-boundary partial rows: a pair open only for y in [0, 10] sampled by 4 mm pixels [8, 12]
    a, b = np.zeros(N), np.zeros(N)
    a[5], b[5] = -10.0, 10.0
    g = beam_fluence(_sns_beam([(a, b, 10.0)]), spacing_mm=4.0, size=32)
    y4 = pixel_centres(32, 4.0)
    assert g[int(np.argmin(np.abs(y4 - 10))), int(np.argmin(np.abs(y4 - 2)))] == pytest.approx(5.0)


def test_fluence_transmission():
    beam = _sns_beam([(-10.0, 10.0, 100.0)], jaw_x=(-30.0, 30.0), jaw_y=(-20.0, 20.0))
    f = beam_fluence(beam, spacing_mm=2.0, size=64, transmission=0.02)
    x = pixel_centres(64, 2.0)
    r, c_open, c_blocked, c_out = (int(np.argmin(np.abs(x - v))) for v in (1, 1, 21, 41))
    assert f[r, c_open] == pytest.approx(100.0)
    assert f[r, c_blocked] == pytest.approx(2.0)
    assert f[r, c_out] == 0.0
    with pytest.raises(ValueError):
        beam_fluence(beam, transmission=1.5)


def test_plan_fluence_is_sum_of_beams():
    b1 = _sns_beam([(-20, 20, 30.0), (-10, 10, 10.0)], number=1)
    b2 = _sns_beam([(-5.5, 33.3, 70.0)], number=2, jaw_y=(-17.0, 12.0))
    plan = _plan(b1, b2)
    total = plan_fluence(plan, spacing_mm=2.5, size=48)
    assert np.allclose(total, beam_fluence(b1, 2.5, 48) + beam_fluence(b2, 2.5, 48))


def test_modulation_index_two_level_field():
    # 200 MU on x in [-10, 0], 100 MU on [0, 10], y in [-10, 10]: interior 10 x 10 pixels of 2 mm,
    # sigma = 50; 10 x-pairs + 9 + 9 diagonal pairs differ by 100 = 2 sigma -> each adds min(2, 2)
    bnd = np.array([-10.0, 10.0])
    cps = [
        ControlPoint(0, 0.0, 0.0, 0.0, OPEN, OPEN, np.array([-10.0]), np.array([10.0])),
        ControlPoint(1, 0.5, 0.0, 0.0, OPEN, OPEN, np.array([-10.0]), np.array([10.0])),
        ControlPoint(2, 0.5, 0.0, 0.0, OPEN, OPEN, np.array([-10.0]), np.array([0.0])),
        ControlPoint(3, 1.0, 0.0, 0.0, OPEN, OPEN, np.array([-10.0]), np.array([0.0])),
    ]
    beam = Beam(1, "mi", 200.0, bnd, cps)
    assert modulation_index(beam) == pytest.approx(28 * 2 / 100)
    # an open rectangle not aligned with the pixels is not modulated
    assert modulation_index(_sns_beam([(-13.3, 21.7, 50.0)], jaw_y=(-7.1, 33.0))) == 0.0


# ---------------------------------------------------------------------------------------
# real RT Plans from the pymedphys wheel
# ---------------------------------------------------------------------------------------
PYMEDPHYS = Path(pymedphys.__file__).parent
VMAT = PYMEDPHYS / "_experimental" / "serviceplans" / "templates" / "vmat_example.dcm"
SQUARES = PYMEDPHYS / "tests" / "dicom" / "data" / "rtplan" / "06MV_plan.dcm"
FFF = PYMEDPHYS / "_experimental" / "serviceplans" / "templates" / "FFF_example.dcm"
needs_plans = pytest.mark.skipif(
    not (VMAT.is_file() and SQUARES.is_file() and FFF.is_file()), reason="pymedphys example RT Plans not installed"
)


def _load(path):
    ds = pydicom.dcmread(path, force=True)
    return ds, read_plan(ds)


def _metersets(ds):
    return sum(float(rb.BeamMeterset) for fg in ds.FractionGroupSequence for rb in fg.ReferencedBeamSequence)


@needs_plans
def test_vmat_example():
    ds, plan = _load(VMAT)
    rows, p = complexity_tables(plan)
    assert p["total_mu"] == pytest.approx(_metersets(ds)) and p["total_mu"] == pytest.approx(157.238693 + 158.782211)
    assert [r["n_control_points"] for r in rows] == [32, 31]
    assert [r["n_segments"] for r in rows] == [31, 30]
    for r in rows:
        assert all(np.isfinite(v) for v in r.values()), r
        assert 0.0 < r["mcs"] < 1.0 and 0.0 < r["lsv"] < 1.0 and 0.0 < r["aav"] < 1.0
        assert r["leaf_travel_mm"] > 0 and r["n_moving_leaves"] > 0
        assert r["arc_length_deg"] == pytest.approx(60.0)
        assert 0.0 < r["plan_modulation"] < 1.0
        assert r["mean_area_mm2"] <= r["field_area_union_mm2"]
    assert all(np.isfinite(v) for v in p.values())
    # published ranges (VMAT): MCS ~0.1-0.6, EM 0.01-0.5 /mm, PI > 1, SAS ordered
    assert 0.1 <= p["mcs"] <= 0.6
    assert 0.01 <= p["edge_metric"] <= 0.5
    assert p["aperture_irregularity"] > 1.0
    assert 0.0 <= p["sas_5"] <= p["sas_10"] <= p["sas_20"] <= 1.0
    assert p["mu_per_gy"] == pytest.approx(p["total_mu"] / (1.0 / 2))  # Rx 1 Gy over 2 fractions
    assert p["n_beams"] == 2 and p["n_control_points"] == 63
    assert p["leaf_travel_mm"] == pytest.approx(rows[0]["leaf_travel_mm"] + rows[1]["leaf_travel_mm"])
    assert p["mcs"] == pytest.approx((rows[0]["mcs"] * 157.238693 + rows[1]["mcs"] * 158.782211) / p["total_mu"])
    assert 0.0 < p["modulation_index"] < 8.0
    # the fluence integral is the MU-weighted aperture area
    for beam, r in zip(plan.beams, rows, strict=True):
        f = beam_fluence(beam, spacing_mm=2.0, size=128)
        assert f.sum() * 4.0 == pytest.approx(r["mean_area_mm2"] * r["total_mu"], rel=1e-2)


@needs_plans
def test_static_square_fields():
    ds, plan = _load(SQUARES)
    rows, p = complexity_tables(plan)
    assert p["total_mu"] == pytest.approx(_metersets(ds))
    squares = [(b, r) for b, r in zip(plan.beams, rows, strict=True) if b.name != "40x40"]
    sides = [float(b.name.split("x")[0]) * 10.0 for b, _ in squares]  # "02x02" -> 20 mm
    assert sides == sorted(sides) and sides[0] == 20.0
    for side, (_, r) in zip(sides, squares, strict=True):
        assert r["mcs"] == pytest.approx(1.0, abs=1e-6)
        assert r["lsv"] == pytest.approx(1.0, abs=1e-6) and r["aav"] == pytest.approx(1.0, abs=1e-6)
        assert r["mean_area_mm2"] == pytest.approx(side**2, rel=1e-6)  # 5 mm leaves: no rounding here
        assert r["edge_metric"] == pytest.approx(4 / side)
        assert r["field_eq_square_mm"] == pytest.approx(side)
        assert r["plan_modulation"] == pytest.approx(0.0, abs=1e-9)
        assert r["leaf_travel_mm"] == 0.0 and r["modulation_index"] == 0.0
    for k in ("sas_5", "sas_10", "sas_20", "edge_metric", "aperture_irregularity"):
        vals = [r[k] for _, r in squares]
        assert all(v0 >= v1 - 1e-12 for v0, v1 in zip(vals[:-1], vals[1:], strict=True)), k
    for k in ("mean_area_mm2", "mean_leaf_gap_mm", "field_area_union_mm2"):
        vals = [r[k] for _, r in squares]
        assert all(v0 < v1 for v0, v1 in zip(vals[:-1], vals[1:], strict=True)), k
    # 40 x 40 on an Agility head: rounded corners, a nearly regular aperture
    big = rows[-1]
    assert 0.9 < big["mcs"] < 1.0 and big["aav"] == pytest.approx(1.0)
    assert p["min_area_mm2"] == pytest.approx(400.0) and p["n_segments"] == 10


@needs_plans
def test_fff_example_static_field():
    ds, plan = _load(FFF)
    (r,), _p = complexity_tables(plan)
    assert r["total_mu"] == pytest.approx(_metersets(ds))
    assert r["mcs"] == pytest.approx(1.0, abs=1e-6)
    assert r["mean_area_mm2"] == pytest.approx(20.0 * 24.0)  # MLC +-10 mm, Y jaws +-12 mm
    f = beam_fluence(plan.beams[0], spacing_mm=1.0, size=64)
    assert f.max() == pytest.approx(r["total_mu"]) and f.sum() == pytest.approx(r["total_mu"] * 480.0)


def test_aperture_coverage_is_fraction():
    beam = _sns_beam([(-7.3, 11.1, 5.0)], jaw_y=(-13.0, 9.0))
    (ap,) = beam.apertures()
    cov = aperture_coverage(ap, BND, 2.0, 32)
    assert cov.min() >= 0.0 and cov.max() == pytest.approx(1.0)
    assert cov.sum() * 4.0 == pytest.approx(18.4 * 22.0)
