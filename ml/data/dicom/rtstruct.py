"""RT Structure Set parsing and rasterisation onto an image grid.

Rasterisation rule: a voxel belongs to an ROI when its *centre* lies inside the contour
polygon on its slice, with the even-odd rule across all contours of the ROI on that slice
(so a contour inside another is a hole, the DICOM convention most planning systems export).
Contours are assigned to the nearest slice of the reference grid and dropped when their plane
is more than half a slice away from every slice (structures outside the scanned volume).
The scan-line fill is exact and vectorised: crossings of each row of voxel centres with the
polygon edges toggle a parity array whose cumulative sum marks the inside.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ml.data.volume import Volume

__all__ = ["RoiContours", "parse_rtstruct", "rasterize_roi", "rasterize_rtstruct"]


@dataclass
class RoiContours:
    number: int
    name: str  # as stored (canonical after de-identification)
    interpreted_type: str = ""
    contours: list[np.ndarray] = field(default_factory=list)  # each (N, 3) LPS mm, CLOSED_PLANAR

    @property
    def n_points(self) -> int:
        return int(sum(len(c) for c in self.contours))


def parse_rtstruct(ds) -> list[RoiContours]:
    """ROIs with their closed planar contours (other geometric types are ignored)."""
    rois: dict[int, RoiContours] = {}
    for item in ds.get("StructureSetROISequence", []) or []:
        try:
            num = int(item.ROINumber)
        except (AttributeError, TypeError, ValueError):
            continue
        rois[num] = RoiContours(number=num, name=str(item.get("ROIName", "") or f"ROI_{num}"))
    for obs in ds.get("RTROIObservationsSequence", []) or []:
        num = obs.get("ReferencedROINumber")
        if num is not None and int(num) in rois:
            rois[int(num)].interpreted_type = str(obs.get("RTROIInterpretedType", "") or "")
    for rc in ds.get("ROIContourSequence", []) or []:
        num = rc.get("ReferencedROINumber")
        if num is None or int(num) not in rois:
            continue
        for c in rc.get("ContourSequence", []) or []:
            if str(c.get("ContourGeometricType", "")).upper() != "CLOSED_PLANAR":
                continue
            data = c.get("ContourData")
            if data is None or len(data) < 9 or len(data) % 3:
                continue
            pts = np.asarray([float(v) for v in data], dtype=float).reshape(-1, 3)
            if np.all(np.isfinite(pts)):
                rois[int(num)].contours.append(pts)
    return [rois[k] for k in sorted(rois)]


def _fill_polygon(parity: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> None:
    """Toggle ``parity[row, col]`` at the first voxel centre right of each edge crossing.

    ``xs``/``ys`` are polygon vertices in (fractional) column/row index units.
    """
    n_rows, n_cols = parity.shape[0], parity.shape[1] - 1
    x0, y0 = xs, ys
    x1, y1 = np.roll(xs, -1), np.roll(ys, -1)
    lo = max(int(np.ceil(ys.min())), 0)
    hi = min(int(np.floor(ys.max())), n_rows - 1)
    if hi < lo:
        return
    rows = np.arange(lo, hi + 1, dtype=float)[:, None]  # (R, 1)
    # half-open rule on y avoids double counting at vertices
    crosses = ((y0[None, :] <= rows) & (y1[None, :] > rows)) | ((y1[None, :] <= rows) & (y0[None, :] > rows))
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (rows - y0[None, :]) / (y1 - y0)[None, :]
    xcross = x0[None, :] + t * (x1 - x0)[None, :]
    r_idx, e_idx = np.nonzero(crosses)
    cols = np.ceil(xcross[r_idx, e_idx]).astype(np.int64)
    cols = np.clip(cols, 0, n_cols)
    np.add.at(parity, (r_idx + lo, cols), 1)


def rasterize_roi(roi: RoiContours, reference: Volume) -> np.ndarray:
    """Boolean mask [z, y, x] on the reference grid."""
    nz, ny, nx = reference.array.shape
    mask = np.zeros((nz, ny, nx), dtype=bool)
    by_slice: dict[int, list[np.ndarray]] = {}
    for pts in roi.contours:
        ijk = reference.world_to_index(pts)
        kr = round(float(np.median(ijk[:, 2])))  # nearest slice
        if kr < 0 or kr >= nz:  # more than half a slice outside the stack
            continue
        by_slice.setdefault(kr, []).append(ijk[:, :2])
    for k, polys in by_slice.items():
        parity = np.zeros((ny, nx + 1), dtype=np.int32)
        for ij in polys:
            _fill_polygon(parity, ij[:, 0], ij[:, 1])
        mask[k] = (np.cumsum(parity, axis=1)[:, :nx] % 2).astype(bool)
    return mask


def rasterize_rtstruct(ds, reference: Volume, names: list[str] | None = None) -> dict[str, np.ndarray]:
    """Masks for the ROIs whose (stored) name is in ``names`` (all ROIs when None)."""
    out: dict[str, np.ndarray] = {}
    for roi in parse_rtstruct(ds):
        if names is not None and roi.name not in names:
            continue
        if not roi.contours:
            continue
        mask = rasterize_roi(roi, reference)
        out[roi.name] = mask if roi.name not in out else (out[roi.name] | mask)
    return out
