"""Image similarity metrics in torch (usable as losses) and numpy wrappers.

SSIM follows Wang et al. 2004 with an 11-tap Gaussian window (sigma 1.5), K1 = 0.01,
K2 = 0.03 and an explicit ``data_range`` (the usual choice for dose maps: the range of the
reference map, or a fixed range such as 100 % for maps in percent of the maximum dose).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["ssim", "ssim_map", "ssim_np"]


def _gaussian_window(size: int = 11, sigma: float = 1.5, device=None, dtype=torch.float32) -> torch.Tensor:
    x = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim_map(x: torch.Tensor, y: torch.Tensor, data_range: float | torch.Tensor, window: int = 11) -> torch.Tensor:
    """Per-pixel SSIM of two (B, 1, H, W) tensors (valid convolution, no padding)."""
    w = _gaussian_window(window, device=x.device, dtype=x.dtype)
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    if isinstance(c1, torch.Tensor):
        c1 = c1.view(-1, 1, 1, 1)
        c2 = c2.view(-1, 1, 1, 1)
    mu_x = F.conv2d(x, w)
    mu_y = F.conv2d(y, w)
    sxx = F.conv2d(x * x, w) - mu_x**2
    syy = F.conv2d(y * y, w) - mu_y**2
    sxy = F.conv2d(x * y, w) - mu_x * mu_y
    return ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float | torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """SSIM per sample (``reduction='none'``) or averaged."""
    per = ssim_map(x, y, data_range).flatten(1).mean(dim=1)
    return per.mean() if reduction == "mean" else per


def ssim_np(pred: np.ndarray, ref: np.ndarray, data_range: float | None = None) -> float:
    """SSIM of two 2D arrays (data range defaults to the reference's range)."""
    ref = np.asarray(ref, dtype=np.float64)
    pred = np.asarray(pred, dtype=np.float64)
    dr = float(data_range if data_range is not None else (ref.max() - ref.min()) or 1.0)
    t = lambda a: torch.from_numpy(a)[None, None]  # noqa: E731
    return float(ssim(t(pred), t(ref), dr))
