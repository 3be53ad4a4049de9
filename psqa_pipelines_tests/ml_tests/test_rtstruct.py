"""Unit tests of ml.data.dicom.rtstruct: parsing and exact rasterisation of contours."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from matplotlib.path import Path as MplPath
from pydicom.dataset import Dataset

from ml.data.dicom.rtstruct import RoiContours, parse_rtstruct, rasterize_roi, rasterize_rtstruct
from ml.data.volume import Volume

# an anisotropic grid with a non-zero origin, so that index/world mix-ups show
SPACING = (0.8, 1.2, 2.5)
ORIGIN = (-10.0, -20.0, 5.0)
SHAPE = (6, 40, 50)  # z, y, x


@pytest.fixture(scope="module")
def grid() -> Volume:
    return Volume(np.zeros(SHAPE, np.int16), SPACING, ORIGIN)


def _slice_z(k: float) -> float:
    return ORIGIN[2] + k * SPACING[2]


def _world_xy(i, j):
    return ORIGIN[0] + np.asarray(i, float) * SPACING[0], ORIGIN[1] + np.asarray(j, float) * SPACING[1]


def _contour(xy: np.ndarray, z: float) -> np.ndarray:
    return np.column_stack([xy, np.full(len(xy), z)])


def _brute_force(polys: list[np.ndarray]) -> np.ndarray:
    """Even-odd point-in-polygon of the voxel centres of one slice, with matplotlib."""
    ny, nx = SHAPE[1], SHAPE[2]
    jj, ii = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
    x, y = _world_xy(ii.ravel(), jj.ravel())
    pts = np.column_stack([x, y])
    inside = np.zeros(len(pts), bool)
    for poly in polys:
        inside ^= MplPath(poly[:, :2]).contains_points(pts)
    return inside.reshape(ny, nx)


def _min_distance_to_edges(poly: np.ndarray) -> float:
    """Smallest distance from any voxel centre to any polygon edge (for boundary-safe tests)."""
    ny, nx = SHAPE[1], SHAPE[2]
    jj, ii = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
    x, y = _world_xy(ii.ravel(), jj.ravel())
    p = np.column_stack([x, y])[:, None, :]
    a = poly[:, :2][None, :, :]
    b = np.roll(poly[:, :2], -1, axis=0)[None, :, :]
    ab = b - a
    t = np.clip(((p - a) * ab).sum(-1) / (ab * ab).sum(-1), 0, 1)
    d = np.linalg.norm(p - (a + t[..., None] * ab), axis=-1)
    return float(d.min())


def _roi(contours: list[np.ndarray]) -> RoiContours:
    return RoiContours(number=1, name="X", contours=contours)


# -- simple polygons against brute force -------------------------------------------------------
@pytest.mark.parametrize("k", [0, 3, 5])
def test_square_between_voxel_centres(grid, k):
    # edges at half-integer indices: exactly the voxels with i in 3..11 and j in 5..14 are inside
    x0, y0 = _world_xy(2.5, 4.5)
    x1, y1 = _world_xy(11.5, 14.5)
    sq = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
    mask = rasterize_roi(_roi([_contour(sq, _slice_z(k))]), grid)
    expected = np.zeros(SHAPE, bool)
    expected[k, 5:15, 3:12] = True
    np.testing.assert_array_equal(mask, expected)
    np.testing.assert_array_equal(mask[k], _brute_force([sq]))
    # orientation (clockwise vs counter-clockwise) does not matter
    np.testing.assert_array_equal(rasterize_roi(_roi([_contour(sq[::-1], _slice_z(k))]), grid), expected)


@pytest.mark.parametrize("seed", range(8))
def test_random_triangles_match_brute_force(grid, seed):
    rng = np.random.default_rng(seed)
    while True:
        i = rng.uniform(-3, SHAPE[2] + 3, 3)  # may stick out of the grid
        j = rng.uniform(-3, SHAPE[1] + 3, 3)
        x, y = _world_xy(i, j)
        tri = np.column_stack([x, y])
        area = 0.5 * abs(np.cross(tri[1] - tri[0], tri[2] - tri[0]))
        if area > 40 and _min_distance_to_edges(tri) > 1e-6:
            break
    mask = rasterize_roi(_roi([_contour(tri, _slice_z(2))]), grid)
    expected = _brute_force([tri])
    assert expected.sum() > 5
    np.testing.assert_array_equal(mask[2], expected)
    assert not mask[[0, 1, 3, 4, 5]].any()


@pytest.mark.parametrize("seed", range(4))
def test_random_star_polygons_match_brute_force(grid, seed):
    """Non-convex polygons (star shapes with many vertices)."""
    rng = np.random.default_rng(100 + seed)
    while True:
        n = int(rng.integers(7, 25))
        t = np.sort(rng.uniform(0, 2 * np.pi, n))
        r = rng.uniform(3, 18, n)
        cx, cy = _world_xy(rng.uniform(15, 35), rng.uniform(12, 28))
        poly = np.column_stack([cx + r * np.cos(t), cy + r * np.sin(t)])
        if _min_distance_to_edges(poly) > 1e-6:
            break
    mask = rasterize_roi(_roi([_contour(poly, _slice_z(4))]), grid)
    expected = _brute_force([poly])
    assert expected.sum() > 5
    np.testing.assert_array_equal(mask[4], expected)


def test_contour_with_hole_gives_annulus(grid):
    x0, y0 = _world_xy(2.5, 3.5)
    x1, y1 = _world_xy(30.5, 33.5)
    outer = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
    xi0, yi0 = _world_xy(10.5, 12.5)
    xi1, yi1 = _world_xy(20.5, 24.5)
    inner = np.array([[xi0, yi0], [xi1, yi0], [xi1, yi1], [xi0, yi1]])
    mask = rasterize_roi(_roi([_contour(outer, _slice_z(1)), _contour(inner, _slice_z(1))]), grid)
    expected = np.zeros(SHAPE[1:], bool)
    expected[4:34, 3:31] = True
    expected[13:25, 11:21] = False
    np.testing.assert_array_equal(mask[1], expected)
    np.testing.assert_array_equal(mask[1], _brute_force([outer, inner]))
    # the order of the contours in the file does not matter
    swapped = rasterize_roi(_roi([_contour(inner, _slice_z(1)), _contour(outer, _slice_z(1))]), grid)
    np.testing.assert_array_equal(swapped, mask)


def test_disjoint_contours_on_one_slice_are_both_filled(grid):
    a = np.array([_world_xy(2.5, 2.5), _world_xy(6.5, 2.5), _world_xy(6.5, 6.5), _world_xy(2.5, 6.5)])
    b = np.array([_world_xy(20.5, 20.5), _world_xy(26.5, 20.5), _world_xy(26.5, 30.5), _world_xy(20.5, 30.5)])
    mask = rasterize_roi(_roi([_contour(a, _slice_z(0)), _contour(b, _slice_z(0))]), grid)
    assert mask[0].sum() == 16 + 60
    np.testing.assert_array_equal(mask[0], _brute_force([a, b]))


def _small_square():
    x0, y0 = _world_xy(4.5, 4.5)
    x1, y1 = _world_xy(8.5, 9.5)
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])


@pytest.mark.parametrize("frac", [0.3, -0.3, 0.45, -0.45])
def test_contour_is_assigned_to_the_nearest_slice(grid, frac):
    z = _slice_z(3 + frac)
    mask = rasterize_roi(_roi([_contour(_small_square(), z)]), grid)
    assert mask[3].sum() == 4 * 5
    assert mask.sum() == 4 * 5


@pytest.mark.parametrize("k", [-0.6, -1.0, -3.0, SHAPE[0] - 1 + 0.6, SHAPE[0] + 2.0])
def test_contour_outside_the_stack_is_dropped(grid, k):
    mask = rasterize_roi(_roi([_contour(_small_square(), _slice_z(k))]), grid)
    assert not mask.any()


def test_contour_at_stack_edge_within_half_slice_is_kept(grid):
    mask = rasterize_roi(_roi([_contour(_small_square(), _slice_z(-0.4))]), grid)
    assert mask[0].sum() == 20 and mask.sum() == 20
    mask = rasterize_roi(_roi([_contour(_small_square(), _slice_z(SHAPE[0] - 1 + 0.4))]), grid)
    assert mask[-1].sum() == 20 and mask.sum() == 20


def test_nearest_slice_in_mm_on_thick_slices():
    # 5 mm slices at z = 0, 5, 10, 15: z = 12 belongs to slice 2, z = 13 to slice 3,
    # z = 17.4 (2.4 mm above the last slice) to slice 3, z = 17.6 and z = -2.6 to none
    grid5 = Volume(np.zeros((4, 20, 20), np.int16), (1.0, 1.0, 5.0), (0.0, 0.0, 0.0))
    sq = np.array([[2.5, 2.5], [6.5, 2.5], [6.5, 6.5], [2.5, 6.5]])
    for z, k in ((12.0, 2), (13.0, 3), (17.4, 3), (-2.4, 0)):
        m = rasterize_roi(_roi([_contour(sq, z)]), grid5)
        assert m[k].sum() == 16 and m.sum() == 16, z
    for z in (17.6, -2.6, 40.0):
        assert not rasterize_roi(_roi([_contour(sq, z)]), grid5).any(), z


def test_polygon_on_permuted_grid():
    # a grid whose rows run anterior (j axis = -y): rasterisation must go through world->index
    grid = Volume(
        np.zeros((3, 10, 12), np.int16),
        (1.0, 2.0, 3.0),
        (0.0, 20.0, 0.0),
        (1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0),
    )
    sq = np.array([[2.5, 15.0], [6.5, 15.0], [6.5, 7.0], [2.5, 7.0]])  # y 7..15 -> j 2.5..6.5
    mask = rasterize_roi(_roi([_contour(sq, 3.0)]), grid)
    expected = np.zeros((3, 10, 12), bool)
    expected[1, 3:7, 3:7] = True
    np.testing.assert_array_equal(mask, expected)


# -- parsing ---------------------------------------------------------------------------
def _contour_item(kind: str, pts: np.ndarray) -> Dataset:
    c = Dataset()
    c.ContourGeometricType = kind
    c.NumberOfContourPoints = len(pts)
    c.ContourData = [f"{v:g}" for v in pts.reshape(-1)]
    return c


def _structure_set(contour_items: dict[int, list[Dataset]], names: dict[int, str]) -> Dataset:
    ds = Dataset()
    ds.StructureSetROISequence = []
    ds.ROIContourSequence = []
    ds.RTROIObservationsSequence = []
    for num, name in names.items():
        item = Dataset()
        item.ROINumber = num
        item.ROIName = name
        ds.StructureSetROISequence.append(item)
        ob = Dataset()
        ob.ObservationNumber = num
        ob.ReferencedROINumber = num
        ob.RTROIInterpretedType = "PTV" if name.startswith("PTV") else "ORGAN"
        ds.RTROIObservationsSequence.append(ob)
        rc = Dataset()
        rc.ReferencedROINumber = num
        rc.ContourSequence = contour_items.get(num, [])
        ds.ROIContourSequence.append(rc)
    return ds


def test_parse_rtstruct_ignores_point_and_open_planar_contours():
    sq = _contour(_small_square(), _slice_z(2))
    point = np.array([[1.0, 2.0, _slice_z(2)]])
    line = _contour(np.array([[0.0, 0.0], [5.0, 5.0], [10.0, 0.0]]), _slice_z(2))
    ds = _structure_set(
        {
            1: [_contour_item("CLOSED_PLANAR", sq), _contour_item("POINT", point), _contour_item("OPEN_PLANAR", line)],
            2: [_contour_item("POINT", point)],
            3: [_contour_item("OPEN_NONPLANAR", line)],
        },
        {1: "PTV70", 2: "Marker", 3: "Wire"},
    )
    rois = parse_rtstruct(ds)
    assert [r.number for r in rois] == [1, 2, 3]
    assert [r.name for r in rois] == ["PTV70", "Marker", "Wire"]
    assert rois[0].interpreted_type == "PTV"
    assert len(rois[0].contours) == 1
    np.testing.assert_allclose(rois[0].contours[0], sq)
    assert rois[0].n_points == 4
    assert rois[1].contours == [] and rois[2].contours == []
    grid = Volume(np.zeros(SHAPE, np.int16), SPACING, ORIGIN)
    masks = rasterize_rtstruct(ds, grid)
    assert set(masks) == {"PTV70"}  # ROIs without closed contours give no mask
    assert masks["PTV70"].sum() == 20
    assert rasterize_rtstruct(ds, grid, names=["Brainstem"]) == {}


def test_parse_rtstruct_skips_malformed_contours_and_unknown_rois():
    sq = _contour(_small_square(), 0.0)
    bad_len = _contour_item("CLOSED_PLANAR", sq)
    bad_len.ContourData = bad_len.ContourData[:-1]  # not a multiple of 3
    two_points = _contour_item("CLOSED_PLANAR", sq[:2])
    ds = _structure_set({1: [bad_len, two_points, _contour_item("closed_planar", sq)]}, {1: "Body"})
    orphan = Dataset()
    orphan.ReferencedROINumber = 99
    orphan.ContourSequence = [_contour_item("CLOSED_PLANAR", sq)]
    ds.ROIContourSequence.append(orphan)
    rois = parse_rtstruct(ds)
    assert len(rois) == 1
    assert len(rois[0].contours) == 1  # only the well-formed one (type matched case-insensitively)


# -- generated study ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def hn_study(tmp_path_factory):
    from ml.data.synthetic import generate_hn_study

    return generate_hn_study(tmp_path_factory.mktemp("hn_rs"), seed=3)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int((a & b).sum()) / s


def test_generated_rtstruct_rasterises_to_truth(hn_study):
    from ml.data.dicom.series import load_series_volume

    ct = load_series_volume(hn_study.ct_files)
    assert ct.array.shape == hn_study.hu.shape
    ds = pydicom.dcmread(hn_study.rtstruct_file)
    rois = parse_rtstruct(ds)
    assert [r.name for r in rois] == list(hn_study.roi_names)
    for roi in rois:
        truth = hn_study.masks[roi.name]
        assert truth.any(), roi.name
        mask = rasterize_roi(roi, ct)
        assert mask.shape == truth.shape
        dice = _dice(mask, truth)
        assert dice > 0.99, (roi.name, dice)
        n_diff = int((mask != truth).sum())
        assert n_diff == 0, (roi.name, n_diff, dice)
    masks = rasterize_rtstruct(ds, ct, names=["PTV70", "Brainstem"])
    assert set(masks) == {"PTV70", "Brainstem"}
    np.testing.assert_array_equal(masks["PTV70"], hn_study.masks["PTV70"])
