"""Patient-level cross-validation folds for the glioma family, stratified on IDH x 1p/19q.

Stratum of a patient: ``"<idh>/<codel>"`` with each part the vocabulary string (``WT``,
``Mutant``; ``non-codel``, ``codel``) or ``unknown`` (so an unknown label is its own stratum,
e.g. ``unknown/non-codel``). Labels may be given as the lake's strings (``glioma_labels``) or as
``ml.glioma.data.read_labels``' integer codes (-1 = unknown).

A patient with no known label at all (histology, grade, IDH and 1p/19q all unknown: the
unlabelled pool, e.g. brain-mri-samples) gets fold ``-1``. Inside each stratum (strata in sorted
order) patients are ordered by a keyed hash of (seed, patient_id), so the result does not depend
on row order, and dealt round-robin; the dealing continues where the previous stratum stopped, so
every stratum is balanced across folds to within one patient and fold sizes are too.
"""

from __future__ import annotations

import hashlib

import pandas as pd

from ml.glioma.data import TASKS

__all__ = ["UNLABELLED_FOLD", "cv_folds", "strata"]

UNLABELLED_FOLD = -1


def _as_label(value, task: str) -> str:
    """A label value (string or int code) as its vocabulary string, or ``unknown``."""
    if value is None or (isinstance(value, float) and value != value) or value is pd.NA:
        return "unknown"
    vocab = TASKS[task]
    if isinstance(value, int | float) and not isinstance(value, bool):
        code = int(value)
        return vocab[code] if 0 <= code < len(vocab) else "unknown"
    text = str(value).strip()
    if text.lstrip("-").isdigit():
        return _as_label(int(text), task)
    lower = {v.lower(): v for v in vocab}
    return lower.get(text.lower(), "unknown")


def strata(labels: pd.DataFrame) -> pd.DataFrame:
    """-> DataFrame(patient_id, stratum, labelled) for every row of ``labels``."""
    cols = {t: labels[t] if t in labels.columns else pd.Series([None] * len(labels), index=labels.index) for t in TASKS}
    known = {t: [_as_label(v, t) for v in cols[t]] for t in TASKS}
    labelled = [any(known[t][i] != "unknown" for t in TASKS) for i in range(len(labels))]
    return pd.DataFrame(
        {
            "patient_id": labels["patient_id"].astype(str).to_numpy(),
            "stratum": [f"{i}/{c}" for i, c in zip(known["idh"], known["codel"], strict=True)],
            "labelled": labelled,
        }
    )


def _h(patient_id: str, seed: int) -> str:
    return hashlib.sha256(f"glioma-cv:{seed}:{patient_id}".encode()).hexdigest()


def cv_folds(labels: pd.DataFrame, n_folds: int = 5, seed: int = 0) -> pd.DataFrame:
    """-> DataFrame(patient_id, fold, stratum) sorted by patient_id: folds 0..n_folds-1 for
    labelled patients, ``UNLABELLED_FOLD`` (-1) for the unlabelled pool. Deterministic in
    (patient ids, labels, n_folds, seed)."""
    if n_folds < 2:
        raise ValueError(f"n_folds must be >= 2, got {n_folds}")
    st = strata(labels)
    if st["patient_id"].duplicated().any():
        raise ValueError("labels has duplicate patient_id rows: folds are patient-level")
    fold = dict.fromkeys(st["patient_id"], UNLABELLED_FOLD)
    dealt = 0
    lab = st[st["labelled"]]
    for _, group in sorted(lab.groupby("stratum"), key=lambda kv: kv[0]):
        for pid in sorted(group["patient_id"], key=lambda p: _h(p, seed)):
            fold[pid] = dealt % n_folds
            dealt += 1
    out = st[["patient_id", "stratum"]].copy()
    out["fold"] = out["patient_id"].map(fold).astype("int64")
    return out[["patient_id", "fold", "stratum"]].sort_values("patient_id", kind="stable").reset_index(drop=True)
