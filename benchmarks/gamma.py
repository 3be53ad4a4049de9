"""Gamma index benchmark: ``ml.metrics.gamma`` vs ``pymedphys.gamma`` in the same process.

Data: the real OpenKBP dose of pt_1 (128^3 at 3.906 x 3.906 x 2.5 mm, ../shared) against a
perturbed copy (+2 % dose, 1.5 mm shift along array axis 0, Gaussian blur sigma 0.5 voxel,
noise 0.5 % of the maximum where the dose is above 5 %), as in the domain notes; the 2D case is
a 256 x 256 plane at 1 mm resampled (linearly) through the dose maximum from both volumes.
Settings: global gamma, 10 % cutoff, interp_fraction 10, max_gamma 2 for both.

Timed: ``gamma_map`` (the full gamma map, what pymedphys returns; warm, best of --repeats),
``gamma_pass_rate`` (pass/fail only: searches up to 1 x DTA) and pymedphys (one run after a
small warm-up call that loads its numba kernels). Goal: >= 30x faster than pymedphys on CPU for
128^3 at 2 %/2 mm. A CUDA figure is added when a GPU is present.

    python benchmarks/gamma.py [--repeats 3] [--threads N] [--no-pymedphys] [--json out.json]

``--threads N`` runs ours on N torch threads (``num_threads=N``) and pymedphys on N numba threads;
by default each runs with its own default (ours: 1 thread, see ``ml.metrics.gamma``; numba: all
cores). On a shared machine, timings with every core busy elsewhere are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PATIENT = REPO.parent / "shared" / "datasets" / "openkbp" / "train-pats" / "pt_1"
GOAL_RATIO = 30.0


def _best(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def perturb(ref: np.ndarray, spacing: tuple[float, ...], seed: int = 0) -> np.ndarray:
    """+2 % dose, 1.5 mm shift along axis 0, blur (sigma 0.5 voxel), 0.5 % noise where dose > 5 %."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    shift = np.zeros(ref.ndim)
    shift[0] = 1.5 / spacing[0]
    ev = ndimage.shift(ref.astype(np.float64), shift, order=1, mode="nearest")
    ev = ndimage.gaussian_filter(ev, 0.5) * 1.02
    ev = ev + rng.normal(0.0, 0.005 * ref.max(), ev.shape) * (ev > 0.05 * ref.max())
    return np.clip(ev, 0.0, None).astype(np.float32)


def load_openkbp() -> tuple[np.ndarray, tuple[float, float, float]] | None:
    from ml.data.openkbp import dense, read_sparse, read_voxel_dimensions

    if not PATIENT.is_dir():
        return None
    return dense(*read_sparse(PATIENT / "dose.csv.xz")), read_voxel_dimensions(PATIENT / "voxel_dimensions.csv.xz")


def plane_256(vol: np.ndarray, spacing: tuple[float, ...], centre: tuple[int, ...]) -> np.ndarray:
    """256 x 256 plane at 1 mm through ``centre`` (axes 0 and 1 of the volume), linear resampling."""
    from scipy import ndimage

    off = np.arange(256) - 127.5  # mm
    y = (centre[0] * spacing[0] + off) / spacing[0]
    x = (centre[1] * spacing[1] + off) / spacing[1]
    yy, xx = np.meshgrid(y, x, indexing="ij")
    zz = np.full_like(yy, centre[2])
    return ndimage.map_coordinates(vol.astype(np.float64), [yy, xx, zz], order=1, mode="constant").astype(np.float32)


def pymedphys_gamma(ref, ev, spacing, dose_percent, dta_mm):
    import pymedphys

    axes = tuple(np.arange(n) * s for n, s in zip(ref.shape, spacing, strict=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pymedphys.gamma(
            axes, ref, axes, ev, dose_percent, dta_mm, lower_percent_dose_cutoff=10, interp_fraction=10, max_gamma=2
        )


def gpr(g: np.ndarray) -> float:
    v = g[~np.isnan(g)]
    return float(100.0 * np.mean(v <= 1))


def pin_threads(threads: int | None, with_pymedphys: bool) -> None:
    """numba (pymedphys) on ``threads`` CPU threads (None: leave it); ours gets ``num_threads``."""
    if threads and with_pymedphys:
        import numba

        numba.set_num_threads(threads)


def bench_case(name, ref, ev, spacing, criterion, repeats, with_pymedphys, threads=None) -> dict:
    import torch

    from ml.metrics.gamma import gamma_map, gamma_pass_rate

    pin_threads(threads, with_pymedphys)
    kw = {"num_threads": threads} if threads else {}
    dp, dta = criterion
    gamma_map(ref, ev, spacing, dp, dta, **kw)  # builds and caches the search plan for this geometry
    gamma_pass_rate(ref, ev, spacing, dp, dta, **kw)
    t_map, g = _best(lambda: gamma_map(ref, ev, spacing, dp, dta, **kw), repeats)
    t_pass, pr = _best(lambda: gamma_pass_rate(ref, ev, spacing, dp, dta, **kw), repeats)
    out = {
        "case": name,
        "criterion": f"{dp}%/{dta}mm",
        "shape": list(ref.shape),
        "spacing_mm": list(spacing),
        "points": int(np.count_nonzero(~np.isnan(g))),
        "torch_threads": threads or 1,
        "ours_map_s": t_map,
        "ours_pass_rate_s": t_pass,
        "ours_gpr": gpr(g),
        "ours_fast_gpr": pr,
    }
    if with_pymedphys:
        t0 = time.perf_counter()
        gp = pymedphys_gamma(ref, ev, spacing, dp, dta)
        out["pymedphys_s"] = time.perf_counter() - t0
        out["pymedphys_gpr"] = gpr(gp)
        out["gpr_diff_pp"] = out["ours_gpr"] - out["pymedphys_gpr"]
        valid = ~np.isnan(gp)
        out["max_abs_gamma_diff"] = float(np.max(np.abs(g[valid] - gp[valid]))) if valid.any() else 0.0
        out["ratio_map"] = out["pymedphys_s"] / t_map
        out["ratio_pass_rate"] = out["pymedphys_s"] / t_pass
    if torch.cuda.is_available():
        gamma_map(ref, ev, spacing, dp, dta, device="cuda")
        out["cuda_map_s"], gc = _best(lambda: gamma_map(ref, ev, spacing, dp, dta, device="cuda"), repeats)
        out["cuda_gpr"] = gpr(gc)
        out["cuda_device"] = torch.cuda.get_device_name()
    return out


def summary(r: dict) -> str:
    s = (
        f"{r['case']} {r['criterion']} ({r['points']} points): "
        f"ours map {r['ours_map_s']:.3f} s, "
        f"pass-rate only {r['ours_pass_rate_s']:.3f} s (GPR {r['ours_gpr']:.2f}%)"
    )
    if "pymedphys_s" in r:
        s += (
            f" | pymedphys {r['pymedphys_s']:.2f} s (GPR {r['pymedphys_gpr']:.2f}%) | diff {r['gpr_diff_pp']:+.3f} pp"
            f", max |gamma diff| {r['max_abs_gamma_diff']:.1e}"
            f" | ratio {r['ratio_map']:.0f}x (pass-rate only {r['ratio_pass_rate']:.0f}x)"
        )
    if "cuda_map_s" in r:
        s += f" | CUDA ({r['cuda_device']}) {r['cuda_map_s']:.3f} s (GPR {r['cuda_gpr']:.2f}%)"
    return s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for torch and numba (both)")
    ap.add_argument("--no-pymedphys", action="store_true", help="time ours only")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    data = load_openkbp()
    if data is None:
        print("OpenKBP data absent (../shared): nothing to benchmark")
        return 0
    ref, spacing = data
    ev = perturb(ref, spacing)
    with_pmp = not args.no_pymedphys
    if with_pmp:  # load pymedphys' numba kernels outside the timings
        small = np.ones((4, 4, 4), np.float32)
        pymedphys_gamma(small, small, (1.0, 1.0, 1.0), 3, 3)
        pymedphys_gamma(small[0], small[0], (1.0, 1.0), 3, 3)
    pin_threads(args.threads, with_pmp)
    centre = tuple(int(i) for i in np.unravel_index(np.argmax(ref), ref.shape))
    ref2, ev2 = plane_256(ref, spacing, centre), plane_256(ev, spacing, centre)
    import torch

    numba_threads = "-"
    if with_pmp:
        import numba

        numba_threads = numba.get_num_threads()
    print(
        f"{os.cpu_count()} CPU cores; ours: torch {torch.__version__} on {args.threads or 1} thread(s); "
        f"pymedphys: numba on {numba_threads} thread(s)",
        flush=True,
    )
    results = []
    for crit in ((2, 2), (3, 3)):
        results.append(bench_case("3D 128^3", ref, ev, spacing, crit, args.repeats, with_pmp, args.threads))
        print(summary(results[-1]), flush=True)
    for crit in ((2, 2), (3, 3)):
        results.append(bench_case("2D 256^2 @1mm", ref2, ev2, (1.0, 1.0), crit, args.repeats, with_pmp, args.threads))
        print(summary(results[-1]), flush=True)
    goal = results[0]
    if "ratio_map" in goal:
        met = goal["ratio_map"] >= GOAL_RATIO
        print(
            f"goal >= {GOAL_RATIO:.0f}x vs pymedphys on CPU (3D 128^3, 2%/2mm, full map, {os.cpu_count()} cores): "
            f"{'met' if met else 'NOT met'} ({goal['ratio_map']:.0f}x)"
        )
    if args.json:
        args.json.write_text(json.dumps({"cores": os.cpu_count(), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
