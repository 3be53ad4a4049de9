"""The PSQA ablation on a simulated QA programme, without Dagster (what the note's table reports).

simulate N plans -> read the written DICOM back -> ``compute_plan_qa`` (gamma labels, DD maps,
complexity) -> stable split -> pack -> train BMMQA and every baseline with the same trainer ->
``ablation_table`` on the test split. Prints the table (markdown) and timings.

    python benchmarks/psqa_ablation.py --plans 600 --epochs 40 --out /tmp/psqa_ablation
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd


def build(out: Path, n_plans: int, seed: int, workers: int) -> Path:
    import pydicom

    from ml.data.dicom.headers import quiet_pydicom
    from ml.psqa.complexity import PLAN_METRICS
    from ml.psqa.dataset import LABEL_COLUMNS, criterion_column
    from ml.psqa.pack import build_pack, compute_plan_qa, save_planes
    from ml.psqa.simulator import simulate
    from ml.psqa.split import assign_splits

    pack_dir = out / "pack"
    if (pack_dir / "meta.json").exists():
        return pack_dir
    t = time.perf_counter()
    cache = out / "summary.json"  # the hidden truth stays outside the inbox
    if cache.exists():
        summary = json.loads(cache.read_text())
    else:
        summary = simulate(out / "inbox", n_plans, seed=seed, workers=workers)
        cache.write_text(json.dumps(summary, default=str))
        print(f"simulated {n_plans} plans in {time.perf_counter() - t:.0f} s ({workers} workers)")
    t = time.perf_counter()
    feats, labels, planes = [], [], []
    for s in summary:
        folder = out / "inbox" / s["plan_folder"]
        with quiet_pydicom():
            plan = pydicom.dcmread(next(folder.glob("RP_*.dcm")))
            doses = [pydicom.dcmread(p) for p in sorted(folder.glob("RD_*.dcm"))]
        qa = compute_plan_qa(plan, doses)
        key = s["plan_uid"]
        rel = f"planes/{len(planes):05d}.npz"
        save_planes(out / rel, qa)
        ident = {"plan_key": key, "patient_id": s["patient_id"]}
        feats.append({**ident, **qa.plan_metrics})
        labels.append({**ident, **{criterion_column(c): v for c, v in qa.gpr.items()}})
        planes.append({"plan_key": key, "path": rel})
    print(f"gamma labels + features for {n_plans} plans in {time.perf_counter() - t:.0f} s")
    features, labels_df, planes_df = pd.DataFrame(feats), pd.DataFrame(labels), pd.DataFrame(planes)
    split = assign_splits(labels_df, seed=0)
    cols = [c for c in PLAN_METRICS if c in features.columns]
    build_pack(pack_dir, planes_df, features, labels_df[["plan_key", *LABEL_COLUMNS]], split, out, cols)
    return pack_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plans", type=int, default=600)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--variants", default="all")
    ap.add_argument("--out", type=Path, default=Path("/tmp/psqa_ablation"))
    args = ap.parse_args()

    import torch

    from ml.psqa.dataset import load_pack
    from ml.psqa.evaluate import ablation_table
    from ml.psqa.predict import predict_models
    from ml.psqa.train import VARIANTS, TrainConfig, train

    torch.set_num_threads(2)
    pack_dir = build(args.out, args.plans, args.seed, args.workers)
    pack = load_pack(pack_dir)
    t = pack.table
    print(
        f"pack: {len(t)} plans, splits {t['split'].value_counts().to_dict()}, "
        f"GPR<90 % at 2%/2mm: {(t['gpr_2_2'] < 90).mean():.1%}"
    )
    variants = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    dirs, timing = {}, {}
    for v in variants:
        d = args.out / "models" / v
        if not (d / "metrics.json").exists():
            t0 = time.perf_counter()
            train(
                pack_dir, d, TrainConfig(variant=v, epochs=args.epochs, device=args.device, seed=0), log=lambda *_: None
            )
            timing[v] = time.perf_counter() - t0
        m = json.loads((d / "metrics.json").read_text())
        print(
            f"{v}: best epoch {m['best_epoch']}/{m['epochs_run']}, {m['train_samples_per_s']:.0f} samples/s, "
            f"{timing.get(v, float('nan')):.0f} s"
        )
        dirs[v] = str(d)
    rows_t = pack.split("test")
    table = ablation_table(predict_models(dirs, pack_dir), rows_t, pack.dd_for(rows_t), pack.split("train"))
    cols = [
        "model",
        "MAE 3%/3mm",
        "MAE 2%/3mm",
        "MAE 2%/2mm",
        "MAE GPR<90 (2%/2mm)",
        "AUC fail (2%/2mm)",
        "Spearman (2%/2mm)",
        "DD SSIM mean",
        "DD MAE (%)",
    ]
    print(table[[c for c in cols if c in table.columns]].to_markdown(index=False, floatfmt=".3f"))
    table.to_csv(args.out / "ablation.csv", index=False)
    n_fail = int((pack.split("test")["gpr_2_2"] < 90).sum())
    print(f"test plans: {len(pack.split('test'))} ({n_fail} with GPR < 90 % at 2%/2mm)")


if __name__ == "__main__":
    main()
