"""Slice tensors for the contour + dose models: every slice of a set of patients stacked once
(``SliceData``), batches of model inputs gathered from it (``make_batch``) and the training
augmentation (``augment``: rotation within +-10 deg and shifts within +-8 px (p = 0.5), bilinear
for images and nearest for masks; left/right flips (p = 0.5) with the parotid labels and parotid
input masks swapped).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ml.contour_dose.cache import PRESCRIPTIONS, Entry
from ml.contour_dose.variants import DOSE_NORM_GY, HU_CLIP, VARIANTS, lr_swap_index, mask_channel_slices

__all__ = ["SliceData", "augment", "build_slices", "label_map", "make_batch", "normalise_ct", "ptv_map"]


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


def build_slices(
    entries: list[Entry],
    rois: tuple[str, ...],
    ct_mean: float,
    ct_std: float,
    pred_labels: dict[str, np.ndarray] | None = None,
) -> SliceData:
    cts, labels, doses, pdms, ptvs, preds, prev, nxt, spans = [], [], [], [], [], [], [], [], []
    start = 0
    for e in entries:
        n = e.n_slices
        shape = e.ct.shape
        cts.append(normalise_ct(e.ct, ct_mean, ct_std).astype(np.float16))
        labels.append(label_map(e.rois, rois, shape))
        doses.append((e.dose / DOSE_NORM_GY).astype(np.float16) if e.dose is not None else np.zeros(shape, np.float16))
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
        ct=t(np.concatenate(cts)),
        label=t(np.concatenate(labels)),
        dose=t(np.concatenate(doses)),
        pdm=t(np.concatenate(pdms)),
        ptv=t(np.concatenate(ptvs)),
        pred_label=t(np.concatenate(preds)) if preds else None,
        prev=t(np.concatenate(prev)),
        next=t(np.concatenate(nxt)),
        patient_slices=spans,
    )


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
    return {
        "x": torch.cat(chans, 1),
        "dose": data.dose[idx].float()[:, None],
        "label": data.label[idx].long(),
        "pdm": data.pdm[idx],
    }


def augment(
    batch: dict[str, torch.Tensor],
    variant: str,
    gen: torch.Generator,
    max_deg: float = 10.0,
    max_shift: float = 8.0,
    p_affine: float = 0.5,
    p_flip: float = 0.5,
) -> dict[str, torch.Tensor]:
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
            out[:, img_idx] = (
                F.grid_sample(xi - lo, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + lo
            )
        for a, b in nearest:
            out[:, a:b] = F.grid_sample(x[:, a:b], grid, mode="nearest", padding_mode="zeros", align_corners=False)
        x = out
        dose = F.grid_sample(dose, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        label = F.grid_sample(label[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)[
            :, 0
        ].long()
        pdm = (
            F.grid_sample(pdm[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)[:, 0]
            > 0.5
        )
    return {"x": x, "dose": dose, "label": label, "pdm": pdm}
