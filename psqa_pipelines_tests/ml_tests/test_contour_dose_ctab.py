"""The cross-task attention bottleneck's positional encoding (spec §B.4; issue 13, CTAN item 4)."""

from __future__ import annotations

import torch

from ml.contour_dose.models import CrossTaskBottleneck, ModelConfig, build_model

TINY = (4, 8, 16, 32, 64)


def _bottleneck_outputs(pos: str):
    torch.manual_seed(0)
    ctab = CrossTaskBottleneck(16, 32, 4, ("dose", "contour"), pos=pos).eval()
    for t in ctab.tasks:  # a trained block (the zero-initialised projection would hide everything)
        torch.nn.init.normal_(ctab.proj_out[t].weight, std=0.5)
    feats = {t: torch.randn(2, 16, 4, 5) for t in ctab.tasks}
    perm = torch.randperm(20)

    def permute(x):
        return x.flatten(2)[:, :, perm].reshape(x.shape)

    with torch.no_grad():
        ref = ctab(feats)
        moved = ctab({t: permute(f) for t, f in feats.items()})
    return {t: (permute(ref[t]), moved[t]) for t in ctab.tasks}


def test_bottleneck_tokens_know_their_position():
    """Without a positional encoding the bottleneck is permutation-equivariant over token
    positions (shuffling the input tokens only shuffles the output); with it, it is not."""
    for expect, got in _bottleneck_outputs("sincos").values():
        assert not torch.allclose(expect, got, atol=1e-4)
    for expect, got in _bottleneck_outputs("none").values():
        assert torch.allclose(expect, got, atol=1e-5)
    assert ModelConfig().ctab_pos == "sincos"
    # a model directory written before the option existed rebuilds as it was trained
    old = ModelConfig(arch="ctan").to_dict()
    del old["ctab_pos"]
    assert ModelConfig.from_dict(old).ctab_pos == "none"
    m = build_model(ModelConfig(arch="ctan", in_channels=1, n_classes=5, widths=TINY))
    assert m.ctab.pos == "sincos"
    assert m(torch.randn(2, 1, 64, 48))["dose"].shape == (2, 1, 64, 48)  # any grid size
    assert m(torch.randn(2, 1, 128, 128))["contour"].shape == (2, 5, 128, 128)
