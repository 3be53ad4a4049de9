"""GMMAS inference: slice outputs, the patient-level rule, MC-dropout uncertainty, temperature
scaling, the CLI's ``predict`` (shared layout -> ``predictions.csv`` + ``masks/<id>.npz``) and a 3D
NIfTI path.

Patient-level rule ([I], the paper's code averages window logits; here slices): the predicted
mask is argmax per slice; the patient's logits per task are the **tumour-area-weighted mean of
the slice logits over slices with >= ``min_area`` (10) predicted tumour pixels**; when no slice
qualifies, the 3 slices with the largest summed tumour probability, equally weighted. The
probability is ``softmax(logits / T_task)`` with the task's temperature from
``calibration.json`` (1 when absent).

Post-processing ([C] the authors' optional step, simplified): the 3D connected components of the
predicted mask (26-connectivity over the slice stack) smaller than ``keep_fraction`` (10 %) of the
largest are removed (``postprocess=True``, the default); the patient-level rule uses the cleaned
mask.

Uncertainty: ``mc`` (default 10) MC-dropout passes over the selected slices; ``u_<task>`` is the
standard deviation across passes of the probability of the predicted class (UPS's ``u``, spec
§1.6).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ml.glioma.data import PRED_COLUMNS, SEQUENCES, TASKS, Patient, load_dataset
from ml.glioma.model import GMMAS, ModelConfig, enable_mc_dropout
from ml.glioma.slices import SliceData, build_slices, gather
from ml.training import autocast
from ml.utils.io import atomic_write_text, save_npz_deterministic
from ml.utils.torch_utils import resolve_device

__all__ = [
    "LoadedModel",
    "PatientOutput",
    "aggregate",
    "clean_mask",
    "fit_temperature",
    "load_model",
    "predict_dir",
    "predict_nifti",
    "predict_patients",
    "predictions_frame",
]

MIN_AREA = 10


@dataclass
class LoadedModel:
    model: GMMAS
    config: dict
    temperature: dict[str, float]
    device: torch.device

    @property
    def context(self) -> int:
        return self.model.cfg.context


@dataclass
class PatientOutput:
    patient_id: str
    mask: np.ndarray  # uint8 (S, H, W)
    logits: dict[str, np.ndarray]  # task -> (K,) aggregated logits (uncalibrated)
    probs: dict[str, np.ndarray]  # task -> (K,) calibrated probabilities (mean over MC passes if any)
    uncertainty: dict[str, float]  # task -> std of the predicted class's probability over MC passes
    slices_used: int
    raw: dict[str, np.ndarray] | None = None  # task -> softmax(logits) (T = 1, no MC): before calibration


def load_model(model_dir: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedModel:
    d = Path(model_dir)
    for name in ("config.json", "model_best.pt"):
        if not (d / name).exists():
            raise FileNotFoundError(f"{d / name} missing: not a trained glioma model directory")
    cfg = json.loads((d / "config.json").read_text())
    dev = resolve_device(str(device)) if not isinstance(device, torch.device) else device
    model = GMMAS(ModelConfig.from_dict(cfg["model"]))
    state = torch.load(d / "model_best.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    model.to(dev).eval()
    temp = {}
    if (d / "calibration.json").exists():
        temp = json.loads((d / "calibration.json").read_text()).get("temperature", {})
    return LoadedModel(model=model, config=cfg, temperature={t: float(temp.get(t, 1.0)) for t in TASKS}, device=dev)


def _forward(model, data: SliceData, idx: torch.Tensor, context: int, device, amp, drop=None) -> dict:
    x = gather(data, idx, context).to(device)
    pres = data.present[idx].to(device)
    with autocast(device, amp):
        out = model(x, pres, None if drop is None else drop.to(device).expand(len(idx), -1))
    return {k: v.float().cpu() for k, v in out.items() if k != "feat"}


def clean_mask(mask: np.ndarray, keep_fraction: float = 0.1) -> np.ndarray:
    """Drop 3D connected components smaller than ``keep_fraction`` of the largest."""
    from scipy import ndimage

    if not mask.any():
        return mask
    lab, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if n <= 1:
        return mask
    sizes = np.bincount(lab.ravel())[1:]
    keep = np.nonzero(sizes >= keep_fraction * sizes.max())[0] + 1
    return np.isin(lab, keep).astype(mask.dtype)


def aggregate(tumour_prob: torch.Tensor, pred_area: torch.Tensor, logits: dict[str, torch.Tensor]):
    """Patient logits from slice logits (see the module docstring) -> (logits per task, slice indices used)."""
    sel = torch.nonzero(pred_area >= MIN_AREA).flatten()
    if len(sel):
        w = pred_area[sel].float()
    else:
        sel = torch.argsort(tumour_prob.flatten(1).sum(1), descending=True)[:3]
        w = torch.ones(len(sel))
    w = w / w.sum()
    return {t: (v[sel] * w[:, None]).sum(0) for t, v in logits.items()}, sel


@torch.no_grad()
def predict_patients(
    lm: LoadedModel,
    data: SliceData,
    mc: int = 10,
    drop: torch.Tensor | None = None,
    amp: torch.dtype | None = None,
    batch: int = 32,
    seed: int = 0,
    temperature: dict[str, float] | None = None,
    postprocess: bool = True,
) -> list[PatientOutput]:
    """Every patient of ``data``: mask, aggregated logits, calibrated probabilities, MC-dropout
    uncertainty. ``drop`` (4,) 0/1 removes sequences (missing-modality evaluation)."""
    model, dev, ctx = lm.model, lm.device, lm.context
    temp = temperature if temperature is not None else lm.temperature
    outs = []
    for pi, (a, b) in enumerate(data.spans):
        model.eval()
        seg, logits = [], {t: [] for t in TASKS}
        for i in range(a, b, batch):
            o = _forward(model, data, torch.arange(i, min(i + batch, b)), ctx, dev, amp, drop)
            seg.append(torch.softmax(o["seg"], 1)[:, 1])
            for t in TASKS:
                logits[t].append(o[t])
        prob = torch.cat(seg)
        mask = (prob > 0.5).to(torch.uint8)
        if postprocess:
            mask = torch.from_numpy(clean_mask(mask.numpy()))
        area = mask.flatten(1).sum(1)
        lg = {t: torch.cat(v) for t, v in logits.items()}
        agg, sel = aggregate(prob, area, lg)
        probs = {t: torch.softmax(agg[t] / temp.get(t, 1.0), 0) for t in TASKS}
        raw = {t: torch.softmax(agg[t], 0).numpy() for t in TASKS}
        unc = dict.fromkeys(TASKS, float("nan"))
        if mc > 0:
            torch.manual_seed(seed * 7919 + pi)
            enable_mc_dropout(model)
            idx = sel + a
            w = area[sel].float() if bool((area[sel] >= MIN_AREA).all()) and len(sel) else torch.ones(len(sel))
            w = w / w.sum()
            samples = {t: [] for t in TASKS}
            for _ in range(mc):
                o = _forward(model, data, idx, ctx, dev, amp, drop)
                for t in TASKS:
                    samples[t].append(torch.softmax((o[t] * w[:, None]).sum(0) / temp.get(t, 1.0), 0))
            model.eval()
            for t in TASKS:
                s = torch.stack(samples[t])  # (mc, K)
                mean = s.mean(0)
                k = int(mean.argmax())
                probs[t] = mean
                unc[t] = float(s[:, k].std())
        outs.append(
            PatientOutput(
                patient_id=data.patient_ids[pi],
                mask=mask.numpy(),
                logits={t: v.numpy() for t, v in agg.items()},
                probs={t: v.numpy() for t, v in probs.items()},
                uncertainty=unc,
                slices_used=len(sel),
                raw=raw,
            )
        )
    return outs


def _prob_columns(probs: dict[str, np.ndarray], prefix: str = "") -> dict[str, float]:
    hist = TASKS["histology"]
    return {
        f"{prefix}p_idh_mutant": float(probs["idh"][1]),
        f"{prefix}p_codel": float(probs["codel"][1]),
        f"{prefix}p_grade_g3": float(probs["grade"][1]),
        **{
            f"{prefix}p_{h}": float(probs["histology"][hist.index(h)])
            for h in ("oligodendroglioma", "astrocytoma", "oligoastrocytoma")
        },
    }


def predictions_frame(outs: list[PatientOutput], fold: int = -1) -> pd.DataFrame:
    """The predictions frame (``ml/glioma/INTERFACES.md``; ``predictions.csv``): calibrated
    probabilities ``p_*`` (MC mean when MC passes ran), uncertainties ``u_*``, the predicted
    tumour size and, as ``raw_p_*``, the probabilities before temperature scaling and MC."""
    rows = []
    for o in outs:
        rows.append(
            {
                "patient_id": o.patient_id,
                "fold": fold,
                **_prob_columns(o.probs),
                **{f"u_{t}": o.uncertainty[t] for t in ("idh", "codel", "grade", "histology")},
                "tumour_voxels": int(o.mask.sum()),
                "n_slices": int(o.mask.shape[0]),
                "slices_used": o.slices_used,
                **(_prob_columns(o.raw, "raw_") if o.raw is not None else {}),
            }
        )
    cols = ["patient_id", "fold", *PRED_COLUMNS]
    return pd.DataFrame(rows, columns=None if rows else cols)


def fit_temperature(logits: np.ndarray, codes: np.ndarray, grid: np.ndarray | None = None) -> float:
    """Temperature minimising the NLL of ``softmax(logits / T)`` on labelled rows ([I]: a grid over
    [0.5, 5] in log steps -- robust for the few validation patients of a fold; 1 without labels)."""
    keep = codes >= 0
    if keep.sum() < 2:
        return 1.0
    z = torch.as_tensor(logits[keep], dtype=torch.float64)
    y = torch.as_tensor(codes[keep], dtype=torch.long)
    grid = grid if grid is not None else np.exp(np.linspace(np.log(0.5), np.log(5.0), 61))
    nll = [float(torch.nn.functional.cross_entropy(z / t, y)) for t in grid]
    return float(grid[int(np.argmin(nll))])


def predict_dir(
    data_dir: str | os.PathLike,
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    device: str = "cpu",
    mc: int = 10,
    log=print,
) -> pd.DataFrame:
    """The CLI's ``predict``: every readable patient of ``data_dir`` (labels not needed) ->
    ``out_dir/predictions.csv`` and ``out_dir/masks/<id>.npz`` (``mask`` uint8 0/1, the input's
    slice shape); unreadable patients -> ``out_dir/issues.csv``."""
    lm = load_model(model_dir, device)
    ds = load_dataset(data_dir)
    out = Path(out_dir)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    outs = []
    for p in ds.patients:  # one patient at a time: bounded memory
        outs += predict_patients(lm, build_slices([p]), mc=mc)
        save_npz_deterministic(out / "masks" / f"{p.patient_id}.npz", {"mask": outs[-1].mask})
    df = predictions_frame(outs)
    atomic_write_text(out / "predictions.csv", df.to_csv(index=False))
    if ds.issues:
        atomic_write_text(out / "issues.csv", pd.DataFrame(ds.issues).to_csv(index=False))
    log(f"predicted {len(df)} patients -> {out}" + (f" ({len(ds.issues)} issues: issues.csv)" if ds.issues else ""))
    return df


def predict_nifti(
    case_dir: str | os.PathLike,
    model_dir: str | os.PathLike,
    out_path: str | os.PathLike,
    device: str = "cpu",
    size: int = 128,
) -> dict:
    """3D path: a BraTS-layout case folder (NIfTI per sequence; names as ``ml.data.mri``
    recognises them) -> a label NIfTI (0/1 whole tumour) on the grid of the reference sequence,
    plus the patient-level probabilities. The volumes are co-registered to the reference
    (``ml.data.mri.coregister``), each axial slice resized to ``size`` x ``size`` (bilinear
    images, the probability map resized back), and slices without brain skipped."""
    import nibabel as nib

    from ml.data.mri import coregister, sequence_from_text
    from ml.data.volume import nifti_to_volume, write_nifti

    vols = {}
    for f in sorted(Path(case_dir).glob("*.nii*")):
        seq = sequence_from_text(f.name)
        if seq in SEQUENCES and seq not in vols:
            vols[seq] = nifti_to_volume(nib.load(str(f)))
    if not vols:
        raise ValueError(f"{case_dir}: no recognisable MRI sequence (t1, t1c, t2, flair)")
    reg, _ = coregister(vols, rigid=False)
    ref = next(iter(reg.values()))
    shape = ref.array.shape  # (z, y, x) canonical
    img = np.zeros((shape[0], 4, *shape[1:]), np.float32)
    present = np.zeros(4, bool)
    for seq, v in reg.items():
        if seq in SEQUENCES:
            img[:, SEQUENCES.index(seq)] = v.array.astype(np.float32)
            present[SEQUENCES.index(seq)] = True
    brain = np.abs(img).reshape(shape[0], -1).max(1) > 0
    zs = np.nonzero(brain)[0]
    t = torch.from_numpy(img[zs]).reshape(len(zs) * 4, 1, *shape[1:])
    small = torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    small = small.reshape(len(zs), 4, size, size).numpy()
    from ml.glioma.data import _zscore

    p = Patient(
        patient_id=Path(case_dir).name,
        image=_zscore(small, present),
        present=present,
        mask=None,
        slice_index=zs,
        spacing=np.full(3, np.nan),
    )
    lm = load_model(model_dir, device)
    data = build_slices([p])
    o = predict_patients(lm, data, mc=0)[0]
    # probability map back to the reference grid
    mask_small = torch.from_numpy(o.mask.astype(np.float32))[:, None]
    back = torch.nn.functional.interpolate(mask_small, size=shape[1:], mode="bilinear", align_corners=False)
    label = np.zeros(shape, np.uint8)
    label[zs] = (back[:, 0].numpy() >= 0.5).astype(np.uint8)
    from dataclasses import replace

    write_nifti(replace(ref, array=label), Path(out_path))
    return {
        "patient_id": p.patient_id,
        "sequences": [s for s, k in zip(SEQUENCES, present, strict=True) if k],
        "tumour_voxels": int(label.sum()),
        "voxel_volume_mm3": float(np.prod(ref.spacing)),
        **{f"p_{t}": o.probs[t].tolist() for t in TASKS},
    }
