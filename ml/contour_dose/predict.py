"""Whole-volume prediction with a trained contour + dose model, and OpenKBP submission files.

``load_model`` reads a model directory (``config.json`` + ``model_best.pt``); ``infer_slices``
runs the network over a range of stacked slices (bf16 autocast when asked, channels-last on
CUDA, optional left/right flip TTA with the parotid channels swapped back) and is also the
per-epoch validation's inference.

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

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ml.contour_dose.cache import Cache, Entry
from ml.contour_dose.models import ModelConfig, build_model
from ml.contour_dose.slices import SliceData, build_slices, make_batch
from ml.contour_dose.variants import DOSE_NORM_GY, VARIANTS, lr_swap_index, mask_channel_slices
from ml.utils.torch_utils import resolve_device

__all__ = [
    "LoadedModel",
    "forward_probs",
    "forward_raw",
    "infer_slices",
    "labels_to_masks",
    "load_model",
    "predict_cases",
    "predict_entry",
    "predict_labels",
    "predict_openkbp_dir",
]


@dataclass
class LoadedModel:
    model: torch.nn.Module
    config: dict
    model_dir: Path
    device: torch.device

    @property
    def variant(self) -> str:
        return self.config["variant"]

    @property
    def rois(self) -> tuple[str, ...]:
        return tuple(self.config["rois"])

    @property
    def inputs(self) -> tuple[str, ...]:
        """The input names the model was trained with (its ``config.json``; a variant's default may
        have changed since)."""
        return tuple(self.config.get("inputs") or ())


def load_model(model_dir: str | os.PathLike, device: str = "cpu") -> LoadedModel:
    model_dir = Path(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    model = build_model(ModelConfig.from_dict(cfg["model"]))
    dev = resolve_device(device)
    model.load_state_dict(torch.load(model_dir / "model_best.pt", map_location=dev, weights_only=True))
    model.to(dev).eval()
    return LoadedModel(model, cfg, model_dir, dev)


def predict_labels(model_dir: str | os.PathLike, entries: list[Entry], device: torch.device) -> dict[str, np.ndarray]:
    """A contour-only model's label maps for each entry (the Seq-Automated inputs)."""
    lm = load_model(model_dir, str(device))
    if "contour" not in lm.config["tasks"]:
        raise ValueError(f"{model_dir} has no contour head")
    out = {}
    for e in entries:
        data = build_slices([e], lm.rois, lm.config["ct_norm"]["mean"], lm.config["ct_norm"]["std"])
        probs = infer_slices(lm.model, data, lm.variant, 0, data.n, lm.device, inputs=lm.inputs or None)["probs"]
        out[e.patient_id] = probs.argmax(1).astype(np.uint8)
    return out


def forward_raw(model, x, device, amp, channels_last: bool | None = None):
    """The model's raw outputs (logits, normalised dose); channels-last input on CUDA by default
    (the model is converted too there), bf16 autocast when ``amp``."""
    if channels_last is None:
        channels_last = device.type == "cuda"
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        return model(x)


def forward_probs(model, x, device, amp) -> dict[str, torch.Tensor]:
    """``forward_raw`` with the contour logits turned into probabilities (fp32)."""
    out = forward_raw(model, x, device, amp)
    return {k: (torch.softmax(v.float(), 1) if k == "contour" else v.float()) for k, v in out.items()}


@torch.no_grad()
def infer_slices(
    model: torch.nn.Module,
    data: SliceData,
    variant: str,
    start: int,
    stop: int,
    device: torch.device,
    batch_size: int = 32,
    amp: bool = False,
    tta_flip: bool = False,
    inputs: tuple[str, ...] | None = None,
) -> dict[str, np.ndarray]:
    """Predict slices ``start:stop`` -> {"dose": [n,H,W] Gy (zero outside pdm), "probs": [n,K+1,H,W]}.
    ``inputs``: the model's input names (default: the variant's)."""
    rois = VARIANTS[variant]["rois"]
    perm = torch.tensor(lr_swap_index(rois), device=device)
    dose_parts, prob_parts = [], []
    was_training = model.training
    model.eval()
    for i in range(start, stop, batch_size):
        idx = torch.arange(i, min(i + batch_size, stop), device=data.ct.device)
        b = make_batch(data, idx, variant, inputs)
        x = b["x"].to(device)
        outs = [forward_probs(model, x, device, amp)]
        if tta_flip:
            xf = x.flip(-1)
            for a, bb in mask_channel_slices(variant, inputs):
                if bb - a == len(rois):
                    src = torch.tensor([perm[j + 1].item() - 1 for j in range(len(rois))], device=device) + a
                    xf = torch.cat([xf[:, :a], xf[:, src], xf[:, bb:]], 1)
            of = forward_probs(model, xf, device, amp)
            if "dose" in of:
                of["dose"] = of["dose"].flip(-1)
            if "contour" in of:
                of["contour"] = of["contour"].flip(-1)[:, perm]
            outs.append(of)
        if "dose" in outs[0]:
            d = torch.stack([o["dose"][:, 0] for o in outs]).mean(0) * DOSE_NORM_GY
            d = d * b["pdm"].to(device)
            dose_parts.append(d.cpu().numpy())
        if "contour" in outs[0]:
            p = torch.stack([o["contour"] for o in outs]).mean(0)
            prob_parts.append(p.half().cpu().numpy())
    model.train(was_training)
    res = {}
    if dose_parts:
        res["dose"] = np.concatenate(dose_parts).astype(np.float32)
    if prob_parts:
        res["probs"] = np.concatenate(prob_parts)
    return res


def predict_entry(lm: LoadedModel, entry: Entry, tta_flip: bool = False, batch_size: int = 32) -> dict[str, np.ndarray]:
    """-> {"dose": [Z,H,W] float32 Gy (if the model predicts dose), "labels": [Z,H,W] uint8 (if contours)}."""
    cfg = lm.config
    pred = None
    if "pred_masks" in cfg["inputs"]:
        pred = predict_labels(lm.model_dir / "contour_model", [entry], lm.device)
    if "gt_masks" in cfg["inputs"] and not any(n in entry.rois for n in cfg["rois"]):
        raise ValueError(f"{entry.patient_id}: Seq-Human needs clinical contours of {cfg['rois']}")
    data = build_slices([entry], lm.rois, cfg["ct_norm"]["mean"], cfg["ct_norm"]["std"], pred)
    res = infer_slices(
        lm.model,
        data,
        lm.variant,
        0,
        data.n,
        lm.device,
        batch_size=batch_size,
        amp=lm.device.type == "cuda",
        tta_flip=tta_flip,
        inputs=lm.inputs or None,
    )
    out = {}
    if "dose" in res:
        out["dose"] = entry.full(res["dose"] * entry.pdm)
    if "probs" in res:
        out["labels"] = entry.full(res["probs"].argmax(1).astype(np.uint8))
    return out


def labels_to_masks(labels: np.ndarray, rois: tuple[str, ...]) -> dict[str, np.ndarray]:
    return {name: labels == i for i, name in enumerate(rois, start=1)}


def predict_openkbp_dir(
    model_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    device: str = "auto",
    tta_flip: bool = False,
    log=print,
) -> pd.DataFrame:
    from ml.contour_dose.cache import CacheError, entry_from_openkbp
    from ml.data.openkbp import OpenKBPError, from_canonical_array, load_patient, write_sparse
    from ml.utils.io import save_npz_deterministic

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
            save_npz_deterministic(
                out_dir / "contours" / f"{pid}.npz",
                {
                    **{f"roi_{n}": np.packbits(m.reshape(-1)) for n, m in masks.items()},
                    "roi_names": np.asarray(list(masks), dtype="U16"),
                    "shape": np.asarray(dose.shape if "dose" in res else masks[lm.rois[0]].shape),
                },
            )
            row.update({f"voxels_{n}": int(m.sum()) for n, m in masks.items()})
        rows.append(row)
        log(f"predicted {pid}")
    summary = pd.DataFrame(rows)
    summary.to_csv(out_dir / "predictions.csv", index=False)
    return summary


def _natural(name: str) -> tuple[str, int]:
    stem = name.rstrip("0123456789")
    return stem, int(name[len(stem) :] or -1)


def predict_cases(
    model_dirs: dict[str, str | os.PathLike],
    cache_dir: str | os.PathLike,
    patient_ids: list[str],
    out_dir: str | os.PathLike,
    device: str = "auto",
    tta_flip: bool = False,
    log=print,
) -> pd.DataFrame:
    from ml.utils.io import save_npz_deterministic

    cache = Cache.open(cache_dir)
    out_dir = Path(out_dir)
    rows = []
    for variant, model_dir in model_dirs.items():
        lm = load_model(model_dir, device)
        for pid in patient_ids:
            entry = cache.load(pid)
            res = predict_entry(lm, entry, tta_flip=tta_flip)
            arrays = {}
            if "dose" in res:
                arrays["dose"] = res["dose"].astype(np.float32)
            if "labels" in res:
                arrays["labels"] = res["labels"]
                arrays["rois"] = np.asarray(lm.rois, dtype="U16")
            path = out_dir / variant / f"{pid}.npz"
            save_npz_deterministic(path, arrays)
            rows.append(
                {
                    "variant": variant,
                    "patient_id": pid,
                    "path": str(path),
                    "has_dose": "dose" in res,
                    "has_contours": "labels" in res,
                }
            )
        log(f"predicted {len(patient_ids)} patients with {variant}")
    return pd.DataFrame(rows)
