"""Canonical ROI vocabulary and synonym matching (TG-263-like, head-and-neck subset).

The canonical names are the OpenKBP ones (``Brainstem``, ``SpinalCord``, ``RightParotid``,
``LeftParotid``, ``Esophagus``, ``Larynx``, ``Mandible``, ``PTV56``, ``PTV63``, ``PTV70``)
plus ``Body``; other PTVs keep their dose level (``PTV66``). Clinical RTSTRUCTs use many
spellings (``Parotid_L``, ``L Parotid``, ``Lt_Parotid``, ``BrainStem``, ``PTV_7000``...); only
names that map to the vocabulary are rasterised, and the free-text original never leaves
ingestion (it may contain anything).
"""

from __future__ import annotations

import re

__all__ = ["BODY", "CANONICAL", "OARS", "OPENKBP_ROIS", "TARGETS", "canonical_roi_name", "swap_left_right"]

OARS = ("Brainstem", "SpinalCord", "RightParotid", "LeftParotid", "Esophagus", "Larynx", "Mandible")
TARGETS = ("PTV56", "PTV63", "PTV70")
OPENKBP_ROIS = OARS + TARGETS
BODY = "Body"
CANONICAL = (BODY,) + OPENKBP_ROIS

_SIDE_L = re.compile(r"(^|[^a-z])(l|lt|left|lft|sin)([^a-z]|$)")
_SIDE_R = re.compile(r"(^|[^a-z])(r|rt|right|rgt|dex)([^a-z]|$)")
_PTV = re.compile(r"^ptv[\s_\-]*(?:high|low|mid)?[\s_\-]*(\d{2,4}(?:[.,]\d)?)")


def _norm(name: str) -> str:
    return re.sub(r"\s+", " ", name.strip().lower())


def canonical_roi_name(name: str) -> str | None:
    """Map a clinical ROI name to the canonical vocabulary, or None when unknown."""
    if not name:
        return None
    n = _norm(name)
    compact = re.sub(r"[^a-z0-9]", "", n)
    if compact in {"body", "external", "skin", "outline", "patient", "bodycontour", "external1"}:
        return BODY
    m = _PTV.match(n) or _PTV.match(compact)
    if m:
        dose = float(m.group(1).replace(",", "."))
        if dose > 200:  # cGy
            dose /= 100.0
        return f"PTV{round(dose)}"
    if compact in {"brainstem", "bs", "brainstm", "truncuscerebri"}:
        return "Brainstem"
    if compact in {"spinalcord", "cord", "spinal", "medulla", "myelon", "spinalcanal"}:
        return "SpinalCord"
    if compact in {"esophagus", "oesophagus", "esoph", "esophagusupper", "esophagusu"}:
        return "Esophagus"
    if compact in {"larynx", "glotticlarynx", "larynxsg", "larynxg"}:
        return "Larynx"
    if compact in {"mandible", "mandibula", "jaw", "bonemandible"}:
        return "Mandible"
    if "parotid" in compact:
        spaced = re.sub(r"parotid", " ", n.replace("_", " ").replace("-", " "))
        if compact in {
            "leftparotid",
            "parotidleft",
            "lparotid",
            "parotidl",
            "ltparotid",
            "parotidlt",
        } or _SIDE_L.search(spaced):
            return "LeftParotid"
        if compact in {
            "rightparotid",
            "parotidright",
            "rparotid",
            "parotidr",
            "rtparotid",
            "parotidrt",
        } or _SIDE_R.search(spaced):
            return "RightParotid"
    return None


def swap_left_right(name: str) -> str:
    """Name of the contralateral structure (used by flip augmentation)."""
    if name.startswith("Left"):
        return "Right" + name[4:]
    if name.startswith("Right"):
        return "Left" + name[5:]
    return name
