"""The contour + dose family's variants (seed 002, spec §B.2-B.6) and their input channels.

================  ==========  ===================================  ======================
variant           arch        input channels                       outputs
================  ==========  ===================================  ======================
dose-only         U-Net       CT                                   dose (the "Baseline")
contour-only      U-Net       CT                                   4 ROI labels ("DL-Baseline")
seq-human         U-Net       CT + 4 clinical ROI masks            dose
seq-automated     U-Net       CT + 4 contour-only predicted masks  dose
multi-automated   CTAN        CT                                   dose + 4 ROI labels
product           CTAN        3 CT slices (2.5D) + PTV dose map    dose + 7 OAR labels
                              (Rx/70 inside each PTV) + pdm
================  ==========  ===================================  ======================

The paper's ROIs are Brainstem, SpinalCord, LeftParotid, RightParotid (overlaps resolved by
that priority order when building the label map); the product model contours all 7 OpenKBP
OARs. Dose is normalised by 70 Gy; CT HU are clipped to ``HU_CLIP`` before z-scoring.
"""

from __future__ import annotations

__all__ = [
    "DOSE_NORM_GY",
    "HU_CLIP",
    "LR_PAIRS",
    "MODEL_NAMES",
    "PAPER_ROIS",
    "PRODUCT_ROIS",
    "VARIANTS",
    "in_channels",
    "lr_swap_index",
    "mask_channel_slices",
]

DOSE_NORM_GY = 70.0
HU_CLIP = (-1024.0, 1500.0)
PAPER_ROIS = ("Brainstem", "SpinalCord", "LeftParotid", "RightParotid")
PRODUCT_ROIS = ("SpinalCord", "Brainstem", "Mandible", "Larynx", "Esophagus", "LeftParotid", "RightParotid")
LR_PAIRS = (("LeftParotid", "RightParotid"),)

VARIANTS: dict[str, dict] = {
    "dose-only": {"arch": "unet", "inputs": ("ct",), "tasks": ("dose",), "rois": PAPER_ROIS},
    "contour-only": {"arch": "unet", "inputs": ("ct",), "tasks": ("contour",), "rois": PAPER_ROIS},
    "seq-human": {"arch": "unet", "inputs": ("ct", "gt_masks"), "tasks": ("dose",), "rois": PAPER_ROIS},
    "seq-automated": {"arch": "unet", "inputs": ("ct", "pred_masks"), "tasks": ("dose",), "rois": PAPER_ROIS},
    "multi-automated": {"arch": "ctan", "inputs": ("ct",), "tasks": ("dose", "contour"), "rois": PAPER_ROIS},
    "product": {"arch": "ctan", "inputs": ("ct3", "ptv", "pdm"), "tasks": ("dose", "contour"), "rois": PRODUCT_ROIS},
}
MODEL_NAMES = {
    "dose-only": "Baseline",
    "contour-only": "DL-Baseline",
    "seq-human": "Seq-Human",
    "seq-automated": "Seq-Automated",
    "multi-automated": "Multi-Automated",
    "product": "Product",
}


def in_channels(variant: str) -> int:
    spec = VARIANTS[variant]
    n = 0
    for name in spec["inputs"]:
        n += {"ct": 1, "ct3": 3, "ptv": 1, "pdm": 1}.get(name, len(spec["rois"]))
    return n


def mask_channel_slices(variant: str) -> list[tuple[int, int]]:
    """(start, stop) of the input channels holding ROI masks (nearest-neighbour when augmenting)."""
    spec = VARIANTS[variant]
    out, c = [], 0
    for name in spec["inputs"]:
        w = {"ct": 1, "ct3": 3, "ptv": 1, "pdm": 1}.get(name, len(spec["rois"]))
        if name in ("gt_masks", "pred_masks", "ptv", "pdm"):
            out.append((c, c + w))
        c += w
    return out


def lr_swap_index(rois: tuple[str, ...]) -> list[int]:
    """Label permutation for a left/right flip (index 0 = background)."""
    perm = list(range(len(rois) + 1))
    for a, b in LR_PAIRS:
        if a in rois and b in rois:
            ia, ib = rois.index(a) + 1, rois.index(b) + 1
            perm[ia], perm[ib] = ib, ia
    return perm
