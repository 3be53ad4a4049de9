"""Scientific fidelity of BMMQA (issue 13, items 1-5): optimiser and schedule, model selection
after the balancing starts, seeds with t-intervals; Shapley on a held-out batch in eval mode,
modality dropout, the contribution -> loss-factor rule for negative contributions; L1 GPR loss
and per-task loss normalisation; the fp32 GPR head under bf16 autocast; the median predictor."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from ml.psqa.bmmqa import BMMQA, BMMQAConfig, Encoded
from ml.psqa.dataset import Tensors
from ml.psqa.shapley import coalition_shapley, naive_bmmqa_coalitions, task_errors
from ml.psqa.train import BMMQATask, TrainConfig, task_losses, train
from psqa_pipelines_tests.ml_tests.synthetic_packs import SMALL, synthetic_pack


def _model(**kw) -> BMMQA:
    torch.manual_seed(0)
    return BMMQA(BMMQAConfig(n_tab=7, enc_widths=(8, 16, 32, 64), dec_widths=(16, 8, 8, 8), **kw))


def _tensors(n: int, seed: int = 0, size: int = 32) -> Tensors:
    g = torch.Generator().manual_seed(seed)
    return Tensors(
        image=torch.randn(n, 2, size, size, generator=g),
        table=torch.randn(n, 7, generator=g),
        gpr=90 + 10 * torch.rand(n, 4, generator=g),
        dd=torch.randn(n, 1, size, size, generator=g),
        keys=[f"s{seed}_{i}" for i in range(n)],
    )


def _task(cfg: TrainConfig, n_train: int = 16, n_held: int = 8, model: BMMQA | None = None) -> BMMQATask:
    model = model or _model()
    return BMMQATask(cfg, model, _tensors(n_train, 0), _tensors(8, 1), torch.device("cpu"), _tensors(n_held, 2))


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    return synthetic_pack(tmp_path_factory.mktemp("pack"))


# -- 1. optimiser, schedule, selection, seeds ---------------------------------------------------
def test_default_lr_is_1e4_with_linear_warmup_then_cosine():
    assert TrainConfig().lr == pytest.approx(1e-4)
    cfg = TrainConfig(epochs=4, batch_size=4, lr=1e-4, lr_warmup=0.25, modality_dropout=0.0)
    task = _task(cfg)
    steps = task.steps_per_epoch()
    assert steps == 4
    lrs = []
    for epoch in range(cfg.epochs):
        task.begin_epoch(epoch)
        for step in range(steps):
            task.batch(step)
            lrs.append(task.optimizer.param_groups[0]["lr"])
    # 16 steps, warm-up over the first 25 % (4 steps): 1/4, 2/4, 3/4, 4/4 of the base lr
    assert lrs[:4] == pytest.approx([0.25e-4, 0.5e-4, 0.75e-4, 1e-4])
    assert all(a > b for a, b in zip(lrs[3:], lrs[4:], strict=False))  # cosine decay afterwards
    assert lrs[-1] >= cfg.lr * cfg.lr_min_factor and lrs[-1] < 0.1 * cfg.lr
    # warm-up given in epochs instead of a fraction of the steps
    task = _task(TrainConfig(epochs=4, batch_size=4, lr_warmup_epochs=2, modality_dropout=0.0))
    task.begin_epoch(1)
    task.batch(3)
    assert task.optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)
    task.begin_epoch(0)
    task.batch(0)
    assert task.optimizer.param_groups[0]["lr"] == pytest.approx(1e-4 / 8)


def test_model_is_selected_only_after_the_balancing_has_started(pack, tmp_path, monkeypatch):
    """Validation MAE that only gets worse: the old trainer kept epoch 0, before any balancing."""
    import ml.psqa.train as T

    calls = []

    def worsening(pred, data):
        calls.append(1)
        return {"val_mae_gpr_2_2": float(len(calls)), "val_dd_mae": 1.0}

    monkeypatch.setattr(T, "_val_metrics", worsening)
    cfg = TrainConfig(epochs=4, warmup_epochs=2, model=SMALL, patience=1, batch_size=16)
    m = train(pack, tmp_path / "m", cfg, log=lambda *_: None)
    assert m["best_epoch"] == 2 and m["selection_start_epoch"] == 2
    assert m["best_val_mae_gpr_2_2"] == pytest.approx(3.0)
    hist = pd.read_csv(tmp_path / "m" / "history.csv")
    # patience counts from the first selectable epoch: epoch 3 (worse) does not stop before it ran
    assert list(hist["epoch"]) == [0, 1, 2, 3]
    assert hist["val_mae_gpr_2_2"].notna().all()


def test_mean_and_95_ci_over_seeds():
    from ml.psqa.evaluate import mean_ci, seed_summary

    mean, half = mean_ci([1.0, 2.0, 3.0])
    assert mean == pytest.approx(2.0) and half == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)
    assert math.isnan(mean_ci([2.5])[1])  # one seed: no interval
    tables = pd.DataFrame(
        {
            "seed": [0, 1, 2, 0, 1, 2],
            "model": ["bmmqa"] * 3 + ["mean predictor"] * 3,
            "MAE 2%/2mm": [3.0, 3.2, 3.4, 3.9, 3.9, 3.9],
        }
    )
    s = seed_summary(tables, ["MAE 2%/2mm"]).set_index("model")
    assert s.loc["bmmqa", "n_seeds"] == 3
    assert s.loc["bmmqa", "MAE 2%/2mm"] == pytest.approx(3.2)
    assert s.loc["bmmqa", "MAE 2%/2mm CI95"] == pytest.approx(4.302653 * 0.2 / math.sqrt(3), rel=1e-5)
    assert s.loc["mean predictor", "MAE 2%/2mm CI95"] == pytest.approx(0.0)
    assert list(s.index) == ["bmmqa", "mean predictor"]  # first-seen order kept


# -- 2. Shapley on a held-out batch in eval mode, modality dropout, psi ---------------------------
def test_held_out_shapley_equals_the_naive_2m_evaluation_in_eval_mode():
    model = _model(dropout=0.5)
    task = _task(TrainConfig(batch_size=8, modality_dropout=0.0), model=model)
    model.train()
    # make the BatchNorm running statistics differ from any one batch's statistics
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 2, 32, 32) * 3 + 1, torch.randn(8, 7))
    bn = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    phi = task.contributions(0)
    assert model.training  # mode restored
    assert all(torch.equal(bn[k], model.state_dict()[k]) for k in bn)  # eval: running stats untouched
    held = task.shapley_t
    model.eval()
    with torch.no_grad():
        naive = naive_bmmqa_coalitions(model, held.image, held.table)
    ref = coalition_shapley(naive, lambda o: task_errors(o, held.gpr, held.dd))
    for t in ("gpr", "dd"):
        assert phi[t].shape == (2, 8)
        assert torch.allclose(phi[t], ref[t], atol=1e-5), t
    # the train-mode answer (batch statistics, dropout) is a different one
    model.train()
    torch.manual_seed(3)
    with torch.no_grad():
        co = model.coalitions(held.image, held.table)
    train_mode = coalition_shapley(co, lambda o: task_errors(o, held.gpr, held.dd))
    assert not torch.allclose(train_mode["gpr"], ref["gpr"], atol=1e-3)


def test_balancer_update_ignores_the_training_batch():
    """The contributions come from the held-out plans: what the step trained on does not matter."""
    cfg = TrainConfig(batch_size=8, shapley_every=1, modality_dropout=0.0)
    psis = []
    for seed in (5, 6):
        task = _task(cfg)
        task.begin_epoch(0)
        junk = _tensors(8, seed)
        batch = {"image": junk.image, "table": junk.table, "gpr": junk.gpr, "dd": junk.dd}
        task.model.eval()  # (a train-mode forward would move the BatchNorm statistics differently)
        with torch.no_grad():
            out = task.forward(batch)
        task.model.train()
        task.after_step(0, batch, out)
        psis.append({t: np.array(v) for t, v in task.balancer.psi.items()})
    for t in psis[0]:
        assert np.allclose(psis[0][t], psis[1][t]), t


def test_held_out_plans_are_never_trained_on(pack, tmp_path):
    from ml.psqa.dataset import load_pack
    from ml.psqa.train import holdout_split

    rows = load_pack(pack).split("train")
    fit, held = holdout_split(rows, 0.1, seed=0)
    assert len(held) == round(0.1 * len(rows)) and len(fit) + len(held) == len(rows)
    assert not set(fit["plan_key"]) & set(held["plan_key"])
    _, held2 = holdout_split(rows, 0.1, seed=0)
    assert list(held2["plan_key"]) == list(held["plan_key"])  # the same plans for every variant
    m = train(pack, tmp_path / "m", TrainConfig(epochs=1, model=SMALL), log=lambda *_: None)
    assert m["n_train"] == len(fit) and m["n_shapley_holdout"] == len(held)


def test_modality_dropout_masks_modalities_during_training():
    model = _model(dropout=0.0)
    cfg = TrainConfig(batch_size=64, modality_dropout=0.3)
    task = BMMQATask(cfg, model, _tensors(64, 0), _tensors(8, 1), torch.device("cpu"), _tensors(8, 2))
    task.begin_epoch(0)
    batch = task.batch(0)
    present = batch["present"]
    assert present.shape == (64, 2) and present.dtype == torch.bool
    dropped = (~present).float().mean(0)
    assert bool(((dropped > 0.1) & (dropped < 0.5)).all())
    # reproducible per (seed, epoch, step): a resumed run draws the same masks
    task.begin_epoch(0)
    assert torch.equal(task.batch(0)["present"], present)
    # an absent modality does not reach the outputs
    model.train()
    out = task.forward(batch)
    other = dict(batch, image=torch.randn_like(batch["image"]))
    out2 = task.forward(other)
    no_img = ~present[:, 0]
    assert no_img.any()
    assert torch.allclose(out["outs"]["gpr"][no_img], out2["outs"]["gpr"][no_img], atol=1e-5)
    assert not torch.allclose(out["outs"]["gpr"][~no_img], out2["outs"]["gpr"][~no_img], atol=1e-5)
    # no dropout when switched off
    off = BMMQATask(TrainConfig(modality_dropout=0.0), _model(), _tensors(8, 0), _tensors(8, 1), torch.device("cpu"))
    off.begin_epoch(0)
    assert "present" not in off.batch(0) or bool(off.batch(0)["present"].all())


def test_psi_keeps_negative_contributions_and_orders_modalities():
    from ml.psqa.shapley import contribution_shares

    # (image, table): the image hurts, the table helps
    psi = contribution_shares(np.array([-0.2, 1.0]))
    assert psi[0] < 0 < psi[1] and psi.sum() == pytest.approx(1.0)  # shares of the joint gain
    # both hurt: the less harmful modality still ranks first (clipping made them equal)
    psi = contribution_shares(np.array([-0.3, -0.1]))
    assert psi[1] > psi[0]
    # monotone in each contribution, through zero
    grid = [contribution_shares(np.array([x, 1.0]))[0] for x in (-0.5, -0.2, -0.01, 0.0, 0.2, 0.6)]
    assert all(a < b for a, b in zip(grid, grid[1:], strict=False))
    assert contribution_shares(np.zeros(2)) == pytest.approx([0.5, 0.5])


def test_loss_factors_are_graded_when_a_contribution_is_negative():
    """Clipped contributions made psi_table = 1 for any phi_image <= 0: rho = inf, k_table = floor."""
    from ml.psqa.train import Balancer

    cfg = TrainConfig()

    def k_table(phi_image: float) -> float:
        b = Balancer(cfg, ("gpr",))
        b.update({"gpr": torch.tensor([[phi_image], [1.0]])})
        k = b.loss_factors()["gpr"]
        assert k["image"] == 1.0  # the weaker modality is never suppressed
        return k["table"]

    ks = [k_table(x) for x in (0.6, 0.2, 0.0, -0.01, -0.2)]
    # graded: the more the image lags (or hurts), the more the table is held back ...
    assert all(a > b for a, b in zip(ks, ks[1:], strict=False))
    # ... but a helpful table is not pushed to the floor because the image is slightly negative
    assert ks[3] > cfg.k_min + 0.2 and ks[3] == pytest.approx(ks[2], abs=0.02)
    b = Balancer(cfg, ("gpr",))
    b.update({"gpr": torch.tensor([[0.5], [0.5]])})
    assert b.loss_factors()["gpr"] == {"image": 1.0, "table": 1.0}


# -- 3. losses -----------------------------------------------------------------------------------
def test_gpr_loss_is_l1_in_percentage_points_or_small_delta_huber():
    out = {"gpr": torch.tensor([[95.0, 90.2]])}
    gpr = torch.tensor([[90.0, 90.0]])
    dd = torch.zeros(1, 1, 8, 8)
    assert task_losses(out, gpr, dd, 0.1)["gpr"].item() == pytest.approx((5.0 + 0.2) / 2)
    huber = task_losses(out, gpr, dd, 0.1, gpr_loss="huber", huber_delta=0.5)["gpr"].item()
    assert huber == pytest.approx(((5.0 - 0.25) + 0.5 * 0.2**2 / 0.5) / 2)
    with pytest.raises(ValueError):
        task_losses(out, gpr, dd, 0.1, gpr_loss="smooth_l1_over_10")


def test_task_losses_are_normalised_by_their_running_mean():
    from ml.psqa.train import LossNormaliser

    norm = LossNormaliser(("gpr", "dd"), ema=0.5)
    x = torch.tensor(2.0, requires_grad=True)
    y = torch.tensor(0.5, requires_grad=True)
    out = norm({"gpr": 10 * x, "dd": 0.02 * y})  # raw values 20 and 0.01
    # values stay the raw losses (the history shows them) ...
    assert out["gpr"].item() == pytest.approx(20.0) and out["dd"].item() == pytest.approx(0.01)
    # ... the gradients are those of loss / running mean (the first step: its own value)
    (out["gpr"] + out["dd"]).backward()
    assert x.grad.item() == pytest.approx(10 / 20.0) and y.grad.item() == pytest.approx(0.02 / 0.01)
    out = norm({"gpr": torch.tensor(10.0), "dd": torch.tensor(0.03)})
    assert norm.scale == pytest.approx({"gpr": 0.5 * 20 + 0.5 * 10, "dd": 0.5 * 0.01 + 0.5 * 0.03})
    state = norm.state()
    other = LossNormaliser(("gpr", "dd"), ema=0.5)
    other.load(state)
    assert other.scale == norm.scale

    # in the task: two tasks on scales 1000x apart contribute gradients of the same size
    task = _task(TrainConfig(batch_size=8, modality_dropout=0.0, dd_ssim_weight=0.0))
    task.begin_epoch(0)
    a = torch.tensor(1.0, requires_grad=True)
    outs = {"gpr": (90.0 + 5 * a).expand(8, 4), "dd": (0.005 * a).expand(8, 1, 32, 32)}
    batch = {"gpr": torch.full((8, 4), 90.0), "dd": torch.zeros(8, 1, 32, 32)}
    losses = task.losses({"outs": outs}, batch)
    g_gpr = torch.autograd.grad(losses["gpr"], a, retain_graph=True)[0]
    g_dd = torch.autograd.grad(losses["dd"], a)[0]
    assert losses["gpr"].item() == pytest.approx(5.0, rel=1e-4)
    assert g_gpr.item() == pytest.approx(1.0, rel=1e-3)
    assert g_dd.item() == pytest.approx(g_gpr.item(), rel=0.2)


# -- 4. precision ---------------------------------------------------------------------------------
def test_gpr_head_runs_in_fp32_under_bf16_autocast():
    """bf16 has 8 significant bits: 100 * sigmoid in bf16 lands on a 0.5-point grid near 95 %."""
    model = _model(dropout=0.0, tasks=("gpr",)).eval()
    model.init_gpr_bias(torch.full((4,), 95.0))
    torch.manual_seed(1)
    z_img, z_tab, d = torch.randn(1, 128), torch.randn(1, 128), torch.randn(1, 128)

    def gpr_at(eps: float, amp: bool) -> torch.Tensor:
        enc = Encoded(z={"image": z_img, "table": z_tab + eps * d}, feats=[])
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            return model.heads(enc)["gpr"]

    base = gpr_at(0.0, False)
    assert 90 < base[0, 0].item() < 99
    # a step along the table embedding that moves the fp32 GPR by 0.02 percentage points
    eps = 0.02 / ((gpr_at(1e-3, False) - base)[0, 0].item() / 1e-3)
    lo, hi = gpr_at(0.0, True), gpr_at(eps, True)
    assert lo.dtype == torch.float32 and hi.dtype == torch.float32
    assert (hi - lo)[0, 0].item() == pytest.approx(0.02, abs=0.002)
    assert torch.allclose(lo, base, atol=1e-4)
    # the whole model under autocast: encoders in bf16, the GPR in fp32 and not on a 0.5-point grid
    full = _model(dropout=0.0).eval()
    full.init_gpr_bias(torch.full((4,), 95.0))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = full(torch.randn(64, 2, 32, 32), torch.randn(64, 7))
    assert out["gpr"].dtype == torch.float32
    frac = (out["gpr"] * 2).frac().abs()
    assert float((frac > 1e-3).float().mean()) > 0.9


# -- 5. median predictor --------------------------------------------------------------------------
def test_ablation_table_has_the_median_predictor_beside_the_mean():
    from ml.psqa.dataset import LABEL_COLUMNS
    from ml.psqa.evaluate import ablation_table, median_predictor_metrics

    rng = np.random.default_rng(0)

    def gpr(n):  # most plans pass near 98 %, one in ten fails near 80 %: a skewed distribution
        fail = rng.random(n) < 0.1
        return np.where(fail, rng.normal(80, 3, n), rng.normal(98, 0.5, n)).clip(0, 100)

    train_rows = pd.DataFrame({c: gpr(200) for c in LABEL_COLUMNS})
    test_rows = pd.DataFrame({c: gpr(100) for c in LABEL_COLUMNS})
    preds = {"m": (pd.DataFrame({f"pred_{c}": test_rows[c] + 1.0 for c in LABEL_COLUMNS}), None)}
    table = ablation_table(preds, test_rows, np.zeros((100, 1, 4, 4)), train_rows).set_index("model")
    assert {"m", "mean predictor", "median predictor"} <= set(table.index)
    med = float(train_rows["gpr_2_2"].median())
    assert table.loc["median predictor", "MAE 2%/2mm"] == pytest.approx(np.abs(test_rows["gpr_2_2"] - med).mean())
    assert median_predictor_metrics(train_rows, test_rows, "gpr_2_2")["mae"] == pytest.approx(
        table.loc["median predictor", "MAE 2%/2mm"]
    )
    # skewed GPR: the median predictor beats the mean predictor in MAE
    assert table.loc["median predictor", "MAE 2%/2mm"] < table.loc["mean predictor", "MAE 2%/2mm"]


# -- 5. machine identity as a plan-level feature --------------------------------------------------
def test_machine_identity_is_one_hot_in_the_pack_and_the_scaler(tmp_path):
    from ml.psqa.dataset import LABEL_COLUMNS, TabularScaler, load_pack
    from ml.psqa.pack import MACHINE_COLUMNS, build_pack, one_hot_columns

    n = 6
    machines = ["LINAC_A", "LINAC_B", "LINAC_A", "LINAC_C", "", "LINAC_B"]
    features = pd.DataFrame(
        {
            "plan_key": [f"p{i}" for i in range(n)],
            "mcs": np.linspace(0.2, 0.5, n),
            "treatment_machine": machines,
            "qa_device": ["ArrayQA SN1" if m in ("LINAC_A", "LINAC_B") else "Diode SN2" for m in machines],
        }
    )
    coded, names = one_hot_columns(features, MACHINE_COLUMNS)
    assert names == [
        "treatment_machine=LINAC_A",
        "treatment_machine=LINAC_B",
        "treatment_machine=LINAC_C",
        "qa_device=ArrayQA SN1",
        "qa_device=Diode SN2",
    ]
    assert coded["treatment_machine=LINAC_A"].tolist() == [1, 0, 1, 0, 0, 0]
    assert coded.loc[4, names[:3]].sum() == 0  # unknown machine: all zeros

    # the pack carries the one-hot columns as features of the tabular modality
    planes, labels = [], []
    for i in range(n):
        rel = f"planes/{i}.npz"
        (tmp_path / "planes").mkdir(exist_ok=True)
        np.savez(
            tmp_path / rel,
            planned=np.ones((8, 8)),
            fluence=np.ones((8, 8)),
            dd=np.zeros((8, 8)),
            spacing_mm=np.array([2.0]),
        )
        planes.append({"plan_key": f"p{i}", "path": rel})
        labels.append({"plan_key": f"p{i}", **dict.fromkeys(LABEL_COLUMNS, 95.0)})
    split = pd.DataFrame({"plan_key": [f"p{i}" for i in range(n)], "patient_id": "x", "split": "train"})
    build_pack(tmp_path / "pack", pd.DataFrame(planes), features, pd.DataFrame(labels), split, tmp_path, ["mcs"])
    pack = load_pack(tmp_path / "pack")
    assert pack.feature_columns == ["mcs", *names] and pack.meta["one_hot_columns"] == names
    assert pack.table.set_index("plan_key").loc["p3", "treatment_machine=LINAC_C"] == 1.0
    # a model's scaler reads rows that lack one of its one-hot columns as 0 for that column
    scaler = TabularScaler.fit(pack.table, pack.feature_columns)
    x = scaler.transform(pack.table.drop(columns=["treatment_machine=LINAC_C"]))
    ref = scaler.transform(pack.table.assign(**{"treatment_machine=LINAC_C": 0.0}))
    assert np.allclose(x, ref)
    with pytest.raises(KeyError):
        scaler.transform(pack.table.drop(columns=["mcs"]))
