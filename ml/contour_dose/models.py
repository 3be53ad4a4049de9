"""The contour + dose model family (Kim et al. 2024, CTAN 2023; spec ``seed-methods.md`` §B.2-B.4).

Every model shares one encoder-decoder design; only inputs, outputs and the cross-task parts
differ (``VARIANTS`` in ``ml.contour_dose.train`` picks them):

* ``UNet2D``: a residual encoder (stem + 4 stride-2 stages of two BasicBlocks) and a U-Net
  decoder; one or two heads. Used by dose-only, contour-only, Seq-Human and Seq-Automated.
* ``CTAN2D``: Multi-Automated. A shared encoder; per task and per stage an MTAN attention
  unit (Conv1x1-BN-ReLU-Conv1x1-BN-Sigmoid) whose input is the shared feature **and both
  tasks' previous attended features** (cross-task attention encoder, CTAE); at the bottleneck a
  cross-task attention block (CTAB): each task's tokens, with a fixed 2D sine-cosine positional
  encoding added (spec §B.4; ``ctab_pos``), attend to the other task's tokens (8-head MHA, pre-LN,
  FFN); two task decoders of identical architecture with the task's own attended skips.

Defaults the papers do not state (named here, in the README and in ``ModelConfig``):

* The published encoder is an ImageNet-pretrained ResNet-50. Pretrained weights cannot be
  downloaded here, so the encoder is a ResNet-style one **trained from scratch**, widths
  ``(32, 64, 128, 256, 512)`` (stem at full resolution, bottleneck at 1/16: 8x8 for 128^2).
* The CTAE attention input uses the stage output p^j (MTAN uses the stage's first conv
  output u^j); earlier attended features are brought to stage j by Conv3x3-BN-ReLU + stride 2.
* Heads: dose = Conv1x1 -> 1 channel, ReLU in eval mode only (dose / 70 Gy >= 0; a ReLU during
  training can die); contours = Conv1x1 -> K+1
  logits (softmax over background + K ROIs).
* Normalisation: BatchNorm (batch 8-32 slices, as the papers' 2D setting); decoder upsampling
  is bilinear x2 followed by two Conv3x3-BN-ReLU.
* 2.5D: ``in_channels`` counts stacked neighbouring CT slices plus any mask channels; the
  product model uses 3 CT slices + a soft-tissue window + PTV dose map + possible-dose mask (see
  ``variants.VARIANTS``).
* CTAB positional encoding: without one, the bottleneck (1x1 projections, per-token LayerNorm,
  attention, per-token FFN) is permutation-equivariant over token positions, i.e. blind to
  where a token sits. ``ctab_pos="sincos"`` (default) adds the fixed 2D sine-cosine encoding used by
  MAE (He et al. 2022; half the channels encode the row, half the column, frequencies
  ``1 / 10000^(2i/d)``) to the projected tokens of both tasks before the attention;
  it is computed for any grid size (8x8 for 128^2 inputs, other sizes too) and has no weights.
  ``"none"`` reproduces the earlier bottleneck; a model directory written before the option
  existed loads with ``"none"`` (``ModelConfig.from_dict``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "CTAN2D",
    "AttentionUnit",
    "BasicBlock",
    "CrossTaskBottleneck",
    "Decoder",
    "Encoder",
    "ModelConfig",
    "UNet2D",
    "WidthsConfig",
    "build_model",
    "conv_bn_relu",
    "from_config",
    "n_parameters",
    "sincos_2d",
]


class WidthsConfig:
    """``to_dict`` / ``from_dict`` for the dataclass configs (model and trainer) whose ``widths``
    tuple travels through JSON as a list."""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["widths"] = list(self.widths)
        return d

    @classmethod
    def from_dict(cls, d: dict):
        d = dict(d)
        d["widths"] = tuple(d.get("widths", cls.widths))
        return cls(**d)


@dataclass
class ModelConfig(WidthsConfig):
    arch: str = "unet"  # unet | ctan
    in_channels: int = 1
    n_classes: int = 5  # background + K ROIs (0 = no contour head)
    dose: bool = True  # dose head
    widths: tuple[int, ...] = (32, 64, 128, 256, 512)
    blocks_per_stage: int = 2
    ctab: bool = True  # cross-task attention bottleneck (CTAN)
    ctae: bool = True  # cross-task (vs own-task only, as MTAN) encoder attention
    ctab_dim: int = 256
    ctab_heads: int = 8
    ctab_pos: str = "sincos"  # positional encoding of the bottleneck tokens: sincos | none
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        d = dict(d)
        d.setdefault("ctab_pos", "none")  # saved before the bottleneck had a positional encoding
        return super().from_dict(d)


def conv_bn_relu(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.skip = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.b1(self.c1(x)), inplace=True)
        y = self.b2(self.c2(y))
        return F.relu(y + self.skip(x), inplace=True)


class Encoder(nn.Module):
    """p^0 (full res, w0) ... p^4 (1/16, w4)."""

    def __init__(self, cin: int, widths: tuple[int, ...], blocks: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn_relu(cin, widths[0]), BasicBlock(widths[0], widths[0]))
        self.stages = nn.ModuleList()
        for a, b in zip(widths[:-1], widths[1:], strict=True):
            self.stages.append(nn.Sequential(BasicBlock(a, b, 2), *[BasicBlock(b, b) for _ in range(blocks - 1)]))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = [self.stem(x)]
        for s in self.stages:
            feats.append(s(feats[-1]))
        return feats


class Decoder(nn.Module):
    def __init__(self, widths: tuple[int, ...], out_channels: int) -> None:
        super().__init__()
        self.ups = nn.ModuleList()
        rev = list(widths[::-1])
        for deep, skip in zip(rev[:-1], rev[1:], strict=True):
            self.ups.append(nn.Sequential(conv_bn_relu(deep + skip, skip), conv_bn_relu(skip, skip)))
        self.head = nn.Conv2d(widths[0], out_channels, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        x = feats[-1]
        for up, skip in zip(self.ups, feats[-2::-1], strict=True):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = up(torch.cat([x, skip], dim=1))
        return self.head(x)


def _heads(cfg: ModelConfig) -> dict[str, int]:
    h = {}
    if cfg.dose:
        h["dose"] = 1
    if cfg.n_classes:
        h["contour"] = cfg.n_classes
    if not h:
        raise ValueError("a model needs a dose head, a contour head or both")
    return h


def _init_heads(decoders: nn.ModuleDict) -> None:
    """Dose head bias 0.1 (7 Gy): a ReLU head that starts all-negative would never learn."""
    if "dose" in decoders:
        nn.init.constant_(decoders["dose"].head.bias, 0.1)


def _finish(task: str, y: torch.Tensor, training: bool) -> torch.Tensor:
    """Dose is clamped at 0 only in eval mode: a ReLU in training can die (every output negative,
    zero gradient), which a short, high-lr run was seen to hit; L1 pushes negatives up anyway."""
    return F.relu(y) if task == "dose" and not training else y


class UNet2D(nn.Module):
    """Single-task models and the hard-parameter-sharing variant (one decoder per task)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tasks = _heads(cfg)
        self.encoder = Encoder(cfg.in_channels, cfg.widths, cfg.blocks_per_stage)
        self.decoders = nn.ModuleDict({t: Decoder(cfg.widths, c) for t, c in self.tasks.items()})
        _init_heads(self.decoders)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.encoder(x)
        return {t: _finish(t, d(feats), self.training) for t, d in self.decoders.items()}


class AttentionUnit(nn.Module):
    """MTAN's att_layer: Conv1x1-BN-ReLU-Conv1x1-BN-Sigmoid."""

    def __init__(self, cin: int, cmid: int, cout: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(cin, cmid, 1, bias=False),
            nn.BatchNorm2d(cmid),
            nn.ReLU(inplace=True),
            nn.Conv2d(cmid, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def sincos_2d(h: int, w: int, dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """[h * w, dim] 2D sine-cosine positional encoding (row-major tokens, as ``flatten(2)``): the
    first dim/2 channels encode the row, the rest the column, each half as sin | cos of
    ``pos / 10000^(2i / (dim/2))``."""
    if dim % 4:
        raise ValueError(f"sincos_2d needs dim divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, device=device, dtype=torch.float64) / quarter)
    ys, xs = torch.meshgrid(
        torch.arange(h, device=device, dtype=torch.float64),
        torch.arange(w, device=device, dtype=torch.float64),
        indexing="ij",
    )
    parts = []
    for pos in (ys.reshape(-1), xs.reshape(-1)):
        arg = pos[:, None] * omega[None]
        parts += [arg.sin(), arg.cos()]
    return torch.cat(parts, dim=1).to(dtype)


class CrossTaskBottleneck(nn.Module):
    """CTAB: X_t = proj(â_t) + PE; X_t <- X_t + MHA(LN(X_t), LN(X_t'), LN(X_t')); X_t <- X_t + FFN(LN(X_t))
    for each task (PE: ``sincos_2d`` when ``pos == "sincos"``, nothing for ``"none"``)."""

    def __init__(self, channels: int, dim: int, heads: int, tasks: tuple[str, ...], pos: str = "sincos") -> None:
        super().__init__()
        if pos not in ("sincos", "none"):
            raise ValueError(f"ctab_pos must be sincos or none, not {pos!r}")
        self.tasks = tasks
        self.pos = pos
        self.dim = dim
        self.proj_in = nn.ModuleDict({t: nn.Conv2d(channels, dim, 1) for t in tasks})
        self.proj_out = nn.ModuleDict({t: nn.Conv2d(dim, channels, 1) for t in tasks})
        self.ln_q = nn.ModuleDict({t: nn.LayerNorm(dim) for t in tasks})
        self.ln_kv = nn.ModuleDict({t: nn.LayerNorm(dim) for t in tasks})
        self.attn = nn.ModuleDict({t: nn.MultiheadAttention(dim, heads, batch_first=True) for t in tasks})
        self.ln_ff = nn.ModuleDict({t: nn.LayerNorm(dim) for t in tasks})
        self.ffn = nn.ModuleDict(
            {t: nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)) for t in tasks}
        )
        for t in tasks:  # start as an identity: the block learns how much to exchange
            nn.init.zeros_(self.proj_out[t].weight)
            nn.init.zeros_(self.proj_out[t].bias)

    def forward(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tokens, shape, pe = {}, None, None
        for t in self.tasks:
            y = self.proj_in[t](feats[t])
            shape = y.shape
            tokens[t] = y.flatten(2).transpose(1, 2)  # [B, N, dim]
            if self.pos == "sincos":
                if pe is None:
                    pe = sincos_2d(shape[-2], shape[-1], self.dim, device=y.device, dtype=tokens[t].dtype)
                tokens[t] = tokens[t] + pe
        out = {}
        for i, t in enumerate(self.tasks):
            other = self.tasks[1 - i] if len(self.tasks) == 2 else t
            q, kv = self.ln_q[t](tokens[t]), self.ln_kv[t](tokens[other])
            x = tokens[t] + self.attn[t](q, kv, kv, need_weights=False)[0]
            x = x + self.ffn[t](self.ln_ff[t](x))
            x = x.transpose(1, 2).reshape(shape)
            out[t] = feats[t] + self.proj_out[t](x)
        return out


class CTAN2D(nn.Module):
    """Multi-Automated: shared encoder, cross-task attention encoder + bottleneck, two decoders."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tasks = _heads(cfg)
        names = tuple(self.tasks)
        if len(names) != 2:
            raise ValueError("CTAN needs two tasks (dose and contour)")
        w = cfg.widths
        self.encoder = Encoder(cfg.in_channels, w, cfg.blocks_per_stage)
        n_prev = 2 if cfg.ctae else 1
        self.att = nn.ModuleDict()
        self.bridge = nn.ModuleDict()  # f^j: previous attended feature -> stage j
        for t in names:
            units, bridges = nn.ModuleList(), nn.ModuleList()
            for j, c in enumerate(w):
                cin = c if j == 0 else c * (1 + n_prev)
                units.append(AttentionUnit(cin, c, c))
                if j > 0:
                    bridges.append(conv_bn_relu(w[j - 1], c, 3, stride=2))
            self.att[t], self.bridge[t] = units, bridges
        self.ctab = CrossTaskBottleneck(w[-1], cfg.ctab_dim, cfg.ctab_heads, names, cfg.ctab_pos) if cfg.ctab else None
        self.decoders = nn.ModuleDict({t: Decoder(w, c) for t, c in self.tasks.items()})
        _init_heads(self.decoders)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        p = self.encoder(x)
        names = tuple(self.tasks)
        att_feats: dict[str, list[torch.Tensor]] = {t: [] for t in names}
        for j, pj in enumerate(p):
            new = {}
            for i, t in enumerate(names):
                if j == 0:
                    a_in = pj
                else:
                    own = self.bridge[t][j - 1](att_feats[t][-1])
                    parts = [pj, own]
                    if self.cfg.ctae:
                        other = names[1 - i]
                        parts.append(self.bridge[t][j - 1](att_feats[other][-1]))
                    a_in = torch.cat([_fit(q, pj) for q in parts], dim=1)
                new[t] = self.att[t][j](a_in) * pj
            for t in names:
                att_feats[t].append(new[t])
        if self.ctab is not None:
            bott = self.ctab({t: att_feats[t][-1] for t in names})
            for t in names:
                att_feats[t][-1] = bott[t]
        return {t: _finish(t, self.decoders[t](att_feats[t]), self.training) for t in names}


def _fit(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Odd sizes: a stride-2 conv can give one pixel more than the stage; crop/pad to match."""
    if x.shape[-2:] == ref.shape[-2:]:
        return x
    return F.interpolate(x, size=ref.shape[-2:], mode="bilinear", align_corners=False)


def build_model(cfg: ModelConfig) -> nn.Module:
    if cfg.arch == "unet":
        return UNet2D(cfg)
    if cfg.arch == "ctan":
        return CTAN2D(cfg)
    raise ValueError(f"unknown arch {cfg.arch!r} (unet | ctan)")


def n_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def from_config(**kwargs) -> nn.Module:
    """Rebuild a model from ``ModelConfig.to_dict()`` (the MLflow pyfunc wrapper's entry point)."""
    return build_model(ModelConfig.from_dict(kwargs))
