"""Column descriptions of the lake tables (psqa_pipelines.lib.column_docs): every column a table has
is described, by a literal entry or a name pattern, and the IO manager's TableSchema carries them.

``data/lake_columns.txt`` lists every column name of every table of a full demo run's lake
(``lake/tables``, one name per line, sorted); regenerate it from a fresh demo lake when tables change.
The columns the code declares (the ``*_COLUMNS`` constants) and the glioma summary tables built from
synthetic predictions are checked too, so a new column cannot slip through undocumented."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from psqa_pipelines.lib.column_docs import COLUMN_DOCS, COLUMN_PATTERNS, describe_column
from psqa_pipelines.resources.parquet_io import table_schema

LAKE_COLUMNS = Path(__file__).parent / "data" / "lake_columns.txt"


def _undescribed(names) -> list[str]:
    return sorted(n for n in set(names) if not describe_column(n))


def test_every_column_of_the_demo_lake_is_described():
    names = LAKE_COLUMNS.read_text(encoding="utf-8").splitlines()
    assert len(names) >= 272, "the committed column list lost names"
    assert names == sorted(set(names)), "lake_columns.txt must be sorted and free of duplicates"
    assert _undescribed(names) == []


def test_columns_the_code_declares_are_described():
    from ml.contour_dose.lake import CASE_COLUMNS
    from ml.data.ingest import FILE_COLUMNS, SERIES_COLUMNS
    from ml.data.preprocess import MANIFEST_COLUMNS
    from ml.data.quarantine import QUARANTINE_COLUMNS
    from ml.glioma.data import PRED_COLUMNS
    from ml.glioma.lake import LABEL_TABLE_COLUMNS as GLIOMA_LABEL_COLUMNS
    from ml.glioma.lake import MANIFEST_COLUMNS as GLIOMA_MANIFEST_COLUMNS
    from ml.psqa.complexity import BEAM_METRICS, PLAN_METRICS
    from ml.psqa.qa_results import QA_TABLE_COLUMNS
    from psqa_pipelines.defs.contour_dose.training import MODEL_ROW_COLUMNS as CD_MODEL_COLUMNS
    from psqa_pipelines.defs.glioma.training import MODEL_ROW_COLUMNS as GLIOMA_MODEL_COLUMNS
    from psqa_pipelines.defs.glioma.training import OOF_EXTRA_COLUMNS
    from psqa_pipelines.defs.lake.assets import STUDY_COLUMNS
    from psqa_pipelines.defs.psqa.assets import AGREEMENT_COLUMNS, LABEL_TABLE_COLUMNS, PLANES_COLUMNS
    from psqa_pipelines.defs.psqa.training import MODEL_ROW_COLUMNS as PSQA_MODEL_COLUMNS

    declared = [
        *CASE_COLUMNS,
        *FILE_COLUMNS,
        *SERIES_COLUMNS,
        *MANIFEST_COLUMNS,
        *QUARANTINE_COLUMNS,
        *PRED_COLUMNS,
        *(f"raw_{c}" for c in PRED_COLUMNS),
        *GLIOMA_LABEL_COLUMNS,
        *GLIOMA_MANIFEST_COLUMNS,
        *BEAM_METRICS,
        *PLAN_METRICS,
        *QA_TABLE_COLUMNS,
        *CD_MODEL_COLUMNS,
        *GLIOMA_MODEL_COLUMNS,
        *OOF_EXTRA_COLUMNS,
        *STUDY_COLUMNS,
        *AGREEMENT_COLUMNS,
        *LABEL_TABLE_COLUMNS,
        *PLANES_COLUMNS,
        *PSQA_MODEL_COLUMNS,
    ]
    assert len(set(declared)) > 150
    assert _undescribed(declared) == []


def _oof(ids, y, score, dice, raw=True):
    from ml.glioma.data import PRED_COLUMNS

    df = pd.DataFrame({"patient_id": ids, "fold": 0, "dice": dice})
    for c in PRED_COLUMNS:
        df[c] = 0.5
        if raw:
            df[f"raw_{c}"] = 0.5
    df["p_idh_mutant"] = score
    return df


def test_glioma_ablation_and_missing_modality_columns_are_described():
    """The tables ml.glioma.selection builds today (ECE before/after temperature, paired delta CIs and
    p-values), from a few synthetic out-of-fold predictions."""
    from ml.glioma.selection import ablation_table, missing_modality_table

    rng = np.random.default_rng(0)
    n = 16
    ids = [f"P{i:02d}" for i in range(n)]
    y = np.arange(n) % 2
    labels = pd.DataFrame({"patient_id": ids, "idh": y, "codel": -1, "grade": -1, "histology": -1})
    good = np.clip(0.5 + 0.3 * (2 * y - 1) + rng.normal(0, 0.1, n), 0, 1)
    dice = rng.uniform(0.5, 0.9, n)
    oofs = {"gmmas": _oof(ids, y, good, dice), "no_cutmix": _oof(ids, y, rng.uniform(0, 1, n), dice - 0.05)}
    ablation = ablation_table(oofs, labels, n_boot=20)
    missing = _oof(ids, y, good, dice - 0.1).assign(removed="flair")
    mm = missing_modality_table(oofs["gmmas"], missing, labels, n_boot=20)
    columns = [*ablation.columns, *mm.columns, "cv_run_id"]
    for expected in ("ece_raw_idh", "ece_histology", "delta_dice_mean_lo", "delta_auc_codel_p", "removed"):
        assert expected in columns
    assert _undescribed(columns) == []


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("auc_idh", ("AUC", "idh", "OOF")),
        ("auc_lo_histology", ("lower bound", "auc_histology")),
        ("bacc_grade", ("balanced accuracy", "grade")),
        ("ece_raw_codel", ("calibration", "codel", "before")),
        ("delta_auc_codel", ("auc_codel", "reference")),
        ("delta_auc_codel_lo", ("lower bound", "delta_auc_codel")),
        ("delta_dice_mean_hi", ("upper bound", "delta_dice_mean")),
        ("delta_auc_grade_p", ("p-value", "delta_auc_grade")),
        ("p_oligodendroglioma", ("probability", "oligodendroglioma")),
        ("raw_p_idh_mutant", ("before calibration", "idh_mutant")),
        ("u_histology", ("MC-dropout", "histology")),
        ("gpr_3_2", ("gamma passing rate", "3%/2mm")),
        ("sas_10", ("10 mm",)),
        ("MAE 2%/3mm", ("MAE", "2%/3mm")),
        ("spec (2%/2mm)", ("specificity", "2%/2mm")),
        ("champion_mae_2_2", ("champion", "2%/2mm")),
        ("spacing_z", ("mm", "z")),
        ("n_val", ("val split",)),
    ],
)
def test_pattern_columns(name, words):
    assert name not in COLUMN_DOCS
    text = describe_column(name)
    assert text and all(w in text for w in words), text


@pytest.mark.parametrize(
    "name", ["no_such_column", "auc_survival", "p_glioblastoma", "delta_auc_idh_ci", "gpr_x_y", ""]
)
def test_unknown_columns_are_not_described(name):
    assert describe_column(name) is None


def test_literal_entries_win_and_do_not_duplicate_patterns():
    assert describe_column("study_key") == COLUMN_DOCS["study_key"]
    overlap = [k for k in COLUMN_DOCS for pattern, _ in COLUMN_PATTERNS if pattern.fullmatch(k)]
    assert overlap == [], "a literal entry that a pattern also describes: keep one of them"
    texts = [*COLUMN_DOCS.values(), *(t for _, t in COLUMN_PATTERNS)]
    assert all(t.strip() and "\n" not in t and len(t) <= 120 for t in texts)


def test_table_schema_carries_the_descriptions():
    df = pd.DataFrame({"study_key": ["dcm-1"], "auc_idh": [0.8], "gpr_2_2": [97.5], "mystery": [1]})
    cols = {c.name: c for c in table_schema(df).columns}
    assert list(cols) == ["study_key", "auc_idh", "gpr_2_2", "mystery"]
    assert cols["study_key"].description == COLUMN_DOCS["study_key"]
    assert cols["auc_idh"].description == describe_column("auc_idh")
    assert "2%/2mm" in cols["gpr_2_2"].description and cols["gpr_2_2"].type == "double"
    assert cols["mystery"].description is None
