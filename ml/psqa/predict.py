"""Inference with a trained BMMQA (or baseline) model directory.

A model directory (written by ``ml.psqa.train.train``) holds ``config.json`` (variant, train and
model configuration), ``model_best.pt`` (the selected weights) and ``tab_scaler.json`` (the
tabular preprocessing fitted on the training plans). Here:

* ``load_model``: the network in eval mode, its scaler and configuration;
* ``predict_tensors`` / ``predict``: predicted GPRs per criterion (one row per plan) and
  dose-difference maps for a split of a pack (``python -m ml bmmqa predict``);
* ``predict_models``: the same for several model directories (the ablation);
* ``shapley_on`` / ``shapley_table``: per-plan two-player Shapley contributions of the image and
  table modalities to each task's error, from the fast coalition forward.

No test-time augmentation: the planes have no symmetry a flip would respect (MLC leaf banks and
gantry angles are not mirror-invariant). Metrics on these predictions live in
``ml.psqa.evaluate``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ml.psqa.bmmqa import BMMQA, BMMQAConfig
from ml.psqa.dataset import LABEL_COLUMNS, TabularScaler, Tensors, load_pack, tensors_for
from ml.psqa.shapley import coalition_shapley, task_errors
from ml.training import autocast
from ml.utils.torch_utils import resolve_device

__all__ = ["load_model", "predict", "predict_models", "predict_tensors", "shapley_on", "shapley_table"]


def load_model(model_dir: str | os.PathLike, device: str = "cpu") -> tuple[BMMQA, TabularScaler, dict]:
    model_dir = Path(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    model = BMMQA(BMMQAConfig.from_dict(cfg["model"]))
    state = torch.load(model_dir / "model_best.pt", map_location=device, weights_only=True)
    model.load_state_dict(state)
    model.to(device).eval()
    scaler = TabularScaler.from_dict(json.loads((model_dir / "tab_scaler.json").read_text()))
    return model, scaler, cfg


@torch.no_grad()
def predict_tensors(
    model: BMMQA, data: Tensors, device: torch.device, batch_size: int = 64, amp_dtype: torch.dtype | None = None
) -> dict[str, np.ndarray]:
    """{task: predictions} for every row of ``data`` (GPR in %, DD maps in % of max)."""
    model.eval()
    outs: dict[str, list[np.ndarray]] = {}
    for i in range(0, len(data.keys), batch_size):
        img = data.image[i : i + batch_size].to(device)
        tab = data.table[i : i + batch_size].to(device)
        with autocast(device, amp_dtype):
            out = model(img, tab)
        for k, v in out.items():
            outs.setdefault(k, []).append(v.float().cpu().numpy())
    return {k: np.concatenate(v) for k, v in outs.items()}


def predict(
    model_dir: str | os.PathLike, data_dir: str | os.PathLike, split: str | None = "test", device: str = "auto"
) -> tuple[pd.DataFrame, np.ndarray | None]:
    """Predicted GPRs (one row per plan: ``plan_key``, ``pred_<criterion>``) and DD maps for a
    split of a pack (all rows if ``split`` is None)."""
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


def predict_models(
    model_dirs: dict[str, str | os.PathLike], data_dir: str | os.PathLike, split: str = "test", device: str = "cpu"
) -> dict[str, tuple[pd.DataFrame, np.ndarray | None]]:
    """``predict`` for each named model directory: {name: (GPR frame, DD maps)}."""
    return {name: predict(mdir, data_dir, split, device) for name, mdir in model_dirs.items()}


@torch.no_grad()
def shapley_on(model: BMMQA, data: Tensors, device: torch.device, batch_size: int = 64) -> dict[str, np.ndarray]:
    """Per-sample Shapley values per task on a whole split: {task: (N, 2)} (image, table)."""
    model.eval()
    acc: dict[str, list[np.ndarray]] = {}
    for i in range(0, len(data.keys), batch_size):
        img, tab = data.image[i : i + batch_size].to(device), data.table[i : i + batch_size].to(device)
        gpr, dd = data.gpr[i : i + batch_size].to(device), data.dd[i : i + batch_size].to(device)
        co = model.coalitions(img, tab)
        phi = coalition_shapley(co, lambda o: task_errors(o, gpr, dd))  # noqa: B023
        for t, v in phi.items():
            acc.setdefault(t, []).append(v.T.cpu().numpy())
    return {t: np.concatenate(v) for t, v in acc.items()}


def shapley_table(
    model_dir: str, pack_dir: str, splits: tuple[str, ...] = ("train", "val", "test"), device: str = "cpu"
) -> pd.DataFrame:
    """Per-plan Shapley modality contributions of a trained model.

    One row per (plan, task): ``phi_image`` and ``phi_table`` are the two-player Shapley values of
    the task error (``ml.psqa.shapley.task_errors``: GPR MAE over criteria, DD L1), measured as the
    *reduction* of the error a modality brings (positive = the modality helps), computed with the
    fast coalition forward (each encoder once, coalitions through the heads as one batch).
    """
    dev = resolve_device(device)
    model, scaler, _ = load_model(model_dir, str(dev))
    pack = load_pack(pack_dir)
    frames = []
    for split in splits:
        rows = pack.split(split)
        if not len(rows):
            continue
        data = tensors_for(pack, rows, scaler)
        phi = shapley_on(model, data, dev)
        for task, v in phi.items():
            frames.append(
                pd.DataFrame(
                    {
                        "plan_key": data.keys,
                        "split": split,
                        "task": task,
                        "phi_image": v[:, 0].astype(float),
                        "phi_table": v[:, 1].astype(float),
                    }
                )
            )
    if not frames:
        return pd.DataFrame(columns=["plan_key", "split", "task", "phi_image", "phi_table"])
    return pd.concat(frames, ignore_index=True)
