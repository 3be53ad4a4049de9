"""``python -m ml ...``: the core's command line (no dagster, no mlflow).

python -m ml sample-data --out DIR [--studies N] [--seed S]     synthetic H&N DICOM studies with planted PHI
python -m ml psqa simulate --out DIR --plans N --seed S [--batch B] [--start S] [--workers W] [--truth FILE]
                                                              IMRT QA digital twin: plans, dose planes, QA CSV
python -m ml contour-dose pack --data DIR --out CACHE                OpenKBP pt_N/ folders -> compact cache
python -m ml contour-dose train --data DIR --out MODEL_DIR [--model multi-automated|dose-only|...]
                                [--device cuda] [--max-minutes N]  DIR: a cache or OpenKBP pt_N/ folders
python -m ml contour-dose predict --data DIR --model MODEL_DIR --out PRED_DIR [--tta]
                                                              one pt_N.csv per patient (submission format)
python -m ml contour-dose evaluate --data CACHE --model MODEL_DIR [MODEL_DIR ...] [--split test] [--tta]
                                   [--tables DIR]             OpenKBP dose/DVH scores, Dice per ROI, seed tables
python -m ml glioma train --data DIR --out MODEL_DIR [--max-minutes N] [--device cuda] [--epochs N]
                                                              GMMAS on patients/<id>.npz (+ labels.csv)
python -m ml glioma predict --data DIR --model MODEL_DIR --out PRED_DIR   predictions.csv + masks/<id>.npz
python -m ml glioma predict --nifti CASE_DIR --model MODEL_DIR --out LABEL.nii.gz    3D BraTS-layout case
python -m ml glioma cv --data DIR --out CV_DIR [--variant gmmas ...] [--folds 5]      out-of-fold predictions
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

__all__ = ["build_parser", "main", "sample_data_entry"]


def _sample_data(args: argparse.Namespace) -> int:
    from ml.data.synthetic import generate_hn_cohort

    t0 = time.perf_counter()
    truths = generate_hn_cohort(
        args.out,
        args.studies,
        seed=args.seed,
        matrix=args.matrix,
        pixel_spacing_mm=args.pixel_spacing,
        n_slices=args.slices,
        slice_thickness_mm=args.slice_thickness,
    )
    n_files = sum(len(t.ct_files) + (t.rtstruct_file is not None) + (t.rtdose_file is not None) for t in truths)
    print(
        json.dumps(
            {
                "studies": len(truths),
                "files": n_files,
                "seconds": round(time.perf_counter() - t0, 2),
                "out": str(Path(args.out).resolve()),
            }
        )
    )
    return 0


def _bmmqa(args: argparse.Namespace) -> int:
    from ml.psqa import predict as P

    if args.action == "train":
        from ml.psqa.train import TrainConfig, train

        # unset options keep TrainConfig's defaults (lr 1e-4 with warm-up, L1 GPR loss, ...)
        given = {
            k: v
            for k, v in {
                "lr": args.lr,
                "lr_warmup": args.lr_warmup,
                "modality_dropout": args.modality_dropout,
                "shapley_holdout": args.shapley_holdout,
                "gpr_loss": args.gpr_loss,
            }.items()
            if v is not None
        }
        cfg = TrainConfig(
            variant=args.variant,
            epochs=args.epochs,
            batch_size=args.batch_size,
            seed=args.seed,
            device=args.device,
            max_minutes=args.max_minutes,
            patience=args.patience,
            warmup_epochs=args.warmup_epochs,
            checkpoint_minutes=args.checkpoint_minutes,
            log_every=args.log_every,
            model=json.loads(args.model_json) if args.model_json else {},
            **given,
        )
        metrics = train(args.data, args.out, cfg)
        print(json.dumps(metrics))
        return 0
    if args.action == "predict":
        import numpy as np

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        df, dd = P.predict(args.model, args.data, None if args.split == "all" else args.split, args.device)
        df.to_parquet(out / "predictions.parquet", index=False)
        if dd is not None:
            np.save(out / "dd_pred.npy", dd.astype(np.float32))
        print(json.dumps({"plans": len(df), "out": str(out.resolve())}))
        return 0
    from ml.psqa.dataset import load_pack
    from ml.psqa.evaluate import split_metrics

    pack = load_pack(args.data)
    rows = pack.split(args.split)
    df, dd = P.predict(args.model, args.data, args.split, args.device)
    result = split_metrics(df, dd, rows, pack.dd_for(rows), args.split)
    text = json.dumps(result, indent=2, default=float)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


def _psqa(args: argparse.Namespace) -> int:
    import csv

    import numpy as np

    from ml.psqa.simulator import csv_name, simulate

    out = Path(args.out).resolve()
    truth = Path(args.truth).resolve() if args.truth else None
    if truth is not None and (truth == out or out in truth.parents):
        raise SystemExit("--truth must lie outside --out (the inbox must not hold the simulation truth)")
    t0 = time.perf_counter()
    summary = simulate(out, args.plans, seed=args.seed, batch=args.batch, start_index=args.start, workers=args.workers)
    seconds = time.perf_counter() - t0
    if truth is not None and summary:
        truth.parent.mkdir(parents=True, exist_ok=True)
        with open(truth, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(summary[0]), lineterminator="\n")
            w.writeheader()
            w.writerows(summary)
    g = np.array([s["gpr_2_2"] for s in summary], float)
    print(
        json.dumps(
            {
                "plans": len(summary),
                "patients": len({s["patient_id"] for s in summary}),
                "files": int(sum(2 * s["n_beams"] + 3 for s in summary)) + 1,
                "seconds": round(seconds, 2),
                "seconds_per_plan": round(seconds / max(len(summary), 1), 3),
                "gpr_2_2_median": round(float(np.median(g)), 2) if g.size else None,
                "fraction_gpr_2_2_below_90": round(float(np.mean(g < 90.0)), 4) if g.size else None,
                "out": str(out),
                "qa_csv": str(out / "qa_results" / csv_name(args.batch, args.start)),
                "truth": str(truth) if truth else None,
            }
        )
    )
    return 0


def _contour_dose(args: argparse.Namespace) -> int:
    from ml.contour_dose import cache as C

    if args.cd_cmd == "pack":
        t0 = time.perf_counter()
        index, skipped = C.pack_openkbp_dir(args.data, args.out, require_dose=not args.allow_missing_dose)
        print(
            json.dumps(
                {
                    "patients": len(index),
                    "skipped": len(skipped),
                    "bytes": int(index["bytes"].sum()),
                    "seconds": round(time.perf_counter() - t0, 1),
                    "out": str(Path(args.out).resolve()),
                }
            )
        )
        return 0
    if args.cd_cmd == "train":
        from ml.contour_dose.train import TrainConfig, train

        data = Path(args.data)
        if not (data / "meta.json").exists():  # raw OpenKBP folders: pack them next to the model first
            cache_dir = Path(args.out) / "cache"
            if not (cache_dir / "meta.json").exists():
                C.pack_openkbp_dir(data, cache_dir)
            data = cache_dir
        cfg = TrainConfig(
            variant=args.model,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            steps_per_epoch=args.steps_per_epoch,
            seed=args.seed,
            device=args.device,
            max_minutes=args.max_minutes,
            patience=args.patience,
            augment=not args.no_augment,
            widths=tuple(int(w) for w in args.widths.split(",")),
            oof_folds=args.oof_folds,
            partial_labels=not args.no_partial_labels,
            soft_window={"on": True, "off": False, "variant": None}[args.soft_window],
            oversample_rate=args.oversample_rate,
            class_weights=args.class_weights,
            contour_model=str(args.contour_model) if args.contour_model else None,
            amp=args.amp,
            checkpoint_minutes=args.checkpoint_minutes,
            log_every=args.log_every,
        )
        metrics = train(data, args.out, cfg, split=args.split)
        print(json.dumps(metrics, default=float))
        return 0
    if args.cd_cmd == "evaluate":
        import tempfile

        from ml.contour_dose.cache import Cache
        from ml.contour_dose.evaluate import evaluate, markdown_tables
        from ml.contour_dose.predict import predict_cases
        from ml.contour_dose.train import load_split
        from ml.utils.io import json_safe

        models = {json.loads((Path(m) / "config.json").read_text())["variant"]: m for m in args.model}
        cache = Cache.open(args.data)
        split = load_split(cache, args.split_file)
        ids = sorted(split.loc[split["split"] == args.split, "patient_id"])
        with tempfile.TemporaryDirectory() as tmp:
            preds = predict_cases(
                models, args.data, ids, args.pred_dir or tmp, device=args.device, tta_flip=args.tta, log=lambda *_: None
            )
            res = evaluate(preds, args.data)
        out = {
            "split": args.split,
            "patients": len(ids),
            "tta": args.tta,
            "scores": res["scores"].to_dict(orient="records"),
        }
        if "contours" in res:
            out["dice_per_roi"] = {
                v: df.groupby("roi")["dice"].mean().round(4).to_dict() for v, df in res["contours"].items()
            }
        tables = markdown_tables(res)
        out["tables"] = sorted(tables)
        if args.tables:
            args.tables.mkdir(parents=True, exist_ok=True)
            for name, md in tables.items():
                (args.tables / name).write_text(md + "\n")
            res["per_patient"].to_csv(args.tables / "per_patient.csv", index=False)
            for v, df in res["dvh"].items():
                df.to_csv(args.tables / f"dvh_{v}.csv", index=False)
            for v, df in res["contours"].items():
                df.to_csv(args.tables / f"contours_{v}.csv", index=False)
        text = json.dumps(json_safe(out), indent=2, default=float, allow_nan=False)
        if args.out:
            Path(args.out).write_text(text)
        print(text)
        return 0
    from ml.contour_dose.predict import predict_openkbp_dir

    summary = predict_openkbp_dir(args.model, args.data, args.out, device=args.device, tta_flip=args.tta)
    print(
        json.dumps(
            {
                "patients": int((summary["status"] == "ok").sum()),
                "skipped": int((summary["status"] != "ok").sum()),
                "out": str(Path(args.out).resolve()),
            }
        )
    )
    return 0 if (summary["status"] == "ok").any() else 1


def _glioma_config(args: argparse.Namespace):
    from ml.glioma.train import TrainConfig

    return TrainConfig(
        epochs=args.epochs,
        seed=args.seed,
        device=args.device,
        max_minutes=args.max_minutes,
        checkpoint_minutes=args.checkpoint_minutes,
        log_every=args.log_every,
        amp=args.amp,
        batch_size=args.batch_size,
        lr=args.lr,
        widths=tuple(int(w) for w in args.widths.split(",")),
        weighting=args.weighting,
        cutmix=not args.no_cutmix,
        pseudo_labels=not args.no_pseudo_labels,
        distill=not args.no_distill,
        withhold_labels=args.withhold_labels,
    )


def _glioma(args: argparse.Namespace) -> int:
    if args.gl_cmd == "train":
        from ml.glioma.train import train

        metrics = train(args.data, args.out, _glioma_config(args))
        print(json.dumps(metrics, indent=2))
        return 0
    if args.gl_cmd == "predict":
        from ml.glioma import predict as P

        if args.nifti is not None:
            print(json.dumps(P.predict_nifti(args.nifti, args.model, args.out, device=args.device), indent=2))
            return 0
        if args.data is None:
            raise SystemExit("predict needs --data DIR (shared layout) or --nifti CASE_DIR")
        df = P.predict_dir(args.data, args.model, args.out, device=args.device, mc=args.mc)
        print(df.to_string(index=False, max_rows=20))
        return 0
    if args.gl_cmd == "cv":
        import pandas as pd

        from ml.glioma.cv import run_cv
        from ml.glioma.data import load_dataset
        from ml.glioma.split import cv_folds

        ds = load_dataset(args.data)
        folds = pd.read_csv(args.folds_file) if args.folds_file else cv_folds(ds.labels, n_folds=args.folds, seed=0)
        for v in args.variant:
            oof = run_cv(ds, args.out, folds, _glioma_config(args), variant=v)
            if not oof.empty:
                print(f"{v}: {len(oof)} out-of-fold patients, mean Dice {oof['dice'].mean():.3f}")
        return 0
    raise SystemExit(f"unknown glioma command {args.gl_cmd}")


def _glioma_train_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--widths", default="16,32,64,128")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weighting", default="kendall", choices=["kendall", "equal"])
    p.add_argument("--no-cutmix", action="store_true")
    p.add_argument("--no-pseudo-labels", action="store_true")
    p.add_argument("--no-distill", action="store_true")
    p.add_argument("--withhold-labels", type=float, default=0.0, help="hide the labels of this fraction (UPS study)")
    p.add_argument("--device", default="auto")
    p.add_argument("--max-minutes", type=float, default=None, help="time budget, checked after every step")
    p.add_argument("--amp", default="off", choices=["auto", "bf16", "off"], help="off: fp32 (faster on this CPU)")
    _engine_options(p)


def _engine_options(p: argparse.ArgumentParser) -> None:
    """The shared training engine's checkpoint and progress options."""
    p.add_argument(
        "--checkpoint-minutes",
        type=float,
        default=5.0,
        help="also checkpoint every N minutes inside an epoch (resumable mid-epoch); default 5",
    )
    p.add_argument("--log-every", type=int, default=0, help="progress line every N steps (default: every 30 s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ml", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
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

    bm = sub.add_parser("bmmqa", help="train / predict / evaluate BMMQA and its baselines on a pack")
    bm.add_argument("action", choices=["train", "predict", "evaluate"])
    bm.add_argument("--data", required=True, type=Path, help="pack directory (dataset.parquet, images.npy, dd.npy)")
    bm.add_argument("--out", type=Path, help="train: model dir; predict: prediction dir; evaluate: metrics json")
    bm.add_argument("--model", type=Path, help="trained model dir (predict/evaluate)")
    bm.add_argument(
        "--variant",
        default="bmmqa",
        choices=["bmmqa", "bmmqa_nobal", "concat", "tab_only", "img_only", "gpr_only", "dd_only"],
    )
    bm.add_argument("--epochs", type=int, default=60)
    bm.add_argument("--batch-size", type=int, default=32)
    bm.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-4, the spec's)")
    bm.add_argument("--lr-warmup", type=float, default=None, help="linear warm-up, fraction of all steps (0.05)")
    bm.add_argument("--modality-dropout", type=float, default=None, help="per plan and modality (0.2)")
    bm.add_argument(
        "--shapley-holdout", type=float, default=None, help="training fraction held out for the contributions (0.1)"
    )
    bm.add_argument("--gpr-loss", choices=["l1", "huber"], default=None, help="GPR loss in points (l1)")
    bm.add_argument("--seed", type=int, default=0)
    bm.add_argument("--patience", type=int, default=15)
    bm.add_argument("--warmup-epochs", type=int, default=5, help="epochs before the Shapley balancing starts")
    bm.add_argument("--device", default="auto")
    bm.add_argument("--max-minutes", type=float, default=None, help="time budget, checked after every step")
    _engine_options(bm)
    bm.add_argument("--split", default="test")
    bm.add_argument("--model-json", default="", help="BMMQAConfig overrides, e.g. '{\"enc_widths\": [16,32,64,128]}'")
    bm.set_defaults(func=_bmmqa)

    ps = sub.add_parser("psqa", help="patient-specific QA tools")
    ps_sub = ps.add_subparsers(dest="psqa_cmd", required=True)
    sim = ps_sub.add_parser("simulate", help="IMRT QA digital twin: RT Plan + planned/measured RT Dose + QA CSV")
    sim.add_argument("--out", required=True, type=Path, help="inbox directory to write into")
    sim.add_argument("--plans", type=int, default=20)
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--batch", type=int, default=0, help="a new batch gives new patients, UIDs and CSV")
    sim.add_argument("--start", type=int, default=0, help="first plan index within the batch")
    sim.add_argument("--workers", type=int, default=None, help="processes (default: min(2, cpu count))")
    sim.add_argument(
        "--truth",
        type=Path,
        default=None,
        help="CSV of the hidden truth per plan (fault, machine state); must lie outside --out",
    )
    sim.set_defaults(func=_psqa)

    cd = sub.add_parser("contour-dose", help="CTAN contour + dose models on OpenKBP-format data")
    cd_sub = cd.add_subparsers(dest="cd_cmd", required=True)
    pk = cd_sub.add_parser("pack", help="OpenKBP pt_N/ folders -> compact training cache")
    pk.add_argument("--data", required=True, type=Path)
    pk.add_argument("--out", required=True, type=Path)
    pk.add_argument("--allow-missing-dose", action="store_true", help="keep patients without dose (prediction only)")
    pk.set_defaults(func=_contour_dose)
    tr = cd_sub.add_parser("train", help="train (or resume) one model variant")
    tr.add_argument("--data", required=True, type=Path, help="a cache directory or OpenKBP pt_N/ folders")
    tr.add_argument("--out", required=True, type=Path, help="model directory (resumes from its checkpoint)")
    tr.add_argument(
        "--model",
        default="multi-automated",
        choices=["dose-only", "contour-only", "seq-human", "seq-automated", "multi-automated", "product"],
    )
    tr.add_argument("--contour-model", type=Path, default=None, help="seq-automated: trained contour-only model dir")
    tr.add_argument("--split", type=Path, default=None, help="parquet/csv (patient_id, split); default: seeded split")
    tr.add_argument("--epochs", type=int, default=100)
    tr.add_argument("--steps-per-epoch", type=int, default=None)
    tr.add_argument("--batch-size", type=int, default=8)
    tr.add_argument("--lr", type=float, default=1e-4)
    tr.add_argument("--widths", default="32,64,128,256,512")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--patience", type=int, default=20)
    tr.add_argument(
        "--oof-folds", type=int, default=3, help="seq-automated: folds of out-of-fold predicted masks (0: in-sample)"
    )
    tr.add_argument(
        "--no-partial-labels", action="store_true", help="teach unannotated ROIs as background (the old loss)"
    )
    tr.add_argument(
        "--soft-window",
        choices=["variant", "on", "off"],
        default="variant",
        help="soft-tissue CT channel W400/L40 (variant: the product model has it)",
    )
    tr.add_argument("--oversample-rate", type=float, default=None, help="share of each epoch's slices per rare ROI")
    tr.add_argument("--class-weights", default=None, help="none | inv_sqrt_freq (default: the variant's)")
    tr.add_argument("--no-augment", action="store_true")
    tr.add_argument("--device", default="auto")
    tr.add_argument("--max-minutes", type=float, default=None, help="time budget, checked after every step")
    _engine_options(tr)
    tr.add_argument(
        "--amp",
        default="auto",
        choices=["auto", "bf16", "off"],
        help="bf16 autocast: auto = on CUDA only; bf16 = also on a CPU with AVX512-BF16",
    )
    tr.set_defaults(func=_contour_dose)
    pr = cd_sub.add_parser("predict", help="OpenKBP pt_N/ folders -> PRED_DIR/pt_N.csv (+ contours)")
    pr.add_argument("--data", required=True, type=Path)
    pr.add_argument("--model", required=True, type=Path)
    pr.add_argument("--out", required=True, type=Path)
    pr.add_argument("--device", default="auto")
    pr.add_argument("--tta", action="store_true", help="average with the left/right-flipped prediction")
    pr.set_defaults(func=_contour_dose)
    ev = cd_sub.add_parser("evaluate", help="OpenKBP dose/DVH scores and Dice of trained models on a cache split")
    ev.add_argument("--data", required=True, type=Path, help="cache directory")
    ev.add_argument("--model", required=True, type=Path, nargs="+", help="one or more trained model dirs")
    ev.add_argument("--split", default="test")
    ev.add_argument("--split-file", type=Path, default=None, help="parquet/csv (patient_id, split)")
    ev.add_argument("--pred-dir", type=Path, default=None, help="keep the predictions (npz) here")
    ev.add_argument("--out", type=Path, default=None, help="write the JSON here too")
    ev.add_argument(
        "--tables",
        type=Path,
        default=None,
        help="write the seed's markdown tables (scores, DVH-MAE + t-tests, Dice/HD95) and the per-patient CSVs here",
    )
    ev.add_argument("--device", default="auto")
    ev.add_argument("--tta", action="store_true")
    ev.set_defaults(func=_contour_dose)

    gl = sub.add_parser("glioma", help="GMMAS glioma MRI model: train / predict / cross-validate")
    gl_sub = gl.add_subparsers(dest="gl_cmd", required=True)
    gtr = gl_sub.add_parser("train", help="train (or resume) GMMAS on a shared-layout data dir")
    gtr.add_argument("--data", required=True, type=Path, help="DIR with patients/<id>.npz and optional labels.csv")
    gtr.add_argument("--out", required=True, type=Path, help="model directory (resumes from its checkpoint)")
    _glioma_train_options(gtr)
    gtr.set_defaults(func=_glioma)
    gpr = gl_sub.add_parser("predict", help="predictions.csv + masks/<id>.npz (labels not needed)")
    gpr.add_argument("--data", type=Path, default=None, help="DIR with patients/<id>.npz")
    gpr.add_argument("--nifti", type=Path, default=None, help="a 3D case folder (one NIfTI per sequence)")
    gpr.add_argument("--model", required=True, type=Path)
    gpr.add_argument("--out", required=True, type=Path, help="PRED_DIR (or the label NIfTI path with --nifti)")
    gpr.add_argument("--mc", type=int, default=10, help="MC-dropout passes for the uncertainty (0: none)")
    gpr.add_argument("--device", default="auto")
    gpr.set_defaults(func=_glioma)
    gcv = gl_sub.add_parser("cv", help="stratified patient-level cross-validation (out-of-fold predictions)")
    gcv.add_argument("--data", required=True, type=Path)
    gcv.add_argument("--out", required=True, type=Path)
    gcv.add_argument("--variant", nargs="+", default=["gmmas"], help="gmmas, equal_weights, no_cutmix, stl_idh, ...")
    gcv.add_argument("--folds", type=int, default=5)
    gcv.add_argument("--folds-file", type=Path, default=None, help="csv patient_id, fold (default: stratified, seed 0)")
    _glioma_train_options(gcv)
    gcv.set_defaults(func=_glioma)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


def sample_data_entry() -> None:
    sys.exit(main(["sample-data", *sys.argv[1:]]))
