"""ml.metrics.gamma: agreement with pymedphys.gamma (simulated planes, real OpenKBP dose) and properties.

pymedphys (the reference implementation, v0.41, numba) is only imported here. Agreement is
checked on the pass rate (within 0.2 percentage points) and on the gamma map itself (same
NaN pattern, values within 1e-4: float32 dose differences).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from ml.metrics.gamma import gamma_map, gamma_pass_rate, gamma_pass_rates

OPENKBP = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "openkbp" / "train-pats"
GPR_TOL_PP = 0.2
MAP_TOL = 1e-4


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """torch (and numba, in pymedphys_gamma) on one thread: these small problems gain little from
    more, and on a busy 2-core machine (e.g. pytest-xdist) oversubscribed OpenMP pools make them
    10-50x slower."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
    numba = sys.modules.get("numba")
    if numba is not None:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)


def pymedphys_gamma(
    ref,
    ev,
    spacing,
    dose_percent,
    dta_mm,
    cutoff=10.0,
    local=False,
    max_gamma=2.0,
    interp_fraction=10,
    global_normalisation=None,
):
    pymedphys = pytest.importorskip("pymedphys")
    numba = pytest.importorskip("numba")
    axes = tuple(np.arange(n) * s for n, s in zip(ref.shape, spacing, strict=True))
    torch_threads = torch.get_num_threads()
    numba.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pymedphys.gamma(
                axes,
                ref,
                axes,
                ev,
                dose_percent,
                dta_mm,
                lower_percent_dose_cutoff=cutoff,
                interp_fraction=interp_fraction,
                max_gamma=max_gamma,
                local_gamma=local,
                global_normalisation=global_normalisation,
            )
    finally:  # numba's OpenMP layer resets the (shared) OpenMP thread count when it starts
        torch.set_num_threads(torch_threads)


def gpr(g: np.ndarray) -> float:
    v = g[~np.isnan(g)]
    return float(100.0 * np.mean(v <= 1.0))


def assert_agrees(ref, ev, spacing, dose_percent, dta_mm, min_points=100, **kw) -> tuple[float, float]:
    """Ours vs pymedphys on one case: same NaN pattern, map within MAP_TOL, GPR within 0.2 pp.

    Returns (|GPR difference| in percentage points, max |gamma difference|)."""
    pmp_kw = {k: v for k, v in kw.items() if k not in ("local", "device")}
    gp = pymedphys_gamma(ref, ev, spacing, dose_percent, dta_mm, local=kw.get("local", False), **pmp_kw)
    cutoff = kw.pop("cutoff", 10.0)
    g = gamma_map(ref, ev, spacing, dose_percent, dta_mm, lower_cutoff_percent=cutoff, **kw)
    kw.pop("max_gamma", None)  # the pass rate does not depend on it (> 1)
    pr = gamma_pass_rate(ref, ev, spacing, dose_percent, dta_mm, lower_cutoff_percent=cutoff, **kw)
    assert np.array_equal(np.isnan(g), np.isnan(gp))
    assert np.count_nonzero(~np.isnan(gp)) >= min_points
    np.testing.assert_allclose(g[~np.isnan(g)], gp[~np.isnan(gp)], rtol=0, atol=MAP_TOL)
    diff = max(abs(gpr(g) - gpr(gp)), abs(pr - gpr(gp)))
    assert diff <= GPR_TOL_PP, (gpr(g), pr, gpr(gp))
    return diff, float(np.max(np.abs(g - gp), initial=0.0, where=~np.isnan(gp)))


def imrt_plane(shape=(128, 128), spacing=2.0, seed=0) -> np.ndarray:
    """Smooth IMRT-like plane: a soft-edged aperture times a smooth random modulation, plus tails."""
    rng = np.random.default_rng(seed)
    y, x = (np.arange(n) * spacing - n * spacing / 2 for n in shape)
    yy, xx = np.meshgrid(y, x, indexing="ij")

    def edge(u, half, pen=3.0):
        return 0.5 * (np.tanh((u + half) / pen) - np.tanh((u - half) / pen))

    aperture = edge(yy - rng.uniform(-10, 10), rng.uniform(35, 55)) * edge(
        xx - rng.uniform(-10, 10), rng.uniform(30, 50)
    )
    modulation = ndimage.gaussian_filter(rng.normal(size=shape), 6.0 / spacing)
    modulation = 1.0 + 0.35 * modulation / np.abs(modulation).max()
    tail = 0.05 * np.exp(-(yy**2 + xx**2) / (2 * 60.0**2))
    dose = aperture * modulation + tail
    return (2.0 * dose / dose.max()).astype(np.float64)  # 2 Gy max


def perturb(ref, spacing, shift_mm, scale, noise=0.0, seed=1) -> np.ndarray:
    """Linear-interpolation shift (mm per axis), global scaling and Gaussian noise (fraction of max)."""
    ev = ndimage.shift(ref, np.asarray(shift_mm, float) / np.asarray(spacing, float), order=1, mode="nearest")
    ev = ev * scale
    if noise:
        ev = ev + np.random.default_rng(seed).normal(0.0, noise * ref.max(), ref.shape)
    return np.clip(ev, 0.0, None)


# --------------------------------------------------------------------------------------------
# agreement with pymedphys: simulated 2D planes
# --------------------------------------------------------------------------------------------

PLANE_CASES = [  # (seed, shift mm, scale, noise)
    (0, (1.0, 0.0), 1.02, 0.005),
    (1, (1.5, -1.0), 0.975, 0.01),
    (2, (2.0, 2.0), 1.03, 0.0),
]
CRITERIA = [(3, 3, False), (3, 2, False), (2, 3, False), (2, 2, False), (3, 3, True), (2, 2, True)]


@pytest.mark.parametrize("case", PLANE_CASES, ids=lambda c: f"seed{c[0]}")
def test_simulated_planes_agree_with_pymedphys(case):
    seed, shift, scale, noise = case
    ref = imrt_plane(seed=seed)
    ev = perturb(ref, (2.0, 2.0), shift, scale, noise, seed=seed + 10)
    rates = []
    for dp, dta, local in CRITERIA:
        assert_agrees(ref, ev, (2.0, 2.0), dp, dta, local=local)
        rates.append(gamma_pass_rate(ref, ev, 2.0, dp, dta, local=local))
    assert min(rates) < 99.0  # the perturbations make a difference: a meaningful comparison


@pytest.mark.parametrize(
    ("spacing", "kw"),
    [
        ((2.5, 1.0), {}),  # anisotropic
        ((0.8, 0.8), {"cutoff": 20.0}),  # pymedphys' default cutoff
        ((0.5, 0.5), {}),  # fine grid: the 2-voxel tiles of the plan
        ((2.0, 2.0), {"max_gamma": 1.5, "interp_fraction": 5}),  # other search settings
        ((2.0, 2.0), {"max_gamma": 4.0, "global_normalisation": 1.6}),
    ],
)
def test_plane_options_agree_with_pymedphys(spacing, kw):
    ref = imrt_plane((96, 96), spacing=float(np.mean(spacing)), seed=3)
    ev = perturb(ref, spacing, (1.2, -0.7), 1.025, 0.005)
    assert_agrees(ref, ev, spacing, 2, 2, **kw)
    assert_agrees(ref, ev, spacing, 3, 2, local=True, **kw)


@pytest.mark.parametrize("seed", range(4))
def test_random_small_grids_agree_with_pymedphys(seed):
    """Random small 1-3D grids, spacings (anisotropic), criteria and options, dose near the edges."""
    rng = np.random.default_rng(100 + seed)
    for _ in range(4):
        ndim = int(rng.choice([1, 2, 3]))
        shape = {
            1: (int(rng.integers(60, 200)),),
            2: tuple(int(n) for n in rng.integers(20, 60, 2)),
            3: tuple(int(n) for n in rng.integers(8, 18, 3)),
        }[ndim]
        spacing = tuple(float(s) for s in rng.choice([0.5, 0.7, 1.0, 1.3, 2.0, 2.5, 3.906, 4.625], ndim))
        ref = ndimage.gaussian_filter(rng.random(shape), 2.0)
        ref = np.clip((ref - ref.mean()) / ref.std() + 1.0, 0.0, None) * rng.uniform(0.5, 80.0)
        ev = perturb(ref, spacing, rng.uniform(-1.5, 1.5, ndim), rng.uniform(0.96, 1.04), 0.01, seed=seed)
        kw = {
            "local": bool(rng.random() < 0.3),
            "cutoff": float(rng.choice([1.0, 10.0, 20.0])),
            "max_gamma": float(rng.choice([1.5, 2.0, 3.0])),
            "interp_fraction": int(rng.choice([5, 7, 10])),
        }
        assert_agrees(
            ref,
            ev,
            spacing,
            float(rng.choice([1.0, 2.0, 3.0])),
            float(rng.choice([0.7, 1.0, 2.0, 3.0])),
            min_points=1,
            **kw,
        )


def test_profile_1d_agrees_with_pymedphys():
    ref = imrt_plane((128, 128), 2.0, seed=4)[64]
    ev = perturb(ref, (2.0,), (1.3,), 1.02)
    assert_agrees(ref, ev, (2.0,), 2, 2, min_points=30)
    assert_agrees(ref, ev, (2.0,), 1, 1, local=True, min_points=30)


# --------------------------------------------------------------------------------------------
# agreement with pymedphys: real OpenKBP dose (slices and a 3D crop)
# --------------------------------------------------------------------------------------------


def _openkbp(patient: str):
    from ml.data.openkbp import dense, read_sparse, read_voxel_dimensions

    folder = OPENKBP / patient
    if not (folder / "dose.csv.xz").is_file():
        pytest.skip("needs ../shared OpenKBP data (absent)")
    dose = dense(*read_sparse(folder / "dose.csv.xz")).astype(np.float64)
    return dose, read_voxel_dimensions(folder / "voxel_dimensions.csv.xz")


@pytest.fixture(scope="module", params=["pt_1", "pt_2"])
def openkbp_dose(request):
    return _openkbp(request.param)


@pytest.mark.shared
@pytest.mark.parametrize(("shift_mm", "scale"), [((2.0, 0.0), 0.98), ((0.0, -1.5), 1.03)])
def test_openkbp_slices_agree_with_pymedphys(openkbp_dose, shift_mm, scale):
    dose, spacing = openkbp_dose
    k = int(np.unravel_index(np.argmax(dose), dose.shape)[2])
    for z in (k - 4, k):
        ref = dose[:, :, z]
        ev = perturb(ref, spacing[:2], shift_mm, scale, 0.003)
        for dp, dta, local in [(3, 3, False), (2, 2, False), (3, 2, True)]:
            assert_agrees(ref, ev, spacing[:2], dp, dta, local=local)


@pytest.mark.shared
def test_openkbp_crop_3d_agrees_with_pymedphys(openkbp_dose):
    dose, spacing = openkbp_dose
    c = np.unravel_index(np.argmax(dose), dose.shape)
    lo = [max(0, int(ci) - h) for ci, h in zip(c, (12, 12, 5), strict=True)]
    ref = dose[lo[0] : lo[0] + 24, lo[1] : lo[1] + 24, lo[2] : lo[2] + 10]  # pymedphys takes ~1 s per case
    ev = perturb(ref, spacing, (2.0, 0.0, -1.0), 0.98, 0.003)
    assert_agrees(ref, ev, spacing, 3, 3)
    assert_agrees(ref, ev, spacing, 2, 2)
    assert_agrees(ref, ev, spacing, 3, 2, local=True)


# --------------------------------------------------------------------------------------------
# properties
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(128, 128), (40, 36, 20)])
@pytest.mark.parametrize("local", [False, True])
def test_identical_inputs_pass_everywhere(shape, local):
    ref = imrt_plane((128, 128), 2.0, seed=5)
    if len(shape) == 3:
        ref = ref[44:84, 46:82, None] * np.hanning(22)[1:-1]
    assert gamma_pass_rate(ref, ref, (2.0,) * len(shape), 1, 1, local=local) == 100.0
    g = gamma_map(ref, ref.copy(), 2.0, 1, 1, local=local)
    assert np.nanmax(g) == 0.0  # the zero dose difference at distance 0 is exact
    assert gamma_pass_rates(torch.as_tensor(ref), ref, 2.0, local=local) == {
        "3%/3mm": 100.0,
        "3%/2mm": 100.0,
        "2%/3mm": 100.0,
        "2%/2mm": 100.0,
    }


def _two_plateaus() -> np.ndarray:
    """1.0 in a central 30 x 30 square, 0.5 in a surrounding ring, 0 outside; 2 mm linear ramps."""
    out = np.zeros((100, 100))
    out[10:90, 10:90] = 0.5
    out[35:65, 35:65] = 1.0
    return ndimage.uniform_filter(out, 3)  # 1 mm grid: the steps become ramps


@pytest.mark.parametrize("scale", [0.97, 1.015])
@pytest.mark.parametrize("local", [False, True])
def test_pure_scaling_gives_the_analytic_gamma(scale, local):
    """On a dose plateau DTA cannot help: gamma = |scale - 1| * D / dD exactly (a better match
    would have to lie on a ramp, >= 7 mm away, where the distance term alone exceeds it)."""
    ref = _two_plateaus()
    ev = ref * scale
    dp, dta, max_gamma = 1.0, 2.0, 5.0  # no capping: the largest expected value is 3
    g = gamma_map(ref, ev, 1.0, dp, dta, lower_cutoff_percent=10, local=local, max_gamma=max_gamma)
    expect = abs(scale - 1) * 100 / dp
    inner = (slice(42, 58), slice(42, 58))  # D = 1.0, >= 7 voxels from the ramp
    np.testing.assert_allclose(g[inner], expect, rtol=1e-5, atol=1e-5)
    ring = (slice(21, 24), slice(30, 70))  # D = 0.5, >= 10 voxels from both ramps
    np.testing.assert_allclose(g[ring], expect * (1.0 if local else 0.5), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("dose_percent", [2.0, 3.0])
def test_scaled_down_dose_at_the_maximum(ndim, dose_percent):
    """ev = s * ref with s < 1: at the reference maximum every neighbour is further off, so
    gamma there is (1 - s) * 100 / dose_percent (global and local agree at the maximum)."""
    ref = imrt_plane((64, 64), 2.0, seed=6)
    if ndim == 3:
        ref = ref[:, :, None] * np.hanning(12)[None, None, 1:-1]
    s = 0.96
    imax = np.unravel_index(np.argmax(ref), ref.shape)
    for local in (False, True):
        g = gamma_map(ref, s * ref, 2.0, dose_percent, 2.0, local=local, max_gamma=3.0)
        assert g[imax] == pytest.approx((1 - s) * 100 / dose_percent, abs=1e-5)


def test_cutoff_applies_to_the_reference_only():
    ref = np.tile(np.linspace(0.0, 1.0, 101), (20, 1))  # columns: 0 %, 1 %, ..., 100 % of max
    ev = ref.copy()
    ev[:, 50:] = 0.0  # a cold evaluated dose does not remove points from the evaluation
    g = gamma_map(ref, ev, 1.0, 3, 3, lower_cutoff_percent=10)
    assert np.all(np.isnan(g[:, :10])) and not np.any(np.isnan(g[:, 10:]))  # 10 % itself is in
    assert np.all(g[:, 60:] == 2.0)  # far from any match: capped at max_gamma
    assert np.all(g[:, 10:45] <= MAP_TOL)
    # relative to global_normalisation when given
    g2 = gamma_map(ref, ev, 1.0, 3, 3, lower_cutoff_percent=10, global_normalisation=2.0)
    assert np.all(np.isnan(g2[:, :20])) and not np.any(np.isnan(g2[:, 20:]))
    # no cutoff: every point (global); local gamma is undefined at zero reference dose
    assert not np.any(np.isnan(gamma_map(ref, ev, 1.0, 3, 3, lower_cutoff_percent=0)))
    g_loc = gamma_map(ref, ev, 1.0, 3, 3, lower_cutoff_percent=0, local=True)
    assert np.all(np.isnan(g_loc[:, 0])) and not np.any(np.isnan(g_loc[:, 1:]))
    # pass rate over the points above the cutoff only; NaN when there are none
    assert gamma_pass_rate(ref, ev, 1.0, 3, 3, lower_cutoff_percent=10) == pytest.approx(gpr(g))
    assert np.isnan(gamma_pass_rate(np.zeros((8, 8)), np.zeros((8, 8)), 1.0, 3, 3, global_normalisation=1.0))
    assert np.all(np.isnan(gamma_map(ref, ev, 1.0, 3, 3, lower_cutoff_percent=101)))


@pytest.mark.parametrize("ndim", [2, 3])
def test_pass_rate_equals_thresholded_map(ndim):
    ref = imrt_plane((64, 64), 2.0, seed=7)
    spacing = (2.0, 2.0)
    if ndim == 3:
        ref = ref[:, :, None] * np.hanning(14)[None, None, 1:-1]
        spacing = (2.0, 2.0, 2.5)
    ev = perturb(ref, spacing, (1.5,) + (0.0,) * (ndim - 1), 1.03, 0.01)
    for dp, dta, local in CRITERIA:
        g = gamma_map(ref, ev, spacing, dp, dta, local=local)
        assert gamma_pass_rate(ref, ev, spacing, dp, dta, local=local) == gpr(g)
    rates = gamma_pass_rates(ev, ref, spacing, criteria=((3, 3), (2, 2), (1, 0.5)), lower_cutoff_percent=10.0)
    assert list(rates) == ["3%/3mm", "2%/2mm", "1%/0.5mm"]
    assert rates["2%/2mm"] == gamma_pass_rate(ev, ref, spacing, 2, 2)
    assert rates["3%/3mm"] >= rates["2%/2mm"] >= rates["1%/0.5mm"]


def test_torch_inputs_match_numpy():
    ref = imrt_plane((64, 64), 2.0, seed=8)
    ev = perturb(ref, (2.0, 2.0), (1.0, 1.0), 1.02, 0.005)
    expected = gamma_map(ref, ev, 2.0, 2, 2)
    for r, e in [
        (torch.tensor(ref), torch.tensor(ev)),
        (torch.tensor(ref, dtype=torch.float32), ev),
        (ref.astype(np.float32), torch.tensor(ev, dtype=torch.float32)),
    ]:
        np.testing.assert_allclose(gamma_map(r, e, 2.0, 2, 2), expected, atol=MAP_TOL)
        assert gamma_pass_rate(r, e, 2.0, 2, 2) == pytest.approx(gpr(expected), abs=GPR_TOL_PP)


def test_device_code_path_on_cpu(monkeypatch):
    """The CUDA branch (patches gathered with torch, float64 matmuls) run on the CPU: it must
    agree with pymedphys to float64 accuracy."""
    import ml.metrics.gamma as gm

    monkeypatch.setattr(gm, "_gather_with_torch", lambda device: True)
    monkeypatch.setattr(gm, "_compute_dtype", lambda device: torch.float64)
    ref = imrt_plane((64, 64), 2.0, seed=9)
    ev = perturb(ref, (2.0, 2.0), (1.0, -1.5), 0.98, 0.005)
    for local in (False, True):
        gp = pymedphys_gamma(ref, ev, (2.0, 2.0), 2, 2, local=local)
        g = gm.gamma_map(torch.tensor(ref), torch.tensor(ev), 2.0, 2, 2, local=local)
        assert np.array_equal(np.isnan(g), np.isnan(gp))
        np.testing.assert_allclose(g[~np.isnan(g)], gp[~np.isnan(gp)], rtol=0, atol=1e-7)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    ref = imrt_plane((96, 96), 2.0, seed=10)
    ev = perturb(ref, (2.0, 2.0), (1.0, 1.0), 1.02, 0.005)
    cpu = gamma_map(ref, ev, 2.0, 2, 2)
    for r, e, kw in [(ref, ev, {"device": "cuda"}), (torch.tensor(ref).cuda(), torch.tensor(ev).cuda(), {})]:
        np.testing.assert_allclose(gamma_map(r, e, 2.0, 2, 2, **kw), cpu, atol=MAP_TOL)
        assert gamma_pass_rate(r, e, 2.0, 2, 2, **kw) == pytest.approx(gpr(cpu), abs=GPR_TOL_PP)
    assert_agrees(ref, ev, (2.0, 2.0), 3, 2, local=True, device="cuda")


def test_cpu_thread_setting_is_scoped_to_the_call():
    from concurrent.futures import ThreadPoolExecutor

    ref = imrt_plane((64, 64), 2.0, seed=11)
    ev = perturb(ref, (2.0, 2.0), (1.0, 0.5), 1.02, 0.005)
    torch.set_num_threads(2)
    try:
        expected = gamma_map(ref, ev, 2.0, 2, 2)  # default num_threads=1 inside the call
        assert torch.get_num_threads() == 2
        np.testing.assert_array_equal(gamma_map(ref, ev, 2.0, 2, 2, num_threads=None), expected)
        np.testing.assert_array_equal(gamma_map(ref, ev, 2.0, 2, 2, num_threads=2), expected)
        with ThreadPoolExecutor(4) as pool:  # concurrent calls: the last one out restores the setting
            rates = list(pool.map(lambda _: gamma_pass_rate(ref, ev, 2.0, 2, 2), range(8)))
        assert rates == [gpr(expected)] * 8
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    with pytest.raises(ValueError):
        gamma_map(ref, ev, 2.0, 2, 2, num_threads=0)
    with pytest.raises(TypeError):
        gamma_pass_rate(ref, ev, 2.0, 2, 2, lower_percent_dose_cutoff=20)  # pymedphys' name: not ours


@pytest.mark.parametrize(
    ("args", "kwargs", "error"),
    [
        ((np.ones((8, 8)), np.ones((8, 9)), 1.0, 3, 3), {}, ValueError),  # shape mismatch
        ((np.ones((8, 8)), np.ones((8, 8)), (1.0, 1.0, 1.0), 3, 3), {}, ValueError),  # spacing length
        ((np.ones((8, 8)), np.ones((8, 8)), 0.0, 3, 3), {}, ValueError),  # zero spacing
        ((np.ones((8, 8)), np.ones((8, 8)), (1.0, -2.0), 3, 3), {}, ValueError),  # negative spacing
        ((np.ones((8, 8)), np.ones((8, 8)), float("nan"), 3, 3), {}, ValueError),  # NaN spacing
        ((np.ones((2, 2, 2, 2)), np.ones((2, 2, 2, 2)), 1.0, 3, 3), {}, ValueError),  # 4D
        ((np.ones((0, 4)), np.ones((0, 4)), 1.0, 3, 3), {}, ValueError),  # empty
        ((np.full((8, 8), np.nan), np.ones((8, 8)), 1.0, 3, 3), {}, ValueError),  # non-finite dose
        ((np.ones((8, 8)), np.ones((8, 8)), 1.0, 0, 3), {}, ValueError),  # dose criterion
        ((np.ones((8, 8)), np.ones((8, 8)), 1.0, 3, -1), {}, ValueError),  # DTA
        ((np.ones((8, 8)), np.ones((8, 8)), 1.0, 3, 3), {"interp_fraction": 2.5}, ValueError),
        ((np.ones((8, 8)), np.ones((8, 8)), 1.0, 3, 3), {"max_gamma": 1.0}, ValueError),  # capped = pass
        ((np.ones((8, 8)), np.ones((8, 8)), 1.0, 3, 3), {"max_gamma": float("inf")}, ValueError),
        ((np.zeros((8, 8)), np.ones((8, 8)), 1.0, 3, 3), {}, ValueError),  # zero normalisation
        ((np.array([["a"]]), np.array([["b"]]), 1.0, 3, 3), {}, TypeError),
    ],
)
def test_input_validation(args, kwargs, error):
    with pytest.raises(error):
        gamma_map(*args, **kwargs)
    with pytest.raises(error):
        gamma_pass_rate(*args, **kwargs)
