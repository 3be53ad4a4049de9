"""A clinic QA system's results export (CSV) -> a de-identified Parquet table.

Expected header (extra columns are ignored): ``PatientID, PatientName, PlanLabel,
PlanSOPInstanceUID, BeamNumber, Criterion, GPR, Device, MeasuredOn``. ``BeamNumber`` is a beam
number or ``ALL`` for the composite.

De-identification mirrors the DICOM path so rows join with the ingested plans: the patient
pseudonym is ``Pseudonymizer.patient("id:" + PatientID)`` (same as ``patient_key_of`` on the
DICOM objects) and the plan UID is remapped with ``Pseudonymizer.uid`` (same as the stored RT
Plan's SOPInstanceUID). Names, plan labels, devices and dates are dropped. Rows with an
unparseable GPR, a GPR outside 0-100 % or an unknown criterion are dropped and counted.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from ml.data.dicom.deid import Pseudonymizer
from ml.utils.tables import typed_frame

__all__ = ["QA_TABLE_COLUMNS", "normalise_criterion", "read_qa_results"]

QA_TABLE_COLUMNS = {"patient_id": "str", "plan_uid": "str", "beam": "int64", "criterion": "str", "gpr": "float64"}
_CRITERION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*/\s*(\d+(?:\.\d+)?)\s*mm\s*$", re.IGNORECASE)


def normalise_criterion(text: str) -> str | None:
    m = _CRITERION.match(str(text))
    if not m:
        return None
    dose, dta = float(m.group(1)), float(m.group(2))
    fmt = lambda v: f"{v:g}"  # noqa: E731
    return f"{fmt(dose)}%/{fmt(dta)}mm"


def read_qa_results(path: str | os.PathLike, pseudonymizer: Pseudonymizer) -> tuple[pd.DataFrame, int]:
    """(de-identified rows, number of rejected rows). Raises ValueError for an unreadable file."""
    try:
        raw = pd.read_csv(Path(path), dtype=str, keep_default_na=False)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"unreadable QA results table ({type(exc).__name__})") from None
    needed = ("PatientID", "PlanSOPInstanceUID", "BeamNumber", "Criterion", "GPR")
    if any(c not in raw.columns for c in needed):
        raise ValueError("QA results table lacks required columns")
    rows, bad = [], 0
    for rec in raw.itertuples(index=False):
        r = rec._asdict()
        crit = normalise_criterion(r["Criterion"])
        try:
            gpr = float(r["GPR"])
        except ValueError:
            gpr = float("nan")
        beam_txt = str(r["BeamNumber"]).strip().upper()
        try:
            beam = -1 if beam_txt in ("ALL", "PLAN", "COMPOSITE", "") else int(float(beam_txt))
        except ValueError:
            beam = None
        pid, uid = str(r["PatientID"]).strip(), str(r["PlanSOPInstanceUID"]).strip()
        if crit is None or beam is None or not np.isfinite(gpr) or not (0 <= gpr <= 100) or not pid or not uid:
            bad += 1
            continue
        rows.append(
            {
                "patient_id": pseudonymizer.patient(f"id:{pid}"),
                "plan_uid": pseudonymizer.uid(uid),
                "beam": beam,
                "criterion": crit,
                "gpr": gpr,
            }
        )
    return typed_frame(rows, QA_TABLE_COLUMNS), bad
