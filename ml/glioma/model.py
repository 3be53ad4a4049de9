"""GMMAS, sized for 2D slices on a CPU (spec §C.2, the authors' modified TransBTS, made 2.5D).

Per-sequence stems and learnable weighted modality fusion [C]: each of the four sequences
(FLAIR, T1c, T1, T2) passes through its own stem (Conv 3x3 over the slice and its ``context``
neighbours on each side -> ``widths[0]`` channels, BN, LeakyReLU, Dropout2d); the fused map is
``sum_m w_m f_m / sum_m w_m`` with ``w_m = exp(v_m - 1) * present_m``, ``v_m`` learnable and
initialised to 1. An absent sequence (``present_m = 0``) has weight 0: any subset works, and the
missing-modality stage drops sequences by zeroing their weight, as the authors' code does. The
logged "modal significance" is ``w_m`` normalised to sum 1.

Shared encoder [C]: a pre-activation residual block (EnBlock) at full resolution, then at each
down stage four sequence-specific strided 3x3 convs applied to the shared feature and averaged,
followed by EnBlocks. Widths default (16, 32, 64, 128) at 128, 64, 32, 16 px ([I]: the paper's
3D 16-128 widths, 2D).

Transformer bottleneck [C, smaller]: Conv 3x3 -> ``d_model`` (128) at 16x16 = 256 tokens, a learned
positional embedding, ``n_layers`` (2) pre-norm layers with ``n_heads`` (4) heads, MLP 4x, GELU,
dropout 0.1; LayerNorm; back to a map (``x8``, the feature the self-distillation matches).

Segmentation decoder [C]: EnBlock on x8, then three up stages (ConvTranspose x2, concat the skip,
Conv 1x1, EnBlock) to full resolution, Conv 1x1 -> 2 classes (background, FLAIR abnormality;
lgg-mri has one label [I]).

Classification heads with cross-task sharing [C]: for every task a Conv 3x3 on the encoder's
last feature (x4) and a Conv 3x3 on x8; all tasks' maps are concatenated (the sharing), and per
task Conv 1x1 -> [global average || global max pool] -> Dropout(0.2) -> Linear -> ReLU -> Linear
-> classes ([I]: the authors' heads have no non-linearity between the Linears; one ReLU is
added). The global U-Net branch and its channel-attention fusion are not built ([I]: the 2D
slice already is the whole field of view, which is what that branch restores in 3D patches).

MC dropout: ``enable_mc_dropout`` puts the dropout layers (stems, transformer, heads) in train
mode for UPS and the report's uncertainty.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from ml.glioma.data import SEQUENCES, TASKS

__all__ = ["GMMAS", "ModelConfig", "enable_mc_dropout", "from_config", "n_parameters"]


@dataclass
class ModelConfig:
    widths: tuple[int, ...] = (16, 32, 64, 128)
    context: int = 1  # neighbouring slices on each side (2.5D); 0 = 2D
    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 2
    head_channels: int = 32
    head_hidden: int = 64
    dropout: float = 0.2
    stem_dropout: float = 0.1
    stem_stride: int = 2  # 2: the encoder starts at half resolution, a light full-resolution head restores it
    tasks: dict[str, int] = field(default_factory=lambda: {t: len(v) for t, v in TASKS.items()})
    n_sequences: int = len(SEQUENCES)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["widths"] = list(self.widths)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        d = dict(d)
        d["widths"] = tuple(d["widths"])
        return cls(**d)


def n_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class EnBlock(nn.Module):
    """Pre-activation residual block: BN-LeakyReLU-Conv3-BN-LeakyReLU-Conv3 + identity."""

    def __init__(self, cin: int, cout: int | None = None) -> None:
        super().__init__()
        cout = cout or cin
        self.body = nn.Sequential(
            nn.BatchNorm2d(cin),
            nn.LeakyReLU(0.01, inplace=False),
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.LeakyReLU(0.01, inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        )
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.skip(x)


class Down(nn.Module):
    """Sequence-specific strided convs on the shared feature, averaged [C], then EnBlocks."""

    def __init__(self, cin: int, cout: int, n_seq: int, n_blocks: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(cin, cout, 3, stride=2, padding=1) for _ in range(n_seq)])
        self.blocks = nn.Sequential(*[EnBlock(cout) for _ in range(n_blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(sum(c(x) for c in self.convs) / len(self.convs))


class Up(nn.Module):
    def __init__(self, cin: int, cskip: int, cout: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cout, 2, stride=2)
        self.merge = nn.Conv2d(cout + cskip, cout, 1)
        self.block = EnBlock(cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.block(self.merge(torch.cat([self.up(x), skip], 1)))


class Bottleneck(nn.Module):
    def __init__(self, cin: int, d: int, heads: int, layers: int, tokens: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.inp = nn.Sequential(nn.BatchNorm2d(cin), nn.LeakyReLU(0.01), nn.Conv2d(cin, d, 3, padding=1))
        self.pos = nn.Parameter(torch.zeros(1, tokens, d))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.drop = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(
            d, heads, 4 * d, dropout=dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        b, d, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)
        pos = self.pos
        if pos.shape[1] != h * w:  # another input size: interpolate the learned grid
            g = round(pos.shape[1] ** 0.5)
            pos = F.interpolate(pos.transpose(1, 2).reshape(1, d, g, g), size=(h, w), mode="bilinear")
            pos = pos.flatten(2).transpose(1, 2)
        t = self.norm(self.encoder(self.drop(t + pos)))
        return t.transpose(1, 2).reshape(b, d, h, w)


class TaskHeads(nn.Module):
    def __init__(self, c_enc: int, d: int, tasks: dict[str, int], ch: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.tasks = dict(tasks)
        self.from_enc = nn.ModuleDict({t: nn.Conv2d(c_enc, ch, 3, padding=1) for t in tasks})
        self.from_bot = nn.ModuleDict({t: nn.Conv2d(d, ch, 3, padding=1) for t in tasks})
        shared = 2 * ch * len(tasks)
        self.mix = nn.ModuleDict({t: nn.Conv2d(shared, ch, 1) for t in tasks})
        self.mlp = nn.ModuleDict(
            {
                t: nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * ch, hidden), nn.ReLU(), nn.Linear(hidden, k))
                for t, k in tasks.items()
            }
        )

    def forward(self, x4: torch.Tensor, x8: torch.Tensor) -> dict[str, torch.Tensor]:
        maps = [F.leaky_relu(self.from_enc[t](x4), 0.01) for t in self.tasks]
        maps += [F.leaky_relu(self.from_bot[t](x8), 0.01) for t in self.tasks]
        shared = torch.cat(maps, 1)  # every task's maps: cross-task feature sharing
        out = {}
        for t in self.tasks:
            m = F.leaky_relu(self.mix[t](shared), 0.01)
            pooled = torch.cat([m.mean((2, 3)), m.amax((2, 3))], 1)
            out[t] = self.mlp[t](pooled)
        return out


class GMMAS(nn.Module):
    """``forward(x, present, drop=None)``: x (B, 4, 2*context+1, H, W) z-scored slices (SEQUENCES
    order, the slice in the middle of the context), present (B, 4) 0/1 -> dict ``seg`` (B, 2, H, W)
    logits, one logits tensor per task, ``feat`` (x8) and ``weights`` (B, 4) normalised fusion
    weights. ``drop`` (B, 4) 0/1 zeroes fusion weights on top of ``present`` (missing-modality
    training / evaluation)."""

    def __init__(self, cfg: ModelConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or ModelConfig()
        w = cfg.widths
        k = 2 * cfg.context + 1
        self.stems = nn.ModuleList(
            [
                nn.Sequential(
                    nn.Conv2d(k, w[0], 3, stride=cfg.stem_stride, padding=1, bias=False),
                    nn.BatchNorm2d(w[0]),
                    nn.LeakyReLU(0.01, inplace=True),
                    nn.Dropout2d(cfg.stem_dropout),
                )
                for _ in range(cfg.n_sequences)
            ]
        )
        self.v = nn.Parameter(torch.ones(cfg.n_sequences))  # w_m = exp(v_m - 1): 1 at start [C]
        self.enc0 = EnBlock(w[0])
        self.downs = nn.ModuleList(
            [Down(w[i], w[i + 1], cfg.n_sequences, 2 if i < len(w) - 2 else 3) for i in range(len(w) - 1)]
        )
        side = 128 // cfg.stem_stride // 2 ** (len(w) - 1)
        self.bottleneck = Bottleneck(w[-1], cfg.d_model, cfg.n_heads, cfg.n_layers, side * side)
        self.dec_in = EnBlock(cfg.d_model, w[-1])
        self.ups = nn.ModuleList([Up(w[i + 1], w[i], w[i]) for i in reversed(range(len(w) - 1))])
        if cfg.stem_stride == 1:
            self.full_res = None
            self.seg_out = nn.Conv2d(w[0], 2, 1)
        else:  # back to the input grid, with the raw centre slices as the full-resolution skip
            self.full_res = nn.ConvTranspose2d(w[0], w[0], cfg.stem_stride, stride=cfg.stem_stride)
            self.seg_out = nn.Sequential(
                nn.Conv2d(w[0] + cfg.n_sequences, w[0], 3, padding=1),
                nn.LeakyReLU(0.01, inplace=True),
                nn.Conv2d(w[0], 2, 1),
            )
        self.heads = TaskHeads(w[-1], cfg.d_model, cfg.tasks, cfg.head_channels, cfg.head_hidden, cfg.dropout)

    def fusion_weights(self, present: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        w = torch.exp(self.v - 1.0)[None] * present.float()
        if drop is not None:
            w = w * drop.float()
        return w / w.sum(1, keepdim=True).clamp_min(1e-6)

    def modal_significance(self, seen: torch.Tensor | None = None) -> dict[str, float]:
        """Fusion weights normalised to sum 1 over the sequences ``seen`` in training (0/1 per
        sequence; default all): a sequence never present keeps its initial logit and is reported 0."""
        w = torch.exp(self.v.detach().float().cpu() - 1.0)
        if seen is not None:
            w = w * seen.float().cpu()
        w = w / w.sum().clamp_min(1e-12)
        return {s: float(x) for s, x in zip(SEQUENCES, w, strict=True)}

    def encode(self, x: torch.Tensor, present: torch.Tensor, drop: torch.Tensor | None = None):
        wts = self.fusion_weights(present, drop)
        feats = torch.stack([stem(x[:, m]) for m, stem in enumerate(self.stems)], 1)  # (B, M, C, H, W)
        fused = (feats * wts[:, :, None, None, None].to(feats.dtype)).sum(1)
        skips = [self.enc0(fused)]
        for d in self.downs:
            skips.append(d(skips[-1]))
        x8 = self.bottleneck(skips[-1])
        return skips, x8, wts

    def forward(self, x: torch.Tensor, present: torch.Tensor, drop: torch.Tensor | None = None) -> dict:
        skips, x8, wts = self.encode(x, present, drop)
        y = self.dec_in(x8)
        for up, skip in zip(self.ups, reversed(skips[:-1]), strict=True):
            y = up(y, skip)
        if self.full_res is not None:
            centre = x[:, :, x.shape[2] // 2] * (wts > 0)[:, :, None, None].to(x.dtype)
            y = torch.cat([self.full_res(y), centre], 1)
        out = {"seg": self.seg_out(y), "feat": x8, "weights": wts}
        out.update(self.heads(skips[-1], x8))
        return out


def enable_mc_dropout(model: nn.Module) -> None:
    """Eval mode with every dropout layer in train mode (MC-dropout sampling)."""
    model.eval()
    for m in model.modules():
        if isinstance(m, nn.Dropout | nn.Dropout2d):
            m.train()


def from_config(**kwargs) -> GMMAS:
    """Rebuild GMMAS from ``ModelConfig.to_dict()`` (the MLflow pyfunc wrapper's entry point)."""
    return GMMAS(ModelConfig.from_dict(kwargs))
