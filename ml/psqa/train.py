"""BMMQA trainer with Shapley-based modality balancing, the baselines, checkpoint/resume.

One trainer runs every variant (``VARIANTS``):

=================  ==========================================================================
``bmmqa``          attention fusion (GPR) + spatial cascading (DD) + Shapley loss factors +
                   contribution-based task weights
``bmmqa_nobal``    same network, no balancing (k = 1, lambda = 1)
``concat``         concatenation fusion for GPR, tabular only at the DD bottleneck, no balancing
``tab_only``       table modality only (image masked), both tasks
``img_only``       image modality only (table masked), both tasks
``gpr_only``       BMMQA network, GPR task only (single task)
``dd_only``        BMMQA network, DD task only (single task)
=================  ==========================================================================

Data. A fixed part of the training split (``shapley_holdout`` = 10 %, drawn with the run's seed,
``holdout_split``) is held out of training for every variant alike: the balancer measures the
modality contributions on it. Tabular scaling and the GPR head's initial bias (the median
training GPR, the optimum of the L1 loss) come from the remaining training plans.

Balancing (seed-methods.md §A.4; every default the paper does not state is named here):

* contributions: every ``shapley_every`` (= 2) steps, on the next batch of held-out plans (never
  trained on; cycling through them), with the whole network in **eval mode** (BatchNorm running
  statistics, no dropout) and no gradient (``ml.psqa.shapley.eval_shapley``), through the fast
  coalition forward (``BMMQA.coalitions``, equal to the 2^M separate evaluations); value function
  ``v_t(S) = -error_t`` (GPR: mean |error| over criteria in %; DD: mean |error| in % of max);
* **modality dropout** during training (``modality_dropout`` = 0.2, two-modality variants): each
  modality of each plan is dropped (zeroed, and masked out of the attention) independently with
  that probability, so the coalitions the Shapley values evaluate are inputs the network has seen;
  the masks are a function of (seed, epoch, step), so a resumed run draws the same ones;
* shares psi_m^t from the batch-mean contributions (``ml.psqa.shapley.contribution_shares``:
  psi_m = phi_m / max(sum phi, 1/2 sum |phi|), signed: a modality that hurts keeps a negative
  share instead of being clipped to 0), smoothed by an EMA (``ema`` = 0.9);
* loss factors (OGM-GE-style suppression of the leading modality per task), from the dominance
  delta_m = psi_m - psi_other (``ml.psqa.shapley.dominance``, in [-2, 2]):
  k_m^t = max(``k_min`` = 0.1, 1 - tanh(``alpha`` = 0.5 * delta_m)) when delta_m > 0, else 1.
  The suppression is graded: delta = 1 (the other modality contributes nothing) gives k = 0.54,
  delta = 2 (the other one hurts by a third of the leader's gain or more) k = 0.24; a helpful
  modality is no longer sent to the floor because the other one's contribution is slightly
  negative (the clipped rule gave rho = psi_m / psi_other = inf there). Applied as gradient
  multipliers on the features entering task t's fusion (``GradScale``), only inside the
  modulation window [``warmup_epochs`` = 5, ``modulation_end`` = 0.8 * epochs);
* task weights: I_t = |psi_img^t - psi_tab^t| averaged over the previous epoch,
  lambda_t = T * softmax(I_t / ``tau`` = 1); 1 during warm-up.

Model selection. ``model_best.pt`` is chosen only among epochs >= ``warmup_epochs`` (the first
balanced epoch; ``select_after_balance``), for every variant alike, so the balancing shapes the
selected BMMQA and all variants are selected over the same epochs; the monitored metric is
``val_select_mae_gpr_2_2`` (``val_select_dd_mae`` for ``dd_only``): the validation MAE, NaN before
that epoch. Early-stopping ``patience`` (15) counts from that epoch.

Losses: GPR L1 in percentage points averaged over criteria (``gpr_loss`` = "l1"; "huber" =
smooth L1 with ``huber_delta`` = 0.5 points: quadratic below 0.5 points, L1 above); DD
L1 + 0.1 * (1 - SSIM). Per-task normalisation before the task weights (``loss_norm``,
``LossNormaliser``): each task loss is divided by a running mean of itself (EMA ``loss_norm_ema``
= 0.9 over steps, started at the first value), so lambda_t weighs tasks whose raw losses differ by
orders of magnitude (GPR points vs DD % of max) on one scale. Optimiser AdamW (lr 1e-4, wd 1e-4),
a linear learning-rate warm-up over the first ``lr_warmup`` = 5 % of all steps (or
``lr_warmup_epochs``), then cosine decay per step to ``lr_min_factor`` = 1 % of lr; batch 32.
The loop itself is the shared engine's (``ml.training``): bf16 autocast on CUDA (the GPR head stays
fp32, ``ml.psqa.bmmqa``), deterministic seeds, checkpoints after every epoch and every
``checkpoint_minutes`` (model, optimiser, balancer and loss-normaliser state with its in-epoch
accumulators, history, RNG states), automatic resume (also mid-epoch), the ``max_minutes`` budget
checked after every step, progress callbacks. This module only says what a BMMQA step is
(``BMMQATask``).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.nn import functional as F

from ml.metrics.image import ssim
from ml.psqa.bmmqa import BMMQA, MODALITIES, BMMQAConfig
from ml.psqa.dataset import (
    LABEL_COLUMNS,
    PRIMARY,
    TabularScaler,
    Tensors,
    load_pack,
    tensors_for,
)
from ml.psqa.predict import predict_tensors
from ml.psqa.shapley import contribution_shares, dominance, eval_shapley
from ml.training import (
    Callback,
    FitSettings,
    Trainer,
    TrainTask,
    resolve_amp,
    write_metrics,
)
from ml.utils.torch_utils import resolve_device, set_seed

__all__ = [
    "GPR_LOSSES",
    "VARIANTS",
    "BMMQATask",
    "Balancer",
    "LossNormaliser",
    "TrainConfig",
    "build_model",
    "holdout_split",
    "lr_factor",
    "modality_dropout_mask",
    "selection_start",
    "task_losses",
    "train",
]

VARIANTS: dict[str, dict] = {
    "bmmqa": {"model": {}, "balance": True},
    "bmmqa_nobal": {"model": {}, "balance": False},
    "concat": {"model": {"gpr_fusion": "concat", "dd_fusion": "bottleneck"}, "balance": False},
    "tab_only": {"model": {"modalities": ("table",)}, "balance": False},
    "img_only": {"model": {"modalities": ("image",)}, "balance": False},
    "gpr_only": {"model": {"tasks": ("gpr",)}, "balance": False},
    "dd_only": {"model": {"tasks": ("dd",)}, "balance": False},
}

GPR_LOSSES = ("l1", "huber")


@dataclass
class TrainConfig(FitSettings):
    """A BMMQA run: the variant, its optimisation and balancing settings, and the engine's knobs
    (``FitSettings``: epochs, seed, device, amp, max_minutes, patience, grad_clip, checkpoint_minutes,
    log_every). Every default is explained in the module docstring."""

    variant: str = "bmmqa"
    epochs: int = 60
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 1e-4
    lr_warmup: float = 0.05  # linear lr warm-up over this fraction of all training steps
    lr_warmup_epochs: float | None = None  # ... or over this many epochs (replaces lr_warmup)
    lr_min_factor: float = 0.01  # cosine decay per step down to lr * lr_min_factor
    patience: int = 15  # epochs without improvement, counted from the first selectable epoch
    warmup_epochs: int = 5  # epochs before the Shapley balancing starts
    select_after_balance: bool = True  # model selection only from epoch warmup_epochs on
    modulation_end: float = 0.8
    alpha: float = 0.5
    k_min: float = 0.1
    ema: float = 0.9
    tau: float = 1.0
    shapley_every: int = 2  # steps between two contribution measurements
    shapley_holdout: float = 0.1  # fraction of the training split held out for the contributions
    modality_dropout: float = 0.2  # per plan and modality, two-modality variants
    gpr_loss: str = "l1"  # l1 | huber (smooth L1 with beta = huber_delta points)
    huber_delta: float = 0.5
    loss_norm: bool = True  # divide each task loss by a running mean of itself
    loss_norm_ema: float = 0.9
    dd_ssim_weight: float = 0.1
    model: dict = field(default_factory=dict)  # BMMQAConfig overrides (e.g. enc_widths)

    def to_dict(self) -> dict:
        return asdict(self)


def build_model(cfg: TrainConfig, n_tab: int, in_channels: int, n_criteria: int) -> BMMQA:
    spec = VARIANTS[cfg.variant]
    overrides = {**spec["model"], **cfg.model}
    mcfg = BMMQAConfig(
        in_channels=in_channels,
        n_tab=n_tab,
        n_criteria=n_criteria,
        **{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()},
    )
    return BMMQA(mcfg)


def selection_start(cfg: TrainConfig) -> int:
    """First epoch whose weights may become ``model_best.pt`` (the first balanced epoch; never
    past the last epoch)."""
    if not cfg.select_after_balance:
        return 0
    return max(0, min(int(cfg.warmup_epochs), int(cfg.epochs) - 1))


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_factor: float) -> float:
    """Learning-rate multiplier at global step ``step`` (0-based): linear warm-up
    ``(step + 1) / warmup_steps`` over the first ``warmup_steps`` steps, then a cosine decay that
    reaches ``min_factor`` at the last step."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps + 1, 0) / span, 1.0)
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def holdout_split(rows: pd.DataFrame, frac: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(rows trained on, rows held out for the Shapley contributions): ``round(frac * n)`` plans
    drawn with ``seed`` (at least one when ``frac`` > 0, and at least two plans are kept)."""
    n = len(rows)
    k = 0 if frac <= 0 else max(1, round(frac * n))
    k = max(0, min(k, n - 2))
    held = np.sort(np.random.default_rng(seed).permutation(n)[:k])
    mask = np.zeros(n, dtype=bool)
    mask[held] = True
    return rows[~mask], rows[mask]


def modality_dropout_mask(n: int, p: float, generator: torch.Generator) -> torch.Tensor:
    """(n, 2) bool ``present`` mask: each modality of each sample dropped with probability ``p``."""
    return torch.rand(n, len(MODALITIES), generator=generator) >= p


class Balancer:
    """Shapley contributions -> shares psi (EMA), loss factors and task weights (module docstring)."""

    def __init__(self, cfg: TrainConfig, tasks: tuple[str, ...]) -> None:
        self.cfg = cfg
        self.tasks = tasks
        self.psi = dict.fromkeys(tasks)  # EMA of the shares, (2,)
        self.epoch_psi: dict[str, list[np.ndarray]] = {t: [] for t in tasks}
        self.weights = dict.fromkeys(tasks, 1.0)

    def update(self, phi: dict[str, torch.Tensor]) -> None:
        """``phi``: {task: (M, B) per-sample Shapley values}; the batch means make one update."""
        for t, v in phi.items():
            if t not in self.psi:
                continue
            psi = contribution_shares(v.mean(dim=1).double().cpu().numpy())
            self.epoch_psi[t].append(psi)
            self.psi[t] = psi if self.psi[t] is None else self.cfg.ema * self.psi[t] + (1 - self.cfg.ema) * psi

    def loss_factors(self) -> dict[str, dict[str, float]]:
        out = {}
        for t, psi in self.psi.items():
            if psi is None:
                continue
            delta = dominance(psi)
            out[t] = {
                m: (max(self.cfg.k_min, 1.0 - math.tanh(self.cfg.alpha * float(d))) if d > 0 else 1.0)
                for m, d in zip(MODALITIES, delta, strict=True)
            }
        return out

    def end_epoch(self) -> dict[str, np.ndarray]:
        means = {t: (np.mean(v, axis=0) if v else None) for t, v in self.epoch_psi.items()}
        imbalance = {t: float(np.abs(dominance(m)).max()) for t, m in means.items() if m is not None}
        if len(imbalance) == len(self.tasks) and len(self.tasks) > 1:
            vals = np.array([imbalance[t] for t in self.tasks]) / self.cfg.tau
            e = np.exp(vals - vals.max())
            w = len(self.tasks) * e / e.sum()
            self.weights = {t: float(x) for t, x in zip(self.tasks, w, strict=True)}
        self.epoch_psi = {t: [] for t in self.tasks}
        return means

    def state(self) -> dict:
        return {
            "psi": {t: (None if v is None else v.tolist()) for t, v in self.psi.items()},
            "weights": self.weights,
            "epoch_psi": {t: [p.tolist() for p in v] for t, v in self.epoch_psi.items()},
        }

    def load(self, state: dict) -> None:
        self.psi = {t: (None if v is None else np.asarray(v)) for t, v in state["psi"].items()}
        self.weights = state["weights"]
        self.epoch_psi = {t: [np.asarray(p) for p in v] for t, v in state.get("epoch_psi", {}).items()} or {
            t: [] for t in self.tasks
        }


class LossNormaliser:
    """Per-task loss normalisation: each task loss divided by a running mean of itself.

    ``scale[t]`` is an EMA (``ema``) of task t's raw loss over the training steps, started at its
    first value; a step is normalised by the scale *before* its own update (the first step by its
    own value). The returned tensors keep the raw loss as their **value** (what the history and
    progress lines show) and carry the gradient of ``loss / scale`` (``norm + (raw - norm).detach()``),
    so the engine's weighted sum ``sum_t lambda_t * loss_t`` optimises ``sum_t lambda_t * loss_t / scale_t``.
    """

    def __init__(self, tasks: tuple[str, ...], ema: float = 0.9, enabled: bool = True) -> None:
        self.tasks, self.ema, self.enabled = tuple(tasks), float(ema), enabled
        self.scale: dict[str, float] = {}

    def __call__(self, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not self.enabled:
            return losses
        out = {}
        for t, v in losses.items():
            raw = float(v.detach())
            prev = self.scale.get(t)
            denom = max(raw if prev is None else prev, 1e-8)
            norm = v / denom
            out[t] = norm + (v - norm).detach()
            self.scale[t] = raw if prev is None else self.ema * prev + (1.0 - self.ema) * raw
        return out

    def state(self) -> dict:
        return {"scale": dict(self.scale)}

    def load(self, state: dict) -> None:
        self.scale = dict(state.get("scale", {}))


def task_losses(
    out: dict[str, torch.Tensor],
    gpr: torch.Tensor,
    dd: torch.Tensor,
    ssim_weight: float,
    gpr_loss: str = "l1",
    huber_delta: float = 0.5,
) -> dict[str, torch.Tensor]:
    """Raw task losses: GPR L1 (or smooth L1 with ``beta = huber_delta``) in percentage points,
    averaged over criteria; DD L1 + ``ssim_weight`` * (1 - SSIM) in % of the planned maximum."""
    if gpr_loss not in GPR_LOSSES:
        raise ValueError(f"gpr_loss must be one of {GPR_LOSSES}, not {gpr_loss!r}")
    losses = {}
    if "gpr" in out:
        pred = out["gpr"].float()
        if gpr_loss == "l1":
            losses["gpr"] = F.l1_loss(pred, gpr)
        else:
            losses["gpr"] = F.smooth_l1_loss(pred, gpr, beta=huber_delta)
    if "dd" in out:
        pred = out["dd"].float()
        l1 = F.l1_loss(pred, dd)
        rng = (dd.flatten(1).max(1).values - dd.flatten(1).min(1).values).clamp_min(1.0)
        losses["dd"] = l1 + ssim_weight * (1.0 - ssim(pred, dd, rng)) if ssim_weight else l1
    return losses


def _val_metrics(pred: dict[str, np.ndarray], data: Tensors) -> dict[str, float]:
    m = {}
    if "gpr" in pred:
        err = np.abs(pred["gpr"] - data.gpr.numpy())
        for j, col in enumerate(LABEL_COLUMNS[: err.shape[1]]):
            m[f"val_mae_{col}"] = float(err[:, j].mean())
    if "dd" in pred:
        m["val_dd_mae"] = float(np.abs(pred["dd"] - data.dd.numpy()).mean())
    return m


class BMMQATask(TrainTask):
    """One BMMQA variant on the engine: shuffled plan batches with modality dropout, the per-step
    learning rate (warm-up + cosine), the Shapley-balanced forward (loss factors on the features
    entering each task's fusion), the normalised task losses weighted by the balancer's lambda_t,
    the contributions on held-out plans in eval mode, per-epoch validation MAE with the
    selection metric (NaN before the balancing starts).

    ``shapley_t``: the held-out plans the contributions are measured on (None: no balancing
    signal; the variant trains unbalanced)."""

    samples_name = "samples"

    def __init__(
        self,
        cfg: TrainConfig,
        model: BMMQA,
        train_t: Tensors,
        val_t: Tensors,
        device: torch.device,
        shapley_t: Tensors | None = None,
    ) -> None:
        self.cfg, self.model, self.train_t, self.val_t, self.device = cfg, model, train_t, val_t, device
        self.shapley_t = shapley_t if shapley_t is not None and len(shapley_t.keys) else None
        self.amp_dtype = resolve_amp(cfg.amp, device)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = None  # the lr is a function of the global step, set in ``batch``
        self.loss_names = tuple(model.cfg.tasks)
        self.tag = f"[{cfg.variant}] "
        self.balance = VARIANTS[cfg.variant]["balance"]
        self.balancer = Balancer(cfg, self.loss_names)
        self.normaliser = LossNormaliser(self.loss_names, cfg.loss_norm_ema, cfg.loss_norm)
        self.two_modalities = len(model.cfg.modalities) == len(MODALITIES)
        self.dropout_p = float(cfg.modality_dropout) if self.two_modalities else 0.0
        self.gen = torch.Generator()
        self.n_train = len(train_t.keys)
        self.perm = torch.arange(self.n_train)
        self.epoch = 0
        steps = self.steps_per_epoch()
        self.total_steps = max(cfg.epochs, 1) * steps
        if cfg.lr_warmup_epochs is not None:
            self.warmup_steps = round(cfg.lr_warmup_epochs * steps)
        else:
            self.warmup_steps = math.ceil(cfg.lr_warmup * self.total_steps)
        self.select_from = selection_start(cfg)
        self.monitor = "val_dd_mae" if self.loss_names == ("dd",) else f"val_mae_{PRIMARY}"
        self.select_key = "val_select_" + self.monitor.removeprefix("val_")
        self.modulate = False
        self.weights = dict.fromkeys(self.loss_names, 1.0)
        self.alphas: list[np.ndarray] = []
        self.raw_sums: dict[str, float] = {}
        self.shapley_seconds = 0.0

    def steps_per_epoch(self) -> int:
        return math.ceil(self.n_train / self.cfg.batch_size)

    def begin_epoch(self, epoch: int) -> None:
        cfg = self.cfg
        self.epoch = epoch
        self.gen.manual_seed(cfg.seed * 1000 + epoch)
        self.perm = torch.randperm(self.n_train, generator=self.gen)
        self.modulate = self.balance and cfg.warmup_epochs <= epoch < int(cfg.modulation_end * cfg.epochs)
        on = self.balance and epoch >= cfg.warmup_epochs
        self.weights = dict(self.balancer.weights) if on else dict.fromkeys(self.loss_names, 1.0)
        self.alphas, self.shapley_seconds = [], 0.0

    def global_step(self, step: int) -> int:
        return self.epoch * self.steps_per_epoch() + step

    def batch(self, step: int) -> dict | None:
        cfg = self.cfg
        g = self.global_step(step)
        lr = cfg.lr * lr_factor(g, self.total_steps, self.warmup_steps, cfg.lr_min_factor)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        idx = self.perm[step * cfg.batch_size : (step + 1) * cfg.batch_size]
        if len(idx) < 2:
            return None
        t, dev = self.train_t, self.device
        img = t.image[idx].to(dev, non_blocking=True)
        if dev.type == "cuda":
            img = img.contiguous(memory_format=torch.channels_last)
        out = {
            "image": img,
            "table": t.table[idx].to(dev, non_blocking=True),
            "gpr": t.gpr[idx].to(dev),
            "dd": t.dd[idx].to(dev),
        }
        if self.dropout_p > 0:
            # a function of (seed, epoch, step): a resumed run draws the same masks
            mask_gen = torch.Generator().manual_seed((cfg.seed * 1_000_003 + self.epoch) * 100_003 + step)
            out["present"] = modality_dropout_mask(len(idx), self.dropout_p, mask_gen).to(dev)
        return out

    def batch_size(self, batch: dict) -> int:
        return int(batch["image"].shape[0])

    def forward(self, batch: dict) -> dict:
        enc = self.model.encode(batch["image"], batch["table"])
        outs = self.model.heads(
            enc,
            present=batch.get("present"),
            loss_factors=self.balancer.loss_factors() if self.modulate else None,
        )
        return {"outs": outs}

    def losses(self, out: dict, batch: dict) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        raw = task_losses(out["outs"], batch["gpr"], batch["dd"], cfg.dd_ssim_weight, cfg.gpr_loss, cfg.huber_delta)
        return self.normaliser(raw)

    def loss_weights(self) -> dict[str, float]:
        return self.weights

    def contributions(self, index: int) -> dict[str, torch.Tensor]:
        """Per-task (2, B) Shapley values on held-out batch number ``index`` (the held-out plans
        in order, cycling), with the model in eval mode (``eval_shapley``)."""
        h = self.shapley_t
        n = len(h.keys)
        size = min(self.cfg.batch_size, n)
        idx = (index * size + torch.arange(size)) % n
        dev = self.device
        return eval_shapley(
            self.model,
            h.image[idx].to(dev),
            h.table[idx].to(dev),
            h.gpr[idx].to(dev),
            h.dd[idx].to(dev),
            self.amp_dtype,
        )

    def after_step(self, step: int, batch: dict, out: dict) -> None:
        outs = out["outs"]
        if "alpha" in outs:
            alpha = outs["alpha"].detach().float()
            if "present" in batch:  # the attention of plans that had both modalities
                alpha = alpha[batch["present"].all(dim=1)]
            if len(alpha):
                self.alphas.append(alpha.mean(0).cpu().numpy())
        g = self.global_step(step)
        every = max(self.cfg.shapley_every, 1)
        if self.shapley_t is None or not self.two_modalities or g % every:
            return
        ts = time.perf_counter()
        self.balancer.update(self.contributions(g // every))
        self.shapley_seconds += time.perf_counter() - ts

    def end_epoch(self, epoch: int, mean_losses: dict[str, float]) -> dict[str, float]:
        psi_means = self.balancer.end_epoch()
        row: dict[str, float] = {"shapley_seconds": self.shapley_seconds}
        for t, psi in psi_means.items():
            if psi is not None:
                row[f"psi_{t}_image"], row[f"psi_{t}_table"] = float(psi[0]), float(psi[1])
        for t, w in self.weights.items():
            row[f"lambda_{t}"] = float(w)
        for t, v in self.normaliser.scale.items():
            row[f"loss_scale_{t}"] = float(v)
        if self.modulate:
            for t, ks in self.balancer.loss_factors().items():
                for m, k in ks.items():
                    row[f"k_{t}_{m}"] = k
        if self.alphas:
            a = np.mean(self.alphas, axis=0)
            row["alpha_image"], row["alpha_table"] = float(a[0]), float(a[1])
        return row

    def validate(self, epoch: int) -> dict[str, float]:
        pred = predict_tensors(self.model, self.val_t, self.device, amp_dtype=self.amp_dtype)
        m = _val_metrics(pred, self.val_t)
        m[self.select_key] = m.get(self.monitor, math.nan) if epoch >= self.select_from else math.nan
        return m

    def state_dict(self) -> dict:
        return {
            "balancer": self.balancer.state(),
            "normaliser": self.normaliser.state(),
            "generator": self.gen.get_state(),
            "alphas": [a.tolist() for a in self.alphas],
            "shapley_seconds": self.shapley_seconds,
        }

    def load_state_dict(self, state: dict) -> None:
        self.balancer.load(state["balancer"])
        self.normaliser.load(state.get("normaliser", {}))
        self.gen.set_state(state["generator"])
        self.alphas = [np.asarray(a, dtype=np.float32) for a in state["alphas"]]
        self.shapley_seconds = state["shapley_seconds"]


def train(
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    cfg: TrainConfig | None = None,
    log=print,
    callbacks: list[Callback] | None = None,
) -> dict:
    """Train (or resume) one variant; returns the final metrics dict (also in metrics.json).

    Writes ``config.json``, ``tab_scaler.json``, ``model_best.pt``, ``checkpoint.pt``,
    ``history.csv`` and ``metrics.json`` into ``out_dir``; ``callbacks`` receive the engine's
    progress, per-epoch rows and checkpoints. ``best_val_mae_gpr_2_2`` (``best_val_dd_mae`` for
    ``dd_only``) is the validation MAE of the selected epoch (``selection_start_epoch`` on)."""
    cfg = cfg or TrainConfig()
    if cfg.variant not in VARIANTS:
        raise ValueError(f"unknown variant {cfg.variant!r}; choose from {sorted(VARIANTS)}")
    if cfg.gpr_loss not in GPR_LOSSES:
        raise ValueError(f"gpr_loss must be one of {GPR_LOSSES}, not {cfg.gpr_loss!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.seed)
    device = resolve_device(cfg.device)
    pack = load_pack(data_dir)
    train_rows, val_rows = pack.split("train"), pack.split("val")
    if len(train_rows) == 0 or len(val_rows) == 0:
        raise ValueError("the pack needs train and val rows")
    fit_rows, held_rows = holdout_split(train_rows, cfg.shapley_holdout, cfg.seed)
    scaler = TabularScaler.fit(fit_rows, pack.feature_columns)
    train_t, val_t = tensors_for(pack, fit_rows, scaler), tensors_for(pack, val_rows, scaler)
    held_t = tensors_for(pack, held_rows, scaler) if len(held_rows) else None
    model = build_model(cfg, scaler.n_features, pack.images.shape[1], len(LABEL_COLUMNS))
    model.init_gpr_bias(train_t.gpr.median(dim=0).values)
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    task = BMMQATask(cfg, model, train_t, val_t, device, held_t)
    (out / "config.json").write_text(
        json.dumps({"train": cfg.to_dict(), "model": model.cfg.to_dict(), "variant": cfg.variant}, indent=2)
    )
    (out / "tab_scaler.json").write_text(json.dumps(scaler.to_dict()))
    # patience counts from the first selectable epoch (the epochs before it cannot improve)
    settings = replace(cfg, patience=cfg.patience + task.select_from)
    result = Trainer(
        task, settings, out, monitor=task.select_key, config=cfg.to_dict(), device=device, log=log, callbacks=callbacks
    ).fit()
    metrics = {
        "variant": cfg.variant,
        f"best_{task.monitor}": result.best,
        "selection_start_epoch": task.select_from,
        **result.common_metrics(),
        "train_samples_per_s": result.samples_per_s,
        "n_train": len(train_t.keys),
        "n_val": len(val_t.keys),
        "n_shapley_holdout": len(held_rows),
    }
    return write_metrics(out / "metrics.json", metrics)
