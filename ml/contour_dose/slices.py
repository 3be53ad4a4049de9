"""Slice tensors for the contour + dose models: every slice of a set of patients stacked once
(``SliceData``), batches of model inputs gathered from it (``make_batch``), the training
augmentation (``augment``: rotation within +-10 deg and shifts within +-8 px (p = 0.5), bilinear
for images and nearest for masks; left/right flips (p = 0.5) with the parotid labels, parotid
input masks and parotid annotation flags swapped) and the epoch's slice order (``epoch_order``:
uniform, or with a quota of slices holding rare/small ROIs).

Partial labels: an ROI missing from a patient's structure set is *not annotated* for that
patient, which is not the same as absent. ``label_map`` can only write background there, so every
slice also carries the patient's annotation flags (``SliceData.annotated``, [N, K] bool, and
``batch["annotated"]``); the contour loss (``losses.combo_loss``) and the validation Dice
(``train.dice_per_roi``) use them to leave unannotated ROIs out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ml.contour_dose.cache import PRESCRIPTIONS, Entry
from ml.contour_dose.variants import (
    DOSE_NORM_GY,
    HU_CLIP,
    SOFT_WINDOW,
    VARIANTS,
    input_names,
    lr_swap_index,
    mask_channel_slices,
)

__all__ = [
    "SliceData",
    "annotated_rois",
    "augment",
    "build_slices",
    "epoch_order",
    "label_map",
    "make_batch",
    "normalise_ct",
    "ptv_map",
    "roi_presence",
    "soft_window",
]


def label_map(rois: dict[str, np.ndarray], names: tuple[str, ...], shape) -> np.ndarray:
    """Priority label map: index i+1 for names[i]; earlier names win overlaps. An ROI missing from
    ``rois`` leaves background, so the map alone cannot tell "absent" from "not annotated": pair it
    with ``annotated_rois``."""
    out = np.zeros(shape, dtype=np.uint8)
    for i in range(len(names) - 1, -1, -1):
        m = rois.get(names[i])
        if m is not None:
            out[m] = i + 1
    return out


def annotated_rois(rois: dict[str, np.ndarray], names: tuple[str, ...]) -> np.ndarray:
    """[K] bool: which of ``names`` the patient's structure set holds (the cache keeps only
    non-empty ROIs, so a missing name means the ROI was not contoured for this patient)."""
    return np.asarray([n in rois for n in names], dtype=bool)


def ptv_map(rois: dict[str, np.ndarray], shape) -> np.ndarray:
    out = np.zeros(shape, dtype=np.float32)
    for name, rx in PRESCRIPTIONS.items():
        m = rois.get(name)
        if m is not None:
            out = np.maximum(out, m * (rx / DOSE_NORM_GY))
    return out


def normalise_ct(ct_hu: np.ndarray, mean: float, std: float) -> np.ndarray:
    return ((np.clip(ct_hu.astype(np.float32), *HU_CLIP) - mean) / std).astype(np.float32)


def soft_window(
    ct_norm: torch.Tensor, mean: float, std: float, window: tuple[float, float] = SOFT_WINDOW
) -> torch.Tensor:
    """The soft-tissue window of z-scored CT: HU = ct * std + mean, clipped to level +- width/2
    (W400 / L40: [-160, 240] HU) and scaled to [-1, 1]."""
    level, width = window
    hu = ct_norm.float() * std + mean
    return ((hu - level) / (width / 2)).clamp(-1.0, 1.0)


@dataclass
class SliceData:
    """Every slice of a set of patients, stacked (CPU tensors, or on the GPU when it fits)."""

    ct: torch.Tensor  # [N, H, W] float16, normalised (wide window, z-scored)
    label: torch.Tensor  # [N, H, W] uint8
    dose: torch.Tensor  # [N, H, W] float16 (dose / 70), zeros without dose
    pdm: torch.Tensor  # [N, H, W] bool
    ptv: torch.Tensor  # [N, H, W] float16
    pred_label: torch.Tensor | None  # seq-automated
    annotated: torch.Tensor  # [N, K] bool: ROI k is contoured for the slice's patient
    prev: torch.Tensor  # [N] index of the slice below (same patient, clamped)
    next: torch.Tensor  # [N] index of the slice above
    patient_slices: list[tuple[str, int, int]]  # (patient_id, start, stop)
    ct_mean: float = 0.0  # the z-score of ``ct`` (for the soft-tissue window)
    ct_std: float = 1.0

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
    cts, labels, doses, pdms, ptvs, preds, anns, prev, nxt, spans = [], [], [], [], [], [], [], [], [], []
    start = 0
    for e in entries:
        n = e.n_slices
        shape = e.ct.shape
        cts.append(normalise_ct(e.ct, ct_mean, ct_std).astype(np.float16))
        labels.append(label_map(e.rois, rois, shape))
        anns.append(np.repeat(annotated_rois(e.rois, rois)[None], n, axis=0))
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
        annotated=t(np.concatenate(anns)),
        prev=t(np.concatenate(prev)),
        next=t(np.concatenate(nxt)),
        patient_slices=spans,
        ct_mean=float(ct_mean),
        ct_std=float(ct_std),
    )


def make_batch(
    data: SliceData, idx: torch.Tensor, variant: str, inputs: tuple[str, ...] | None = None
) -> dict[str, torch.Tensor]:
    """Gather slices -> {"x": [B, C, H, W], "dose", "label", "pdm", "annotated" [B, K]} (float32 /
    long / bool). ``inputs``: the model's input names (default: the variant's)."""
    k = len(VARIANTS[variant]["rois"])
    chans = []
    for name in input_names(variant, inputs):
        if name == "ct":
            chans.append(data.ct[idx].float()[:, None])
        elif name == "ct3":
            chans.append(torch.stack([data.ct[data.prev[idx]], data.ct[idx], data.ct[data.next[idx]]], 1).float())
        elif name == "ct_soft":
            chans.append(soft_window(data.ct[idx], data.ct_mean, data.ct_std)[:, None])
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
        "annotated": data.annotated[idx],
    }


def roi_presence(label: torch.Tensor, k: int) -> torch.Tensor:
    """[N, K] bool: slice n holds voxels of ROI k+1 in the label map."""
    present = torch.zeros(label.shape[0], k, dtype=torch.bool)
    for i in range(0, label.shape[0], 512):  # chunked: a [512, K, H, W] comparison at most
        lab = label[i : i + 512].long()
        for c in range(k):
            present[i : i + 512, c] = (lab == c + 1).flatten(1).any(1).cpu()
    return present


def _cycle(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """k indices in [0, n): permutations of range(n) one after another (each index once per pass)."""
    if k <= 0:
        return torch.zeros(0, dtype=torch.long)
    reps = -(-k // n)
    return torch.cat([torch.randperm(n, generator=gen) for _ in range(reps)])[:k]


def epoch_order(
    presence: torch.Tensor, columns: list[int], rate: float, n: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The slice order of one epoch with rare-ROI oversampling -> (indices [n], source [n]).

    For each ROI column ``c`` in ``columns`` a quota of ``round(rate * n)`` slots is filled with
    slices that hold ROI c (``presence[:, c]``: a permutation of that pool, repeated when the pool
    is smaller than the quota); the remaining slots are a uniform draw over all slices (one
    permutation after another, as without oversampling); then the slots are shuffled. Each listed
    ROI is therefore in at least ``rate`` of the epoch's slices (plus its natural share of the
    uniform part). ``source`` is the column that filled a slot (-1: the uniform part); an ROI with
    no slice in the training data gets no quota.
    """
    if not 0.0 <= rate * len(columns) <= 1.0:
        raise ValueError(f"oversample_rate x ROIs must be in [0, 1], got {rate} x {len(columns)}")
    parts, sources = [], []
    for c in columns:
        pool = presence[:, c].nonzero()[:, 0]
        q = round(rate * n)
        if len(pool) == 0 or q == 0:
            continue
        parts.append(pool[_cycle(len(pool), q, gen)])
        sources.append(torch.full((q,), c, dtype=torch.long))
    rest = n - sum(len(p) for p in parts)
    parts.append(_cycle(presence.shape[0], rest, gen))
    sources.append(torch.full((max(rest, 0),), -1, dtype=torch.long))
    order, source = torch.cat(parts), torch.cat(sources)
    shuffle = torch.randperm(len(order), generator=gen)
    return order[shuffle], source[shuffle]


def augment(
    batch: dict[str, torch.Tensor],
    variant: str,
    gen: torch.Generator,
    max_deg: float = 10.0,
    max_shift: float = 8.0,
    p_affine: float = 0.5,
    p_flip: float = 0.5,
    inputs: tuple[str, ...] | None = None,
) -> dict[str, torch.Tensor]:
    """Random rotation/shift (bilinear for images, nearest for masks) and L/R flip with label swap
    (labels, ROI input-mask channels and annotation flags)."""
    x, dose, label, pdm = batch["x"], batch["dose"], batch["label"], batch["pdm"]
    annotated = batch.get("annotated")
    B, _, H, W = x.shape
    dev = x.device
    rois = VARIANTS[variant]["rois"]
    masks = mask_channel_slices(variant, inputs)
    # left/right flip (canonical x axis runs right -> left): swap the parotid labels
    flip = torch.rand(B, generator=gen) < p_flip
    if flip.any():
        f = flip.to(dev)
        perm = torch.tensor(lr_swap_index(rois), device=dev)
        x = torch.where(f[:, None, None, None], x.flip(-1), x)
        src = torch.tensor([perm[i + 1].item() - 1 for i in range(len(rois))], device=dev)
        for a, b in masks:
            if b - a == len(rois):  # ROI mask channels: swap the pair
                swapped = x[:, src + a]
                x = torch.cat([x[:, :a], torch.where(f[:, None, None, None], swapped, x[:, a:b]), x[:, b:]], 1)
        dose = torch.where(f[:, None, None, None], dose.flip(-1), dose)
        label = torch.where(f[:, None, None], perm[label.flip(-1)], label)
        pdm = torch.where(f[:, None, None], pdm.flip(-1), pdm)
        if annotated is not None:
            fa = f.to(annotated.device)[:, None]
            annotated = torch.where(fa, annotated[:, src.to(annotated.device)], annotated)
    do = torch.rand(B, generator=gen) < p_affine
    if do.any():
        ang = (torch.rand(B, generator=gen) * 2 - 1) * math.radians(max_deg) * do
        sh = (torch.rand(B, 2, generator=gen) * 2 - 1) * max_shift * do[:, None]
        cos, sin = torch.cos(ang), torch.sin(ang)
        theta = torch.zeros(B, 2, 3)
        theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
        theta[:, 0, 2], theta[:, 1, 2] = sh[:, 0] * 2 / W, sh[:, 1] * 2 / H
        grid = F.affine_grid(theta.to(dev), [B, 1, H, W], align_corners=False)
        img_idx = [c for c in range(x.shape[1]) if not any(a <= c < b for a, b in masks)]
        out = x.clone()
        if img_idx:
            # CT is z-scored (and the soft window is in [-1, 1]): pad each image channel with its
            # air value (the minimum of the slice) instead of 0
            xi = x[:, img_idx]
            lo = xi.amin(dim=(2, 3), keepdim=True)
            out[:, img_idx] = (
                F.grid_sample(xi - lo, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + lo
            )
        for a, b in masks:
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
    out = {**batch, "x": x, "dose": dose, "label": label, "pdm": pdm}
    if annotated is not None:
        out["annotated"] = annotated
    return out
