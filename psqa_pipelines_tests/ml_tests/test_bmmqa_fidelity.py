"""Scientific fidelity of BMMQA (issue 13, items 1-5): optimiser and schedule, model selection
after the balancing starts, seeds with t-intervals; Shapley on a held-out batch in eval mode,
modality dropout, the contribution -> loss-factor rule for negative contributions; L1 GPR loss
and per-task loss normalisation; the fp32 GPR head under bf16 autocast; the median predictor."""

from __future__ import annotations

import pytest
import torch

from ml.psqa.bmmqa import BMMQA, BMMQAConfig, Encoded
from ml.psqa.dataset import Tensors
from ml.psqa.train import BMMQATask, TrainConfig
from psqa_pipelines_tests.ml_tests.synthetic_packs import synthetic_pack


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


# -- 2. Shapley on a held-out batch in eval mode, modality dropout, psi ---------------------------


# -- 3. losses -----------------------------------------------------------------------------------


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


# -- 5. machine identity as a plan-level feature --------------------------------------------------
