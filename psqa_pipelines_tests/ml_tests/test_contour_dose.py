"""The contour + dose core: cache, split, losses, models, augmentation, trainer (resume), CLI."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from ml.contour_dose.cache import (
    Cache,
    CacheError,
    entry_from_arrays,
    pack_arrays,
    pack_openkbp_dir,
    write_entry,
    write_index,
)
from ml.contour_dose.losses import DWA, combo_loss, masked_l1, soft_dice_loss
from ml.contour_dose.models import CTAN2D, ModelConfig, build_model
from ml.contour_dose.slices import augment, build_slices, label_map, make_batch
from ml.contour_dose.split import patient_split
from ml.contour_dose.train import TrainConfig, train
from ml.contour_dose.variants import PAPER_ROIS, VARIANTS, lr_swap_index
from psqa_pipelines_tests.conftest import OPENKBP_DIR, needs_openkbp

TINY = (4, 8, 16, 32, 64)


# ---------------------------------------------------------------------------------------
# a synthetic cache: ellipse body, two "parotids", a cord, a PTV and a dose blob
# ---------------------------------------------------------------------------------------
def synthetic_patient(seed: int, nz: int = 12, n: int = 64):
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[:nz, :n, :n].astype(np.float32)
    cy, cx = n / 2 + rng.uniform(-3, 3), n / 2 + rng.uniform(-3, 3)
    body = ((y - cy) / (n * 0.35)) ** 2 + ((x - cx) / (n * 0.4)) ** 2 < 1
    ct = np.where(body, 40.0 + rng.normal(0, 10, body.shape), -1024.0)
    rois = {
        "SpinalCord": ((y - cy - 10) ** 2 + (x - cx) ** 2) < 9,
        "Brainstem": (((y - cy - 6) ** 2 + (x - cx) ** 2) < 12) & (z > nz - 4),
        "RightParotid": ((y - cy + 2) ** 2 + (x - cx + 14) ** 2) < 16,  # canonical x runs right -> left
        "LeftParotid": ((y - cy + 2) ** 2 + (x - cx - 14) ** 2) < 16,
        "PTV70": ((y - cy + 8) ** 2 + (x - cx - 4) ** 2) < 36,
    }
    for name, hu in (("SpinalCord", 300), ("Brainstem", 150), ("RightParotid", -120), ("LeftParotid", -120)):
        ct[rois[name]] = hu + rng.normal(0, 10, int(rois[name].sum()))  # visible organs
    d2 = (y - cy + 8) ** 2 + (x - cx - 4) ** 2
    dose = (70 * np.exp(-d2 / 300.0) * body).astype(np.float32)
    return ct.astype(np.int16), body, rois, dose


def make_cache(root: Path, n_patients: int = 4) -> Path:
    rows = []
    for i in range(n_patients):
        ct, body, rois, dose = synthetic_patient(i)
        rows.append(write_entry(root, f"pt_{i + 1}", pack_arrays(f"pt_{i + 1}", ct, body, rois, dose, (4, 4, 2.5))))
    write_index(root, rows, source="synthetic")
    return root


@pytest.fixture(scope="module")
def syn_cache(tmp_path_factory) -> Path:
    return make_cache(tmp_path_factory.mktemp("cdcache"))


SPLIT4 = pd.DataFrame({"patient_id": ["pt_1", "pt_2", "pt_3", "pt_4"], "split": ["train", "train", "val", "test"]})


# ---------------------------------------------------------------------------------------
# cache
# ---------------------------------------------------------------------------------------
def test_pack_roundtrip_is_exact_except_float16_dose():
    ct, body, rois, dose = synthetic_patient(3)
    arrays = pack_arrays("p", ct, body, rois, dose, (4, 4, 2.5))
    e = entry_from_arrays("p", arrays)
    assert (e.full(e.ct, -1024) == ct).all()
    assert all((e.full(e.rois[n]) == rois[n]).all() for n in rois)
    assert (e.full(e.pdm) == body).all()
    err = np.abs(e.full(e.dose) - dose)
    assert err.max() <= 0.032  # half a float16 ulp at 64 Gy
    assert list(e.rois) == ["Brainstem", "SpinalCord", "RightParotid", "LeftParotid", "PTV70"]  # ROI_ORDER


def test_pack_rejects_bad_inputs():
    ct, body, rois, dose = synthetic_patient(0)
    with pytest.raises(CacheError, match="unknown ROI"):
        pack_arrays("p", ct, body, {"Tumour": body}, dose, (4, 4, 2.5))
    with pytest.raises(CacheError, match="dose"):
        pack_arrays("p", ct, body, rois, -dose - 1, (4, 4, 2.5))
    with pytest.raises(CacheError, match="empty"):
        pack_arrays("p", np.full_like(ct, -1024), np.zeros_like(body), {}, None, (4, 4, 2.5))


@needs_openkbp
def test_pack_real_openkbp_patients_small_exact_and_skips_broken(tmp_path):
    from ml.data.openkbp import load_patient, to_canonical_array

    data = tmp_path / "pats"
    data.mkdir()
    for name in ("pt_1", "pt_2"):
        (data / name).symlink_to(OPENKBP_DIR / name)
    broken = data / "pt_999"
    broken.mkdir()
    shutil.copy(OPENKBP_DIR / "pt_1" / "voxel_dimensions.csv.xz", broken)  # no CT: incomplete
    index, skipped = pack_openkbp_dir(data, tmp_path / "cache", log=lambda *_: None)
    assert list(index["patient_id"]) == ["pt_1", "pt_2"]
    assert [s["patient_id"] for s in skipped] == ["pt_999"] and "incomplete" in skipped[0]["reason"]
    # the budget is <= 120 MB for 169 patients (~0.7 MB a patient on average; measured over all
    # 169 by benchmarks/contour_dose_cache.py); dense arrays would be ~20 MB a patient
    assert index["bytes"].max() < 1.2e6, index["bytes"].tolist()
    cache = Cache.open(tmp_path / "cache")
    e = cache.load("pt_1")
    p = load_patient(OPENKBP_DIR / "pt_1")
    assert (e.full(e.ct, -1024) == to_canonical_array(p.ct_hu)).all()
    assert (e.full(e.pdm) == to_canonical_array(p.possible_dose_mask)).all()
    for name, m in p.structures.items():
        assert (e.full(e.rois[name]) == to_canonical_array(m)).all(), name
    assert np.abs(e.full(e.dose) - to_canonical_array(p.dose)).max() < 0.032
    assert json.loads((tmp_path / "cache" / "meta.json").read_text())["n_patients"] == 2


def test_cache_open_errors(tmp_path):
    with pytest.raises(CacheError, match="not a contour-dose cache"):
        Cache.open(tmp_path)


# ---------------------------------------------------------------------------------------
# split
# ---------------------------------------------------------------------------------------
def test_patient_split_counts_seeded_and_stable():
    ids = [f"pt_{i}" for i in range(1, 170)]
    s = patient_split(ids, seed=0)
    assert s["split"].value_counts().to_dict() == {"train": 135, "val": 17, "test": 17}
    assert s.equals(patient_split(list(reversed(ids)), seed=0))  # listing order does not matter
    assert not s.equals(patient_split(ids, seed=1))
    grown = patient_split(ids + [f"pt_{i}" for i in range(300, 320)], existing=s, seed=0)
    old = grown.merge(s, on="patient_id", suffixes=("", "_old"))
    assert (old["split"] == old["split_old"]).all() and len(old) == 169
    assert grown["split"].value_counts()["test"] in (18, 19)


# ---------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------
def test_dwa_matches_formula():
    dwa = DWA(("dose", "contour"), temperature=2.0)
    assert dwa.weights() == {"dose": 1.0, "contour": 1.0}
    dwa.end_epoch({"dose": 1.0, "contour": 2.0})
    assert dwa.weights() == {"dose": 1.0, "contour": 1.0}  # epochs 0 and 1: equal weights
    dwa.end_epoch({"dose": 0.5, "contour": 1.8})
    w1, w2 = 0.5 / 1.0, 1.8 / 2.0
    e1, e2 = math.exp(w1 / 2), math.exp(w2 / 2)
    got = dwa.weights()
    assert got["dose"] == pytest.approx(2 * e1 / (e1 + e2))
    assert got["contour"] == pytest.approx(2 * e2 / (e1 + e2))
    assert sum(got.values()) == pytest.approx(2.0)
    assert got["contour"] > got["dose"]  # the slower-improving task gets more weight
    state = dwa.state()
    other = DWA(("dose", "contour"))
    other.load(state)
    assert other.weights() == got


def test_combo_and_dice_losses():
    labels = torch.zeros(2, 8, 8, dtype=torch.long)
    labels[:, 2:5, 2:5] = 1
    labels[:, 5:7, 5:7] = 2
    perfect = torch.nn.functional.one_hot(labels, 3).permute(0, 3, 1, 2).float() * 40
    assert float(soft_dice_loss(perfect, labels)) < 1e-4
    assert float(combo_loss(perfect, labels)) < 1e-4
    uniform = torch.zeros(2, 3, 8, 8)
    ce = math.log(3)
    d = soft_dice_loss(uniform, labels)
    assert float(combo_loss(uniform, labels)) == pytest.approx(0.3 * float(d) + 0.7 * ce, rel=1e-5)
    pred, tgt = torch.ones(1, 1, 4, 4), torch.zeros(1, 1, 4, 4)
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    mask[..., :2, :] = True
    tgt[..., 2:, :] = 5  # errors outside the mask are ignored
    assert float(masked_l1(pred, tgt, mask)) == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_builds_and_runs(variant):
    from ml.contour_dose.train import model_config

    m = build_model(model_config(TrainConfig(variant=variant, widths=TINY)))
    x = torch.randn(2, m.cfg.in_channels, 64, 48)
    out = m(x)
    if "dose" in out:  # no ReLU while training (it can die); clamped at 0 in eval mode
        assert m.eval()(x)["dose"].min() >= 0
    tasks = VARIANTS[variant]["tasks"]
    assert set(out) == set(tasks)
    if "dose" in out:
        assert out["dose"].shape == (2, 1, 64, 48)
    if "contour" in out:
        assert out["contour"].shape == (2, len(VARIANTS[variant]["rois"]) + 1, 64, 48)


def test_ctan_cross_task_paths_exist_and_bottleneck_starts_as_identity():
    torch.manual_seed(0)
    m = CTAN2D(ModelConfig(arch="ctan", in_channels=1, n_classes=5, widths=TINY))
    m.eval()
    x = torch.randn(1, 1, 32, 32)
    # CTAE: each task's attention at stage j sees the other task's stage j-1 feature
    assert m.att["dose"][1].net[0].in_channels == 3 * TINY[1]
    # CTAB is initialised as an identity (zero output projection) -> same as without it
    ref = m(x)
    ctab, m.ctab = m.ctab, None
    same = m(x)
    m.ctab = ctab
    assert torch.allclose(ref["dose"], same["dose"]) and torch.allclose(ref["contour"], same["contour"])
    # once trained (non-zero projection) the other task's tokens change this task's output
    torch.nn.init.normal_(m.ctab.proj_out["contour"].weight, std=0.5)
    assert not torch.allclose(m(x)["contour"], ref["contour"])
    mtan = CTAN2D(ModelConfig(arch="ctan", in_channels=1, n_classes=5, widths=TINY, ctae=False, ctab=False))
    assert mtan.att["dose"][1].net[0].in_channels == 2 * TINY[1] and mtan.ctab is None


# ---------------------------------------------------------------------------------------
# augmentation: a left/right flip swaps the parotid labels and input masks
# ---------------------------------------------------------------------------------------
def test_flip_swaps_parotids_in_labels_and_mask_inputs(syn_cache):
    cache = Cache.open(syn_cache)
    e = cache.load("pt_1")
    data = build_slices([e], PAPER_ROIS, 0.0, 500.0)
    idx = torch.arange(4)
    batch = make_batch(data, idx, "seq-human")
    gen = torch.Generator().manual_seed(0)
    out = augment(batch, "seq-human", gen, p_affine=0.0, p_flip=1.0)
    li, ri = PAPER_ROIS.index("LeftParotid") + 1, PAPER_ROIS.index("RightParotid") + 1
    lab, flipped = batch["label"], out["label"]
    # the region that was LeftParotid is now, mirrored, RightParotid
    assert ((flipped.flip(-1) == ri) == (lab == li)).all()
    assert ((flipped.flip(-1) == li) == (lab == ri)).all()
    # input mask channels: channel of LeftParotid after the flip = mirrored RightParotid channel before
    c_left, c_right = 1 + PAPER_ROIS.index("LeftParotid"), 1 + PAPER_ROIS.index("RightParotid")
    assert torch.equal(out["x"][:, c_left], batch["x"][:, c_right].flip(-1))
    assert torch.equal(out["x"][:, 0], batch["x"][:, 0].flip(-1))
    assert torch.equal(out["dose"], batch["dose"].flip(-1))
    assert lr_swap_index(PAPER_ROIS) == [0, 1, 2, 4, 3]


def test_rotation_keeps_labels_categorical_and_ct_padding_air(syn_cache):
    e = Cache.open(syn_cache).load("pt_2")
    data = build_slices([e], PAPER_ROIS, 0.0, 500.0)
    batch = make_batch(data, torch.arange(6), "contour-only")
    out = augment(batch, "contour-only", torch.Generator().manual_seed(1), p_affine=1.0, p_flip=0.0)
    assert set(out["label"].unique().tolist()) <= set(range(len(PAPER_ROIS) + 1))
    assert out["x"].min() >= batch["x"].min() - 1e-4  # padding is air, not 0 (= soft tissue after z-score)
    assert not torch.equal(out["x"], batch["x"])


def test_label_map_priority():
    a = np.zeros((1, 2, 2), bool)
    a[0, 0, 0] = True
    b = a.copy()
    b[0, 1, 1] = True
    lm = label_map({"Brainstem": a, "SpinalCord": b}, ("Brainstem", "SpinalCord"), a.shape)
    assert lm[0, 0, 0] == 1 and lm[0, 1, 1] == 2


# ---------------------------------------------------------------------------------------
# trainer: learns, resumes exactly after a kill, writes its artifacts
# ---------------------------------------------------------------------------------------
def _cfg(**kw) -> TrainConfig:
    base = dict(variant="multi-automated", epochs=2, steps_per_epoch=3, batch_size=4, widths=TINY, lr=3e-3)
    base.update(kw)
    return TrainConfig(**base)


def test_resume_after_kill_equals_uninterrupted_run(syn_cache, tmp_path):
    torch.set_num_threads(1)
    full = train(syn_cache, tmp_path / "full", _cfg(epochs=3), split=SPLIT4, log=lambda *_: None)
    train(syn_cache, tmp_path / "killed", _cfg(epochs=3, max_minutes=0.0), split=SPLIT4, log=lambda *_: None)
    h = pd.read_csv(tmp_path / "killed" / "history.csv")
    assert len(h) == 0  # the budget (checked after every step) stopped it after step 1 of epoch 0, as a kill would
    resumed = train(syn_cache, tmp_path / "killed", _cfg(epochs=3), split=SPLIT4, log=lambda *_: None)
    assert resumed["epochs_run"] == 3 and full["epochs_run"] == 3
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=False)["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed["best_val_loss"] == pytest.approx(full["best_val_loss"])
    for name in ("config.json", "model_best.pt", "history.csv", "metrics.json"):
        assert (tmp_path / "full" / name).exists()
    hist = pd.read_csv(tmp_path / "full" / "history.csv")
    assert {"lambda_dose", "lambda_contour", "val_dose_score", "val_mean_dice"} <= set(hist.columns)


def test_training_learns_dose_and_contours(syn_cache, tmp_path):
    torch.set_num_threads(1)  # 2 threads on a loaded 2-core box oversubscribe badly
    m = train(
        syn_cache,
        tmp_path / "m",
        _cfg(epochs=25, steps_per_epoch=6, augment=False, lr=5e-3),
        split=SPLIT4,
        log=lambda *_: None,
    )
    h = pd.read_csv(tmp_path / "m" / "history.csv")
    assert h["train_loss_dose"].iloc[-1] < 0.2 * h["train_loss_dose"].iloc[0]
    assert h["train_loss_contour"].iloc[-1] < 0.5 * h["train_loss_contour"].iloc[0]
    assert m["val_dose_score"] < 0.25 * h["val_dose_score"].iloc[0] and m["val_dose_score"] < 4.0  # Gy
    assert h["val_mean_dice"].iloc[-1] > 0.15 > h["val_mean_dice"].iloc[0]


def test_bf16_autocast_on_cpu_trains_and_resumes_an_fp32_run(syn_cache, tmp_path):
    """amp="bf16" runs the autocast path on the CPU (1.6-1.9x there on AVX512-BF16, see
    benchmarks/contour_dose_train.py); precision is not part of a run's identity, so an fp32 run
    resumes in bf16 (as a CPU run resumed on a GPU with amp="auto" would)."""
    torch.set_num_threads(1)
    kw = dict(epochs=8, steps_per_epoch=6, augment=False, lr=5e-3)
    first = train(syn_cache, tmp_path / "m", _cfg(**kw, amp="off", max_minutes=0.0), split=SPLIT4, log=lambda *_: None)
    assert first["amp"] == "off" and first["epochs_run"] == 0 and first["stopped_by"] == "max_minutes"
    logs: list[str] = []
    m = train(syn_cache, tmp_path / "m", _cfg(**kw, amp="bf16"), split=SPLIT4, log=logs.append)
    assert any("resumed epoch 0 step 1/6" in line for line in logs)  # mid-epoch, from the budget's checkpoint
    assert m["amp"] == "bf16" and m["epochs_run"] == 8
    h = pd.read_csv(tmp_path / "m" / "history.csv")
    assert np.isfinite(h[["train_loss_dose", "train_loss_contour", "val_loss"]].to_numpy()).all()
    assert h["train_loss_dose"].iloc[-1] < 0.5 * h["train_loss_dose"].iloc[0]
    assert h["train_loss_contour"].iloc[-1] < h["train_loss_contour"].iloc[0]
    with pytest.raises(ValueError, match="amp must be"):
        train(syn_cache, tmp_path / "bad", _cfg(amp="fp8"), split=SPLIT4)


def test_seq_automated_uses_a_contour_model_and_is_self_contained(syn_cache, tmp_path):
    from ml.contour_dose.predict import load_model, predict_entry

    train(syn_cache, tmp_path / "contour", _cfg(variant="contour-only", epochs=1), split=SPLIT4, log=lambda *_: None)
    with pytest.raises(ValueError, match="contour_model"):
        train(syn_cache, tmp_path / "seq", _cfg(variant="seq-automated", epochs=1), split=SPLIT4, log=lambda *_: None)
    train(
        syn_cache,
        tmp_path / "seq",
        _cfg(variant="seq-automated", epochs=1, contour_model=str(tmp_path / "contour")),
        split=SPLIT4,
        log=lambda *_: None,
    )
    shutil.rmtree(tmp_path / "contour")  # the seq model carries its contour model
    lm = load_model(tmp_path / "seq")
    e = Cache.open(syn_cache).load("pt_4")
    res = predict_entry(lm, e)
    assert res["dose"].shape == e.full_shape and "labels" not in res
    assert (res["dose"][~e.full(e.pdm)] == 0).all()


def test_unknown_variant_and_missing_val_are_clear_errors(syn_cache, tmp_path):
    with pytest.raises(ValueError, match="unknown variant"):
        train(syn_cache, tmp_path / "x", _cfg(variant="nope"), split=SPLIT4)
    only_train = SPLIT4.assign(split="train")
    with pytest.raises(ValueError, match="train and val"):
        train(syn_cache, tmp_path / "x", _cfg(), split=only_train)


# ---------------------------------------------------------------------------------------
# CLI on real OpenKBP patients: pack -> train -> predict (submission CSVs)
# ---------------------------------------------------------------------------------------
def _three_patients(tmp_path: Path) -> Path:
    """A DIR of OpenKBP ``pt_N/`` folders (links to pt_1..pt_3 of the real data)."""
    data = tmp_path / "pats"
    data.mkdir()
    for name in ("pt_1", "pt_2", "pt_3"):
        (data / name).symlink_to(OPENKBP_DIR / name)
    return data


@needs_openkbp
def test_cli_train_predict_writes_submission_csvs(tmp_path):
    from ml.cli import main
    from ml.data.openkbp import load_patient, read_sparse

    data = _three_patients(tmp_path)
    model = tmp_path / "model"
    assert (
        main(
            [
                "contour-dose",
                "train",
                "--data",
                str(data),
                "--out",
                str(model),
                "--model",
                "product",
                "--epochs",
                "1",
                "--steps-per-epoch",
                "2",
                "--batch-size",
                "4",
                "--widths",
                "4,8,16,32,64",
                "--soft-window",
                "off",
                "--class-weights",
                "none",
            ]
        )
        == 0
    )
    assert (model / "cache" / "meta.json").exists() and (model / "model_best.pt").exists()
    trained = json.loads((model / "config.json").read_text())
    trained = trained.get("train", trained)
    assert trained["soft_window"] is False and trained["class_weights"] == "none"  # the CLI options arrive
    pred = tmp_path / "pred"
    assert (
        main(["contour-dose", "predict", "--data", str(data), "--model", str(model), "--out", str(pred), "--tta"]) == 0
    )
    from ml.contour_dose.cache import entry_from_openkbp
    from ml.contour_dose.predict import load_model, predict_entry
    from ml.data.openkbp import dense, from_canonical_array

    lm = load_model(model)
    for name in ("pt_1", "pt_2", "pt_3"):
        idx, values = read_sparse(pred / f"{name}.csv")
        patient = load_patient(OPENKBP_DIR / name)
        pdm = patient.possible_dose_mask.reshape(-1)
        assert pdm[idx].all()  # zero outside the possible-dose mask
        assert values is not None and (values > 0).all()
        # the file holds exactly the in-memory prediction (TTA on), in OpenKBP axes
        expected = from_canonical_array(predict_entry(lm, entry_from_openkbp(name, patient), tta_flip=True)["dose"])
        np.testing.assert_allclose(
            dense(idx, values).reshape(expected.shape), expected * patient.possible_dose_mask, atol=1e-5
        )
        with np.load(pred / "contours" / f"{name}.npz") as z:
            assert set(z["roi_names"]) == set(VARIANTS["product"]["rois"])
    summary = pd.read_csv(pred / "predictions.csv")
    assert (summary["status"] == "ok").all()
    # evaluate: the official scores of the same model on the cache's test patient(s)
    report = tmp_path / "eval.json"
    assert (
        main(
            [
                "contour-dose",
                "evaluate",
                "--data",
                str(model / "cache"),
                "--model",
                str(model),
                "--split",
                "test",
                "--out",
                str(report),
                "--tables",
                str(tmp_path / "tables"),
            ]
        )
        == 0
    )
    ev = json.loads(report.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the JSON report"))
    assert ev["tables"] == ["scores.md"]  # the seed's tables need the paper's models
    assert "| Product |" in (tmp_path / "tables" / "scores.md").read_text()
    pp = pd.read_csv(tmp_path / "tables" / "per_patient.csv")
    assert len(pp) == 1 and pp["dose_score"].iloc[0] == pytest.approx(ev["scores"][0]["dose_score"])
    assert set(pd.read_csv(tmp_path / "tables" / "dvh_product.csv")["patient_id"]) == set(pp["patient_id"])
    assert ev["patients"] == 1 and ev["scores"][0]["variant"] == "product"
    assert 0 < ev["scores"][0]["dose_score"] < 80 and ev["scores"][0]["dvh_score"] > 0
    assert set(ev["dice_per_roi"]["product"]) <= set(VARIANTS["product"]["rois"])


_GPU_NODE_ONLY = """
import importlib.abc, importlib.util, sys
BLOCK = {"scipy", "SimpleITK", "pydicom", "nibabel", "sklearn", "matplotlib", "contourpy", "dagster", "mlflow"}
class Block(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    # found (torch probes find_spec for optional packages), but importing it fails, as if absent
    def find_spec(self, name, path, target=None):
        return importlib.util.spec_from_loader(name, self) if name.split(".")[0] in BLOCK else None
    def create_module(self, spec):
        return None
    def exec_module(self, module):
        raise ModuleNotFoundError(f"No module named {module.__name__!r} (not on the GPU node)")
sys.meta_path.insert(0, Block())
from ml.cli import main
sys.exit(main(sys.argv[1:]))
"""


@needs_openkbp
def test_cli_pack_train_predict_need_only_torch_numpy_pandas_pyarrow(tmp_path):
    """The GPU node has torch, numpy, pandas and pyarrow only: pack -> train -> predict must not
    import anything else (scipy, SimpleITK, pydicom, ... are blocked in the subprocess)."""
    import subprocess
    import sys

    data = _three_patients(tmp_path)
    root = Path(__file__).resolve().parents[2]

    def run(*args: str) -> None:
        out = subprocess.run(
            [sys.executable, "-c", _GPU_NODE_ONLY, "contour-dose", *args],
            cwd=root,
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        assert out.returncode == 0, out.stderr[-2000:]

    run("pack", "--data", str(data), "--out", str(tmp_path / "cache"))
    run(
        "train",
        "--data",
        str(tmp_path / "cache"),
        "--out",
        str(tmp_path / "model"),
        "--model",
        "multi-automated",
        "--epochs",
        "1",
        "--steps-per-epoch",
        "2",
        "--batch-size",
        "4",
        "--widths",
        "4,8,16,32,64",
        "--amp",
        "bf16",
    )
    run("predict", "--data", str(data), "--model", str(tmp_path / "model"), "--out", str(tmp_path / "pred"))
    assert sorted(p.name for p in (tmp_path / "pred").glob("pt_*.csv")) == ["pt_1.csv", "pt_2.csv", "pt_3.csv"]


def test_champion_rule_needs_the_same_split_and_no_worse_task():
    from ml.contour_dose.selection import champion_decision

    champ = {"cache_digest": "d1", "test_dose_score": "3.0", "test_mean_dice": "0.70"}
    assert champion_decision({"cache_digest": "d1", "test_dose_score": "2.5"}, None)["promote"]
    # better dose, same contours -> promote; better dose bought with worse contours -> no
    assert champion_decision({**champ, "test_dose_score": "2.8"}, champ)["promote"]
    d = champion_decision({**champ, "test_dose_score": "2.5", "test_mean_dice": "0.60"}, champ)
    assert not d["promote"] and "worse on test_mean_dice" in d["reason"]
    assert not champion_decision(dict(champ), champ)["promote"]  # a tie keeps the champion
    # a dose-only model compares on the dose score alone
    dose_champ = {"cache_digest": "d1", "test_dose_score": "3.0"}
    assert champion_decision({"cache_digest": "d1", "test_dose_score": "2.9"}, dose_champ)["promote"]
    # another split: no comparison
    d = champion_decision({**champ, "cache_digest": "d2", "test_dose_score": "1.0"}, champ)
    assert not d["promote"] and "different data" in d["reason"]
