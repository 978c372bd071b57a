"""Training and inference images/s of every registered backbone: a plain fp32 loop against alnus's path.

For each backbone at its native input size, in one process and on the same model weights and batch:
- baseline: what a user would write: `model.train()`, fp32, contiguous NCHW, `torch.optim.AdamW`, and for
  inference `model.eval()` under `torch.no_grad()`;
- ours: `alnus._hardware.choose_precision` ("auto": bf16 autocast + channels_last on CPUs with AMX or
  AVX512-BF16), fused AdamW, `torch.inference_mode()` for inference;
- ours+compile (with `--compile`): the same under `torch.compile` (inference with inductor's weight freezing,
  which folds batch norm into the convolutions and pre-packs the weights for oneDNN).
Steps of the variants alternate (ABC, CBA, ...) so that load from other processes hits them alike; the
medians of the per-step times are reported. Model FLOPs are counted once per backbone with
`torch.utils.flop_counter.FlopCounterMode` (forward; training counted as 3x forward), and set against this
machine's measured matmul peak (best of several 4096x4096 matmuls, fp32 and bf16).

Writes the section between the throughput markers of docs/performance.md (other sections are kept).

Usage: .venv/bin/python bench/throughput.py [--models inception_v3,resnet18] [--batch 8] [--steps 5]
       [--warmup 1] [--compile] [--out docs/performance.md]
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
FP32 = Precision(None, False, "baseline: fp32, contiguous NCHW")
GOALS = {"inception_v3": (3.0, 4.5)}  # backbone: (training, inference) speed-up the issue asks for


def matmul_peak(dtype: torch.dtype, n: int = 4096, repeats: int = 5) -> float:
    """Best TFLOP/s of `repeats` n x n matmuls in `dtype` (the first, warm-up call not counted)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * n**3 / best / 1e12


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def forward_flops(model: nn.Module, size: int) -> int:
    """FLOPs of one forward pass of one image (convolutions and matmuls, as FlopCounterMode counts them)."""
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.rand(1, 1, size, size))
    model.train()
    return counter.get_total_flops()


@dataclass
class Variant:
    """One way of running the same model: its own copy of the weights, optimiser and input layout."""

    name: str
    precision: Precision
    model: nn.Module
    optimizer: torch.optim.Optimizer
    x: torch.Tensor
    compiled: bool = False
    train_fn: Callable[[torch.Tensor], torch.Tensor] | None = None
    infer_fn: Callable[[torch.Tensor], torch.Tensor] | None = None
    train_times: list[float] = field(default_factory=list)
    infer_times: list[float] = field(default_factory=list)
    compile_s: float = 0.0


def make_variants(model: nn.Module, x: torch.Tensor, compile_too: bool) -> list[Variant]:
    """Baseline, ours, and (if asked) ours under torch.compile, each on a copy of `model`'s weights."""
    ours_precision = choose_precision(DEVICE, "auto")
    variants = [Variant("baseline", FP32, model, torch.optim.AdamW(model.parameters(), lr=1e-4), x)]
    for name in ("ours", "ours+compile") if compile_too else ("ours",):
        clone = copy.deepcopy(model)
        layout = torch.channels_last if ours_precision.channels_last else torch.contiguous_format
        clone = clone.to(memory_format=layout)
        optimizer = torch.optim.AdamW(clone.parameters(), lr=1e-4, fused=True)
        variants.append(
            Variant(name, ours_precision, clone, optimizer, x.contiguous(memory_format=layout), name != "ours")
        )
    for variant in variants:
        variant.train_fn = torch.compile(variant.model) if variant.compiled else variant.model
    return variants


def train_step(variant: Variant, y: torch.Tensor) -> None:
    variant.model.train()
    with autocast(DEVICE, variant.precision):
        logits = variant.train_fn(variant.x)
    loss = F.binary_cross_entropy_with_logits(logits.float(), y)
    variant.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    variant.optimizer.step()


def infer_step(variant: Variant) -> None:
    if variant.name == "baseline":
        with torch.no_grad():
            variant.model(variant.x)
        return
    with torch.inference_mode(), autocast(DEVICE, variant.precision):
        variant.infer_fn(variant.x)


def prepare_inference(variant: Variant) -> None:
    """Switch to eval mode; for the compiled variant compile an inference graph with frozen weights."""
    variant.model.eval()
    variant.infer_fn = variant.model
    if variant.compiled:
        import torch._inductor.config as inductor_config

        # Freezing treats the weights as constants: batch norm folds into the convolutions and oneDNN
        # pre-packs the weights once (the documented recipe for CPU inference with inductor).
        inductor_config.freezing = True
        variant.infer_fn = torch.compile(variant.model)


def alternate(variants: list[Variant], step: Callable[[Variant], None], rounds: int, record: str | None) -> None:
    """Run `rounds` steps of every variant, in forward then reverse order on alternate rounds."""
    for r in range(rounds):
        for variant in variants if r % 2 == 0 else variants[::-1]:
            elapsed = _timed(lambda v=variant: step(v))
            if record is not None:
                getattr(variant, record).append(elapsed)


def bench_model(name: str, batch: int, steps: int, warmup: int, compile_too: bool) -> dict:
    """Measure one backbone; returns images/s per variant and mode, FLOPs and compile times."""
    spec = get_spec(name)
    torch.manual_seed(0)
    model = create_model(name, weights="none")
    flops = forward_flops(model, spec.input_size)
    x = torch.rand(batch, 1, spec.input_size, spec.input_size)
    y = torch.randint(0, 2, (batch,)).float()
    variants = make_variants(model, x, compile_too)
    compiled = [v for v in variants if v.compiled]
    for variant in compiled:  # the first call compiles: timed alone, never part of the medians
        variant.compile_s += _timed(lambda v=variant: train_step(v, y))
    alternate(variants, lambda v: train_step(v, y), warmup, None)
    alternate(variants, lambda v: train_step(v, y), steps, "train_times")
    for variant in variants:
        prepare_inference(variant)
    for variant in compiled:
        variant.compile_s += _timed(lambda v=variant: infer_step(v))
    alternate(variants, infer_step, warmup, None)
    alternate(variants, infer_step, steps, "infer_times")
    result = {"name": name, "size": spec.input_size, "batch": batch, "gflops": flops / 1e9}
    for variant in variants:
        result[variant.name] = {
            "train": batch / statistics.median(variant.train_times),
            "infer": batch / statistics.median(variant.infer_times),
            "compile_s": variant.compile_s,
        }
    if compile_too:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = False
        torch._dynamo.reset()
    return result


def pct(images_per_s: float, gflops_per_image: float, peak_tflops: float) -> str:
    return f"{100 * images_per_s * gflops_per_image / (peak_tflops * 1e3):.0f}%"


def table(results: list[dict], peaks: dict[str, float], compile_too: bool) -> str:
    """Markdown table: per backbone, train and infer images/s for each variant, ratios, share of peak."""
    best = "ours+compile" if compile_too else "ours"
    head = "| backbone | px | GFLOPs/img | mode | baseline img/s | ours img/s | ratio |"
    rule = "|---|---:|---:|---|---:|---:|---:|"
    if compile_too:
        head += " ours+compile img/s | ratio | compile s |"
        rule += "---:|---:|---:|"
    head += " baseline % fp32 peak | best % bf16 peak |"
    rule += "---:|---:|"
    lines = [head, rule]
    for r in results:
        for mode, factor in (("train", 3), ("infer", 1)):
            base, ours = r["baseline"][mode], r["ours"][mode]
            cells = [r["name"], str(r["size"]), f"{r['gflops']:.2f}", mode]
            cells += [f"{base:.2f}", f"{ours:.2f}", f"**{ours / base:.2f}x**"]
            top = ours
            if compile_too:
                comp = r["ours+compile"]
                cells += [f"{comp[mode]:.2f}", f"**{comp[mode] / base:.2f}x**", f"{comp['compile_s']:.0f}"]
                top = max(ours, comp[mode])
            cells += [
                pct(base, factor * r["gflops"], peaks["fp32"]),
                pct(top, factor * r["gflops"], peaks["bf16"]),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    del best
    return "\n".join(lines)


def replace_section(text: str | None, section: str) -> str:
    """`text` (a Markdown file, or None when absent) with the throughput section replaced or appended."""
    block = f"{START}\n{section.strip()}\n{END}\n"
    if text is None:
        return f"# Performance\n\n{block}"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        return head + block + rest.split(END, 1)[1].lstrip("\n")
    return text.rstrip("\n") + "\n\n" + block


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(list_backbones()), help="comma-separated backbones")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant and mode")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant and mode")
    parser.add_argument("--compile", action="store_true", help="also measure ours under torch.compile")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="Markdown file to update")
    parser.add_argument("--no-write", action="store_true", help="print the section, do not write it")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = sorted(set(names) - set(list_backbones()))
    if unknown:
        print(f"unknown backbone(s) {', '.join(unknown)}; registered: {', '.join(list_backbones())}", file=sys.stderr)
        return 2

    started, load = time.perf_counter(), os.getloadavg()
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    print(f"matmul peak: fp32 {peaks['fp32']:.3f} TFLOP/s, bf16 {peaks['bf16']:.3f} TFLOP/s", flush=True)
    results = []
    for name in names:
        t0 = time.perf_counter()
        results.append(bench_model(name, args.batch, args.steps, args.warmup, args.compile))
        r = results[-1]
        summary = ", ".join(f"{v} train {r[v]['train']:.2f} infer {r[v]['infer']:.2f}" for v in r if "train" in r.get(v, {}) or isinstance(r.get(v), dict))
        print(f"{name}: {summary} img/s ({time.perf_counter() - t0:.0f} s)", flush=True)
    # Measured again at the end and the best kept: a peak is a peak, and the machine is shared.
    peaks = {k: max(v, matmul_peak(getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[k]))) for k, v in peaks.items()}
    section = render(results, peaks, args, argv, load, time.perf_counter() - started)
    print(section)
    if not args.no_write:
        existing = args.out.read_text(encoding="utf-8") if args.out.is_file() else None
        atomic_write_text(args.out, replace_section(existing, section))
    return 0


def render(results: list[dict], peaks: dict[str, float], args: argparse.Namespace, argv: list[str] | None,
           load: tuple[float, float, float], seconds: float) -> str:
    env = environment_info()
    command = shlex.join([".venv/bin/python", "bench/throughput.py", *(argv if argv is not None else sys.argv[1:])])
    precision = choose_precision(DEVICE, "auto")
    goals = []
    for r in results:
        if r["name"] in GOALS:
            want_train, want_infer = GOALS[r["name"]]
            best = max((r[v] for v in ("ours", "ours+compile") if v in r), key=lambda d: d["train"])
            got_train = best["train"] / r["baseline"]["train"]
            best_i = max((r[v] for v in ("ours", "ours+compile") if v in r), key=lambda d: d["infer"])
            got_infer = best_i["infer"] / r["baseline"]["infer"]
            goals.append(
                f"- Goal for {r['name']}: train >= {want_train:g}x (measured {got_train:.2f}x: "
                f"{'met' if got_train >= want_train else 'NOT met'}), infer >= {want_infer:g}x (measured "
                f"{got_infer:.2f}x: {'met' if got_infer >= want_infer else 'NOT met'})."
            )
    return f"""\
## Training and inference throughput

{table(results, peaks, args.compile)}

- Batch {args.batch}, {args.steps} timed steps per variant and mode after {args.warmup} warm-up step(s),
  variants alternating step by step; medians. Random weights (`weights="none"`), random images in [0, 1].
- Our precision on this machine: {precision.reason}.
- Measured matmul peak (best of 4096x4096 matmuls): fp32 {peaks['fp32']:.3f} TFLOP/s, bf16
  {peaks['bf16']:.3f} TFLOP/s.
{chr(10).join(goals)}
- Hardware: {env['cpu']['model']}, {env['cpu']['usable_cores']} usable cores, flags {', '.join(env['cpu']['flags'])};
  torch {env['torch']}, {torch.get_num_threads()} threads. Load average at the start: {load[0]:.2f} (1 min).
  Date: {dt.date.today().isoformat()}. Whole run: {seconds / 60:.1f} min.
- Command: `{command}`
"""


if __name__ == "__main__":
    sys.exit(main())
