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
stopping on validation MAE at 2%/2mm (DD MAE for ``dd_only``) with patience 15. Mixed precision
(bf16 autocast) on CUDA; deterministic seeds; a checkpoint after every epoch
(``checkpoint.pt``: model, optimiser, scheduler, EMA state, history, RNG states) and automatic
resume from it; ``max_minutes`` stops cleanly between epochs (resume continues).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.nn import functional as F

from ml.metrics.image import ssim
from ml.psqa.bmmqa import BMMQA, MODALITIES, BMMQAConfig
from ml.psqa.dataset import CRITERIA, LABEL_COLUMNS, PRIMARY, Pack, TabularScaler, load_pack
from ml.psqa.shapley import coalition_shapley, task_errors
from ml.utils.torch_utils import (
    matching_checkpoint,
    resolve_device,
    restore_training,
    save_checkpoint,
    set_seed,
    stop_reason,
)

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
class TrainConfig:
    variant: str = "bmmqa"
    epochs: int = 60
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"  # auto | bf16 | off
    max_minutes: float | None = None
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
    mcfg = BMMQAConfig(in_channels=in_channels, n_tab=n_tab, n_criteria=n_criteria, **{
        k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})
    return BMMQA(mcfg)


@dataclass
class Tensors:
    image: torch.Tensor
    table: torch.Tensor
    gpr: torch.Tensor
    dd: torch.Tensor
    keys: list[str]


def tensors_for(pack: Pack, rows: pd.DataFrame, scaler: TabularScaler, label_columns=LABEL_COLUMNS) -> Tensors:
    idx = rows["image_index"].to_numpy()
    return Tensors(
        image=torch.from_numpy(np.asarray(pack.images[idx], dtype=np.float32)),
        table=torch.from_numpy(scaler.transform(rows)),
        gpr=torch.from_numpy(rows[list(label_columns)].to_numpy(dtype=np.float32, copy=True)),
        dd=torch.from_numpy(np.asarray(pack.dd[idx], dtype=np.float32)),
        keys=rows["plan_key"].astype(str).tolist(),
    )


class Balancer:
    """EMA Shapley contributions -> loss factors and task weights."""

    def __init__(self, cfg: TrainConfig, tasks: tuple[str, ...]) -> None:
        self.cfg = cfg
        self.tasks = tasks
        self.psi = {t: None for t in tasks}  # EMA of normalised contributions, (2,)
        self.epoch_psi: dict[str, list[np.ndarray]] = {t: [] for t in tasks}
        self.weights = {t: 1.0 for t in tasks}

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
        return {"psi": {t: (None if v is None else v.tolist()) for t, v in self.psi.items()},
                "weights": self.weights}

    def load(self, state: dict) -> None:
        self.psi = {t: (None if v is None else np.asarray(v)) for t, v in state["psi"].items()}
        self.weights = state["weights"]


def task_losses(out: dict[str, torch.Tensor], gpr: torch.Tensor, dd: torch.Tensor, ssim_weight: float
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


@torch.no_grad()
def predict_tensors(model: BMMQA, data: Tensors, device: torch.device, batch_size: int = 64,
                    amp: bool = False) -> dict[str, np.ndarray]:
    model.eval()
    outs: dict[str, list[np.ndarray]] = {}
    for i in range(0, len(data.keys), batch_size):
        img = data.image[i:i + batch_size].to(device)
        tab = data.table[i:i + batch_size].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(img, tab)
        for k, v in out.items():
            outs.setdefault(k, []).append(v.float().cpu().numpy())
    return {k: np.concatenate(v) for k, v in outs.items()}


@torch.no_grad()
def shapley_on(model: BMMQA, data: Tensors, device: torch.device, batch_size: int = 64) -> dict[str, np.ndarray]:
    """Per-sample Shapley values per task on a whole split: {task: (N, 2)} (image, table)."""
    model.eval()
    acc: dict[str, list[np.ndarray]] = {}
    for i in range(0, len(data.keys), batch_size):
        img, tab = data.image[i:i + batch_size].to(device), data.table[i:i + batch_size].to(device)
        gpr, dd = data.gpr[i:i + batch_size].to(device), data.dd[i:i + batch_size].to(device)
        co = model.coalitions(img, tab)
        phi = coalition_shapley(co, lambda o: task_errors(o, gpr, dd))  # noqa: B023
        for t, v in phi.items():
            acc.setdefault(t, []).append(v.T.cpu().numpy())
    return {t: np.concatenate(v) for t, v in acc.items()}


def _val_metrics(pred: dict[str, np.ndarray], data: Tensors) -> dict[str, float]:
    m = {}
    if "gpr" in pred:
        err = np.abs(pred["gpr"] - data.gpr.numpy())
        for j, col in enumerate(LABEL_COLUMNS[: err.shape[1]]):
            m[f"val_mae_{col}"] = float(err[:, j].mean())
    if "dd" in pred:
        m["val_dd_mae"] = float(np.abs(pred["dd"] - data.dd.numpy()).mean())
    return m


def train(data_dir: str | os.PathLike, out_dir: str | os.PathLike, cfg: TrainConfig | None = None,
          log=print) -> dict:
    """Train (or resume) one variant; returns the final metrics dict (also in metrics.json)."""
    cfg = cfg or TrainConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.seed)
    device = resolve_device(cfg.device)
    use_amp = device.type == "cuda" and cfg.amp in ("auto", "bf16")
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
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.epochs, 1), eta_min=cfg.lr * 0.01)
    tasks = model.cfg.tasks
    balancer = Balancer(cfg, tasks)
    spec = VARIANTS[cfg.variant]
    (out / "config.json").write_text(json.dumps({"train": cfg.to_dict(), "model": model.cfg.to_dict(),
                                                 "variant": cfg.variant}, indent=2))
    (out / "tab_scaler.json").write_text(json.dumps(scaler.to_dict()))
    history: list[dict] = []
    start_epoch, best, best_epoch, stale = 0, float("inf"), -1, 0
    ckpt_path = out / "checkpoint.pt"
    ck = matching_checkpoint(ckpt_path, cfg.to_dict(), _identity, device, log)
    if ck is not None:
        history, start_epoch, best, best_epoch, stale = restore_training(ck, model, opt, sched)
        balancer.load(ck["balancer"])
        log(f"resumed from epoch {ck['epoch']} (best {best:.4f} at epoch {best_epoch})")
    monitor = "val_dd_mae" if tasks == ("dd",) else f"val_mae_{PRIMARY}"
    t_start = time.perf_counter()
    n_train = len(train_t.keys)
    g = torch.Generator().manual_seed(cfg.seed)
    samples_seen, train_time = 0, 0.0
    stopped_by = "epochs"
    for epoch in range(start_epoch, cfg.epochs):
        if stop_reason(stale, cfg.patience):  # a resumed run that had already stopped early
            stopped_by = "early_stopping"
            break
        g.manual_seed(cfg.seed * 1000 + epoch)
        perm = torch.randperm(n_train, generator=g)
        modulate = spec["balance"] and cfg.warmup_epochs <= epoch < int(cfg.modulation_end * cfg.epochs)
        weights = balancer.weights if (spec["balance"] and epoch >= cfg.warmup_epochs) else {t: 1.0 for t in tasks}
        model.train()
        sums: dict[str, float] = {}
        n_batches, shapley_time, t0 = 0, 0.0, time.perf_counter()
        alphas = []
        for it, i in enumerate(range(0, n_train, cfg.batch_size)):
            idx = perm[i:i + cfg.batch_size]
            if len(idx) < 2:
                continue
            img = train_t.image[idx].to(device, non_blocking=True)
            tab = train_t.table[idx].to(device, non_blocking=True)
            gpr, dd = train_t.gpr[idx].to(device), train_t.dd[idx].to(device)
            if device.type == "cuda":
                img = img.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                enc = model.encode(img, tab)
                outs = model.heads(enc, loss_factors=balancer.loss_factors() if modulate else None)
            losses = task_losses(outs, gpr, dd, cfg.dd_ssim_weight)
            loss = sum(weights[t] * losses[t] for t in losses)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if "alpha" in outs:
                alphas.append(outs["alpha"].detach().float().mean(0).cpu().numpy())
            if it % max(cfg.shapley_every, 1) == 0 and len(model.cfg.modalities) == 2:
                ts = time.perf_counter()
                with torch.no_grad(), _heads_eval(model), torch.autocast(device.type, dtype=torch.bfloat16,
                                                                         enabled=use_amp):
                    detached = type(enc)(z={k: v.detach() for k, v in enc.z.items()},
                                         feats=[f.detach() for f in enc.feats])
                    co = model.coalitions(img, tab, enc=detached)
                    phi = coalition_shapley({k: {kk: vv.float() for kk, vv in v.items()} for k, v in co.items()},
                                            lambda o: task_errors(o, gpr, dd))  # noqa: B023
                balancer.update(phi)
                shapley_time += time.perf_counter() - ts
            for t, v in losses.items():
                sums[t] = sums.get(t, 0.0) + float(v.detach())
            n_batches += 1
        sched.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        epoch_time = time.perf_counter() - t0
        train_time += epoch_time
        samples_seen += n_train
        psi_means = balancer.end_epoch()
        pred = predict_tensors(model, val_t, device, amp=use_amp)
        vm = _val_metrics(pred, val_t)
        row = {"epoch": epoch, "lr": sched.get_last_lr()[0], "epoch_seconds": epoch_time,
               "shapley_seconds": shapley_time, "samples_per_s": n_train / max(epoch_time, 1e-9),
               **{f"train_loss_{t}": s / max(n_batches, 1) for t, s in sums.items()}, **vm}
        for t, psi in psi_means.items():
            if psi is not None:
                row[f"psi_{t}_image"], row[f"psi_{t}_table"] = float(psi[0]), float(psi[1])
        for t, w in weights.items():
            row[f"lambda_{t}"] = float(w)
        if modulate:
            for t, ks in balancer.loss_factors().items():
                for m, k in ks.items():
                    row[f"k_{t}_{m}"] = k
        if alphas:
            a = np.mean(alphas, axis=0)
            row["alpha_image"], row["alpha_table"] = float(a[0]), float(a[1])
        history.append(row)
        score = vm.get(monitor, float("inf"))
        if score < best:
            best, best_epoch, stale = score, epoch, 0
            torch.save(model.state_dict(), out / "model_best.pt")
        else:
            stale += 1
        log(f"[{cfg.variant}] epoch {epoch} " + " ".join(
            f"{k}={v:.4g}" for k, v in row.items() if k.startswith(("train_loss", "val_")) or k == "samples_per_s"))
        _save_checkpoint(ckpt_path, model, opt, sched, balancer, history, epoch, best, best_epoch, stale, cfg)
        reason = stop_reason(stale, cfg.patience, t_start, cfg.max_minutes)
        if reason:
            stopped_by = reason
            break
    pd.DataFrame(history).to_csv(out / "history.csv", index=False)
    metrics = {
        "variant": cfg.variant, "best_epoch": best_epoch, f"best_{monitor}": best,
        "epochs_run": len(history), "stopped_by": stopped_by, "device": str(device),
        "device_name": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "amp": "bf16" if use_amp else "off",
        "train_samples_per_s": samples_seen / max(train_time, 1e-9) if samples_seen else float("nan"),
        "peak_gpu_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0,
        "n_train": n_train, "n_val": len(val_t.keys),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def _identity(d: dict) -> dict:
    """The parts of a TrainConfig that define the run (the time budget and device do not)."""
    return {k: v for k, v in d.items() if k not in ("max_minutes", "device")}


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


def _save_checkpoint(path: Path, model, opt, sched, balancer, history, epoch, best, best_epoch, stale, cfg) -> None:
    save_checkpoint(path, {
        "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
        "balancer": balancer.state(), "history": history, "epoch": epoch, "best": best, "best_epoch": best_epoch,
        "stale": stale, "train_config": cfg.to_dict()})


# ---------------------------------------------------------------------------------------
# loading a trained model directory
# ---------------------------------------------------------------------------------------
def load_model(model_dir: str | os.PathLike, device: str = "cpu") -> tuple[BMMQA, TabularScaler, dict]:
    model_dir = Path(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    model = BMMQA(BMMQAConfig.from_dict(cfg["model"]))
    state = torch.load(model_dir / "model_best.pt", map_location=device, weights_only=True)
    model.load_state_dict(state)
    model.to(device).eval()
    scaler = TabularScaler.from_dict(json.loads((model_dir / "tab_scaler.json").read_text()))
    return model, scaler, cfg


def predict(model_dir: str | os.PathLike, data_dir: str | os.PathLike, split: str | None = "test",
            device: str = "auto") -> tuple[pd.DataFrame, np.ndarray | None]:
    """Predicted GPRs (one row per plan) and DD maps for a split of a pack (all rows if None)."""
    dev = resolve_device(device)
    model, scaler, _ = load_model(model_dir, str(dev))
    pack = load_pack(data_dir)
    rows = pack.table if split is None else pack.split(split)
    data = tensors_for(pack, rows, scaler)
    pred = predict_tensors(model, data, dev)
    df = pd.DataFrame({"plan_key": data.keys})
    if "gpr" in pred:
        for j, col in enumerate(LABEL_COLUMNS):
            df[f"pred_{col}"] = pred["gpr"][:, j]
    return df, pred.get("dd")


def evaluate(model_dir: str | os.PathLike, data_dir: str | os.PathLike, split: str = "test",
             device: str = "auto") -> dict:
    """Metrics of a trained model on a split (GPR per criterion, failing plans, DD SSIM/MAE)."""
    from ml.psqa.evaluate import dd_metrics, gpr_metrics

    pack = load_pack(data_dir)
    rows = pack.split(split)
    pred_df, dd_pred = predict(model_dir, data_dir, split, device)
    result: dict = {"split": split, "n": len(rows)}
    if f"pred_{LABEL_COLUMNS[0]}" in pred_df:
        for col, name in zip(LABEL_COLUMNS, CRITERIA, strict=True):
            result[name] = gpr_metrics(pred_df[f"pred_{col}"].to_numpy(), rows[col].to_numpy())
    if dd_pred is not None:
        true = np.asarray(pack.dd[rows["image_index"].to_numpy()])
        m = dd_metrics(dd_pred, true)
        m.pop("per_plan_ssim")
        result["dd"] = m
    return result
