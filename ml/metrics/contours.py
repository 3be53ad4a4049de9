"""Contour agreement: Dice and surface-distance metrics (Hausdorff, HD95) in mm on boolean masks.

Definitions:

* **Dice** = ``2 |A ∩ B| / (|A| + |B|)``. It is NaN when both masks are empty.
* **Surface** of a mask = the mask voxels with at least one 6-neighbour (face neighbour) outside
  the mask. Voxels outside the array count as outside, so mask voxels on the array border are
  surface. This is what ``mask XOR binary_erosion(mask)`` gives, as MONAI's ``get_mask_edges``
  computes it.
* **Directed surface distances** A→B: for each surface voxel of A, the Euclidean distance in mm
  to the nearest surface voxel of B. The distance comes from
  ``scipy.ndimage.distance_transform_edt(~surface_B, sampling=spacing)``.
* **Hausdorff at percentile p**, symmetric. Two reductions are offered:
  - ``"max"`` (default) = ``max(P_p(d_AB), P_p(d_BA))``. This is MONAI's
    ``compute_hausdorff_distance(percentile=p, directed=False)``, and the DeepMind
    ``surface-distance`` package's robust Hausdorff distance works the same way.
  - ``"pooled"`` = ``P_p(concat(d_AB, d_BA))``, the percentile of the union of both directed
    sets. This is medpy's ``hd95``.
  - At p = 100 both give the classic symmetric Hausdorff distance.
  - ``"directed"`` returns ``P_p(d_AB)`` only.

Empty masks:

* Both empty: Hausdorff is NaN. There is nothing to compare.
* Exactly one empty: Hausdorff is ``inf``. A missed or hallucinated structure is a failure that a
  finite number would hide.
* :func:`surface_distances` returns an ``inf`` array for the non-empty side and an empty array
  for the empty side.
* Means over patients should use ``nanmean`` and report how many values were infinite.

``spacing`` is the voxel size in mm per array axis, in the array's axis order:
``(dz, dy, dx)`` for canonical ``[z, y, x]`` arrays, and ``voxel_dimensions`` for arrays in
OpenKBP axes. The distance transform runs on the bounding box of both surfaces only. This gives
the same distances, because every source and target voxel lies inside that box, and it is much
faster on 128³ grids.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

__all__ = ["dice", "hausdorff", "hd95", "surface", "surface_distances"]

Reduction = Literal["max", "pooled", "directed"]


def _as_bool(a: np.ndarray) -> np.ndarray:
    return np.asarray(a).astype(bool, copy=False)


def _check_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = _as_bool(a), _as_bool(b)
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    return a, b


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient ``2|A∩B| / (|A|+|B|)``. NaN when both masks are empty."""
    a, b = _check_pair(a, b)
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    if total == 0:
        return float("nan")
    return 2.0 * int(np.count_nonzero(a & b)) / total


def surface(mask: np.ndarray) -> np.ndarray:
    """Surface voxels: mask voxels with a 6-neighbour outside the mask or outside the array."""
    m = _as_bool(mask)
    padded = np.pad(m, 1, constant_values=False)
    interior = m.copy()
    centre = tuple(slice(1, -1) for _ in range(m.ndim))
    for axis in range(m.ndim):
        for shift in (0, 2):  # neighbour at -1 and +1 along axis
            sl = list(centre)
            sl[axis] = slice(shift, shift + m.shape[axis])
            interior &= padded[tuple(sl)]
    return m & ~interior


def _bbox(mask: np.ndarray) -> tuple[slice, ...]:
    """Bounding box (as slices) of the True voxels of a non-empty mask."""
    out = []
    for axis in range(mask.ndim):
        other = tuple(i for i in range(mask.ndim) if i != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        out.append(slice(int(idx[0]), int(idx[-1]) + 1))
    return tuple(out)


def _spacing(spacing: Sequence[float] | float, ndim: int) -> tuple[float, ...]:
    sp = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (ndim,))
    if np.any(~np.isfinite(sp)) or np.any(sp <= 0):
        raise ValueError(f"spacing must be positive, got {spacing}")
    return tuple(float(s) for s in sp)


def surface_distances(
    a: np.ndarray, b: np.ndarray, spacing: Sequence[float] | float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances in mm: ``(d_AB, d_BA)``.

    ``d_AB[i]`` is the distance from the i-th surface voxel of A (C order) to the nearest surface
    voxel of B. When B is empty, ``d_AB`` is all ``inf``. When A is empty, ``d_AB`` is empty.
    """
    from scipy.ndimage import distance_transform_edt  # lazy: keep the module import light

    a, b = _check_pair(a, b)
    sp = _spacing(spacing, a.ndim)
    sa, sb = surface(a), surface(b)
    na, nb = int(np.count_nonzero(sa)), int(np.count_nonzero(sb))
    if na == 0 or nb == 0:
        # one side empty: distances from the other side are inf, the empty side has none
        return np.full(na, np.inf), np.full(nb, np.inf)
    box = _bbox(sa | sb)
    sa, sb = sa[box], sb[box]
    d_ab = distance_transform_edt(~sb, sampling=sp)[sa]
    d_ba = distance_transform_edt(~sa, sampling=sp)[sb]
    return d_ab, d_ba


def hausdorff(
    a: np.ndarray,
    b: np.ndarray,
    spacing: Sequence[float] | float = 1.0,
    percentile: float = 100.0,
    reduction: Reduction = "max",
) -> float:
    """Symmetric percentile Hausdorff distance in mm between the surfaces of A and B.

    The ``reduction`` options are ``"max"`` (MONAI), ``"pooled"`` (medpy) and ``"directed"``
    (A→B only); the module docstring defines them. Both masks empty gives NaN. Exactly one empty
    gives ``inf``.
    """
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}")
    a, b = _check_pair(a, b)
    has_a, has_b = bool(a.any()), bool(b.any())
    if not has_a and not has_b:
        return float("nan")
    if not (has_a and has_b):
        return float("inf")
    d_ab, d_ba = surface_distances(a, b, spacing)
    if reduction == "max":
        return float(max(np.percentile(d_ab, percentile), np.percentile(d_ba, percentile)))
    if reduction == "pooled":
        return float(np.percentile(np.concatenate([d_ab, d_ba]), percentile))
    if reduction == "directed":
        return float(np.percentile(d_ab, percentile))
    raise ValueError(f"unknown reduction {reduction!r}")


def hd95(a: np.ndarray, b: np.ndarray, spacing: Sequence[float] | float = 1.0, reduction: Reduction = "max") -> float:
    """95th-percentile symmetric Hausdorff distance in mm (``hausdorff(..., percentile=95)``)."""
    return hausdorff(a, b, spacing, percentile=95.0, reduction=reduction)
