"""Glioma MRI data in the shared layout (the CLI's ``--data DIR``): readers, vocabularies, checks.

Layout (the one ``../shared/datasets/lgg-mri`` has, and what ``ml.glioma.lake.export_training_dir``
writes from the lake):

* ``DIR/patients/<patient_id>.npz`` -- ``image`` (S, C, H, W): either the lgg-mri release (uint8,
  C = 3: 0 pre-contrast T1, 1 FLAIR, 2 post-contrast T1) or the model order (C = 4, float, with a
  bool array ``present`` (4,)); ``mask`` uint8 (S, H, W) 0/1 (optional: unlabelled or inference
  cases); ``slice_index`` (optional); ``spacing`` (3,) mm, NaN when unknown (optional).
* ``DIR/labels.csv`` (optional) -- ``patient_id, histology, grade, idh_status,
  codeletion_1p19q, missing_sequences`` (lgg-mri's columns; empty = unknown).

Model input order is GMMAS / BraTS: ``SEQUENCES = (flair, t1c, t1, t2)``. lgg-mri maps
pre-contrast -> t1, FLAIR -> flair, post-contrast -> t1c; T2 is absent for every patient, and
a sequence named in ``missing_sequences`` (the source filled the channel with a FLAIR copy) is
absent too. An absent sequence is all zeros with ``present = False``: the model zeroes its fusion
weight (never an error).

Intensities ([I], the nnU-Net / MTTU-Net scheme): per patient and sequence, z-score over the
voxels where that sequence is non-zero (background stays 0). lgg-mri intensities are already
windowed to 0-255 by the dataset authors; the z-score makes them comparable with raw 3D MRI.

Bad input never stops a run: ``load_dataset`` returns the readable patients and one issue record
per problem (corrupt npz, mask of another shape, wrong channel count, label outside the
vocabulary -> that label unknown).
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = [
    "LABEL_COLUMNS",
    "LGG_CHANNELS",
    "LGG_MISSING",
    "PRED_COLUMNS",
    "SEQUENCES",
    "TASKS",
    "Dataset",
    "Patient",
    "label_codes",
    "load_dataset",
    "load_patient",
    "read_labels",
]

SEQUENCES = ("flair", "t1c", "t1", "t2")
#: lgg-mri channel -> sequence
LGG_CHANNELS = {0: "t1", 1: "flair", 2: "t1c"}
LGG_MISSING = {"pre-contrast": "t1", "post-contrast": "t1c"}
TASKS: dict[str, tuple[str, ...]] = {
    "histology": ("astrocytoma", "oligoastrocytoma", "oligodendroglioma"),
    "grade": ("G2", "G3"),
    "idh": ("WT", "Mutant"),
    "codel": ("non-codel", "codel"),
}
#: labels.csv column of each task
LABEL_COLUMNS = {"histology": "histology", "grade": "grade", "idh": "idh_status", "codel": "codeletion_1p19q"}
PRED_COLUMNS = [
    "p_idh_mutant",
    "p_codel",
    "p_grade_g3",
    "p_oligodendroglioma",
    "p_astrocytoma",
    "p_oligoastrocytoma",
]


@dataclass
class Patient:
    patient_id: str
    image: np.ndarray  # float32 (S, 4, H, W), SEQUENCES order, z-scored, absent sequences 0
    present: np.ndarray  # bool (4,)
    mask: np.ndarray | None  # uint8 (S, H, W) or None
    slice_index: np.ndarray  # (S,)
    spacing: np.ndarray  # (3,) mm (row, col, slice), NaN unknown
    labels: dict[str, int] = field(default_factory=dict)  # task -> code, -1 unknown

    @property
    def n_slices(self) -> int:
        return int(self.image.shape[0])


@dataclass
class Dataset:
    patients: list[Patient]
    labels: pd.DataFrame  # patient_id + task codes (-1 unknown)
    issues: list[dict]

    def ids(self) -> list[str]:
        return [p.patient_id for p in self.patients]

    def by_id(self) -> dict[str, Patient]:
        return {p.patient_id: p for p in self.patients}


def _issue(patient_id: str, reason: str, detail: str, action: str) -> dict:
    return {"patient_id": patient_id, "reason": reason, "detail": detail, "action": action}


def read_labels(path: str | os.PathLike) -> tuple[pd.DataFrame, list[dict]]:
    """``labels.csv`` -> (patient_id, histology, grade, idh, codel codes (-1 unknown),
    missing_sequences) and issues (values outside the vocabulary become unknown, duplicate
    patients keep the first row)."""
    raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    if "patient_id" not in raw.columns:
        raise ValueError(f"{path}: no patient_id column")
    issues = []
    dup = raw["patient_id"].duplicated()
    for pid in raw.loc[dup, "patient_id"]:
        issues.append(_issue(pid, "duplicate_label_row", "later rows ignored", "kept first row"))
    raw = raw.loc[~dup].reset_index(drop=True)
    out = pd.DataFrame({"patient_id": raw["patient_id"].str.strip()})
    for task, col in LABEL_COLUMNS.items():
        vocab = TASKS[task]
        lower = {v.lower(): i for i, v in enumerate(vocab)}
        codes = []
        for pid, v in zip(out["patient_id"], raw[col] if col in raw.columns else [""] * len(raw), strict=True):
            v = (v or "").strip()
            if not v:
                codes.append(-1)
            elif v.lower() in lower:
                codes.append(lower[v.lower()])
            else:
                codes.append(-1)
                issues.append(
                    _issue(pid, "label_outside_vocabulary", f"{col}={v!r} not in {list(vocab)}", "label unknown")
                )
        out[task] = np.asarray(codes, dtype=np.int64)
    out["missing_sequences"] = raw["missing_sequences"] if "missing_sequences" in raw.columns else ""
    return out, issues


def label_codes(labels: pd.DataFrame, patient_id: str) -> dict[str, int]:
    row = labels.loc[labels["patient_id"] == patient_id]
    if row.empty:
        return dict.fromkeys(TASKS, -1)
    return {t: int(row.iloc[0][t]) for t in TASKS}


def _zscore(image: np.ndarray, present: np.ndarray) -> np.ndarray:
    out = np.zeros(image.shape, np.float32)
    for c in range(image.shape[1]):
        if not present[c]:
            continue
        v = image[:, c].astype(np.float32)
        fg = v > 0
        if fg.sum() < 10:
            continue
        mu, sd = float(v[fg].mean()), float(v[fg].std())
        out[:, c] = np.where(fg, (v - mu) / max(sd, 1e-6), 0.0)
    return out


def load_patient(path: str | os.PathLike, missing_sequences: str = "") -> Patient:
    """One ``patients/<id>.npz`` -> :class:`Patient` (z-scored, model order). Raises ValueError
    with the reason for unreadable or inconsistent files (``load_dataset`` turns it into an issue)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"corrupt_npz: {type(e).__name__}: {e}") from None
    if "image" not in arrays:
        raise ValueError("corrupt_npz: no 'image' array")
    img = arrays["image"]
    if img.ndim != 4:
        raise ValueError(f"bad_image_shape: image must be (S, C, H, W), got {img.shape}")
    s, c, h, w = img.shape
    if c == 3:
        full = np.zeros((s, 4, h, w), img.dtype)
        present = np.zeros(4, bool)
        missing = {LGG_MISSING.get(m.strip(), m.strip()) for m in str(missing_sequences or "").split(";") if m.strip()}
        for ch, seq in LGG_CHANNELS.items():
            if seq in missing:
                continue
            full[:, SEQUENCES.index(seq)] = img[:, ch]
            present[SEQUENCES.index(seq)] = True
    elif c == 4:
        full = img
        present = arrays["present"].astype(bool) if "present" in arrays else np.ones(4, bool)
        if present.shape != (4,):
            raise ValueError(f"bad_present: 'present' must have 4 entries, got {present.shape}")
    else:
        raise ValueError(f"bad_channel_count: image has {c} channels (3 lgg-mri or 4 {SEQUENCES} expected)")
    present = present & (np.abs(full).reshape(s, 4, -1).max(axis=(0, 2)) > 0)
    if not present.any():
        raise ValueError("no_sequence: every sequence is empty")
    mask = arrays.get("mask")
    if mask is not None:
        if mask.shape != (s, h, w):
            raise ValueError(f"mask_shape_mismatch: mask {mask.shape} vs image slices {(s, h, w)}")
        mask = (mask > 0).astype(np.uint8)
    spacing = arrays.get("spacing")
    spacing = np.asarray(spacing, np.float64) if spacing is not None else np.full(3, np.nan)
    return Patient(
        patient_id=path.stem,
        image=_zscore(full, present),
        present=present,
        mask=mask,
        slice_index=arrays.get("slice_index", np.arange(1, s + 1)),
        spacing=spacing,
    )


def load_dataset(
    data_dir: str | os.PathLike, patient_ids: list[str] | None = None, require_mask: bool = False
) -> Dataset:
    """Every readable patient of a shared-layout directory (``patient_ids``: a subset, in that
    order) with its label codes; unreadable or inconsistent patients become issue records."""
    root = Path(data_dir)
    pdir = root / "patients"
    if not pdir.is_dir():
        raise FileNotFoundError(f"{pdir} not found: a glioma data dir holds patients/<id>.npz")
    issues: list[dict] = []
    if (root / "labels.csv").exists():
        labels, issues = read_labels(root / "labels.csv")
    else:
        labels = pd.DataFrame({"patient_id": pd.Series([], dtype=str), **{t: [] for t in TASKS}})
        labels["missing_sequences"] = ""
    files = {p.stem: p for p in sorted(pdir.glob("*.npz"))}
    ids = patient_ids if patient_ids is not None else sorted(files)
    missing_seq = dict(zip(labels["patient_id"], labels["missing_sequences"], strict=True))
    patients = []
    for pid in ids:
        if pid not in files:
            issues.append(_issue(pid, "missing_file", f"{pdir / (pid + '.npz')} not found", "patient skipped"))
            continue
        try:
            p = load_patient(files[pid], missing_seq.get(pid, ""))
        except ValueError as e:
            reason, _, detail = str(e).partition(": ")
            issues.append(_issue(pid, reason, detail, "patient skipped"))
            continue
        if require_mask and p.mask is None:
            issues.append(_issue(pid, "no_mask", "no tumour mask", "patient skipped"))
            continue
        p.labels = label_codes(labels, pid)
        patients.append(p)
    known = {p.patient_id for p in patients}
    for pid in sorted(set(labels["patient_id"]) - set(files)):
        issues.append(_issue(pid, "label_without_image", "labels.csv row with no npz", "row ignored"))
    labels = labels.loc[labels["patient_id"].isin(known)].reset_index(drop=True)
    return Dataset(patients=patients, labels=labels, issues=issues)
