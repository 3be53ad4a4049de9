"""The shared training engine (ml.training): budget within a step, checkpoints by time with
mid-epoch resume, early stopping on a named metric (min and max), gradient clipping, callbacks,
configuration identity, and resume after a real ``kill -9`` of a training process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from ml.training import Callback, FitSettings, Trainer, TrainTask, load_checkpoint, optimizer_step
from psqa_pipelines_tests.ml_tests.synthetic_packs import SMALL, synthetic_pack


class Regression(TrainTask):
    """y = X w + noise, a linear model, shuffled mini-batches from the task's own generator."""

    samples_name = "rows"

    def __init__(
        self,
        seed: int = 0,
        n: int = 256,
        batch: int = 16,
        lr: float = 0.05,
        val_metric_sign: float = 1.0,
        slow: float = 0.0,
    ) -> None:
        g = torch.Generator().manual_seed(123)
        self.x = torch.randn(n, 8, generator=g)
        self.y = self.x @ torch.arange(1.0, 9.0) + 0.1 * torch.randn(n, generator=g)
        self.xv, self.yv = self.x[:64], self.y[:64]
        torch.manual_seed(seed)
        self.model = torch.nn.Linear(8, 1)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=lr)
        self.scheduler = None
        self.loss_names = ("mse",)
        self.gen = torch.Generator()
        self.bs, self.n, self.sign, self.slow = batch, n, val_metric_sign, slow
        self.seen_batches = 0

    def steps_per_epoch(self) -> int:
        return self.n // self.bs

    def begin_epoch(self, epoch: int) -> None:
        self.gen.manual_seed(1000 + epoch)
        self.perm = torch.randperm(self.n, generator=self.gen)

    def batch(self, step: int):
        if self.slow:
            time.sleep(self.slow)
        idx = self.perm[step * self.bs : (step + 1) * self.bs]
        return self.x[idx], self.y[idx]

    def batch_size(self, batch) -> int:
        return len(batch[0])

    def forward(self, batch):
        self.seen_batches += 1
        return self.model(batch[0])[:, 0]

    def losses(self, out, batch):
        return {"mse": torch.mean((out.float() - batch[1]) ** 2)}

    def validate(self, epoch: int) -> dict[str, float]:
        with torch.no_grad():
            mse = float(torch.mean((self.model(self.xv)[:, 0] - self.yv) ** 2))
        return {"val_mse": mse, "val_score": -mse * self.sign}

    def state_dict(self) -> dict:
        return {"generator": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["generator"])


def _fit(out: Path, task: Regression | None = None, **kw) -> tuple:
    settings = FitSettings(**{"epochs": 4, "patience": 50, "checkpoint_minutes": None, "progress_seconds": 1e9, **kw})
    task = task or Regression()
    trainer = Trainer(task, settings, out, monitor="val_mse", config={"lr": 0.05, **kw}, log=lambda *_: None)
    return trainer.fit(), task


def test_learns_and_writes_history_and_best_weights(tmp_path):
    res, _task = _fit(tmp_path / "a")
    h = pd.read_csv(tmp_path / "a" / "history.csv")
    assert list(h["epoch"]) == [0, 1, 2, 3] and res.stopped_by == "epochs"
    assert h["val_mse"].iloc[-1] < 0.1 * h["val_mse"].iloc[0]
    assert {"rows_per_s", "train_loss_mse", "lr", "epoch_seconds"} <= set(h.columns)
    best = torch.load(tmp_path / "a" / "model_best.pt", weights_only=True)
    assert res.best == pytest.approx(h["val_mse"].min()) and res.best_epoch == int(h["val_mse"].idxmin())
    assert best["weight"].shape == (1, 8)


def test_early_stopping_on_a_maximised_metric(tmp_path):
    # val_score = +mse grows as the model learns -> with mode="max" the best epoch is 0 and
    # patience 2 stops the run after epoch 2
    task = Regression(val_metric_sign=-1.0)
    settings = FitSettings(epochs=10, patience=2, checkpoint_minutes=None, progress_seconds=1e9)
    res = Trainer(task, settings, tmp_path, monitor="val_score", mode="max", log=lambda *_: None).fit()
    assert res.best_epoch == 0 and res.stopped_by == "early_stopping" and res.epochs_run == 3


def test_gradient_clipping_bounds_the_update(tmp_path):
    task = Regression(lr=1.0)
    w0 = task.model.weight.detach().clone()
    b0 = task.model.bias.detach().clone()
    task.begin_epoch(0)
    batch = task.batch(0)
    losses = task.losses(task.forward(batch), batch)
    optimizer_step(task.optimizer, losses, {"mse": 1.0}, grad_clip=0.5)
    step = torch.cat([(task.model.weight - w0).flatten(), task.model.bias - b0]).detach()
    assert float(step.norm()) == pytest.approx(0.5, rel=1e-4)  # lr 1 x clipped gradient norm 0.5


def test_budget_is_checked_every_step_and_leaves_a_mid_epoch_checkpoint(tmp_path):
    # 16 steps of >= 50 ms per epoch; a 0.005-minute (0.3 s) budget stops inside epoch 0
    res, task = _fit(tmp_path, Regression(slow=0.05), max_minutes=0.005)
    assert res.stopped_by == "max_minutes" and res.epochs_run == 0
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert ck["in_epoch"] and 1 <= ck["step"] < 16 and ck["epoch"] == 0
    assert task.seen_batches == ck["step"] <= 10  # stopped within a step of the budget


def test_time_checkpoints_resume_mid_epoch_to_the_same_model(tmp_path):
    full, _ = _fit(tmp_path / "full")
    # the same run, stopped by its budget in the middle of epoch 1, then resumed
    part, _ = _fit(tmp_path / "part", Regression(slow=0.02), max_minutes=0.01, checkpoint_minutes=0)
    ck = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=False)
    assert part.stopped_by == "max_minutes" and ck["in_epoch"]
    logs: list[str] = []
    settings = FitSettings(epochs=4, patience=50, checkpoint_minutes=0, progress_seconds=1e9)
    res = Trainer(
        Regression(), settings, tmp_path / "part", monitor="val_mse", config={"lr": 0.05}, log=logs.append
    ).fit()
    assert any(line.startswith(f"resumed epoch {ck['epoch']} step {ck['step']}/16") for line in logs), logs
    a = torch.load(tmp_path / "full" / "model_best.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "model_best.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert res.best == full.best and res.epochs_run == 4


def test_a_checkpoint_of_another_configuration_is_not_resumed(tmp_path):
    _fit(tmp_path, epochs=1)
    logs: list[str] = []
    settings = FitSettings(epochs=1, patience=50, checkpoint_minutes=None, progress_seconds=1e9)
    Trainer(Regression(), settings, tmp_path, monitor="val_mse", config={"lr": 0.5}, log=logs.append).fit()
    assert any("another configuration" in line for line in logs)
    # runtime fields (budget, device, logging cadence) are not part of a run's identity
    logs.clear()
    Trainer(
        Regression(),
        FitSettings(epochs=2, patience=50, checkpoint_minutes=None, progress_seconds=1e9),
        tmp_path,
        monitor="val_mse",
        config={"lr": 0.5, "max_minutes": 3, "device": "cpu"},
        log=logs.append,
    ).fit()
    assert any(line.startswith("resumed after epoch 0") for line in logs)


def test_callbacks_see_progress_epochs_checkpoints_and_the_end(tmp_path):
    seen: dict[str, list] = {"progress": [], "epoch": [], "ckpt": [], "end": []}

    class Recorder(Callback):
        def on_progress(self, info):
            seen["progress"].append(info)

        def on_epoch_end(self, epoch, row):
            seen["epoch"].append((epoch, row))

        def on_checkpoint(self, info):
            seen["ckpt"].append(info)

        def on_train_end(self, result):
            seen["end"].append(result)

    settings = FitSettings(epochs=2, patience=50, checkpoint_minutes=None, log_every=4)
    lines: list[str] = []
    Trainer(Regression(), settings, tmp_path, monitor="val_mse", callbacks=[Recorder()], log=lines.append).fit()
    assert [e for e, _ in seen["epoch"]] == [0, 1]
    assert all(isinstance(v, (int, float, str)) for _, row in seen["epoch"] for v in row.values())
    assert len(seen["progress"]) == 8 and seen["progress"][0]["step"] == 4 and "rows_per_s" in seen["progress"][0]
    assert "eta_epoch_s" in seen["progress"][0] and "loss_mse" in seen["progress"][0]
    assert [c["in_epoch"] for c in seen["ckpt"]] == [False, False] and len(seen["end"]) == 1
    assert any("step 4/16 (25 %)" in line and "rows/s" in line and "ETA epoch" in line for line in lines)


# ---------------------------------------------------------------------------------------
# a real kill -9 of a training process (BMMQA through its CLI), then the same command again
# ---------------------------------------------------------------------------------------
def _bmmqa_cmd(pack: Path, out: Path) -> list[str]:
    return [
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
        "bmmqa",
        "--epochs",
        "3",
        "--batch-size",
        "4",
        "--warmup-epochs",
        "1",
        "--patience",
        "50",
        "--model-json",
        json.dumps(SMALL),
        "--checkpoint-minutes",
        "0",
        "--log-every",
        "1",
        "--device",
        "cpu",
    ]


@pytest.mark.slow
def test_resume_after_kill_9_mid_epoch_gives_the_same_final_metrics(tmp_path):
    pack = synthetic_pack(tmp_path / "pack")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    ref = subprocess.run(_bmmqa_cmd(pack, tmp_path / "ref"), capture_output=True, text=True, timeout=600, env=env)
    assert ref.returncode == 0, ref.stderr[-2000:]

    proc = subprocess.Popen(
        _bmmqa_cmd(pack, tmp_path / "killed"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    seen = []
    try:
        for line in proc.stdout:  # 17 steps per epoch (65 training plans: 7 held out); kill mid epoch 1
            seen.append(line)
            if "epoch 1 step 7/17" in line:
                os.kill(proc.pid, signal.SIGKILL)
                break
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(seen[-20:])
    ck = load_checkpoint(tmp_path / "killed" / "checkpoint.pt")
    assert ck["in_epoch"] and ck["epoch"] == 1 and 1 <= ck["step"] < 17
    assert not (tmp_path / "killed" / "metrics.json").exists()

    again = subprocess.run(_bmmqa_cmd(pack, tmp_path / "killed"), capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resumed epoch 1 step {ck['step']}/17" in again.stdout
    m_ref = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    m_res = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    assert m_res["epochs_run"] == m_ref["epochs_run"] == 3 and m_res["best_epoch"] == m_ref["best_epoch"]
    assert m_res["best_val_mae_gpr_2_2"] == pytest.approx(m_ref["best_val_mae_gpr_2_2"], abs=1e-5)
    h_ref = pd.read_csv(tmp_path / "ref" / "history.csv")
    h_res = pd.read_csv(tmp_path / "killed" / "history.csv")
    cols = [c for c in h_ref.columns if c.startswith(("train_loss", "val_", "psi_", "lambda_"))]
    np.testing.assert_allclose(h_res[cols].to_numpy(), h_ref[cols].to_numpy(), rtol=1e-5, atol=1e-6)
