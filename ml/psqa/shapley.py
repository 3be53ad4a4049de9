"""Shapley modality contributions for continuous multi-task outputs.

For modalities M and a value function v over coalitions S subset of M (seed-methods.md §1.4):

    phi_m = sum_{S subset M \\ {m}} |S|! (|M|-|S|-1)! / |M|!  [v(S u {m}) - v(S)]

Absent modalities are zero-padded at the *feature* level (Wei et al. CVPR 2024 ``exec_drop``),
so the encoders never need re-running: ``fast_coalitions`` encodes once and evaluates all 2^M
coalitions in one stacked head pass; ``naive_coalitions`` runs 2^M full forward passes and
exists to prove the fast path exact (tests) and to measure the saving (benchmarks/shapley.py).

Value function (regression, BMMQA default [I]): ``v_t(S) = -error_t(y_hat_S, y)`` per sample,
with error = mean |GPR error| over criteria (task gpr) or mean |DD error| over pixels (task dd).
By efficiency, sum_m phi_m = v(M) - v(empty).

Where the balancer measures them (``eval_shapley``): on plans the step does not train on (a
held-out part of the training split, ``ml.psqa.train``) and with the whole network in eval mode
(BatchNorm running statistics, no dropout), the way the model will be used. Training with
modality dropout keeps the coalition outputs (a modality zeroed) in distribution.

From contributions to shares (``contribution_shares``, the psi of the balancer; rule [I], the paper
gives none): ``psi_m = phi_m / D`` with ``D = max(sum_m phi_m, 1/2 sum_m |phi_m|)``.

* When the modalities together help (``sum phi >= 1/2 sum |phi|``, the usual case) psi_m is the
  modality's share of the joint gain ``v(M) - v(empty)``: the shares add up to 1 (efficiency), and
  with two helpful modalities this is the spec's ``phi_m / sum |phi|`` (seed-methods §A.4 step 3).
* A negative contribution is kept, not clipped: the modality that hurts gets a negative share and
  the other one a share above 1, so psi stays ordered like phi and strictly monotone in each phi_m
  through zero (clipping mapped every phi_m <= 0 to 0, hence an infinite ratio and the floor
  factor for the *helpful* modality).
* The ``1/2 sum |phi|`` floor keeps psi bounded (|psi_m| <= 2) when the gains cancel (the joint
  gain near zero) or are all negative; there psi_m = 2 phi_m / sum |phi| keeps the order.
* All contributions zero: equal shares 1/M.

The dominance of modality m is ``delta_m = psi_m - max_{m' != m} psi_m'`` (in [-2, 2]); the loss
factors and task weights of ``ml.psqa.train.Balancer`` are functions of delta. For two modalities
delta is 2 psi_m - 1 when both help, exactly 1 when the other contributes nothing, and grows to 2
as the other one hurts more (up to a third of the helpful one's gain).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ml.psqa.bmmqa import AttentionFusion, coalition_masks
from ml.training import autocast

__all__ = [
    "MultiModalNet",
    "coalition_shapley",
    "contribution_shares",
    "dominance",
    "eval_shapley",
    "naive_bmmqa_coalitions",
    "shapley_values",
    "shapley_weights",
    "task_errors",
]


def shapley_weights(n: int) -> torch.Tensor:
    """(n, 2^n) matrix W with phi = W @ v for values v ordered as ``coalition_masks(n)``."""
    masks = coalition_masks(n)
    index = {tuple(m.tolist()): i for i, m in enumerate(masks)}
    w = torch.zeros(n, len(masks), dtype=torch.float64)
    for m in range(n):
        for s in masks:
            if s[m]:
                continue
            size = int(s.sum())
            coef = math.factorial(size) * math.factorial(n - size - 1) / math.factorial(n)
            with_m = s.clone()
            with_m[m] = True
            w[m, index[tuple(with_m.tolist())]] += coef
            w[m, index[tuple(s.tolist())]] -= coef
    return w


def shapley_values(values: torch.Tensor) -> torch.Tensor:
    """``values``: (2^M, ...) in ``coalition_masks`` order -> (M, ...) Shapley values."""
    n = round(math.log2(values.shape[0]))
    w = shapley_weights(n).to(values.device, values.dtype)
    return torch.tensordot(w, values, dims=([1], [0]))


def contribution_shares(phi, eps: float = 1e-12) -> np.ndarray:
    """psi from Shapley contributions ``phi`` (M,) or (M, N) (module docstring):
    ``phi_m / max(sum phi, 1/2 sum |phi|)``, signed; equal shares where every phi is zero."""
    phi = np.asarray(phi, dtype=np.float64)
    total = phi.sum(axis=0)
    scale = np.maximum(total, 0.5 * np.abs(phi).sum(axis=0))
    safe = np.where(scale > eps, scale, 1.0)
    return np.where(scale > eps, phi / safe, 1.0 / phi.shape[0])


def dominance(psi) -> np.ndarray:
    """``delta_m = psi_m - max_{m' != m} psi_m'`` along axis 0 (> 0 only for the leading modality)."""
    psi = np.asarray(psi, dtype=np.float64)
    out = np.empty_like(psi)
    for m in range(psi.shape[0]):
        out[m] = psi[m] - np.delete(psi, m, axis=0).max(axis=0)
    return out


# ---------------------------------------------------------------------------------------
# a generic M-modality network with the same encode/heads split as BMMQA (used for M = 4)
# ---------------------------------------------------------------------------------------
class MultiModalNet(nn.Module):
    """M image-like modalities (1 x H x W each), one CNN encoder per modality, attention
    fusion to a regression head and a light map decoder. Used to show the fast forward for
    M = 4 (e.g. dose plane, fluence, two more maps); BMMQA itself is M = 2."""

    def __init__(self, n_modalities: int = 4, width: int = 32, embed: int = 64, n_out: int = 4) -> None:
        super().__init__()
        self.m = n_modalities
        self.encoders = nn.ModuleList(
            [
                nn.Sequential(
                    nn.Conv2d(1, width, 3, padding=1),
                    nn.GELU(),
                    nn.Conv2d(width, width, 3, stride=2, padding=1),
                    nn.GELU(),
                    nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
                    nn.GELU(),
                    nn.Conv2d(2 * width, 2 * width, 3, padding=1),
                    nn.GELU(),
                )
                for _ in range(n_modalities)
            ]
        )
        self.proj = nn.ModuleList([nn.Linear(2 * width, embed) for _ in range(n_modalities)])
        self.fusion = AttentionFusion(embed)
        self.head = nn.Sequential(nn.Linear(embed, 32), nn.GELU(), nn.Linear(32, n_out))
        self.map_head = nn.Conv2d(2 * width, 1, 1)

    def encode(self, xs: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        feats = [enc(x) for enc, x in zip(self.encoders, xs, strict=True)]
        zs = [p(f.mean(dim=(2, 3))) for p, f in zip(self.proj, feats, strict=True)]
        return zs, feats

    def heads(self, zs, feats, present: torch.Tensor) -> dict[str, torch.Tensor]:
        zs = [z * present[:, i, None].to(z.dtype) for i, z in enumerate(zs)]
        fused, _ = self.fusion(zs, present)
        fmap = sum(f * present[:, i, None, None, None].to(f.dtype) for i, f in enumerate(feats))
        return {"y": self.head(fused), "map": self.map_head(fmap)}

    def forward(self, xs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        zs, feats = self.encode(xs)
        b = zs[0].shape[0]
        return self.heads(zs, feats, torch.ones(b, self.m, dtype=torch.bool, device=zs[0].device))

    def coalitions(self, xs: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """``heads`` for every coalition from ONE encoder pass: the regression head runs on the
        2^M masked copies of the (small) embeddings, stacked; the map head is a 1 x 1 conv, so
        ``conv(sum_i p_i f_i) = sum_i p_i conv_nobias(f_i) + bias``: each modality's feature map
        is projected once and a coalition only mixes the M one-channel maps."""
        zs, feats = self.encode(xs)
        masks = coalition_masks(self.m, device=zs[0].device)
        n, b = masks.shape[0], zs[0].shape[0]
        present = masks.repeat_interleave(b, dim=0)
        fused, _ = self.fusion([z.repeat(n, 1) * present[:, i, None].to(z.dtype) for i, z in enumerate(zs)], present)
        y = self.head(fused)
        proj = torch.stack([F.conv2d(f, self.map_head.weight) for f in feats])  # (M, B, 1, h, w)
        maps = torch.einsum("cm,mbohw->cbohw", masks.to(proj.dtype), proj) + self.map_head.bias[:, None, None]
        return [{"y": y[i * b : (i + 1) * b], "map": maps[i]} for i in range(n)]

    def naive_coalitions(self, xs: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        masks = coalition_masks(self.m, device=xs[0].device)
        out = []
        for mask in masks:
            zs, feats = self.encode(xs)  # full forward every time
            b = zs[0].shape[0]
            out.append(self.heads(zs, feats, mask[None, :].expand(b, -1)))
        return out


# ---------------------------------------------------------------------------------------
# BMMQA helpers
# ---------------------------------------------------------------------------------------
def naive_bmmqa_coalitions(model, image: torch.Tensor, table: torch.Tensor):
    """2^M separate full forward passes (encoders re-run) -- the reference for the fast path."""
    masks = coalition_masks(2, device=image.device)
    out = {}
    for mask in masks:
        enc = model.encode(image, table)
        key = tuple(m for m, on in zip(("image", "table"), mask.tolist(), strict=True) if on)
        out[key] = model.heads(enc, mask[None, :].expand(image.shape[0], -1))
    return out


@torch.no_grad()
def eval_shapley(
    model,
    image: torch.Tensor,
    table: torch.Tensor,
    gpr: torch.Tensor | None,
    dd: torch.Tensor | None,
    amp_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Per-task (M, B) Shapley values of a BMMQA on a batch, with the WHOLE network in eval mode
    (BatchNorm running statistics, no dropout) and no gradient; the model's mode is restored.

    The coalitions come from the fast forward (``BMMQA.coalitions``), equal to the 2^M separate
    evaluations (``naive_bmmqa_coalitions``). The balancer calls it on held-out plans."""
    was_training = model.training
    model.eval()
    try:
        with autocast(image.device, amp_dtype):
            co = model.coalitions(image, table)
        outs = {k: {kk: vv.float() for kk, vv in v.items()} for k, v in co.items()}
        return coalition_shapley(outs, lambda o: task_errors(o, gpr, dd))
    finally:
        model.train(was_training)


def task_errors(
    outputs: dict[str, torch.Tensor],
    gpr: torch.Tensor | None,
    dd: torch.Tensor | None,
    dd_mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per-sample absolute errors per task (the negated value function)."""
    errs = {}
    if gpr is not None and "gpr" in outputs:
        errs["gpr"] = (outputs["gpr"] - gpr).abs().mean(dim=1)
    if dd is not None and "dd" in outputs:
        diff = (outputs["dd"] - dd).abs()
        if dd_mask is not None:
            errs["dd"] = (diff * dd_mask).flatten(1).sum(1) / dd_mask.flatten(1).sum(1).clamp_min(1)
        else:
            errs["dd"] = diff.flatten(1).mean(1)
    return errs


def coalition_shapley(
    coalition_outputs: dict[tuple[str, ...], dict[str, torch.Tensor]],
    error_fn: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    modalities: tuple[str, ...] = ("image", "table"),
) -> dict[str, torch.Tensor]:
    """Per task: (M, B) per-sample Shapley values with v(S) = -error(S)."""
    masks = coalition_masks(len(modalities))
    keys = [tuple(m for m, on in zip(modalities, mask.tolist(), strict=True) if on) for mask in masks]
    per_coalition = [error_fn(coalition_outputs[k]) for k in keys]
    tasks = per_coalition[0].keys()
    return {t: shapley_values(-torch.stack([pc[t] for pc in per_coalition])) for t in tasks}
