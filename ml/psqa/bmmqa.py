"""BMMQA: balanced multimodal multi-task QA (Zeng, Ahmed & Tunio, Diagnostics 2025).

Two modalities -> two tasks:

* image: planned dose plane + fluence map (C x H x W), encoded by a 4-stage CNN;
* table: plan-complexity metrics (K values), encoded by an MLP;
* task GPR: gamma passing rates at several criteria, from a **softmax-weighted attention
  fusion** of the two modality embeddings;
* task DD: the dose-difference map (measured - planned, % of max), from a decoder fed by
  **spatial cascading**: the tabular embedding is projected and tiled into every decoder stage.

What the paper states and what is our default (seed-methods.md §A, marked [I] there):

==============================  ===========================================================
stated by the paper             task-specific fusion (attention for GPR, cascading for DD);
                                one encoder per modality; Shapley modality contributions;
                                fast forward over modality combinations; loss factors per
                                modality; contribution-based task weights
our defaults (paper silent)     encoder widths (32, 64, 128, 256) with 2 convs/stage, BatchNorm,
                                GELU MLP 128->``embed``; ``embed`` = 128; attention scorer
                                ``w^T tanh(W z)`` with 64 hidden units shared by modalities;
                                GPR = 100 * sigmoid(MLP(z)), fusion and head in fp32 also
                                under bf16 autocast (0.01-point resolution, tested); light
                                decoder (32, 16, 8, 8)
                                so that the coalition heads cost little next to the encoder;
                                absent modality = zeroed features (and -inf attention logit)
==============================  ===========================================================

The network is split into ``encode`` (run once per batch) and ``heads`` (cheap), so that the
outputs of every modality coalition can be computed from one encoder pass: ``coalitions``
stacks the 2^M masked copies of the encoded features along the batch axis and runs the heads
once (the "fast network forward mechanism"; see ``ml.psqa.shapley``).

Variants (the baselines of the issue) are flags of one class (``BMMQAConfig``):
``gpr_fusion`` attention|concat, ``dd_fusion`` cascade|bottleneck, ``modalities``
(image-only / table-only models mask the other modality permanently), ``tasks`` gpr|dd|both.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "BMMQA",
    "CHANNELS_LAST",
    "MODALITIES",
    "AttentionFusion",
    "BMMQAConfig",
    "DDDecoder",
    "Encoded",
    "GradScale",
    "ImageEncoder",
    "TabEncoder",
    "coalition_masks",
    "scale_grad",
]

MODALITIES = ("image", "table")
# the decoder runs channels-last: its convolutions have few channels, and on CPU (oneDNN) those,
# the bilinear upsampling and the 1 x 1 output convolution are 1.5-5x faster in NHWC than NCHW
CHANNELS_LAST = torch.channels_last


@dataclass
class BMMQAConfig:
    in_channels: int = 2
    n_tab: int = 30
    n_criteria: int = 4
    embed: int = 128
    enc_widths: tuple[int, ...] = (32, 64, 128, 256)
    dec_widths: tuple[int, ...] = (32, 16, 8, 8)
    dropout: float = 0.1
    gpr_fusion: str = "attention"  # attention | concat
    dd_fusion: str = "cascade"  # cascade | bottleneck
    modalities: tuple[str, ...] = MODALITIES
    tasks: tuple[str, ...] = ("gpr", "dd")

    def to_dict(self) -> dict:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> BMMQAConfig:
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**kw)


class GradScale(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``k`` (per-sample or scalar) on the way back.

    This is how a modality-specific *loss factor* reaches one encoder through one task only.
    """

    @staticmethod
    def forward(ctx, x, k):
        ctx.save_for_backward(k)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        (k,) = ctx.saved_tensors
        return grad * k.to(grad.dtype), None


def scale_grad(x: torch.Tensor, k: float | torch.Tensor | None) -> torch.Tensor:
    if k is None:
        return x
    k = torch.as_tensor(k, dtype=x.dtype, device=x.device)
    if torch.all(k == 1):
        return x
    return GradScale.apply(x, k)


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.GELU(),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.GELU(),
    )


class ImageEncoder(nn.Module):
    def __init__(self, cfg: BMMQAConfig) -> None:
        super().__init__()
        widths = cfg.enc_widths
        self.stages = nn.ModuleList()
        cin = cfg.in_channels
        for i, w in enumerate(widths):
            self.stages.append(_block(cin, w, stride=1 if i == 0 else 2))
            cin = w
        self.proj = nn.Linear(widths[-1], cfg.embed)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        z = self.proj(x.mean(dim=(2, 3)))
        return z, feats


class TabEncoder(nn.Module):
    def __init__(self, cfg: BMMQAConfig) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(cfg.n_tab, 128),
            nn.GELU(),
            nn.LayerNorm(128),
            nn.Dropout(cfg.dropout),
            nn.Linear(128, cfg.embed),
            nn.GELU(),
            nn.LayerNorm(cfg.embed),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class AttentionFusion(nn.Module):
    """alpha_m = softmax_m(w^T tanh(W z_m)) over the *present* modalities; z = sum alpha_m z_m."""

    def __init__(self, embed: int, hidden: int = 64) -> None:
        super().__init__()
        self.W = nn.Linear(embed, hidden)
        self.w = nn.Linear(hidden, 1, bias=False)

    def forward(self, zs: list[torch.Tensor], present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # zs: M tensors (B, D); present: (B, M) bool
        z = torch.stack(zs, dim=1)  # (B, M, D)
        logits = self.w(torch.tanh(self.W(z))).squeeze(-1)  # (B, M)
        logits = logits.masked_fill(~present, float("-inf"))
        any_present = present.any(dim=1, keepdim=True)
        alpha = torch.softmax(torch.where(any_present, logits, torch.zeros_like(logits)), dim=1)
        alpha = torch.where(any_present, alpha, torch.zeros_like(alpha))
        return (alpha.unsqueeze(-1) * z).sum(dim=1), alpha


class DDDecoder(nn.Module):
    """U-Net-style decoder over the image feature pyramid (deepest first).

    ``cascade`` tiles a projection of the tabular embedding into every stage (spatial
    cascading); ``bottleneck`` only into the deepest one (plain late concatenation).

    Each stage computes ``GELU(conv([skip ; tile ; up(prev)]))``. Convolution is linear in its
    input channels, so the conv is stored as three convolutions summed: ``conv_skip(skip) +
    conv_tile(tile) + conv_prev(up(prev))``. That is the same function (same expressivity),
    but it lets the coalition pass compute the skip and tile parts once per sample and reuse
    them for every modality coalition (a coalition only rescales them by 0/1); only
    ``conv_prev`` runs once per coalition (``combine_coalitions``: and the empty coalition,
    which does not depend on the inputs, for one sample only).

    The tile is constant over the image, so ``conv_tile(tile)`` takes only 9 values per sample
    and channel (which 3 x 3 taps fall inside the zero-padded image); it is computed from them
    (``_tile_conv``) instead of convolving the expanded tile.
    """

    def __init__(self, cfg: BMMQAConfig) -> None:
        super().__init__()
        enc = list(cfg.enc_widths)[::-1]  # deepest first
        dec = list(cfg.dec_widths)
        self.cascade = cfg.dd_fusion == "cascade"
        self.tile_ch = 8
        self.uses_tile = [self.cascade or i == 0 for i in range(len(enc))]
        self.skip_convs = nn.ModuleList()
        self.tile_projs = nn.ModuleList()
        self.tile_convs = nn.ModuleList()
        self.prev_convs = nn.ModuleList()
        prev = 0
        for i, (e, d) in enumerate(zip(enc, dec, strict=True)):
            self.skip_convs.append(nn.Conv2d(e, d, 3, padding=1))
            if self.uses_tile[i]:
                self.tile_projs.append(nn.Linear(cfg.embed, self.tile_ch))
                self.tile_convs.append(nn.Conv2d(self.tile_ch, d, 3, padding=1, bias=False))
            else:
                self.tile_projs.append(nn.Identity())
                self.tile_convs.append(nn.Identity())
            self.prev_convs.append(nn.Conv2d(prev, d, 3, padding=1, bias=False) if prev else nn.Identity())
            prev = d
        self.out = nn.Conv2d(prev, 1, 1)

    def _tile_conv(self, i: int, z_tab: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """``tile_convs[i]`` of ``tile_projs[i](z_tab)`` tiled over (height, width): (B, d, h, w).

        conv(t)[b, d, y, x] = sum_{p, q} (W[:, :, p, q] @ t_b)[d] * inside(y + p - 1) * inside(x + q - 1)
        for the zero-padded 3 x 3 convolution of the constant image t_b.
        """
        t = self.tile_projs[i](z_tab)  # (B, tile_ch)
        w = self.tile_convs[i].weight  # (d, tile_ch, 3, 3)
        a = torch.einsum("dcpq,bc->bdpq", w, t)

        def inside(n: int) -> torch.Tensor:  # (3, n): tap p at position y reads y + p - 1
            pos = torch.arange(n, device=t.device)[None, :] + torch.arange(-1, 2, device=t.device)[:, None]
            return ((pos >= 0) & (pos < n)).to(t.dtype)

        rows, cols = inside(height), inside(width)
        return torch.einsum("bdpx,py->bdyx", torch.einsum("bdpq,qx->bdpx", a, cols), rows)

    def shared_parts(self, feats: list[torch.Tensor], z_tab: torch.Tensor):
        """Per-stage (skip part WITHOUT its bias, tile part or None): computed once per sample."""
        parts = []
        for i, f in enumerate(feats[::-1]):
            conv = self.skip_convs[i]
            skip = F.conv2d(f, conv.weight, None, padding=1).contiguous(memory_format=CHANNELS_LAST)
            tile = None
            if self.uses_tile[i]:
                tile = self._tile_conv(i, z_tab, f.shape[2], f.shape[3]).contiguous(memory_format=CHANNELS_LAST)
            parts.append((skip, tile))
        return parts

    def combine(self, parts, m_img: torch.Tensor, m_tab: torch.Tensor, repeat: int = 1) -> torch.Tensor:
        """Run the per-coalition part. ``m_img``/``m_tab``: (repeat*B,) 0/1 weights."""
        b = parts[0][0].shape[0]
        mi = m_img.view(repeat, b, 1, 1, 1)
        mt = m_tab.view(repeat, b, 1, 1, 1)
        x = None
        for i, (skip, tile) in enumerate(parts):
            bias = self.skip_convs[i].bias.view(1, 1, -1, 1, 1)
            h = torch.addcmul(bias, skip.unsqueeze(0), mi)  # (repeat, B, d, h, w), no copies of skip
            if tile is not None:
                h = h + tile.unsqueeze(0) * mt
            h = h.flatten(0, 1)
            if x is not None:
                h = h + self.prev_convs[i](F.interpolate(x, size=skip.shape[2:], mode="bilinear", align_corners=False))
            x = F.gelu(h)
        return self.out(x)

    def combine_coalitions(self, parts, coalitions: list[tuple[bool, bool]]) -> list[torch.Tensor]:
        """DD maps of the whole batch for each (image present, table present) coalition.

        The same function as ``combine`` with the 0/1 masks of each coalition, as one stacked
        pass: a coalition adds only the parts it contains and the empty coalition (which does
        not depend on the inputs) runs for one sample, expanded to the batch at the end.
        """
        b = parts[0][0].shape[0]
        sizes = [b if (ci or ct) else 1 for ci, ct in coalitions]
        x = None
        for i, (skip, tile) in enumerate(parts):
            bias = self.skip_convs[i].bias.view(1, -1, 1, 1)
            with_img = skip + bias if any(ci for ci, _ in coalitions) else None
            bases = []
            for ci, ct in coalitions:
                if ci:
                    base = with_img + tile if (ct and tile is not None) else with_img
                elif ct and tile is not None:
                    base = bias + tile
                else:
                    base = bias
                bases.append(base)
            if x is None:
                h = torch.cat(
                    [bs.expand(n, -1, *skip.shape[2:]) for bs, n in zip(bases, sizes, strict=True)]
                ).contiguous(memory_format=CHANNELS_LAST)
            else:
                h = self.prev_convs[i](F.interpolate(x, size=skip.shape[2:], mode="bilinear", align_corners=False))
                h = h.to(torch.promote_types(h.dtype, bias.dtype))  # as ``combine`` under autocast
                r = 0
                for bs, n in zip(bases, sizes, strict=True):
                    h[r : r + n] += bs
                    r += n
            x = F.gelu(h)
        y = self.out(x)
        out, r = [], 0
        for n in sizes:
            out.append(y[r : r + n] if n == b else y[r : r + n].expand(b, -1, -1, -1).contiguous())
            r += n
        return out


@dataclass
class Encoded:
    z: dict[str, torch.Tensor]  # modality -> (B, D)
    feats: list[torch.Tensor] = field(default_factory=list)  # image feature pyramid


class BMMQA(nn.Module):
    def __init__(self, cfg: BMMQAConfig | None = None, **kwargs) -> None:
        super().__init__()
        cfg = cfg or BMMQAConfig(**kwargs)
        self.cfg = cfg
        self.image_encoder = ImageEncoder(cfg)
        self.tab_encoder = TabEncoder(cfg)
        if "gpr" in cfg.tasks:
            if cfg.gpr_fusion == "attention":
                self.fusion = AttentionFusion(cfg.embed)
                head_in = cfg.embed
            else:
                head_in = 2 * cfg.embed
            self.gpr_head = nn.Sequential(
                nn.Linear(head_in, 64), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(64, cfg.n_criteria)
            )
        if "dd" in cfg.tasks:
            self.dd_decoder = DDDecoder(cfg)

    # -- the two halves --------------------------------------------------------------------
    def encode(self, image: torch.Tensor, table: torch.Tensor) -> Encoded:
        z_img, feats = self.image_encoder(image)
        z_tab = self.tab_encoder(table)
        return Encoded(z={"image": z_img, "table": z_tab}, feats=feats)

    def heads(
        self,
        enc: Encoded,
        present: torch.Tensor | None = None,
        loss_factors: dict[str, dict[str, float]] | None = None,
        repeat: int = 1,
    ) -> dict[str, torch.Tensor]:
        """Task outputs for the encoded batch.

        ``present``: (repeat*B, 2) bool mask over (image, table); absent modalities are zeroed
        (the model's own ``modalities`` restriction is applied on top). ``repeat`` > 1 evaluates
        ``repeat`` masked copies of the batch (the coalitions) while computing every
        coalition-independent part once. ``loss_factors``: {task: {modality: k}} gradient
        multipliers on the features entering that task.
        """
        z_img, z_tab = enc.z["image"], enc.z["table"]
        b = z_img.shape[0] * repeat
        if present is None:
            present = torch.ones(b, 2, dtype=torch.bool, device=z_img.device)
        present = present & self._allowed(present.device)[None, :]
        m_img = present[:, 0].to(z_img.dtype)
        m_tab = present[:, 1].to(z_tab.dtype)
        lf = loss_factors or {}

        out: dict[str, torch.Tensor] = {}
        if "gpr" in self.cfg.tasks:
            k = lf.get("gpr", {})
            out.update(
                self._gpr(
                    scale_grad(z_img, k.get("image")), scale_grad(z_tab, k.get("table")), present, m_img, m_tab, repeat
                )
            )
        if "dd" in self.cfg.tasks:
            k = lf.get("dd", {})
            feats = [scale_grad(f, k.get("image")) for f in enc.feats]
            parts = self.dd_decoder.shared_parts(feats, scale_grad(z_tab, k.get("table")))
            out["dd"] = self.dd_decoder.combine(parts, m_img, m_tab, repeat=repeat)
        return out

    def _allowed(self, device) -> torch.Tensor:
        return torch.tensor([m in self.cfg.modalities for m in MODALITIES], device=device)

    def _gpr(self, z_img, z_tab, present, m_img, m_tab, repeat: int) -> dict[str, torch.Tensor]:
        def rep(t):
            return t.repeat(repeat, *([1] * (t.dim() - 1))) if repeat > 1 else t

        out = {}
        # fusion and head in fp32 whatever the autocast: bf16 keeps 8 significant bits, so the
        # logit and 100 * sigmoid would land on a grid of ~0.1-0.5 percentage points near 95 %
        with torch.autocast(z_img.device.type, enabled=False):
            zi = rep(z_img.float()) * m_img[:, None].float()
            zt = rep(z_tab.float()) * m_tab[:, None].float()
            if self.cfg.gpr_fusion == "attention":
                z, alpha = self.fusion([zi, zt], present)
                out["alpha"] = alpha
            else:
                z = torch.cat([zi, zt], dim=1)
            out["gpr"] = 100.0 * torch.sigmoid(self.gpr_head(z))
        return out

    def forward(self, image: torch.Tensor, table: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.heads(self.encode(image, table))

    @torch.no_grad()
    def init_gpr_bias(self, mean_gpr: torch.Tensor) -> None:
        """Start the GPR head at the training mean (logit of mean/100) instead of 50 %."""
        if "gpr" in self.cfg.tasks:
            p = (mean_gpr.float() / 100.0).clamp(1e-3, 1 - 1e-3)
            self.gpr_head[-1].bias.copy_(torch.log(p / (1 - p)))

    # -- coalitions (fast forward) ---------------------------------------------------------
    def coalitions(
        self, image: torch.Tensor, table: torch.Tensor, enc: Encoded | None = None
    ) -> dict[tuple[str, ...], dict[str, torch.Tensor]]:
        """Outputs of every modality coalition from ONE encoder pass and ONE (stacked) head pass."""
        enc = enc or self.encode(image, table)
        z_img = enc.z["image"]
        masks = coalition_masks(2, device=z_img.device)  # (4, 2)
        b = z_img.shape[0]
        n = masks.shape[0]
        keys = [tuple(m for m, on in zip(MODALITIES, mask, strict=True) if on) for mask in masks.tolist()]
        out: dict[str, torch.Tensor] = {}
        if "gpr" in self.cfg.tasks:  # tiny: the 2^M masked copies of the embeddings, stacked
            present = masks.repeat_interleave(b, dim=0) & self._allowed(z_img.device)[None, :]
            out.update(
                self._gpr(
                    z_img, enc.z["table"], present, present[:, 0].to(z_img.dtype), present[:, 1].to(z_img.dtype), n
                )
            )
        result = {key: {k: v[i * b : (i + 1) * b] for k, v in out.items()} for i, key in enumerate(keys)}
        if "dd" in self.cfg.tasks:
            # the decoder: skip/tile parts once, per coalition only the cheap combine (and only
            # once per distinct effective coalition of a model restricted to one modality)
            allowed = [m in self.cfg.modalities for m in MODALITIES]
            eff = [(("image" in key) and allowed[0], ("table" in key) and allowed[1]) for key in keys]
            unique = list(dict.fromkeys(eff))
            parts = self.dd_decoder.shared_parts(enc.feats, enc.z["table"])
            dd = dict(zip(unique, self.dd_decoder.combine_coalitions(parts, unique), strict=True))
            for key, e in zip(keys, eff, strict=True):
                result[key]["dd"] = dd[e]
        return result


def coalition_masks(n_modalities: int, device=None) -> torch.Tensor:
    """All 2^M subsets as a (2^M, M) bool tensor, the empty set first, the full set last."""
    idx = torch.arange(2**n_modalities, device=device)
    bits = (idx[:, None] >> torch.arange(n_modalities, device=device)[None, :]) & 1
    order = torch.argsort(bits.sum(dim=1) * (2**n_modalities) + idx, stable=True)
    return bits[order].bool()
