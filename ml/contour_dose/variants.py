"""The contour + dose family's variants (seed 002, spec §B.2-B.6) and their input channels.

================  ==========  ===================================  ======================
variant           arch        input channels                       outputs
================  ==========  ===================================  ======================
dose-only         U-Net       CT                                   dose (the "Baseline")
contour-only      U-Net       CT                                   4 ROI labels ("DL-Baseline")
seq-human         U-Net       CT + 4 clinical ROI masks            dose
seq-automated     U-Net       CT + 4 contour-only predicted masks  dose
multi-automated   CTAN        CT                                   dose + 4 ROI labels
product           CTAN        3 CT slices (2.5D) + soft-tissue     dose + 7 OAR labels
                              window + PTV dose map (Rx/70 inside
                              each PTV) + pdm
================  ==========  ===================================  ======================

The paper's ROIs are Brainstem, SpinalCord, LeftParotid, RightParotid (overlaps resolved by
that priority order when building the label map); the product model contours all 7 OpenKBP
OARs. Dose is normalised by 70 Gy; CT HU are clipped to ``HU_CLIP`` before z-scoring (the wide
window, channel ``ct`` / ``ct3``). ``ct_soft`` is the centre slice in a soft-tissue window
(``SOFT_WINDOW``: W400 / L40, HU clipped to [-160, 240] and scaled to [-1, 1]), where the small
soft-tissue organs (Brainstem, Esophagus, Larynx) have the contrast the wide window compresses.

Each variant also names its training defaults (``TRAIN_DEFAULTS``, used where ``TrainConfig``
leaves a field at ``None``): the paper's variants keep the seed's plain combo loss and uniform
slice sampling (the comparison is theirs); the product model oversamples slices holding the
small/rare OARs (``RARE_ROIS``) and weights the CE by inverse square-root class frequency.
A model directory's ``config.json`` records the inputs it was trained with, and every function
here takes them (``inputs=``) so an older model keeps working after a variant's default changes.
"""

from __future__ import annotations

__all__ = [
    "DOSE_NORM_GY",
    "HU_CLIP",
    "INPUT_CHANNELS",
    "LR_PAIRS",
    "MODEL_NAMES",
    "PAPER_ROIS",
    "PRODUCT_ROIS",
    "RARE_ROIS",
    "SOFT_WINDOW",
    "TRAIN_DEFAULTS",
    "VARIANTS",
    "in_channels",
    "input_names",
    "lr_swap_index",
    "mask_channel_slices",
]

DOSE_NORM_GY = 70.0
HU_CLIP = (-1024.0, 1500.0)
PAPER_ROIS = ("Brainstem", "SpinalCord", "LeftParotid", "RightParotid")
PRODUCT_ROIS = ("SpinalCord", "Brainstem", "Mandible", "Larynx", "Esophagus", "LeftParotid", "RightParotid")
LR_PAIRS = (("LeftParotid", "RightParotid"),)
SOFT_WINDOW = (40.0, 400.0)  # level, width (HU)
RARE_ROIS = ("Brainstem", "Esophagus", "SpinalCord")  # small or rarely annotated: oversampled (product)

VARIANTS: dict[str, dict] = {
    "dose-only": {"arch": "unet", "inputs": ("ct",), "tasks": ("dose",), "rois": PAPER_ROIS},
    "contour-only": {"arch": "unet", "inputs": ("ct",), "tasks": ("contour",), "rois": PAPER_ROIS},
    "seq-human": {"arch": "unet", "inputs": ("ct", "gt_masks"), "tasks": ("dose",), "rois": PAPER_ROIS},
    "seq-automated": {"arch": "unet", "inputs": ("ct", "pred_masks"), "tasks": ("dose",), "rois": PAPER_ROIS},
    "multi-automated": {"arch": "ctan", "inputs": ("ct",), "tasks": ("dose", "contour"), "rois": PAPER_ROIS},
    "product": {
        "arch": "ctan",
        "inputs": ("ct3", "ct_soft", "ptv", "pdm"),
        "tasks": ("dose", "contour"),
        "rois": PRODUCT_ROIS,
    },
}
#: training defaults per variant (``TrainConfig`` fields left at None): the seed's variants keep
#: the paper's recipe, the product model gets the rare/small-organ options
_PAPER_DEFAULTS = {"oversample_rois": (), "oversample_rate": 0.0, "class_weights": "none"}
TRAIN_DEFAULTS: dict[str, dict] = {
    **{v: dict(_PAPER_DEFAULTS) for v in VARIANTS if v != "product"},
    "product": {"oversample_rois": RARE_ROIS, "oversample_rate": 0.1, "class_weights": "inv_sqrt_freq"},
}
#: channels of each input name ("gt_masks" / "pred_masks": one per ROI)
INPUT_CHANNELS = {"ct": 1, "ct3": 3, "ct_soft": 1, "ptv": 1, "pdm": 1}
MASK_INPUTS = ("gt_masks", "pred_masks", "ptv", "pdm")
MODEL_NAMES = {
    "dose-only": "Baseline",
    "contour-only": "DL-Baseline",
    "seq-human": "Seq-Human",
    "seq-automated": "Seq-Automated",
    "multi-automated": "Multi-Automated",
    "product": "Product",
}


def input_names(variant: str, inputs: tuple[str, ...] | list[str] | None = None) -> tuple[str, ...]:
    """The input names of a model: ``inputs`` when given (a model's ``config.json``), else the variant's."""
    return tuple(inputs) if inputs is not None else tuple(VARIANTS[variant]["inputs"])


def in_channels(variant: str, inputs: tuple[str, ...] | None = None) -> int:
    k = len(VARIANTS[variant]["rois"])
    return sum(INPUT_CHANNELS.get(name, k) for name in input_names(variant, inputs))


def mask_channel_slices(variant: str, inputs: tuple[str, ...] | None = None) -> list[tuple[int, int]]:
    """(start, stop) of the input channels holding ROI masks (nearest-neighbour when augmenting)."""
    k = len(VARIANTS[variant]["rois"])
    out, c = [], 0
    for name in input_names(variant, inputs):
        w = INPUT_CHANNELS.get(name, k)
        if name in MASK_INPUTS:
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
