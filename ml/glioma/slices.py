"""Slice tensors, 2.5D batches, augmentation, Tumor-CutMix and missing-modality drop masks.

``SliceData`` stacks every patient's slices once (float32 (N, 4, H, W)); a batch gathers each
slice with its ``context`` neighbours (clamped at the patient's first/last slice) into
(B, 4, 2*context+1, H, W). Slice-level classification targets are the patient's labels on slices
whose reference mask holds tumour, unknown elsewhere ([I]: the patient-level prediction
aggregates tumour slices only, so the heads are trained where they are used).

Augmentation ([R] MTTU-Net, made 2D): flips of each in-plane axis (p = 0.5), per-sequence
intensity scale U(0.9, 1.1) and shift U(-0.1, 0.1) on the z-scored foreground.

Tumor-CutMix (spec §C.5, [I] defaults, 2D): a sample A (tumour slice) is paired with a tumour
slice B of another patient whose histology differs (else any other patient); lambda ~ U(0.3, 0.7);
a sub-box of B's tumour bounding box cut at fraction lambda along a random axis is aligned to A's
tumour centroid, and B's tumour voxels inside it are pasted into A (every sequence, every context
slice, the mask). Soft label per task = (n_A y_A + n_B y_B) / (n_A + n_B) with n_A A's remaining
and n_B the pasted tumour pixels (unknown if either label is unknown); present sequences = the
intersection. ``cutmix_p`` of the tumour samples in each batch are mixed (default 0.25).

Missing-modality drop ([C] the authors' commented code): per sample r ~ U(0, 1): r < 0.2 drops
two present sequences, 0.2 <= r < 0.5 one, never the last present one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ml.glioma.data import TASKS, Patient
from ml.glioma.losses import one_hot_codes

__all__ = ["SliceData", "augment", "build_slices", "cutmix", "gather", "random_drop"]


@dataclass
class SliceData:
    image: torch.Tensor  # (N, 4, H, W) float32
    mask: torch.Tensor  # (N, H, W) uint8 (zeros where no reference)
    has_mask: torch.Tensor  # (N,) bool
    present: torch.Tensor  # (N, 4) float 0/1
    patient: torch.Tensor  # (N,) patient index
    prev: torch.Tensor  # (N,) index of the slice below (clamped)
    next: torch.Tensor  # (N,) index of the slice above (clamped)
    tumour: torch.Tensor  # (N,) bool: reference mask holds tumour
    patient_ids: list[str]
    spans: list[tuple[int, int]]  # per patient [a, b)
    codes: dict[str, torch.Tensor]  # task -> (P,) patient label codes (-1 unknown)

    @property
    def n(self) -> int:
        return int(self.image.shape[0])


def build_slices(patients: list[Patient]) -> SliceData:
    imgs, masks, has, pres, pat, prev, nxt, spans = [], [], [], [], [], [], [], []
    a = 0
    for i, p in enumerate(patients):
        s = p.n_slices
        imgs.append(torch.from_numpy(p.image))
        h, w = p.image.shape[-2:]
        masks.append(torch.from_numpy(p.mask) if p.mask is not None else torch.zeros(s, h, w, dtype=torch.uint8))
        has.append(torch.full((s,), p.mask is not None))
        pres.append(torch.from_numpy(p.present.astype(np.float32))[None].expand(s, 4))
        pat.append(torch.full((s,), i))
        idx = torch.arange(a, a + s)
        prev.append(torch.clamp(idx - 1, min=a))
        nxt.append(torch.clamp(idx + 1, max=a + s - 1))
        spans.append((a, a + s))
        a += s
    mask = torch.cat(masks)
    has_mask = torch.cat(has)
    return SliceData(
        image=torch.cat(imgs).float(),
        mask=mask,
        has_mask=has_mask,
        present=torch.cat(pres).contiguous(),
        patient=torch.cat(pat),
        prev=torch.cat(prev),
        next=torch.cat(nxt),
        tumour=has_mask & (mask.flatten(1).amax(1) > 0),
        patient_ids=[p.patient_id for p in patients],
        spans=spans,
        codes={t: torch.tensor([p.labels.get(t, -1) for p in patients], dtype=torch.long) for t in TASKS},
    )


def gather(data: SliceData, idx: torch.Tensor, context: int) -> torch.Tensor:
    """(B, 4, 2*context+1, H, W) slice stacks around ``idx``."""
    rows = [idx]
    lo = hi = idx
    for _ in range(context):
        lo, hi = data.prev[lo], data.next[hi]
        rows = [lo, *rows, hi]
    return torch.stack([data.image[r] for r in rows], 2)


def targets(data: SliceData, idx: torch.Tensor, codes: dict[str, torch.Tensor] | None = None) -> dict:
    """Soft targets per task for slices ``idx`` (patient label on reference-tumour slices)."""
    codes = codes or data.codes
    pat = data.patient[idx]
    on_tumour = data.tumour[idx]
    out = {}
    for t, vocab in TASKS.items():
        c = codes[t][pat].clone()
        c[~on_tumour] = -1
        out[t] = one_hot_codes(c, len(vocab))
    return out


def make_batch(data: SliceData, idx: torch.Tensor, context: int, codes: dict | None = None) -> dict:
    return {
        "x": gather(data, idx, context),
        "present": data.present[idx].clone(),
        "mask": data.mask[idx].clone(),
        "has_mask": data.has_mask[idx].clone(),
        "y": targets(data, idx, codes),
        "patient": data.patient[idx].clone(),
    }


def augment(batch: dict, gen: torch.Generator) -> dict:
    x, m = batch["x"], batch["mask"]
    b = x.shape[0]
    for axis_x, axis_m in ((-1, -1), (-2, -2)):
        flip = torch.rand(b, generator=gen) < 0.5
        if flip.any():
            x[flip] = x[flip].flip(axis_x)
            m[flip] = m[flip].flip(axis_m)
    scale = 0.9 + 0.2 * torch.rand(b, 4, 1, 1, 1, generator=gen)
    shift = -0.1 + 0.2 * torch.rand(b, 4, 1, 1, 1, generator=gen)
    fg = x != 0
    batch["x"] = torch.where(fg, x * scale + shift, x)
    batch["mask"] = m
    return batch


def _bbox(m: torch.Tensor) -> tuple[int, int, int, int]:
    rows = torch.nonzero(m.any(1)).flatten()
    cols = torch.nonzero(m.any(0)).flatten()
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def cutmix(batch: dict, gen: torch.Generator, p: float = 0.25) -> tuple[dict, int]:
    """Tumor-CutMix in place on a batch (see the module docstring); returns (batch, n mixed)."""
    x, mask, y, present = batch["x"], batch["mask"], batch["y"], batch["present"]
    pat = batch["patient"]
    tum = [i for i in range(x.shape[0]) if batch["has_mask"][i] and mask[i].any()]
    if len(tum) < 2:
        return batch, 0
    hist = y["histology"].argmax(1)
    hist_known = y["histology"].sum(1) > 0
    n_mixed = 0
    h, w = mask.shape[-2:]
    for a in tum:
        if float(torch.rand(1, generator=gen)) >= p:
            continue
        others = [j for j in tum if pat[j] != pat[a]]
        if not others:
            continue
        diff = [j for j in others if hist_known[j] and hist_known[a] and hist[j] != hist[a]]
        pool = diff or others
        b = pool[int(torch.randint(len(pool), (1,), generator=gen))]
        mb = mask[b].bool()
        r0, r1, c0, c1 = _bbox(mb)
        lam = 0.3 + 0.4 * float(torch.rand(1, generator=gen))
        if float(torch.rand(1, generator=gen)) < 0.5:
            cut = r0 + max(1, round(lam * (r1 - r0)))
            box = (r0, cut, c0, c1)
        else:
            cut = c0 + max(1, round(lam * (c1 - c0)))
            box = (r0, r1, c0, cut)
        region = torch.zeros_like(mb)
        region[box[0] : box[1], box[2] : box[3]] = mb[box[0] : box[1], box[2] : box[3]]
        if not region.any():
            continue
        # align B's pasted region to A's tumour centroid
        ca = torch.nonzero(mask[a]).float().mean(0)
        cb = torch.nonzero(region).float().mean(0)
        dr, dc = round(float(ca[0] - cb[0])), round(float(ca[1] - cb[1]))
        region_s = torch.roll(region, (dr, dc), (0, 1))
        # drop what wrapped around the border
        if dr > 0:
            region_s[:dr] = False
        elif dr < 0:
            region_s[h + dr :] = False
        if dc > 0:
            region_s[:, :dc] = False
        elif dc < 0:
            region_s[:, w + dc :] = False
        if not region_s.any():
            continue
        xb = torch.roll(x[b], (dr, dc), (-2, -1))
        x[a] = torch.where(region_s[None, None], xb, x[a])
        n_b = int(region_s.sum())
        n_a = int((mask[a].bool() & ~region_s).sum())
        mask[a] = (mask[a].bool() | region_s).to(mask.dtype)
        fa, fb = n_a / (n_a + n_b), n_b / (n_a + n_b)
        for t in y:
            ya, yb = y[t][a], y[t][b]
            y[t][a] = fa * ya + fb * yb if (ya.sum() > 0 and yb.sum() > 0) else torch.zeros_like(ya)
        present[a] = present[a] * present[b]
        n_mixed += 1
    return batch, n_mixed


def random_drop(present: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """(B, 4) 0/1 keep-mask: per sample one (p 0.3) or two (p 0.2) present sequences dropped,
    at least one kept."""
    keep = torch.ones_like(present)
    r = torch.rand(present.shape[0], generator=gen)
    for i in range(present.shape[0]):
        n_drop = 2 if r[i] < 0.2 else 1 if r[i] < 0.5 else 0
        avail = torch.nonzero(present[i] > 0).flatten()
        n_drop = min(n_drop, len(avail) - 1)
        if n_drop <= 0:
            continue
        order = avail[torch.randperm(len(avail), generator=gen)[:n_drop]]
        keep[i, order] = 0
    return keep
