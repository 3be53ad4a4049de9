"""The no-PHI rule for stored tables and de-identified DICOM copies, as executable checks.

Tables: identifier columns must hold pseudonyms of the expected shape, UID columns only
remapped ``2.25.`` UIDs (or standard class UIDs), and no text cell may look like a DICOM person
name (``^``) or an 8-digit date. Stored DICOM: ``PatientIdentityRemoved = YES``, no private
elements, no person names except the pseudonym, no dates, no instance UID outside ``2.25.``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

__all__ = [
    "DATE_LIKE",
    "PATIENT_ID",
    "REMAPPED_UID",
    "STANDARD_UID",
    "STUDY_KEY",
    "UID_COLUMNS",
    "dicom_phi_violations",
    "table_phi_violations",
]

STUDY_KEY = re.compile(r"^(dcm|nii|kbp)-[0-9a-f]{16}$")
PATIENT_ID = re.compile(r"^pt-[0-9a-f]{16}$")
REMAPPED_UID = re.compile(r"^2\.25\.\d{1,39}$")
STANDARD_UID = re.compile(r"^1\.2\.840\.10008\.[0-9.]+$")
DATE_LIKE = re.compile(r"(?<![0-9A-Za-z.])(?:19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])(?![0-9A-Za-z])")

UID_COLUMNS = ("sop_instance_uid", "series_instance_uid", "frame_of_reference_uid", "study_instance_uid")


def table_phi_violations(df: pd.DataFrame) -> list[str]:
    """Human-readable violations (column and rule, never the offending value)."""
    problems: list[str] = []
    if df is None or len(df) == 0:
        return problems
    if "study_key" in df:
        vals = df["study_key"].astype(str)
        bad = (vals != "") & ~vals.str.match(STUDY_KEY)
        if bad.any():
            problems.append(f"study_key: {int(bad.sum())} values are not pseudonymous keys")
    if "patient_id" in df:
        vals = df["patient_id"].astype(str)
        bad = (vals != "") & ~vals.str.match(PATIENT_ID)
        if bad.any():
            problems.append(f"patient_id: {int(bad.sum())} values are not pseudonyms")
    for col in UID_COLUMNS:
        if col in df:
            vals = df[col].astype(str)
            bad = (vals != "") & ~vals.str.match(REMAPPED_UID) & ~vals.str.match(STANDARD_UID)
            if bad.any():
                problems.append(f"{col}: {int(bad.sum())} UIDs were not remapped")
    for col in df.columns:
        if df[col].dtype == object or str(df[col].dtype).startswith(("str", "string")):
            vals = df[col].dropna().astype(str)
            if vals.str.contains("^", regex=False).any():
                problems.append(f"{col}: contains person-name-like values ('^')")
            if vals.str.contains(DATE_LIKE).any():
                problems.append(f"{col}: contains date-like values")
    return problems


def dicom_phi_violations(path: str | Path) -> list[str]:
    """Check one stored (de-identified) DICOM file."""
    import pydicom

    from ml.data.dicom.headers import quiet_pydicom

    with quiet_pydicom():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        return _dataset_phi_violations(ds)


#: value representations that cannot carry a name, a date or a UID: left unconverted by the check
#: (an RT Plan holds tens of thousands of DS leaf positions; converting them dominated its cost)
_NUMERIC_VRS = frozenset({"DS", "IS", "FL", "FD", "SL", "SS", "UL", "US", "SV", "UV", "AT"})
_BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW"})  # not UN: pydicom converts it to the dictionary VR


def _text_elements(ds):
    """Every element of ``ds`` and its sequences (depth first) except public numeric and binary
    ones, converted; private elements always (the check reports them whatever their VR)."""
    from pydicom.datadict import dictionary_VR

    for raw in ds.elements():
        tag = raw.tag
        if not tag.is_private:
            vr = raw.VR
            if vr is None:  # implicit VR: the dictionary's
                try:
                    vr = dictionary_VR(tag)
                except KeyError:
                    vr = None
            if vr in _NUMERIC_VRS or vr in _BINARY_VRS:
                continue
        elem = ds[tag]
        yield elem
        if elem.VR == "SQ":
            for item in elem.value:
                yield from _text_elements(item)


def _dataset_phi_violations(ds) -> list[str]:
    problems = []
    if str(ds.get("PatientIdentityRemoved", "")) != "YES":
        problems.append("PatientIdentityRemoved is not YES")
    pseudonym = str(ds.get("PatientID", ""))
    if not PATIENT_ID.match(pseudonym):
        problems.append("PatientID is not a pseudonym")
    for elem in _text_elements(ds):
        if elem.tag.is_private:
            problems.append(f"private element {elem.tag}")
        elif elem.VR == "PN" and elem.value not in (None, "") and str(elem.value) != pseudonym:
            problems.append(f"person name in {elem.keyword or elem.tag}")
        elif elem.VR in ("DA", "DT", "TM") and elem.value not in (None, ""):
            problems.append(f"date/time in {elem.keyword or elem.tag}")
        elif elem.VR == "UI" and elem.value and not elem.keyword.endswith("ClassUID"):
            values = elem.value if elem.VM > 1 else [elem.value]
            for v in values:
                if not (REMAPPED_UID.match(str(v)) or STANDARD_UID.match(str(v))):
                    problems.append(f"UID not remapped in {elem.keyword or elem.tag}")
    return problems
