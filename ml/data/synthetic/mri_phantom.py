"""A brain glioma phantom in world millimetres and its appearance in four MR sequences.

Brain (white/grey matter), ventricles and a spherical lesion with necrotic core, enhancing rim
and oedema, sampled per sequence with textbook relative contrasts (``CONTRAST``) and seeded
noise; ``label_map`` gives the BraTS 2023 labels (1 necrosis, 2 oedema, 3 enhancing).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["CONTRAST", "Lesion", "draw_lesion", "label_map", "sequence_image", "tissues"]

# tissue -> relative intensity per sequence (WM, GM, CSF, oedema, rim, core)
CONTRAST = {
    "t1": (0.85, 0.60, 0.20, 0.45, 0.55, 0.25),
    "t1c": (0.85, 0.60, 0.20, 0.45, 1.00, 0.25),
    "t2": (0.35, 0.55, 1.00, 0.85, 0.60, 0.90),
    "flair": (0.40, 0.60, 0.08, 0.95, 0.65, 0.55),
}


@dataclass(frozen=True)
class Lesion:
    x: float  # centre, mm
    y: float
    z: float
    radius: float  # of the enhancing rim, mm


def draw_lesion(rng: np.random.Generator) -> Lesion:
    return Lesion(
        float(rng.uniform(-25, 25)), float(rng.uniform(-30, 20)), float(rng.uniform(-15, 15)), float(rng.uniform(9, 15))
    )


def tissues(X: np.ndarray, Y: np.ndarray, Z: np.ndarray, lesion: Lesion) -> dict[str, np.ndarray]:
    """Boolean tissue masks at the world coordinates ``(X, Y, Z)`` (mm)."""
    brain = (X / 70.0) ** 2 + (Y / 85.0) ** 2 + (Z / 60.0) ** 2 <= 1.0
    wm = (X / 52.0) ** 2 + (Y / 66.0) ** 2 + (Z / 44.0) ** 2 <= 1.0
    vent = ((np.abs(X) - 9.0) / 6.0) ** 2 + (Y / 22.0) ** 2 + ((Z - 5.0) / 12.0) ** 2 <= 1.0
    d = np.sqrt((X - lesion.x) ** 2 + (Y - lesion.y) ** 2 + (Z - lesion.z) ** 2)
    core = brain & (d <= 0.45 * lesion.radius)
    rim = brain & (d <= lesion.radius) & ~core
    oedema = brain & (d <= 1.9 * lesion.radius) & ~core & ~rim
    return {"brain": brain, "wm": wm & brain, "csf": vent & brain, "core": core, "rim": rim, "oedema": oedema}


def sequence_image(t: dict[str, np.ndarray], seq: str, rng: np.random.Generator) -> np.ndarray:
    """The ``seq`` image of the tissues ``t`` (0-4000, noise inside the brain)."""
    wm, gm, csf, oed, rim, core = CONTRAST[seq]
    img = np.zeros(t["brain"].shape, dtype=np.float64)
    img[t["brain"]] = gm
    img[t["wm"]] = wm
    img[t["csf"]] = csf
    img[t["oedema"]] = oed
    img[t["rim"]] = rim
    img[t["core"]] = core
    img = img * 1000.0
    img[t["brain"]] += rng.normal(0.0, 15.0, size=int(t["brain"].sum()))
    return np.clip(img, 0, 4000)


def label_map(t: dict[str, np.ndarray]) -> np.ndarray:
    """BraTS labels (uint8): 1 necrotic core, 2 oedema, 3 enhancing rim, 0 elsewhere."""
    label = np.zeros(t["brain"].shape, dtype=np.uint8)
    label[t["oedema"]] = 2
    label[t["rim"]] = 3
    label[t["core"]] = 1
    return label
