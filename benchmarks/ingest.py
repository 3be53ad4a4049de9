"""Ingestion benchmarks (printed ratios against a reference run in the same process).

1. DICOM series loading: ``ml.data.dicom.series.load_series_volume`` vs the plain way
   (``pydicom.dcmread`` + ``pixel_array`` of every file, then sort and stack) on the same
   files, page cache warm for both. Goal: >= 150 slices/s on the 2-core dev machine.
2. OpenKBP patient -> volumes: CSV parse + validation + compact cache (ingest), then from the
   cache to canonical volumes (what preprocessing and training read). Goal: <= 0.3 s per
   patient once cached.

    python benchmarks/ingest.py [--slices 160] [--matrix 512] [--patients 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_series(slices: int, matrix: int, repeats: int) -> dict:
    import pydicom

    from ml.data.dicom.series import load_series_volume
    from ml.data.synthetic import generate_hn_study

    with tempfile.TemporaryDirectory() as tmp:
        truth = generate_hn_study(
            tmp,
            seed=1,
            matrix=matrix,
            pixel_spacing_mm=500.0 / matrix,
            n_slices=slices,
            slice_thickness_mm=2.5,
            with_rtstruct=False,
            with_dose=False,
        )
        paths = [str(p) for p in truth.ct_files]
        rng = np.random.default_rng(0)
        rng.shuffle(paths)  # arrival order is not slice order
        for p in paths:  # warm the page cache for both contenders
            Path(p).read_bytes()

        def plain():
            items = []
            for p in paths:
                ds = pydicom.dcmread(p)
                arr = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
                items.append((float(ds.ImagePositionPatient[2]), arr))
            items.sort(key=lambda t: t[0])
            return np.stack([a for _, a in items])

        ref = plain()
        # full ingestion of the same files: parse + validate + de-identify + write + index
        from ml.data.dicom.deid import Pseudonymizer
        from ml.data.inbox import scan_landing_folder
        from ml.data.ingest import ingest_study
        from ml.data.quarantine import Quarantine

        p = Pseudonymizer("bench")
        group = next(iter(scan_landing_folder(truth.study_dir, p, use_cache=False).studies.values()))
        t0 = time.perf_counter()
        result = ingest_study(group, Path(tmp) / "lake", Quarantine(Path(tmp) / "q"), p, move_bad=False)
        t_ingest = time.perf_counter() - t0
        assert result.files_ingested == slices
        vol = load_series_volume(paths)
        assert np.array_equal(vol.array, ref), "benchmark contenders disagree"
        assert np.array_equal(vol.array, truth.hu.astype(np.float32))
        t_plain = _best(plain, repeats)
        t_ours = _best(lambda: load_series_volume(paths), repeats)
    return {
        "slices": slices,
        "matrix": matrix,
        "cores": os.cpu_count(),
        "plain_pydicom_slices_per_s": slices / t_plain,
        "ours_slices_per_s": slices / t_ours,
        "speedup_vs_plain": t_plain / t_ours,
        "full_ingest_deid_write_slices_per_s": slices / t_ingest,
    }


def bench_openkbp(n_patients: int) -> dict | None:
    from ml.data.ingest import pack_openkbp_patient, unpack_openkbp
    from ml.data.openkbp import canonical_geometry, load_patient, to_canonical_array
    from ml.data.volume import Volume, write_nifti
    from ml.utils.io import save_npz_deterministic

    src = REPO.parent / "shared" / "datasets" / "openkbp" / "train-pats"
    if not src.is_dir():
        print("OpenKBP data absent (../shared): skipping the OpenKBP benchmark")
        return None
    patients = sorted(p for p in src.iterdir() if p.is_dir())[:n_patients]
    t_csv, t_cache, t_nifti = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for pt in patients:
            t0 = time.perf_counter()
            patient = load_patient(pt)
            npz = Path(tmp) / f"{pt.name}.npz"
            save_npz_deterministic(npz, pack_openkbp_patient(patient))
            t_csv.append(time.perf_counter() - t0)
        for pt in patients:
            npz = Path(tmp) / f"{pt.name}.npz"
            t0 = time.perf_counter()
            p = unpack_openkbp(npz)
            geom = canonical_geometry(p.voxel_dimensions)
            vols = {
                "ct": Volume(to_canonical_array(p.ct_hu), **geom),
                "pdm": Volume(to_canonical_array(p.possible_dose_mask.astype(np.uint8)), **geom),
            }
            if p.dose is not None:
                vols["dose"] = Volume(to_canonical_array(p.dose), **geom)
            for name, m in p.structures.items():
                vols[name] = Volume(to_canonical_array(m.astype(np.uint8)), **geom)
            t_cache.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for name, v in vols.items():
                write_nifti(v, Path(tmp) / pt.name / f"{name}.nii.gz")
            t_nifti.append(time.perf_counter() - t0)
    return {
        "patients": len(patients),
        "csv_to_cache_s_per_patient": float(np.mean(t_csv)),
        "cache_to_volumes_s_per_patient": float(np.mean(t_cache)),
        "cache_to_volumes_max_s": float(np.max(t_cache)),
        "volumes_to_nifti_s_per_patient": float(np.mean(t_nifti)),
        "cache_vs_csv_speedup": float(np.mean(t_csv) / np.mean(t_cache)),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=160)
    ap.add_argument("--matrix", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--patients", type=int, default=10)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    out = {"series": bench_series(args.slices, args.matrix, args.repeats), "openkbp": bench_openkbp(args.patients)}
    s = out["series"]
    print(
        f"DICOM series ({s['slices']} x {s['matrix']}^2, {s['cores']} cores): plain pydicom "
        f"{s['plain_pydicom_slices_per_s']:.0f} slices/s | ours {s['ours_slices_per_s']:.0f} slices/s "
        f"| ratio {s['speedup_vs_plain']:.2f}x "
        f"| goal >= 150 slices/s: {'met' if s['ours_slices_per_s'] >= 150 else 'NOT met'} | full ingestion "
        f"(validate + de-identify + write + index) {s['full_ingest_deid_write_slices_per_s']:.0f} slices/s"
    )
    k = out["openkbp"]
    if k:
        print(
            f"OpenKBP ({k['patients']} patients): CSV -> cache {k['csv_to_cache_s_per_patient']:.3f} s/patient | "
            f"cache -> volumes {k['cache_to_volumes_s_per_patient']:.3f} s/patient (max "
            f"{k['cache_to_volumes_max_s']:.3f}) | ratio {k['cache_vs_csv_speedup']:.1f}x | NIfTI write "
            f"{k['volumes_to_nifti_s_per_patient']:.3f} s/patient | goal <= 0.3 s: "
            f"{'met' if k['cache_to_volumes_s_per_patient'] <= 0.3 else 'NOT met'}"
        )
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
