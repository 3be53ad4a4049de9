"""The contour + dose training cache: size for all OpenKBP patients, load speed, batch assembly.

Prints, in one process: cache bytes (goal <= 120 MB for 169 patients), per-patient load time
from the cache vs from the OpenKBP CSVs (ratio), and the rate at which the trainer assembles
2.5D product-model batches from memory (slices/s, to compare with the ~1,500 slices/s an H100
trains a 2D U-Net at: ``domain-notes.md`` §5.1).

    python benchmarks/contour_dose_cache.py [--data ../shared/datasets/openkbp/train-pats] [--cache DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "datasets" / "openkbp" / "train-pats")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/contour_dose_cache_bench"))
    ap.add_argument("--timing-patients", type=int, default=10)
    args = ap.parse_args()

    import numpy as np
    import torch

    from ml.contour_dose.cache import Cache, pack_openkbp_dir
    from ml.contour_dose.slices import build_slices, make_batch
    from ml.contour_dose.variants import PRODUCT_ROIS
    from ml.data.openkbp import load_patient

    torch.set_num_threads(2)
    if not (args.cache / "meta.json").exists():
        t = time.perf_counter()
        index, skipped = pack_openkbp_dir(args.data, args.cache, log=lambda *_: None)
        print(f"packed {len(index)} patients ({len(skipped)} skipped) in {time.perf_counter() - t:.1f} s")
    cache = Cache.open(args.cache)
    total = int(cache.index["bytes"].sum())
    print(
        f"cache: {len(cache.index)} patients, {total / 1e6:.1f} MB ({total / len(cache.index) / 1e6:.2f} MB/patient; "
        f"goal <= 120 MB for 169)"
    )
    ids = cache.patient_ids[: args.timing_patients]
    t = time.perf_counter()
    entries = [cache.load(p) for p in ids]
    t_cache = (time.perf_counter() - t) / len(ids)
    t = time.perf_counter()
    for p in ids:
        load_patient(args.data / p)
    t_csv = (time.perf_counter() - t) / len(ids)
    print(
        f"load per patient: cache {t_cache * 1e3:.0f} ms vs OpenKBP CSV {t_csv * 1e3:.0f} ms ({t_csv / t_cache:.1f}x)"
    )
    data = build_slices(entries, PRODUCT_ROIS, 0.0, 500.0)
    g = torch.Generator().manual_seed(0)
    n, bs = 0, 32
    t = time.perf_counter()
    while time.perf_counter() - t < 3.0:
        make_batch(data, torch.randint(0, data.n, (bs,), generator=g), "product")
        n += bs
    rate = n / (time.perf_counter() - t)
    print(f"product batch assembly from memory (CPU): {rate:.0f} slices/s (batch {bs}, {data.n} slices held)")
    print(
        json.dumps(
            {
                "patients": len(cache.index),
                "cache_mb": round(total / 1e6, 1),
                "load_ms_cache": round(t_cache * 1e3, 1),
                "load_ms_csv": round(t_csv * 1e3, 1),
                "assembly_slices_per_s": round(rate),
                "shape_example": list(np.shape(entries[0].ct)),
            }
        )
    )


if __name__ == "__main__":
    main()
