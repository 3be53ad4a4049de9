"""The axial CT grid of a synthetic study, centred on the origin.

Voxel centres are ``xs`` (columns), ``ys`` (rows, equal to ``xs``) and ``zs`` (slices, in order
of increasing z); ``z_strings`` are the slice positions exactly as the files write them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ml.data.synthetic.geometry import ds_mm

__all__ = ["CTGrid", "ct_grid"]


@dataclass(frozen=True)
class CTGrid:
    matrix: int
    n_slices: int
    pixel_spacing: float  # mm, rows and columns
    slice_thickness: float  # mm
    x0: float  # first column (and row) centre, mm
    xs: np.ndarray
    ys: np.ndarray
    zs: np.ndarray
    z_strings: list[str]

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.n_slices, self.matrix, self.matrix)

    @property
    def origin(self) -> tuple[float, float, float]:
        return (self.x0, self.x0, float(self.zs[0]))

    @property
    def spacing(self) -> tuple[float, float, float]:
        return (self.pixel_spacing, self.pixel_spacing, self.slice_thickness)


def ct_grid(matrix: int, pixel_spacing_mm: float, n_slices: int, slice_thickness_mm: float) -> CTGrid:
    """The grid centred on 0, with its corner coordinates rounded as the files will state them."""
    ps, st = float(pixel_spacing_mm), float(slice_thickness_mm)
    x0 = float(ds_mm(-(matrix - 1) / 2.0 * ps))
    z0 = float(ds_mm(-(n_slices - 1) / 2.0 * st))
    xs = x0 + ps * np.arange(matrix)
    z_strings = [ds_mm(z0 + k * st) for k in range(n_slices)]
    zs = np.array([float(s) for s in z_strings])
    return CTGrid(
        matrix=matrix,
        n_slices=n_slices,
        pixel_spacing=ps,
        slice_thickness=st,
        x0=x0,
        xs=xs,
        ys=xs.copy(),
        zs=zs,
        z_strings=z_strings,
    )
