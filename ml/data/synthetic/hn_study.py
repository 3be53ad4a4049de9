"""Synthetic head-and-neck radiotherapy studies written as real DICOM, with planted PHI.

``generate_hn_study`` writes one patient: a CT image series (one file per axial slice), an RT
Structure Set whose contours are exact polygons of analytic shapes, and an RT Dose grid that
looks like an IMRT head-and-neck plan. Every file carries the same, deliberately distinctive,
made-up patient-identifying values (:class:`PlantedPHI`) in the standard attributes and in a
private block, and the study folder and file names contain them too, so that a test can
grep everything the pipeline writes downstream and prove de-identification.

The returned :class:`StudyTruth` holds what was written plus the analytic ground truth:
the CT in HU, a boolean mask per ROI on the CT grid (point-in-polygon of the very polygons
that were written, evaluated at voxel centres, so a correct rasteriser reproduces them), and
the dose on its own grid.

Conventions: arrays are ``[z, y, x]`` with the slice index in order of increasing z; origins
and spacings are ``(x, y, z)`` in mm in DICOM LPS (x to the patient's left, y posterior,
z superior); the patient lies head first supine (HFS). Anatomy is defined in mm in a
canonical 240 mm x 240 mm x 192 mm box centred on 0 and is shrunk (never stretched) to fit
smaller fields of view.

Everything is deterministic: the same arguments give byte-identical files (fixed dates,
seeded RNGs, UIDs derived from the seed with ``pydicom.uid.generate_uid(entropy_srcs=...)``).

Only numpy and scipy are needed at import time; pydicom is imported inside the writers.
"""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
from scipy import ndimage

from ml.data.dicom.writers import (
    CT_IMAGE_STORAGE,
    DOSE_GRID_SCALING,
    RT_DOSE_STORAGE,
    RT_PLAN_STORAGE,
    RT_STRUCT_STORAGE,
    closed_planar_contour,
    file_meta,
    image_reference,
    quantise_dose,
    referenced_frame_of_reference,
    set_rt_dose_grid,
    structure_set_roi,
    write_dataset,
)

__all__ = [
    "ROI_NAMES",
    "PlantedPHI",
    "StudyTruth",
    "generate_hn_cohort",
    "generate_hn_study",
    "make_phi",
]

ROI_NAMES: tuple[str, ...] = (
    "BODY",
    "PTV70",
    "PTV56",
    "Brainstem",
    "SpinalCord",
    "Parotid_L",
    "Parotid_R",
    "Mandible",
)
_ROI_COLORS = {
    "BODY": (0, 255, 0),
    "PTV70": (255, 0, 0),
    "PTV56": (255, 128, 0),
    "Brainstem": (0, 128, 255),
    "SpinalCord": (255, 255, 0),
    "Parotid_L": (0, 255, 255),
    "Parotid_R": (255, 0, 255),
    "Mandible": (200, 200, 160),
}
_ROI_TYPES = {"BODY": "EXTERNAL", "PTV70": "PTV", "PTV56": "PTV"}

# SOP classes and the DoseGridScaling live in ml.data.dicom.writers (re-exported here)

PRIVATE_GROUP = 0x0009
PRIVATE_CREATOR = "PSQA_TEST"

_CANON_FOV_XY_MM = 240.0  # the canonical anatomy fits a 240 mm square field of view
_CANON_FOV_Z_MM = 192.0  # ... and 192 mm of scan length
_ELLIPSE_VERTICES = 96
_MIN_SEMI_AXIS_MM = 1.5  # cross-sections smaller than this are not contoured
_DOSE_GRID_SCALING = DOSE_GRID_SCALING  # Gy per stored unit (70 Gy -> 7e7 < 2**32)


# ----------------------------------------------------------------------------------------
# Planted PHI
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlantedPHI:
    """Made-up identifying values planted in every file of a synthetic study."""

    patient_name: str  # DICOM PN, "Family^Given^M"
    patient_id: str
    birth_date: str  # YYYYMMDD
    accession_number: str
    institution_name: str
    institution_address: str
    referring_physician: str  # PN
    operator_name: str  # PN
    study_description: str  # free text with a distinctive token
    series_description: str
    other_patient_id: str
    patient_address: str
    study_id: str

    @property
    def family_name(self) -> str:
        return self.patient_name.split("^")[0]

    def strings(self) -> list[str]:
        """Every planted value that must never appear downstream of de-identification.

        The full value of every field, plus the distinctive pieces a leak could show up as on
        its own: each person-name component of 5 or more characters (family and given names)
        and each word of 5 or more characters of the free-text fields (addresses,
        institution, descriptions), except generic vocabulary ("Cancer", "Centre",
        "planning", "Street", ...), so that a grep finds leaks, not ordinary words.
        """
        out: list[str] = []

        def add(s: str) -> None:
            s = s.strip()
            if s and s not in out:
                out.append(s)

        for f in fields(self):
            add(getattr(self, f.name))
        for pn in (self.patient_name, self.referring_physician, self.operator_name):
            for comp in pn.split("^"):
                if len(comp) >= 5:
                    add(comp)
        for text in (
            self.institution_name,
            self.institution_address,
            self.study_description,
            self.series_description,
            self.patient_address,
        ):
            for word in text.replace(",", " ").split():
                if len(word) >= 5 and word.lower() not in _GENERIC_WORDS:
                    add(word)
        return out


_SYLLABLES = (
    "quax", "zor", "vath", "brix", "oln", "thra", "mox", "kel", "drav", "fenn", "grox",
    "hulv", "jor", "lumb", "nix", "pell", "quor", "rask", "sev", "tov", "vorn", "wex",
    "yzz", "zeph", "krul", "plov", "snar", "trev", "ulm", "ezz", "ibb", "orth",
)
_GIVEN_SYLLABLES = (
    "or", "len", "na", "mir", "ael", "tha", "bry", "vi", "ssa", "que", "ron", "dal",
    "zia", "ker", "wen", "ulo", "fey", "ix", "lio", "pha",
)
_STREET_KINDS = ("Road", "Lane", "Avenue", "Street", "Close", "Way")


_GENERIC_WORDS = frozenset(
    """cancer centre center clinic hospital institute university medical radiotherapy
    oncology department planning imrt vmat street avenue close road lane drive place
    court square""".split()
)


def _word(rng: np.random.Generator, n: int = 3, min_len: int = 8) -> str:
    while True:
        w = "".join(_SYLLABLES[int(i)] for i in rng.integers(0, len(_SYLLABLES), n))
        if len(w) >= min_len:
            return w.capitalize()


def _given(rng: np.random.Generator) -> str:
    while True:
        w = "".join(_GIVEN_SYLLABLES[int(i)] for i in rng.integers(0, len(_GIVEN_SYLLABLES), 3))
        if len(w) >= 6:
            return w.capitalize()


def _digits(rng: np.random.Generator, n: int) -> str:
    return str(int(rng.integers(10 ** (n - 1), 10**n)))


def make_phi(seed: int) -> PlantedPHI:
    """Deterministic, distinctive made-up PHI for ``seed`` (different seeds, different values)."""
    rng = np.random.default_rng([int(seed), 0x5048])
    family = _word(rng, 3, 8)
    given = _given(rng)
    middle = chr(ord("A") + int(rng.integers(0, 26)))
    birth = _dt.date(1938, 1, 1) + _dt.timedelta(days=int(rng.integers(0, 365 * 37)))
    town = _word(rng, 2, 7)
    return PlantedPHI(
        patient_name=f"{family}^{given}^{middle}",
        patient_id=f"PHI-ID-{_digits(rng, 6)}",
        birth_date=birth.strftime("%Y%m%d"),
        accession_number=f"ACX{_digits(rng, 9)}",
        institution_name=f"{_word(rng, 3, 8)} Cancer Centre",
        institution_address=f"{_digits(rng, 4)} {_word(rng, 2, 7)} Road, {town} QX{_digits(rng, 4)}",
        referring_physician=f"{_word(rng, 3, 8)}^{_given(rng)}",
        operator_name=f"{_word(rng, 3, 8)}^{_given(rng)}",
        study_description=f"HN IMRT planning CT {_word(rng, 3, 8).upper()}{_digits(rng, 4)}",
        series_description=f"CT HN 3mm {_word(rng, 2, 7)}-{_digits(rng, 5)}",
        other_patient_id=f"OPID{_digits(rng, 8)}",
        patient_address=(
            f"{_digits(rng, 3)} {_word(rng, 2, 7)} "
            f"{_STREET_KINDS[int(rng.integers(0, len(_STREET_KINDS)))]}, {town}"
        ),
        study_id=f"SID{_digits(rng, 7)}",
    )


# ----------------------------------------------------------------------------------------
# Ground truth record
# ----------------------------------------------------------------------------------------
@dataclass
class StudyTruth:
    study_dir: Path
    phi: PlantedPHI
    study_instance_uid: str
    frame_of_reference_uid: str
    ct_series_uid: str
    ct_files: list[Path]  # in slice order (increasing z), matching hu[k]
    rtstruct_file: Path | None
    rtdose_file: Path | None
    roi_names: list[str]
    masks: dict[str, np.ndarray]  # bool [z, y, x] on the CT grid
    hu: np.ndarray  # int16 [z, y, x]
    dose_gy: np.ndarray | None  # float64 [z, y, x] on the dose grid
    dose_origin: tuple[float, float, float] | None
    dose_spacing: tuple[float, float, float] | None
    ct_origin: tuple[float, float, float]
    ct_spacing: tuple[float, float, float]
    ct_sop_uids: list[str] | None = None  # in slice order
    rtstruct_sop_uid: str | None = None
    rtdose_sop_uid: str | None = None
    prescription_gy: float = 70.0
    seed: int = 0


# ----------------------------------------------------------------------------------------
# Geometry helpers
# ----------------------------------------------------------------------------------------
def _fmt(v: float, decimals: int = 4) -> str:
    """A DICOM DS string (<= 16 chars) with at most ``decimals`` decimals; no '-0'."""
    s = f"{float(v):.{decimals}f}".rstrip("0").rstrip(".")
    if s in ("-0", ""):
        s = "0"
    return s


def _ellipse_poly(cx: float, cy: float, a: float, b: float, n: int = _ELLIPSE_VERTICES) -> np.ndarray:
    t = np.arange(n) * (2.0 * math.pi / n)
    return np.stack([cx + a * np.cos(t), cy + b * np.sin(t)], axis=1)


def _horseshoe_poly(
    cx: float, cy: float, a_out: float, b_out: float, a_in: float, b_in: float, ext: float
) -> np.ndarray:
    """Closed polygon of an anterior (-y) elliptic arch: outer arc, then inner arc back."""
    t_out = np.linspace(math.pi - ext, 2.0 * math.pi + ext, 72)
    t_in = np.linspace(2.0 * math.pi + ext, math.pi - ext, 56)
    outer = np.stack([cx + a_out * np.cos(t_out), cy + b_out * np.sin(t_out)], axis=1)
    inner = np.stack([cx + a_in * np.cos(t_in), cy + b_in * np.sin(t_in)], axis=1)
    return np.concatenate([outer, inner], axis=0)


def _round_poly(poly: np.ndarray) -> np.ndarray:
    """Round vertices to what the DS strings in ContourData will say (so masks match files)."""
    return np.array([[float(_fmt(x)), float(_fmt(y))] for x, y in poly], dtype=float)


def _polys_mask(polys: Sequence[np.ndarray], xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
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


def _ellipse_mask(X: np.ndarray, Y: np.ndarray, cx: float, cy: float, a: float, b: float) -> np.ndarray:
    if a <= 0 or b <= 0:
        return np.zeros(X.shape, dtype=bool)
    return ((X - cx) / a) ** 2 + ((Y - cy) / b) ** 2 <= 1.0


def _cap(z: float, lo: float, hi: float, cap_lo: float = 0.0, cap_hi: float = 0.0) -> float:
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


def _ellipsoid_section(z: float, zc: float, c: float) -> float:
    u = (z - zc) / c
    return math.sqrt(1.0 - u * u) if abs(u) < 1.0 else 0.0


def _lerp(z: float, z0: float, z1: float, v0: float, v1: float) -> float:
    u = min(1.0, max(0.0, (z - z0) / (z1 - z0)))
    u = 0.5 - 0.5 * math.cos(math.pi * u)  # smooth
    return v0 + (v1 - v0) * u


# ----------------------------------------------------------------------------------------
# Anatomy (canonical mm, then scaled to the field of view)
# ----------------------------------------------------------------------------------------
class _Anatomy:
    """A seeded head-and-neck phantom. ``section(z)`` gives ROI polygons, ``tissue(z)`` HU."""

    def __init__(self, seed: int, sxy: float, sz: float) -> None:
        rng = np.random.default_rng([int(seed), 0xA7A7])
        self.sxy, self.sz = sxy, sz
        self.size = float(rng.uniform(0.93, 1.07))  # patient build
        self.ap = float(rng.uniform(0.95, 1.05))  # relative AP depth
        self.dx = float(rng.uniform(-6.0, 6.0))  # set-up offset on the couch
        self.dy = float(rng.uniform(-5.0, 5.0))
        self.side = 1.0 if rng.random() < 0.5 else -1.0  # PTV70 laterality (+1: patient left)
        self.bilateral = bool(rng.random() < 0.6)
        self.ptv70_params = (
            self.side * float(rng.uniform(10.0, 20.0)),  # x
            float(rng.uniform(-20.0, -8.0)),  # y
            float(rng.uniform(-18.0, 4.0)),  # z
            float(rng.uniform(13.0, 22.0)),  # semi-axes a, b, c
            float(rng.uniform(11.0, 17.0)),
            float(rng.uniform(15.0, 25.0)),
        )
        self.node_x = float(rng.uniform(26.0, 32.0))
        self.node_y = float(rng.uniform(-8.0, 0.0))
        self.node_z = (float(rng.uniform(-80.0, -72.0)), float(rng.uniform(-6.0, 2.0)))
        self.node_ab = (float(rng.uniform(11.0, 14.0)), float(rng.uniform(14.0, 18.0)))
        self.parotid_scale = (float(rng.uniform(0.85, 1.15)), float(rng.uniform(0.85, 1.15)))
        self.parotid_z = float(rng.uniform(4.0, 12.0))
        self.mandible_z = float(rng.uniform(-24.0, -18.0))
        self.vertex_z = float(rng.uniform(84.0, 92.0))
        self.disc_phase = float(rng.uniform(0.0, 18.0))
        self.noise_sd = float(rng.uniform(10.0, 20.0))
        self.hu_jitter = rng.uniform(-6.0, 6.0, size=8)

    # -- coordinate maps: canonical mm -> world mm --------------------------------------
    def _x(self, x: float) -> float:
        return self.dx + self.sxy * self.size * x

    def _y(self, y: float) -> float:
        return self.dy + self.sxy * self.size * self.ap * y

    def _a(self, a: float) -> float:
        return self.sxy * self.size * a

    def _b(self, b: float) -> float:
        return self.sxy * self.size * self.ap * b

    def _zc(self, z_world: float) -> float:
        return z_world / self.sz

    # -- shapes at canonical z (return world (cx, cy, a, b) or None) ---------------------
    def body(self, zc: float) -> tuple[float, float, float, float] | None:
        top = self.vertex_z
        if zc >= top:
            return None
        if zc >= 28.0:
            f = _cap(zc, -1e9, top, 0.0, top - 28.0)
            a, b, cy = 74.0 * f, 92.0 * f, 0.0
        elif zc >= -20.0:
            a, b, cy = _lerp(zc, -20, 28, 66, 74), _lerp(zc, -20, 28, 80, 92), 0.0
        else:
            a, b = _lerp(zc, -96, -20, 56, 66), _lerp(zc, -96, -20, 62, 80)
            cy = _lerp(zc, -96, -20, 6, 0)
        if min(a, b) < 2.0:
            return None
        return self._x(0.0), self._y(cy), self._a(a), self._b(b)

    def fat_mm(self, zc: float) -> float:
        return 3.0 if zc >= 25.0 else 8.0

    def brainstem(self, zc: float):
        f = _cap(zc, 8.0, 48.0, 0.0, 10.0)
        if f <= 0:
            return None
        return self._x(0.0), self._y(28.0), self._a(13.0 * f), self._b(11.0 * f)

    def cord(self, zc: float):
        if not -1e9 <= zc < 8.0:
            return None
        return self._x(0.0), self._y(_lerp(zc, -20, 8, 36, 30)), self._a(5.5), self._b(5.0)

    def parotid(self, zc: float, side: float):
        k = self.parotid_scale[0 if side > 0 else 1]
        f = _ellipsoid_section(zc, self.parotid_z, 17.0 * k)
        if f <= 0:
            return None
        return self._x(side * 40.0), self._y(14.0), self._a(11.0 * k * f), self._b(16.0 * k * f)

    def mandible(self, zc: float):
        lo, hi = self.mandible_z, self.mandible_z + 22.0
        if not lo <= zc < hi:
            return None
        w = _lerp(zc, lo, hi, 0.94, 1.0)  # the arch widens superiorly a little
        return (
            self._x(0.0),
            self._y(-12.0),
            self._a(50.0 * w),
            self._b(55.0),
            self._a(40.0 * w),
            self._b(45.0),
        )

    def ptv70(self, zc: float):
        x, y, z, a, b, c = self.ptv70_params
        f = _ellipsoid_section(zc, z, c)
        if f <= 0:
            return None
        return self._x(x), self._y(y), self._a(a * f), self._b(b * f)

    def nodes(self, zc: float) -> list[tuple[float, float, float, float]]:
        lo, hi = self.node_z
        f = _ellipsoid_section(zc, 0.5 * (lo + hi), 0.5 * (hi - lo))
        if f <= 0:
            return []
        sides = (-1.0, 1.0) if self.bilateral else (self.side,)
        a, b = self.node_ab
        return [
            (self._x(s * self.node_x), self._y(self.node_y), self._a(a * f), self._b(b * f))
            for s in sides
        ]

    def airway(self, zc: float):
        f = _cap(zc, -1e9, 18.0, 0.0, 8.0)
        if f <= 0:
            return None
        cy = _lerp(zc, -45, 0, -28, -8)
        a, b = _lerp(zc, -45, 0, 9, 15), _lerp(zc, -45, 0, 7, 9)
        return self._x(0.0), self._y(cy), self._a(a * f), self._b(b * f)

    def vertebra(self, zc: float):
        """(vertebral body, posterior arch, canal) ellipses below the skull base."""
        if zc >= 5.0:
            return None
        return (
            (self._x(0.0), self._y(18.0), self._a(16.0), self._b(12.0)),
            (self._x(0.0), self._y(_lerp(zc, -20, 8, 38, 32)), self._a(15.0), self._b(13.0)),
            (self._x(0.0), self._y(_lerp(zc, -20, 8, 36, 30)), self._a(8.0), self._b(7.5)),
        )

    # -- ROI polygons on one slice ------------------------------------------------------
    def roi_polygons(self, z_world: float) -> dict[str, list[np.ndarray]]:
        zc = self._zc(z_world)
        out: dict[str, list[np.ndarray]] = {n: [] for n in ROI_NAMES}

        def ell(name: str, e) -> None:
            if e is not None and min(e[2], e[3]) >= _MIN_SEMI_AXIS_MM:
                out[name].append(_round_poly(_ellipse_poly(*e)))

        ell("BODY", self.body(zc))
        ell("PTV70", self.ptv70(zc))
        for e in self.nodes(zc):
            ell("PTV56", e)
        ell("Brainstem", self.brainstem(zc))
        ell("SpinalCord", self.cord(zc))
        ell("Parotid_L", self.parotid(zc, +1.0))
        ell("Parotid_R", self.parotid(zc, -1.0))
        m = self.mandible(zc)
        if m is not None:
            out["Mandible"].append(_round_poly(_horseshoe_poly(*m, ext=0.15)))
        return out

    # -- HU on one slice ----------------------------------------------------------------
    def paint_slice(
        self, z_world: float, X: np.ndarray, Y: np.ndarray, roi_masks: dict[str, np.ndarray]
    ) -> np.ndarray:
        zc = self._zc(z_world)
        j = self.hu_jitter
        hu = np.full(X.shape, -1000.0)
        body = self.body(zc)
        if body is None:
            return hu
        cx, cy, a, b = body
        hu[roi_masks["BODY"]] = -100.0 + j[0]  # subcutaneous fat
        fat = self.fat_mm(zc)
        inner = _ellipse_mask(X, Y, cx, cy, a - fat, b - fat) & roi_masks["BODY"]
        hu[inner] = 40.0 + j[1]  # muscle / soft tissue
        if zc >= 25.0:  # cranium: skull ring and brain
            skull = _ellipse_mask(X, Y, cx, cy, a - fat - 1.0, b - fat - 1.0) & inner
            brain = _ellipse_mask(X, Y, cx, cy, a - fat - 8.0, b - fat - 8.0) & inner
            hu[skull] = 1100.0 + 3 * j[2]
            hu[brain] = 30.0 + j[3] / 2
        hu[roi_masks["Parotid_L"] | roi_masks["Parotid_R"]] = 5.0 + j[4]
        hu[roi_masks["Brainstem"]] = 38.0
        v = self.vertebra(zc)
        if v is not None:
            vb, arch, canal = v
            disc = ((zc - self.disc_phase) % 18.0) < 4.0
            body_m = _ellipse_mask(X, Y, *vb)
            arch_m = _ellipse_mask(X, Y, *arch)
            canal_m = _ellipse_mask(X, Y, *canal)
            hu[arch_m] = 700.0 + 3 * j[5]
            hu[body_m] = 90.0 if disc else 700.0 + 3 * j[5]
            hu[canal_m] = 15.0
        hu[roi_masks["SpinalCord"]] = 35.0
        hu[roi_masks["Mandible"]] = 1000.0 + 3 * j[6]
        aw = self.airway(zc)
        if aw is not None:
            hu[_ellipse_mask(X, Y, *aw) & inner] = -1000.0
        return hu


# ----------------------------------------------------------------------------------------
# Dose
# ----------------------------------------------------------------------------------------
def _sigmoid_falloff(d_mm: np.ndarray, d50: float, width: float) -> np.ndarray:
    f = 1.0 / (1.0 + np.exp((d_mm - d50) / width))
    return f / (1.0 / (1.0 + math.exp(-d50 / width)))


def _compute_dose(
    body: np.ndarray,
    ptv70: np.ndarray,
    ptv56: np.ndarray,
    spacing_zyx: tuple[float, float, float],
    rx: float,
) -> np.ndarray:
    """An IMRT-like H&N dose on a grid: Rx to PTV70, 0.8 Rx to PTV56, a low-dose bath."""
    if not ptv70.any():
        raise ValueError("PTV70 does not intersect the dose grid; enlarge the field of view")
    d70 = ndimage.distance_transform_edt(~ptv70, sampling=spacing_zyx)
    depth70 = ndimage.distance_transform_edt(ptv70, sampling=spacing_zyx)
    elective = ptv56 | ptv70
    d56 = ndimage.distance_transform_edt(~elective, sampling=spacing_zyx) if elective.any() else d70
    high = rx * _sigmoid_falloff(d70, 7.5, 1.3)
    mid = 0.8 * rx * _sigmoid_falloff(d56, 7.5, 1.3)
    bath = rx * (0.04 + 0.32 * np.exp(-d56 / 22.0))
    dose = np.maximum(np.maximum(high, mid), bath)
    dose += rx * 0.08 * np.clip(depth70 / 10.0, 0.0, 1.0)  # central hot spot
    dose = np.where(body, dose, 0.0)
    sigma = [2.5 / s for s in spacing_zyx]
    dose = ndimage.gaussian_filter(dose, sigma=sigma, mode="constant")
    dose = np.where(body, dose, 0.0)
    # normalise so that the median dose in PTV70 is 1.02 Rx
    dose *= 1.02 * rx / float(np.median(dose[ptv70]))
    return dose


# ----------------------------------------------------------------------------------------
# DICOM writing
# ----------------------------------------------------------------------------------------
class _Uids:
    def __init__(self, seed: int, phi: PlantedPHI) -> None:
        self.base = [f"psqa-sample-data/{int(seed)}", phi.patient_id, phi.patient_name]

    def __call__(self, *role: object) -> str:
        from pydicom.uid import generate_uid

        return str(generate_uid(entropy_srcs=[*self.base, *(str(r) for r in role)]))


def _age(birth: str, on: _dt.date) -> str:
    b = _dt.datetime.strptime(birth, "%Y%m%d").date()
    years = on.year - b.year - ((on.month, on.day) < (b.month, b.day))
    return f"{max(0, min(999, years)):03d}Y"


def _base_dataset(
    phi: PlantedPHI,
    *,
    sop_class: str,
    sop_uid: str,
    modality: str,
    study_uid: str,
    series_uid: str,
    series_number: int,
    study_date: _dt.date,
    study_time: str,
    sex: str,
):
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.file_meta = file_meta(sop_class, sop_uid, "PSQA_SAMPLE_1")
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    d = study_date.strftime("%Y%m%d")
    ds.StudyDate = d
    ds.SeriesDate = d
    ds.ContentDate = d
    ds.StudyTime = study_time
    ds.SeriesTime = study_time
    ds.ContentTime = study_time
    ds.AccessionNumber = phi.accession_number
    ds.Modality = modality
    ds.Manufacturer = "PSQA Synthetic Imaging"
    ds.InstitutionName = phi.institution_name
    ds.InstitutionAddress = phi.institution_address
    ds.ReferringPhysicianName = phi.referring_physician
    ds.StudyDescription = phi.study_description
    ds.SeriesDescription = phi.series_description
    ds.OperatorsName = phi.operator_name
    ds.ManufacturerModelName = "HN-Phantom Generator"
    ds.SoftwareVersions = "psqa-sample-data 1"
    ds.PatientName = phi.patient_name
    ds.PatientID = phi.patient_id
    ds.PatientBirthDate = phi.birth_date
    ds.PatientSex = sex
    ds.OtherPatientIDs = phi.other_patient_id
    other = Dataset()
    other.PatientID = phi.other_patient_id
    other.TypeOfPatientID = "TEXT"
    ds.OtherPatientIDsSequence = [other]
    ds.PatientAge = _age(phi.birth_date, study_date)
    ds.PatientAddress = phi.patient_address
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = phi.study_id
    ds.SeriesNumber = series_number
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(0x01, "LO", phi.patient_name)
    block.add_new(0x02, "LO", phi.patient_id)
    return ds


def _clear_dir(d: Path, pattern: str) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for p in d.glob(pattern):
        if p.is_file():
            p.unlink()


# ----------------------------------------------------------------------------------------
# Public generators
# ----------------------------------------------------------------------------------------
def generate_hn_study(
    out_dir: str | Path,
    *,
    seed: int = 0,
    phi: PlantedPHI | None = None,
    matrix: int = 128,
    pixel_spacing_mm: float = 3.0,
    n_slices: int = 64,
    slice_thickness_mm: float = 3.0,
    with_rtstruct: bool = True,
    with_dose: bool = True,
    prescription_gy: float = 70.0,
    folder_name: str | None = None,
) -> StudyTruth:
    """Write one synthetic head-and-neck study (CT + RTSTRUCT + RTDOSE) and return its truth.

    The study goes to ``out_dir / (folder_name or f"{family}_{patient_id}")`` (the default
    folder name holds PHI, as hospital exports often do) with subfolders ``CT/``,
    ``RTSTRUCT/`` and ``RTDOSE/``; ``*.dcm`` files already in those subfolders are removed.
    """
    from pydicom.dataset import Dataset

    if matrix < 16 or n_slices < 4:
        raise ValueError("need matrix >= 16 and n_slices >= 4")
    if pixel_spacing_mm <= 0 or slice_thickness_mm <= 0 or prescription_gy <= 0:
        raise ValueError("spacings and prescription must be positive")
    seed = int(seed)
    phi = phi if phi is not None else make_phi(seed)
    study_dir = Path(out_dir) / (folder_name or f"{phi.family_name}_{phi.patient_id}")
    uid = _Uids(seed, phi)
    prng = np.random.default_rng([seed, 0xD1C0])
    study_date = _dt.date(2019, 1, 1) + _dt.timedelta(days=int(prng.integers(0, 1800)))
    hh, mm = int(prng.integers(7, 17)), int(prng.integers(0, 60))
    study_time = f"{hh:02d}{mm:02d}{int(prng.integers(0, 60)):02d}"
    sex = "F" if prng.random() < 0.35 else "M"

    # -- geometry -------------------------------------------------------------------------
    ps, st = float(pixel_spacing_mm), float(slice_thickness_mm)
    x0 = float(_fmt(-(matrix - 1) / 2.0 * ps))
    z0 = float(_fmt(-(n_slices - 1) / 2.0 * st))
    xs = x0 + ps * np.arange(matrix)
    ys = xs.copy()
    z_str = [_fmt(z0 + k * st) for k in range(n_slices)]
    zs = np.array([float(s) for s in z_str])
    sxy = min(1.0, matrix * ps / _CANON_FOV_XY_MM)
    sz = min(1.0, n_slices * st / _CANON_FOV_Z_MM)
    anat = _Anatomy(seed, sxy, sz)
    X, Y = np.meshgrid(xs, ys)  # [y, x]

    # -- ROIs, masks and HU ---------------------------------------------------------------
    roi_polys: dict[str, list[list[np.ndarray]]] = {n: [] for n in ROI_NAMES}
    masks = {n: np.zeros((n_slices, matrix, matrix), dtype=bool) for n in ROI_NAMES}
    hu = np.empty((n_slices, matrix, matrix), dtype=np.float64)
    for k, z in enumerate(zs):
        polys = anat.roi_polygons(float(z))
        slice_masks = {}
        for name in ROI_NAMES:
            roi_polys[name].append(polys[name])
            m = _polys_mask(polys[name], xs, ys) if polys[name] else np.zeros((matrix, matrix), bool)
            masks[name][k] = m
            slice_masks[name] = m
        hu[k] = anat.paint_slice(float(z), X, Y, slice_masks)
    # a touch of partial-volume blur, then seeded quantum noise
    hu = ndimage.gaussian_filter(hu, sigma=(0.4 / st, 0.8 / ps, 0.8 / ps), mode="nearest")
    nrng = np.random.default_rng([seed, 0x0015E])
    hu += nrng.normal(0.0, anat.noise_sd, size=hu.shape)
    stored = np.clip(np.rint(hu + 1024.0), 0, 4095).astype(np.int16)
    hu_out = stored - np.int16(1024)  # int16 HU, exactly what the files decode to

    # -- UIDs -----------------------------------------------------------------------------
    study_uid = uid("study")
    for_uid = uid("frame-of-reference")
    ct_series_uid = uid("series", "CT")
    ct_sop = [uid("CT", k) for k in range(n_slices)]
    common = dict(study_uid=study_uid, study_date=study_date, study_time=study_time, sex=sex)

    # -- CT -------------------------------------------------------------------------------
    ct_dir = study_dir / "CT"
    _clear_dir(ct_dir, "*.dcm")
    ct_files: list[Path] = []
    ps_s = _fmt(ps)
    for k in range(n_slices):
        inst = n_slices - k  # scanned head first: instance 1 is the most superior slice
        ds = _base_dataset(
            phi,
            sop_class=CT_IMAGE_STORAGE,
            sop_uid=ct_sop[k],
            modality="CT",
            series_uid=ct_series_uid,
            series_number=2,
            **common,
        )
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.AcquisitionDate = ds.StudyDate
        ds.AcquisitionTime = study_time
        ds.BodyPartExamined = "HEADNECK"
        ds.ScanOptions = "HELICAL MODE"
        ds.SliceThickness = _fmt(st)
        ds.KVP = "120"
        ds.DataCollectionDiameter = "500"
        ds.ReconstructionDiameter = _fmt(matrix * ps)
        ds.GantryDetectorTilt = "0"
        ds.TableHeight = "160"
        ds.RotationDirection = "CW"
        ds.XRayTubeCurrent = 300
        ds.ExposureTime = 1000
        ds.ConvolutionKernel = "STANDARD"
        ds.PatientPosition = "HFS"
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = inst
        ds.ImagePositionPatient = [_fmt(x0), _fmt(x0), z_str[k]]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.FrameOfReferenceUID = for_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = z_str[k]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = matrix
        ds.Columns = matrix
        ds.PixelSpacing = [ps_s, ps_s]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.PixelData = np.ascontiguousarray(stored[k]).astype("<i2").tobytes()
        ds["PixelData"].VR = "OW"
        path = ct_dir / f"CT.{phi.patient_id}.{inst:04d}.dcm"
        write_dataset(ds, path)
        ct_files.append(path)

    # -- RTSTRUCT -------------------------------------------------------------------------
    rs_file: Path | None = None
    rs_uid: str | None = None
    if with_rtstruct:
        rs_uid = uid("RTSTRUCT")
        ds = _base_dataset(
            phi,
            sop_class=RT_STRUCT_STORAGE,
            sop_uid=rs_uid,
            modality="RTSTRUCT",
            series_uid=uid("series", "RTSTRUCT"),
            series_number=3,
            **common,
        )
        ds.StructureSetLabel = "HN_PLAN"
        ds.StructureSetName = "HN_PLAN"
        ds.StructureSetDate = ds.StudyDate
        ds.StructureSetTime = study_time

        images = [image_reference(CT_IMAGE_STORAGE, ct_sop[k]) for k in range(n_slices)]
        ds.ReferencedFrameOfReferenceSequence = [
            referenced_frame_of_reference(for_uid, study_uid, ct_series_uid, images)]

        ssroi, roic, obs = [], [], []
        for number, name in enumerate(ROI_NAMES, start=1):
            contours = []
            for k in range(n_slices):
                for poly in roi_polys[name][k]:
                    data = "\\".join(f"{_fmt(x)}\\{_fmt(y)}\\{z_str[k]}" for x, y in poly)
                    contours.append(closed_planar_contour(
                        image_reference(CT_IMAGE_STORAGE, ct_sop[k]), len(contours) + 1, len(poly), data))
            items = structure_set_roi(number, name, for_uid, contours=contours, color=_ROI_COLORS[name],
                                      interpreted_type=_ROI_TYPES.get(name, "ORGAN"))
            for seq, it in zip((ssroi, roic, obs), items, strict=True):
                seq.append(it)
        ds.StructureSetROISequence = ssroi
        ds.ROIContourSequence = roic
        ds.RTROIObservationsSequence = obs
        ds.ApprovalStatus = "UNAPPROVED"
        rs_dir = study_dir / "RTSTRUCT"
        _clear_dir(rs_dir, "*.dcm")
        rs_file = rs_dir / f"RS.{phi.patient_id}.dcm"
        write_dataset(ds, rs_file)

    # -- RTDOSE ---------------------------------------------------------------------------
    rd_file: Path | None = None
    rd_uid: str | None = None
    dose_gy = dose_origin = dose_spacing = None
    if with_dose:
        body = masks["BODY"]
        if not body.any():
            raise ValueError("BODY is empty on this grid")
        inplane = body.any(axis=0)
        jj, ii = np.nonzero(inplane)
        step = 2
        margin = 2 * step
        i0 = max(0, int(ii.min()) - margin)
        j0 = max(0, int(jj.min()) - margin)
        ncol = (min(matrix - 1, int(ii.max()) + margin) - i0) // step + 1
        nrow = (min(matrix - 1, int(jj.max()) + margin) - j0) // step + 1
        # the dose is computed at CT resolution on the box the dose grid spans, then sampled
        # at every other CT voxel centre (the dose grid nodes), so it is exact on its grid
        box = (slice(None), slice(j0, j0 + step * (nrow - 1) + 1), slice(i0, i0 + step * (ncol - 1) + 1))
        fine = _compute_dose(
            body[box], masks["PTV70"][box], masks["PTV56"][box], (st, ps, ps), prescription_gy
        )
        dose = fine[:, ::step, ::step]
        dps = step * ps
        stored_d, dose_gy = quantise_dose(dose, _DOSE_GRID_SCALING)
        dose_origin = (float(xs[i0]), float(ys[j0]), float(zs[0]))
        dose_spacing = (dps, dps, st)

        rd_uid = uid("RTDOSE")
        plan_uid = uid("RTPLAN")
        ds = _base_dataset(
            phi,
            sop_class=RT_DOSE_STORAGE,
            sop_uid=rd_uid,
            modality="RTDOSE",
            series_uid=uid("series", "RTDOSE"),
            series_number=4,
            **common,
        )
        ds.InstanceNumber = 1
        set_rt_dose_grid(
            ds,
            stored_d,
            position=[_fmt(dose_origin[0]), _fmt(dose_origin[1]), z_str[0]],
            orientation=["1", "0", "0", "0", "1", "0"],
            pixel_spacing=[_fmt(dps), _fmt(dps)],
            frame_offsets=[_fmt(z - zs[0]) for z in zs],
            slice_thickness=_fmt(st),
            dose_grid_scaling="1e-06",
            frame_of_reference_uid=for_uid,
            summation_type="PLAN",
        )
        plan_ref = Dataset()
        plan_ref.ReferencedSOPClassUID = RT_PLAN_STORAGE
        plan_ref.ReferencedSOPInstanceUID = plan_uid
        ds.ReferencedRTPlanSequence = [plan_ref]
        if rs_uid is not None:
            ss_ref = Dataset()
            ss_ref.ReferencedSOPClassUID = RT_STRUCT_STORAGE
            ss_ref.ReferencedSOPInstanceUID = rs_uid
            ds.ReferencedStructureSetSequence = [ss_ref]
        rd_dir = study_dir / "RTDOSE"
        _clear_dir(rd_dir, "*.dcm")
        rd_file = rd_dir / f"RD.{phi.patient_id}.dcm"
        write_dataset(ds, rd_file)

    return StudyTruth(
        study_dir=study_dir,
        phi=phi,
        study_instance_uid=study_uid,
        frame_of_reference_uid=for_uid,
        ct_series_uid=ct_series_uid,
        ct_files=ct_files,
        rtstruct_file=rs_file,
        rtdose_file=rd_file,
        roi_names=list(ROI_NAMES),
        masks=masks,
        hu=hu_out,
        dose_gy=dose_gy,
        dose_origin=dose_origin,
        dose_spacing=dose_spacing,
        ct_origin=(x0, x0, float(zs[0])),
        ct_spacing=(ps, ps, st),
        ct_sop_uids=ct_sop,
        rtstruct_sop_uid=rs_uid,
        rtdose_sop_uid=rd_uid,
        prescription_gy=float(prescription_gy),
        seed=seed,
    )


def generate_hn_cohort(
    out_dir: str | Path, n_studies: int = 3, *, seed: int = 0, **kwargs
) -> list[StudyTruth]:
    """``n_studies`` independent patients with seeds ``seed + i`` (own PHI, own anatomy)."""
    for bad in ("phi", "folder_name"):
        if kwargs.get(bad) is not None:
            raise ValueError(f"{bad!r} is per study; call generate_hn_study for that")
    kwargs.pop("phi", None)
    kwargs.pop("folder_name", None)
    return [generate_hn_study(out_dir, seed=seed + i, **kwargs) for i in range(int(n_studies))]
