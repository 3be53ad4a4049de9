"""A seeded head-and-neck phantom: ROI polygons and tissue HU per axial slice.

The anatomy is defined in mm in a canonical 240 mm x 240 mm x 192 mm box centred on 0 (head
first supine, DICOM LPS: x to the patient's left, y posterior, z superior) and is shrunk, never
stretched, to fit smaller fields of view. The seed sets the patient's build, set-up offset, the
laterality and size of the primary target (PTV70), the nodal targets (PTV56) and the organs'
positions. ``rasterise`` samples it on a CT grid; ``simulate_scan`` adds the scanner's blur and
noise and quantises to what the CT files store.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ml.data.synthetic.geometry import (
    capped_width,
    ellipse_mask,
    ellipse_polygon,
    ellipsoid_section,
    horseshoe_polygon,
    polygons_mask,
    round_polygon,
    smooth_lerp,
)
from ml.data.synthetic.grid import CTGrid

__all__ = ["CANON_FOV_XY_MM", "CANON_FOV_Z_MM", "ROI_NAMES", "HNPhantom", "PhantomSlices", "rasterise", "simulate_scan"]

ROI_NAMES: tuple[str, ...] = (
    "BODY",
    "PTV70",
    "PTV56",
    "Brainstem",
    "SpinalCord",
    "Parotid_L",
    "Parotid_R",
    "Mandible",
)
CANON_FOV_XY_MM = 240.0  # the canonical anatomy fits a 240 mm square field of view
CANON_FOV_Z_MM = 192.0  # ... and 192 mm of scan length
MIN_SEMI_AXIS_MM = 1.5  # cross-sections smaller than this are not contoured


class HNPhantom:
    """A seeded head-and-neck phantom: ``roi_polygons(z)`` gives ROI polygons, ``paint_slice`` HU.

    ``sxy`` and ``sz`` (<= 1) shrink the canonical anatomy in-plane and along z.
    """

    def __init__(self, seed: int, sxy: float, sz: float) -> None:
        rng = np.random.default_rng([int(seed), 0xA7A7])
        self.sxy, self.sz = sxy, sz
        self.size = float(rng.uniform(0.93, 1.07))  # patient build
        self.ap = float(rng.uniform(0.95, 1.05))  # relative AP depth
        self.dx = float(rng.uniform(-6.0, 6.0))  # set-up offset on the couch
        self.dy = float(rng.uniform(-5.0, 5.0))
        self.side = 1.0 if rng.random() < 0.5 else -1.0  # PTV70 laterality (+1: patient left)
        self.bilateral = bool(rng.random() < 0.6)
        self.ptv70_params = (
            self.side * float(rng.uniform(10.0, 20.0)),  # x
            float(rng.uniform(-20.0, -8.0)),  # y
            float(rng.uniform(-18.0, 4.0)),  # z
            float(rng.uniform(13.0, 22.0)),  # semi-axes a, b, c
            float(rng.uniform(11.0, 17.0)),
            float(rng.uniform(15.0, 25.0)),
        )
        self.node_x = float(rng.uniform(26.0, 32.0))
        self.node_y = float(rng.uniform(-8.0, 0.0))
        self.node_z = (float(rng.uniform(-80.0, -72.0)), float(rng.uniform(-6.0, 2.0)))
        self.node_ab = (float(rng.uniform(11.0, 14.0)), float(rng.uniform(14.0, 18.0)))
        self.parotid_scale = (float(rng.uniform(0.85, 1.15)), float(rng.uniform(0.85, 1.15)))
        self.parotid_z = float(rng.uniform(4.0, 12.0))
        self.mandible_z = float(rng.uniform(-24.0, -18.0))
        self.vertex_z = float(rng.uniform(84.0, 92.0))
        self.disc_phase = float(rng.uniform(0.0, 18.0))
        self.noise_sd = float(rng.uniform(10.0, 20.0))
        self.hu_jitter = rng.uniform(-6.0, 6.0, size=8)

    @classmethod
    def for_grid(cls, seed: int, grid: CTGrid) -> HNPhantom:
        """The phantom of ``seed`` shrunk to fit the field of view of ``grid``."""
        sxy = min(1.0, grid.matrix * grid.pixel_spacing / CANON_FOV_XY_MM)
        sz = min(1.0, grid.n_slices * grid.slice_thickness / CANON_FOV_Z_MM)
        return cls(seed, sxy, sz)

    # -- coordinate maps: canonical mm -> world mm --------------------------------------
    def _x(self, x: float) -> float:
        return self.dx + self.sxy * self.size * x

    def _y(self, y: float) -> float:
        return self.dy + self.sxy * self.size * self.ap * y

    def _a(self, a: float) -> float:
        return self.sxy * self.size * a

    def _b(self, b: float) -> float:
        return self.sxy * self.size * self.ap * b

    def _zc(self, z_world: float) -> float:
        return z_world / self.sz

    # -- shapes at canonical z (return world (cx, cy, a, b) or None) ---------------------
    def body(self, zc: float) -> tuple[float, float, float, float] | None:
        top = self.vertex_z
        if zc >= top:
            return None
        if zc >= 28.0:
            f = capped_width(zc, -1e9, top, 0.0, top - 28.0)
            a, b, cy = 74.0 * f, 92.0 * f, 0.0
        elif zc >= -20.0:
            a, b, cy = smooth_lerp(zc, -20, 28, 66, 74), smooth_lerp(zc, -20, 28, 80, 92), 0.0
        else:
            a, b = smooth_lerp(zc, -96, -20, 56, 66), smooth_lerp(zc, -96, -20, 62, 80)
            cy = smooth_lerp(zc, -96, -20, 6, 0)
        if min(a, b) < 2.0:
            return None
        return self._x(0.0), self._y(cy), self._a(a), self._b(b)

    def fat_mm(self, zc: float) -> float:
        return 3.0 if zc >= 25.0 else 8.0

    def brainstem(self, zc: float):
        f = capped_width(zc, 8.0, 48.0, 0.0, 10.0)
        if f <= 0:
            return None
        return self._x(0.0), self._y(28.0), self._a(13.0 * f), self._b(11.0 * f)

    def cord(self, zc: float):
        if not -1e9 <= zc < 8.0:
            return None
        return self._x(0.0), self._y(smooth_lerp(zc, -20, 8, 36, 30)), self._a(5.5), self._b(5.0)

    def parotid(self, zc: float, side: float):
        k = self.parotid_scale[0 if side > 0 else 1]
        f = ellipsoid_section(zc, self.parotid_z, 17.0 * k)
        if f <= 0:
            return None
        return self._x(side * 40.0), self._y(14.0), self._a(11.0 * k * f), self._b(16.0 * k * f)

    def mandible(self, zc: float):
        lo, hi = self.mandible_z, self.mandible_z + 22.0
        if not lo <= zc < hi:
            return None
        w = smooth_lerp(zc, lo, hi, 0.94, 1.0)  # the arch widens superiorly a little
        return (
            self._x(0.0),
            self._y(-12.0),
            self._a(50.0 * w),
            self._b(55.0),
            self._a(40.0 * w),
            self._b(45.0),
        )

    def ptv70(self, zc: float):
        x, y, z, a, b, c = self.ptv70_params
        f = ellipsoid_section(zc, z, c)
        if f <= 0:
            return None
        return self._x(x), self._y(y), self._a(a * f), self._b(b * f)

    def nodes(self, zc: float) -> list[tuple[float, float, float, float]]:
        lo, hi = self.node_z
        f = ellipsoid_section(zc, 0.5 * (lo + hi), 0.5 * (hi - lo))
        if f <= 0:
            return []
        sides = (-1.0, 1.0) if self.bilateral else (self.side,)
        a, b = self.node_ab
        return [(self._x(s * self.node_x), self._y(self.node_y), self._a(a * f), self._b(b * f)) for s in sides]

    def airway(self, zc: float):
        f = capped_width(zc, -1e9, 18.0, 0.0, 8.0)
        if f <= 0:
            return None
        cy = smooth_lerp(zc, -45, 0, -28, -8)
        a, b = smooth_lerp(zc, -45, 0, 9, 15), smooth_lerp(zc, -45, 0, 7, 9)
        return self._x(0.0), self._y(cy), self._a(a * f), self._b(b * f)

    def vertebra(self, zc: float):
        """(vertebral body, posterior arch, canal) ellipses below the skull base."""
        if zc >= 5.0:
            return None
        return (
            (self._x(0.0), self._y(18.0), self._a(16.0), self._b(12.0)),
            (self._x(0.0), self._y(smooth_lerp(zc, -20, 8, 38, 32)), self._a(15.0), self._b(13.0)),
            (self._x(0.0), self._y(smooth_lerp(zc, -20, 8, 36, 30)), self._a(8.0), self._b(7.5)),
        )

    # -- ROI polygons on one slice ------------------------------------------------------
    def roi_polygons(self, z_world: float) -> dict[str, list[np.ndarray]]:
        zc = self._zc(z_world)
        out: dict[str, list[np.ndarray]] = {n: [] for n in ROI_NAMES}

        def ell(name: str, e) -> None:
            if e is not None and min(e[2], e[3]) >= MIN_SEMI_AXIS_MM:
                out[name].append(round_polygon(ellipse_polygon(*e)))

        ell("BODY", self.body(zc))
        ell("PTV70", self.ptv70(zc))
        for e in self.nodes(zc):
            ell("PTV56", e)
        ell("Brainstem", self.brainstem(zc))
        ell("SpinalCord", self.cord(zc))
        ell("Parotid_L", self.parotid(zc, +1.0))
        ell("Parotid_R", self.parotid(zc, -1.0))
        m = self.mandible(zc)
        if m is not None:
            out["Mandible"].append(round_polygon(horseshoe_polygon(*m, ext=0.15)))
        return out

    # -- HU on one slice ----------------------------------------------------------------
    def paint_slice(self, z_world: float, X: np.ndarray, Y: np.ndarray, roi_masks: dict[str, np.ndarray]) -> np.ndarray:
        """HU at the voxel centres ``(X, Y)`` of the slice at ``z_world``, given its ROI masks."""
        zc = self._zc(z_world)
        j = self.hu_jitter
        hu = np.full(X.shape, -1000.0)
        body = self.body(zc)
        if body is None:
            return hu
        inner = self._paint_soft_tissue(hu, zc, X, Y, body, roi_masks["BODY"])
        hu[roi_masks["Parotid_L"] | roi_masks["Parotid_R"]] = 5.0 + j[4]
        hu[roi_masks["Brainstem"]] = 38.0
        self._paint_spine(hu, zc, X, Y)
        hu[roi_masks["SpinalCord"]] = 35.0
        hu[roi_masks["Mandible"]] = 1000.0 + 3 * j[6]
        aw = self.airway(zc)
        if aw is not None:
            hu[ellipse_mask(X, Y, *aw) & inner] = -1000.0
        return hu

    def _paint_soft_tissue(
        self,
        hu: np.ndarray,
        zc: float,
        X: np.ndarray,
        Y: np.ndarray,
        body: tuple[float, float, float, float],
        body_mask: np.ndarray,
    ) -> np.ndarray:
        """Fat, muscle and (in the cranium) skull and brain; returns the mask inside the fat layer."""
        j = self.hu_jitter
        cx, cy, a, b = body
        hu[body_mask] = -100.0 + j[0]  # subcutaneous fat
        fat = self.fat_mm(zc)
        inner = ellipse_mask(X, Y, cx, cy, a - fat, b - fat) & body_mask
        hu[inner] = 40.0 + j[1]  # muscle / soft tissue
        if zc >= 25.0:  # cranium: skull ring and brain
            skull = ellipse_mask(X, Y, cx, cy, a - fat - 1.0, b - fat - 1.0) & inner
            brain = ellipse_mask(X, Y, cx, cy, a - fat - 8.0, b - fat - 8.0) & inner
            hu[skull] = 1100.0 + 3 * j[2]
            hu[brain] = 30.0 + j[3] / 2
        return inner

    def _paint_spine(self, hu: np.ndarray, zc: float, X: np.ndarray, Y: np.ndarray) -> None:
        """Vertebral body (or intervertebral disc), posterior arch and spinal canal."""
        v = self.vertebra(zc)
        if v is None:
            return
        j = self.hu_jitter
        vb, arch, canal = v
        disc = ((zc - self.disc_phase) % 18.0) < 4.0
        body_m = ellipse_mask(X, Y, *vb)
        arch_m = ellipse_mask(X, Y, *arch)
        canal_m = ellipse_mask(X, Y, *canal)
        hu[arch_m] = 700.0 + 3 * j[5]
        hu[body_m] = 90.0 if disc else 700.0 + 3 * j[5]
        hu[canal_m] = 15.0


@dataclass
class PhantomSlices:
    """The phantom sampled on a CT grid."""

    polygons: dict[str, list[list[np.ndarray]]]  # ROI -> slice k -> polygons (as written)
    masks: dict[str, np.ndarray]  # bool [z, y, x]: voxel centres inside the polygons
    hu: np.ndarray  # float64 [z, y, x], noiseless


def rasterise(phantom: HNPhantom, grid: CTGrid) -> PhantomSlices:
    """ROI polygons, their masks (point-in-polygon at voxel centres) and the HU of every slice."""
    matrix = grid.matrix
    polygons: dict[str, list[list[np.ndarray]]] = {n: [] for n in ROI_NAMES}
    masks = {n: np.zeros(grid.shape, dtype=bool) for n in ROI_NAMES}
    hu = np.empty(grid.shape, dtype=np.float64)
    X, Y = np.meshgrid(grid.xs, grid.ys)  # [y, x]
    for k, z in enumerate(grid.zs):
        polys = phantom.roi_polygons(float(z))
        slice_masks = {}
        for name in ROI_NAMES:
            polygons[name].append(polys[name])
            m = polygons_mask(polys[name], grid.xs, grid.ys) if polys[name] else np.zeros((matrix, matrix), bool)
            masks[name][k] = m
            slice_masks[name] = m
        hu[k] = phantom.paint_slice(float(z), X, Y, slice_masks)
    return PhantomSlices(polygons=polygons, masks=masks, hu=hu)


def simulate_scan(hu: np.ndarray, grid: CTGrid, noise_sd: float, seed: int) -> np.ndarray:
    """Partial-volume blur, seeded quantum noise, then the stored values (int16, HU + 1024)."""
    ps, st = grid.pixel_spacing, grid.slice_thickness
    hu = ndimage.gaussian_filter(hu, sigma=(0.4 / st, 0.8 / ps, 0.8 / ps), mode="nearest")
    nrng = np.random.default_rng([seed, 0x0015E])
    hu += nrng.normal(0.0, noise_sd, size=hu.shape)
    return np.clip(np.rint(hu + 1024.0), 0, 4095).astype(np.int16)
