"""Checkpoint files of the training engine: atomic writes, RNG states, weights-only loading.

A checkpoint is one ``torch.save`` of a dict (model, optimiser, scheduler, the task's own state,
history, loop position) plus every global RNG state, written to a temporary file and renamed,
so a process killed mid-write (``kill -9``, an out-of-time scheduler) leaves the previous
checkpoint intact.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from ml.utils.io import atomic_path

__all__ = ["load_checkpoint", "rng_state", "save_checkpoint", "save_weights", "set_rng_state"]


def rng_state() -> dict:
    """Every RNG a resumed run must continue from."""
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),  # noqa: NPY002 (the global RNG that libraries draw from)
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])  # noqa: NPY002
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Atomic ``torch.save`` of ``state`` plus the global RNG states."""
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save({**state, "rng": rng_state()}, tmp)


def save_weights(path: str | Path, state_dict: dict) -> None:
    """Atomic ``torch.save`` of a model's ``state_dict`` (``model_best.pt``)."""
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(state_dict, tmp)


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> dict | None:
    """The checkpoint at ``path`` (None when there is none), with the global RNGs restored."""
    if not Path(path).exists():
        return None
    ck = torch.load(path, map_location=device, weights_only=False)
    if "rng" in ck:
        set_rng_state(ck["rng"])
    return ck
