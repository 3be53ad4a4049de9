"""A geometry-aware 3D volume and the grid operations the pipeline needs.

Conventions (the ITK/DICOM ones, written down once):

* ``array`` is indexed ``[k, j, i]`` = ``[z, y, x]`` (slowest to fastest), as
  ``SimpleITK.GetArrayFromImage`` returns it.
* ``spacing``, ``origin`` and ``direction`` are in ITK order ``(x, y, z)`` and in the DICOM
  patient coordinate system **LPS** (x to the patient's left, y posterior, z superior).
  ``direction`` is the 3x3 matrix of direction cosines, row-major, whose *columns* are the
  world directions of the i, j, k axes.
* The **canonical grid** is axis-aligned with identity direction in LPS: i runs right to left,
  j anterior to posterior, k inferior to superior. ``to_canonical`` gets there by axis
  permutations and flips only (no interpolation) whenever the input is axis-aligned, and by
  linear resampling otherwise.
* NIfTI files store RAS; ``write_nifti``/``read_nifti`` convert (flip the first two world
  axes) so a round trip is exact.

SimpleITK and nibabel are imported lazily so that ``ml`` stays importable on a node that has
only torch, numpy, pandas and pyarrow.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ml.utils.io import atomic_write_bytes, gzip_bytes

__all__ = [
    "Volume",
    "is_axis_aligned",
    "nifti_to_volume",
    "read_nifti",
    "resample_spacing",
    "resample_to",
    "to_canonical",
    "write_nifti",
]

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


@dataclass
class Volume:
    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise ValueError(f"Volume needs a 3D array, got shape {self.array.shape}")
        self.spacing = tuple(float(s) for s in self.spacing)  # type: ignore[assignment]
        self.origin = tuple(float(o) for o in self.origin)  # type: ignore[assignment]
        self.direction = tuple(float(d) for d in self.direction)  # type: ignore[assignment]
        if len(self.spacing) != 3 or len(self.origin) != 3 or len(self.direction) != 9:
            raise ValueError("spacing/origin need 3 values and direction 9")
        if min(self.spacing) <= 0:
            raise ValueError(f"spacing must be positive, got {self.spacing}")

    # -- geometry -------------------------------------------------------------------------
    @property
    def shape_xyz(self) -> tuple[int, int, int]:
        z, y, x = self.array.shape
        return (x, y, z)

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=float).reshape(3, 3)

    @property
    def affine_lps(self) -> np.ndarray:
        """4x4 matrix mapping (i, j, k, 1) voxel indices to LPS mm."""
        a = np.eye(4)
        a[:3, :3] = self.direction_matrix * np.asarray(self.spacing)[None, :]
        a[:3, 3] = self.origin
        return a

    def index_to_world(self, ijk: np.ndarray) -> np.ndarray:
        ijk = np.asarray(ijk, dtype=float)
        a = self.affine_lps
        return ijk @ a[:3, :3].T + a[:3, 3]

    def world_to_index(self, xyz: np.ndarray) -> np.ndarray:
        xyz = np.asarray(xyz, dtype=float)
        a = self.affine_lps
        inv = np.linalg.inv(a[:3, :3])
        return (xyz - a[:3, 3]) @ inv.T

    def same_grid(self, other: Volume, atol: float = 1e-3) -> bool:
        return (
            self.array.shape == other.array.shape
            and np.allclose(self.spacing, other.spacing, atol=atol)
            and np.allclose(self.origin, other.origin, atol=atol * 10)
            and np.allclose(self.direction, other.direction, atol=atol)
        )

    def with_array(self, array: np.ndarray, **meta: object) -> Volume:
        if array.shape != self.array.shape:
            raise ValueError(f"shape {array.shape} does not match grid {self.array.shape}")
        return replace(self, array=array, meta={**self.meta, **meta})

    def grid_dict(self) -> dict:
        return {
            "shape": list(self.array.shape),
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": list(self.direction),
        }

    # -- SimpleITK interop ----------------------------------------------------------------
    def to_sitk(self):
        import SimpleITK as sitk

        img = sitk.GetImageFromArray(np.ascontiguousarray(self.array))
        img.SetSpacing(self.spacing)
        img.SetOrigin(self.origin)
        img.SetDirection(self.direction)
        return img

    @classmethod
    def from_sitk(cls, img, **meta: object) -> Volume:
        import SimpleITK as sitk

        return cls(
            array=sitk.GetArrayFromImage(img),
            spacing=img.GetSpacing(),
            origin=img.GetOrigin(),
            direction=img.GetDirection(),
            meta=dict(meta),
        )


# ---------------------------------------------------------------------------------------
# canonical orientation and resampling
# ---------------------------------------------------------------------------------------
def is_axis_aligned(volume: Volume, tol: float = 1e-3) -> bool:
    d = np.abs(volume.direction_matrix)
    return bool(np.all((d < tol) | (np.abs(d - 1) < tol)))


def to_canonical(volume: Volume) -> Volume:
    """Return the volume on an identity-direction LPS grid (see module docstring)."""
    d = volume.direction_matrix
    if np.allclose(d, np.eye(3), atol=1e-4):
        return volume
    if not is_axis_aligned(volume):
        return _resample_oblique_to_canonical(volume)
    # world axis w is carried by voxel axis perm[w], with sign sgn[w]
    perm = [int(np.argmax(np.abs(d[w, :]))) for w in range(3)]
    sgn = [float(np.sign(d[w, perm[w]])) for w in range(3)]
    arr = volume.array  # [k, j, i]
    # numpy axis for voxel axis v (0=i,1=j,2=k) is 2 - v
    new_axes = [2 - perm[2], 2 - perm[1], 2 - perm[0]]  # new [z, y, x]
    arr = np.transpose(arr, new_axes)
    spacing_old = volume.spacing
    spacing = tuple(spacing_old[perm[w]] for w in range(3))
    origin = np.asarray(volume.origin, dtype=float).copy()
    n_xyz = arr.shape[::-1]
    for w in range(3):
        if sgn[w] < 0:
            arr = np.flip(arr, axis=2 - w)
            # the new first voxel along w is the old last one
            origin = origin + d[:, perm[w]] * spacing_old[perm[w]] * (n_xyz[w] - 1)
    return Volume(
        array=np.ascontiguousarray(arr),
        spacing=spacing,  # type: ignore[arg-type]
        origin=tuple(origin),  # type: ignore[arg-type]
        direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
        meta=dict(volume.meta),
    )


def _resample_oblique_to_canonical(volume: Volume) -> Volume:
    """Resample an oblique volume onto the axis-aligned bounding grid (linear)."""
    corners = np.array(
        [
            [i, j, k]
            for i in (0, volume.shape_xyz[0] - 1)
            for j in (0, volume.shape_xyz[1] - 1)
            for k in (0, volume.shape_xyz[2] - 1)
        ],
        dtype=float,
    )
    world = volume.index_to_world(corners)
    lo, hi = world.min(axis=0), world.max(axis=0)
    spacing = np.full(3, min(volume.spacing))
    shape_xyz = np.maximum(1, np.ceil((hi - lo) / spacing).astype(int) + 1)
    ref = Volume(
        array=np.zeros(tuple(shape_xyz[::-1]), dtype=np.uint8),
        spacing=tuple(spacing),  # type: ignore[arg-type]
        origin=tuple(lo),  # type: ignore[arg-type]
    )
    return resample_to(volume, ref, interpolation="linear", default_value=float(np.min(volume.array)))


def resample_to(
    volume: Volume,
    reference: Volume,
    interpolation: str = "linear",
    default_value: float = 0.0,
    dtype: np.dtype | type | None = None,
) -> Volume:
    """Resample ``volume`` onto ``reference``'s grid (world coordinates, identity transform)."""
    if volume.same_grid(reference, atol=1e-5):
        arr = volume.array if dtype is None else volume.array.astype(dtype, copy=False)
        return reference.with_array(arr)
    import SimpleITK as sitk

    interp = {
        "linear": sitk.sitkLinear,
        "nearest": sitk.sitkNearestNeighbor,
        "bspline": sitk.sitkBSpline,
    }[interpolation]
    src = volume.array
    if src.dtype == bool:
        src = src.astype(np.uint8)
    moving = Volume(src, volume.spacing, volume.origin, volume.direction).to_sitk()
    ref_img = Volume(
        np.zeros(reference.array.shape, dtype=np.uint8),
        reference.spacing,
        reference.origin,
        reference.direction,
    ).to_sitk()
    out_type = moving.GetPixelID()
    if interpolation != "nearest" and src.dtype.kind in "iu":
        out_type = sitk.sitkFloat32
    out = sitk.Resample(moving, ref_img, sitk.Transform(), interp, float(default_value), out_type)
    arr = sitk.GetArrayFromImage(out)
    if dtype is not None:
        arr = arr.astype(dtype, copy=False)
    elif volume.array.dtype == bool:
        arr = arr.astype(bool)
    return reference.with_array(arr)


def resample_spacing(
    volume: Volume, spacing: tuple[float, float, float], interpolation: str = "linear", default_value: float = 0.0
) -> Volume:
    """Resample onto a grid with the same origin/direction and extent but new spacing."""
    if np.allclose(volume.spacing, spacing, atol=1e-4):
        return volume
    extent = np.asarray(volume.shape_xyz) * np.asarray(volume.spacing)
    shape_xyz = np.maximum(1, np.round(extent / np.asarray(spacing)).astype(int))
    ref = Volume(np.zeros(tuple(shape_xyz[::-1]), dtype=np.uint8), spacing, volume.origin, volume.direction)
    return resample_to(volume, ref, interpolation=interpolation, default_value=default_value)


# ---------------------------------------------------------------------------------------
# NIfTI
# ---------------------------------------------------------------------------------------
def _nifti_image(volume: Volume):
    import nibabel as nib

    affine = volume.affine_lps.copy()
    affine[:3, :] = _LPS_TO_RAS @ affine[:3, :]
    data = np.ascontiguousarray(volume.array.transpose(2, 1, 0))  # -> [i, j, k]
    if data.dtype == bool:
        data = data.astype(np.uint8)
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    # never carry free text into stored files
    img.header["descrip"] = b""
    img.header["aux_file"] = b""
    img.header["db_name"] = b""
    return img


def write_nifti(volume: Volume, path: str | os.PathLike, compresslevel: int = 1) -> Path:
    """Write a NIfTI-1 file atomically; ``.nii.gz`` is gzip'ed deterministically (mtime 0)."""
    path = Path(path)
    raw = _nifti_image(volume).to_bytes()
    data = gzip_bytes(raw, level=compresslevel) if path.name.endswith(".gz") else raw
    return atomic_write_bytes(path, data)


def read_nifti(path: str | os.PathLike, dtype: np.dtype | type | None = None) -> Volume:
    """Read a 3D NIfTI (any orientation) into a Volume in LPS. 4D files must be split first."""
    import nibabel as nib

    img = nib.load(str(path))
    return nifti_to_volume(img, dtype=dtype)


def nifti_to_volume(img, dtype: np.dtype | type | None = None) -> Volume:
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        data = np.asarray(img.dataobj)[..., 0]
    elif len(shape) != 3:
        raise ValueError(f"expected a 3D NIfTI image, got shape {shape}")
    else:
        data = np.asarray(img.dataobj)
    # apply scl_slope/inter like get_fdata would, but keep integer types when unscaled
    slope, inter = img.header.get_slope_inter()
    if slope is not None and (slope != 1 or (inter or 0) != 0):
        data = data.astype(np.float32) * np.float32(slope) + np.float32(inter or 0)
    if dtype is not None:
        data = data.astype(dtype, copy=False)
    affine = np.asarray(img.affine, dtype=float)
    lps = _LPS_TO_RAS @ affine[:3, :]
    m = lps[:, :3]
    spacing = np.linalg.norm(m, axis=0)
    if np.any(spacing <= 0):
        raise ValueError("NIfTI affine has a zero-length axis")
    direction = m / spacing[None, :]
    return Volume(
        array=np.ascontiguousarray(data.transpose(2, 1, 0)),
        spacing=tuple(spacing),  # type: ignore[arg-type]
        origin=tuple(lps[:, 3]),  # type: ignore[arg-type]
        direction=tuple(direction.reshape(-1)),  # type: ignore[arg-type]
    )
