"""Whole-volume prediction with a trained contour + dose model, and OpenKBP submission files.

``predict_entry`` runs slice-wise inference over a patient's cached slice range and returns
full canonical volumes: dose in Gy, zero outside the possible-dose mask (the OpenKBP scoring
convention, ``domain-notes.md`` §1.1), and the label map (index i+1 = ``rois[i]``).
Seq-Automated first runs the contour-only model stored inside its directory; Seq-Human uses
the patient's clinical contours (and fails clearly when they are missing).

``predict_openkbp_dir`` (``python -m ml contour-dose predict``) reads OpenKBP ``pt_N/``
folders (dose optional), writes ``PRED_DIR/pt_N.csv`` in the submission format (sparse dose,
header ``,data``, OpenKBP axes) and ``PRED_DIR/contours/pt_N.npz`` (bit-packed masks per ROI,
OpenKBP axes), and skips unreadable patients with a reason instead of stopping.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from ml.contour_dose.cache import Entry
from ml.contour_dose.train import LoadedModel, build_slices, infer_slices, load_model, predict_labels


def predict_entry(lm: LoadedModel, entry: Entry, tta_flip: bool = False, batch_size: int = 32) -> dict[str, np.ndarray]:
    """-> {"dose": [Z,H,W] float32 Gy (if the model predicts dose), "labels": [Z,H,W] uint8 (if contours)}."""
    cfg = lm.config
    pred = None
    if "pred_masks" in cfg["inputs"]:
        pred = predict_labels(lm.model_dir / "contour_model", [entry], lm.device)
    if "gt_masks" in cfg["inputs"] and not any(n in entry.rois for n in cfg["rois"]):
        raise ValueError(f"{entry.patient_id}: Seq-Human needs clinical contours of {cfg['rois']}")
    data = build_slices([entry], lm.rois, cfg["ct_norm"]["mean"], cfg["ct_norm"]["std"], pred)
    res = infer_slices(lm.model, data, lm.variant, 0, data.n, lm.device, batch_size=batch_size,
                       amp=lm.device.type == "cuda", tta_flip=tta_flip)
    out = {}
    if "dose" in res:
        out["dose"] = entry.full(res["dose"] * entry.pdm)
    if "probs" in res:
        out["labels"] = entry.full(res["probs"].argmax(1).astype(np.uint8))
    return out


def labels_to_masks(labels: np.ndarray, rois: tuple[str, ...]) -> dict[str, np.ndarray]:
    return {name: labels == i for i, name in enumerate(rois, start=1)}


def predict_openkbp_dir(model_dir: str | os.PathLike, data_dir: str | os.PathLike, out_dir: str | os.PathLike,
                        device: str = "auto", tta_flip: bool = False, log=print) -> pd.DataFrame:
    from ml.contour_dose.cache import CacheError, entry_from_openkbp
    from ml.data.ingest import save_npz_deterministic
    from ml.data.openkbp import OpenKBPError, from_canonical_array, load_patient, write_sparse

    lm = load_model(model_dir, device)
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    folders = sorted((p for p in data_dir.iterdir() if p.is_dir()), key=lambda p: _natural(p.name))
    if not folders:
        raise FileNotFoundError(f"no patient folders under {data_dir}")
    for folder in folders:
        pid = folder.name
        try:
            patient = load_patient(folder, require_dose=False)
            entry = entry_from_openkbp(pid, patient)
            res = predict_entry(lm, entry, tta_flip=tta_flip)
        except (OpenKBPError, CacheError, ValueError) as exc:
            rows.append({"patient_id": pid, "status": "skipped", "reason": str(exc)})
            log(f"skipped {pid}: {exc}")
            continue
        row = {"patient_id": pid, "status": "ok", "reason": ""}
        if "dose" in res:
            dose = from_canonical_array(res["dose"])
            write_sparse(out_dir / f"{pid}.csv", dose, mask=patient.possible_dose_mask)
            row["max_dose_gy"] = float(dose.max())
        if "labels" in res:
            masks = {n: from_canonical_array(m) for n, m in labels_to_masks(res["labels"], lm.rois).items()}
            save_npz_deterministic(out_dir / "contours" / f"{pid}.npz",
                                   {**{f"roi_{n}": np.packbits(m.reshape(-1)) for n, m in masks.items()},
                                    "roi_names": np.asarray(list(masks), dtype="U16"),
                                    "shape": np.asarray(dose.shape if "dose" in res else masks[lm.rois[0]].shape)})
            row.update({f"voxels_{n}": int(m.sum()) for n, m in masks.items()})
        rows.append(row)
        log(f"predicted {pid}")
    summary = pd.DataFrame(rows)
    summary.to_csv(out_dir / "predictions.csv", index=False)
    return summary


def _natural(name: str) -> tuple[str, int]:
    stem = name.rstrip("0123456789")
    return stem, int(name[len(stem):] or -1)
