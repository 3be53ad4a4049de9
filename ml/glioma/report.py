"""GMMAS-GPT as a deterministic template (spec C.5 "GMMAS-GPT", [I] default).

The paper's GMMAS-GPT turns the system's outputs into a per-patient report with an LLM; its model,
prompt and retrieval are unknown. Here the report is a fixed template filled from the numbers
(:func:`build_report` -> a plain dict; :func:`patient_report` renders it as Markdown or HTML):
tumour volume and location, every prediction with its probability, MC-dropout uncertainty and
0.5-threshold call, a calibration caveat, the WHO CNS5 (2021) mapping of the predicted molecular
calls, a figure, the true labels when given (for review) and a fixed disclaimer.

``narrate`` (optional, default None -- no LLM is installed): a callable ``narrate(report_dict) ->
str`` whose text is appended under a "Narrative (generated)" heading. It receives a deep copy of
the report dict and the rendered numbers are produced before it runs, so it can never change them.

Orientation: lgg-mri stores no orientation metadata, so "left/right", "anterior/posterior" and
"superior/inferior" from :func:`tumour_location` are *image* directions (column, row, slice index),
not patient sides, unless a voxel-to-RAS affine is given.
"""

from __future__ import annotations

import base64
import copy
import html
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from ml.glioma.data import SEQUENCES, TASKS
from ml.viz import figure_grid, png_bytes

__all__ = [
    "DISCLAIMER",
    "build_report",
    "patient_report",
    "render_report",
    "report_figure_png",
    "tumour_location",
    "who_cns5",
]

DISCLAIMER = (
    "Research use only. This report is generated automatically from a machine-learning model trained on a "
    "small public research cohort (TCGA lower-grade gliomas); it is not a diagnosis and must not guide the care "
    "of a patient. Molecular status (IDH, 1p/19q) requires tissue testing and review by a neuropathologist."
)
DEFAULT_CALIBRATION_NOTE = (
    "Probabilities are temperature-scaled model outputs estimated on a small cohort; they may be miscalibrated "
    "for scans from other scanners or populations. The uncertainty u is the standard deviation of the "
    "predicted class's probability over MC-dropout passes (model uncertainty only)."
)
_TASK_TITLES = {"idh": "IDH status", "codel": "1p/19q codeletion", "grade": "WHO grade", "histology": "Histology"}
_BINARY = {"idh": "p_idh_mutant", "codel": "p_codel", "grade": "p_grade_g3"}
_HISTO_COLS = {name: f"p_{name}" for name in TASKS["histology"]}


def who_cns5(idh_mutant: bool | None, codel: bool | None) -> str:
    """WHO CNS5 (2021) adult-type diffuse glioma family from IDH and 1p/19q calls.

    * IDH-mutant + 1p/19q-codeleted -> "Oligodendroglioma, IDH-mutant and 1p/19q-codeleted";
    * IDH-mutant, not codeleted -> "Astrocytoma, IDH-mutant";
    * IDH-wildtype -> a note: with the molecular criteria (TERT promoter mutation, EGFR
      amplification, +7/-10) an adult IDH-wildtype diffuse glioma is glioblastoma, IDH-wildtype, or
      another entity, so further testing is needed; this cohort is lower-grade by selection. A
      codeletion call with IDH-wildtype is flagged as inconsistent (CNS5 defines 1p/19q codeletion
      together with IDH mutation);
    * IDH uncertain (None), or IDH-mutant with 1p/19q uncertain -> starts with "Not determinable".
    """
    if idh_mutant is None:
        return "Not determinable: IDH status uncertain, so no WHO CNS5 integrated diagnosis can be proposed."
    if idh_mutant:
        if codel is None:
            return (
                "Not determinable: IDH-mutant diffuse glioma, but 1p/19q status uncertain "
                "(astrocytoma, IDH-mutant vs oligodendroglioma, IDH-mutant and 1p/19q-codeleted)."
            )
        return "Oligodendroglioma, IDH-mutant and 1p/19q-codeleted" if codel else "Astrocytoma, IDH-mutant"
    text = (
        "IDH-wildtype diffuse glioma: in adults, with the WHO CNS5 molecular criteria (TERT promoter mutation, "
        "EGFR amplification, or chromosome +7/-10) this is glioblastoma, IDH-wildtype, otherwise possibly another "
        "entity; further molecular testing is needed. Note that this cohort is lower-grade (WHO grade 2-3) by "
        "selection."
    )
    if codel:
        text += " A 1p/19q-codeletion call without IDH mutation is inconsistent with CNS5 and should be re-tested."
    return text


def _side(frac: float, low: str, high: str) -> str:
    return low if frac < 0.5 else high


def tumour_location(
    mask: np.ndarray,
    affine: np.ndarray | None = None,
    brain: np.ndarray | None = None,
) -> dict:
    """Centroid and coarse location of a tumour mask (S, H, W).

    Without ``affine`` (lgg-mri: no orientation metadata): centroid as fractions of the array
    extent along slice/row/column (``(index + 0.5) / n``); ``lr`` = "image-left" / "image-right"
    (column half), ``ap`` = "anterior (image top)" / "posterior (image bottom)" (row half, assuming
    the usual radiological display), ``si`` = "inferior (lower slice index)" / "superior (higher
    slice index)" (assuming slices ordered inferior to superior). These are image sides, not patient
    sides (``orientation_known`` False).

    With ``affine`` (4 x 4, maps the mask's array index (s, r, c, 1) to RAS+ mm, e.g. from a NIfTI
    header permuted to this axis order): the centroid in RAS mm and real directions relative to the
    reference point -- the centroid of ``brain`` (S, H, W, optional) or else the centre of the field
    of view: right if x > ref, anterior if y > ref, superior if z > ref. Empty mask -> ``{"empty":
    True}``.
    """
    m = np.asarray(mask) > 0
    if not m.any():
        return {"empty": True, "orientation_known": affine is not None}
    idx = np.argwhere(m).astype(np.float64)
    cen = idx.mean(axis=0)
    frac = (cen + 0.5) / np.asarray(m.shape, np.float64)
    out: dict = {
        "empty": False,
        "centroid_index": [float(v) for v in cen],
        "slice_frac": float(frac[0]),
        "row_frac": float(frac[1]),
        "col_frac": float(frac[2]),
    }
    if affine is None:
        out.update(
            orientation_known=False,
            lr=_side(frac[2], "image-left", "image-right"),
            ap=_side(frac[1], "anterior (image top)", "posterior (image bottom)"),
            si=_side(frac[0], "inferior (lower slice index)", "superior (higher slice index)"),
            note="No orientation metadata: sides are image sides, not patient sides.",
        )
        return out
    a = np.asarray(affine, np.float64)
    if a.shape != (4, 4):
        raise ValueError(f"affine must be 4 x 4, got {a.shape}")
    if brain is not None and np.any(brain):
        ref_idx = np.argwhere(np.asarray(brain) > 0).astype(np.float64).mean(axis=0)
        ref_name = "brain centroid"
    else:
        ref_idx = (np.asarray(m.shape, np.float64) - 1.0) / 2.0
        ref_name = "field-of-view centre"
    ras = (a @ np.append(cen, 1.0))[:3]
    ref = (a @ np.append(ref_idx, 1.0))[:3]
    out.update(
        orientation_known=True,
        centroid_ras_mm=[float(v) for v in ras],
        lr="right" if ras[0] > ref[0] else "left",
        ap="anterior" if ras[1] > ref[1] else "posterior",
        si="superior" if ras[2] > ref[2] else "inferior",
        note=f"Patient directions (RAS) relative to the {ref_name}.",
    )
    return out


def _prob(row: Mapping, key: str) -> float:
    v = row.get(key)
    try:
        v = float(v)
    except (TypeError, ValueError):
        return float("nan")
    return v


def _label_name(task: str, value) -> str | None:
    """A true label as its vocabulary name (int code or string; unknown -> None)."""
    if value is None:
        return None
    if isinstance(value, str):
        return value or None
    try:
        code = int(value)
    except (TypeError, ValueError):  # None-like or NaN
        return None
    return TASKS[task][code] if 0 <= code < len(TASKS[task]) else None


def _fmt(x: float, nd: int = 3) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.{nd}f}"


def build_report(
    pred_row: Mapping,
    *,
    mask: np.ndarray | None = None,
    spacing: Sequence[float] | None = None,
    affine: np.ndarray | None = None,
    true_row: Mapping | None = None,
    ece: Mapping[str, float] | None = None,
    calibration_note: str = DEFAULT_CALIBRATION_NOTE,
    threshold: float = 0.5,
    indeterminate_band: float = 0.1,
) -> dict:
    """The report's content as a plain dict (numbers only; :func:`render_report` formats it).

    ``pred_row``: one predictions-frame row (``patient_id``, ``p_*``, ``u_*``, optionally
    ``tumour_voxels``). Calls: binary tasks positive when ``p >= threshold`` (default 0.5),
    histology = argmax. For the WHO mapping a call with ``|p - threshold| < indeterminate_band``
    (default 0.1) or a missing probability counts as uncertain (None). Volume: from ``mask`` (else
    ``tumour_voxels``); in mm^3 when ``spacing`` (3 finite values, mm) is given, else voxels.
    ``ece``: optional per-task ECE of the model (shown in the calibration caveat).
    """
    rep: dict = {"patient_id": str(pred_row.get("patient_id", "unknown"))}
    voxels = None
    if mask is not None:
        voxels = int((np.asarray(mask) > 0).sum())
    elif pred_row.get("tumour_voxels") is not None:
        try:
            v = float(pred_row["tumour_voxels"])
            voxels = int(v) if np.isfinite(v) else None
        except (TypeError, ValueError):
            voxels = None
    sp = None if spacing is None else [float(s) for s in spacing]
    known_geometry = sp is not None and len(sp) == 3 and all(np.isfinite(sp)) and all(s > 0 for s in sp)
    rep["volume"] = {
        "voxels": voxels,
        "mm3": float(voxels * np.prod(sp)) if voxels is not None and known_geometry else None,
        "spacing_mm": sp if known_geometry else None,
    }
    rep["location"] = tumour_location(mask, affine) if mask is not None else None
    preds = {}
    for task, col in _BINARY.items():
        p = _prob(pred_row, col)
        pos = TASKS[task][1]
        call = None if not np.isfinite(p) else (TASKS[task][1] if p >= threshold else TASKS[task][0])
        prob_call = p if call == pos else (1.0 - p if np.isfinite(p) else float("nan"))
        preds[task] = {
            "p_positive": p,
            "positive": pos,
            "call": call,
            "p_call": prob_call,
            "uncertainty": _prob(pred_row, f"u_{task}"),
            "confident": bool(np.isfinite(p) and abs(p - threshold) >= indeterminate_band),
        }
    hp = {name: _prob(pred_row, col) for name, col in _HISTO_COLS.items()}
    finite = {k: v for k, v in hp.items() if np.isfinite(v)}
    hcall = max(finite, key=finite.get) if finite else None
    preds["histology"] = {
        "probs": hp,
        "call": hcall,
        "p_call": finite[hcall] if hcall else float("nan"),
        "uncertainty": _prob(pred_row, "u_histology"),
    }
    rep["predictions"] = preds

    def _bool(task: str) -> bool | None:
        d = preds[task]
        return None if not d["confident"] else d["call"] == d["positive"]

    rep["who_cns5"] = who_cns5(_bool("idh"), _bool("codel"))
    rep["threshold"] = threshold
    rep["indeterminate_band"] = indeterminate_band
    rep["calibration"] = {"note": calibration_note, "ece": dict(ece) if ece else None}
    if true_row is not None:
        rep["true"] = {t: _label_name(t, true_row.get(t)) for t in TASKS}
    rep["disclaimer"] = DISCLAIMER
    return rep


def _lines(rep: dict) -> list[tuple[str, str | list[str]]]:
    """(heading, paragraph or bullet list) sections shared by the Markdown and HTML renderers."""
    vol = rep["volume"]
    if vol["voxels"] is None:
        vtxt = "not available (no mask)"
    elif vol["mm3"] is not None:
        vtxt = f"{vol['mm3']:.0f} mm^3 ({vol['voxels']} voxels, spacing {vol['spacing_mm']} mm)"
    else:
        vtxt = f"{vol['voxels']} voxels (no geometry recorded: voxel count, not mm^3)"
    tumour = [f"Volume: {vtxt}"]
    loc = rep["location"]
    if loc and not loc.get("empty"):
        tumour.append(
            f"Location: {loc['lr']}, {loc['ap']}, {loc['si']} (centroid at slice/row/column fractions "
            f"{loc['slice_frac']:.2f}/{loc['row_frac']:.2f}/{loc['col_frac']:.2f}). {loc['note']}"
        )
    elif loc is not None:
        tumour.append("Location: no tumour in the predicted mask.")
    items = []
    for task in ("idh", "codel", "grade"):
        d = rep["predictions"][task]
        items.append(
            f"{_TASK_TITLES[task]}: {d['call'] or 'n/a'} (P({d['positive']}) = {_fmt(d['p_positive'])}, "
            f"uncertainty u = {_fmt(d['uncertainty'])}; call at P >= {rep['threshold']})"
        )
    h = rep["predictions"]["histology"]
    probs = ", ".join(f"{k} {_fmt(v)}" for k, v in h["probs"].items())
    items.append(
        f"{_TASK_TITLES['histology']} (pre-2016 WHO classes): {h['call'] or 'n/a'} "
        f"(probabilities: {probs}; uncertainty u = {_fmt(h['uncertainty'])})"
    )
    cal = rep["calibration"]
    ctext = cal["note"]
    if cal["ece"]:
        ctext += " Model ECE (10 bins): " + ", ".join(f"{k} {_fmt(v)}" for k, v in cal["ece"].items()) + "."
    who = (
        f"{rep['who_cns5']} (from the predicted IDH and 1p/19q calls; a call with probability within "
        f"{rep['indeterminate_band']} of {rep['threshold']} is treated as uncertain)"
    )
    sections: list[tuple[str, str | list[str]]] = [
        ("Tumour", tumour),
        ("Predictions", items),
        ("WHO CNS5 mapping", who),
        ("Calibration and uncertainty", ctext),
    ]
    if rep.get("true") is not None:
        sections.append(
            (
                "True labels (for review)",
                [f"{_TASK_TITLES[t]}: {v if v is not None else 'unknown'}" for t, v in rep["true"].items()],
            )
        )
    return sections


def render_report(
    rep: dict,
    fmt: str = "md",
    figure_png: bytes | None = None,
    figure_name: str = "figure.png",
    narrative: str | None = None,
) -> str:
    """Render a :func:`build_report` dict as ``fmt`` "md" (figure linked as ``figure_name``) or
    "html" (a self-contained page, figure embedded as base64 PNG). ``narrative`` is appended under
    "Narrative (generated)"."""
    if fmt not in ("md", "html"):
        raise ValueError(f"fmt must be 'md' or 'html', got {fmt!r}")
    title = f"Glioma MRI analysis report: {rep['patient_id']}"
    sections = _lines(rep)
    if fmt == "md":
        out = [f"# {title}", ""]
        for head, body in sections:
            out += [f"## {head}", ""]
            out += [f"- {b}" for b in body] if isinstance(body, list) else [body]
            out.append("")
        if figure_png is not None:
            out += ["## Figure", "", f"![tumour overlay]({figure_name})", ""]
        if narrative:
            out += ["## Narrative (generated)", "", narrative.strip(), ""]
        out += ["## Disclaimer", "", rep["disclaimer"], ""]
        return "\n".join(out)
    e = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8"><title>' + e(title) + "</title></head><body>",
        f"<h1>{e(title)}</h1>",
    ]
    for head, body in sections:
        out.append(f"<h2>{e(head)}</h2>")
        if isinstance(body, list):
            out.append("<ul>" + "".join(f"<li>{e(b)}</li>" for b in body) + "</ul>")
        else:
            out.append(f"<p>{e(body)}</p>")
    if figure_png is not None:
        b64 = base64.b64encode(figure_png).decode("ascii")
        out += ["<h2>Figure</h2>", f'<img alt="tumour overlay" src="data:image/png;base64,{b64}">']
    if narrative:
        out += ["<h2>Narrative (generated)</h2>", f"<p>{e(narrative.strip())}</p>"]
    out += ["<h2>Disclaimer</h2>", f"<p><strong>{e(rep['disclaimer'])}</strong></p>", "</body></html>"]
    return "\n".join(out)


def patient_report(
    pred_row: Mapping,
    *,
    mask: np.ndarray | None = None,
    spacing: Sequence[float] | None = None,
    image: np.ndarray | None = None,
    true_row: Mapping | None = None,
    figure_png: bytes | None = None,
    calibration_note: str = DEFAULT_CALIBRATION_NOTE,
    ece: Mapping[str, float] | None = None,
    fmt: str = "md",
    affine: np.ndarray | None = None,
    figure_name: str = "figure.png",
    threshold: float = 0.5,
    indeterminate_band: float = 0.1,
    true_mask: np.ndarray | None = None,
    present: Sequence[bool] | None = None,
    narrate: Callable[[dict], str] | None = None,
) -> str:
    """One patient's report (``fmt`` "md" or "html"); see :func:`build_report` for the content and
    defaults. ``mask`` is the predicted tumour mask (S, H, W). When ``figure_png`` is None and
    ``image`` (S, 4, H, W, SEQUENCES order) and ``mask`` are given, the figure is drawn with
    :func:`report_figure_png` (``true_mask``, ``present`` passed on). Markdown links the figure as
    ``figure_name`` (the caller writes the PNG there); HTML embeds it. ``narrate`` (default None):
    optional text generator given a deep copy of the report dict; its text is appended under
    "Narrative (generated)" and cannot alter the numbers."""
    rep = build_report(
        pred_row,
        mask=mask,
        spacing=spacing,
        affine=affine,
        true_row=true_row,
        ece=ece,
        calibration_note=calibration_note,
        threshold=threshold,
        indeterminate_band=indeterminate_band,
    )
    if figure_png is None and image is not None and mask is not None:
        figure_png = report_figure_png(image, mask, true_mask, present=present)
    narrative = narrate(copy.deepcopy(rep)) if narrate is not None else None
    return render_report(rep, fmt, figure_png=figure_png, figure_name=figure_name, narrative=narrative)


def report_figure_png(
    image: np.ndarray,
    pred_mask: np.ndarray,
    true_mask: np.ndarray | None = None,
    sequences: Sequence[str] = SEQUENCES,
    present: Sequence[bool] | None = None,
) -> bytes:
    """PNG of the slice with the largest predicted tumour area (else largest true area, else the
    middle slice): one grey panel per present sequence (``present`` (C,), default = channels not
    all zero; at least one panel), predicted contour red, true contour green. ``image`` (S, C, H, W)
    with channels named by ``sequences`` (default ``SEQUENCES``)."""
    img = np.asarray(image, np.float64)
    pm = np.asarray(pred_mask) > 0
    tm = np.asarray(true_mask) > 0 if true_mask is not None else None
    s = img.shape[0]
    area = pm.reshape(s, -1).sum(axis=1)
    if area.any():
        k = int(np.argmax(area))
    elif tm is not None and tm.any():
        k = int(np.argmax(tm.reshape(s, -1).sum(axis=1)))
    else:
        k = s // 2
    pres = (
        np.asarray(present, bool)
        if present is not None
        else np.abs(img).reshape(s, img.shape[1], -1).max(axis=(0, 2)) > 0
    )
    chans = [c for c in range(img.shape[1]) if pres[c]] or [0]
    plt, fig, axes = figure_grid(1, len(chans), 2.6)
    for ax, c in zip(axes[0], chans, strict=True):
        sl = img[k, c]
        lo, hi = np.percentile(sl, [1, 99]) if np.any(sl) else (0.0, 1.0)
        ax.imshow(sl, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1)
        if pm[k].any():
            ax.contour(pm[k].astype(float), levels=[0.5], colors=["#ff3030"], linewidths=0.9)
        if tm is not None and tm[k].any():
            ax.contour(tm[k].astype(float), levels=[0.5], colors=["#30ff60"], linewidths=0.9)
        name = sequences[c] if c < len(sequences) else f"c{c}"
        ax.set_title(name, fontsize=8)
        ax.axis("off")
    legend = "red: predicted" + (", green: reference" if tm is not None else "")
    fig.suptitle(f"slice {k}  ({legend})", fontsize=8)
    return png_bytes(plt, fig)
