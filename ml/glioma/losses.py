"""GMMAS losses (spec §C.3, §1.1): segmentation soft Dice + CE, class-weighted soft-target CE with
unknown labels ignored, and Kendall homoscedastic-uncertainty weighting across tasks.

Labels travel as soft targets (B, K): one-hot for a known label, the Tumor-CutMix mixture for a
mixed sample, all zeros for an unknown label (the ``ignore_index = -1`` of the authors' code).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["KendallWeighting", "one_hot_codes", "seg_loss", "soft_ce"]


def one_hot_codes(codes: torch.Tensor, k: int) -> torch.Tensor:
    """int codes (B,) with -1 unknown -> soft targets (B, k) (zero rows for unknown)."""
    out = torch.zeros(codes.shape[0], k, device=codes.device)
    known = codes >= 0
    out[known, codes[known].long()] = 1.0
    return out


def soft_ce(logits: torch.Tensor, target: torch.Tensor, class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Class-weighted soft-target cross-entropy ``-sum_i sum_k w_k y_ik log p_ik / sum_i sum_k w_k y_ik``
    (= ``F.cross_entropy(weight=w, ignore_index=-1)`` for one-hot targets). Zero, with a graph,
    when no sample is labelled."""
    logp = F.log_softmax(logits.float(), dim=1)
    w = target if class_weights is None else target * class_weights[None].to(target.device)
    denom = w.sum()
    if float(denom) <= 0:
        return logits.float().sum() * 0.0
    return -(w * logp).sum() / denom


def seg_loss(logits: torch.Tensor, mask: torch.Tensor, has_mask: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft Dice of the tumour class over the batch's labelled slices (one global Dice: empty
    slices count their false positives) + pixel CE. ``mask`` (B, H, W) 0/1 (soft after CutMix
    is not used: pasted voxels are tumour), ``has_mask`` (B,) bool."""
    if not bool(has_mask.any()):
        return logits.float().sum() * 0.0
    lg = logits[has_mask].float()
    t = mask[has_mask].float()
    p = torch.softmax(lg, 1)[:, 1]
    inter = (p * t).sum()
    dice = 1 - (2 * inter + eps) / (p.sum() + t.sum() + eps)
    ce = F.cross_entropy(lg, t.long())
    return dice + ce


class KendallWeighting(nn.Module):
    """``L = sum_t 0.5 exp(-s_t) L_t + 0.5 s_t`` with ``s_t = log sigma_t^2`` learned, initialised to 0
    (spec §1.1's stable form; the lorenmt/mtan "uncert" option). A task without labelled samples in
    the batch (``L_t`` is None) contributes nothing, regulariser included (it would otherwise drive
    ``s_t`` down with no data). ``equal=True``: the plain sum (the ablation)."""

    def __init__(self, tasks: tuple[str, ...], equal: bool = False) -> None:
        super().__init__()
        self.tasks = tuple(tasks)
        self.equal = equal
        self.s = nn.Parameter(torch.zeros(len(self.tasks)), requires_grad=not equal)

    def forward(self, losses: dict[str, torch.Tensor | None]) -> torch.Tensor:
        total = None
        for i, t in enumerate(self.tasks):
            v = losses.get(t)
            if v is None:
                continue
            term = v if self.equal else 0.5 * torch.exp(-self.s[i]) * v + 0.5 * self.s[i]
            total = term if total is None else total + term
        return total if total is not None else self.s.sum() * 0.0

    def sigmas(self) -> dict[str, float]:
        """sigma_t = exp(s_t / 2), the task "uncertainty" the authors log."""
        return {t: float(torch.exp(self.s[i].detach() / 2)) for i, t in enumerate(self.tasks)}
