"""GMMAS training on the shared engine (spec §C.3-C.5): one ``GliomaTask``, stages as epoch ranges.

Stages (each switchable in ``TrainConfig``; a single engine run, so budget, checkpoints and resume
cover all of them):

1. supervised multi-task learning from epoch 0: segmentation soft Dice + CE, class-weighted CE
   per task (weights = inverse class frequency over the training patients, normalised to mean 1;
   unknown labels ignored), **Kendall uncertainty weighting** (``weighting="kendall"``; ``"equal"``
   is the ablation). The learned sigma per task and the modality fusion weights are history
   columns (``sigma_<task>``, ``w_<sequence>``) every epoch.
2. **UPS pseudo-labels** (``pseudo_labels``) at epoch ``pl_epoch`` (default: half the epochs):
   10 MC-dropout passes over every training patient with an unknown label for a task (partial
   labels, unlabelled cases, and the ``withhold_labels`` fraction hidden on purpose for the
   semi-supervised experiment); the patient-level prediction is accepted iff its mean confidence
   >= ``tau_c`` (0.9) and the std of that class's probability < ``tau_u`` (0.05) (spec §1.6);
   accepted labels train from then on (the count per task is a history column).
3. **Tumor-CutMix** (``cutmix``, ``cutmix_p`` of tumour samples per batch, soft labels; see
   ``ml.glioma.slices``) throughout.
4. **Missing-modality self-distillation** (``distill``) from epoch ``distill_epoch`` (default:
   two thirds of the epochs): every batch also runs a pathway with one or two present sequences
   dropped (fusion weight zeroed); loss ``distill = seg(missing) + CE(missing) + lambda *
   MSE(x8_missing, stopgrad(x8_full))``, lambda = ``distill_weight`` (1) [I]. SimSiam is not
   built (optional in the issue).

After training, **temperature scaling** per task on the validation patients' aggregated logits
(``calibration.json``; ``ml.glioma.predict.fit_temperature``).

Optimiser [C, scaled for a CPU]: AdamW, lr 1e-3 (the paper's 1e-4 / 1e-5 are for 200-epoch 3D
runs), weight decay 1e-2, poly decay ``(1 - e/E)^0.9``; batch 16 slices: half drawn from slices
with reference tumour, half uniformly (one epoch = 2 x the tumour slices). Model selection on
``val_loss`` = (1 - mean patient Dice) + mean patient-level NLL over the labelled tasks.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ml.glioma.data import SEQUENCES, TASKS, Dataset, load_dataset
from ml.glioma.losses import KendallWeighting, seg_loss, soft_ce
from ml.glioma.model import GMMAS, ModelConfig, n_parameters
from ml.glioma.predict import LoadedModel, fit_temperature, predict_patients
from ml.glioma.slices import SliceData, augment, build_slices, cutmix, make_batch, random_drop
from ml.training import RUNTIME_FIELDS, Callback, FitSettings, Trainer, TrainTask, resolve_amp, write_metrics
from ml.utils.io import atomic_write_json, atomic_write_text
from ml.utils.torch_utils import resolve_device, set_seed

__all__ = ["GliomaTask", "TrainConfig", "class_weights", "inner_split", "train", "validate_patients"]

LOSS_TASKS = ("seg", *TASKS)


@dataclass
class TrainConfig(FitSettings):
    epochs: int = 12
    patience: int = 100
    amp: str = "off"  # bf16 is slower than fp32 for this model on the 2-core CPU (measured)
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-2
    widths: tuple[int, ...] = (16, 32, 64, 128)
    context: int = 1
    tasks: tuple[str, ...] = tuple(TASKS)  # a subset = single-task / fewer-task models (segmentation always)
    seg: bool = True  # False: no segmentation loss (classification-only single-task baseline)
    weighting: str = "kendall"  # kendall | equal
    augment: bool = True
    cutmix: bool = True
    cutmix_p: float = 0.25
    pseudo_labels: bool = True
    pl_epoch: int | None = None  # None: epochs // 2
    tau_c: float = 0.9
    tau_u: float = 0.05
    withhold_labels: float = 0.0  # fraction of training patients whose labels are hidden (semi-supervised study)
    distill: bool = True
    distill_epoch: int | None = None  # None: 2 * epochs // 3
    distill_weight: float = 1.0
    calibrate: bool = True
    val_mc: int = 0  # MC passes in per-epoch validation (0: deterministic)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["widths"] = list(self.widths)
        d["tasks"] = list(self.tasks)
        return d

    def model_config(self) -> ModelConfig:
        return ModelConfig(widths=tuple(self.widths), context=self.context)


def class_weights(codes: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse class frequency over known labels, normalised to mean 1 (1s without labels)."""
    known = codes[codes >= 0]
    counts = torch.bincount(known, minlength=k).float()
    if known.numel() == 0:
        return torch.ones(k)
    w = torch.where(counts > 0, counts.sum() / (k * counts.clamp_min(1)), torch.zeros_like(counts))
    return w / w[counts > 0].mean()


def inner_split(labels: pd.DataFrame, ids: list[str], frac: float = 0.15, seed: int = 0) -> tuple[list, list]:
    """Training patients -> (train, val) stratified on IDH x 1p/19q, at least 2 val patients."""
    rng = np.random.default_rng(seed)
    lab = labels.set_index("patient_id")
    strata: dict[str, list[str]] = {}
    for pid in ids:
        key = f"{lab.at[pid, 'idh']}|{lab.at[pid, 'codel']}" if pid in lab.index else "unlabelled"
        strata.setdefault(key, []).append(pid)
    val = []
    for key in sorted(strata):
        members = sorted(strata[key])
        rng.shuffle(members)
        val += members[: round(frac * len(members))]
    if len(val) < 2:
        rest = [p for p in sorted(ids) if p not in val]
        val += rest[: 2 - len(val)]
    val_set = set(val)
    return [p for p in ids if p not in val_set], [p for p in ids if p in val_set]


def _dice(pred: np.ndarray, true: np.ndarray) -> float:
    s = pred.sum() + true.sum()
    return 1.0 if s == 0 else float(2 * (pred & true).sum() / s)


def validate_patients(lm: LoadedModel, data: SliceData, tasks: tuple[str, ...], mc: int = 0) -> dict[str, float]:
    """Patient-level validation: mean Dice, NLL and AUC per labelled task, ``val_loss``."""
    from sklearn.metrics import roc_auc_score

    outs = predict_patients(lm, data, mc=mc, temperature=dict.fromkeys(TASKS, 1.0))
    res: dict[str, float] = {}
    dices = []
    for pi, o in enumerate(outs):
        a, b = data.spans[pi]
        if bool(data.has_mask[a]):
            dices.append(_dice(o.mask.astype(bool), data.mask[a:b].numpy().astype(bool)))
    if dices:
        res["val_dice"] = float(np.mean(dices))
    nlls = []
    for t in tasks:
        codes = data.codes[t].numpy()
        keep = codes >= 0
        if not keep.any():
            continue
        p = np.stack([o.probs[t] for o in outs])[keep]
        y = codes[keep]
        nll = float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-7, 1))))
        res[f"val_nll_{t}"] = nll
        nlls.append(nll)
        if len(np.unique(y)) > 1:
            try:
                res[f"val_auc_{t}"] = float(
                    roc_auc_score(y, p[:, 1]) if p.shape[1] == 2 else roc_auc_score(y, p, multi_class="ovr")
                )
            except ValueError:
                pass
    res["val_loss"] = (1 - res.get("val_dice", 1.0)) + (float(np.mean(nlls)) if nlls else 0.0)
    return res


class GliomaTask(TrainTask):
    samples_name = "slices"

    def __init__(self, cfg: TrainConfig, model: GMMAS, data: dict[str, SliceData], device: torch.device) -> None:
        self.cfg, self.model, self.data, self.device = cfg, model, data, device
        self.amp = resolve_amp(cfg.amp, device)
        self.tasks = tuple(t for t in TASKS if t in cfg.tasks)
        self.loss_names = ("mtl", *(("seg",) if cfg.seg else ()), *self.tasks) + (("distill",) if cfg.distill else ())
        self.kendall = KendallWeighting(
            self.loss_names[1 : 1 + int(cfg.seg) + len(self.tasks)], cfg.weighting == "equal"
        )
        self.kendall.to(device)
        decay = [p for n, p in model.named_parameters() if n != "v"]
        params = [
            {"params": decay, "weight_decay": cfg.weight_decay},
            # fusion logits and Kendall s_t: no weight decay (it would pull them to 0 without data)
            {"params": [model.v, *self.kendall.parameters()], "weight_decay": 0.0},
        ]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr)
        total = max(cfg.epochs, 1)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda e: (1 - min(e, total - 1) / total) ** 0.9
        )
        self.tag = "[gmmas] "
        self.gen = torch.Generator()
        train = data["train"]
        self.codes = {t: train.codes[t].clone() for t in TASKS}  # training labels incl. pseudo-labels
        self.pl_epoch = cfg.pl_epoch if cfg.pl_epoch is not None else cfg.epochs // 2
        self.distill_epoch = cfg.distill_epoch if cfg.distill_epoch is not None else (2 * cfg.epochs) // 3
        self.pseudo: dict[str, dict[str, int]] = {}  # task -> patient -> pseudo-label
        self.weights_cls = {t: class_weights(self.codes[t], len(TASKS[t])).to(device) for t in self.tasks}
        self.tumour_idx = torch.nonzero(train.tumour).flatten()
        self.epoch = 0
        self.n_mixed = 0
        self.order = torch.arange(0)

    # -- data -------------------------------------------------------------------------------
    def steps_per_epoch(self) -> int:
        n = 2 * max(len(self.tumour_idx), self.cfg.batch_size)
        return max(n // self.cfg.batch_size, 1)

    def begin_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.gen.manual_seed(self.cfg.seed * 100_003 + epoch)
        if self.cfg.pseudo_labels and epoch == self.pl_epoch and not self.pseudo:
            self._pseudo_label()
        half = self.cfg.batch_size // 2
        steps = self.steps_per_epoch()
        n = self.data["train"].n
        t = self.tumour_idx[torch.randint(len(self.tumour_idx), (steps * half,), generator=self.gen)]
        u = torch.randint(n, (steps * (self.cfg.batch_size - half),), generator=self.gen)
        self.order = torch.cat([t.view(steps, half), u.view(steps, -1)], 1)
        self.n_mixed = 0

    def batch(self, step: int) -> dict:
        idx = self.order[step]
        b = make_batch(self.data["train"], idx, self.cfg.context, self.codes)
        if self.cfg.augment:
            b = augment(b, self.gen)
        if self.cfg.cutmix:
            b, n = cutmix(b, self.gen, self.cfg.cutmix_p)
            self.n_mixed += n
        if self.cfg.distill and self.epoch >= self.distill_epoch:
            b["drop"] = random_drop(b["present"], self.gen)
        return {
            k: (v.to(self.device) if torch.is_tensor(v) else {t: y.to(self.device) for t, y in v.items()})
            for k, v in b.items()
        }

    def batch_size(self, batch: dict) -> int:
        return int(batch["x"].shape[0])

    # -- model -------------------------------------------------------------------------------
    def forward(self, batch: dict) -> dict:
        out = {"full": self.model(batch["x"], batch["present"])}
        if "drop" in batch:
            out["missing"] = self.model(batch["x"], batch["present"], batch["drop"])
        return out

    def _task_losses(self, o: dict, batch: dict) -> dict[str, torch.Tensor | None]:
        losses: dict[str, torch.Tensor | None] = {}
        if self.cfg.seg:
            losses["seg"] = seg_loss(o["seg"], batch["mask"], batch["has_mask"])
        for t in self.tasks:
            y = batch["y"][t]
            losses[t] = soft_ce(o[t], y, self.weights_cls[t]) if float(y.sum()) > 0 else None
        return losses

    def losses(self, out: dict, batch: dict) -> dict[str, torch.Tensor]:
        raw = self._task_losses(out["full"], batch)
        res = {"mtl": self.kendall(raw)}
        for t, v in raw.items():
            res[t] = v.detach() if v is not None else torch.zeros((), device=self.device)
        if "missing" in out:
            miss = self._task_losses(out["missing"], batch)
            mse = torch.nn.functional.mse_loss(out["missing"]["feat"].float(), out["full"]["feat"].float().detach())
            res["distill"] = sum(v for v in miss.values() if v is not None) + self.cfg.distill_weight * mse
        elif self.cfg.distill:
            res["distill"] = torch.zeros((), device=self.device)
        return res

    def loss_weights(self) -> dict[str, float]:
        # the raw task losses are logged (detached); the Kendall total and the distillation train
        return {t: (1.0 if t in ("mtl", "distill") else 0.0) for t in self.loss_names}

    def end_epoch(self, epoch: int, mean_losses: dict[str, float]) -> dict[str, float]:
        extra = {f"sigma_{t}": s for t, s in self.kendall.sigmas().items()}
        seen = self.data["train"].present.amax(0) > 0
        extra.update({f"w_{s}": w for s, w in self.model.modal_significance(seen).items()})
        extra["cutmix_samples"] = float(self.n_mixed)
        for t in self.tasks:
            extra[f"pseudo_{t}"] = float(len(self.pseudo.get(t, {})))
        return extra

    def validate(self, epoch: int) -> dict[str, float]:
        lm = LoadedModel(self.model, {}, dict.fromkeys(TASKS, 1.0), self.device)
        res = validate_patients(lm, self.data["val"], self.tasks, self.cfg.val_mc)
        self.model.train()
        return res

    # -- UPS -----------------------------------------------------------------------------------
    def _pseudo_label(self) -> None:
        train = self.data["train"]
        need = [i for i in range(len(train.patient_ids)) if any(int(self.codes[t][i]) < 0 for t in self.tasks)]
        if not need:
            self.pseudo = {t: {} for t in self.tasks}
            return
        sub = _subset(train, need)
        lm = LoadedModel(self.model, {}, dict.fromkeys(TASKS, 1.0), self.device)
        outs = predict_patients(lm, sub, mc=10, seed=self.cfg.seed)
        self.model.train()
        self.pseudo = {t: {} for t in self.tasks}
        for i, o in zip(need, outs, strict=True):
            for t in self.tasks:
                if int(self.codes[t][i]) >= 0:
                    continue
                k = int(np.argmax(o.probs[t]))
                if o.probs[t][k] >= self.cfg.tau_c and o.uncertainty[t] < self.cfg.tau_u:
                    self.codes[t][i] = k
                    self.pseudo[t][train.patient_ids[i]] = k

    def state_dict(self) -> dict:
        return {
            "generator": self.gen.get_state(),
            "kendall": self.kendall.state_dict(),
            "codes": {t: v.clone() for t, v in self.codes.items()},
            "pseudo": self.pseudo,
            "n_mixed": self.n_mixed,
        }

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["generator"])
        self.kendall.load_state_dict(state["kendall"])
        self.codes = {t: v.clone() for t, v in state["codes"].items()}
        self.pseudo = state["pseudo"]
        self.n_mixed = state.get("n_mixed", 0)


def _subset(data: SliceData, patients: list[int]) -> SliceData:
    """The slices of some patients as their own SliceData (prev/next re-based)."""
    idx = torch.cat([torch.arange(*data.spans[i]) for i in patients])
    remap = torch.full((data.n,), -1, dtype=torch.long)
    remap[idx] = torch.arange(len(idx))
    spans, a = [], 0
    for i in patients:
        n = data.spans[i][1] - data.spans[i][0]
        spans.append((a, a + n))
        a += n
    return SliceData(
        image=data.image[idx],
        mask=data.mask[idx],
        has_mask=data.has_mask[idx],
        present=data.present[idx],
        patient=torch.repeat_interleave(torch.arange(len(patients)), torch.tensor([b - a for a, b in spans])),
        prev=remap[data.prev[idx]],
        next=remap[data.next[idx]],
        tumour=data.tumour[idx],
        patient_ids=[data.patient_ids[i] for i in patients],
        spans=spans,
        codes={t: v[patients] for t, v in data.codes.items()},
    )


def _withhold(ids: list[str], frac: float, seed: int) -> list[str]:
    """The training patients whose labels are hidden (deterministic in ``seed``)."""
    if frac <= 0:
        return []
    rng = np.random.default_rng(seed + 17)
    return sorted(rng.choice(sorted(ids), size=round(frac * len(ids)), replace=False).tolist())


def train(
    data_dir: str | os.PathLike | Dataset,
    out_dir: str | os.PathLike,
    cfg: TrainConfig | None = None,
    train_ids: list[str] | None = None,
    val_ids: list[str] | None = None,
    log=print,
    callbacks: list[Callback] | None = None,
) -> dict:
    """Train (or resume) GMMAS; writes config.json, model_best.pt, checkpoint.pt, history.csv,
    calibration.json, metrics.json, pseudo_labels.csv. Without ``val_ids`` a stratified 15 % of the training
    patients validates (early stopping, model selection, temperature)."""
    cfg = cfg or TrainConfig()
    unknown = set(cfg.tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown tasks {sorted(unknown)}; choose from {list(TASKS)}")
    if cfg.weighting not in ("kendall", "equal"):
        raise ValueError(f"weighting must be kendall or equal, not {cfg.weighting!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.seed)
    device = resolve_device(cfg.device)
    resolve_amp(cfg.amp, device)
    t0 = time.perf_counter()
    ds = data_dir if isinstance(data_dir, Dataset) else load_dataset(data_dir)
    ids = train_ids if train_ids is not None else ds.ids()
    known = set(ds.ids())
    ids = [p for p in ids if p in known]
    if val_ids is None:
        ids, val_ids = inner_split(ds.labels, ids, seed=cfg.seed)
    val_ids = [p for p in val_ids if p in known]
    if len(ids) < 2 or not val_ids:
        raise ValueError(f"need >= 2 training and >= 1 validation patients, got {len(ids)} / {len(val_ids)}")
    withheld = _withhold(ids, cfg.withhold_labels, cfg.seed)
    by = ds.by_id()
    hidden = set(withheld)
    # copies with the labels hidden: the caller's Dataset (reused across CV folds) is never changed
    train_patients = [replace(by[p], labels=dict.fromkeys(TASKS, -1)) if p in hidden else by[p] for p in ids]
    data = {"train": build_slices(train_patients), "val": build_slices([by[p] for p in val_ids])}
    if not bool(data["train"].tumour.any()):
        raise ValueError("no training slice has a tumour mask")
    log(
        f"[gmmas] {len(ids)} train / {len(val_ids)} val patients, {data['train'].n} / {data['val'].n} slices "
        f"({int(data['train'].tumour.sum())} train tumour slices), loaded in {time.perf_counter() - t0:.1f} s"
        + (f"; labels withheld from {len(withheld)} patients" if withheld else "")
    )
    model = GMMAS(cfg.model_config()).to(device)
    task = GliomaTask(cfg, model, data, device)
    config = {
        "family": "glioma-gmmas",
        "train": cfg.to_dict(),
        "model": cfg.model_config().to_dict(),
        "sequences": list(SEQUENCES),
        "tasks": {t: list(v) for t, v in TASKS.items()},
        "split": {"train": ids, "val": val_ids, "withheld_labels": withheld},
        "n_parameters": n_parameters(model),
        "issues": ds.issues,
    }
    atomic_write_json(out / "config.json", config)
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
        "best_val_loss": result.best,
        **result.common_metrics(),
        "train_slices_per_s": result.samples_per_s,
        "n_train_patients": len(ids),
        "n_val_patients": len(val_ids),
        "n_train_slices": data["train"].n,
        "n_parameters": n_parameters(model),
        "pseudo_labels": {t: len(v) for t, v in task.pseudo.items()},
        **{k: v for k, v in result.best_row().items() if k.startswith(("val_", "sigma_", "w_"))},
    }
    # the UPS pseudo-labels (patient, task, class code): scored against the hidden truth in the semi-supervised study
    rows = [{"patient_id": p, "task": t, "label": int(k)} for t, d in task.pseudo.items() for p, k in sorted(d.items())]
    atomic_write_text(
        out / "pseudo_labels.csv", pd.DataFrame(rows, columns=["patient_id", "task", "label"]).to_csv(index=False)
    )
    if result.complete and cfg.calibrate:
        temps = calibrate(out, data["val"], device, task.tasks)
        metrics.update({f"temperature_{t}": v for t, v in temps.items()})
    return write_metrics(out / "metrics.json", metrics)


def calibrate(model_dir: Path, val: SliceData, device: torch.device, tasks: tuple[str, ...]) -> dict[str, float]:
    """Temperature per task on the validation patients' aggregated logits -> calibration.json."""
    from ml.glioma.predict import load_model

    lm = load_model(model_dir, device)
    outs = predict_patients(lm, val, mc=0, temperature=dict.fromkeys(TASKS, 1.0))
    temps = {}
    for t in TASKS:
        logits = np.stack([o.logits[t] for o in outs])
        temps[t] = fit_temperature(logits, val.codes[t].numpy()) if t in tasks else 1.0
    atomic_write_json(
        Path(model_dir) / "calibration.json",
        {"temperature": temps, "n_val_patients": len(outs), "method": "NLL grid search, T in [0.5, 5]"},
    )
    return temps


def _identity(d: dict) -> dict:
    return {k: v for k, v in d.items() if k not in (*RUNTIME_FIELDS, "val_mc")}
