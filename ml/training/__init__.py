"""The shared training engine (``Trainer`` + a family's ``TrainTask``) and its checkpoints."""

from ml.training.checkpoint import load_checkpoint, save_checkpoint, save_weights
from ml.training.engine import (
    RUNTIME_FIELDS,
    Callback,
    FitResult,
    FitSettings,
    Trainer,
    TrainTask,
    autocast,
    optimizer_step,
    resolve_amp,
    write_metrics,
)

__all__ = [
    "RUNTIME_FIELDS",
    "Callback",
    "FitResult",
    "FitSettings",
    "TrainTask",
    "Trainer",
    "autocast",
    "load_checkpoint",
    "optimizer_step",
    "resolve_amp",
    "save_checkpoint",
    "save_weights",
    "write_metrics",
]
