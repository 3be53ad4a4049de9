"""Losses and task weighting for the contour + dose models (spec §1.2, §1.3, §B.5).

* Dose: L1 between predicted and clinical dose / 70 Gy, averaged over the voxels of the
  possible-dose mask ([I]: the spec allows all pixels or the pdm; the OpenKBP score ignores
  everything outside the pdm, so the loss does too). Slices without pdm voxels contribute 0.
* Contours: combo loss ``0.3 * Dice + 0.7 * CE`` (Kim et al., citing Ma et al. 2021); Dice is
  the soft Dice over the K foreground classes, batch-pooled, epsilon 1e-5.
* DWA (Liu et al. 2019): ``lambda_k(t) = K exp(w_k(t-1)/T) / sum_i exp(w_i(t-1)/T)``,
  ``w_k(t-1) = L_k(t-1) / L_k(t-2)`` from epoch-averaged training losses; 1 for the first two
  epochs; T = 2 (the MTAN default; Kim et al. state no temperature).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["DWA", "combo_loss", "masked_l1", "soft_dice_loss"]


def masked_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    err = (pred.float() - target.float()).abs()
    if mask is None:
        return err.mean()
    m = mask.float()
    return (err * m).sum() / m.sum().clamp_min(1.0)


def soft_dice_loss(logits: torch.Tensor, labels: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """1 - mean over foreground classes of (2 sum p g + eps) / (sum p + sum g + eps)."""
    k = logits.shape[1]
    probs = torch.softmax(logits.float(), dim=1)
    onehot = F.one_hot(labels.long(), k).permute(0, 3, 1, 2).float()
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + eps) / (denom + eps)
    return 1.0 - dice[1:].mean()


def combo_loss(logits: torch.Tensor, labels: torch.Tensor, w_dice: float = 0.3, w_ce: float = 0.7) -> torch.Tensor:
    return w_dice * soft_dice_loss(logits, labels) + w_ce * F.cross_entropy(logits.float(), labels.long())


class DWA:
    """Dynamic Weight Average over epoch-averaged task losses."""

    def __init__(self, tasks: tuple[str, ...], temperature: float = 2.0, enabled: bool = True) -> None:
        self.tasks = tuple(tasks)
        self.T = temperature
        self.enabled = enabled
        self.history: list[dict[str, float]] = []  # epoch-mean loss per task

    def weights(self) -> dict[str, float]:
        k = len(self.tasks)
        if not self.enabled or k < 2 or len(self.history) < 2:
            return dict.fromkeys(self.tasks, 1.0)
        prev, prev2 = self.history[-1], self.history[-2]
        w = {t: prev[t] / max(prev2[t], 1e-12) for t in self.tasks}
        z = {t: math.exp(w[t] / self.T) for t in self.tasks}
        s = sum(z.values())
        return {t: k * z[t] / s for t in self.tasks}

    def end_epoch(self, mean_losses: dict[str, float]) -> None:
        self.history.append({t: float(mean_losses[t]) for t in self.tasks})

    def state(self) -> dict:
        return {"history": self.history}

    def load(self, state: dict) -> None:
        self.history = [dict(h) for h in state.get("history", [])]
