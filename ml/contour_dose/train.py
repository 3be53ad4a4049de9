"""One trainer for the contour + dose family (seed 002, spec §B.2-B.6) and the product model.

The variants and their inputs are in ``ml.contour_dose.variants`` (``VARIANTS``: dose-only,
contour-only, seq-human, seq-automated, multi-automated = CTAN, product), the slice tensors and
augmentation in ``ml.contour_dose.slices``, inference in ``ml.contour_dose.predict``. Here:
``ContourDoseTask`` (what one training step of a variant is) and ``train`` (data, model and
configuration around the shared engine ``ml.training.Trainer``).

CT: HU clipped to [-1024, 1500] and z-scored with the training patients' statistics ([I]: the
spec's reported 85.18 / 282.26 come from a different offset convention; ours are stored in
``config.json``).

Training (spec §B.6, [I] where silent): Adam, lr 1e-4, weight decay 1e-5, batch 8 (paper's
OpenKBP setting); cosine decay over the planned epochs; DWA for the two-task models; model
selection on the validation loss (dose L1 + combo loss, unweighted). Augmentation [I]: rotation
within +-10 deg and shifts within +-8 px (p = 0.5), left/right flips (p = 0.5) with the parotid
labels (and parotid input masks) swapped. The engine gives bf16 autocast (``amp``: auto = CUDA,
bf16 = any device), deterministic seeds, checkpoints after every epoch and every
``checkpoint_minutes`` inside one (resumable mid-epoch: one epoch of the product model on the
169 OpenKBP patients is 14,563 slices), the ``max_minutes`` budget checked after every step,
progress lines with slices/s and ETA, and per-epoch validation on whole volumes (dose score in
Gy inside the possible-dose mask, Dice per ROI). Channels-last on CUDA only: torch 2.13's oneDNN
aborts in the backward of an NHWC 1x1 stride-2 convolution with few input channels on the CPU
(oneDNN issue #6035, reproduced here with our width-8 skips).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ml.contour_dose.cache import Cache, Entry
from ml.contour_dose.losses import DWA, combo_loss, masked_l1
from ml.contour_dose.models import ModelConfig, WidthsConfig, build_model, n_parameters
from ml.contour_dose.predict import forward_raw, infer_slices, predict_labels
from ml.contour_dose.slices import SliceData, augment, build_slices, make_batch
from ml.contour_dose.variants import DOSE_NORM_GY, HU_CLIP, VARIANTS, in_channels
from ml.training import (
    RUNTIME_FIELDS,
    Callback,
    FitSettings,
    Trainer,
    TrainTask,
    optimizer_step,
    resolve_amp,
    write_metrics,
)
from ml.utils.torch_utils import resolve_device, set_seed

__all__ = [
    "ContourDoseTask",
    "TrainConfig",
    "ct_stats",
    "load_split",
    "model_config",
    "task_losses",
    "train",
    "train_step",
    "validate",
]


@dataclass
class TrainConfig(WidthsConfig, FitSettings):
    variant: str = "multi-automated"
    epochs: int = 100
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 1e-5
    steps_per_epoch: int | None = None  # None: one pass over the training slices
    amp: str = "auto"  # auto (bf16 on CUDA) | bf16 (any device; 1.6-1.9x on an AVX512-BF16 CPU) | off
    patience: int = 20
    augment: bool = True
    dwa: bool = True
    dwa_temperature: float = 2.0
    widths: tuple[int, ...] = (32, 64, 128, 256, 512)
    ctab: bool = True
    ctae: bool = True
    val_patients: int | None = None  # cap on validation volumes per epoch (None: all)
    contour_model: str | None = None  # seq-automated: a trained contour-only model dir
    extra: dict = field(default_factory=dict)


def task_losses(out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    losses = {}
    if "dose" in out:
        losses["dose"] = masked_l1(out["dose"], batch["dose"], batch["pdm"][:, None])
    if "contour" in out:
        losses["contour"] = combo_loss(out["contour"], batch["label"])
    return losses


def dice_per_roi(pred_label: np.ndarray, true_label: np.ndarray, rois: tuple[str, ...]) -> dict[str, float]:
    out = {}
    for i, name in enumerate(rois, start=1):
        p, t = pred_label == i, true_label == i
        s = p.sum() + t.sum()
        out[name] = float(2 * (p & t).sum() / s) if s else float("nan")
    return out


def validate(
    model, data: SliceData, variant: str, device: torch.device, amp: bool, max_patients: int | None = None
) -> dict[str, float]:
    """Whole-volume validation: loss (as trained), dose score (Gy) and Dice per ROI."""
    rois = VARIANTS[variant]["rois"]
    tasks = VARIANTS[variant]["tasks"]
    loss_sums: dict[str, float] = {}
    n_batches = 0
    dose_scores, dices = [], []
    spans = data.patient_slices[:max_patients] if max_patients else data.patient_slices
    model.eval()
    with torch.no_grad():
        for _pid, a, b in spans:
            for i in range(a, b, 32):
                idx = torch.arange(i, min(i + 32, b), device=data.ct.device)
                bt = {k: v.to(device) for k, v in make_batch(data, idx, variant).items()}
                out = forward_raw(model, bt["x"], device, amp)
                for t, v in task_losses(out, bt).items():
                    loss_sums[t] = loss_sums.get(t, 0.0) + float(v)
                n_batches += 1
            pred = infer_slices(model, data, variant, a, b, device, amp=amp)
            if "dose" in pred:
                ref = data.dose[a:b].float().cpu().numpy() * DOSE_NORM_GY
                pdm = data.pdm[a:b].cpu().numpy()
                if pdm.any():
                    dose_scores.append(float(np.abs(ref - pred["dose"]).sum() / pdm.sum()))
            if "probs" in pred:
                dices.append(dice_per_roi(pred["probs"].argmax(1), data.label[a:b].cpu().numpy(), rois))
    model.train()
    res = {f"val_loss_{t}": s / max(n_batches, 1) for t, s in loss_sums.items()}
    res["val_loss"] = sum(res[f"val_loss_{t}"] for t in tasks)
    if dose_scores:
        res["val_dose_score"] = float(np.mean(dose_scores))
    if dices:
        df = pd.DataFrame(dices)
        for name in rois:
            res[f"val_dice_{name}"] = float(df[name].mean())
        res["val_mean_dice"] = float(np.nanmean(df.to_numpy(dtype=float)))
    return res


def train_step(
    model,
    opt,
    batch: dict[str, torch.Tensor],
    weights: dict[str, float],
    device: torch.device,
    amp: bool,
    channels_last: bool | None = None,
    grad_clip: float | None = None,
) -> dict[str, torch.Tensor]:
    """One optimiser step on ``batch`` with the task losses weighted by ``weights`` (DWA) -> the
    unweighted task losses. The engine's step (``ContourDoseTask`` + ``optimizer_step``) as one call,
    for the throughput benchmark (``benchmarks/contour_dose_train.py``)."""
    out = forward_raw(model, batch["x"], device, amp, channels_last)
    losses = task_losses(out, batch)
    optimizer_step(opt, losses, weights, grad_clip)
    return losses


# ---------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------
def load_split(cache: Cache, split: pd.DataFrame | str | os.PathLike | None, seed: int = 0) -> pd.DataFrame:
    from ml.contour_dose.split import patient_split

    if split is None:
        if (cache.root / "split.parquet").exists():
            split = pd.read_parquet(cache.root / "split.parquet")
        else:
            labelled = cache.index.loc[cache.index["has_dose"].astype(bool), "patient_id"]
            split = patient_split(list(labelled), seed=seed)
    elif not isinstance(split, pd.DataFrame):
        split = pd.read_parquet(split) if str(split).endswith(".parquet") else pd.read_csv(split)
    missing = sorted(set(split["patient_id"]) - set(cache.patient_ids))
    if missing:
        raise ValueError(f"split lists patients missing from the cache: {missing[:5]}")
    return split


def ct_stats(entries: list[Entry]) -> tuple[float, float]:
    s = n = ss = 0.0
    for e in entries:
        v = np.clip(e.ct.astype(np.float64), *HU_CLIP)
        s += v.sum()
        ss += (v * v).sum()
        n += v.size
    mean = s / n
    return float(mean), float(math.sqrt(max(ss / n - mean * mean, 1e-6)))


def model_config(cfg: TrainConfig) -> ModelConfig:
    spec = VARIANTS[cfg.variant]
    return ModelConfig(
        arch=spec["arch"],
        in_channels=in_channels(cfg.variant),
        n_classes=len(spec["rois"]) + 1 if "contour" in spec["tasks"] else 0,
        dose="dose" in spec["tasks"],
        widths=tuple(cfg.widths),
        ctab=cfg.ctab,
        ctae=cfg.ctae,
    )


class ContourDoseTask(TrainTask):
    """One contour + dose variant on the engine: shuffled slices (a fixed number of steps per
    epoch), augmentation, DWA task weights, whole-volume validation."""

    samples_name = "slices"

    def __init__(
        self, cfg: TrainConfig, model: torch.nn.Module, data: dict[str, SliceData], device: torch.device
    ) -> None:
        self.cfg, self.model, self.data, self.device = cfg, model, data, device
        self.amp = resolve_amp(cfg.amp, device) is not None
        self.optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer, T_max=max(cfg.epochs, 1), eta_min=cfg.lr * 0.01
        )
        self.loss_names = tuple(VARIANTS[cfg.variant]["tasks"])
        self.tag = f"[{cfg.variant}] "
        self.dwa = DWA(self.loss_names, cfg.dwa_temperature, enabled=cfg.dwa)
        self.gen = torch.Generator()
        self.n_train = data["train"].n
        self.perm = torch.arange(self.n_train)
        self.weights = self.dwa.weights()

    def steps_per_epoch(self) -> int:
        return self.cfg.steps_per_epoch or max(self.n_train // self.cfg.batch_size, 1)

    def begin_epoch(self, epoch: int) -> None:
        self.gen.manual_seed(self.cfg.seed * 100_003 + epoch)
        self.weights = self.dwa.weights()
        self.perm = torch.randperm(self.n_train, generator=self.gen)

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        bs = self.cfg.batch_size
        lo = (step * bs) % self.n_train
        idx = self.perm[lo : lo + bs]
        if len(idx) < 2:
            idx = self.perm[:bs]
        train = self.data["train"]
        batch = make_batch(train, idx.to(train.ct.device), self.cfg.variant)
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        if self.cfg.augment:
            batch = augment(batch, self.cfg.variant, self.gen)
        return batch

    def batch_size(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["x"].shape[0])

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = batch["x"]
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)

    def losses(self, out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return task_losses(out, batch)

    def loss_weights(self) -> dict[str, float]:
        return self.weights

    def end_epoch(self, epoch: int, mean_losses: dict[str, float]) -> dict[str, float]:
        self.dwa.end_epoch(mean_losses)
        return {f"lambda_{t}": w for t, w in self.weights.items()}

    def validate(self, epoch: int) -> dict[str, float]:
        return validate(self.model, self.data["val"], self.cfg.variant, self.device, self.amp, self.cfg.val_patients)

    def state_dict(self) -> dict:
        return {"dwa": self.dwa.state(), "generator": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.dwa.load(state["dwa"])
        self.gen.set_state(state["generator"])


def train(
    cache_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    cfg: TrainConfig | None = None,
    split: pd.DataFrame | str | None = None,
    log=print,
    callbacks: list[Callback] | None = None,
) -> dict:
    """Train (or resume) one variant on a cache; writes config.json, model_best.pt, checkpoint.pt,
    history.csv, metrics.json. ``callbacks`` receive the engine's progress, epochs and checkpoints."""
    cfg = cfg or TrainConfig()
    if cfg.variant not in VARIANTS:
        raise ValueError(f"unknown variant {cfg.variant!r}; choose from {sorted(VARIANTS)}")
    spec = VARIANTS[cfg.variant]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.seed)
    device = resolve_device(cfg.device)
    resolve_amp(cfg.amp, device)  # a clear error for an unknown precision, before loading anything
    cache = Cache.open(cache_dir)
    split = load_split(cache, split, cfg.seed)
    ids = {s: list(split.loc[split["split"] == s, "patient_id"]) for s in ("train", "val")}
    if not ids["train"] or not ids["val"]:
        raise ValueError("the split needs train and val patients")
    t_load = time.perf_counter()
    entries = {s: [cache.load(p) for p in ids[s]] for s in ids}
    if "dose" in spec["tasks"] and any(e.dose is None for s in entries for e in entries[s]):
        raise ValueError("dose models need reference dose for every train/val patient")
    ct_mean, ct_std = ct_stats(entries["train"])
    pred_labels = None
    if "pred_masks" in spec["inputs"]:
        if not cfg.contour_model:
            raise ValueError("seq-automated needs contour_model (a trained contour-only model dir)")
        _copy_model(cfg.contour_model, out / "contour_model")
        pred_labels = predict_labels(out / "contour_model", [e for s in entries for e in entries[s]], device)
    rois = tuple(spec["rois"])
    data = {s: build_slices(entries[s], rois, ct_mean, ct_std, pred_labels) for s in entries}
    del entries, pred_labels  # the stacked slices hold everything training needs
    if device.type == "cuda":
        data = {s: d.to(device) for s, d in data.items()}
    log(
        f"[{cfg.variant}] {len(ids['train'])} train / {len(ids['val'])} val patients, "
        f"{data['train'].n} / {data['val'].n} slices, loaded in {time.perf_counter() - t_load:.1f} s"
    )

    mcfg = model_config(cfg)
    model = build_model(mcfg).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    task = ContourDoseTask(cfg, model, data, device)
    (out / "config.json").write_text(
        json.dumps(
            {
                "variant": cfg.variant,
                "train": cfg.to_dict(),
                "model": mcfg.to_dict(),
                "rois": list(rois),
                "inputs": list(spec["inputs"]),
                "tasks": list(task.loss_names),
                "ct_norm": {"mean": ct_mean, "std": ct_std, "clip_hu": list(HU_CLIP)},
                "dose_norm_gy": DOSE_NORM_GY,
                "split": {s: ids[s] for s in ids},
                "cache": {"n_patients": len(cache.index), "bytes": int(cache.meta.get("bytes", 0))},
                "n_parameters": n_parameters(model),
            },
            indent=2,
        )
    )
    result = Trainer(
        task,
        cfg,
        out,
        monitor="val_loss",
        config=cfg.to_dict(),
        identity=_identity,
        device=device,
        log=log,
        callbacks=callbacks,
    ).fit()
    metrics = {
        "variant": cfg.variant,
        "best_val_loss": result.best,
        **result.common_metrics(),
        "train_slices_per_s": result.samples_per_s,
        "n_train_patients": len(ids["train"]),
        "n_val_patients": len(ids["val"]),
        "n_train_slices": data["train"].n,
        "n_parameters": n_parameters(model),
        **{k: v for k, v in result.best_row().items() if k.startswith("val_")},
    }
    return write_metrics(out / "metrics.json", metrics)


def _identity(d: dict) -> dict:
    """What defines a run (the engine's runtime fields and the validation cap do not: a CPU run may
    be resumed on a GPU, where ``amp="auto"`` means bf16 anyway)."""
    return {k: v for k, v in d.items() if k not in (*RUNTIME_FIELDS, "val_patients")}


def _copy_model(src: str | os.PathLike, dst: Path) -> None:
    src = Path(src)
    for name in ("config.json", "model_best.pt"):
        if not (src / name).exists():
            raise FileNotFoundError(f"{src / name} missing: not a trained model directory")
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model_best.pt", "metrics.json"):
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
