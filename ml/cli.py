"""``python -m ml ...``: the core's command line (no dagster, no mlflow).

    python -m ml sample-data --out DIR [--studies N] [--seed S]     synthetic H&N DICOM studies with planted PHI
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _sample_data(args: argparse.Namespace) -> int:
    from ml.data.sample_data import generate_hn_cohort

    t0 = time.perf_counter()
    truths = generate_hn_cohort(
        args.out, args.studies, seed=args.seed, matrix=args.matrix, pixel_spacing_mm=args.pixel_spacing,
        n_slices=args.slices, slice_thickness_mm=args.slice_thickness,
    )
    n_files = sum(len(t.ct_files) + (t.rtstruct_file is not None) + (t.rtdose_file is not None) for t in truths)
    print(json.dumps({"studies": len(truths), "files": n_files, "seconds": round(time.perf_counter() - t0, 2),
                      "out": str(Path(args.out).resolve())}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ml", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sd = sub.add_parser("sample-data", help="write synthetic head-and-neck DICOM studies (CT, RTSTRUCT, RTDOSE)")
    sd.add_argument("--out", required=True, type=Path)
    sd.add_argument("--studies", type=int, default=3)
    sd.add_argument("--seed", type=int, default=0)
    sd.add_argument("--matrix", type=int, default=128)
    sd.add_argument("--pixel-spacing", type=float, default=3.0)
    sd.add_argument("--slices", type=int, default=64)
    sd.add_argument("--slice-thickness", type=float, default=3.0)
    sd.set_defaults(func=_sample_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


def sample_data_entry() -> None:
    sys.exit(main(["sample-data", *sys.argv[1:]]))
