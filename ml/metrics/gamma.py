"""Gamma index (Low 1998) on a common grid: a vectorised torch implementation, CPU or CUDA, 1-3D.

Conventions (the same as ``pymedphys.gamma`` v0.41, which the tests validate against):

* **reference** is the grid gamma is reported on: every reference point whose dose is at least
  ``lower_cutoff_percent`` % of the global normalisation gets a gamma value, every other point
  is NaN (the cutoff applies to the *reference* only);
* **evaluated** is the distribution that is searched: around each reference point, the evaluated
  dose is linearly interpolated (bilinear in 2D, trilinear in 3D) at sub-voxel positions on
  concentric shells (circles in 2D, spheres in 3D) of radius ``0, s, 2s, ...`` up to
  ``max_gamma * dta_mm``, ``s = dta_mm / interp_fraction``, each sampled with points no further
  than ``s`` apart -- exactly the shells and points of ``pymedphys.gamma`` (one shell lands on
  ``dta_mm``; beyond it the step grows as in pymedphys); positions outside the evaluated grid
  are never used (pymedphys extrapolates with ``inf``), and positions on its boundary are in or
  out as pymedphys' float64 ``coordinate + offset`` has them;
* ``gamma(r) = min over positions e of sqrt(((D_e(e) - D_r(r)) / dD)^2 + (|e - r| / dta)^2)``
  with ``dD = dose_percent % of the global normalisation`` (global gamma; the normalisation is
  ``max(reference)`` unless ``global_normalisation`` is given) or ``dose_percent % of D_r(r)``
  (local gamma). The cutoff is always relative to the global normalisation;
* gamma values above ``max_gamma`` are reported as ``max_gamma`` (pymedphys' clipping; the
  search never goes further, so larger values are unknown). ``max_gamma > 1`` is required so
  that a capped value never counts as a pass (pymedphys with ``max_gamma=1`` passes every point);
* a point passes when ``gamma <= 1``; the pass rate is the percentage of non-NaN points that
  pass.

Both arrays share one grid: same shape, ``spacing_mm`` is the voxel size per array axis
(a scalar for isotropic grids), in array-axis order (for OpenKBP ``(3.906, 3.906, 2.5)``).
Coordinates are ``index * spacing`` on both, as with pymedphys axes
``tuple(np.arange(n) * s for n, s in zip(shape, spacing))``.

Algorithm. The offsets of every shell are grouped into tiles (small boxes of voxels around the
point: the 3^ndim neighbours, the 2^ndim orthants, or, on fine grids, 2-voxel tiles). Because
both distributions share a grid, every offset has the same interpolation weights for every
reference point, so the evaluated dose at the offsets of one tile is a small matrix product: the
evaluated voxels of the tile around each point (gathered once per point) times a fixed weight
matrix (one column per offset). Shells are processed by increasing distance and a point
drops out of the active set as soon as its best gamma is no larger than the distance of the next
shell over ``dta`` (it cannot improve; pymedphys' stopping rule), so the cost follows the gamma
of each point instead of the full ball. The dose differences run in float32 with batched
matmuls (``torch.bmm``) in chunks sized to stay in cache, each point's running minimum of
gamma^2 in float64; it is deterministic (gamma agrees with pymedphys to ~1e-5). On CUDA the
matmuls run in float64 unless ``torch.get_float32_matmul_precision() == "highest"`` (TF32 would cost
~1e-3 relative dose accuracy).

Pass-rate-only calls (``gamma_pass_rate``/``gamma_pass_rates``) search only up to ``1 * dta``
and stop at the first shell where a point passes (the pass/fail outcome is identical to
thresholding ``gamma_map``).

Threads: on CPU a call is a few hundred medium-sized torch ops. Where the cores are busy with
other processes (several workers on a small machine, pytest-xdist), torch's OpenMP pool (all
cores by default) made them 10-50x slower than one thread in our measurements, while a second
thread gained ~15 % at best on a 2-core machine; so CPU calls run on ``num_threads=1`` torch thread by
default (torch's process-wide setting, restored afterwards; ``num_threads=None`` leaves it
alone). 128^3 OpenKBP at 2 %/2 mm takes ~0.15-0.3 s that way.

Only numpy and torch are imported (no pymedphys at run time).
"""

from __future__ import annotations

import math
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

__all__ = ["gamma_map", "gamma_pass_rate", "gamma_pass_rates"]

_BIG = 1e30  # "no evaluated dose here": never the minimum, and 0 * it = 0 keeps in-grid sums exact
_SNAP = 1e-7  # voxel positions this close to a voxel centre are put on it (exact node values)
# ... and if such a position lies on the grid's first or last voxel for some reference point,
# whether pymedphys counts it as inside depends on the float64 rounding of ``coordinate +
# offset`` (e.g. ``distance * cos(pi / 2)`` is a tiny non-zero number): where pymedphys finds it
# outside, the position is nudged outwards by _EDGE voxel instead. That puts a weight of _EDGE
# on the next voxel: negligible inside the grid (1e-9 relative), huge (_EDGE * _BIG) in the
# padding, so the edge points see exactly the positions that pymedphys uses.
_EDGE = 1e-9


# --------------------------------------------------------------------------------------------
# the search plan (depends only on the geometry; cached)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    """A tiling of the voxels around a point: each tile is a small box of evaluated voxels.

    Tile ``t`` (a multi-index, C order) along axis ``a`` covers the voxels at offsets
    ``origin[a] + t[a] * tile[a] ... + tile[a]`` from the point; an offset is interpolated from
    the ``2^ndim`` voxels of its cell, so it can be evaluated from any tile containing that cell.
    """

    tile: tuple[int, ...]
    origin: tuple[int, ...]
    n_tiles: tuple[int, ...]

    @property
    def groups(self) -> int:
        return int(np.prod(self.n_tiles))

    @property
    def nodes(self) -> int:
        return int(np.prod([t + 1 for t in self.tile]))


@dataclass(frozen=True)
class _Block:
    """One search shell: its offsets grouped by tile, as weights on the tiles' voxels."""

    layout: int
    groups: np.ndarray | None  # tiles of the layout used by this shell (None: all of them)
    # (G, nodes + 2, width): interpolation weights; row ``nodes`` is 1 for real offsets (it
    # multiplies the -reference column), row ``nodes + 1`` is 1 for padding columns (x _BIG)
    weights: np.ndarray
    dist_term: float  # (distance / dta)^2
    done_below: float  # a point whose gamma^2 is at or below this cannot improve further
    n_offsets: int


@dataclass(frozen=True)
class _Plan:
    pad: tuple[int, ...]  # voxels of padding per side (the reach of every layout)
    layouts: tuple[_Layout, ...]
    blocks: tuple[_Block, ...]


def _search_radii(dta_mm: float, interp_fraction: int, max_gamma: float) -> list[tuple[float, float]]:
    """(distance, sampling step) of every search shell, in mm, as ``pymedphys`` ``gamma_loop``.

    Distances grow by ``dta / interp_fraction`` (or ``distance / interp_fraction / max_gamma``
    if larger), one shell lands exactly on ``dta``, and the search stops beyond
    ``max_gamma * dta``; the same float operations are used so the shells are identical.
    """
    out = []
    distance, step = 0.0, dta_mm / interp_fraction
    force = [dta_mm]
    while distance <= dta_mm * max_gamma:
        out.append((distance, step))
        step = max(distance / interp_fraction / max_gamma, dta_mm / interp_fraction)
        distance += step
        if force and distance >= force[0]:
            distance = force.pop(0)
    return out


def _shell_points(distance: float, step: float, ndim: int) -> np.ndarray:
    """(n, ndim) offsets in mm on one shell, sampled as ``pymedphys._utilities.createshells``."""
    if ndim == 1:
        return np.array([[0.0]]) if distance == 0 else np.array([[distance], [-distance]])
    if ndim == 2:
        amount = int(np.ceil(2 * np.pi * distance / step)) + 1
        theta = np.linspace(0, 2 * np.pi, amount + 1)[:-1]
        return np.stack([distance * np.cos(theta), distance * np.sin(theta)], 1)
    rows = int(np.ceil(np.pi * distance / step)) + 1
    elevation = np.linspace(0, np.pi, rows)
    amount_in_row = np.ceil(2 * np.pi * distance * np.sin(elevation) / step).astype(int) + 1
    pts = []
    for phi, amount in zip(elevation, amount_in_row, strict=True):
        azimuth = np.linspace(0, 2 * np.pi, amount + 1)[:-1]
        pts.append(
            np.stack(
                [
                    distance * np.sin(phi) * np.cos(azimuth),
                    distance * np.sin(phi) * np.sin(azimuth),
                    distance * np.cos(phi) * np.ones_like(azimuth),
                ],
                1,
            )
        )
    return np.concatenate(pts)


def _assign_tiles(u: np.ndarray, layout: _Layout) -> np.ndarray | None:
    """Tile (flat index) of every offset, or None if some offset lies outside the layout.

    An offset on a tile boundary may use either tile: those are shared out greedily so that the
    tiles hold similar numbers of offsets (every tile is padded to the fullest one).
    """
    ndim = u.shape[1]
    tile, origin, n_tiles = (np.asarray(x) for x in (layout.tile, layout.origin, layout.n_tiles))
    v = (u - origin) / tile  # position in tile units
    if np.any(v < 0) or np.any(v > n_tiles):
        return None
    low = np.clip(np.floor(v), 0, n_tiles - 1).astype(np.int64)
    flexible = (v == np.round(v)) & (v > 0) & (v < n_tiles)  # on an inner tile boundary
    strides = np.cumprod((tuple(n_tiles[1:]) + (1,))[::-1])[::-1]
    flat = (low * strides).sum(1)
    counts = np.bincount(flat[~flexible.any(1)], minlength=layout.groups)
    for i in np.flatnonzero(flexible.any(1)):
        free = np.flatnonzero(flexible[i])
        best = None
        for bits in range(2**free.size):
            t = low[i].copy()
            for j, a in enumerate(free):
                t[a] = v[i, a] - 1 if bits >> j & 1 else v[i, a]
            g = int((t * strides).sum())
            if best is None or counts[g] < counts[best]:
                best = g
        flat[i] = best
        counts[best] += 1
    assert ndim == len(layout.tile)
    return flat


def _block_weights(u: np.ndarray, tiles: np.ndarray, layout: _Layout, groups: np.ndarray) -> np.ndarray:
    ndim = u.shape[1]
    patch_shape = tuple(t + 1 for t in layout.tile)
    node_strides = np.cumprod((patch_shape[1:] + (1,))[::-1])[::-1]
    n_nodes = layout.nodes
    members = [np.flatnonzero(tiles == g) for g in groups]
    width = max(m.size for m in members)
    w = np.zeros((len(groups), n_nodes + 2, width))
    for gi, (g, ids) in enumerate(zip(groups, members, strict=True)):
        t = np.array(np.unravel_index(g, layout.n_tiles))
        lo = np.asarray(layout.origin) + t * np.asarray(layout.tile)  # first voxel of the tile
        cols = np.arange(ids.size)
        base, frac = [], []
        for a in range(ndim):
            b = np.clip(np.floor(u[ids, a]), lo[a], lo[a] + layout.tile[a] - 1)
            frac.append(u[ids, a] - b)
            base.append((b - lo[a]).astype(np.int64))
        for corner in range(2**ndim):
            node = np.zeros(ids.size, dtype=np.int64)
            wt = np.ones(ids.size)
            for a in range(ndim):
                up = (corner >> a) & 1
                node += (base[a] + up) * node_strides[a]
                wt *= frac[a] if up else 1.0 - frac[a]
            np.add.at(w[gi], (node, cols), wt)
        w[gi, n_nodes, cols] = 1.0
        w[gi, n_nodes + 1, ids.size :] = 1.0
    return w


def _snap(p_mm: np.ndarray, spacing: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Offsets in mm -> voxels, snapped to voxel centres as described at _SNAP/_EDGE.

    pymedphys keeps a position iff ``axis[0] <= coordinate + offset <= axis[-1]`` with
    ``axis = np.arange(n) * spacing``; for an offset ``q`` voxels (up to rounding) that decides
    the reference point ``-q`` voxels from the first voxel (q <= 0) or ``q`` from the last one.
    """
    p = p_mm / spacing
    near = np.round(p)
    close = np.abs(p - near) < _SNAP
    last = np.asarray(shape, dtype=np.float64) - 1
    with np.errstate(invalid="ignore"):
        low_out = close & (near <= 0) & ((-near) * spacing + p_mm < 0)
        high_out = close & (near >= 0) & (near <= last) & ((last - near) * spacing + p_mm > last * spacing)
    p = np.where(close, near, p)
    p[low_out] -= _EDGE
    p[high_out] += _EDGE
    return p


@lru_cache(maxsize=32)
def _build_plan(
    ndim: int, dta_mm: float, interp_fraction: int, max_gamma: float, spacing: tuple[float, ...], shape: tuple[int, ...]
) -> _Plan:
    shells = _search_radii(dta_mm, interp_fraction, max_gamma)
    sp = np.asarray(spacing)
    pts = [_snap(_shell_points(d, st, ndim), sp, shape) for d, st in shells]  # offsets in voxels
    # reach per axis (snapped offsets are exact integers, or nudged just past one by _EDGE)
    k = tuple(max(1, math.ceil(max(np.abs(p[:, a]).max() for p in pts))) for a in range(ndim))
    layouts = [
        _Layout((2,) * ndim, (-1,) * ndim, (1,) * ndim),  # the 3^ndim voxels around the point
        _Layout(k, tuple(-ka for ka in k), (2,) * ndim),
    ]  # orthants
    if np.prod([ka + 1 for ka in k]) > 64:  # fine grids: smaller tiles
        tile = tuple(min(ka, 2) for ka in k)
        n = tuple(2 * math.ceil(ka / t) for ka, t in zip(k, tile, strict=True))
        layouts.append(_Layout(tile, tuple(-t * m // 2 for t, m in zip(tile, n, strict=True)), n))
    pad = tuple(
        max(max(-lay.origin[a], lay.origin[a] + lay.tile[a] * lay.n_tiles[a]) for lay in layouts) for a in range(ndim)
    )
    blocks = []
    first = 0  # layouts are opened in order (their patches are gathered on first use, then kept)
    for s, ((distance, _), u) in enumerate(zip(shells, pts, strict=True)):
        best = None
        for li, lay in enumerate(layouts):
            if li < first or (s == 0 and li > 0):
                continue
            tiles = _assign_tiles(u, lay)
            if tiles is None:
                continue
            groups = np.unique(tiles)
            width = int(np.bincount(tiles).max())
            cost = groups.size * (width + 16) * (lay.nodes + 10)
            if best is None or cost < best[0]:
                best = (cost, li, tiles, groups)
        _, li, tiles, groups = best
        first = li
        w = _block_weights(u, tiles, layouts[li], groups)
        next_d2 = (shells[s + 1][0] / dta_mm) ** 2 if s + 1 < len(shells) else math.inf
        blocks.append(
            _Block(
                layout=li,
                groups=None if groups.size == layouts[li].groups else groups,
                weights=w,
                dist_term=(distance / dta_mm) ** 2,
                done_below=next_d2,
                n_offsets=len(u),
            )
        )
    return _Plan(pad=pad, layouts=tuple(layouts), blocks=tuple(blocks))


# --------------------------------------------------------------------------------------------
# core
# --------------------------------------------------------------------------------------------


def _to_numpy(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{name} must be a numeric array")
    return arr


def _resolve_device(device, *arrays) -> torch.device:
    if device is not None:
        return torch.device(device)
    for t in arrays:
        if isinstance(t, torch.Tensor):
            return t.device
    return torch.device("cpu")


def _spacing(spacing_mm, ndim: int) -> tuple[float, ...]:
    sp = np.asarray(spacing_mm, dtype=np.float64)
    if sp.ndim == 0:
        sp = np.full(ndim, float(sp))
    if sp.shape != (ndim,):
        raise ValueError(f"spacing_mm needs 1 or {ndim} values, got {np.shape(spacing_mm)}")
    if not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise ValueError("spacing_mm must be positive")
    return tuple(float(s) for s in sp)


def _compute_dtype(device: torch.device) -> torch.dtype:
    """float32, except on CUDA when float32 matmuls may use TF32 (~1e-3 relative error)."""
    if device.type != "cuda":
        return torch.float32
    exact = torch.get_float32_matmul_precision() == "highest"
    fp32_precision = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    if fp32_precision is not None and fp32_precision not in ("ieee", "none"):
        exact = False
    return torch.float32 if exact else torch.float64


def _gather_with_torch(device: torch.device) -> bool:
    """Gather the patches with torch on the device (CUDA) or with numpy (CPU: faster there)."""
    return device.type != "cpu"


def _patches(ev_pad, coords, layout: _Layout, pad: tuple[int, ...]):
    """(n, G, nodes) evaluated voxels of every tile of ``layout`` around every point.

    ``ev_pad`` is the padded evaluated array (numpy or torch), ``coords`` the points' indices in
    the unpadded array (one index array per axis). A strided view puts, at every voxel, the tiles
    around it as extra dimensions; fancy indexing by the points' indices gathers them.
    """
    if isinstance(ev_pad, torch.Tensor):
        elem_strides = ev_pad.stride()
    else:
        elem_strides = tuple(st // ev_pad.itemsize for st in ev_pad.strides)
    shape = tuple(n - 2 * p for n, p in zip(ev_pad.shape, pad, strict=True))
    size = shape + tuple(layout.n_tiles) + tuple(t + 1 for t in layout.tile)
    stride = (
        tuple(elem_strides)
        + tuple(t * st for t, st in zip(layout.tile, elem_strides, strict=True))
        + tuple(elem_strides)
    )
    offset = sum((p + o) * st for p, o, st in zip(pad, layout.origin, elem_strides, strict=True))
    n = coords[0].shape[0]
    if isinstance(ev_pad, torch.Tensor):
        view = torch.as_strided(ev_pad, size, stride, offset)
    else:
        view = np.lib.stride_tricks.as_strided(
            ev_pad.reshape(-1)[offset:], size, tuple(st * ev_pad.itemsize for st in stride), writeable=False
        )
    return view[tuple(coords)].reshape(n, layout.groups, layout.nodes)


def _validate(reference, evaluated, spacing_mm, dose_percent, dta_mm, interp_fraction, max_gamma):
    ref = _to_numpy(reference, "reference")
    ev = _to_numpy(evaluated, "evaluated")
    if ref.shape != ev.shape:
        raise ValueError(f"reference {ref.shape} and evaluated {ev.shape} must share a grid")
    if not 1 <= ref.ndim <= 3:
        raise ValueError("gamma needs a 1D, 2D or 3D array")
    if ref.size == 0:
        raise ValueError("empty dose array")
    if not (np.all(np.isfinite(ref)) and np.all(np.isfinite(ev))):
        raise ValueError("dose arrays must be finite")
    sp = _spacing(spacing_mm, ref.ndim)
    if not (float(dose_percent) > 0 and float(dta_mm) > 0):
        raise ValueError("dose_percent and dta_mm must be positive")
    if int(interp_fraction) != interp_fraction or interp_fraction < 1:
        raise ValueError("interp_fraction must be a positive integer")
    if not (math.isfinite(float(max_gamma)) and float(max_gamma) > 1):
        raise ValueError(
            "max_gamma must be finite and > 1 (it sets the search radius max_gamma * dta; "
            "values above it are reported as max_gamma)"
        )
    return ref, ev, sp


_threads_lock = threading.Lock()
_threads_state = {"depth": 0, "saved": None}


@contextmanager
def _torch_threads(n: int | None):
    """torch's (process-wide) intra-op thread count set to ``n`` while any gamma call runs.

    Nested and concurrent calls share one setting: the first sets it, the last restores it.
    """
    if n is None:
        yield
        return
    with _threads_lock:
        if _threads_state["depth"] == 0:
            _threads_state["saved"] = torch.get_num_threads()
            torch.set_num_threads(int(n))
        _threads_state["depth"] += 1
    try:
        yield
    finally:
        with _threads_lock:
            _threads_state["depth"] -= 1
            if _threads_state["depth"] == 0:
                torch.set_num_threads(_threads_state["saved"])


def _gamma_squared(
    reference,
    evaluated,
    spacing_mm,
    dose_percent,
    dta_mm,
    lower_cutoff_percent,
    local,
    max_gamma,
    interp_fraction,
    global_normalisation,
    device,
    pass_only: bool,
    num_threads: int | None = 1,
):
    """(mask of the computed points, their best gamma^2 as float64), both numpy."""
    if num_threads is not None and (int(num_threads) != num_threads or num_threads < 1):
        raise ValueError("num_threads must be a positive integer or None")
    on_cpu = _resolve_device(device, reference, evaluated).type == "cpu"
    with _torch_threads(num_threads if on_cpu else None):
        return _gamma_squared_impl(
            reference,
            evaluated,
            spacing_mm,
            dose_percent,
            dta_mm,
            lower_cutoff_percent,
            local,
            max_gamma,
            interp_fraction,
            global_normalisation,
            device,
            pass_only,
        )


def _gamma_squared_impl(
    reference,
    evaluated,
    spacing_mm,
    dose_percent,
    dta_mm,
    lower_cutoff_percent,
    local,
    max_gamma,
    interp_fraction,
    global_normalisation,
    device,
    pass_only: bool,
):
    dev = _resolve_device(device, reference, evaluated)
    ref, ev, sp = _validate(reference, evaluated, spacing_mm, dose_percent, dta_mm, interp_fraction, max_gamma)
    dose_percent, dta_mm, interp_fraction = float(dose_percent), float(dta_mm), int(interp_fraction)
    # the cutoff as pymedphys computes it (same expression, same numpy scalar types)
    norm = ref.max() if global_normalisation is None else global_normalisation
    if not float(norm) > 0:
        raise ValueError("the global normalisation (max of the reference by default) must be positive")
    mask = ref >= lower_cutoff_percent / 100 * norm
    if local:
        mask &= ref > 0  # local gamma is undefined at zero reference dose (pymedphys: nan/inf)
    coords = np.nonzero(mask)
    n_points = int(coords[0].size)
    best_all = np.empty(n_points)
    if n_points == 0:
        return mask, best_all

    plan = _build_plan(
        ref.ndim, dta_mm, interp_fraction, 1.0 if pass_only else float(max_gamma), sp, tuple(int(n) for n in ref.shape)
    )
    dtype = _compute_dtype(dev)
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    ref_vals = ref[coords].astype(np.float64)
    inv_dd = 100.0 / (dose_percent * (ref_vals if local else np.full(n_points, float(norm))))
    # the evaluated dose in units of dD, padded with a huge value that stands for "outside the
    # grid" (local gamma: dD varies per point; NaN marks the padding until the patches are scaled)
    ev_scaled = ev.astype(np_dtype) if local else ev.astype(np_dtype) * np_dtype(inv_dd[0])
    ev_pad = np.pad(ev_scaled, [(p, p) for p in plan.pad], constant_values=np.nan if local else _BIG)
    use_torch = _gather_with_torch(dev)
    if use_torch:
        ev_pad = torch.from_numpy(ev_pad).to(dev)
    blocks = [
        (
            b.layout,
            None if b.groups is None else torch.from_numpy(b.groups).to(dev),
            torch.from_numpy(b.weights).to(dev, dtype),
            b.dist_term,
            b.done_below,
        )
        for b in plan.blocks
    ]
    last_use = {b.layout: i for i, b in enumerate(plan.blocks)}
    on_cpu = dev.type == "cpu"
    target = (1 << 20) if on_cpu else (1 << 26)  # elements of one bmm output (CPU: about L2-sized)
    # points whose patches are held at once: at most ~128 MB (CPU) / 1-2 GB (CUDA) of patches
    per_point = sum(lay.groups * (lay.nodes + 2) for lay in plan.layouts)
    chunk = (1 << 16) if on_cpu else (1 << 20)
    chunk = max(256, min(chunk, ((1 << 25) if on_cpu else (1 << 28)) // per_point))

    for start in range(0, n_points, chunk):
        stop = min(n_points, start + chunk)
        n = stop - start
        c = tuple(x[start:stop] for x in coords)
        if use_torch:
            c = tuple(torch.from_numpy(x).to(dev) for x in c)
        scale = torch.from_numpy(inv_dd[start:stop]).to(dev, dtype)
        minus_ref = torch.from_numpy(-ref_vals[start:stop]).to(dev, dtype) * (scale if local else scale[0])

        def build(li: int, rows):  # called only inside this chunk's iteration (B023 below is intended)
            """Patches of layout ``li`` for chunk rows ``rows`` (None: all), gathered on first use."""
            lay = plan.layouts[li]
            if rows is None:
                cc, sc, mr = c, scale, minus_ref  # noqa: B023
            else:
                r_idx = rows if use_torch else rows.cpu().numpy()
                cc, sc, mr = tuple(x[r_idx] for x in c), scale[rows], minus_ref[rows]  # noqa: B023
            vals = _patches(ev_pad, cc, lay, plan.pad)
            p = torch.empty((vals.shape[0], lay.groups, lay.nodes + 2), dtype=dtype, device=dev)
            p[:, :, : lay.nodes] = vals if use_torch else torch.from_numpy(vals).to(dev)
            if local:
                p[:, :, : lay.nodes] *= sc[:, None, None]
                torch.nan_to_num_(p, nan=_BIG)
            p[:, :, lay.nodes] = mr[:, None]  # x 1 for every real offset: (D_e - D_r) / dD
            p[:, :, lay.nodes + 1] = _BIG  # x 1 for padding columns only
            return p

        best = torch.full((n,), float("inf"), dtype=torch.float64, device=dev)
        rows = None  # chunk rows held in `patches` and `cur` (None: all); finished rows may linger
        cur = best
        patches: dict[int, torch.Tensor] = {}
        for bi, (li, groups, w, dist_term, done_below) in enumerate(blocks):
            if li not in patches:
                patches[li] = build(li, rows)
            p = patches[li]
            g_b, _, width = w.shape
            step = max(1, target // (g_b * width))
            for s0 in range(0, p.shape[0], step):
                a = p[s0 : s0 + step]
                if groups is not None:
                    a = a.index_select(1, groups)
                d = torch.bmm(a.transpose(0, 1), w)  # (D_e - D_r) / dD at every offset
                d.abs_()
                m = (d.amin(0) if g_b > 1 else d[0]).amin(1)  # the shell's smallest dose difference
                # gamma^2 in float64 (one value per point, cheap): float32 would round 1 + 1e-8 to 1
                # and pass points that pymedphys fails at the shells near the DTA
                m = m.to(torch.float64)
                m.square_()
                m += dist_term
                seg = cur[s0 : s0 + step]
                torch.minimum(seg, m, out=seg)
            still = cur > done_below  # the next shells are too far to improve the others
            if pass_only:
                still &= cur > 1.0
            n_still = int(still.sum())
            if n_still == 0:
                break
            patches = {li2: q for li2, q in patches.items() if last_use[li2] > bi}
            if n_still <= 0.75 * cur.shape[0]:  # compact the active set
                if rows is not None:
                    best[rows] = cur
                keep = torch.nonzero(still).squeeze(1)
                rows = keep if rows is None else rows[keep]
                cur = cur[keep]
                patches = {li2: q.index_select(0, keep) for li2, q in patches.items()}
        if rows is not None:
            best[rows] = cur
        best_all[start:stop] = best.double().cpu().numpy()
    return mask, best_all


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


def gamma_map(
    reference,
    evaluated,
    spacing_mm,
    dose_percent: float,
    dta_mm: float,
    lower_cutoff_percent: float = 10.0,
    local: bool = False,
    max_gamma: float = 2.0,
    interp_fraction: int = 10,
    global_normalisation: float | None = None,
    device: str | None = None,
    num_threads: int | None = 1,
) -> np.ndarray:
    """Gamma index of ``evaluated`` against ``reference`` at every reference point.

    Parameters
    ----------
    reference, evaluated : array-like or torch.Tensor, 1D/2D/3D, same shape (same grid)
        ``reference`` is where gamma is reported (and where the cutoff applies); ``evaluated``
        is linearly interpolated and searched around each reference point.
    spacing_mm : float or tuple of floats
        Voxel size in mm, per array axis (in array-axis order) or one value for all axes.
    dose_percent : float
        Dose-difference criterion in percent: of the global normalisation (global gamma) or of
        the local reference dose (``local=True``).
    dta_mm : float
        Distance-to-agreement criterion in mm.
    lower_cutoff_percent : float
        Reference points below this percentage of the global normalisation get NaN
        (pymedphys' ``lower_percent_dose_cutoff``; note its default there is 20).
    local : bool
        Local instead of global dose criterion (points with zero reference dose are NaN).
    max_gamma : float
        Search radius ``max_gamma * dta_mm``; larger gamma values are reported as
        ``max_gamma``. Must be finite and > 1.
    interp_fraction : int
        The evaluated dose is sampled on a lattice of step ``dta_mm / interp_fraction``.
    global_normalisation : float, optional
        Dose the percentages refer to; ``max(reference)`` by default.
    device : str, optional
        torch device (``"cpu"``, ``"cuda"``...); default: the device of a tensor input, else CPU.
    num_threads : int or None
        CPU only: torch intra-op threads during the call (torch's process-wide setting, restored
        afterwards). Default 1: the work is a few hundred medium-sized ops, which gain little
        from more threads and lose 10-50x when the cores are busy with other processes.
        ``None`` leaves torch's setting alone.

    Returns
    -------
    numpy.ndarray (float64, shape of ``reference``): gamma, NaN below the cutoff.
    """
    mask, best2 = _gamma_squared(
        reference,
        evaluated,
        spacing_mm,
        dose_percent,
        dta_mm,
        lower_cutoff_percent,
        local,
        max_gamma,
        interp_fraction,
        global_normalisation,
        device,
        pass_only=False,
        num_threads=num_threads,
    )
    out = np.full(mask.shape, np.nan)
    out[mask] = np.minimum(np.sqrt(best2), float(max_gamma))
    return out


def gamma_pass_rate(
    reference,
    evaluated,
    spacing_mm,
    dose_percent: float,
    dta_mm: float,
    lower_cutoff_percent: float = 10.0,
    local: bool = False,
    **kwargs,
) -> float:
    """Percentage of reference points above the cutoff with gamma <= 1 (NaN if there are none).

    Same conventions and keyword arguments as :func:`gamma_map` (``max_gamma``,
    ``interp_fraction``, ``global_normalisation``, ``device``, ``num_threads``); only the pass/fail outcome is
    computed, so the search stops at ``dta_mm`` (identical to thresholding ``gamma_map``).
    """
    kwargs.setdefault("max_gamma", 2.0)
    kwargs.setdefault("interp_fraction", 10)
    kwargs.setdefault("global_normalisation", None)
    kwargs.setdefault("device", None)
    kwargs.setdefault("num_threads", 1)
    unknown = set(kwargs) - {"max_gamma", "interp_fraction", "global_normalisation", "device", "num_threads"}
    if unknown:
        raise TypeError(f"gamma_pass_rate() got unexpected keyword arguments {sorted(unknown)}")
    _, best2 = _gamma_squared(
        reference,
        evaluated,
        spacing_mm,
        dose_percent,
        dta_mm,
        lower_cutoff_percent,
        local,
        kwargs["max_gamma"],
        kwargs["interp_fraction"],
        kwargs["global_normalisation"],
        kwargs["device"],
        pass_only=True,
        num_threads=kwargs["num_threads"],
    )
    if best2.size == 0:
        return float("nan")
    return float(100.0 * np.mean(best2 <= 1.0))


def _criterion_key(dose_percent: float, dta_mm: float) -> str:
    return f"{float(dose_percent):g}%/{float(dta_mm):g}mm"


def gamma_pass_rates(
    reference,
    evaluated,
    spacing_mm,
    criteria=((3, 3), (3, 2), (2, 3), (2, 2)),
    lower_cutoff_percent: float = 10.0,
    local: bool = False,
    **kwargs,
) -> dict[str, float]:
    """Pass rates for several ``(dose_percent, dta_mm)`` criteria, keyed ``"3%/3mm"`` etc."""
    return {
        _criterion_key(dp, dta): gamma_pass_rate(
            reference, evaluated, spacing_mm, dp, dta, lower_cutoff_percent=lower_cutoff_percent, local=local, **kwargs
        )
        for dp, dta in criteria
    }
