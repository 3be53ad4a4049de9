"""BMMQA network, Shapley fast forward, loss factors, trainer (resume, determinism), CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from ml.psqa.bmmqa import BMMQA, BMMQAConfig, coalition_masks
from ml.psqa.dataset import TabularScaler, load_pack
from ml.psqa.evaluate import split_metrics
from ml.psqa.predict import predict
from ml.psqa.shapley import (
    MultiModalNet,
    coalition_shapley,
    naive_bmmqa_coalitions,
    shapley_values,
    shapley_weights,
    task_errors,
)
from ml.psqa.train import VARIANTS, TrainConfig, train
from psqa_pipelines_tests.ml_tests.synthetic_packs import SMALL, synthetic_pack


def _model(**kw) -> BMMQA:
    torch.manual_seed(0)
    return BMMQA(BMMQAConfig(n_tab=7, enc_widths=(8, 16, 32, 64), dec_widths=(16, 8, 8, 8), **kw)).eval()


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    """Synthetic pack: GPR depends on table features AND image texture, DD on the image."""
    return synthetic_pack(tmp_path_factory.mktemp("pack"))


def test_coalition_masks_and_shapley_weights():
    assert coalition_masks(2).int().tolist() == [[0, 0], [1, 0], [0, 1], [1, 1]]
    assert coalition_masks(4).shape == (16, 4)
    w = shapley_weights(2).numpy()
    assert np.allclose(w, [[-0.5, 0.5, -0.5, 0.5], [-0.5, -0.5, 0.5, 0.5]])
    # glove game with 3 players: v = 1 iff {0, 1} or {0, 2} present -> phi = (2/3, 1/6, 1/6)
    masks = coalition_masks(3)
    v = torch.tensor([float(bool(m[0] and (m[1] or m[2]))) for m in masks.tolist()], dtype=torch.float64)
    assert np.allclose(shapley_values(v).numpy(), [2 / 3, 1 / 6, 1 / 6])


def test_fast_forward_equals_2m_full_passes_bmmqa():
    model = _model()
    img, tab = torch.randn(6, 2, 32, 32), torch.randn(6, 7)
    with torch.no_grad():
        fast, naive = model.coalitions(img, tab), naive_bmmqa_coalitions(model, img, tab)
    assert set(fast) == {(), ("image",), ("table",), ("image", "table")}
    for key in fast:
        for t in fast[key]:
            assert torch.allclose(fast[key][t], naive[key][t], atol=1e-6), (key, t)
    gpr, dd = torch.rand(6, 4) * 10 + 90, torch.randn(6, 1, 32, 32)
    phi_fast = coalition_shapley(fast, lambda o: task_errors(o, gpr, dd))
    phi_naive = coalition_shapley(naive, lambda o: task_errors(o, gpr, dd))
    for t in ("gpr", "dd"):
        assert torch.allclose(phi_fast[t], phi_naive[t], atol=1e-6)
        # efficiency: contributions add up to v(full) - v(empty)
        err_full = task_errors(fast[("image", "table")], gpr, dd)[t]
        err_empty = task_errors(fast[()], gpr, dd)[t]
        assert torch.allclose(phi_fast[t].sum(0), err_empty - err_full, atol=1e-5)


def test_fast_forward_equals_naive_for_four_modalities():
    torch.manual_seed(0)
    net = MultiModalNet(4, width=8, embed=16).eval()
    xs = [torch.randn(3, 1, 16, 16) for _ in range(4)]
    with torch.no_grad():
        fast, naive = net.coalitions(xs), net.naive_coalitions(xs)
    assert len(fast) == 16
    for a, b in zip(fast, naive, strict=True):
        assert torch.allclose(a["y"], b["y"], atol=1e-6) and torch.allclose(a["map"], b["map"], atol=1e-6)
    # the Shapley values from the fast pass equal those of the 2^4 separate full forward passes
    names = ("m0", "m1", "m2", "m3")
    keys = [tuple(n for n, on in zip(names, m, strict=True) if on) for m in coalition_masks(4).tolist()]
    y, ymap = torch.randn(3, 4), torch.randn(3, 1, 4, 4)

    def errs(o):
        return {"y": (o["y"] - y).abs().mean(1), "map": (o["map"] - ymap).abs().flatten(1).mean(1)}

    phi_fast = coalition_shapley(dict(zip(keys, fast, strict=True)), errs, modalities=names)
    phi_naive = coalition_shapley(dict(zip(keys, naive, strict=True)), errs, modalities=names)
    for t in ("y", "map"):
        assert phi_fast[t].shape == (4, 3)
        assert torch.allclose(phi_fast[t], phi_naive[t], atol=1e-6)
        assert torch.allclose(phi_fast[t].sum(0), errs(naive[0])[t] - errs(naive[-1])[t], atol=1e-5)


@pytest.mark.parametrize(
    "kw",
    [
        {"dd_fusion": "bottleneck"},
        {"gpr_fusion": "concat"},
        {"modalities": ("image",)},
        {"modalities": ("table",)},
        {"tasks": ("dd",)},
        {"tasks": ("gpr",)},
    ],
)
def test_fast_forward_equals_2m_full_passes_variants(kw):
    """The decoder's per-coalition shortcuts (parts added only when present, one sample for the
    empty coalition, one run per distinct coalition of a one-modality model) change nothing."""
    model = _model(**kw)
    img, tab = torch.randn(5, 2, 32, 32), torch.randn(5, 7)
    with torch.no_grad():
        fast, naive, full = model.coalitions(img, tab), naive_bmmqa_coalitions(model, img, tab), model(img, tab)
    for key in naive:
        assert set(fast[key]) == set(naive[key])
        for t in fast[key]:
            assert fast[key][t].shape == naive[key][t].shape
            assert torch.allclose(fast[key][t], naive[key][t], atol=1e-6), (key, t)
    for t in full:
        assert torch.allclose(fast[("image", "table")][t], full[t], atol=1e-6)


def test_attention_ignores_absent_modalities():
    model = _model()
    img, tab = torch.randn(4, 2, 32, 32), torch.randn(4, 7)
    with torch.no_grad():
        co = model.coalitions(img, tab)
    assert torch.all(co[("image",)]["alpha"][:, 1] == 0) and torch.allclose(
        co[("image",)]["alpha"][:, 0], torch.ones(4)
    )
    assert torch.all(co[()]["alpha"] == 0)
    # the empty coalition does not depend on the inputs at all
    with torch.no_grad():
        co2 = model.coalitions(torch.randn(4, 2, 32, 32), torch.randn(4, 7))
    assert torch.allclose(co[()]["gpr"], co2[()]["gpr"]) and torch.allclose(co[()]["dd"], co2[()]["dd"])


def test_loss_factor_reaches_one_encoder_through_one_task_only():
    model = _model()
    model.train()
    img, tab = torch.randn(4, 2, 32, 32), torch.randn(4, 7)

    def grads(lf):
        torch.manual_seed(1)  # same dropout masks in every call
        model.zero_grad()
        out = model.heads(model.encode(img, tab), loss_factors=lf)
        out["gpr"].sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    g1 = grads(None)
    g0 = grads({"gpr": {"image": 0.0}})
    g_half = grads({"gpr": {"table": 0.5}})
    img_params = [n for n in g1 if n.startswith("image_encoder")]
    tab_params = [n for n in g1 if n.startswith("tab_encoder")]
    assert img_params and tab_params
    assert all(torch.count_nonzero(g0.get(n, torch.zeros(1))) == 0 for n in img_params)
    assert all(torch.allclose(g0[n], g1[n]) for n in tab_params)
    assert all(torch.allclose(g_half[n], 0.5 * g1[n], atol=1e-7) for n in tab_params)
    assert all(torch.allclose(g_half[n], g1[n]) for n in img_params)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_builds_and_runs(variant):
    from ml.psqa.train import build_model

    cfg = TrainConfig(variant=variant, model=SMALL)
    model = build_model(cfg, 7, 2, 4).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 2, 32, 32), torch.randn(2, 7))
    assert ("gpr" in out) == ("gpr" in model.cfg.tasks) and ("dd" in out) == ("dd" in model.cfg.tasks)
    if "gpr" in out:
        assert out["gpr"].shape == (2, 4) and bool(((out["gpr"] >= 0) & (out["gpr"] <= 100)).all())


def test_tabular_scaler_imputes_and_flags_missing():
    df = pd.DataFrame({"a": [1.0, 2.0, np.nan, 4.0], "b": [5.0, 5.0, 5.0, 5.0]})
    sc = TabularScaler.fit(df, ["a", "b"])
    x = sc.transform(df)
    assert x.shape == (4, 3) and sc.missing_indicators == ["a"]
    assert x[2, 2] == 1 and x[0, 2] == 0 and np.all(np.isfinite(x)) and np.allclose(x[:, 1], 0)


def test_training_learns_balances_and_resumes_exactly(pack, tmp_path):
    cfg = TrainConfig(epochs=6, warmup_epochs=1, model=SMALL, patience=50, lr=1e-3)
    full = train(pack, tmp_path / "full", cfg, log=lambda *_: None)
    hist = pd.read_csv(tmp_path / "full" / "history.csv")
    assert hist["train_loss_gpr"].iloc[-1] < hist["train_loss_gpr"].iloc[0]
    assert hist["train_loss_dd"].iloc[-1] < hist["train_loss_dd"].iloc[0]
    assert {"psi_gpr_image", "psi_dd_table", "lambda_gpr", "k_gpr_image", "alpha_image"} <= set(hist.columns)
    assert {"loss_scale_gpr", "loss_scale_dd", "val_select_mae_gpr_2_2"} <= set(hist.columns)
    psi = hist[["psi_gpr_image", "psi_gpr_table", "psi_dd_image", "psi_dd_table"]].to_numpy()
    assert np.isfinite(psi).all() and (np.abs(psi) <= 2).all()  # signed shares, bounded
    assert hist["val_select_mae_gpr_2_2"].iloc[0] != hist["val_select_mae_gpr_2_2"].iloc[0]  # NaN before balancing
    # stop by the time budget (checked after every step: here after the first step of epoch 0), then
    # resume mid-epoch from the checkpoint: same weights as the uninterrupted run
    part = TrainConfig(**{**cfg.to_dict(), "max_minutes": 0.0})
    m1 = train(pack, tmp_path / "resumed", part, log=lambda *_: None)
    assert m1["stopped_by"] == "max_minutes" and m1["epochs_run"] == 0
    train(pack, tmp_path / "resumed", cfg, log=lambda *_: None)
    a = torch.load(tmp_path / "full" / "model_best.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "model_best.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    df, dd = predict(tmp_path / "full", pack, "test")
    pk = load_pack(pack)
    res = split_metrics(df, dd, pk.split("test"), pk.dd_for(pk.split("test")))
    assert res["2%/2mm"]["mae"] < 3.0 and np.isfinite(res["dd"]["ssim_mean"])
    assert len(df) == 24 and dd.shape == (24, 1, 32, 32)
    assert full["best_epoch"] >= 0


def test_cli_train_and_evaluate(pack, tmp_path):
    out = tmp_path / "cli"
    cmd = [
        sys.executable,
        "-m",
        "ml",
        "bmmqa",
        "train",
        "--data",
        str(pack),
        "--out",
        str(out),
        "--variant",
        "tab_only",
        "--epochs",
        "2",
        "--model-json",
        json.dumps(SMALL),
        "--gpr-loss",
        "huber",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    # unset options keep the spec's defaults (lr 1e-4), given ones reach the config
    trained = json.loads((out / "config.json").read_text())
    trained = trained.get("train", trained)
    assert trained["lr"] == 1e-4 and trained["gpr_loss"] == "huber"
    r = subprocess.run(
        [sys.executable, "-m", "ml", "bmmqa", "evaluate", "--data", str(pack), "--model", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "2%/2mm" in json.loads(r.stdout)
