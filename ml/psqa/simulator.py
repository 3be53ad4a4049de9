"""A physics-based digital twin of a clinic's IMRT patient-specific QA programme (numpy, scipy, pydicom).

No public PSQA data set exists, so the pipeline is fed by this simulator. It writes what a clinic
would export: per plan an RT Plan, the TPS's planned dose planes and the QA device's measured
planes (DICOM), plus the QA system's results table (CSV). Nothing in the inbox says *why* a plan
failed: the truth (fault kind, machine state) is only returned to the caller.

Plans (``draw_plan``)
    Step-and-shoot IMRT, 5-9 equispaced beams, on a 60-pair Millennium-like MLC
    (``ml.psqa.sequencing``). A plan has a treatment site (sets the prescription, target size and
    shape, beam count and the typical modulation), a target shape (ellipse, irregular = ellipse
    with low-order Fourier harmonics, horseshoe = annular sector wrapped around an organ at risk)
    of 30-150 mm, and per beam an intensity map on a bixel grid (2.5 or 5 mm along x x the leaf
    width): a smooth random pattern (base level + Gaussian blobs + low-pass noise, an optional
    "OAR" dip) over the beam's-eye-view projection of the target, quantised to ``K`` levels
    (``K`` random 3-20). The map is sequenced with the Bortfeld unidirectional sweep
    (``sweep_sequence``) and turned into a ``Beam`` (``beam_from_levels``). The MU per level is
    set so that the beam delivers its share of the dose per fraction to the target, so strongly
    modulated beams get many small segments and many MU (~50-400 MU per beam).

Planned dose
    Per-beam planes (128 x 128 at 2 mm by default, the QA "perpendicular field-by-field"
    geometry) from the TPS model ``DoseModel()``; the composite is their sum.

Delivered ("measured") dose (``machine_state``, ``delivered_beam``, ``plan_planes``)
    The same plan delivered on one of the clinic's three linacs (``LINACS``), each a ``DoseModel``
    that differs from the TPS by its commissioning residuals, in the state of the day:

    * leaves: systematic bank offsets (per linac + N(0, 0.1 mm) per day), per-leaf calibration
      offsets (N(0, 0.6 mm) per plan) and per-segment positioning jitter; only open pairs move and
      a pair whose leaves cross is closed, so the dose error of a leaf error is its share of the
      segment's width (narrow segments suffer most);
    * beam model: dosimetric leaf gap larger than the TPS's (+0.6-0.8 mm), transmission, primary
      kernel width (source size, +8-12 %) and head-scatter mismatch, which matter for narrow and
      small segments;
    * tongue-and-groove on the machine only (``tg_width_mm`` 0.25-0.35 mm): strips under
      adjacent-leaf steps of segments;
    * MU: output drift per plan (N(0, 0.5 %)), beam-to-beam jitter, and a per-segment MU error
      (step-and-shoot beam hold: a linac bias + N(0, 0.05 MU)) that matters for low-MU segments;
    * QA device: set-up shift (N(0, 0.5 mm) per plan + N(0, 0.2 mm) per beam), Gaussian detector
      response (``detector_sigma_mm``), detectors on a 4 or 6 mm lattice whose readings carry the
      array's fixed calibration pattern (0.5 %), noise (0.5-1 % of the local dose + 0.2 % of the
      maximum) and are interpolated back onto the grid (linear or cubic);
    * rare gross faults (~4 % of plans, ``SimConfig.p_*``): a leaf group that stops moving part-way
      through every beam (stuck leaf), a leaf-bank offset of 1.5-2.5 mm, or an output calibration
      error of 2.5-5 %.

    None of these is drawn from the plan's complexity: the errors of the day come from the rng
    alone (``machine_state`` only reads the plan's array sizes and, for a stuck leaf, which pairs
    it uses) and how much a plan suffers follows from its segments (width, area, MU, adjacent-leaf
    steps, dose curvature) through the dose model. With the defaults, 200 plans give a 2%/2mm
    composite GPR median of ~97 %, ~8 % of plans below 90 %, 3%/3mm above 95 % for ~97 % of plans,
    and a Spearman correlation of ~0.35 between the 2%/2mm GPR and the plan's MCS.

QA results
    Gamma pass rates (``ml.metrics.gamma``, torch; global, 10 % cutoff, reference = measured,
    evaluated = planned) of the composite and of every beam at 3%/3mm, 3%/2mm and 2%/2mm, computed
    on exactly the dose values the written files decode to (composites = exact sums of the stored
    beam planes), so ``ml.psqa.pack.compute_plan_qa`` reproduces them.

Files (``simulate``), one study per plan, patients with 1-2 plans (``<PlanLabel>`` ends in the
plan's number for the patient, e.g. ``HN_7F_2``)::

    out_dir/<Family>_<PatientID>/<PlanLabel>/RP_<PlanLabel>.dcm         RTPLAN
                                             RD_planned_beam<N>.dcm     RTDOSE, BEAM (+ beam ref)
                                             RD_planned_plan.dcm        RTDOSE, PLAN
                                             RD_measured_beam<N>.dcm    RTDOSE, RECORD (+ beam ref)
                                             RD_measured_plan.dcm       RTDOSE, RECORD (composite)
    out_dir/qa_results/qa_export_<batch>[_<start>].csv                   QA_CSV_COLUMNS

Every file carries planted PHI (``make_phi``) and deterministic UIDs (``StudyUids``) like the synthetic
CT studies; the pipeline de-identifies them. Output is a deterministic function of
``(seed, batch, plan index)``: the same call writes byte-identical files whatever the number of
workers, and a different ``batch`` gives new patients, new UIDs and a separate CSV.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter, map_coordinates

from ml.data.synthetic.headers import StudyHeader
from ml.data.synthetic.planted_phi import PlantedPHI, make_phi
from ml.data.synthetic.uids import StudyUids
from ml.psqa.dose_model import DoseModel, beam_dose
from ml.psqa.plan import Beam, ControlPoint, Plan
from ml.psqa.rt_writers import (
    DOSE_GRID_SCALING,
    quantise_dose,
    rt_dose_dataset,
    rt_plan_dataset,
    write_dataset,
    write_qa_csv,
)
from ml.psqa.sequencing import MLC_BOUNDARIES_MM, beam_from_levels, sweep_sequence

__all__ = [
    "LINACS",
    "NOISELESS",
    "QA_CRITERIA",
    "SITES",
    "Linac",
    "MachineState",
    "SimConfig",
    "Site",
    "csv_name",
    "delivered_beam",
    "draw_plan",
    "machine_state",
    "perfect_state",
    "plan_planes",
    "simulate",
    "simulate_plan",
]

#: criteria of the QA export, (dose %, DTA mm)
QA_CRITERIA: tuple[tuple[int, int], ...] = ((3, 3), (3, 2), (2, 2))
_TPS = DoseModel()


# ---------------------------------------------------------------------------------------------
# the clinic: treatment sites and linacs
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Site:
    code: str
    weight: float  # share of the clinic's IMRT plans
    prescriptions: tuple[tuple[float, int], ...]  # (total Gy, fractions)
    size_mm: tuple[float, float]  # target extent range (largest dimension)
    shapes: tuple[tuple[str, float], ...]  # (shape, probability)
    levels: tuple[int, int]  # K range
    beams: tuple[int, ...]  # beam counts
    modulation: tuple[float, float]  # amplitude range of the intensity pattern


SITES: tuple[Site, ...] = (
    Site(
        "HN",
        0.30,
        ((70.0, 35), (66.0, 33), (60.0, 30), (54.0, 30)),
        (60.0, 150.0),
        (("horseshoe", 0.45), ("irregular", 0.40), ("ellipse", 0.15)),
        (6, 20),
        (7, 9),
        (0.35, 0.8),
    ),
    Site(
        "PROSTATE",
        0.25,
        ((78.0, 39), (60.0, 20), (70.0, 28)),
        (40.0, 100.0),
        (("ellipse", 0.45), ("irregular", 0.45), ("horseshoe", 0.10)),
        (3, 12),
        (5, 7),
        (0.15, 0.5),
    ),
    Site(
        "BRAIN",
        0.15,
        ((60.0, 30), (54.0, 30), (40.05, 15)),
        (30.0, 90.0),
        (("ellipse", 0.5), ("irregular", 0.5)),
        (3, 14),
        (5, 7),
        (0.15, 0.6),
    ),
    Site(
        "LUNG",
        0.15,
        ((60.0, 30), (66.0, 33), (55.0, 20)),
        (35.0, 120.0),
        (("ellipse", 0.4), ("irregular", 0.6)),
        (3, 12),
        (5, 7),
        (0.15, 0.55),
    ),
    Site(
        "PELVIS",
        0.15,
        ((50.4, 28), (45.0, 25), (50.0, 25)),
        (80.0, 150.0),
        (("horseshoe", 0.4), ("irregular", 0.45), ("ellipse", 0.15)),
        (4, 16),
        (7, 9),
        (0.25, 0.7),
    ),
)


@dataclass(frozen=True)
class Linac:
    """One treatment machine: its residuals against the TPS beam model after commissioning."""

    name: str
    device: str  # the QA array used on this linac
    dlg_offset_mm: float  # true DLG - TPS DLG
    transmission_offset: float
    primary_sigma_factor: float  # true primary sigma / TPS sigma (source size)
    head_scatter_amplitude: float
    tg_width_mm: float
    bank_a_mm: float  # systematic leaf-bank calibration offsets (+x)
    bank_b_mm: float
    detector_sigma_mm: float
    segment_mu_offset: float  # MU over/under-shoot per step-and-shoot segment (beam-hold latency)
    detector_pitch_px: int  # detector spacing of the QA array in pixels of the dose grid
    detector_interp_order: int  # spline order the QA software interpolates the detector readings with


LINACS: tuple[Linac, ...] = (
    Linac("LINAC_A", "PSQA ArrayQA-2D SN10421", 0.60, 0.001, 1.08, 0.115, 0.30, 0.05, 0.10, 1.0, 0.01, 2, 1),
    Linac("LINAC_B", "PSQA ArrayQA-2D SN10577", 0.80, 0.002, 1.12, 0.120, 0.35, -0.10, 0.05, 1.2, 0.02, 2, 1),
    Linac("LINAC_C", "PSQA DiodeMatrix SN3090", 0.60, -0.001, 1.10, 0.110, 0.25, 0.00, -0.05, 1.2, -0.01, 3, 3),
)


@dataclass(frozen=True)
class SimConfig:
    """Every knob of the delivered-dose model (defaults tuned to a clinical-looking GPR spread)."""

    size: int = 128
    spacing_mm: float = 2.0
    # leaves
    bank_day_sd_mm: float = 0.1  # per plan (day) systematic bank offset, per bank
    leaf_sd_mm: float = 0.6  # per-leaf calibration offset (per plan)
    leaf_jitter_sd_mm: float = 0.2  # per segment and leaf
    # beam model
    dlg_day_sd_mm: float = 0.1
    transmission_day_sd: float = 0.0005
    sigma_day_sd: float = 0.03  # relative, primary sigma
    # MU
    output_sd: float = 0.005  # per plan (daily output)
    beam_output_sd: float = 0.002  # per beam
    segment_mu_sd: float = 0.05  # MU, per segment
    # QA device set-up (shift of the measured plane against the planned one)
    setup_sd_mm: float = 0.5  # per plan and axis
    beam_setup_sd_mm: float = 0.2  # per beam and axis
    # detector
    noise_rel: tuple[float, float] = (0.005, 0.01)  # range of the per-plan relative noise sd
    noise_background: float = 0.002  # sd as a fraction of the beam's maximum
    calibration_sd: float = 0.005  # relative sensitivity spread of the array's detectors (fixed per device)
    # gross faults: probability per plan of each kind
    p_stuck_leaf: float = 0.015
    p_bank_offset: float = 0.015
    p_mu_calibration: float = 0.01


# ---------------------------------------------------------------------------------------------
# random helpers
# ---------------------------------------------------------------------------------------------
def _tag(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


def _rng(seed: int, batch: int, index: int, role: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(batch), int(index), _tag(role)])


def _choice(rng: np.random.Generator, options: tuple[tuple[str, float], ...]) -> str:
    p = np.array([w for _, w in options], float)
    return options[int(rng.choice(len(options), p=p / p.sum()))][0]


# ---------------------------------------------------------------------------------------------
# plans
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Target:
    shape: str
    a: float  # lateral semi-axis (mm)
    c: float  # AP semi-axis
    b: float  # sup-inf semi-axis (BLD y)
    cx: float
    cy: float
    harmonics: tuple[tuple[float, float], ...]  # (amplitude, phase) for k = 2, 3, 4
    inner: float  # horseshoe: inner radius / outer radius
    gap_half_deg: float  # horseshoe: half opening angle
    gap_dir_deg: float


def _draw_target(rng: np.random.Generator, site: Site) -> _Target:
    shape = _choice(rng, site.shapes)
    big = float(rng.uniform(*site.size_mm)) / 2.0
    if rng.random() < 0.12:  # some small fields
        big = float(rng.uniform(15.0, 25.0))
    ratios = rng.uniform(0.55, 1.0, size=2)
    axes = np.array([big, big * ratios[0], big * ratios[1]])
    rng.shuffle(axes)
    harm = tuple((float(rng.uniform(0.0, 0.18)), float(rng.uniform(0, 2 * np.pi))) for _ in range(3))
    return _Target(
        shape=shape,
        a=float(axes[0]),
        c=float(axes[1]),
        b=float(axes[2]),
        cx=float(rng.normal(0, 5.0)),
        cy=float(rng.normal(0, 5.0)),
        harmonics=harm if shape == "irregular" else (),
        inner=float(rng.uniform(0.35, 0.6)),
        gap_half_deg=float(rng.uniform(35.0, 70.0)),
        gap_dir_deg=float(rng.choice([90.0, 270.0])),
    )


def _target_mask(t: _Target, gantry_deg: float, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Beam's-eye-view projection of the target at gantry ``gantry_deg`` (x lateral in BLD)."""
    th = np.deg2rad(gantry_deg)
    ax = float(np.hypot(t.a * np.cos(th), t.c * np.sin(th)))  # projected lateral semi-axis
    u, v = (x - t.cx) / ax, (y - t.cy) / t.b
    r = np.hypot(u, v)
    phi = np.arctan2(v, u)
    if t.shape == "ellipse":
        return r <= 1.0
    if t.shape == "irregular":
        rad = 1.0 + sum(a * np.cos((k + 2) * phi + p) for k, (a, p) in enumerate(t.harmonics))
        return r <= rad
    # horseshoe: annular sector open towards +-y (an organ at risk in the concavity)
    ang = np.rad2deg(np.arctan2(v, u)) - t.gap_dir_deg
    ang = (ang + 180.0) % 360.0 - 180.0
    return (r <= 1.0) & (r >= t.inner) & (np.abs(ang) > t.gap_half_deg)


def _bixel_grid(width_mm: float) -> np.ndarray:
    return np.arange(-110.0, 110.0 + 1e-9, width_mm)


def _intensity(
    rng: np.random.Generator,
    t: _Target,
    gantry: float,
    x_edges: np.ndarray,
    modulation: float,
    k_levels: int,
    texture: tuple[float, float] = (1.5, 0.5),
) -> np.ndarray:
    """Integer levels ``(n_pairs, J)`` of one beam (0 outside the target projection)."""
    bnd = MLC_BOUNDARIES_MM
    xc = (x_edges[:-1] + x_edges[1:]) / 2.0
    # coverage: sub-sample each bixel (4 x 4) and open it when >= 30 % is inside the target
    fy = (np.arange(4) + 0.5) / 4.0
    fx = (np.arange(4) + 0.5) / 4.0 - 0.5
    ys = bnd[:-1, None] + np.diff(bnd)[:, None] * fy[None, :]  # (P, 4)
    xs = xc[:, None] + (x_edges[1] - x_edges[0]) * fx[None, :]  # (J, 4)
    inside = _target_mask(t, gantry, xs[None, :, None, :], ys[:, None, :, None])  # (P, J, 4, 4)
    cover = inside.mean(axis=(2, 3)) >= 0.3
    if not cover.any():  # a tiny target: open the bixel nearest its centre
        p = int(np.clip(np.searchsorted(bnd, t.cy) - 1, 0, len(bnd) - 2))
        cover[p, int(np.argmin(np.abs(xc - t.cx)))] = True
    yc = (bnd[:-1] + bnd[1:]) / 2.0
    X, Y = np.meshgrid(xc, yc)
    field = np.ones_like(X)
    span = max(float(np.ptp(X[cover])) if cover.sum() > 1 else 10.0, 10.0)
    for _ in range(int(rng.integers(2, 7))):  # Gaussian blobs, positive and negative
        i = int(rng.integers(0, cover.sum()))
        bx, by = X[cover][i], Y[cover][i]
        s = float(rng.uniform(0.12, 0.45)) * span
        amp = float(rng.uniform(-0.7, 0.9)) * modulation
        field += amp * np.exp(-((X - bx) ** 2 + (Y - by) ** 2) / (2.0 * s * s))
    # low-pass noise: ``texture`` = (correlation length in mm, amplitude relative to ``modulation``)
    sig = (texture[0] / float(x_edges[1] - x_edges[0]), texture[0] / 5.0)
    noise = gaussian_filter(rng.standard_normal(X.shape), sigma=(sig[1], sig[0]), mode="constant")
    sd = float(noise[cover].std()) or 1.0
    field += modulation * texture[1] * noise / sd
    if t.shape == "horseshoe" and rng.random() < 0.7:  # spare the organ at risk in the concavity
        d = np.hypot((X - t.cx) / max(t.a, 1.0), (Y - t.cy) / t.b)
        field -= modulation * 0.6 * np.exp(-((d / max(t.inner, 0.2)) ** 2))
    field = np.clip(field, 0.08, None)
    field = field / float(field[cover].max())
    levels = np.where(cover, np.maximum(np.rint(field * k_levels), 1), 0)
    return levels.astype(np.int64)


def draw_plan(rng: np.random.Generator, label_prefix: str = "") -> tuple[Plan, dict]:
    """A random step-and-shoot IMRT plan and its generation parameters (module docstring)."""
    site = SITES[int(rng.choice(len(SITES), p=np.array([s.weight for s in SITES]) / sum(s.weight for s in SITES)))]
    rx, fx = site.prescriptions[int(rng.integers(0, len(site.prescriptions)))]
    n_beams = int(rng.choice(site.beams)) if rng.random() < 0.8 else int(rng.integers(5, 10))
    target = _draw_target(rng, site)
    k_levels = int(rng.integers(site.levels[0], site.levels[1] + 1))
    k_levels = int(np.clip(k_levels + rng.integers(-2, 3), 3, 20))
    modulation = float(rng.uniform(*site.modulation))
    bixel = 2.5 if rng.random() < 0.3 else 5.0
    texture = (float(rng.uniform(3.0, 10.0)), float(rng.uniform(0.2, 0.8)))
    x_edges = _bixel_grid(bixel)
    start = float(rng.choice([0.0, 180.0 / n_beams])) if n_beams % 2 else 0.0
    gantries = [round((start + 360.0 * i / n_beams) % 360.0, 1) for i in range(n_beams)]
    dpf = rx / fx
    # MU per level: the beam's share of the dose per fraction at the map's mean level (6 MV, gy_per_mu at
    # the QA depth), corrected for the target depth in the patient and the planner's normalisation; so
    # the more levels a beam's sweep needs (modulation), the more MU it gets.
    norm = float(rng.uniform(0.9, 1.15))
    depth = float(rng.uniform(1.1, 1.5))  # target depth / attenuation in the patient vs the QA depth
    beams: list[Beam] = []
    for i, g in enumerate(gantries):
        lv = _intensity(rng, target, g, x_edges, modulation, k_levels, texture)
        segs = sweep_sequence(lv, x_edges)
        mean_level = float(lv[lv > 0].mean())
        mu_per_level = norm * dpf / n_beams / (_TPS.gy_per_mu * 0.93) / mean_level * depth
        beams.append(
            beam_from_levels(
                segs,
                number=i + 1,
                name=f"G{round(g):03d}",
                mu_per_level=mu_per_level,
                gantry_angle=g,
                treatment_machine="",
            )
        )
    label = f"{label_prefix}{site.code[:4]}_{n_beams}F"
    plan = Plan(
        label=label[:16],
        beams=beams,
        prescription_gy=rx,
        fractions=fx,
        meta={
            "site": site.code,
            "shape": target.shape,
            "levels": k_levels,
            "bixel_mm": bixel,
            "modulation": modulation,
        },
    )
    return plan, {
        "site": site.code,
        "shape": target.shape,
        "target_mm": round(2 * max(target.a, target.b, target.c), 1),
        "k_levels": k_levels,
        "bixel_mm": bixel,
        "modulation": round(modulation, 3),
        "texture_mm": round(texture[0], 2),
        "texture_amp": round(texture[1], 3),
        "prescription_gy": rx,
        "fractions": fx,
    }


# ---------------------------------------------------------------------------------------------
# the machine
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MachineState:
    """How one plan is delivered and measured (the hidden truth of one QA session)."""

    linac: Linac
    model: DoseModel  # the machine's true beam model incl. the detector response
    bank_a_mm: float
    bank_b_mm: float
    leaf_a_mm: np.ndarray  # (n_pairs,) per-leaf offsets
    leaf_b_mm: np.ndarray
    output: float  # relative output error (0.01 = +1 %)
    beam_output: np.ndarray  # per beam
    noise_rel: float
    setup_mm: np.ndarray  # (n_beams, 2): (x, y) shift of each beam's measured plane
    fault: str  # "", "stuck_leaf", "bank_offset", "mu_calibration"
    fault_detail: str
    stuck_pairs: tuple[int, ...] = ()
    stuck_bank: str = ""
    stuck_segment_fraction: float = 0.0


def machine_state(
    rng: np.random.Generator, plan: Plan, cfg: SimConfig = SimConfig(), linac: Linac | None = None
) -> MachineState:
    """The day's machine state for ``plan`` (independent of the plan's complexity)."""
    lin = linac if linac is not None else LINACS[int(rng.integers(0, len(LINACS)))]
    n_pairs = plan.beams[0].n_pairs
    model = replace(
        _TPS,
        dlg_mm=_TPS.dlg_mm + lin.dlg_offset_mm + float(rng.normal(0, cfg.dlg_day_sd_mm)),
        transmission=max(
            0.0, _TPS.transmission + lin.transmission_offset + float(rng.normal(0, cfg.transmission_day_sd))
        ),
        primary_sigma_mm=_TPS.primary_sigma_mm
        * lin.primary_sigma_factor
        * (1.0 + float(rng.normal(0, cfg.sigma_day_sd))),
        head_scatter_amplitude=lin.head_scatter_amplitude,
        tg_width_mm=lin.tg_width_mm * float(rng.uniform(0.8, 1.2)),
        detector_sigma_mm=lin.detector_sigma_mm,
    )
    bank_a = lin.bank_a_mm + float(rng.normal(0, cfg.bank_day_sd_mm))
    bank_b = lin.bank_b_mm + float(rng.normal(0, cfg.bank_day_sd_mm))
    leaf_a = rng.normal(0, cfg.leaf_sd_mm, n_pairs)
    leaf_b = rng.normal(0, cfg.leaf_sd_mm, n_pairs)
    output = float(rng.normal(0, cfg.output_sd))
    beam_output = rng.normal(0, cfg.beam_output_sd, len(plan.beams))
    setup = rng.normal(0, cfg.setup_sd_mm, 2)[None, :] + rng.normal(0, cfg.beam_setup_sd_mm, (len(plan.beams), 2))
    noise_rel = float(rng.uniform(*cfg.noise_rel))
    u = float(rng.random())
    fault, detail, stuck, bank, frac = "", "", (), "", 0.0
    if u < cfg.p_stuck_leaf:
        fault = "stuck_leaf"
        # a leaf group that stops moving part-way through every beam (pairs the plan uses)
        used = np.nonzero(np.any([ap.mlc_b - ap.mlc_a > 1e-6 for b in plan.beams for ap in b.apertures()], axis=0))[0]
        width = int(rng.integers(1, 4))
        p0 = int(rng.choice(used)) if used.size else n_pairs // 2
        stuck = tuple(int(p) for p in range(p0, min(n_pairs, p0 + width)))
        bank = "A" if rng.random() < 0.5 else "B"
        frac = float(rng.uniform(0.2, 0.6))
        detail = f"bank {bank} pairs {stuck[0] + 1}-{stuck[-1] + 1} stop after {frac:.0%} of the segments"
    elif u < cfg.p_stuck_leaf + cfg.p_bank_offset:
        fault = "bank_offset"
        off = float(rng.uniform(1.5, 2.5)) * (1 if rng.random() < 0.5 else -1)
        if rng.random() < 0.5:
            bank_a += off
            detail = f"bank A {off:+.2f} mm"
        else:
            bank_b += off
            detail = f"bank B {off:+.2f} mm"
    elif u < cfg.p_stuck_leaf + cfg.p_bank_offset + cfg.p_mu_calibration:
        fault = "mu_calibration"
        off = float(rng.uniform(0.025, 0.05)) * (1 if rng.random() < 0.5 else -1)
        output += off
        detail = f"output {off:+.1%}"
    return MachineState(
        linac=lin,
        model=model,
        bank_a_mm=bank_a,
        bank_b_mm=bank_b,
        leaf_a_mm=leaf_a,
        leaf_b_mm=leaf_b,
        output=output,
        beam_output=beam_output,
        noise_rel=noise_rel,
        setup_mm=setup,
        fault=fault,
        fault_detail=detail,
        stuck_pairs=stuck,
        stuck_bank=bank,
        stuck_segment_fraction=frac,
    )


@dataclass
class _Seg:
    mu: float
    a: np.ndarray
    b: np.ndarray
    jaw_x: tuple[float, float]
    jaw_y: tuple[float, float]


def _segments(beam: Beam) -> list[_Seg]:
    return [_Seg(ap.mu, ap.mlc_a, ap.mlc_b, ap.jaw_x, ap.jaw_y) for ap in beam.apertures()]


def delivered_beam(
    beam: Beam, state: MachineState, rng: np.random.Generator, beam_index: int, cfg: SimConfig = SimConfig()
) -> Beam:
    """The beam as the machine delivers it: perturbed leaves and segment MU (module docstring)."""
    segs = _segments(beam)
    n_seg = len(segs)
    stop = int(np.floor(state.stuck_segment_fraction * n_seg)) if state.fault == "stuck_leaf" else n_seg
    stuck = np.array(state.stuck_pairs, int)
    scale = (1.0 + state.output) * (1.0 + float(state.beam_output[beam_index]))
    cps: list[ControlPoint] = []
    mus = []
    dx, dy = (float(v) for v in state.setup_mm[beam_index])
    gantry = beam.control_points[0].gantry_angle
    for k, s in enumerate(segs):
        is_open = s.b - s.a > 1e-6
        jit_a = rng.normal(0, cfg.leaf_jitter_sd_mm, s.a.size)
        jit_b = rng.normal(0, cfg.leaf_jitter_sd_mm, s.b.size)
        a = s.a + np.where(is_open, state.bank_a_mm + state.leaf_a_mm + jit_a, 0.0)
        b = s.b + np.where(is_open, state.bank_b_mm + state.leaf_b_mm + jit_b, 0.0)
        if stuck.size and k >= stop:
            ref = segs[max(stop - 1, 0)]
            if state.stuck_bank == "A":  # the leaf stays where it was; the other one moves on
                a[stuck] = ref.a[stuck]
                b[stuck] = np.where(s.b[stuck] - s.a[stuck] > 1e-6, b[stuck], s.b[stuck])
            else:
                b[stuck] = ref.b[stuck]
                a[stuck] = np.where(s.b[stuck] - s.a[stuck] > 1e-6, a[stuck], s.a[stuck])
        crossed = b < a
        mid = (a + b) / 2.0
        a, b = np.where(crossed, mid, a), np.where(crossed, mid, b)
        mu = max(0.0, s.mu * scale + state.linac.segment_mu_offset + float(rng.normal(0, cfg.segment_mu_sd)))
        mus.append(mu)
        # the QA device's set-up error shifts the whole measured field (leaves, jaws, leaf rows)
        jx = (s.jaw_x[0] + dx, s.jaw_x[1] + dx)
        jy = (s.jaw_y[0] + dy, s.jaw_y[1] + dy)
        for _ in range(2):
            cps.append(ControlPoint(len(cps), 0.0, gantry, 0.0, jx, jy, a + dx, b + dx))
    total = float(sum(mus)) or 1.0
    done = 0.0
    for k, mu in enumerate(mus):
        cps[2 * k].cumulative_meterset_weight = done / total
        done += mu
        cps[2 * k + 1].cumulative_meterset_weight = done / total
    return Beam(
        number=beam.number,
        name=beam.name,
        meterset_mu=total,
        leaf_boundaries=np.asarray(beam.leaf_boundaries, float) + dy,
        control_points=cps,
        energy_mv=beam.energy_mv,
        delivery=beam.delivery,
        treatment_machine=beam.treatment_machine,
    )


def _measure(dose: np.ndarray, state: MachineState, rng: np.random.Generator, cfg: SimConfig) -> np.ndarray:
    """What the QA array reports for a (detector-broadened) delivered plane: readings at its
    detectors (every ``detector_pitch_px`` pixels, with noise) interpolated back onto the grid."""
    k = max(1, int(state.linac.detector_pitch_px))
    n = dose.shape[0]
    idx = np.arange(k // 2, n, k)
    det = dose[np.ix_(idx, idx)]
    peak = float(dose.max()) or 1.0
    # the array's relative detector sensitivities: a fixed pattern of the device (its calibration)
    cal = np.random.default_rng(_tag(f"array-calibration/{state.linac.device}/{n}/{k}"))
    det = det * (1.0 + cfg.calibration_sd * cal.standard_normal(det.shape))
    det = det * (1.0 + state.noise_rel * rng.standard_normal(det.shape))
    det = det + cfg.noise_background * peak * rng.standard_normal(det.shape)
    if k > 1:
        pos = (np.arange(n) - k // 2) / k
        rr, cc = np.meshgrid(pos, pos, indexing="ij")
        det = map_coordinates(det, [rr, cc], order=int(state.linac.detector_interp_order), mode="nearest")
    return np.clip(det, 0.0, None)


# ---------------------------------------------------------------------------------------------
# one plan end to end
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Task:
    out_dir: str
    seed: int
    batch: int
    index: int  # plan index within the batch
    patient: int  # patient index within the batch
    plan_of_patient: int  # 0 or 1
    cfg: SimConfig
    write: bool = True


def _phi(seed: int, batch: int, patient: int) -> PlantedPHI:
    phi = make_phi(_tag(f"qa-sim/{seed}/{batch}/{patient}"))
    # unique by construction within (seed, batch): make_phi's 6 random digits would collide
    pid = f"PHI-ID-{seed % 1000:03d}{batch % 100:02d}{patient:05d}"
    return replace(phi, patient_id=pid, study_description=f"IMRT QA {phi.study_description.split()[-1]}")


def _gpr(measured: np.ndarray, planned: np.ndarray, spacing: float) -> dict[str, float]:
    from ml.metrics.gamma import gamma_pass_rates

    return gamma_pass_rates(
        measured.astype(np.float32),
        planned.astype(np.float32),
        spacing,
        criteria=QA_CRITERIA,
        lower_cutoff_percent=10.0,
    )


def _criterion(dp: int, dta: int) -> str:
    return f"{dp:g}%/{dta:g}mm"


def perfect_state(plan: Plan) -> MachineState:
    """A machine identical to the TPS model, measured by an ideal detector (no error of any kind)."""
    ideal = Linac(
        "IDEAL", "PSQA ideal detector SN0", 0.0, 0.0, 1.0, _TPS.head_scatter_amplitude, 0.0, 0.0, 0.0, 0.0, 0.0, 1, 1
    )
    n_beams, n_pairs = len(plan.beams), plan.beams[0].n_pairs
    return MachineState(
        linac=ideal,
        model=_TPS,
        bank_a_mm=0.0,
        bank_b_mm=0.0,
        leaf_a_mm=np.zeros(n_pairs),
        leaf_b_mm=np.zeros(n_pairs),
        output=0.0,
        beam_output=np.zeros(n_beams),
        noise_rel=0.0,
        setup_mm=np.zeros((n_beams, 2)),
        fault="",
        fault_detail="",
    )


#: a ``SimConfig`` without any random delivery or detector error (for ``perfect_state`` checks)
NOISELESS = SimConfig(leaf_jitter_sd_mm=0.0, segment_mu_sd=0.0, noise_background=0.0, calibration_sd=0.0)


def plan_planes(
    plan: Plan, state: MachineState, rng: np.random.Generator, cfg: SimConfig = SimConfig()
) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """``({beam: planned plane}, {beam: measured plane})`` in Gy (unquantised): the TPS model's
    planes and what the QA device reports for the delivery of ``state``."""
    planned, measured = {}, {}
    for i, beam in enumerate(plan.beams):
        planned[beam.number] = beam_dose(beam, _TPS, cfg.size, cfg.spacing_mm)
        delivered = delivered_beam(beam, state, rng, i, cfg)
        measured[beam.number] = _measure(beam_dose(delivered, state.model, cfg.size, cfg.spacing_mm), state, rng, cfg)
    return planned, measured


def _gy(stored: np.ndarray) -> np.ndarray:
    """The float32 Gy values ``ml.psqa.pack`` decodes a stored plane to."""
    return (stored.astype(np.float64) * DOSE_GRID_SCALING).astype(np.float32)


def _write_plan_files(
    plan_dir: Path,
    plan: Plan,
    header: StudyHeader,
    uid,
    key: tuple,
    planned_st: dict,
    measured_st: dict,
    planned_comp: np.ndarray,
    measured_comp: np.ndarray,
    *,
    plan_date,
    plan_time,
    qa_date,
    qa_time,
    device: str,
    spacing_mm: float,
) -> list[Path]:
    plan_uid = plan.sop_instance_uid
    # BeamDose: each beam's mean planned dose over the composite's high-dose region (the dose reference)
    pc = _gy(planned_comp)
    high = pc >= 0.9 * float(pc.max())
    beam_doses = {n: float(_gy(st)[high].mean()) for n, st in planned_st.items()}
    ds = rt_plan_dataset(
        plan,
        header,
        sop_uid=plan_uid,
        series_uid=uid("plan-series", *key),
        plan_date=plan_date,
        plan_time=plan_time,
        dose_reference_uid=uid("dose-reference", *key),
        beam_doses_gy=beam_doses,
    )
    written = [write_dataset(ds, plan_dir / f"RP_{plan.label}.dcm")]
    items = [(f"RD_planned_beam{n}.dcm", st, n, "BEAM", False) for n, st in planned_st.items()]
    items.append(("RD_planned_plan.dcm", planned_comp, None, "PLAN", False))
    items += [(f"RD_measured_beam{n}.dcm", st, n, "RECORD", True) for n, st in measured_st.items()]
    items.append(("RD_measured_plan.dcm", measured_comp, None, "RECORD", True))
    for k, (name, st, beam_no, summation, measured) in enumerate(items):
        role = "measured" if measured else "planned"
        rd = rt_dose_dataset(
            st,
            header,
            sop_uid=uid("dose", *key, name),
            series_uid=uid(role, *key),
            series_number=3 if measured else 2,
            instance_number=k + 1,
            plan_sop_uid=plan_uid,
            beam_number=beam_no,
            summation=summation,
            spacing_mm=spacing_mm,
            content_date=qa_date if measured else plan_date,
            content_time=qa_time if measured else plan_time,
            measured=measured,
            device=device if measured else "",
        )
        written.append(write_dataset(rd, plan_dir / name))
    keep = {p.name for p in written}
    for stale in [*plan_dir.glob("RP_*.dcm"), *plan_dir.glob("RD_*.dcm")]:  # left by an earlier run
        if stale.name not in keep:
            stale.unlink()
    return written


def simulate_plan(task: _Task) -> dict:
    """Generate, deliver, measure and (optionally) write one plan; returns its summary and CSV rows."""
    cfg = task.cfg
    seed, batch, j = task.seed, task.batch, task.index
    phi = _phi(seed, batch, task.patient)
    uid = StudyUids(_tag(f"qa-sim/{seed}/{batch}"), phi)
    key = (batch, j)
    sex = "F" if _rng(seed, batch, task.patient, "patient").random() < 0.4 else "M"
    plan, info = draw_plan(_rng(seed, batch, j, "plan"))
    state = machine_state(_rng(seed, batch, j, "machine"), plan, cfg)
    for b in plan.beams:
        b.treatment_machine = state.linac.name
    plan.label = f"{plan.label[:13]}_{task.plan_of_patient + 1}"
    plan.sop_instance_uid = uid("plan", *key)

    drng = _rng(seed, batch, j, "dates")
    plan_date = _dt.date(2019, 1, 1) + _dt.timedelta(days=int(drng.integers(0, 1800)))
    plan_time = f"{int(drng.integers(8, 18)):02d}{int(drng.integers(0, 60)):02d}{int(drng.integers(0, 60)):02d}"
    qa_date = plan_date + _dt.timedelta(days=int(drng.integers(1, 6)))
    qa_time = f"{int(drng.integers(17, 22)):02d}{int(drng.integers(0, 60)):02d}{int(drng.integers(0, 60)):02d}"

    # planes as stored (uint32, DoseGridScaling 1e-6); composites are the exact sums of the beams
    planned, measured = plan_planes(plan, state, _rng(seed, batch, j, "delivery"), cfg)
    planned_st = {n: quantise_dose(d)[0] for n, d in planned.items()}
    measured_st = {n: quantise_dose(d)[0] for n, d in measured.items()}
    planned_comp = np.sum([v.astype(np.uint64) for v in planned_st.values()], axis=0).astype(np.uint32)
    measured_comp = np.sum([v.astype(np.uint64) for v in measured_st.values()], axis=0).astype(np.uint32)

    # gamma on exactly what the files decode to (reference = measured, evaluated = planned)
    comp_gpr = _gpr(_gy(measured_comp), _gy(planned_comp), cfg.spacing_mm)
    beam_gpr = {n: _gpr(_gy(measured_st[n]), _gy(planned_st[n]), cfg.spacing_mm) for n in planned_st}
    pc, mc = _gy(planned_comp).astype(np.float64), _gy(measured_comp).astype(np.float64)
    high = pc >= 0.5 * pc.max()
    dd_high = (mc[high] - pc[high]) / max(float(pc.max()), 1e-12) * 100.0

    patient_folder = f"{phi.family_name}_{phi.patient_id}"
    plan_dir = Path(task.out_dir) / patient_folder / plan.label
    if task.write:
        header = StudyHeader(
            phi=phi,
            study_uid=uid("study", *key),
            frame_of_reference_uid=uid("frame", *key),
            study_date=plan_date,
            study_time=plan_time,
            sex=sex,
        )
        _write_plan_files(
            plan_dir,
            plan,
            header,
            uid,
            key,
            planned_st,
            measured_st,
            planned_comp,
            measured_comp,
            plan_date=plan_date,
            plan_time=plan_time,
            qa_date=qa_date,
            qa_time=qa_time,
            device=state.linac.device,
            spacing_mm=cfg.spacing_mm,
        )

    measured_on = f"{qa_date.isoformat()} {qa_time[:2]}:{qa_time[2:4]}"
    rows = []
    for beam_no, g in [("ALL", comp_gpr), *[(str(n), beam_gpr[n]) for n in sorted(beam_gpr)]]:
        for dp, dta in QA_CRITERIA:
            c = _criterion(dp, dta)
            rows.append(
                {
                    "PatientID": phi.patient_id,
                    "PatientName": phi.patient_name,
                    "PlanLabel": plan.label,
                    "PlanSOPInstanceUID": plan.sop_instance_uid,
                    "BeamNumber": beam_no,
                    "Criterion": c,
                    "GPR": f"{g[c]:.1f}",
                    "Device": state.linac.device,
                    "MeasuredOn": measured_on,
                }
            )
    summary = {
        "batch": batch,
        "index": j,
        "patient_id": phi.patient_id,
        "patient_folder": patient_folder,
        "plan_folder": f"{patient_folder}/{plan.label}",
        "plan_uid": plan.sop_instance_uid,
        "label": plan.label,
        **info,
        "n_beams": len(plan.beams),
        "total_mu": round(plan.total_mu, 2),
        "n_segments": int(sum(len(b.apertures()) for b in plan.beams)),
        "linac": state.linac.name,
        "gpr_3_3": round(comp_gpr["3%/3mm"], 2),
        "gpr_3_2": round(comp_gpr["3%/2mm"], 2),
        "gpr_2_2": round(comp_gpr["2%/2mm"], 2),
        "min_beam_gpr_2_2": round(min(g["2%/2mm"] for g in beam_gpr.values()), 2),
        "mean_dd_pct": round(float(dd_high.mean()), 3) if dd_high.size else 0.0,
        "sd_dd_pct": round(float(dd_high.std()), 3) if dd_high.size else 0.0,
        "fault": state.fault or "none",
        "fault_detail": state.fault_detail,
        "output_error": round(state.output, 5),
        "bank_a_mm": round(state.bank_a_mm, 3),
        "bank_b_mm": round(state.bank_b_mm, 3),
        "dlg_mm": round(state.model.dlg_mm, 3),
        "tg_width_mm": round(state.model.tg_width_mm, 3),
    }
    return {"summary": summary, "rows": rows}


# ---------------------------------------------------------------------------------------------
# a batch
# ---------------------------------------------------------------------------------------------
def _plans_of_patients(seed: int, batch: int, start: int, n: int) -> list[tuple[int, int, int]]:
    """(plan index, patient index, k-th plan of the patient) for plans ``start .. start + n - 1``."""
    out, j, p = [], 0, 0
    while j < start + n:
        m = 2 if _rng(seed, batch, p, "n-plans").random() < 0.25 else 1
        for k in range(m):
            if start <= j < start + n:
                out.append((j, p, k))
            j += 1
        p += 1
    return out


def csv_name(batch: int, start_index: int = 0) -> str:
    """``qa_export_<batch>.csv`` (``qa_export_<batch>_<start>.csv`` for a chunk not starting at plan 0)."""
    name = f"qa_export_{int(batch):03d}"
    return f"{name}.csv" if not start_index else f"{name}_{int(start_index):06d}.csv"


def _init_worker() -> None:
    try:
        import torch

        torch.set_num_threads(1)
    except Exception:  # noqa: BLE001
        pass


def simulate(
    out_dir: str | os.PathLike,
    n_plans: int,
    *,
    seed: int = 0,
    batch: int = 0,
    start_index: int = 0,
    workers: int | None = None,
    cfg: SimConfig = SimConfig(),
    write: bool = True,
    progress=None,
) -> list[dict]:
    """Simulate plans ``start_index .. start_index + n_plans - 1`` of ``batch``; write their files and
    the QA CSV under ``out_dir`` (module docstring). Returns one summary dict per plan (with the
    hidden truth: fault kind, machine state); nothing of it is written to ``out_dir``.
    ``progress(done, total)`` is called after every plan (e.g. a progress bar)."""
    if n_plans < 0 or start_index < 0 or seed < 0 or batch < 0:
        raise ValueError("n_plans, start_index, seed and batch must be non-negative")
    out = Path(out_dir)
    tasks = [
        _Task(str(out), int(seed), int(batch), j, p, k, cfg, write)
        for j, p, k in _plans_of_patients(int(seed), int(batch), int(start_index), int(n_plans))
    ]
    workers = min(2, os.cpu_count() or 1) if workers is None else max(1, int(workers))
    results: list[dict] = []

    def _done(res: dict) -> None:
        results.append(res)
        if progress is not None:
            progress(len(results), len(tasks))

    if workers == 1 or len(tasks) <= 1:
        for t in tasks:
            _done(simulate_plan(t))
    else:
        with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker) as ex:
            for res in ex.map(simulate_plan, tasks, chunksize=max(1, min(8, len(tasks) // (4 * workers)))):
                _done(res)
    rows = [r for res in results for r in res["rows"]]
    if write:
        write_qa_csv(out / "qa_results" / csv_name(batch, start_index), rows)
    return [res["summary"] for res in results]
