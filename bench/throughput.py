"""Training and inference images/s of every registered backbone: a plain fp32 loop against alnus's path.

For each backbone at its native input size, in one process, on copies of the same weights and one batch:
- baseline: what a user would write: `model.train()`, fp32, contiguous NCHW, `torch.optim.AdamW`; for
  inference `model.eval()` under `torch.no_grad()`;
- ours: `alnus._hardware.choose_precision(device, "auto")` (bf16 autocast + channels_last on CPUs with AMX
  or AVX512-BF16), fused AdamW; inference under `torch.inference_mode()`;
- ours+compile (backbones named in `--compile`): ours under `torch.compile`; inference compiled with
  inductor's weight freezing (batch norm folded into the convolutions, weights pre-packed for oneDNN).
  The first call of each mode (the compilation) is timed on its own and kept out of the medians.
Steps of the variants alternate (A B C, then C B A, ...) so that load from other processes hits them alike;
images/s come from the median step time. Model FLOPs are counted once per backbone with
`torch.utils.flop_counter.FlopCounterMode` (forward; training counted as 3x forward) and set against this
machine's matmul peak (best of several 4096x4096 matmuls, fp32 and bf16, at the start and at the end).
`--profile NAME` adds the ops that take the most time in one training and one inference step of ours.

Writes the section between the throughput markers of docs/performance.md (other sections are kept).

Usage: .venv/bin/python bench/throughput.py [--models inception_v3,resnet18] [--batch 8] [--steps 5]
       [--warmup 1] [--compile inception_v3] [--profile inception_v3] [--out docs/performance.md] [--no-write]
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from alnus._hardware import Precision, autocast, choose_precision, environment_info
from alnus._io import atomic_write_text
from alnus.models import create_model, get_spec, list_backbones

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "docs" / "performance.md"
START, END = "<!-- throughput:start -->", "<!-- throughput:end -->"
DEVICE = torch.device("cpu")
BASELINE = Precision(None, False, "fp32, contiguous NCHW")
# Speed-ups over the baseline that issue 3 asks for: backbone -> (training, inference).
GOALS = {"inception_v3": (3.0, 4.5)}
MODES = ("train", "infer")


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def matmul_peak(dtype: torch.dtype, n: int = 4096, repeats: int = 5) -> float:
    """Best TFLOP/s of `repeats` n x n matmuls in `dtype` (after one untimed call)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    return 2 * n**3 / min(_timed(lambda: torch.mm(a, b)) for _ in range(repeats)) / 1e12


def forward_flops(model: nn.Module, size: int) -> int:
    """FLOPs of one forward pass of one image, as FlopCounterMode counts them (convolutions, matmuls)."""
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.rand(1, 1, size, size))
    return counter.get_total_flops()


@dataclass
class Variant:
    """One way of running the model: its own copy of the weights, optimiser, input layout and timings."""

    name: str
    precision: Precision
    model: nn.Module
    optimizer: torch.optim.Optimizer
    x: torch.Tensor
    compiled: bool
    forward: Callable[[torch.Tensor], torch.Tensor]
    times: dict[str, list[float]] = field(default_factory=lambda: {mode: [] for mode in MODES})
    compile_s: dict[str, float] = field(default_factory=dict)


def make_variants(model: nn.Module, x: torch.Tensor, compile_too: bool) -> list[Variant]:
    """Baseline, ours and (if asked) ours under torch.compile, each on its own copy of `model`."""
    ours = choose_precision(DEVICE, "auto")
    layout = torch.channels_last if ours.channels_last else torch.contiguous_format
    variants = [Variant("baseline", BASELINE, model, torch.optim.AdamW(model.parameters(), lr=1e-4), x, False, model)]
    for name in ("ours", "ours+compile") if compile_too else ("ours",):
        clone = copy.deepcopy(model).to(memory_format=layout)
        compiled = name == "ours+compile"
        forward = torch.compile(clone) if compiled else clone
        optimizer = torch.optim.AdamW(clone.parameters(), lr=1e-4, fused=True)
        variants.append(Variant(name, ours, clone, optimizer, x.contiguous(memory_format=layout), compiled, forward))
    return variants


def train_step(variant: Variant, y: torch.Tensor) -> None:
    """One optimisation step on the batch (the loop a user writes, under the variant's precision)."""
    variant.model.train()
    with autocast(DEVICE, variant.precision):
        logits = variant.forward(variant.x)
    loss = F.binary_cross_entropy_with_logits(logits.float(), y)
    variant.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    variant.optimizer.step()


def infer_step(variant: Variant) -> None:
    """One forward pass of the batch in eval mode."""
    if variant.name == "baseline":
        with torch.no_grad():
            variant.model(variant.x)
        return
    with torch.inference_mode(), autocast(DEVICE, variant.precision):
        variant.forward(variant.x)


def to_inference(variant: Variant) -> None:
    """Eval mode; the compiled variant gets a fresh inference graph with frozen weights."""
    variant.model.eval()
    if variant.compiled:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
        variant.forward = torch.compile(variant.model)


def alternate(variants: list[Variant], step: Callable[[Variant], None], rounds: int, mode: str | None) -> None:
    """`rounds` steps of every variant, in forward and reverse order on alternate rounds; record under `mode`."""
    for r in range(rounds):
        for variant in variants if r % 2 == 0 else variants[::-1]:
            elapsed = _timed(lambda v=variant: step(v))
            if mode is not None:
                variant.times[mode].append(elapsed)


def bench_model(name: str, batch: int, steps: int, warmup: int, compile_too: bool) -> dict[str, Any]:
    """Measure one backbone: images/s per variant and mode, FLOPs per image, compile seconds."""
    spec = get_spec(name)
    torch.manual_seed(0)
    model = create_model(name, weights="none")
    gflops = forward_flops(model, spec.input_size) / 1e9
    x = torch.rand(batch, 1, spec.input_size, spec.input_size)
    y = torch.randint(0, 2, (batch,)).float()
    variants = make_variants(model, x, compile_too)
    compiled = [v for v in variants if v.compiled]
    try:
        for v in compiled:
            v.compile_s["train"] = _timed(lambda v=v: train_step(v, y))
        alternate(variants, lambda v: train_step(v, y), warmup, None)
        alternate(variants, lambda v: train_step(v, y), steps, "train")
        for v in variants:
            to_inference(v)
        for v in compiled:
            v.compile_s["infer"] = _timed(lambda v=v: infer_step(v))
        alternate(variants, infer_step, warmup, None)
        alternate(variants, infer_step, steps, "infer")
    finally:
        if compiled:
            import torch._inductor.config as inductor_config

            inductor_config.freezing = False
            torch._dynamo.reset()
    return {
        "name": name,
        "size": spec.input_size,
        "gflops": gflops,
        "variants": {
            v.name: {mode: batch / statistics.median(v.times[mode]) for mode in MODES} | {"compile_s": v.compile_s}
            for v in variants
        },
    }


def profile_ours(name: str, batch: int, top: int = 8) -> dict[str, list[tuple[str, float]]]:
    """Share of CPU time of the `top` most expensive ops in one training and one inference step of ours."""
    from torch.profiler import ProfilerActivity, profile

    spec = get_spec(name)
    torch.manual_seed(0)
    model = create_model(name, weights="none")
    x = torch.rand(batch, 1, spec.input_size, spec.input_size)
    y = torch.randint(0, 2, (batch,)).float()
    (_, ours) = make_variants(model, x, compile_too=False)
    shares = {}
    for mode in MODES:
        if mode == "infer":
            to_inference(ours)
        step = (lambda: train_step(ours, y)) if mode == "train" else (lambda: infer_step(ours))
        step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
        total = sum(e.self_cpu_time_total for e in events)
        events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
        shares[mode] = [(e.key, e.self_cpu_time_total / total) for e in events[:top]]
    return shares


def render_table(results: list[dict[str, Any]], peaks: dict[str, float]) -> str:
    """Markdown table: per backbone and mode, images/s of each variant, ratios, share of the matmul peaks."""
    lines = [
        "| backbone | px | GFLOPs/img | mode | baseline img/s | ours img/s | ours / baseline "
        "| ours+compile img/s | compile / baseline | compile s | baseline % fp32 peak | ours % bf16 peak |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        v = r["variants"]
        for mode, passes in (("train", 3), ("infer", 1)):
            base, ours = v["baseline"][mode], v["ours"][mode]
            best = ours
            cells = [r["name"], str(r["size"]), f"{r['gflops']:.2f}", mode, f"{base:.2f}", f"{ours:.2f}"]
            cells.append(f"**{ours / base:.2f}x**")
            if "ours+compile" in v:
                comp = v["ours+compile"]
                best = max(ours, comp[mode])
                cells += [
                    f"{comp[mode]:.2f}",
                    f"**{comp[mode] / base:.2f}x**",
                    f"{comp['compile_s'][mode]:.0f}",
                ]
            else:
                cells += ["-", "-", "-"]
            gflop_s = passes * r["gflops"]
            cells.append(f"{100 * base * gflop_s / (1e3 * peaks['fp32']):.0f}%")
            cells.append(f"{100 * best * gflop_s / (1e3 * peaks['bf16']):.0f}%")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def goal_lines(results: list[dict[str, Any]]) -> list[str]:
    """One line per backbone with a goal: the best of our variants against it."""
    lines = []
    for r in results:
        if r["name"] not in GOALS:
            continue
        v = r["variants"]
        parts = []
        for mode, want in zip(MODES, GOALS[r["name"]], strict=True):
            got = max(v[k][mode] for k in ("ours", "ours+compile") if k in v) / v["baseline"][mode]
            verdict = "met" if got >= want else f"NOT met, {want / got:.1f}x short"
            parts.append(f"{mode} >= {want:g}x: measured **{got:.2f}x** ({verdict})")
        lines.append(f"- Goal for {r['name']}: " + "; ".join(parts) + ".")
    return lines


def render_profile(name: str, shares: dict[str, list[tuple[str, float]]]) -> str:
    rows = [f"Where the time of one step of ours goes ({name}, torch.profiler, self CPU time):", ""]
    rows += ["| mode | op | share |", "|---|---|---:|"]
    for mode, ops in shares.items():
        rows += [f"| {mode} | `{op}` | {100 * share:.0f}% |" for op, share in ops]
    return "\n".join(rows)


def render(
    results: list[dict[str, Any]],
    peaks: dict[str, float],
    profile: tuple[str, dict[str, list[tuple[str, float]]]] | None,
    args: argparse.Namespace,
    command: str,
    load: float,
    minutes: float,
) -> str:
    env = environment_info()
    cpu = env["cpu"]
    sections = [
        "## Training and inference throughput",
        render_table(results, peaks),
        "\n".join(
            [
                f"- Batch {args.batch}; {args.steps} timed steps per variant and mode after {args.warmup} "
                "warm-up step(s), variants alternating step by step; images/s from the median step.",
                '- Random weights (`weights="none"`), one batch of random images in [0, 1].',
                f"- Ours on this machine: {choose_precision(DEVICE, 'auto').reason}; fused AdamW.",
                f"- Measured matmul peak (best 4096x4096 matmul): fp32 {peaks['fp32']:.3f} TFLOP/s, "
                f"bf16 {peaks['bf16']:.3f} TFLOP/s ({peaks['bf16'] / peaks['fp32']:.2f}x).",
                *goal_lines(results),
                f"- Hardware: {cpu['model']}, {cpu['usable_cores']} usable cores, flags "
                f"{', '.join(cpu['flags'])}; torch {env['torch']}, {torch.get_num_threads()} threads.",
                f"- Date: {dt.date.today().isoformat()}; load average (1 min) at the start {load:.2f}; "
                f"the whole run took {minutes:.1f} min.",
                f"- Command: `{command}`",
            ]
        ),
    ]
    if profile is not None:
        sections.append(render_profile(*profile))
    return "\n\n".join(sections) + "\n"


def replace_section(text: str | None, section: str) -> str:
    """`text` (a Markdown file, or None when absent) with the throughput section replaced or appended."""
    block = f"{START}\n{section.strip()}\n{END}\n"
    if text is None:
        return f"# Performance\n\n{block}"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        return head + block + rest.split(END, 1)[1].lstrip("\n")
    return text.rstrip("\n") + "\n\n" + block


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = sorted(set(names) - set(list_backbones()))
    if unknown:
        raise SystemExit(f"unknown backbone(s) {', '.join(unknown)}; registered: {', '.join(list_backbones())}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(list_backbones()), help="comma-separated backbones")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant and mode")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant and mode")
    parser.add_argument("--compile", default="", help="backbones to measure under torch.compile as well")
    parser.add_argument("--profile", default="", help="a backbone whose op breakdown to add")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="Markdown file to update")
    parser.add_argument("--no-write", action="store_true", help="print the section only")
    args = parser.parse_args(argv)
    names, to_compile = _names(args.models), set(_names(args.compile))
    command = shlex.join([".venv/bin/python", "bench/throughput.py", *(sys.argv[1:] if argv is None else argv)])

    started, load = time.perf_counter(), os.getloadavg()[0]
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    print(f"matmul peak: fp32 {peaks['fp32']:.3f}, bf16 {peaks['bf16']:.3f} TFLOP/s", flush=True)
    results = []
    for name in names:
        t0 = time.perf_counter()
        results.append(bench_model(name, args.batch, args.steps, args.warmup, name in to_compile))
        summary = "; ".join(
            f"{k} train {v['train']:.2f} infer {v['infer']:.2f}" for k, v in results[-1]["variants"].items()
        )
        print(f"{name}: {summary} img/s ({time.perf_counter() - t0:.0f} s)", flush=True)
    profile = (args.profile, profile_ours(args.profile, args.batch)) if args.profile else None
    # Measured again at the end, the best kept: on a shared machine a peak is what the chip can do when free.
    peaks["fp32"] = max(peaks["fp32"], matmul_peak(torch.float32))
    peaks["bf16"] = max(peaks["bf16"], matmul_peak(torch.bfloat16))
    minutes = (time.perf_counter() - started) / 60
    section = render(results, peaks, profile, args, command, load, minutes)
    print(section)
    if not args.no_write:
        existing = args.out.read_text(encoding="utf-8") if args.out.is_file() else None
        atomic_write_text(args.out, replace_section(existing, section))
    return 0


if __name__ == "__main__":
    sys.exit(main())
