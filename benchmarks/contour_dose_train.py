"""Training throughput of the contour + dose models: slices/s and peak memory per variant, for the
trainer's own step (``ml.contour_dose.train.train_step``: forward, DWA-weighted dose L1 + combo
loss, backward, Adam) with fp32 contiguous tensors as the reference and channels-last and bf16
autocast as the alternatives, all in the same process.

    python benchmarks/contour_dose_train.py [--device cpu|cuda] [--variants multi-automated,product]
        [--widths 16,32,64,128,256] [--batch 8] [--steps 10] [--data CACHE]

With ``--data`` the batches are real slices from a contour-dose cache (the first training
patients); otherwise random tensors of the cache's 128 x 128 slice shape (throughput does not
depend on the values). Each configuration runs ``--warmup`` steps first, then ``--steps`` timed
ones; the configurations are interleaved ``--repeats`` times and the median is reported, so a
machine shared with other jobs hurts them alike. Prints one line per variant and configuration:
slices/s, ratio to the fp32 reference, peak memory (CUDA: ``max_memory_allocated``; CPU: the
process's peak RSS, which only grows).

Channels-last is timed on CUDA only unless ``--cpu-channels-last``: with torch 2.13's oneDNN
(v3.12) the backward of a 1x1 stride-2 convolution in NHWC with fewer input channels than the
kernel's channel block (our residual skip convolutions at width 8) writes past its workspace and
aborts the process ("double free or corruption"; oneDNN issue #6035). The trainer therefore uses
channels-last on CUDA only.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ml.contour_dose.losses import DWA
from ml.contour_dose.models import build_model
from ml.contour_dose.slices import build_slices, make_batch
from ml.contour_dose.train import TrainConfig, model_config, train_step
from ml.contour_dose.variants import VARIANTS, in_channels
from ml.utils.torch_utils import resolve_device, set_seed

SIZE = 128


def synthetic_batch(variant: str, batch: int, device: torch.device, gen: torch.Generator) -> dict[str, torch.Tensor]:
    k = len(VARIANTS[variant]["rois"])
    return {
        "x": torch.randn(batch, in_channels(variant), SIZE, SIZE, generator=gen).to(device),
        "dose": torch.rand(batch, 1, SIZE, SIZE, generator=gen).to(device),
        "label": torch.randint(0, k + 1, (batch, SIZE, SIZE), generator=gen).to(device),
        "pdm": (torch.rand(batch, SIZE, SIZE, generator=gen) > 0.3).to(device),
    }


def real_batches(cache_dir: Path, variant: str, batch: int, n: int, device: torch.device) -> list[dict]:
    from ml.contour_dose.cache import Cache
    from ml.contour_dose.train import ct_stats, load_split

    if "pred_masks" in VARIANTS[variant]["inputs"]:
        raise SystemExit("seq-automated needs a contour model: benchmark it with seq-human (same network)")
    cache = Cache.open(cache_dir)
    split = load_split(cache, None)
    ids = list(split.loc[split["split"] == "train", "patient_id"])[:3]
    entries = [cache.load(p) for p in ids]
    mean, std = ct_stats(entries)
    data = build_slices(entries, tuple(VARIANTS[variant]["rois"]), mean, std)
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        idx = torch.randint(0, data.n, (batch,), generator=g)
        out.append({k: v.to(device) for k, v in make_batch(data, idx, variant).items()})
    return out


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def run_config(
    variant: str,
    widths: tuple[int, ...],
    batches: list[dict],
    device: torch.device,
    channels_last: bool,
    amp: bool,
    warmup: int,
    steps: int,
) -> float:
    set_seed(0)
    cfg = TrainConfig(variant=variant, widths=widths)
    model = build_model(model_config(cfg)).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    weights = DWA(tuple(VARIANTS[variant]["tasks"])).weights()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        train_step(model, opt, batches[i % len(batches)], weights, device, amp, channels_last)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    return steps * batches[0]["x"].shape[0] / elapsed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--variants", default="dose-only,multi-automated,product")
    ap.add_argument("--widths", default="16,32,64,128,256")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--data", type=Path, default=None, help="a contour-dose cache (real slices)")
    ap.add_argument("--cpu-bf16", action="store_true", help="also time bf16 autocast on the CPU")
    ap.add_argument(
        "--cpu-channels-last",
        action="store_true",
        help="also time channels-last on the CPU (may abort: see the module docstring)",
    )
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    widths = tuple(int(w) for w in args.widths.split(","))
    cuda = device.type == "cuda"
    configs = [("fp32", False, False)]
    if cuda or args.cpu_channels_last:
        configs.append(("channels-last", True, False))
    if cuda or args.cpu_bf16:
        configs.append(("bf16", False, True))
    if cuda or (args.cpu_bf16 and args.cpu_channels_last):
        configs.append(("bf16+channels-last", True, True))
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(
        f"device {name}; torch {torch.__version__}; widths {widths}; batch {args.batch}; "
        f"{args.steps} timed steps x {args.repeats} repeats (median)"
    )
    for variant in args.variants.split(","):
        gen = torch.Generator().manual_seed(0)
        n = max(args.steps + args.warmup, 1)
        batches = (
            real_batches(args.data, variant, args.batch, n, device)
            if args.data
            else [synthetic_batch(variant, args.batch, device, gen) for _ in range(n)]
        )
        rates: dict[str, list[float]] = {c[0]: [] for c in configs}
        peaks: dict[str, float] = {}
        for _ in range(args.repeats):
            for label, cl, amp in configs:
                rates[label].append(run_config(variant, widths, batches, device, cl, amp, args.warmup, args.steps))
                peaks[label] = peak_memory_gb(device)
        ref = statistics.median(rates["fp32"])
        for label, _cl, _amp in configs:
            r = statistics.median(rates[label])
            print(
                f"{variant:16s} {label:20s} {r:8.1f} slices/s  {r / ref:5.2f}x fp32  "
                f"peak {'GPU' if device.type == 'cuda' else 'RSS'} {peaks[label]:.2f} GB"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
