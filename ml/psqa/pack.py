"""Per-plan QA planes and the training pack built from them.

``compute_plan_qa`` turns one plan's RT Plan and RT Dose planes (planned per beam / composite,
delivered = ``DoseSummationType RECORD``) into:

* the composite planned and measured planes and the plan's composite fluence on the same grid,
* labels: GPR at 3%/3mm, 3%/2mm, 2%/3mm, 2%/2mm (global, 10 % cutoff, reference = measured,
  evaluated = planned; ``ml.metrics.gamma``) for the composite and for every beam,
* the dose-difference map (measured - planned, % of the planned maximum),
* the plan's complexity features (``ml.psqa.complexity``),
* the machine identity (``machine_identity``): the treatment machine (``TreatmentMachineName`` of
  the plan's beams; after de-identification a stable pseudonym) and the QA device that measured
  it (``ManufacturerModelName`` + ``DeviceSerialNumber`` of the delivered RT Dose; the serial is
  removed by de-identification, so the model name is what the lake keeps). Both are known before
  QA and carry signal: each linac has its own beam-model residuals and its own detector array.

``build_pack`` gathers the planes of many plans into the ``ml.psqa.dataset`` pack format,
block-averaging the 2D maps by ``downsample`` (128 x 128 at 2 mm -> 64 x 64 at 4 mm by default),
and one-hot codes the categorical plan columns (``MACHINE_COLUMNS``) into 0/1 feature columns
``<column>=<value>`` (``one_hot_columns``) beside the complexity metrics of the tabular modality.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ml.psqa.dataset import CRITERIA, LABEL_COLUMNS, ONE_HOT_SEP, criterion_column, write_pack

__all__ = [
    "GAMMA_CRITERIA",
    "MACHINE_COLUMNS",
    "PlanQA",
    "build_pack",
    "compute_plan_qa",
    "machine_identity",
    "one_hot_columns",
    "save_planes",
]

GAMMA_CRITERIA = ((3, 3), (3, 2), (2, 3), (2, 2))
#: categorical plan-level columns (strings) that enter the tabular modality one-hot coded
MACHINE_COLUMNS = ("treatment_machine", "qa_device")


@dataclass
class PlanQA:
    planned: np.ndarray  # composite, Gy
    measured: np.ndarray
    fluence: np.ndarray  # MU
    dd: np.ndarray  # % of planned max
    spacing_mm: float
    gpr: dict[str, float]  # composite, keyed by criterion
    beam_gpr: dict[int, dict[str, float]] = field(default_factory=dict)
    plan_metrics: dict[str, float] = field(default_factory=dict)
    beam_metrics: list[dict] = field(default_factory=list)
    n_beams: int = 0
    machine: dict[str, str] = field(default_factory=dict)  # MACHINE_COLUMNS -> value ("" unknown)


def _plane(ds) -> tuple[np.ndarray, float]:
    from ml.data.dicom.headers import decode_pixels

    arr = np.asarray(decode_pixels(ds), dtype=np.float64) * float(ds.DoseGridScaling)
    if arr.ndim == 3:
        if arr.shape[0] != 1:
            raise ValueError("QA dose must be a single plane")
        arr = arr[0]
    ps = [float(v) for v in ds.PixelSpacing]
    if abs(ps[0] - ps[1]) > 1e-6:
        raise ValueError("QA planes need square pixels")
    return arr.astype(np.float32), ps[0]


def machine_identity(plan, dose_datasets: list = ()) -> dict[str, str]:
    """``{"treatment_machine", "qa_device"}`` of a plan (``ml.psqa.plan.Plan``) and its RT Dose
    datasets: the beams' most frequent ``TreatmentMachineName`` and the device of the first
    delivered (``RECORD``) plane, ``ManufacturerModelName`` plus ``DeviceSerialNumber`` when the
    serial is present and not already part of the model name; "" where unknown."""
    from collections import Counter

    names = [b.treatment_machine.strip() for b in plan.beams if b.treatment_machine and b.treatment_machine.strip()]
    machine = Counter(names).most_common(1)[0][0] if names else ""
    device = ""
    for ds in dose_datasets:
        if str(ds.get("DoseSummationType", "")).upper() != "RECORD":
            continue
        model = str(ds.get("ManufacturerModelName", "") or "").strip()
        serial = str(ds.get("DeviceSerialNumber", "") or "").strip()
        device = model if not serial or serial in model.split() else f"{model} {serial}".strip()
        if device:
            break
    return {"treatment_machine": machine, "qa_device": device}


def one_hot_columns(df: pd.DataFrame, columns=MACHINE_COLUMNS) -> tuple[pd.DataFrame, list[str]]:
    """``df`` with a 0/1 column ``<column>=<value>`` per distinct non-empty value of each of
    ``columns`` present (sorted), and the names of those columns. Empty or missing values get 0
    everywhere (an unknown machine is no machine)."""
    out = df.copy()
    names: list[str] = []
    for col in columns:
        if col not in df.columns:
            continue
        vals = df[col].fillna("").astype(str).str.strip()
        for v in sorted(set(vals) - {""}):
            name = f"{col}{ONE_HOT_SEP}{v}"
            out[name] = (vals == v).astype("float64")
            names.append(name)
    return out, names


def compute_plan_qa(plan_ds, dose_datasets: list, gamma_kwargs: dict | None = None) -> PlanQA:
    """``dose_datasets``: the RT Dose datasets that reference this plan."""
    from ml.data.dicom.rtdose import referenced_beam_number
    from ml.metrics.gamma import gamma_pass_rates
    from ml.psqa.complexity import complexity_tables
    from ml.psqa.fluence import plan_fluence
    from ml.psqa.plan import read_plan

    plan = read_plan(plan_ds)
    planned_beams, measured_beams = {}, {}
    planned_comp = measured_comp = None
    spacing = None
    for ds in dose_datasets:
        arr, ps = _plane(ds)
        spacing = spacing or ps
        if abs(ps - spacing) > 1e-6:
            raise ValueError("QA planes of one plan have different pixel spacing")
        kind = str(ds.get("DoseSummationType", "")).upper()
        beam = referenced_beam_number(ds)
        if kind == "RECORD":
            if beam >= 0:
                measured_beams[beam] = arr
            else:
                measured_comp = arr
        elif kind == "BEAM" and beam >= 0:
            planned_beams[beam] = arr
        elif kind == "PLAN":
            planned_comp = arr
    if planned_comp is None and planned_beams:
        planned_comp = np.sum(list(planned_beams.values()), axis=0)
    if measured_comp is None and measured_beams:
        measured_comp = np.sum(list(measured_beams.values()), axis=0)
    if planned_comp is None or measured_comp is None:
        raise ValueError("plan lacks planned or delivered (RECORD) dose planes")
    if planned_comp.shape != measured_comp.shape or planned_comp.shape[0] != planned_comp.shape[1]:
        raise ValueError("planned and delivered planes differ in shape or are not square")
    kw = {"lower_cutoff_percent": 10.0, **(gamma_kwargs or {})}
    gpr = gamma_pass_rates(measured_comp, planned_comp, spacing, criteria=GAMMA_CRITERIA, **kw)
    beam_gpr = {
        b: gamma_pass_rates(measured_beams[b], planned_beams[b], spacing, criteria=GAMMA_CRITERIA, **kw)
        for b in sorted(set(planned_beams) & set(measured_beams))
    }
    peak = float(planned_comp.max()) or 1.0
    dd = (measured_comp - planned_comp) / peak * 100.0
    fluence = plan_fluence(plan, spacing_mm=spacing, size=planned_comp.shape[0])
    beam_rows, plan_row = complexity_tables(plan)
    return PlanQA(
        planned=planned_comp,
        measured=measured_comp,
        fluence=fluence.astype(np.float32),
        dd=dd.astype(np.float32),
        spacing_mm=spacing,
        gpr=gpr,
        beam_gpr=beam_gpr,
        plan_metrics=plan_row,
        beam_metrics=beam_rows,
        n_beams=len(plan.beams),
        machine=machine_identity(plan, dose_datasets),
    )


def save_planes(path: str | os.PathLike, qa: PlanQA) -> bytes:
    from ml.utils.io import save_npz_deterministic

    return save_npz_deterministic(
        path,
        {
            "planned": qa.planned,
            "measured": qa.measured,
            "fluence": qa.fluence,
            "dd": qa.dd,
            "spacing_mm": np.asarray([qa.spacing_mm]),
        },
    )


def _block_mean(a: np.ndarray, f: int) -> np.ndarray:
    if f == 1:
        return a
    h, w = a.shape[-2] // f * f, a.shape[-1] // f * f
    a = a[..., :h, :w]
    return a.reshape(*a.shape[:-2], h // f, f, w // f, f).mean(axis=(-3, -1))


def build_pack(
    out_dir: str | os.PathLike,
    planes: pd.DataFrame,
    features: pd.DataFrame,
    labels: pd.DataFrame,
    split: pd.DataFrame,
    lake_dir: str | os.PathLike,
    feature_columns: list[str],
    downsample: int = 2,
    categorical_columns=MACHINE_COLUMNS,
) -> Path:
    """``planes``: plan_key, path (npz relative to ``lake_dir``); ``labels``: plan_key + gpr_*;
    ``split``: plan_key, split. Plans missing any piece are left out. ``categorical_columns`` of
    ``features`` (those present) are one-hot coded (``one_hot_columns``, over every plan of the
    pack) and appended to the feature columns."""
    features, one_hot = one_hot_columns(features, categorical_columns)
    feature_columns = [*feature_columns, *one_hot]
    df = (
        split[["plan_key", "patient_id", "split"]]
        .merge(labels[["plan_key", *LABEL_COLUMNS]], on="plan_key")
        .merge(features[["plan_key", *feature_columns]], on="plan_key")
        .merge(planes[["plan_key", "path"]], on="plan_key")
        .sort_values("plan_key")
        .reset_index(drop=True)
    )
    if df.empty:
        raise ValueError("no plan has planes, features, labels and a split")
    images, dds = [], []
    spacing = None
    for rel in df["path"]:
        with np.load(Path(lake_dir) / rel) as z:
            planned, fluence, dd = z["planned"], z["fluence"], z["dd"]
            spacing = float(z["spacing_mm"][0])
        img = np.stack([planned / max(float(planned.max()), 1e-6), fluence / max(float(fluence.max()), 1e-6)])
        images.append(_block_mean(img, downsample))
        dds.append(_block_mean(dd[None], downsample))
    df["image_index"] = np.arange(len(df))
    table = df.drop(columns=["path"])
    meta = {
        "feature_columns": list(feature_columns),
        "one_hot_columns": one_hot,
        "criteria": list(CRITERIA),
        "label_columns": [criterion_column(c) for c in CRITERIA],
        "channels": ["planned_dose_rel", "fluence_rel"],
        "spacing_mm": (spacing or 2.0) * downsample,
        "dd_units": "% of planned max",
    }
    return write_pack(out_dir, table, np.stack(images).astype(np.float32), np.stack(dds).astype(np.float32), meta)
