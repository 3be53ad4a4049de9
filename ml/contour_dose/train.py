"""One trainer for the contour + dose family (seed 002, spec §B.2-B.6) and the product model.

The variants and their inputs are in ``ml.contour_dose.variants`` (``VARIANTS``: dose-only,
contour-only, seq-human, seq-automated, multi-automated = CTAN, product), the slice tensors and
augmentation in ``ml.contour_dose.slices``, inference in ``ml.contour_dose.predict``. Here:
``ContourDoseTask`` (what one training step of a variant is) and ``train`` (data, model and
configuration around the shared engine ``ml.training.Trainer``).

CT: HU clipped to [-1024, 1500] and z-scored with the training patients' statistics ([I]: the
spec's reported 85.18 / 282.26 come from a different offset convention; ours are stored in
``config.json``). The product model also sees the centre slice in a soft-tissue window (W400 /
L40, ``soft_window``; off by default for the paper's variants).

Training (spec §B.6, [I] where silent): Adam, lr 1e-4, weight decay 1e-5, batch 8 (paper's
OpenKBP setting); cosine decay over the planned epochs; DWA for the two-task models.
Augmentation [I]: rotation within +-10 deg and shifts within +-8 px (p = 0.5), left/right flips
(p = 0.5) with the parotid labels (and parotid input masks and annotation flags) swapped.

Partial labels (``partial_labels``, on by default): an ROI missing from a patient's structure set
is unannotated there, not background. The contour loss is the marginal CE + annotated-only Dice of
``ml.contour_dose.losses`` and the validation Dice of an unannotated ROI is NaN (not counted).

Rare and small organs: ``oversample_rois`` / ``oversample_rate`` give each listed ROI a quota of
every epoch's slices (``slices.epoch_order``); ``class_weights`` weights the CE (``"none"``,
``"inv_sqrt_freq"`` from the training voxels, or K+1 numbers). ``None`` means the variant's
default (``variants.TRAIN_DEFAULTS``: the seed's recipe for the paper's variants; Brainstem,
Esophagus and SpinalCord at 10 % each and inverse square-root frequency weights for the product).

Model selection (``SelectionRule``): after every epoch the model is validated on **every**
validation patient (whole volumes) and the epoch with the lowest selection score is kept:

    score = (w_dose * val_dose_score / dose_scale_gy + w_contour * (1 - val_mean_dice)) / (w_dose + w_contour)

with ``val_dose_score`` the OpenKBP dose score (mean absolute error in Gy inside the possible-dose
mask, averaged over patients), ``val_mean_dice`` the mean over ROIs of each ROI's mean Dice over the
validation patients annotated for it, and by default w_dose = w_contour = 0.5 and dose_scale_gy =
10 (1 Gy of dose score weighs as much as 0.1 of mean Dice). A single-task model keeps only its own
term; a term that cannot be computed (no dose mask, no annotated ROI in the validation patients)
is dropped, and with neither the validation loss is used. The rule and its numbers are written
to ``config.json`` and ``metrics.json`` (``selection``).

Seq-Automated (spec §B.2: CT + the DL-Baseline's contours -> dose) is trained on **out-of-fold**
predicted contours: the training patients are split into ``oof_folds`` folds (default 3), a
contour-only model with the DL-Baseline's configuration is trained on the other folds
(``<out>/oof/fold_<k>``) and predicts the masks of its held-out fold, so no training patient's
input masks come from a model that saw its contours (in-sample predictions are nearly perfect
and teach the dose model to trust contours it will not get at test time). The validation
patients, and at inference every patient, get the DL-Baseline's own predictions (it never trained
on them). ``oof_folds=0`` (or fewer than two training patients) falls back to in-sample
predictions, recorded as such in ``config.json`` (``pred_masks``).

The engine gives bf16 autocast (``amp``: auto = CUDA, bf16 = any device), deterministic seeds,
checkpoints after every epoch and every ``checkpoint_minutes`` inside one (resumable mid-epoch:
one epoch of the product model on the 169 OpenKBP patients is 14,563 slices), the
``max_minutes`` budget checked after every step (Seq-Automated's folds share it), progress lines
with slices/s and ETA. Channels-last on CUDA only: torch 2.13's oneDNN aborts in the backward of
an NHWC 1x1 stride-2 convolution with few input channels on the CPU (oneDNN issue #6035,
reproduced here with our width-8 skips).
"""

from __future__ import annotations

import dataclasses
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
from ml.contour_dose.losses import DWA, combo_loss, inverse_sqrt_frequency, masked_l1
from ml.contour_dose.models import ModelConfig, WidthsConfig, build_model, n_parameters
from ml.contour_dose.predict import forward_raw, predict_labels
from ml.contour_dose.slices import SliceData, augment, build_slices, epoch_order, make_batch, roi_presence
from ml.contour_dose.variants import DOSE_NORM_GY, HU_CLIP, TRAIN_DEFAULTS, VARIANTS, in_channels
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
    "SelectionRule",
    "TrainConfig",
    "class_weights",
    "ct_stats",
    "dice_per_roi",
    "load_split",
    "model_config",
    "model_inputs",
    "oof_folds",
    "resolved_options",
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
    ctab_pos: str = "sincos"  # positional encoding of the CTAB tokens: sincos | none
    # deprecated and ignored: selection always validates every validation patient (kept so that
    # older command lines and run configs still load)
    val_patients: int | None = None
    contour_model: str | None = None  # seq-automated: a trained contour-only model dir (the DL-Baseline)
    oof_folds: int = 3  # seq-automated: folds of out-of-fold predicted masks (0: in-sample, the old way)
    partial_labels: bool = True  # unannotated ROIs left out of the contour loss (False: taught as background)
    soft_window: bool | None = None  # soft-tissue CT channel; None: the variant's inputs (product: on)
    oversample_rois: tuple[str, ...] | None = None  # None: the variant's default (TRAIN_DEFAULTS)
    oversample_rate: float | None = None  # share of each epoch's slices per listed ROI (0: uniform)
    class_weights: str | list[float] | None = None  # none | inv_sqrt_freq | K+1 numbers; None: variant default
    select_dose_weight: float = 0.5  # model selection (SelectionRule)
    select_contour_weight: float = 0.5
    select_dose_scale_gy: float = 10.0
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SelectionRule:
    """The epoch kept as ``model_best.pt``: the lowest ``score`` (see the module docstring)."""

    dose_weight: float = 0.5
    contour_weight: float = 0.5
    dose_scale_gy: float = 10.0

    @classmethod
    def of(cls, cfg: TrainConfig) -> SelectionRule:
        return cls(cfg.select_dose_weight, cfg.select_contour_weight, cfg.select_dose_scale_gy)

    def score(self, m: dict[str, float], tasks: tuple[str, ...]) -> float:
        terms = []
        d, c = m.get("val_dose_score", math.nan), m.get("val_mean_dice", math.nan)
        if "dose" in tasks and math.isfinite(d) and self.dose_weight > 0:
            terms.append((self.dose_weight, d / self.dose_scale_gy))
        if "contour" in tasks and math.isfinite(c) and self.contour_weight > 0:
            terms.append((self.contour_weight, 1.0 - c))
        if not terms:
            return float(m.get("val_loss", math.nan))
        return sum(w * v for w, v in terms) / sum(w for w, _ in terms)

    def describe(self, tasks: tuple[str, ...]) -> str:
        parts, terms = [], []
        if "dose" in tasks:
            parts.append(f"{self.dose_weight:g} * val_dose_score / {self.dose_scale_gy:g} Gy")
            terms.append("val_dose_score: OpenKBP dose score in Gy, mean over patients")
        if "contour" in tasks:
            parts.append(f"{self.contour_weight:g} * (1 - val_mean_dice)")
            terms.append(
                "val_mean_dice: mean over ROIs of the per-ROI mean Dice over the patients annotated for the ROI"
            )
        return (
            f"minimum over epochs of ({' + '.join(parts)}) / (sum of those weights), on every validation patient "
            f"({'; '.join(terms)}; a term that cannot be computed is dropped, and with none left the validation "
            "loss is used)"
        )

    def to_dict(self, tasks: tuple[str, ...], n_val: int) -> dict:
        return {
            "metric": "val_selection_score",
            "mode": "min",
            "rule": self.describe(tasks),
            "dose_weight": self.dose_weight if "dose" in tasks else 0.0,
            "contour_weight": self.contour_weight if "contour" in tasks else 0.0,
            "dose_scale_gy": self.dose_scale_gy,
            "val_patients": n_val,
        }


def model_inputs(cfg: TrainConfig) -> tuple[str, ...]:
    """The variant's inputs with the soft-tissue window added (``soft_window=True``) or removed
    (``False``); ``None`` keeps the variant's own."""
    inputs = list(VARIANTS[cfg.variant]["inputs"])
    if cfg.soft_window is False:
        inputs = [n for n in inputs if n != "ct_soft"]
    elif cfg.soft_window and "ct_soft" not in inputs:
        at = next(i for i, n in enumerate(inputs) if n in ("ct", "ct3")) + 1
        inputs.insert(at, "ct_soft")
    return tuple(inputs)


def resolved_options(cfg: TrainConfig) -> dict:
    """The rare/small-organ options with the variant's defaults filled in."""
    d = TRAIN_DEFAULTS[cfg.variant]
    rois = tuple(VARIANTS[cfg.variant]["rois"])
    over = tuple(cfg.oversample_rois if cfg.oversample_rois is not None else d["oversample_rois"])
    over = tuple(r for r in over if r in rois)  # a variant without the ROI ignores it
    rate = float(cfg.oversample_rate if cfg.oversample_rate is not None else d["oversample_rate"])
    if rate < 0 or rate * len(over) > 1:
        raise ValueError(f"oversample_rate {rate} x {len(over)} ROIs must be in [0, 1]")
    cw = cfg.class_weights if cfg.class_weights is not None else d["class_weights"]
    if isinstance(cw, str) and cw not in ("none", "inv_sqrt_freq"):
        raise ValueError(f"class_weights must be none, inv_sqrt_freq or K+1 numbers, not {cw!r}")
    if not isinstance(cw, str) and len(cw) != len(rois) + 1:
        raise ValueError(f"class_weights needs {len(rois) + 1} numbers (background + {len(rois)} ROIs)")
    return {"oversample_rois": over, "oversample_rate": rate if over else 0.0, "class_weights": cw}


def class_weights(data: SliceData, k: int) -> list[float]:
    """Inverse square-root frequency weights of background + K ROIs on the training slices (a
    class's frequency over the slices of the patients annotated for it)."""
    counts = torch.zeros(k + 1, dtype=torch.float64)
    for i in range(0, data.n, 1024):
        counts += torch.bincount(data.label[i : i + 1024].reshape(-1).long().cpu(), minlength=k + 1)[: k + 1].double()
    per_slice = float(data.label[0].numel()) if data.n else 0.0
    totals = [data.n * per_slice] + [float(data.annotated[:, c].sum()) * per_slice for c in range(k)]
    return inverse_sqrt_frequency(counts.tolist(), totals)


def task_losses(
    out: dict[str, torch.Tensor],
    batch: dict[str, torch.Tensor],
    class_weights: torch.Tensor | None = None,
    partial_labels: bool = True,
) -> dict[str, torch.Tensor]:
    """Dose L1 in the possible-dose mask and the combo contour loss; with ``partial_labels`` the
    batch's ``annotated`` flags leave unannotated ROIs out (marginal CE, annotated-only Dice)."""
    losses = {}
    if "dose" in out:
        losses["dose"] = masked_l1(out["dose"], batch["dose"], batch["pdm"][:, None])
    if "contour" in out:
        annotated = batch.get("annotated") if partial_labels else None
        losses["contour"] = combo_loss(out["contour"], batch["label"], annotated=annotated, class_weights=class_weights)
    return losses


def dice_per_roi(
    pred_label: np.ndarray, true_label: np.ndarray, rois: tuple[str, ...], annotated=None
) -> dict[str, float]:
    """Dice per ROI of one patient; NaN where the ROI is not annotated for the patient
    (``annotated``: [K] bool; None = all) or neither map has it."""
    out = {}
    for i, name in enumerate(rois, start=1):
        if annotated is not None and not bool(annotated[i - 1]):
            out[name] = float("nan")
            continue
        p, t = pred_label == i, true_label == i
        s = p.sum() + t.sum()
        out[name] = float(2 * (p & t).sum() / s) if s else float("nan")
    return out


def validate(
    model,
    data: SliceData,
    variant: str,
    device: torch.device,
    amp: bool,
    inputs: tuple[str, ...] | None = None,
    class_weights: torch.Tensor | None = None,
    partial_labels: bool = True,
    selection: SelectionRule | None = None,
) -> dict[str, float]:
    """Whole-volume validation on every patient of ``data``: loss (as trained), dose score (Gy),
    Dice per ROI (unannotated ROIs not counted), their means and the selection score. One forward
    pass per slice batch gives both the losses and the predictions."""
    rois = VARIANTS[variant]["rois"]
    tasks = VARIANTS[variant]["tasks"]
    loss_sums: dict[str, float] = {}
    n_batches = 0
    dose_scores, dices = [], []
    model.eval()
    with torch.no_grad():
        for _pid, a, b in data.patient_slices:
            err_sum = pdm_sum = 0.0
            labels = []
            for i in range(a, b, 32):
                idx = torch.arange(i, min(i + 32, b), device=data.ct.device)
                bt = {k: v.to(device) for k, v in make_batch(data, idx, variant, inputs).items()}
                out = forward_raw(model, bt["x"], device, amp)
                for t, v in task_losses(out, bt, class_weights, partial_labels).items():
                    loss_sums[t] = loss_sums.get(t, 0.0) + float(v)
                n_batches += 1
                if "dose" in out:  # eval mode: the dose head is clamped at 0
                    pdm = bt["pdm"]
                    pred = out["dose"].float()[:, 0] * DOSE_NORM_GY * pdm
                    ref = bt["dose"][:, 0] * DOSE_NORM_GY
                    err_sum += float(((ref - pred).abs() * pdm).sum())
                    pdm_sum += float(pdm.sum())
                if "contour" in out:
                    labels.append(out["contour"].float().argmax(1).cpu().numpy())
            if "dose" in tasks and pdm_sum > 0:
                dose_scores.append(err_sum / pdm_sum)
            if labels:
                ann = data.annotated[a].cpu().numpy() if partial_labels else None
                dices.append(dice_per_roi(np.concatenate(labels), data.label[a:b].cpu().numpy(), rois, ann))
    model.train()
    res = {f"val_loss_{t}": s / max(n_batches, 1) for t, s in loss_sums.items()}
    res["val_loss"] = sum(res[f"val_loss_{t}"] for t in tasks)
    if dose_scores:
        res["val_dose_score"] = float(np.mean(dose_scores))
    if dices:
        df = pd.DataFrame(dices)
        per_roi = {}
        for name in rois:
            vals = df[name].to_numpy(dtype=float)
            per_roi[name] = float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")
            res[f"val_dice_{name}"] = per_roi[name]
        finite = [v for v in per_roi.values() if math.isfinite(v)]
        res["val_mean_dice"] = float(np.mean(finite)) if finite else float("nan")
    res["val_patients"] = float(len(data.patient_slices))
    res["val_selection_score"] = (selection or SelectionRule()).score(res, tuple(tasks))
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
        in_channels=in_channels(cfg.variant, model_inputs(cfg)),
        n_classes=len(spec["rois"]) + 1 if "contour" in spec["tasks"] else 0,
        dose="dose" in spec["tasks"],
        widths=tuple(cfg.widths),
        ctab=cfg.ctab,
        ctae=cfg.ctae,
        ctab_pos=cfg.ctab_pos,
    )


class ContourDoseTask(TrainTask):
    """One contour + dose variant on the engine: shuffled slices (a fixed number of steps per
    epoch; with a quota per rare ROI when oversampling), augmentation, DWA task weights, the
    partial-label (class-weighted) losses, whole-volume validation and the selection score."""

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
        self.inputs = model_inputs(cfg)
        self.selection = SelectionRule.of(cfg)
        self.options = resolved_options(cfg)
        rois = tuple(VARIANTS[cfg.variant]["rois"])
        self.class_weights: list[float] | None = None
        if "contour" in self.loss_names:
            cw = self.options["class_weights"]
            if cw == "inv_sqrt_freq":
                self.class_weights = class_weights(data["train"], len(rois))
            elif not isinstance(cw, str):
                self.class_weights = [float(v) for v in cw]
        self._cw = torch.tensor(self.class_weights, device=device) if self.class_weights else None
        self.oversample_cols = [rois.index(r) for r in self.options["oversample_rois"]]
        self.presence = (
            roi_presence(data["train"].label, len(rois))
            if self.oversample_cols and self.options["oversample_rate"] > 0
            else None
        )
        self.dwa = DWA(self.loss_names, cfg.dwa_temperature, enabled=cfg.dwa)
        self.gen = torch.Generator()
        self.n_train = data["train"].n
        self.perm = torch.arange(self.n_train)
        self.order: torch.Tensor | None = None
        self.weights = self.dwa.weights()

    def steps_per_epoch(self) -> int:
        return self.cfg.steps_per_epoch or max(self.n_train // self.cfg.batch_size, 1)

    def begin_epoch(self, epoch: int) -> None:
        self.gen.manual_seed(self.cfg.seed * 100_003 + epoch)
        self.weights = self.dwa.weights()
        if self.presence is None:
            self.perm = torch.randperm(self.n_train, generator=self.gen)
        else:
            n = self.steps_per_epoch() * self.cfg.batch_size
            self.order, _ = epoch_order(
                self.presence, self.oversample_cols, self.options["oversample_rate"], n, self.gen
            )

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        bs = self.cfg.batch_size
        if self.order is not None:
            idx = self.order[step * bs : (step + 1) * bs]
        else:
            lo = (step * bs) % self.n_train
            idx = self.perm[lo : lo + bs]
            if len(idx) < 2:
                idx = self.perm[:bs]
        train = self.data["train"]
        batch = make_batch(train, idx.to(train.ct.device), self.cfg.variant, self.inputs)
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        if self.cfg.augment:
            batch = augment(batch, self.cfg.variant, self.gen, inputs=self.inputs)
        return batch

    def batch_size(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["x"].shape[0])

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = batch["x"]
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)

    def losses(self, out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return task_losses(out, batch, self._cw, self.cfg.partial_labels)

    def loss_weights(self) -> dict[str, float]:
        return self.weights

    def end_epoch(self, epoch: int, mean_losses: dict[str, float]) -> dict[str, float]:
        self.dwa.end_epoch(mean_losses)
        return {f"lambda_{t}": w for t, w in self.weights.items()}

    def validate(self, epoch: int) -> dict[str, float]:
        return validate(
            self.model,
            self.data["val"],
            self.cfg.variant,
            self.device,
            self.amp,
            inputs=self.inputs,
            class_weights=self._cw,
            partial_labels=self.cfg.partial_labels,
            selection=self.selection,
        )

    def state_dict(self) -> dict:
        return {"dwa": self.dwa.state(), "generator": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.dwa.load(state["dwa"])
        self.gen.set_state(state["generator"])


# ---------------------------------------------------------------------------------------
# Seq-Automated: out-of-fold predicted masks
# ---------------------------------------------------------------------------------------
def oof_folds(train_ids: list[str], k: int, seed: int) -> dict[str, int]:
    """Patient -> fold (0..k-1): a seeded permutation of the sorted ids dealt round-robin (fold
    sizes differ by at most one)."""
    ids = sorted(train_ids)
    order = np.random.default_rng(seed).permutation(len(ids))
    return {ids[j]: int(pos % k) for pos, j in enumerate(order)}


def _fold_config(contour_dir: Path, cfg: TrainConfig, max_minutes: float | None) -> TrainConfig:
    """The DL-Baseline's own training configuration, run with this run's device and precision."""
    saved = json.loads((contour_dir / "config.json").read_text())["train"]
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    base = TrainConfig.from_dict({k: v for k, v in saved.items() if k in known})
    return dataclasses.replace(
        base,
        variant="contour-only",
        contour_model=None,
        device=cfg.device,
        amp=cfg.amp,
        max_minutes=max_minutes,
        checkpoint_minutes=cfg.checkpoint_minutes,
    )


def _seq_automated_masks(
    cache_dir, out: Path, cfg: TrainConfig, ids: dict[str, list[str]], entries: dict[str, list[Entry]], device, log, t0
) -> tuple[dict[str, np.ndarray] | None, dict]:
    """Predicted label maps for every train/val patient -> (labels or None when a fold ran out of
    budget, bookkeeping for config.json)."""
    contour_dir = out / "contour_model"
    labels = predict_labels(contour_dir, entries["val"], device)
    k = min(cfg.oof_folds, len(ids["train"]))
    if k < 2:
        why = "oof_folds=0" if cfg.oof_folds < 2 else f"only {len(ids['train'])} training patient(s)"
        log(f"[{cfg.variant}] in-sample contour-model masks for the training patients ({why})")
        labels.update(predict_labels(contour_dir, entries["train"], device))
        return labels, {"source": "in-sample", "reason": why, "model": "contour_model"}
    fold_of = oof_folds(ids["train"], k, cfg.seed)
    by_id = {e.patient_id: e for e in entries["train"]}
    dirs = []
    for f in range(k):
        held = [p for p in ids["train"] if fold_of[p] == f]
        rest = [p for p in ids["train"] if fold_of[p] != f]
        fold_dir = out / "oof" / f"fold_{f}"
        dirs.append(str(fold_dir.relative_to(out)))
        split = pd.DataFrame(
            {
                "patient_id": rest + ids["val"] + held,
                "split": ["train"] * len(rest) + ["val"] * len(ids["val"]) + ["oof"] * len(held),
            }
        )
        left = None if cfg.max_minutes is None else max(cfg.max_minutes - (time.perf_counter() - t0) / 60, 0.0)
        fold_cfg = _fold_config(contour_dir, cfg, left)
        tag = f"[{cfg.variant} oof fold {f + 1}/{k}] "
        m = train(cache_dir, fold_dir, fold_cfg, split=split, log=lambda msg, tag=tag: log(tag + msg))
        if m.get("stopped_by") == "max_minutes" and m.get("epochs_run", 0) < fold_cfg.epochs:
            log(f"{tag}budget spent: run again to resume the fold models, then the dose model")
            return None, {}
        labels.update(predict_labels(fold_dir, [by_id[p] for p in held], device))
    info = {
        "source": "out-of-fold",
        "folds": k,
        "fold_of": fold_of,
        "fold_dirs": dirs,
        "val": "contour_model",
        "rule": "each training patient's masks come from the contour-only model of the fold that held it out "
        "(trained with the DL-Baseline's configuration on the other folds); validation and inference use "
        "the DL-Baseline (contour_model)",
    }
    (out / "oof").mkdir(parents=True, exist_ok=True)
    (out / "oof" / "folds.json").write_text(json.dumps(info, indent=2))
    return labels, info


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
    t0 = time.perf_counter()
    cfg = cfg or TrainConfig()
    if cfg.variant not in VARIANTS:
        raise ValueError(f"unknown variant {cfg.variant!r}; choose from {sorted(VARIANTS)}")
    spec = VARIANTS[cfg.variant]
    options = resolved_options(cfg)  # a clear error for bad options, before loading anything
    inputs = model_inputs(cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.seed)
    device = resolve_device(cfg.device)
    resolve_amp(cfg.amp, device)  # a clear error for an unknown precision, before loading anything
    if cfg.val_patients is not None:
        log(f"[{cfg.variant}] val_patients={cfg.val_patients} is ignored: every validation patient is validated")
    cache = Cache.open(cache_dir)
    split = load_split(cache, split, cfg.seed)
    ids = {s: list(split.loc[split["split"] == s, "patient_id"]) for s in ("train", "val")}
    if not ids["train"] or not ids["val"]:
        raise ValueError("the split needs train and val patients")
    if "pred_masks" in inputs and not cfg.contour_model:
        raise ValueError("seq-automated needs contour_model (a trained contour-only model dir)")
    t_load = time.perf_counter()
    entries = {s: [cache.load(p) for p in ids[s]] for s in ids}
    if "dose" in spec["tasks"] and any(e.dose is None for s in entries for e in entries[s]):
        raise ValueError("dose models need reference dose for every train/val patient")
    ct_mean, ct_std = ct_stats(entries["train"])
    pred_labels, pred_masks = None, None
    if "pred_masks" in inputs:
        _copy_model(cfg.contour_model, out / "contour_model")
        pred_labels, pred_masks = _seq_automated_masks(cache_dir, out, cfg, ids, entries, device, log, t0)
        if pred_labels is None:
            return {"variant": cfg.variant, "stopped_by": "max_minutes", "epochs_run": 0, "oof": "unfinished"}
        set_seed(cfg.seed)  # the fold models used the global RNGs: this model starts as without them
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
    selection = task.selection.to_dict(task.loss_names, len(ids["val"]))
    annotated = {
        name: int(sum(bool(data["train"].annotated[a, i]) for _p, a, _b in data["train"].patient_slices))
        for i, name in enumerate(rois)
    }
    (out / "config.json").write_text(
        json.dumps(
            {
                "variant": cfg.variant,
                "train": cfg.to_dict(),
                "model": mcfg.to_dict(),
                "rois": list(rois),
                "inputs": list(inputs),
                "tasks": list(task.loss_names),
                "ct_norm": {"mean": ct_mean, "std": ct_std, "clip_hu": list(HU_CLIP)},
                "dose_norm_gy": DOSE_NORM_GY,
                "split": {s: ids[s] for s in ids},
                "cache": {"n_patients": len(cache.index), "bytes": int(cache.meta.get("bytes", 0))},
                "n_parameters": n_parameters(model),
                "selection": selection,
                "partial_labels": cfg.partial_labels,
                "train_patients_annotated": annotated,
                "oversample": {"rois": list(options["oversample_rois"]), "rate": options["oversample_rate"]},
                "class_weights": task.class_weights,
                "pred_masks": pred_masks,
            },
            indent=2,
        )
    )
    budget = cfg.max_minutes
    if budget is not None and pred_masks:  # the folds spent part of it
        budget = max(budget - (time.perf_counter() - t0) / 60, 0.0)
    result = Trainer(
        task,
        dataclasses.replace(cfg, max_minutes=budget),
        out,
        monitor="val_selection_score",
        # the split is part of a run's identity: a checkpoint trained on other patients (another
        # split, another out-of-fold assignment in the same folder) is never resumed
        config={**cfg.to_dict(), "split": {s: sorted(ids[s]) for s in ids}},
        identity=_identity,
        device=device,
        log=log,
        callbacks=callbacks,
    ).fit()
    best = result.best_row()
    metrics = {
        "variant": cfg.variant,
        "best_selection_score": result.best,
        "best_val_loss": float(best.get("val_loss", math.nan)),
        **result.common_metrics(),
        "train_slices_per_s": result.samples_per_s,
        "n_train_patients": len(ids["train"]),
        "n_val_patients": len(ids["val"]),
        "n_train_slices": data["train"].n,
        "n_parameters": n_parameters(model),
        "selection": selection,
        **{k: v for k, v in best.items() if k.startswith("val_")},
    }
    if pred_masks:
        metrics["pred_masks"] = pred_masks["source"]
    return write_metrics(out / "metrics.json", metrics)


def _identity(d: dict) -> dict:
    """What defines a run: the configuration and the patient split (the engine's runtime fields and
    the deprecated validation cap do not: a CPU run may be resumed on a GPU, where ``amp="auto"``
    means bf16 anyway)."""
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
