"""The PSQA ablation on a simulated QA programme, without Dagster (what the note's table reports).

simulate N plans -> read the written DICOM back -> ``compute_plan_qa`` (gamma labels, DD maps,
complexity, machine identity) -> stable split -> pack (complexity metrics + one-hot treatment
machine and QA device) -> train BMMQA and every baseline with the same trainer, once per seed ->
``ablation_table`` on the test split per seed (with the mean and the median predictor) -> mean ±
95 % CI over the seeds (Student t-interval, ``ml.psqa.evaluate.seed_summary``). Prints the tables
(markdown) and timings; writes ``ablation_seeds.csv`` (one row per seed and model) and
``ablation_summary.csv`` / ``ablation_summary.md``.

    python benchmarks/psqa_ablation.py --plans 1000 --epochs 40 --seeds 0,1,2 --out /tmp/psqa_ablation

Training options of ``ml.psqa.train.TrainConfig`` can be overridden with ``--train-json`` (e.g.
'{"modality_dropout": 0.0}' for an ablation of the dropout).
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
    from ml.psqa.pack import MACHINE_COLUMNS, build_pack, compute_plan_qa, save_planes
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
        feats.append({**ident, **qa.plan_metrics, **qa.machine})
        labels.append({**ident, **{criterion_column(c): v for c, v in qa.gpr.items()}})
        planes.append({"plan_key": key, "path": rel})
    print(f"gamma labels + features for {n_plans} plans in {time.perf_counter() - t:.0f} s")
    features, labels_df, planes_df = pd.DataFrame(feats), pd.DataFrame(labels), pd.DataFrame(planes)
    split = assign_splits(labels_df, seed=0)
    cols = [c for c in PLAN_METRICS if c in features.columns]
    build_pack(
        pack_dir,
        planes_df,
        features,
        labels_df[["plan_key", *LABEL_COLUMNS]],
        split,
        out,
        cols,
        categorical_columns=MACHINE_COLUMNS,
    )
    return pack_dir


COLUMNS = [
    "MAE 3%/3mm",
    "MAE 2%/3mm",
    "MAE 2%/2mm",
    "MAE GPR<90 (2%/2mm)",
    "AUC fail (2%/2mm)",
    "Spearman (2%/2mm)",
    "DD SSIM mean",
    "DD MAE (%)",
]


def summarise(per_seed: pd.DataFrame, columns: list[str] = COLUMNS) -> tuple[pd.DataFrame, str]:
    """(mean and 95 % CI half-width per model and metric, the markdown table of mean ± CI)."""
    from ml.psqa.evaluate import seed_summary, seed_summary_markdown

    cols = [c for c in columns if c in per_seed.columns]
    summary = seed_summary(per_seed, cols)
    return summary, seed_summary_markdown(summary, cols)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plans", type=int, default=600)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--seed", type=int, default=7, help="simulation seed (the plans)")
    ap.add_argument("--seeds", default="0", help="training seeds, comma-separated (3-5 for a CI)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--variants", default="all")
    ap.add_argument("--train-json", default="", help="TrainConfig overrides for every run")
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
        f"GPR<90 % at 2%/2mm: {(t['gpr_2_2'] < 90).mean():.1%}, features {len(pack.feature_columns)} "
        f"(one-hot: {pack.meta.get('one_hot_columns', [])})"
    )
    variants = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    overrides = json.loads(args.train_json) if args.train_json else {}
    rows_t = pack.split("test")
    tables = []
    for seed in seeds:
        dirs, timing = {}, {}
        for v in variants:
            # one seed keeps the old layout (models/<variant>) so earlier runs are reused
            d = args.out / "models" / v if len(seeds) == 1 and seed == 0 else args.out / "models" / f"seed{seed}" / v
            if not (d / "metrics.json").exists():
                t0 = time.perf_counter()
                cfg = TrainConfig(variant=v, epochs=args.epochs, device=args.device, seed=seed, **overrides)
                train(pack_dir, d, cfg, log=lambda *_: None)
                timing[v] = time.perf_counter() - t0
            m = json.loads((d / "metrics.json").read_text())
            print(
                f"seed {seed} {v}: best epoch {m['best_epoch']}/{m['epochs_run']} "
                f"(selectable from {m.get('selection_start_epoch', 0)}), "
                f"{m['train_samples_per_s']:.0f} samples/s, {timing.get(v, float('nan')):.0f} s"
            )
            dirs[v] = str(d)
        table = ablation_table(predict_models(dirs, pack_dir), rows_t, pack.dd_for(rows_t), pack.split("train"))
        table.insert(0, "seed", seed)
        tables.append(table)
        print(table[["model", *[c for c in COLUMNS if c in table.columns]]].to_markdown(index=False, floatfmt=".3f"))
    per_seed = pd.concat(tables, ignore_index=True)
    per_seed.to_csv(args.out / "ablation_seeds.csv", index=False)
    if len(seeds) == 1:
        per_seed.drop(columns=["seed"]).to_csv(args.out / "ablation.csv", index=False)
    summary, md = summarise(per_seed)
    summary.to_csv(args.out / "ablation_summary.csv", index=False)
    (args.out / "ablation_summary.md").write_text(md + "\n")
    print(f"\nmean ± 95 % CI (t-interval) over {len(seeds)} seed(s):")
    print(md)
    n_fail = int((rows_t["gpr_2_2"] < 90).sum())
    print(f"test plans: {len(rows_t)} ({n_fail} with GPR < 90 % at 2%/2mm)")


if __name__ == "__main__":
    main()
