"""External-beam plan geometry: the one in-memory representation of an RT Plan.

The QA simulator builds ``Plan`` objects and writes them as RT Plan DICOM; the complexity
metrics, the fluence maps and the Dagster feature assets read RT Plan DICOM back into the same
objects with ``read_plan``. Conventions (IEC 61217 beam-limiting-device coordinates, in mm at
the isocentre plane, SAD 1000 mm):

* ``Beam.leaf_boundaries``: the ``LeafPositionBoundaries`` of the MLCX device (N+1 values along
  the leaf-motion-perpendicular axis y, ascending);
* per control point, ``mlc_a`` (bank 1, IEC X1 side, listed first in ``LeafJawPositions``) and
  ``mlc_b`` (bank 2): leaf pair i is open over ``[mlc_a[i], mlc_b[i]]`` when ``mlc_b > mlc_a``;
* jaws ``(x1, x2)`` / ``(y1, y2)`` from ASYMX/ASYMY (or X/Y); a missing device is "fully open"
  (``+-200`` mm);
* ``cumulative_meterset_weight`` is normalised to the beam's final weight (0 -> 1).

``Beam.apertures`` turns control points into MU-weighted apertures:

* step-and-shoot / static (consecutive control points with identical leaves): the meterset
  delivered between two control points goes to their common aperture; "moves" with no MU are
  skipped;
* VMAT / dynamic (leaves move between control points): each control *arc* gets the aperture at
  its midpoint (mean of the two control points' leaf positions, Masi 2013) and the arc's MU.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["OPEN_FIELD_MM", "Aperture", "Beam", "ControlPoint", "Plan", "PlanError", "read_plan"]

OPEN_FIELD_MM = 200.0


@dataclass
class ControlPoint:
    index: int
    cumulative_meterset_weight: float
    gantry_angle: float
    collimator_angle: float
    jaw_x: tuple[float, float]
    jaw_y: tuple[float, float]
    mlc_a: np.ndarray  # (n_pairs,) bank 1 (X1 side)
    mlc_b: np.ndarray  # (n_pairs,) bank 2 (X2 side)


@dataclass
class Aperture:
    """One MU-weighted MLC/jaw opening (a segment or a control-arc midpoint)."""

    mu: float
    mlc_a: np.ndarray
    mlc_b: np.ndarray
    jaw_x: tuple[float, float]
    jaw_y: tuple[float, float]
    gantry_angle: float

    def open_intervals(self, leaf_boundaries: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(left, right, width) per leaf pair, clipped to the jaws (x) and with pairs fully
        outside the y jaws given zero width; closed pairs have left == right."""
        lo = np.clip(self.mlc_a, self.jaw_x[0], self.jaw_x[1])
        hi = np.clip(self.mlc_b, self.jaw_x[0], self.jaw_x[1])
        hi = np.maximum(hi, lo)
        y0 = np.clip(leaf_boundaries[:-1], self.jaw_y[0], self.jaw_y[1])
        y1 = np.clip(leaf_boundaries[1:], self.jaw_y[0], self.jaw_y[1])
        width = np.maximum(y1 - y0, 0.0)
        return lo, hi, width


@dataclass
class Beam:
    number: int
    name: str
    meterset_mu: float
    leaf_boundaries: np.ndarray  # (n_pairs + 1,)
    control_points: list[ControlPoint]
    energy_mv: float = 6.0
    radiation_type: str = "PHOTON"
    delivery: str = "STEP_AND_SHOOT"  # STEP_AND_SHOOT | VMAT | STATIC | DYNAMIC
    sad_mm: float = 1000.0
    treatment_machine: str = ""

    @property
    def n_pairs(self) -> int:
        return len(self.leaf_boundaries) - 1

    @property
    def leaf_widths(self) -> np.ndarray:
        return np.diff(self.leaf_boundaries)

    def apertures(self) -> list[Aperture]:
        cps = self.control_points
        out: list[Aperture] = []
        if len(cps) < 2:
            return out
        final = cps[-1].cumulative_meterset_weight or 1.0
        for a, b in zip(cps[:-1], cps[1:], strict=True):
            dw = (b.cumulative_meterset_weight - a.cumulative_meterset_weight) / final
            mu = dw * self.meterset_mu
            if mu <= 1e-9:
                continue
            same = np.allclose(a.mlc_a, b.mlc_a, atol=1e-3) and np.allclose(a.mlc_b, b.mlc_b, atol=1e-3)
            if same:
                mlc_a, mlc_b = a.mlc_a, a.mlc_b
            else:  # dynamic: control-arc midpoint
                mlc_a, mlc_b = (a.mlc_a + b.mlc_a) / 2.0, (a.mlc_b + b.mlc_b) / 2.0
            jaw_x = ((a.jaw_x[0] + b.jaw_x[0]) / 2, (a.jaw_x[1] + b.jaw_x[1]) / 2)
            jaw_y = ((a.jaw_y[0] + b.jaw_y[0]) / 2, (a.jaw_y[1] + b.jaw_y[1]) / 2)
            out.append(
                Aperture(
                    mu=mu,
                    mlc_a=np.asarray(mlc_a, float),
                    mlc_b=np.asarray(mlc_b, float),
                    jaw_x=jaw_x,
                    jaw_y=jaw_y,
                    gantry_angle=(a.gantry_angle + b.gantry_angle) / 2,
                )
            )
        return out

    def is_dynamic(self) -> bool:
        cps = self.control_points
        return any(
            not (np.allclose(a.mlc_a, b.mlc_a, atol=1e-3) and np.allclose(a.mlc_b, b.mlc_b, atol=1e-3))
            and b.cumulative_meterset_weight > a.cumulative_meterset_weight
            for a, b in zip(cps[:-1], cps[1:], strict=True)
        )


@dataclass
class Plan:
    label: str
    beams: list[Beam]
    prescription_gy: float | None = None  # per plan (all fractions)
    fractions: int | None = None
    sop_instance_uid: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def total_mu(self) -> float:
        return float(sum(b.meterset_mu for b in self.beams))

    @property
    def dose_per_fraction_gy(self) -> float | None:
        if self.prescription_gy and self.fractions:
            return self.prescription_gy / self.fractions
        return None


# ---------------------------------------------------------------------------------------
# RT Plan DICOM -> Plan
# ---------------------------------------------------------------------------------------
class PlanError(ValueError):
    pass


def _f(v, default=0.0) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return default


def _devices(item) -> dict[str, list[float]]:
    out = {}
    for d in item.get("BeamLimitingDevicePositionSequence", []) or []:
        out[str(d.RTBeamLimitingDeviceType).upper()] = [float(v) for v in d.LeafJawPositions]
    return out


def read_plan(ds) -> Plan:
    """Parse an RT Plan dataset (photon beams with an MLCX or jaws-only)."""
    meters = {}
    fractions = None
    for fg in ds.get("FractionGroupSequence", []) or []:
        fractions = int(fg.get("NumberOfFractionsPlanned", 0) or 0) or fractions
        for rb in fg.get("ReferencedBeamSequence", []) or []:
            if rb.get("BeamMeterset") is not None:
                meters[int(rb.ReferencedBeamNumber)] = _f(rb.BeamMeterset)
    rx = None
    for dr in ds.get("DoseReferenceSequence", []) or []:
        if dr.get("TargetPrescriptionDose") is not None:
            rx = max(rx or 0.0, _f(dr.TargetPrescriptionDose))
    beams = []
    for b in ds.get("BeamSequence", []) or []:
        if str(b.get("TreatmentDeliveryType", "TREATMENT")).upper() != "TREATMENT":
            continue  # setup fields
        number = int(b.BeamNumber)
        boundaries = None
        for dev in b.get("BeamLimitingDeviceSequence", []) or []:
            if str(dev.RTBeamLimitingDeviceType).upper() in ("MLCX", "MLCY") and dev.get("LeafPositionBoundaries"):
                boundaries = np.asarray([float(v) for v in dev.LeafPositionBoundaries])
        if boundaries is None:  # jaws only: one "pair" spanning the field
            boundaries = np.asarray([-OPEN_FIELD_MM, OPEN_FIELD_MM])
        n = len(boundaries) - 1
        cps: list[ControlPoint] = []
        state = {
            "gantry": 0.0,
            "coll": 0.0,
            "x": (-OPEN_FIELD_MM, OPEN_FIELD_MM),
            "y": (-OPEN_FIELD_MM, OPEN_FIELD_MM),
            "a": None,
            "b": None,
        }
        energy = None
        for i, cp in enumerate(b.get("ControlPointSequence", []) or []):
            if cp.get("GantryAngle") is not None:
                state["gantry"] = _f(cp.GantryAngle)
            if cp.get("BeamLimitingDeviceAngle") is not None:
                state["coll"] = _f(cp.BeamLimitingDeviceAngle)
            if cp.get("NominalBeamEnergy") is not None and energy is None:
                energy = _f(cp.NominalBeamEnergy)
            dev = _devices(cp)
            for key in ("ASYMX", "X"):
                if key in dev:
                    state["x"] = (dev[key][0], dev[key][1])
            for key in ("ASYMY", "Y"):
                if key in dev:
                    state["y"] = (dev[key][0], dev[key][1])
            mlc = dev.get("MLCX") or dev.get("MLCY")
            if mlc is not None:
                if len(mlc) != 2 * n:
                    raise PlanError(f"beam {number}: {len(mlc)} leaf positions for {n} pairs")
                state["a"], state["b"] = np.asarray(mlc[:n]), np.asarray(mlc[n:])
            if state["a"] is None:  # no MLC: the jaws define the aperture
                a = np.full(n, state["x"][0])
                bb = np.full(n, state["x"][1])
            else:
                a, bb = state["a"], state["b"]
            cps.append(
                ControlPoint(
                    index=i,
                    cumulative_meterset_weight=_f(cp.get("CumulativeMetersetWeight"), 0.0),
                    gantry_angle=state["gantry"],
                    collimator_angle=state["coll"],
                    jaw_x=state["x"],
                    jaw_y=state["y"],
                    mlc_a=np.asarray(a, float).copy(),
                    mlc_b=np.asarray(bb, float).copy(),
                )
            )
        if len(cps) < 2:
            raise PlanError(f"beam {number}: fewer than 2 control points")
        final = _f(b.get("FinalCumulativeMetersetWeight"), cps[-1].cumulative_meterset_weight) or 1.0
        for cp in cps:
            cp.cumulative_meterset_weight /= final
        beam = Beam(
            number=number,
            name=str(b.get("BeamName", "") or f"BEAM{number}"),
            meterset_mu=meters.get(number, 0.0),
            leaf_boundaries=boundaries,
            control_points=cps,
            energy_mv=energy or 6.0,
            radiation_type=str(b.get("RadiationType", "PHOTON")),
            sad_mm=_f(b.get("SourceAxisDistance"), 1000.0) or 1000.0,
            treatment_machine=str(b.get("TreatmentMachineName", "") or ""),
        )
        beam.delivery = (
            "VMAT"
            if (beam.is_dynamic() and len({c.gantry_angle for c in cps}) > 1)
            else ("DYNAMIC" if beam.is_dynamic() else ("STATIC" if len(cps) == 2 else "STEP_AND_SHOOT"))
        )
        beams.append(beam)
    if not beams:
        raise PlanError("plan has no treatment beams")
    return Plan(
        label=str(ds.get("RTPlanLabel", "") or ""),
        beams=beams,
        prescription_gy=rx,
        fractions=fractions,
        sop_instance_uid=str(ds.get("SOPInstanceUID", "") or ""),
    )
