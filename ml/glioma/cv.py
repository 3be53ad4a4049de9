"""Patient-level cross-validation of GMMAS and its ablations (spec §C.7) on one set of folds.

``run_cv`` trains one model per fold on the other folds (plus the unlabelled pool, fold -1, whose
patients only feed the UPS stage) with a stratified inner validation split, and predicts the
held-out fold: out-of-fold (OOF) predictions for every labelled patient, each from a model that
never saw it. Every fold directory is resumable (a finished fold is skipped; an interrupted one
resumes from its checkpoint). Written under ``out_dir/<variant>/``: ``fold<k>/`` (model dir,
``oof.csv``, ``oof_masks.npz``, ``missing_<subset>.csv``), ``oof.csv`` pooled.

Missing-sequence evaluation (``missing_subsets``): each held-out fold is predicted again with
every non-empty proper subset of the sequences the cohort has removed from the fusion (fusion
weight zeroed, the model's own mechanism); Dice and probabilities per patient per subset.

Variants (``VARIANTS``; overrides of ``TrainConfig``):

* ``gmmas`` -- every stage (Kendall MTL, CutMix, UPS, self-distillation, temperature);
* ``equal_weights`` -- plain sum of task losses instead of Kendall;
* ``no_cutmix``, ``no_pseudo``, ``no_distill`` -- one stage off;
* ``stl_<task>`` -- single-task networks on the same backbone: one classification task plus the
  segmentation head ([I]: the patient-level rule needs predicted tumour slices, so a
  classification network without segmentation would need another aggregation; segmentation is
  kept as the localiser), and ``stl_seg`` (segmentation only);
* ``semi_ups`` / ``semi_no_ups`` / ``ups_strict`` -- the semi-supervised study: the labels of half
  the training patients are hidden (lgg-mri has almost no unlabelled patients of its own); UPS at
  0.9 / 0.05, none, or the authors' tightened 0.99 / 0.01.
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ml.glioma.data import SEQUENCES, TASKS, Dataset, load_dataset
from ml.glioma.predict import load_model, predict_patients, predictions_frame
from ml.glioma.slices import build_slices
from ml.glioma.train import TrainConfig, train
from ml.utils.io import atomic_write_text, save_npz_deterministic

__all__ = ["VARIANTS", "fold_dice", "load_oof", "load_oof_masks", "missing_subsets", "run_cv", "variant_config"]

VARIANTS: dict[str, dict] = {
    "gmmas": {},
    "equal_weights": {"weighting": "equal"},
    "no_cutmix": {"cutmix": False},
    "no_pseudo": {"pseudo_labels": False},
    "no_distill": {"distill": False},
    **{f"stl_{t}": {"tasks": (t,), "pseudo_labels": True} for t in TASKS},
    "stl_seg": {"tasks": (), "pseudo_labels": False, "cutmix": False},
    # the semi-supervised study: half the training patients' labels hidden, with and without UPS
    "semi_ups": {"withhold_labels": 0.5},
    "semi_no_ups": {"withhold_labels": 0.5, "pseudo_labels": False},
    "ups_strict": {"withhold_labels": 0.5, "tau_c": 0.99, "tau_u": 0.01},
}


def variant_config(base: TrainConfig, variant: str) -> TrainConfig:
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {sorted(VARIANTS)}")
    return replace(base, **VARIANTS[variant])


def missing_subsets(present: tuple[str, ...]) -> list[tuple[str, ...]]:
    """Every non-empty proper subset of the sequences present in a cohort, as the sequences removed."""
    out = []
    for r in range(1, len(present)):
        out += list(itertools.combinations(present, r))
    return out


def fold_dice(masks: dict[str, np.ndarray], ds: Dataset) -> dict[str, float]:
    by = ds.by_id()
    res = {}
    for pid, m in masks.items():
        t = by[pid].mask
        if t is None:
            continue
        p, t = m.astype(bool), t.astype(bool)
        s = p.sum() + t.sum()
        res[pid] = 1.0 if s == 0 else float(2 * (p & t).sum() / s)
    return res


def run_cv(
    data: str | os.PathLike | Dataset,
    out_dir: str | os.PathLike,
    folds: pd.DataFrame,
    cfg: TrainConfig | None = None,
    variant: str = "gmmas",
    only_folds: list[int] | None = None,
    missing: bool = True,
    mc: int = 10,
    log=print,
    callbacks_for=None,
) -> pd.DataFrame:
    """Cross-validate ``variant``; returns the pooled OOF predictions frame (with ``dice``).
    ``callbacks_for(fold)`` -> engine callbacks for that fold's training (e.g. MLflow)."""
    ds = data if isinstance(data, Dataset) else load_dataset(data)
    cfg = variant_config(cfg or TrainConfig(), variant)
    root = Path(out_dir) / variant
    root.mkdir(parents=True, exist_ok=True)
    fold_of = dict(zip(folds["patient_id"], folds["fold"].astype(int), strict=True))
    ids = [p for p in ds.ids() if p in fold_of]
    ks = sorted({fold_of[p] for p in ids if fold_of[p] >= 0})
    pool = [p for p in ids if fold_of[p] < 0]
    frames = []
    for k in ks:
        if only_folds is not None and k not in only_folds:
            continue
        fdir = root / f"fold{k}"
        test = [p for p in ids if fold_of[p] == k]
        trainval = [p for p in ids if fold_of[p] >= 0 and fold_of[p] != k] + pool
        t0 = time.perf_counter()
        done = (fdir / "oof.csv").exists() and (fdir / "metrics.json").exists()
        if not done:
            log(
                f"[cv {variant}] fold {k}: {len(trainval)} training patients ({len(pool)} unlabelled), "
                f"{len(test)} held out"
            )
            cb = callbacks_for(k) if callbacks_for else None
            metrics = train(ds, fdir, replace(cfg, seed=cfg.seed + k), train_ids=trainval, log=log, callbacks=cb)
            if metrics.get("best_epoch", -1) < 0:
                log(f"[cv {variant}] fold {k}: no validated epoch (budget): stopping here, rerun to resume")
                break
            _predict_fold(fdir, ds, test, k, mc, missing)
            log(f"[cv {variant}] fold {k} done in {time.perf_counter() - t0:.0f} s")
        frames.append(pd.read_csv(fdir / "oof.csv"))
    oof = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if not oof.empty:
        atomic_write_text(root / "oof.csv", oof.to_csv(index=False))
    return oof


def _predict_fold(fdir: Path, ds: Dataset, test: list[str], k: int, mc: int, missing: bool) -> None:
    lm = load_model(fdir, "cpu" if not torch.cuda.is_available() else "cuda")
    by = ds.by_id()
    data = build_slices([by[p] for p in test])
    outs = predict_patients(lm, data, mc=mc)
    df = predictions_frame(outs, fold=k)
    masks = {o.patient_id: o.mask for o in outs}
    dice = fold_dice(masks, ds)
    df["dice"] = df["patient_id"].map(dice)
    save_npz_deterministic(fdir / "oof_masks.npz", masks)
    if missing:
        present = tuple(s for i, s in enumerate(SEQUENCES) if any(by[p].present[i] for p in test))
        for removed in missing_subsets(present):
            drop = torch.tensor([0.0 if s in removed else 1.0 for s in SEQUENCES])
            mo = predict_patients(lm, data, mc=0, drop=drop)
            mdf = predictions_frame(mo, fold=k)
            mdf["dice"] = mdf["patient_id"].map(fold_dice({o.patient_id: o.mask for o in mo}, ds))
            mdf["removed"] = "+".join(removed)
            atomic_write_text(fdir / f"missing_{'+'.join(removed)}.csv", mdf.to_csv(index=False))
    atomic_write_text(fdir / "oof.csv", df.to_csv(index=False))  # last: marks the fold done


def load_oof(cv_dir: str | os.PathLike, variant: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(pooled OOF predictions, pooled missing-subset predictions) of a finished variant."""
    root = Path(cv_dir) / variant
    oof = [pd.read_csv(f) for f in sorted(root.glob("fold*/oof.csv"))]
    miss = [pd.read_csv(f) for f in sorted(root.glob("fold*/missing_*.csv"))]
    return (
        pd.concat(oof, ignore_index=True) if oof else pd.DataFrame(),
        pd.concat(miss, ignore_index=True) if miss else pd.DataFrame(),
    )


def load_oof_masks(cv_dir: str | os.PathLike, variant: str = "gmmas") -> dict[str, np.ndarray]:
    """Every finished fold's predicted out-of-fold masks: patient_id -> uint8 (S, H, W)."""
    masks: dict[str, np.ndarray] = {}
    for f in sorted((Path(cv_dir) / variant).glob("fold*/oof_masks.npz")):
        with np.load(f, allow_pickle=False) as z:
            masks.update({k: z[k] for k in z.files})
    return masks
