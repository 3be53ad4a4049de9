"""Seeds, devices and RNG state shared by the trainers (torch + numpy only)."""

from __future__ import annotations

import random
import time

import numpy as np
import torch


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def rng_state() -> dict:
    """Every RNG a resumed run must continue from."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def matching_checkpoint(path, cfg_dict: dict, identity, device, log=print, tag: str = ""):
    """The checkpoint at ``path`` when it was written by the same configuration (``identity``
    strips what may differ between a run and its resumption: budget, device...), else None."""
    from pathlib import Path

    if not Path(path).exists():
        return None
    ck = torch.load(path, map_location=device, weights_only=False)
    if identity(ck.get("train_config", {})) != identity(cfg_dict):
        log(f"{tag}checkpoint belongs to another configuration: starting over")
        return None
    set_rng_state(ck["rng"])
    return ck


def restore_training(ck: dict, model, opt, sched) -> tuple[list, int, float, int, int]:
    """Load model/optimiser/scheduler from a checkpoint -> (history, start_epoch, best, best_epoch, stale)."""
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    sched.load_state_dict(ck["scheduler"])
    return ck["history"], ck["epoch"] + 1, ck["best"], ck["best_epoch"], ck["stale"]


def save_checkpoint(path, state: dict) -> None:
    """Atomic ``torch.save`` (a kill mid-write leaves the previous checkpoint intact)."""
    from ml.utils.io import atomic_path

    with atomic_path(path, suffix=".pt") as tmp:
        torch.save({**state, "rng": rng_state()}, tmp)


def stop_reason(stale: int, patience: int, t_start: float | None = None,
                max_minutes: float | None = None) -> str | None:
    """Why a training loop should stop now: ``"early_stopping"`` after ``patience`` epochs without
    improvement, ``"max_minutes"`` once the budget since ``t_start`` (``time.perf_counter()``) is
    spent, else None."""
    if stale >= patience:
        return "early_stopping"
    if max_minutes is not None and t_start is not None and (time.perf_counter() - t_start) / 60 >= max_minutes:
        return "max_minutes"
    return None
