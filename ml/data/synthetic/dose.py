"""An IMRT-like head-and-neck plan dose for the synthetic studies.

``hn_dose`` builds it from the target masks (prescription to PTV70, 0.8 of it to PTV56, a
low-dose bath, a central hot spot, smoothed and confined to the body, normalised so that the
median PTV70 dose is 1.02 x prescription). ``plan_dose`` computes it on the CT grid over the
box around the body that the dose grid spans and samples it at every other CT voxel centre (the
dose grid nodes), so the returned values are exact on the dose grid, then quantises it as the RT
Dose file stores it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ml.data.dicom.writers import DOSE_GRID_SCALING, quantise_dose
from ml.data.synthetic.grid import CTGrid

__all__ = ["DoseBox", "PlanDose", "dose_box", "hn_dose", "plan_dose", "sigmoid_falloff"]


def sigmoid_falloff(d_mm: np.ndarray, d50: float, width: float) -> np.ndarray:
    """A logistic fall-off with distance ``d_mm`` (50 % at ``d50``), normalised to 1 at 0 mm."""
    f = 1.0 / (1.0 + np.exp((d_mm - d50) / width))
    return f / (1.0 / (1.0 + math.exp(-d50 / width)))


def hn_dose(
    body: np.ndarray,
    ptv70: np.ndarray,
    ptv56: np.ndarray,
    spacing_zyx: tuple[float, float, float],
    rx: float,
) -> np.ndarray:
    """An IMRT-like H&N dose on a grid: Rx to PTV70, 0.8 Rx to PTV56, a low-dose bath."""
    if not ptv70.any():
        raise ValueError("PTV70 does not intersect the dose grid; enlarge the field of view")
    d70 = ndimage.distance_transform_edt(~ptv70, sampling=spacing_zyx)
    depth70 = ndimage.distance_transform_edt(ptv70, sampling=spacing_zyx)
    elective = ptv56 | ptv70
    d56 = ndimage.distance_transform_edt(~elective, sampling=spacing_zyx) if elective.any() else d70
    high = rx * sigmoid_falloff(d70, 7.5, 1.3)
    mid = 0.8 * rx * sigmoid_falloff(d56, 7.5, 1.3)
    bath = rx * (0.04 + 0.32 * np.exp(-d56 / 22.0))
    dose = np.maximum(np.maximum(high, mid), bath)
    dose += rx * 0.08 * np.clip(depth70 / 10.0, 0.0, 1.0)  # central hot spot
    dose = np.where(body, dose, 0.0)
    sigma = [2.5 / s for s in spacing_zyx]
    dose = ndimage.gaussian_filter(dose, sigma=sigma, mode="constant")
    dose = np.where(body, dose, 0.0)
    # normalise so that the median dose in PTV70 is 1.02 Rx
    dose *= 1.02 * rx / float(np.median(dose[ptv70]))
    return dose


@dataclass(frozen=True)
class DoseBox:
    """The dose grid as a sub-grid of the CT: every ``step``-th CT voxel from row ``j0``, column ``i0``."""

    i0: int
    j0: int
    nrow: int
    ncol: int
    step: int

    def ct_slices(self) -> tuple[slice, slice, slice]:
        """The CT ``[z, y, x]`` box the dose grid spans (its corner nodes included)."""
        return (
            slice(None),
            slice(self.j0, self.j0 + self.step * (self.nrow - 1) + 1),
            slice(self.i0, self.i0 + self.step * (self.ncol - 1) + 1),
        )


def dose_box(body: np.ndarray, matrix: int, step: int = 2) -> DoseBox:
    """The in-plane box around the body, with a margin of two dose voxels, clipped to the CT."""
    if not body.any():
        raise ValueError("BODY is empty on this grid")
    jj, ii = np.nonzero(body.any(axis=0))
    margin = 2 * step
    i0 = max(0, int(ii.min()) - margin)
    j0 = max(0, int(jj.min()) - margin)
    ncol = (min(matrix - 1, int(ii.max()) + margin) - i0) // step + 1
    nrow = (min(matrix - 1, int(jj.max()) + margin) - j0) // step + 1
    return DoseBox(i0=i0, j0=j0, nrow=nrow, ncol=ncol, step=step)


@dataclass
class PlanDose:
    stored: np.ndarray  # the RT Dose pixel values [z, y, x]
    gy: np.ndarray  # float64 [z, y, x]: what ``stored`` decodes to
    origin: tuple[float, float, float]  # (x, y, z) of the first node, mm
    spacing: tuple[float, float, float]  # (x, y, z), mm


def plan_dose(masks: dict[str, np.ndarray], grid: CTGrid, prescription_gy: float) -> PlanDose:
    """The plan dose of the ROI ``masks`` on its dose grid (every other CT voxel), quantised."""
    box = dose_box(masks["BODY"], grid.matrix)
    ct_box = box.ct_slices()
    ps, st = grid.pixel_spacing, grid.slice_thickness
    fine = hn_dose(masks["BODY"][ct_box], masks["PTV70"][ct_box], masks["PTV56"][ct_box], (st, ps, ps), prescription_gy)
    dose = fine[:, :: box.step, :: box.step]
    stored, gy = quantise_dose(dose, DOSE_GRID_SCALING)
    dps = box.step * ps
    return PlanDose(
        stored=stored,
        gy=gy,
        origin=(float(grid.xs[box.i0]), float(grid.ys[box.j0]), float(grid.zs[0])),
        spacing=(dps, dps, st),
    )
