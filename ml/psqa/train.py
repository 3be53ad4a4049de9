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

Balancing (seed-methods.md §A.4; every default the paper does not state is named here):

* every ``shapley_every`` iterations the coalition outputs of the batch come from one encoder
  pass and one stacked head pass (``BMMQA.coalitions``), heads in eval mode, no gradient;
  value function ``v_t(S) = -error_t`` (GPR: mean |error| over criteria in %; DD: mean |error|
  in % of max); per task the two-player Shapley values phi_m^t, the positive parts normalised to
  psi_m^t, smoothed by an EMA (``ema`` = 0.9);
* loss factors (OGM-GE-style suppression of the dominant modality per task): rho = psi_m /
  psi_other; k_m^t = max(``k_min`` = 0.1, 1 - tanh(``alpha`` = 0.5 * (rho - 1))) when rho > 1,
  else 1; applied as gradient multipliers on the features entering task t's fusion
  (``GradScale``), only inside the modulation window [``warmup_epochs`` = 5,
  ``modulation_end`` = 0.8 * epochs);
* task weights: I_t = |psi_img^t - psi_tab^t| averaged over the previous epoch,
  lambda_t = T * softmax(I_t / ``tau`` = 1); 1 during warm-up.

Losses: GPR SmoothL1 on GPR/10 (percent / 10, beta 1) averaged over criteria; DD
L1 + 0.1 * (1 - SSIM). Optimiser AdamW (lr 1e-3, wd 1e-4), cosine decay, batch 32, early
stopping on validation MAE at 2%/2mm (DD MAE for ``dd_only``) with patience 15. The loop itself is
the shared engine's (``ml.training``): bf16 autocast on CUDA, deterministic seeds, checkpoints
after every epoch and every ``checkpoint_minutes`` (model, optimiser, scheduler, balancer state
with its in-epoch accumulators, history, RNG states), automatic resume (also mid-epoch), the
``max_minutes`` budget checked after every step, progress callbacks. This module only says what
a BMMQA step is (``BMMQATask``).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
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
from ml.psqa.shapley import coalition_shapley, task_errors
from ml.training import (
    Callback,
    FitSettings,
    Trainer,
    TrainTask,
    autocast,
    resolve_amp,
    write_metrics,
)
from ml.utils.torch_utils import resolve_device, set_seed

__all__ = ["VARIANTS", "BMMQATask", "Balancer", "TrainConfig", "build_model", "task_losses", "train"]

VARIANTS: dict[str, dict] = {
    "bmmqa": {"model": {}, "balance": True},
    "bmmqa_nobal": {"model": {}, "balance": False},
    "concat": {"model": {"gpr_fusion": "concat", "dd_fusion": "bottleneck"}, "balance": False},
    "tab_only": {"model": {"modalities": ("table",)}, "balance": False},
    "img_only": {"model": {"modalities": ("image",)}, "balance": False},
    "gpr_only": {"model": {"tasks": ("gpr",)}, "balance": False},
    "dd_only": {"model": {"tasks": ("dd",)}, "balance": False},
}


@dataclass
class TrainConfig(FitSettings):
    """A BMMQA run: the variant, its optimisation and balancing settings, and the engine's knobs
    (``FitSettings``: epochs, seed, device, amp, max_minutes, patience, grad_clip, checkpoint_minutes,
    log_every)."""

    variant: str = "bmmqa"
    epochs: int = 60
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    patience: int = 15
    warmup_epochs: int = 5
    modulation_end: float = 0.8
    alpha: float = 0.5
    k_min: float = 0.1
    ema: float = 0.9
    tau: float = 1.0
    shapley_every: int = 1
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


class Balancer:
    """EMA Shapley contributions -> loss factors and task weights."""

    def __init__(self, cfg: TrainConfig, tasks: tuple[str, ...]) -> None:
        self.cfg = cfg
        self.tasks = tasks
        self.psi = dict.fromkeys(tasks)  # EMA of normalised contributions, (2,)
        self.epoch_psi: dict[str, list[np.ndarray]] = {t: [] for t in tasks}
        self.weights = dict.fromkeys(tasks, 1.0)

    def update(self, phi: dict[str, torch.Tensor]) -> None:
        for t, v in phi.items():
            if t not in self.psi:
                continue
            mean_phi = v.mean(dim=1).double().cpu().numpy()  # (2,)
            pos = np.clip(mean_phi, 0, None)
            psi = pos / pos.sum() if pos.sum() > 1e-12 else np.full(2, 0.5)
            self.epoch_psi[t].append(psi)
            self.psi[t] = psi if self.psi[t] is None else self.cfg.ema * self.psi[t] + (1 - self.cfg.ema) * psi

    def loss_factors(self) -> dict[str, dict[str, float]]:
        out = {}
        for t, psi in self.psi.items():
            if psi is None:
                continue
            ks = {}
            for i, m in enumerate(MODALITIES):
                other = psi[1 - i]
                rho = psi[i] / other if other > 1e-12 else float("inf")
                k = 1.0
                if rho > 1:
                    k = max(self.cfg.k_min, 1.0 - math.tanh(self.cfg.alpha * min(rho - 1.0, 50.0)))
                ks[m] = k
            out[t] = ks
        return out

    def end_epoch(self) -> dict[str, np.ndarray]:
        means = {t: (np.mean(v, axis=0) if v else None) for t, v in self.epoch_psi.items()}
        imbalance = {t: abs(m[0] - m[1]) for t, m in means.items() if m is not None}
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


def task_losses(
    out: dict[str, torch.Tensor], gpr: torch.Tensor, dd: torch.Tensor, ssim_weight: float
) -> dict[str, torch.Tensor]:
    losses = {}
    if "gpr" in out:
        losses["gpr"] = F.smooth_l1_loss(out["gpr"].float() / 10.0, gpr / 10.0)
    if "dd" in out:
        pred = out["dd"].float()
        l1 = F.l1_loss(pred, dd)
        rng = (dd.flatten(1).max(1).values - dd.flatten(1).min(1).values).clamp_min(1.0)
        losses["dd"] = l1 + ssim_weight * (1.0 - ssim(pred, dd, rng))
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
    """One BMMQA variant on the engine: shuffled plan batches, the Shapley-balanced forward
    (loss factors on the features entering each task's fusion), the task losses weighted by the
    balancer's lambda_t, the coalition pass after each step, per-epoch validation MAE."""

    samples_name = "samples"

    def __init__(self, cfg: TrainConfig, model: BMMQA, train_t: Tensors, val_t: Tensors, device: torch.device) -> None:
        self.cfg, self.model, self.train_t, self.val_t, self.device = cfg, model, train_t, val_t, device
        self.amp_dtype = resolve_amp(cfg.amp, device)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer, T_max=max(cfg.epochs, 1), eta_min=cfg.lr * 0.01
        )
        self.loss_names = tuple(model.cfg.tasks)
        self.tag = f"[{cfg.variant}] "
        self.balance = VARIANTS[cfg.variant]["balance"]
        self.balancer = Balancer(cfg, self.loss_names)
        self.gen = torch.Generator()
        self.n_train = len(train_t.keys)
        self.perm = torch.arange(self.n_train)
        self.modulate = False
        self.weights = dict.fromkeys(self.loss_names, 1.0)
        self.alphas: list[np.ndarray] = []
        self.shapley_seconds = 0.0

    def steps_per_epoch(self) -> int:
        return math.ceil(self.n_train / self.cfg.batch_size)

    def begin_epoch(self, epoch: int) -> None:
        cfg = self.cfg
        self.gen.manual_seed(cfg.seed * 1000 + epoch)
        self.perm = torch.randperm(self.n_train, generator=self.gen)
        self.modulate = self.balance and cfg.warmup_epochs <= epoch < int(cfg.modulation_end * cfg.epochs)
        on = self.balance and epoch >= cfg.warmup_epochs
        self.weights = dict(self.balancer.weights) if on else dict.fromkeys(self.loss_names, 1.0)
        self.alphas, self.shapley_seconds = [], 0.0

    def batch(self, step: int) -> dict | None:
        idx = self.perm[step * self.cfg.batch_size : (step + 1) * self.cfg.batch_size]
        if len(idx) < 2:
            return None
        t, dev = self.train_t, self.device
        img = t.image[idx].to(dev, non_blocking=True)
        if dev.type == "cuda":
            img = img.contiguous(memory_format=torch.channels_last)
        return {
            "image": img,
            "table": t.table[idx].to(dev, non_blocking=True),
            "gpr": t.gpr[idx].to(dev),
            "dd": t.dd[idx].to(dev),
        }

    def batch_size(self, batch: dict) -> int:
        return int(batch["image"].shape[0])

    def forward(self, batch: dict) -> dict:
        enc = self.model.encode(batch["image"], batch["table"])
        outs = self.model.heads(enc, loss_factors=self.balancer.loss_factors() if self.modulate else None)
        return {"enc": enc, "outs": outs}

    def losses(self, out: dict, batch: dict) -> dict[str, torch.Tensor]:
        return task_losses(out["outs"], batch["gpr"], batch["dd"], self.cfg.dd_ssim_weight)

    def loss_weights(self) -> dict[str, float]:
        return self.weights

    def after_step(self, step: int, batch: dict, out: dict) -> None:
        import time

        outs, enc = out["outs"], out["enc"]
        if "alpha" in outs:
            self.alphas.append(outs["alpha"].detach().float().mean(0).cpu().numpy())
        if step % max(self.cfg.shapley_every, 1) or len(self.model.cfg.modalities) != 2:
            return
        ts = time.perf_counter()
        gpr, dd = batch["gpr"], batch["dd"]
        with torch.no_grad(), _heads_eval(self.model), autocast(self.device, self.amp_dtype):
            detached = type(enc)(z={k: v.detach() for k, v in enc.z.items()}, feats=[f.detach() for f in enc.feats])
            co = self.model.coalitions(batch["image"], batch["table"], enc=detached)
            phi = coalition_shapley(
                {k: {kk: vv.float() for kk, vv in v.items()} for k, v in co.items()}, lambda o: task_errors(o, gpr, dd)
            )
        self.balancer.update(phi)
        self.shapley_seconds += time.perf_counter() - ts

    def end_epoch(self, epoch: int, mean_losses: dict[str, float]) -> dict[str, float]:
        psi_means = self.balancer.end_epoch()
        row: dict[str, float] = {"shapley_seconds": self.shapley_seconds}
        for t, psi in psi_means.items():
            if psi is not None:
                row[f"psi_{t}_image"], row[f"psi_{t}_table"] = float(psi[0]), float(psi[1])
        for t, w in self.weights.items():
            row[f"lambda_{t}"] = float(w)
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
        return _val_metrics(pred, self.val_t)

    def state_dict(self) -> dict:
        return {
            "balancer": self.balancer.state(),
            "generator": self.gen.get_state(),
            "alphas": [a.tolist() for a in self.alphas],
            "shapley_seconds": self.shapley_seconds,
        }

    def load_state_dict(self, state: dict) -> None:
        self.balancer.load(state["balancer"])
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
    progress, per-epoch rows and checkpoints."""
    cfg = cfg or TrainConfig()
    if cfg.variant not in VARIANTS:
        raise ValueError(f"unknown variant {cfg.variant!r}; choose from {sorted(VARIANTS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.seed)
    device = resolve_device(cfg.device)
    pack = load_pack(data_dir)
    train_rows, val_rows = pack.split("train"), pack.split("val")
    if len(train_rows) == 0 or len(val_rows) == 0:
        raise ValueError("the pack needs train and val rows")
    scaler = TabularScaler.fit(train_rows, pack.feature_columns)
    train_t, val_t = tensors_for(pack, train_rows, scaler), tensors_for(pack, val_rows, scaler)
    model = build_model(cfg, scaler.n_features, pack.images.shape[1], len(LABEL_COLUMNS))
    model.init_gpr_bias(train_t.gpr.mean(dim=0))
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    task = BMMQATask(cfg, model, train_t, val_t, device)
    (out / "config.json").write_text(
        json.dumps({"train": cfg.to_dict(), "model": model.cfg.to_dict(), "variant": cfg.variant}, indent=2)
    )
    (out / "tab_scaler.json").write_text(json.dumps(scaler.to_dict()))
    monitor = "val_dd_mae" if task.loss_names == ("dd",) else f"val_mae_{PRIMARY}"
    result = Trainer(
        task, cfg, out, monitor=monitor, config=cfg.to_dict(), device=device, log=log, callbacks=callbacks
    ).fit()
    metrics = {
        "variant": cfg.variant,
        f"best_{monitor}": result.best,
        **result.common_metrics(),
        "train_samples_per_s": result.samples_per_s,
        "n_train": len(train_t.keys),
        "n_val": len(val_t.keys),
    }
    return write_metrics(out / "metrics.json", metrics)


class _heads_eval:
    """Put the task heads in eval mode (dropout off) for the Shapley coalitions."""

    def __init__(self, model: BMMQA) -> None:
        self.mods = [m for name, m in model.named_children() if name in ("gpr_head", "fusion", "dd_decoder")]
        self.prev: list[bool] = []

    def __enter__(self):
        self.prev = [m.training for m in self.mods]
        for m in self.mods:
            m.eval()

    def __exit__(self, *exc):
        for m, p in zip(self.mods, self.prev, strict=True):
            m.train(p)
