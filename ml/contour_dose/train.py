"""One trainer for the contour + dose family (seed 002, spec §B.2-B.6) and the product model.

Variants (``VARIANTS``):

================  ==========  ===================================  ======================
variant           arch        input channels                       outputs
================  ==========  ===================================  ======================
dose-only         U-Net       CT                                   dose (the "Baseline")
contour-only      U-Net       CT                                   4 ROI labels ("DL-Baseline")
seq-human         U-Net       CT + 4 clinical ROI masks            dose
seq-automated     U-Net       CT + 4 contour-only predicted masks  dose
multi-automated   CTAN        CT                                   dose + 4 ROI labels
product           CTAN        3 CT slices (2.5D) + PTV dose map    dose + 7 OAR labels
                              (Rx/70 inside each PTV) + pdm
================  ==========  ===================================  ======================

The paper's ROIs are Brainstem, SpinalCord, LeftParotid, RightParotid (overlaps resolved by
that priority order when building the label map); the product model contours all 7 OpenKBP
OARs. Dose is normalised by 70 Gy. CT: HU clipped to [-1024, 1500] and z-scored with the
training patients' statistics ([I]: the spec's reported 85.18 / 282.26 come from a different
offset convention; ours are stored in ``config.json``).

Training (spec §B.6, [I] where silent): Adam, lr 1e-4, weight decay 1e-5, batch 8 (paper's
OpenKBP setting); cosine decay over the planned epochs; DWA for the two-task models; model
selection on the validation loss (dose L1 + combo loss, unweighted). Augmentation [I]: rotation
within +-10 deg and shifts within +-8 px (p = 0.5), left/right flips (p = 0.5) with the parotid
labels (and parotid input masks) swapped. bf16 autocast and channels-last on CUDA (channels-last
stays off on the CPU: torch 2.13's oneDNN aborts in the backward of an NHWC 1x1 stride-2
convolution with few input channels, oneDNN issue #6035, reproduced here with our width-8 skips),
deterministic seeds, a checkpoint after every epoch (``checkpoint.pt``, resumed automatically
when the configuration matches), a ``max_minutes`` budget, and per-epoch validation on whole
volumes (dose score in Gy inside the possible-dose mask, Dice per ROI).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ml.contour_dose.cache import PRESCRIPTIONS, Cache, Entry
from ml.contour_dose.losses import DWA, combo_loss, masked_l1
from ml.contour_dose.models import ModelConfig, WidthsConfig, build_model, n_parameters
from ml.data.roi_names import OARS
from ml.utils.torch_utils import (
    matching_checkpoint,
    resolve_device,
    restore_training,
    save_checkpoint,
    set_seed,
    stop_reason,
)

DOSE_NORM_GY = 70.0
HU_CLIP = (-1024.0, 1500.0)
PAPER_ROIS = ("Brainstem", "SpinalCord", "LeftParotid", "RightParotid")
PRODUCT_ROIS = ("SpinalCord", "Brainstem", "Mandible", "Larynx", "Esophagus", "LeftParotid", "RightParotid")
LR_PAIRS = (("LeftParotid", "RightParotid"),)

VARIANTS: dict[str, dict] = {
    "dose-only": {"arch": "unet", "inputs": ("ct",), "tasks": ("dose",), "rois": PAPER_ROIS},
    "contour-only": {"arch": "unet", "inputs": ("ct",), "tasks": ("contour",), "rois": PAPER_ROIS},
    "seq-human": {"arch": "unet", "inputs": ("ct", "gt_masks"), "tasks": ("dose",), "rois": PAPER_ROIS},
    "seq-automated": {"arch": "unet", "inputs": ("ct", "pred_masks"), "tasks": ("dose",), "rois": PAPER_ROIS},
    "multi-automated": {"arch": "ctan", "inputs": ("ct",), "tasks": ("dose", "contour"), "rois": PAPER_ROIS},
    "product": {"arch": "ctan", "inputs": ("ct3", "ptv", "pdm"), "tasks": ("dose", "contour"),
                "rois": PRODUCT_ROIS},
}
MODEL_NAMES = {"dose-only": "Baseline", "contour-only": "DL-Baseline", "seq-human": "Seq-Human",
               "seq-automated": "Seq-Automated", "multi-automated": "Multi-Automated", "product": "Product"}


@dataclass
class TrainConfig(WidthsConfig):
    variant: str = "multi-automated"
    epochs: int = 100
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 1e-5
    steps_per_epoch: int | None = None  # None: one pass over the training slices
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"  # auto (bf16 on CUDA) | bf16 (any device; 1.6-1.9x on an AVX512-BF16 CPU) | off
    max_minutes: float | None = None
    patience: int = 20
    augment: bool = True
    dwa: bool = True
    dwa_temperature: float = 2.0
    widths: tuple[int, ...] = (32, 64, 128, 256, 512)
    ctab: bool = True
    ctae: bool = True
    val_patients: int | None = None  # cap on validation volumes per epoch (None: all)
    contour_model: str | None = None  # seq-automated: a trained contour-only model dir
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------
def label_map(rois: dict[str, np.ndarray], names: tuple[str, ...], shape) -> np.ndarray:
    """Priority label map: index i+1 for names[i]; earlier names win overlaps."""
    out = np.zeros(shape, dtype=np.uint8)
    for i in range(len(names) - 1, -1, -1):
        m = rois.get(names[i])
        if m is not None:
            out[m] = i + 1
    return out


def ptv_map(rois: dict[str, np.ndarray], shape) -> np.ndarray:
    out = np.zeros(shape, dtype=np.float32)
    for name, rx in PRESCRIPTIONS.items():
        m = rois.get(name)
        if m is not None:
            out = np.maximum(out, m * (rx / DOSE_NORM_GY))
    return out


def normalise_ct(ct_hu: np.ndarray, mean: float, std: float) -> np.ndarray:
    return ((np.clip(ct_hu.astype(np.float32), *HU_CLIP) - mean) / std).astype(np.float32)


@dataclass
class SliceData:
    """Every slice of a set of patients, stacked (CPU tensors, or on the GPU when it fits)."""

    ct: torch.Tensor  # [N, H, W] float16, normalised
    label: torch.Tensor  # [N, H, W] uint8
    dose: torch.Tensor  # [N, H, W] float16 (dose / 70), zeros without dose
    pdm: torch.Tensor  # [N, H, W] bool
    ptv: torch.Tensor  # [N, H, W] float16
    pred_label: torch.Tensor | None  # seq-automated
    prev: torch.Tensor  # [N] index of the slice below (same patient, clamped)
    next: torch.Tensor  # [N] index of the slice above
    patient_slices: list[tuple[str, int, int]]  # (patient_id, start, stop)

    def to(self, device: torch.device) -> SliceData:
        mv = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return SliceData(**mv)

    @property
    def n(self) -> int:
        return int(self.ct.shape[0])


def build_slices(entries: list[Entry], rois: tuple[str, ...], ct_mean: float, ct_std: float,
                 pred_labels: dict[str, np.ndarray] | None = None) -> SliceData:
    cts, labels, doses, pdms, ptvs, preds, prev, nxt, spans = [], [], [], [], [], [], [], [], []
    start = 0
    for e in entries:
        n = e.n_slices
        shape = e.ct.shape
        cts.append(normalise_ct(e.ct, ct_mean, ct_std).astype(np.float16))
        labels.append(label_map(e.rois, rois, shape))
        doses.append((e.dose / DOSE_NORM_GY).astype(np.float16) if e.dose is not None
                     else np.zeros(shape, np.float16))
        pdms.append(e.pdm)
        ptvs.append(ptv_map(e.rois, shape).astype(np.float16))
        if pred_labels is not None:
            preds.append(pred_labels[e.patient_id])
        idx = np.arange(start, start + n)
        prev.append(np.maximum(idx - 1, start))
        nxt.append(np.minimum(idx + 1, start + n - 1))
        spans.append((e.patient_id, start, start + n))
        start += n
    t = torch.from_numpy
    return SliceData(
        ct=t(np.concatenate(cts)), label=t(np.concatenate(labels)), dose=t(np.concatenate(doses)),
        pdm=t(np.concatenate(pdms)), ptv=t(np.concatenate(ptvs)),
        pred_label=t(np.concatenate(preds)) if preds else None,
        prev=t(np.concatenate(prev)), next=t(np.concatenate(nxt)), patient_slices=spans)


def in_channels(variant: str) -> int:
    spec = VARIANTS[variant]
    n = 0
    for name in spec["inputs"]:
        n += {"ct": 1, "ct3": 3, "ptv": 1, "pdm": 1}.get(name, len(spec["rois"]))
    return n


def make_batch(data: SliceData, idx: torch.Tensor, variant: str) -> dict[str, torch.Tensor]:
    """Gather slices -> {"x": [B, C, H, W], "dose", "label", "pdm"} (float32 / long / bool)."""
    spec = VARIANTS[variant]
    k = len(spec["rois"])
    chans = []
    for name in spec["inputs"]:
        if name == "ct":
            chans.append(data.ct[idx].float()[:, None])
        elif name == "ct3":
            chans.append(torch.stack([data.ct[data.prev[idx]], data.ct[idx], data.ct[data.next[idx]]], 1).float())
        elif name == "ptv":
            chans.append(data.ptv[idx].float()[:, None])
        elif name == "pdm":
            chans.append(data.pdm[idx].float()[:, None])
        elif name in ("gt_masks", "pred_masks"):
            lab = data.label[idx] if name == "gt_masks" else data.pred_label[idx]
            chans.append(F.one_hot(lab.long(), k + 1)[..., 1:].permute(0, 3, 1, 2).float())
        else:
            raise ValueError(name)
    return {"x": torch.cat(chans, 1), "dose": data.dose[idx].float()[:, None], "label": data.label[idx].long(),
            "pdm": data.pdm[idx]}


def mask_channel_slices(variant: str) -> list[tuple[int, int]]:
    """(start, stop) of the input channels holding ROI masks (nearest-neighbour when augmenting)."""
    spec = VARIANTS[variant]
    out, c = [], 0
    for name in spec["inputs"]:
        w = {"ct": 1, "ct3": 3, "ptv": 1, "pdm": 1}.get(name, len(spec["rois"]))
        if name in ("gt_masks", "pred_masks", "ptv", "pdm"):
            out.append((c, c + w))
        c += w
    return out


def lr_swap_index(rois: tuple[str, ...]) -> list[int]:
    """Label permutation for a left/right flip (index 0 = background)."""
    perm = list(range(len(rois) + 1))
    for a, b in LR_PAIRS:
        if a in rois and b in rois:
            ia, ib = rois.index(a) + 1, rois.index(b) + 1
            perm[ia], perm[ib] = ib, ia
    return perm


def augment(batch: dict[str, torch.Tensor], variant: str, gen: torch.Generator, max_deg: float = 10.0,
            max_shift: float = 8.0, p_affine: float = 0.5, p_flip: float = 0.5) -> dict[str, torch.Tensor]:
    """Random rotation/shift (bilinear for images, nearest for masks) and L/R flip with label swap."""
    x, dose, label, pdm = batch["x"], batch["dose"], batch["label"], batch["pdm"]
    B, _, H, W = x.shape
    dev = x.device
    rois = VARIANTS[variant]["rois"]
    # left/right flip (canonical x axis runs right -> left): swap the parotid labels
    flip = torch.rand(B, generator=gen) < p_flip
    if flip.any():
        f = flip.to(dev)
        perm = torch.tensor(lr_swap_index(rois), device=dev)
        x = torch.where(f[:, None, None, None], x.flip(-1), x)
        for a, b in mask_channel_slices(variant):
            if b - a == len(rois):  # ROI mask channels: swap the pair
                src = torch.tensor([perm[i + 1].item() - 1 for i in range(len(rois))], device=dev) + a
                swapped = x[:, src]
                x = torch.cat([x[:, :a], torch.where(f[:, None, None, None], swapped, x[:, a:b]), x[:, b:]], 1)
        dose = torch.where(f[:, None, None, None], dose.flip(-1), dose)
        label = torch.where(f[:, None, None], perm[label.flip(-1)], label)
        pdm = torch.where(f[:, None, None], pdm.flip(-1), pdm)
    do = torch.rand(B, generator=gen) < p_affine
    if do.any():
        ang = (torch.rand(B, generator=gen) * 2 - 1) * math.radians(max_deg) * do
        sh = (torch.rand(B, 2, generator=gen) * 2 - 1) * max_shift * do[:, None]
        cos, sin = torch.cos(ang), torch.sin(ang)
        theta = torch.zeros(B, 2, 3)
        theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
        theta[:, 0, 2], theta[:, 1, 2] = sh[:, 0] * 2 / W, sh[:, 1] * 2 / H
        grid = F.affine_grid(theta.to(dev), [B, 1, H, W], align_corners=False)
        nearest = mask_channel_slices(variant)
        img_idx = [c for c in range(x.shape[1]) if not any(a <= c < b for a, b in nearest)]
        out = x.clone()
        if img_idx:
            # CT is z-scored: pad with the air value (the minimum of the slice) instead of 0
            xi = x[:, img_idx]
            lo = xi.amin(dim=(2, 3), keepdim=True)
            out[:, img_idx] = F.grid_sample(xi - lo, grid, mode="bilinear", padding_mode="zeros",
                                            align_corners=False) + lo
        for a, b in nearest:
            out[:, a:b] = F.grid_sample(x[:, a:b], grid, mode="nearest", padding_mode="zeros", align_corners=False)
        x = out
        dose = F.grid_sample(dose, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        label = F.grid_sample(label[:, None].float(), grid, mode="nearest", padding_mode="zeros",
                              align_corners=False)[:, 0].long()
        pdm = F.grid_sample(pdm[:, None].float(), grid, mode="nearest", padding_mode="zeros",
                            align_corners=False)[:, 0] > 0.5
    return {"x": x, "dose": dose, "label": label, "pdm": pdm}


def task_losses(out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    losses = {}
    if "dose" in out:
        losses["dose"] = masked_l1(out["dose"], batch["dose"], batch["pdm"][:, None])
    if "contour" in out:
        losses["contour"] = combo_loss(out["contour"], batch["label"])
    return losses


# ---------------------------------------------------------------------------------------
# whole-volume inference (also used by predict/evaluate)
# ---------------------------------------------------------------------------------------
@torch.no_grad()
def infer_slices(model: torch.nn.Module, data: SliceData, variant: str, start: int, stop: int,
                 device: torch.device, batch_size: int = 32, amp: bool = False,
                 tta_flip: bool = False) -> dict[str, np.ndarray]:
    """Predict slices ``start:stop`` -> {"dose": [n,H,W] Gy (zero outside pdm), "probs": [n,K+1,H,W]}."""
    rois = VARIANTS[variant]["rois"]
    perm = torch.tensor(lr_swap_index(rois), device=device)
    dose_parts, prob_parts = [], []
    was_training = model.training
    model.eval()
    for i in range(start, stop, batch_size):
        idx = torch.arange(i, min(i + batch_size, stop), device=data.ct.device)
        b = make_batch(data, idx, variant)
        x = b["x"].to(device)
        outs = [_forward(model, x, device, amp)]
        if tta_flip:
            xf = x.flip(-1)
            for a, bb in mask_channel_slices(variant):
                if bb - a == len(rois):
                    src = torch.tensor([perm[j + 1].item() - 1 for j in range(len(rois))], device=device) + a
                    xf = torch.cat([xf[:, :a], xf[:, src], xf[:, bb:]], 1)
            of = _forward(model, xf, device, amp)
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


def _forward(model, x, device, amp) -> dict[str, torch.Tensor]:
    out = _forward_raw(model, x, device, amp)
    return {k: (torch.softmax(v.float(), 1) if k == "contour" else v.float()) for k, v in out.items()}


def dice_per_roi(pred_label: np.ndarray, true_label: np.ndarray, rois: tuple[str, ...]) -> dict[str, float]:
    out = {}
    for i, name in enumerate(rois, start=1):
        p, t = pred_label == i, true_label == i
        s = p.sum() + t.sum()
        out[name] = float(2 * (p & t).sum() / s) if s else float("nan")
    return out


def validate(model, data: SliceData, variant: str, device: torch.device, amp: bool,
             max_patients: int | None = None) -> dict[str, float]:
    """Whole-volume validation: loss (as trained), dose score (Gy) and Dice per ROI."""
    rois = VARIANTS[variant]["rois"]
    tasks = VARIANTS[variant]["tasks"]
    loss_sums: dict[str, float] = {}
    n_batches = 0
    dose_scores, dices = [], []
    spans = data.patient_slices[:max_patients] if max_patients else data.patient_slices
    model.eval()
    with torch.no_grad():
        for _pid, a, b in spans:
            for i in range(a, b, 32):
                idx = torch.arange(i, min(i + 32, b), device=data.ct.device)
                bt = {k: v.to(device) for k, v in make_batch(data, idx, variant).items()}
                out = _forward_raw(model, bt["x"], device, amp)
                for t, v in task_losses(out, bt).items():
                    loss_sums[t] = loss_sums.get(t, 0.0) + float(v)
                n_batches += 1
            pred = infer_slices(model, data, variant, a, b, device, amp=amp)
            if "dose" in pred:
                ref = data.dose[a:b].float().cpu().numpy() * DOSE_NORM_GY
                pdm = data.pdm[a:b].cpu().numpy()
                if pdm.any():
                    dose_scores.append(float(np.abs(ref - pred["dose"]).sum() / pdm.sum()))
            if "probs" in pred:
                dices.append(dice_per_roi(pred["probs"].argmax(1), data.label[a:b].cpu().numpy(), rois))
    model.train()
    res = {f"val_loss_{t}": s / max(n_batches, 1) for t, s in loss_sums.items()}
    res["val_loss"] = sum(res[f"val_loss_{t}"] for t in tasks)
    if dose_scores:
        res["val_dose_score"] = float(np.mean(dose_scores))
    if dices:
        df = pd.DataFrame(dices)
        for name in rois:
            res[f"val_dice_{name}"] = float(df[name].mean())
        res["val_mean_dice"] = float(np.nanmean(df.to_numpy(dtype=float)))
    return res


def _forward_raw(model, x, device, amp, channels_last: bool | None = None):
    """The model's raw outputs (logits, normalised dose); channels-last input on CUDA by default
    (the model is converted too there), bf16 autocast when ``amp``."""
    if channels_last is None:
        channels_last = device.type == "cuda"
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        return model(x)


def train_step(model, opt, batch: dict[str, torch.Tensor], weights: dict[str, float], device: torch.device,
               amp: bool, channels_last: bool | None = None) -> dict[str, torch.Tensor]:
    """One optimiser step on ``batch`` with the task losses weighted by ``weights`` (DWA) ->
    the unweighted task losses (detached by the caller). Used by ``train`` and the throughput
    benchmark (``benchmarks/contour_dose_train.py``)."""
    out = _forward_raw(model, batch["x"], device, amp, channels_last)
    losses = task_losses(out, batch)
    loss = sum(weights[t] * losses[t] for t in losses)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return losses


# ---------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------
def load_split(cache: Cache, split: pd.DataFrame | str | os.PathLike | None, seed: int = 0) -> pd.DataFrame:
    from ml.contour_dose.split import patient_split

    if split is None:
        if (cache.root / "split.parquet").exists():
            split = pd.read_parquet(cache.root / "split.parquet")
        else:
            labelled = cache.index.loc[cache.index["has_dose"].astype(bool), "patient_id"]
            split = patient_split(list(labelled), seed=seed)
    elif not isinstance(split, pd.DataFrame):
        split = pd.read_parquet(split) if str(split).endswith(".parquet") else pd.read_csv(split)
    missing = sorted(set(split["patient_id"]) - set(cache.patient_ids))
    if missing:
        raise ValueError(f"split lists patients missing from the cache: {missing[:5]}")
    return split


def ct_stats(entries: list[Entry]) -> tuple[float, float]:
    s = n = ss = 0.0
    for e in entries:
        v = np.clip(e.ct.astype(np.float64), *HU_CLIP)
        s += v.sum()
        ss += (v * v).sum()
        n += v.size
    mean = s / n
    return float(mean), float(math.sqrt(max(ss / n - mean * mean, 1e-6)))


def model_config(cfg: TrainConfig) -> ModelConfig:
    spec = VARIANTS[cfg.variant]
    return ModelConfig(arch=spec["arch"], in_channels=in_channels(cfg.variant),
                       n_classes=len(spec["rois"]) + 1 if "contour" in spec["tasks"] else 0,
                       dose="dose" in spec["tasks"], widths=tuple(cfg.widths), ctab=cfg.ctab, ctae=cfg.ctae)


def train(cache_dir: str | os.PathLike, out_dir: str | os.PathLike, cfg: TrainConfig | None = None,
          split: pd.DataFrame | str | None = None, log=print) -> dict:
    """Train (or resume) one variant on a cache; writes config.json, model_best.pt, history.csv, metrics.json."""
    cfg = cfg or TrainConfig()
    if cfg.variant not in VARIANTS:
        raise ValueError(f"unknown variant {cfg.variant!r}; choose from {sorted(VARIANTS)}")
    spec = VARIANTS[cfg.variant]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.seed)
    device = resolve_device(cfg.device)
    if cfg.amp not in ("auto", "bf16", "off"):
        raise ValueError(f"amp must be auto, bf16 or off, not {cfg.amp!r}")
    amp = cfg.amp == "bf16" or (cfg.amp == "auto" and device.type == "cuda")
    cache = Cache.open(cache_dir)
    split = load_split(cache, split, cfg.seed)
    ids = {s: list(split.loc[split["split"] == s, "patient_id"]) for s in ("train", "val")}
    if not ids["train"] or not ids["val"]:
        raise ValueError("the split needs train and val patients")
    t_load = time.perf_counter()
    entries = {s: [cache.load(p) for p in ids[s]] for s in ids}
    if "dose" in spec["tasks"] and any(e.dose is None for s in entries for e in entries[s]):
        raise ValueError("dose models need reference dose for every train/val patient")
    ct_mean, ct_std = ct_stats(entries["train"])
    pred_labels = None
    if "pred_masks" in spec["inputs"]:
        if not cfg.contour_model:
            raise ValueError("seq-automated needs contour_model (a trained contour-only model dir)")
        _copy_model(cfg.contour_model, out / "contour_model")
        pred_labels = predict_labels(out / "contour_model", [e for s in entries for e in entries[s]], device)
    rois = tuple(spec["rois"])
    data = {s: build_slices(entries[s], rois, ct_mean, ct_std, pred_labels) for s in entries}
    del entries, pred_labels  # the stacked slices hold everything training needs
    if device.type == "cuda":
        data = {s: d.to(device) for s, d in data.items()}
    log(f"[{cfg.variant}] {len(ids['train'])} train / {len(ids['val'])} val patients, "
        f"{data['train'].n} / {data['val'].n} slices, loaded in {time.perf_counter() - t_load:.1f} s")

    mcfg = model_config(cfg)
    model = build_model(mcfg).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.epochs, 1), eta_min=cfg.lr * 0.01)
    tasks = tuple(spec["tasks"])
    dwa = DWA(tasks, cfg.dwa_temperature, enabled=cfg.dwa)
    (out / "config.json").write_text(json.dumps({
        "variant": cfg.variant, "train": cfg.to_dict(), "model": mcfg.to_dict(), "rois": list(rois),
        "inputs": list(spec["inputs"]), "tasks": list(tasks), "ct_norm": {"mean": ct_mean, "std": ct_std,
                                                                         "clip_hu": list(HU_CLIP)},
        "dose_norm_gy": DOSE_NORM_GY, "split": {s: ids[s] for s in ids},
        "cache": {"n_patients": int(len(cache.index)), "bytes": int(cache.meta.get("bytes", 0))},
        "n_parameters": n_parameters(model)}, indent=2))

    history: list[dict] = []
    start_epoch, best, best_epoch, stale = 0, float("inf"), -1, 0
    ckpt_path = out / "checkpoint.pt"
    ck = matching_checkpoint(ckpt_path, cfg.to_dict(), _identity, device, log, f"[{cfg.variant}] ")
    if ck is not None:
        history, start_epoch, best, best_epoch, stale = restore_training(ck, model, opt, sched)
        dwa.load(ck["dwa"])
        log(f"[{cfg.variant}] resumed after epoch {ck['epoch']} (best val_loss {best:.4f} at {best_epoch})")

    n_train = data["train"].n
    steps = cfg.steps_per_epoch or max(n_train // cfg.batch_size, 1)
    gen = torch.Generator()
    t_start = time.perf_counter()
    train_time, slices_seen = 0.0, 0
    stopped_by = "epochs"
    for epoch in range(start_epoch, cfg.epochs):
        if stop_reason(stale, cfg.patience):  # a resumed run that had already stopped early
            stopped_by = "early_stopping"
            break
        gen.manual_seed(cfg.seed * 100_003 + epoch)
        weights = dwa.weights()
        model.train()
        sums = {t: 0.0 for t in tasks}
        t0 = time.perf_counter()
        perm = torch.randperm(n_train, generator=gen)
        for step in range(steps):
            lo = (step * cfg.batch_size) % n_train
            idx = perm[lo:lo + cfg.batch_size]
            if len(idx) < 2:
                idx = perm[:cfg.batch_size]
            batch = make_batch(data["train"], idx.to(data["train"].ct.device), cfg.variant)
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            if cfg.augment:
                batch = augment(batch, cfg.variant, gen)
            losses = train_step(model, opt, batch, weights, device, amp)
            for t in tasks:
                sums[t] += float(losses[t].detach())
            slices_seen += len(idx)
        sched.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        epoch_time = time.perf_counter() - t0
        train_time += epoch_time
        means = {t: sums[t] / steps for t in tasks}
        dwa.end_epoch(means)
        vm = validate(model, data["val"], cfg.variant, device, amp, cfg.val_patients)
        row = {"epoch": epoch, "lr": sched.get_last_lr()[0], "epoch_seconds": epoch_time,
               "slices_per_s": steps * cfg.batch_size / max(epoch_time, 1e-9),
               **{f"train_loss_{t}": v for t, v in means.items()}, **{f"lambda_{t}": w for t, w in weights.items()},
               **vm}
        history.append(row)
        if vm["val_loss"] < best:
            best, best_epoch, stale = vm["val_loss"], epoch, 0
            torch.save(model.state_dict(), out / "model_best.pt")
        else:
            stale += 1
        log(f"[{cfg.variant}] epoch {epoch} " + " ".join(
            f"{k}={v:.4g}" for k, v in row.items()
            if k.startswith(("train_loss", "val_loss", "val_dose", "val_mean", "lambda")) or k == "slices_per_s"))
        _save_checkpoint(ckpt_path, model, opt, sched, dwa, history, epoch, best, best_epoch, stale, cfg)
        reason = stop_reason(stale, cfg.patience, t_start, cfg.max_minutes)
        if reason:
            stopped_by = reason
            break
    pd.DataFrame(history).to_csv(out / "history.csv", index=False)
    best_row = next((h for h in history if h["epoch"] == best_epoch), {})
    metrics = {
        "variant": cfg.variant, "best_epoch": best_epoch, "best_val_loss": best, "epochs_run": len(history),
        "stopped_by": stopped_by, "device": str(device),
        "device_name": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "amp": "bf16" if amp else "off", "train_slices_per_s": slices_seen / max(train_time, 1e-9),
        "peak_gpu_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0,
        "n_train_patients": len(ids["train"]), "n_val_patients": len(ids["val"]), "n_train_slices": n_train,
        "n_parameters": n_parameters(model),
        **{k: v for k, v in best_row.items() if k.startswith("val_")},
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def _identity(d: dict) -> dict:
    """What defines a run (the time budget, device, precision and validation cap do not: a CPU run
    may be resumed on a GPU, where ``amp="auto"`` means bf16 anyway)."""
    return {k: v for k, v in d.items() if k not in ("max_minutes", "device", "amp", "val_patients")}


def _save_checkpoint(path: Path, model, opt, sched, dwa, history, epoch, best, best_epoch, stale, cfg) -> None:
    save_checkpoint(path, {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                           "dwa": dwa.state(), "history": history, "epoch": epoch, "best": best,
                           "best_epoch": best_epoch, "stale": stale, "train_config": cfg.to_dict()})


def _copy_model(src: str | os.PathLike, dst: Path) -> None:
    src = Path(src)
    for name in ("config.json", "model_best.pt"):
        if not (src / name).exists():
            raise FileNotFoundError(f"{src / name} missing: not a trained model directory")
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model_best.pt", "metrics.json"):
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)


# ---------------------------------------------------------------------------------------
# loading a trained model
# ---------------------------------------------------------------------------------------
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
        probs = infer_slices(lm.model, data, lm.variant, 0, data.n, lm.device)["probs"]
        out[e.patient_id] = probs.argmax(1).astype(np.uint8)
    return out


def oar_names() -> tuple[str, ...]:
    return OARS
