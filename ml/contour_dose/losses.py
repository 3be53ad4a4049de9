"""Losses and task weighting for the contour + dose models (spec §1.2, §1.3, §B.5).

* Dose: L1 between predicted and clinical dose / 70 Gy, averaged over the voxels of the
  possible-dose mask ([I]: the spec allows all pixels or the pdm; the OpenKBP score ignores
  everything outside the pdm, so the loss does too). Slices without pdm voxels contribute 0.
* Contours: combo loss ``0.3 * Dice + 0.7 * CE`` (Kim et al., citing Ma et al. 2021); Dice is
  the soft Dice over the K foreground classes, batch-pooled, epsilon 1e-5.
* Partial labels (``annotated``: [B, K] bool, ROI k contoured for sample b's patient): an ROI that
  is not annotated for a patient is unknown there, not background. The CE is the *marginal* CE
  (Shi et al. 2021, "Marginal loss and exclusion loss for partially supervised multi-organ
  segmentation"): for sample b the probabilities of its unannotated classes are merged into
  background, ``p'_bg = p_bg + sum_{k unannotated} p_k``, and the CE is taken over background and
  the annotated classes. An unannotated organ's logit is therefore never pushed down where the
  label map says background (its gradient there is <= 0), only where another annotated organ is.
  The soft Dice of class k is pooled over the samples where k is annotated, and classes annotated
  in no sample of the batch are left out of the mean. With every ROI annotated both equal the
  plain losses.
* Class weights (``class_weights``: [K+1] or None): the CE is the weighted mean
  ``sum_i w_{y_i} nll_i / sum_i w_{y_i}`` (``F.cross_entropy(weight=...)``'s reduction);
  ``inverse_sqrt_frequency`` gives the product model's default, ``w_c = sqrt(f_bg / f_c)`` from
  the training voxels (f_c over the patients annotated for c; background weight 1).
* DWA (Liu et al. 2019): ``lambda_k(t) = K exp(w_k(t-1)/T) / sum_i exp(w_i(t-1)/T)``,
  ``w_k(t-1) = L_k(t-1) / L_k(t-2)`` from epoch-averaged training losses; 1 for the first two
  epochs; T = 2 (the MTAN default; Kim et al. state no temperature).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["DWA", "combo_loss", "inverse_sqrt_frequency", "marginal_ce", "masked_l1", "soft_dice_loss"]


def masked_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    err = (pred.float() - target.float()).abs()
    if mask is None:
        return err.mean()
    m = mask.float()
    return (err * m).sum() / m.sum().clamp_min(1.0)


def soft_dice_loss(
    logits: torch.Tensor, labels: torch.Tensor, eps: float = 1e-5, annotated: torch.Tensor | None = None
) -> torch.Tensor:
    """1 - mean over foreground classes of (2 sum p g + eps) / (sum p + sum g + eps); with
    ``annotated`` ([B, K] bool) class k's sums run over the samples annotated for k only, and
    classes annotated in no sample are left out of the mean."""
    k = logits.shape[1]
    probs = torch.softmax(logits.float(), dim=1)
    onehot = F.one_hot(labels.long(), k).permute(0, 3, 1, 2).float()
    if annotated is None:
        dims = (0, 2, 3)
        inter = (probs * onehot).sum(dims)
        denom = probs.sum(dims) + onehot.sum(dims)
        dice = (2 * inter + eps) / (denom + eps)
        return 1.0 - dice[1:].mean()
    a = annotated.to(device=logits.device, dtype=torch.float32)  # [B, K]
    inter = ((probs * onehot)[:, 1:].sum((2, 3)) * a).sum(0)
    denom = ((probs[:, 1:].sum((2, 3)) + onehot[:, 1:].sum((2, 3))) * a).sum(0)
    dice = (2 * inter + eps) / (denom + eps)
    used = annotated.any(0).to(logits.device)
    if not bool(used.any()):
        return probs.sum() * 0.0  # nothing annotated in the batch: no Dice term (keeps the graph)
    return 1.0 - dice[used].mean()


def marginal_ce(
    logits: torch.Tensor,
    labels: torch.Tensor,
    annotated: torch.Tensor | None = None,
    class_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Marginal cross-entropy: per sample, background absorbs the unannotated classes.

    ``nll = logsumexp(all logits) - logit_y`` for an annotated foreground label y, and
    ``logsumexp(all) - logsumexp(background + unannotated logits)`` for background; a weighted
    mean with ``class_weights[y]`` (plain mean without). Labels never point at an unannotated
    class (``label_map`` cannot write one)."""
    z = logits.float()
    y = labels.long()
    lse = torch.logsumexp(z, dim=1)  # [B, H, W]
    if annotated is None:
        bg = z[:, 0]
    else:
        merged = torch.ones(z.shape[0], z.shape[1], dtype=torch.bool, device=z.device)
        merged[:, 1:] = ~annotated.to(z.device)
        bg = torch.logsumexp(z.masked_fill(~merged[:, :, None, None], float("-inf")), dim=1)
    target = torch.where(y == 0, bg, z.gather(1, y[:, None])[:, 0])
    nll = lse - target
    if class_weights is None:
        return nll.mean()
    w = class_weights.to(z.device, torch.float32)[y]
    return (w * nll).sum() / w.sum().clamp_min(1e-12)


def combo_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    w_dice: float = 0.3,
    w_ce: float = 0.7,
    annotated: torch.Tensor | None = None,
    class_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """``w_dice * soft Dice + w_ce * CE`` (partial-label versions when ``annotated`` is given)."""
    if annotated is not None and bool(annotated.all()):
        annotated = None  # every ROI annotated: the plain losses (the same values, faster)
    if annotated is None and class_weights is None:
        ce = F.cross_entropy(logits.float(), labels.long())
    else:
        ce = marginal_ce(logits, labels, annotated, class_weights)
    return w_dice * soft_dice_loss(logits, labels, annotated=annotated) + w_ce * ce


def inverse_sqrt_frequency(voxels, totals) -> list[float]:
    """Class weights ``w_c = sqrt(f_0 / f_c)`` (inverse square-root frequency, background = 1);
    ``f_c = voxels[c] / totals[c]``, ``totals[c]`` the voxels of the slices of the patients annotated
    for c. A class with no voxel gets the largest weight of the others. (The weighted-mean CE does
    not depend on the scale, only on the ratios.)"""
    v = torch.as_tensor(voxels, dtype=torch.float64)
    t = torch.as_tensor(totals, dtype=torch.float64).clamp_min(1.0)
    f = v / t
    seen = f > 0
    w = torch.ones_like(f)
    w[seen] = f[seen].rsqrt()
    if not seen.all() and seen.any():
        w[~seen] = w[seen].max()
    w = w / w[0] if seen[0] else w
    return [float(x) for x in w]


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
