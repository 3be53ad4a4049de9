"""ml.glioma.report: WHO CNS5 mapping, tumour location, the templated patient report (md/html),
its figure and the narrative hook."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from ml.glioma.report import (
    DISCLAIMER,
    build_report,
    patient_report,
    report_figure_png,
    tumour_location,
    who_cns5,
)

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("idh", "codel", "expected"),
    [
        (True, True, "Oligodendroglioma, IDH-mutant and 1p/19q-codeleted"),
        (True, False, "Astrocytoma, IDH-mutant"),
        (True, None, "Not determinable"),
        (None, True, "Not determinable"),
        (None, False, "Not determinable"),
        (None, None, "Not determinable"),
    ],
)
def test_who_cns5_mutant_and_uncertain(idh, codel, expected):
    assert who_cns5(idh, codel).startswith(expected)


@pytest.mark.parametrize("codel", [True, False, None])
def test_who_cns5_wildtype(codel):
    text = who_cns5(False, codel)
    assert "glioblastoma, IDH-wildtype" in text and "further molecular testing" in text
    assert "TERT" in text and "EGFR" in text and "+7/-10" in text and "lower-grade" in text
    assert ("inconsistent" in text) == (codel is True)


def _mask(shape=(10, 32, 32)):
    m = np.zeros(shape, np.uint8)
    m[6:9, 4:10, 3:9] = 1  # upper slices, top rows, left columns
    return m


def test_tumour_location_image_sides_and_affine():
    loc = tumour_location(_mask())
    assert not loc["orientation_known"] and "image sides" in loc["note"]
    assert loc["lr"] == "image-left" and loc["ap"].startswith("anterior") and loc["si"].startswith("superior")
    assert loc["slice_frac"] == pytest.approx(7.5 / 10) and loc["col_frac"] == pytest.approx(
        6.0 / 32
    )  # columns 3..8: centroid 5.5
    # LPS-like affine: x = -column, y = -row, z = slice (mm): low column index = patient right
    aff = np.array([[0, 0, -1.0, 0], [0, -1.0, 0, 0], [2.0, 0, 0, 0], [0, 0, 0, 1]])
    loc = tumour_location(_mask(), affine=aff)
    assert loc["orientation_known"] and loc["lr"] == "right" and loc["ap"] == "anterior"
    assert loc["si"] == "superior" and loc["centroid_ras_mm"][2] == pytest.approx(14.0)
    assert tumour_location(np.zeros((2, 4, 4)))["empty"]


def _row(**kw):
    row = {
        "patient_id": "TCGA-XX-0001",
        "fold": -1,
        "p_idh_mutant": 0.87,
        "p_codel": 0.12,
        "p_grade_g3": 0.64,
        "p_astrocytoma": 0.61,
        "p_oligoastrocytoma": 0.25,
        "p_oligodendroglioma": 0.14,
        "u_idh": 0.031,
        "u_codel": 0.052,
        "u_grade": 0.118,
        "u_histology": 0.09,
        "tumour_voxels": 999,
    }
    row.update(kw)
    return row


def test_markdown_report_numbers_who_and_disclaimer():
    md = patient_report(
        _row(),
        mask=_mask(),
        true_row={"idh": 1, "codel": 0, "grade": -1, "histology": "astrocytoma"},
        ece={"idh": 0.05},
    )
    for s in ("0.870", "0.031", "0.120", "0.640", "0.118", "0.610", "Mutant", "non-codel", "G3", "astrocytoma"):
        assert s in md, s
    assert "Astrocytoma, IDH-mutant" in md
    assert f"{int(_mask().sum())} voxels" in md and "not mm^3" in md  # mask wins over tumour_voxels
    assert "image-left" in md and "not patient sides" in md
    assert "temperature-scaled" in md and "idh 0.050" in md
    assert "True labels (for review)" in md and "WHO grade: unknown" in md
    assert DISCLAIMER in md and "not a diagnosis" in md
    assert "## Figure" not in md and "Narrative" not in md


def test_report_volume_mm3_uncertain_who_and_no_mask():
    rep = build_report(_row(p_idh_mutant=0.55), mask=_mask(), spacing=(2.0, 0.5, 0.5))
    assert rep["volume"]["mm3"] == pytest.approx(_mask().sum() * 0.5)
    assert rep["who_cns5"].startswith("Not determinable")
    assert rep["predictions"]["idh"]["call"] == "Mutant"  # the 0.5 call is still shown
    rep = build_report(_row(p_codel=0.91))
    assert rep["who_cns5"].startswith("Oligodendroglioma") and rep["volume"]["voxels"] == 999
    assert rep["location"] is None
    md = patient_report(_row(p_idh_mutant=0.2), spacing=(1.0, 1.0, 1.0))
    assert "glioblastoma, IDH-wildtype" in md and "999 mm^3" in md


def test_html_embeds_png_and_narrative_cannot_change_numbers():
    png = report_figure_png(np.random.default_rng(0).random((10, 4, 32, 32)), _mask(), true_mask=_mask())
    assert png.startswith(PNG)

    def narrate(rep: dict) -> str:
        rep["predictions"]["idh"]["p_positive"] = 0.01  # tampering with its copy has no effect
        return f"Model favours {rep['who_cns5']}."

    page = patient_report(_row(), mask=_mask(), figure_png=png, fmt="html", narrate=narrate)
    assert page.startswith("<!DOCTYPE html>")
    assert f"data:image/png;base64,{base64.b64encode(png).decode()}" in page
    assert "Narrative (generated)" in page and "Model favours Astrocytoma, IDH-mutant." in page
    assert "0.870" in page and "0.010" not in page
    md = patient_report(_row(), mask=_mask(), figure_png=png, figure_name="TCGA-XX-0001.png")
    assert "![tumour overlay](TCGA-XX-0001.png)" in md
    # figure drawn from the image when none is given; absent sequences are not drawn
    img = np.zeros((10, 4, 32, 32))
    img[:, 0] = 1.0
    img[5, 0, 10:20, 10:20] = 3.0
    page = patient_report(_row(), mask=_mask(), image=img, fmt="html")
    assert "data:image/png;base64," in page
    with pytest.raises(ValueError):
        patient_report(_row(), fmt="pdf")
