"""The one training engine every model family runs on (nnU-Net's "one trainer, many variants").

A family supplies a :class:`TrainTask` — model, optimiser, scheduler, how to draw the epoch's
batches, the forward pass, the task losses and their weights, validation, and whatever state of
its own must survive a restart (Shapley balancer, DWA) — and :class:`Trainer` owns everything
else, the same way for every family:

* the epoch / step loop, bf16 autocast (``resolve_amp``: ``auto`` = bf16 on CUDA; ``bf16`` on
  any device; ``off``), gradient clipping (``grad_clip``, off by default);
* the time budget ``max_minutes``, checked after **every step** (not only between epochs): a run
  stops within one step of its budget and leaves a resumable checkpoint;
* early stopping on a named validation metric (``monitor``, ``mode`` min/max, ``patience``
  epochs without improvement) and ``model_best.pt`` (the weights of the best epoch);
* checkpoints (``checkpoint.pt``, atomic: a kill mid-write leaves the previous one) after every
  epoch **and** every ``checkpoint_minutes`` of training inside an epoch. A mid-epoch checkpoint
  holds the step, the running loss sums and the task's state (its data-order generator and
  accumulators), so a run killed with ``kill -9`` resumes at the step after the last checkpoint
  and ends with the same metrics as an uninterrupted run (bitwise on the CPU; tested);
* resumption only from a checkpoint written by the same configuration (``identity``: the fields
  that define a run; budget, device, precision and logging do not);
* deterministic seeding of the global RNGs (their states travel in every checkpoint);
* progress: a line every ``log_every`` steps and at least every ``progress_seconds`` (samples/s,
  losses, ETA of the epoch), a line per epoch, and :class:`Callback` hooks (``on_progress``,
  ``on_epoch_end``, ``on_checkpoint``, ``on_train_end``) through which the Dagster layer logs to
  its event log and MLflow without ``ml/`` importing either;
* ``history.csv`` (one row per epoch) and the common part of ``metrics.json``.

torch + numpy + pandas only.
"""

from __future__ import annotations

import contextlib
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ml.training.checkpoint import load_checkpoint, save_checkpoint, save_weights

__all__ = [
    "Callback",
    "FitResult",
    "FitSettings",
    "TrainTask",
    "Trainer",
    "autocast",
    "optimizer_step",
    "resolve_amp",
    "write_metrics",
]

#: Fields of a run's configuration that do not change what the run computes: a checkpoint
#: written with other values of these is resumed (a CPU run may be continued on a GPU, with
#: another budget or logging cadence).
RUNTIME_FIELDS = ("max_minutes", "device", "amp", "checkpoint_minutes", "log_every", "progress_seconds")


@dataclass
class FitSettings:
    """The engine's knobs, shared by every family's ``TrainConfig`` (which subclasses this)."""

    epochs: int = 100
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"  # auto (bf16 on CUDA) | bf16 (any device) | off
    max_minutes: float | None = None
    patience: int = 20
    grad_clip: float | None = None  # max global gradient norm; None: no clipping
    checkpoint_minutes: float | None = 5.0  # mid-epoch checkpoint period (0: after every step; None: epochs only)
    log_every: int = 0  # progress line every N steps (0: time-based only)
    progress_seconds: float = 30.0  # and at least this often


def write_metrics(path: str | Path, metrics: dict) -> dict:
    """``metrics.json`` as strict JSON (non-finite numbers as null); returns what was written."""
    import json

    from ml.utils.io import json_safe

    clean = json_safe(metrics)
    Path(path).write_text(json.dumps(clean, indent=2, allow_nan=False))
    return clean


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``amp`` on ``device`` (None: full precision)."""
    if amp not in ("auto", "bf16", "off"):
        raise ValueError(f"amp must be auto, bf16 or off, not {amp!r}")
    if amp == "bf16" or (amp == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` when ``dtype`` is set, else a no-op context."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def optimizer_step(
    optimizer: torch.optim.Optimizer,
    losses: dict[str, torch.Tensor],
    weights: dict[str, float],
    grad_clip: float | None = None,
) -> torch.Tensor:
    """Backward of the weighted sum of the task losses, optional clipping, one optimiser step;
    returns the total loss (detached)."""
    total = sum(weights.get(t, 1.0) * v for t, v in losses.items())
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    if grad_clip:
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    return total.detach()


class TrainTask(ABC):
    """What a model family supplies to :class:`Trainer`. Subclasses set ``model``, ``optimizer``,
    ``scheduler`` (or None), ``loss_names`` and ``tag`` (log prefix), implement the abstract hooks
    and override the optional ones (no-ops here)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any = None
    loss_names: tuple[str, ...] = ()
    tag: str = ""
    samples_name: str = "samples"  # what one batch item is called in progress lines ("slices", "plans")

    @abstractmethod
    def steps_per_epoch(self) -> int:
        """Optimiser steps in one epoch."""

    def begin_epoch(self, epoch: int) -> None:
        """Fix the epoch's data order (from the seed and ``epoch`` only: a resumed epoch replays it).
        Optional: without it the task draws its batches from ``batch`` alone."""
        return None

    @abstractmethod
    def batch(self, step: int) -> Any | None:
        """The batch of ``step`` (None: skip the step)."""

    @abstractmethod
    def batch_size(self, batch: Any) -> int:
        """Samples in ``batch`` (for the throughput figures)."""

    @abstractmethod
    def forward(self, batch: Any) -> Any:
        """The model's outputs for ``batch`` (runs under autocast)."""

    @abstractmethod
    def losses(self, out: Any, batch: Any) -> dict[str, torch.Tensor]:
        """Unweighted task losses (fp32, outside autocast)."""

    def loss_weights(self) -> dict[str, float]:
        return dict.fromkeys(self.loss_names, 1.0)

    def after_step(self, step: int, batch: Any, out: Any) -> None:
        """After the optimiser step (e.g. Shapley contributions for the balancer). Optional."""
        return None

    def end_epoch(self, epoch: int, mean_losses: dict[str, float]) -> dict[str, float]:
        """Epoch bookkeeping after the training steps; returns extra history columns."""
        return {}

    @abstractmethod
    def validate(self, epoch: int) -> dict[str, float]:
        """Validation metrics after ``epoch`` (``val_*``; the monitored metric among them)."""

    def state_dict(self) -> dict:
        """The task's own state (generator, accumulators...) for checkpoints."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned. Optional (a task without own state)."""
        return None


class Callback:
    """Progress hooks (all optional). ``info``/``row`` hold plain Python numbers and strings."""

    def on_train_start(self, info: dict) -> None: ...

    def on_progress(self, info: dict) -> None: ...

    def on_epoch_end(self, epoch: int, row: dict) -> None: ...

    def on_checkpoint(self, info: dict) -> None: ...

    def on_train_end(self, result: FitResult) -> None: ...


@dataclass
class FitResult:
    history: list[dict]
    best: float
    best_epoch: int
    stopped_by: str  # epochs | early_stopping | max_minutes
    samples_per_s: float
    train_seconds: float
    device: torch.device
    amp: str
    monitor: str
    resumed_from: dict | None = None
    extra: dict = field(default_factory=dict)

    @property
    def epochs_run(self) -> int:
        return len(self.history)

    @property
    def complete(self) -> bool:
        """True when at least one epoch was validated (``model_best.pt`` exists)."""
        return self.best_epoch >= 0

    def best_row(self) -> dict:
        return next((h for h in self.history if h["epoch"] == self.best_epoch), {})

    def common_metrics(self) -> dict:
        dev = self.device
        return {
            "best_epoch": self.best_epoch,
            "epochs_run": self.epochs_run,
            "stopped_by": self.stopped_by,
            "device": str(dev),
            "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "amp": self.amp,
            "peak_gpu_mem_gb": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else 0.0,
        }


class _Budget:
    def __init__(self, max_minutes: float | None) -> None:
        self.t0 = time.perf_counter()
        self.max_minutes = max_minutes

    def spent(self) -> bool:
        return self.max_minutes is not None and (time.perf_counter() - self.t0) / 60 >= self.max_minutes


class Trainer:
    """Runs a :class:`TrainTask` to completion (or to its budget) with checkpoints in ``out_dir``.

    ``identity`` maps a configuration dict to the part that defines the run; a checkpoint whose
    configuration differs there is ignored (logged) and training starts over.
    """

    def __init__(
        self,
        task: TrainTask,
        settings: FitSettings,
        out_dir: str | Path,
        *,
        monitor: str,
        mode: str = "min",
        config: dict | None = None,
        identity: Callable[[dict], dict] | None = None,
        device: torch.device | None = None,
        log: Callable[[str], None] = print,
        callbacks: Iterable[Callback] | None = None,
    ) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be min or max, not {mode!r}")
        self.task = task
        self.s = settings
        self.out = Path(out_dir)
        self.monitor, self.mode = monitor, mode
        self.config = config if config is not None else {}
        self.identity = identity or (lambda d: {k: v for k, v in d.items() if k not in RUNTIME_FIELDS})
        self.device = device or next(task.model.parameters()).device
        self.amp_dtype = resolve_amp(settings.amp, self.device)
        self.log = log
        self.callbacks = list(callbacks or [])
        self.ckpt_path = self.out / "checkpoint.pt"

    # -- state -----------------------------------------------------------------------------
    def _better(self, score: float, best: float) -> bool:
        if not math.isfinite(score):
            return False
        return score < best if self.mode == "min" else score > best

    def _save(self, st: dict, *, in_epoch: bool) -> None:
        t = self.task
        save_checkpoint(
            self.ckpt_path,
            {
                "model": t.model.state_dict(),
                "optimizer": t.optimizer.state_dict(),
                "scheduler": t.scheduler.state_dict() if t.scheduler is not None else None,
                "task": t.state_dict(),
                "history": st["history"],
                "epoch": st["epoch"],
                "in_epoch": in_epoch,
                "step": st["step"],
                "sums": st["sums"],
                "n_batches": st["n_batches"],
                "samples": st["samples"],
                "epoch_seconds": st["epoch_seconds"],
                "best": st["best"],
                "best_epoch": st["best_epoch"],
                "stale": st["stale"],
                "train_seconds": st["train_seconds"],
                "samples_seen": st["samples_seen"],
                "train_config": self.config,
            },
        )
        self._emit(
            "on_checkpoint",
            {"epoch": st["epoch"], "step": st["step"], "in_epoch": in_epoch, "path": str(self.ckpt_path)},
        )

    def _restore(self) -> dict | None:
        ck = load_checkpoint(self.ckpt_path, self.device)
        if ck is None:
            return None
        if self.identity(ck.get("train_config", {})) != self.identity(self.config):
            self.log(f"{self.task.tag}checkpoint belongs to another configuration: starting over")
            return None
        if "task" not in ck:
            self.log(f"{self.task.tag}checkpoint predates the shared training engine: starting over")
            return None
        t = self.task
        t.model.load_state_dict(ck["model"])
        t.optimizer.load_state_dict(ck["optimizer"])
        if t.scheduler is not None and ck["scheduler"] is not None:
            t.scheduler.load_state_dict(ck["scheduler"])
        t.load_state_dict(ck["task"])
        return ck

    def _emit(self, hook: str, *args) -> None:
        for cb in self.callbacks:
            getattr(cb, hook, lambda *a: None)(*args)

    # -- the loop ----------------------------------------------------------------------------
    def fit(self) -> FitResult:
        self.out.mkdir(parents=True, exist_ok=True)
        task, s = self.task, self.s
        steps = task.steps_per_epoch()
        st = {
            "history": [],
            "epoch": 0,
            "step": 0,
            "sums": {},
            "n_batches": 0,
            "samples": 0,
            "epoch_seconds": 0.0,
            "best": math.inf if self.mode == "min" else -math.inf,
            "best_epoch": -1,
            "stale": 0,
            "train_seconds": 0.0,
            "samples_seen": 0,
        }
        ck = self._restore()
        resumed = None
        mid_epoch_state = None
        if ck is not None:
            for k in st:
                st[k] = ck[k]
            if ck["in_epoch"]:
                mid_epoch_state = ck["task"]
            else:
                st.update(epoch=ck["epoch"] + 1, step=0, sums={}, n_batches=0, samples=0, epoch_seconds=0.0)
            resumed = {"epoch": ck["epoch"], "step": ck["step"], "in_epoch": ck["in_epoch"]}
            where = f"epoch {ck['epoch']} step {ck['step']}/{steps}" if ck["in_epoch"] else f"after epoch {ck['epoch']}"
            self.log(f"{task.tag}resumed {where} (best {self.monitor} {st['best']:.4g} at epoch {st['best_epoch']})")
        budget = _Budget(s.max_minutes)
        amp_name = "bf16" if self.amp_dtype is not None else "off"
        self._emit(
            "on_train_start",
            {
                "steps_per_epoch": steps,
                "epochs": s.epochs,
                "device": str(self.device),
                "amp": amp_name,
                "resumed": resumed,
            },
        )
        self.log(
            f"{task.tag}training on {self.device} (amp {amp_name}): {s.epochs} epochs x {steps} steps, "
            f"checkpoint every epoch"
            + (f" and every {s.checkpoint_minutes:g} min" if s.checkpoint_minutes is not None else "")
            + (f", budget {s.max_minutes:g} min" if s.max_minutes is not None else "")
        )
        stopped_by = "epochs"
        while st["epoch"] < s.epochs:
            if st["stale"] >= s.patience:  # a resumed run that had already stopped early
                stopped_by = "early_stopping"
                break
            reason = self._run_epoch(st, steps, budget, mid_epoch_state)
            mid_epoch_state = None
            if reason:
                stopped_by = reason
                break
            st["epoch"] += 1
        # training throughput over every step run (a partial last epoch included), validation excluded
        seen, seconds = st["samples_seen"] + st["samples"], st["train_seconds"] + st["epoch_seconds"]
        result = FitResult(
            history=st["history"],
            best=st["best"],
            best_epoch=st["best_epoch"],
            stopped_by=stopped_by,
            samples_per_s=seen / seconds if seconds > 0 else float("nan"),
            train_seconds=seconds,
            device=self.device,
            amp=amp_name,
            monitor=self.monitor,
            resumed_from=resumed,
        )
        pd.DataFrame(st["history"] or None, columns=None if st["history"] else ["epoch"]).to_csv(
            self.out / "history.csv", index=False
        )
        if stopped_by == "max_minutes" and st["step"] > 0:
            self.log(
                f"{task.tag}budget spent in epoch {st['epoch']} at step {st['step']}/{steps}: "
                "checkpoint saved, run again to resume"
            )
        self._emit("on_train_end", result)
        return result

    def _run_epoch(self, st: dict, steps: int, budget: _Budget, mid_epoch_state: dict | None) -> str | None:
        task, s = self.task, self.s
        epoch = st["epoch"]
        task.begin_epoch(epoch)
        if mid_epoch_state is not None:
            task.load_state_dict(mid_epoch_state)  # the generator and accumulators where the checkpoint left them
        task.model.train()
        weights = task.loss_weights()
        t_epoch = time.perf_counter() - st["epoch_seconds"]
        last_ckpt = last_progress = time.perf_counter()
        progress_samples, progress_t = st["samples"], time.perf_counter()
        for step in range(st["step"], steps):
            batch = task.batch(step)
            if batch is not None:
                with autocast(self.device, self.amp_dtype):
                    out = task.forward(batch)
                losses = task.losses(out, batch)
                optimizer_step(task.optimizer, losses, weights, s.grad_clip)
                task.after_step(step, batch, out)
                for t, v in losses.items():
                    st["sums"][t] = st["sums"].get(t, 0.0) + float(v.detach())
                st["n_batches"] += 1
                st["samples"] += task.batch_size(batch)
            st["step"] = step + 1
            now = time.perf_counter()
            st["epoch_seconds"] = now - t_epoch
            if (s.log_every and st["step"] % s.log_every == 0) or now - last_progress >= s.progress_seconds:
                rate = (st["samples"] - progress_samples) / max(now - progress_t, 1e-9)
                self._progress(st, steps, rate)
                last_progress, progress_samples, progress_t = now, st["samples"], now
            if st["step"] < steps:
                if budget.spent():
                    self._sync()
                    st["epoch_seconds"] = time.perf_counter() - t_epoch
                    self._save(st, in_epoch=True)
                    return "max_minutes"
                if s.checkpoint_minutes is not None and now - last_ckpt >= 60 * s.checkpoint_minutes:
                    self._sync()
                    self._save(st, in_epoch=True)
                    last_ckpt = time.perf_counter()
        if task.scheduler is not None:
            task.scheduler.step()
        self._sync()
        st["epoch_seconds"] = time.perf_counter() - t_epoch
        st["train_seconds"] += st["epoch_seconds"]
        st["samples_seen"] += st["samples"]
        means = {t: v / max(st["n_batches"], 1) for t, v in st["sums"].items()}
        extra = task.end_epoch(epoch, means)
        vm = task.validate(epoch)
        lr = task.optimizer.param_groups[0]["lr"]
        if task.scheduler is not None and hasattr(task.scheduler, "get_last_lr"):
            lr = task.scheduler.get_last_lr()[0]
        row = {
            "epoch": epoch,
            "lr": lr,
            "epoch_seconds": st["epoch_seconds"],
            f"{task.samples_name}_per_s": st["samples"] / max(st["epoch_seconds"], 1e-9),
            **{f"train_loss_{t}": v for t, v in means.items()},
            **extra,
            **vm,
        }
        st["history"].append(row)
        score = float(vm.get(self.monitor, math.nan))
        if self._better(score, st["best"]):
            st["best"], st["best_epoch"], st["stale"] = score, epoch, 0
            save_weights(self.out / "model_best.pt", task.model.state_dict())
        else:
            st["stale"] += 1
        self.log(
            f"{task.tag}epoch {epoch} "
            + " ".join(f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float) and k in self._shown(row))
        )
        self._emit("on_epoch_end", epoch, _plain(row))
        st.update(step=0, sums={}, n_batches=0, samples=0, epoch_seconds=0.0)  # counted in the totals above
        self._save(st, in_epoch=False)
        if st["stale"] >= s.patience:
            return "early_stopping"
        if budget.spent():
            return "max_minutes"
        return None

    def _shown(self, row: dict) -> set[str]:
        keys = {k for k in row if k.startswith(("train_loss", "lambda_")) or k.endswith("_per_s")}
        keys |= {k for k in row if k.startswith("val_") and not k.startswith("val_dice_")}  # not per ROI
        return keys

    def _progress(self, st: dict, steps: int, rate: float) -> None:
        task = self.task
        done = st["step"]
        eta = (steps - done) * st["epoch_seconds"] / max(done, 1) if done else math.nan
        losses = {t: v / max(st["n_batches"], 1) for t, v in st["sums"].items()}
        info = {
            "epoch": st["epoch"],
            "step": done,
            "steps": steps,
            f"{task.samples_name}_per_s": rate,
            "eta_epoch_s": eta,
            **{f"loss_{t}": v for t, v in losses.items()},
        }
        self.log(
            f"{task.tag}epoch {st['epoch']} step {done}/{steps} ({100 * done / steps:.0f} %) "
            f"{rate:.1f} {task.samples_name}/s "
            + " ".join(f"loss_{t}={v:.4g}" for t, v in losses.items())
            + f" ETA epoch {_fmt_seconds(eta)}"
        )
        self._emit("on_progress", info)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _fmt_seconds(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    m, sec = divmod(round(s), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s"


def _plain(row: dict) -> dict:
    out = {}
    for k, v in row.items():
        if isinstance(v, (np.floating, np.integer)):
            v = v.item()
        out[k] = v
    return out
