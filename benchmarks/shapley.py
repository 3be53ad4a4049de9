"""Shapley fast-forward benchmark: cost of all modality coalitions relative to one forward pass.

BMMQA (M = 2: image, table) on a pack-shaped batch (``--batch`` x 2 x 64 x 64 images, the pack
default of ``ml.psqa.pack``, and ``--n-tab`` standardised complexity features), then the generic
``MultiModalNet`` for M = 4 (4 x 1 x 64 x 64 maps). Timed, all in one process:

(a) one plain forward pass (``model(image, table)``);
(b) the fast path: ONE encoder pass + the 2^M coalitions as one stacked head pass
    (``coalitions``) + the per-task Shapley values (``coalition_shapley``); (b) contains the
    full-model output, so it replaces (a) rather than adding to it;
(c) the naive path: 2^M separate full forward passes (``naive_*coalitions``) + the same
    Shapley values.

The ratios (b)/(a) (goal <= 1.3x for M = 2) and (c)/(a) are printed in inference mode and in
training mode, where (a) is one forward + backward of the training loss and (b)/(c) add the
contributions the way ``ml.psqa.train`` measures them: on a held-out batch of the same size with
the whole network in eval mode, without gradient (``eval_shapley``: one encoder pass + the
stacked coalition heads) (b), or 2^M full forward passes (c). Since the held-out batch needs its
own encoder pass, (b) is also shown amortised over ``shapley_every`` steps (the trainer's default,
2). The max |fast - naive| difference of the Shapley values is printed too. The CPU may be
shared: every time is the median of ``--repeats`` rounds after warm-up; a round runs each
variant once (rotating order), and a ratio is the median of the per-round ratios, so that load
changes hit the variants alike.

    python benchmarks/shapley.py [--threads 2] [--repeats 30] [--batch 32] [--n-tab 32]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ml.psqa.bmmqa import BMMQA, BMMQAConfig, coalition_masks  # noqa: E402
from ml.psqa.shapley import (  # noqa: E402
    MultiModalNet,
    coalition_shapley,
    eval_shapley,
    naive_bmmqa_coalitions,
    task_errors,
)
from ml.psqa.train import TrainConfig  # noqa: E402

GOAL_M2 = 1.3


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 3) -> dict[str, list[float]]:
    """Seconds per call, ``repeats`` rounds; within a round every variant runs once, in an order
    that rotates from round to round."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
    return times


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[t] - b[t]).abs().max()) for t in a)


def report(
    title: str,
    t: dict[str, list[float]],
    names: tuple[str, str, str],
    goal: float | None = None,
    labels: tuple[str, str, str] = ("one forward", "fast coalitions + Shapley", "naive 2^M forwards + Shapley"),
) -> None:
    """Median times; the ratios are medians of the per-round ratios (robust to load drifting
    between rounds on a shared machine)."""
    a, b, c = (t[n] for n in names)
    med = statistics.median

    def ratio(x, y):
        return med([xi / yi for xi, yi in zip(x, y, strict=True)])

    rb, rc = ratio(b, a), ratio(c, a)
    print(f"  {title}")
    print(f"    (a) {labels[0]:48s} {med(a) * 1e3:8.1f} ms")
    print(
        f"    (b) {labels[1]:48s} {med(b) * 1e3:8.1f} ms   (b)/(a) = {rb:5.2f}x"
        + (f"   goal <= {goal}x: {'met' if rb <= goal else 'NOT met'}" if goal else "")
    )
    print(f"    (c) {labels[2]:48s} {med(c) * 1e3:8.1f} ms   (c)/(a) = {rc:5.2f}x   (c)/(b) = {ratio(c, b):4.2f}x")


# ------------------------------------------------------------------------------------------
def bench_bmmqa(batch: int, n_tab: int, repeats: int) -> None:
    torch.manual_seed(0)
    model = BMMQA(BMMQAConfig(n_tab=n_tab)).eval()
    image = torch.randn(batch, 2, 64, 64)
    table = torch.randn(batch, n_tab)
    gpr = 90 + 10 * torch.rand(batch, 4)
    dd = torch.randn(batch, 1, 64, 64)

    def errs(o):
        return task_errors(o, gpr, dd)

    n_params = sum(p.numel() for p in model.parameters())
    print(f"BMMQA (M = 2), {n_params / 1e6:.2f} M parameters, batch {batch} x 2 x 64 x 64 + {n_tab} features")

    with torch.inference_mode():
        fast_phi = coalition_shapley(model.coalitions(image, table), errs)
        naive_phi = coalition_shapley(naive_bmmqa_coalitions(model, image, table), errs)
        full_fwd = model(image, table)
        full_co = model.coalitions(image, table)[("image", "table")]
    print(
        f"  max |phi_fast - phi_naive| = {max_diff(fast_phi, naive_phi):.2e} "
        f"(random targets); max |full coalition - forward| = {max_diff(full_co, full_fwd):.2e}"
    )

    with torch.inference_mode():
        t = interleaved(
            {
                "forward": lambda: model(image, table),
                "fast": lambda: coalition_shapley(model.coalitions(image, table), errs),
                "naive": lambda: coalition_shapley(naive_bmmqa_coalitions(model, image, table), errs),
            },
            repeats,
        )
    report(
        "inference (torch.inference_mode, eval)",
        t,
        ("forward", "fast", "naive"),
        GOAL_M2,
        labels=("one forward", "fast coalitions + Shapley", "naive 2^2 forwards + Shapley"),
    )

    # training step as in ml.psqa.train: forward + backward on the training batch, then the
    # contributions on a held-out batch (same size) with the network in eval mode, no gradient
    held_img, held_tab = torch.randn(batch, 2, 64, 64), torch.randn(batch, n_tab)
    held_gpr, held_dd = 90 + 10 * torch.rand(batch, 4), torch.randn(batch, 1, 64, 64)
    model.train()

    def step(extra: str | None):
        model.zero_grad(set_to_none=True)
        enc = model.encode(image, table)
        out = model.heads(enc)
        loss = (out["gpr"] - gpr).abs().mean() + (out["dd"] - dd).abs().mean()
        loss.backward()
        if extra == "fast":
            eval_shapley(model, held_img, held_tab, held_gpr, held_dd)
        elif extra == "naive":
            model.eval()
            with torch.no_grad():
                co = naive_bmmqa_coalitions(model, held_img, held_tab)
                coalition_shapley(co, lambda o: task_errors(o, held_gpr, held_dd))
            model.train()

    # BatchNorm running stats move in train mode; that does not change the cost
    t = interleaved(
        {"step": lambda: step(None), "fast": lambda: step("fast"), "naive": lambda: step("naive")}, max(repeats // 2, 5)
    )
    report(
        "training step (contributions on a held-out batch, eval mode, no gradient, as in ml.psqa.train)",
        t,
        ("step", "fast", "naive"),
        None,
        labels=(
            "forward + backward",
            "+ eval_shapley on a held-out batch (fast)",
            "+ naive 2^2 forwards on it + Shapley",
        ),
    )
    every = TrainConfig().shapley_every
    extra = statistics.median([b / a - 1 for a, b in zip(t["step"], t["fast"], strict=True)])
    print(
        f"    amortised over shapley_every = {every} steps: {1 + extra / every:.2f}x per step"
        f"   goal <= {GOAL_M2}x: {'met' if 1 + extra / every <= GOAL_M2 else 'NOT met'}"
    )
    model.eval()


def bench_multimodal(batch: int, repeats: int, m: int = 4) -> None:
    torch.manual_seed(0)
    net = MultiModalNet(m).eval()
    xs = [torch.randn(batch, 1, 64, 64) for _ in range(m)]
    y = torch.randn(batch, 4)
    ymap = torch.randn(batch, 1, 16, 16)
    names = tuple(f"m{i}" for i in range(m))
    keys = [tuple(n for n, on in zip(names, mask.tolist(), strict=True) if on) for mask in coalition_masks(m)]

    def errs(o):
        return {"y": (o["y"] - y).abs().mean(1), "map": (o["map"] - ymap).abs().flatten(1).mean(1)}

    def phi(outs):
        return coalition_shapley(dict(zip(keys, outs, strict=True)), errs, modalities=names)

    n_params = sum(p.numel() for p in net.parameters())
    print(f"MultiModalNet (M = {m}), {n_params / 1e6:.2f} M parameters, batch {batch} x {m} x 1 x 64 x 64")
    with torch.inference_mode():
        d = max_diff(phi(net.coalitions(xs)), phi(net.naive_coalitions(xs)))
        t = interleaved(
            {
                "forward": lambda: net(xs),
                "fast": lambda: phi(net.coalitions(xs)),
                "naive": lambda: phi(net.naive_coalitions(xs)),
            },
            max(repeats // 2, 5),
        )
    print(f"  max |phi_fast - phi_naive| = {d:.2e}")
    report(
        f"inference (torch.inference_mode, eval), 2^{m} = {2**m} coalitions",
        t,
        ("forward", "fast", "naive"),
        labels=("one forward", "fast coalitions + Shapley", f"naive 2^{m} forwards + Shapley"),
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--n-tab", type=int, default=32)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"machine: {_cpu_name()}, {os.cpu_count()} logical CPUs, load avg {load:.2f}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"medians of {args.repeats} interleaved rounds (training, M = 4: {max(args.repeats // 2, 5)}); "
        f"ratios = median of per-round ratios"
    )
    bench_bmmqa(args.batch, args.n_tab, args.repeats)
    bench_multimodal(args.batch, args.repeats)
    if hasattr(os, "getloadavg"):
        end = os.getloadavg()[0]
        note = " (above the CPU count: other processes shared the CPUs)" if end > (os.cpu_count() or 1) else ""
        print(f"load avg at the end {end:.2f}{note}")


if __name__ == "__main__":
    main()
