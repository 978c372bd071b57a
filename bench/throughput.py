"""Training and inference images/s of every registered backbone: a plain fp32 loop against alnus's path.

For each backbone at its native input size, in one process, on copies of the same weights and one batch:
- baseline: what a user would write: `model.train()`, fp32, contiguous NCHW, `torch.optim.AdamW`; for
  inference `model.eval()` under `torch.no_grad()`;
- ours: `alnus._hardware.choose_precision(device, "auto")` (bf16 autocast + channels_last on CPUs with AMX
  or AVX512-BF16; training a depthwise backbone there: fp32 + channels_last, as `alnus train` does), fused AdamW;
  inference under `torch.inference_mode()`, eager;
- ours+compile: ours under `torch.compile`: inference (`--compile-infer`, default every backbone) with
  inductor's weight freezing (batch norm folded into the convolutions, weights pre-packed for oneDNN);
  training only for the backbones in `--compile-train` (compiling a backward graph takes minutes on 2 cores).
  The first call (the compilation) is timed on its own and kept out of the medians.
Steps of the variants alternate (A B C, then C B A, ...) so that load from other processes hits them alike;
images/s come from the median step time. Model FLOPs are counted once per backbone with
`torch.utils.flop_counter.FlopCounterMode` (forward; training counted as 3x forward) and set against this
machine's matmul peak (best 4096x4096 matmul, fp32 and bf16, measured before, between and after the
backbones). `--profile NAME` adds the ops that take the most time in one training and one inference step
of ours (eager).

Writes the section between the throughput markers of docs/performance.md (other sections are kept).

Usage: .venv/bin/python bench/throughput.py [--models inception_v3,resnet18] [--batch 8] [--steps 5]
       [--warmup 1] [--compile-infer all|NAMES] [--compile-train NAMES] [--profile NAME]
       [--out docs/performance.md] [--no-write]
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import re
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
from _docs import write_section  # bench/ is on sys.path when a script here runs
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from alnus._hardware import Precision, autocast, choose_precision, environment_info
from alnus._io import atomic_write_text
from alnus.models import create_model, get_spec, list_backbones

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "docs" / "performance.md"
DEVICE = torch.device("cpu")
BASELINE = Precision(None, False, "fp32, contiguous NCHW")
# Speed-ups over the baseline that issue 3 asks for: backbone -> (training, inference).
GOALS = {"inception_v3": (3.0, 4.5)}
MODES = ("train", "infer")
# A row whose step times spread more than this (slowest / fastest) was disturbed by other jobs.
NOISY = 1.5
COMPUTE_OPS = re.compile(r"conv|addmm|\bmm\b|matmul|linear")


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
    compiled: set[str]
    forward: Callable[[torch.Tensor], torch.Tensor]
    times: dict[str, list[float]] = field(default_factory=lambda: {mode: [] for mode in MODES})
    compile_s: dict[str, float] = field(default_factory=dict)
    # Training's precision where it differs from inference's (`auto` trains depthwise backbones in fp32 on a CPU).
    train_precision: Precision | None = None


def make_variants(model: nn.Module, x: torch.Tensor, compile_modes: set[str]) -> list[Variant]:
    """Baseline, ours and (for the modes in `compile_modes`) ours under torch.compile, each on its own copy."""
    ours = choose_precision(DEVICE, "auto")
    ours_train = choose_precision(DEVICE, "auto", depthwise=model.spec.depthwise)
    layout = torch.channels_last if ours.channels_last else torch.contiguous_format
    variants = [Variant("baseline", BASELINE, model, torch.optim.AdamW(model.parameters(), lr=1e-4), x, set(), model)]
    for name in ("ours", "ours+compile") if compile_modes else ("ours",):
        clone = copy.deepcopy(model).to(memory_format=layout)
        modes = compile_modes if name == "ours+compile" else set()
        forward = torch.compile(clone) if "train" in modes else clone
        optimizer = torch.optim.AdamW(clone.parameters(), lr=1e-4, fused=True)
        variant = Variant(name, ours, clone, optimizer, x.contiguous(memory_format=layout), modes, forward)
        variant.train_precision = ours_train
        variants.append(variant)
    return variants


def train_step(variant: Variant, y: torch.Tensor) -> None:
    """One optimisation step on the batch (the loop a user writes, under the variant's precision)."""
    variant.model.train()
    with autocast(DEVICE, variant.train_precision or variant.precision):
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
    variant.forward = variant.model
    if "infer" in variant.compiled:
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


def bench_model(name: str, batch: int, steps: int, warmup: int, compile_modes: set[str]) -> dict[str, Any]:
    """Measure one backbone: images/s per variant and mode, FLOPs per image, compile seconds."""
    spec = get_spec(name)
    torch.manual_seed(0)
    model = create_model(name, weights="none")
    gflops = forward_flops(model, spec.input_size) / 1e9
    x = torch.rand(batch, 1, spec.input_size, spec.input_size)
    y = torch.randint(0, 2, (batch,)).float()
    variants = make_variants(model, x, compile_modes)
    # A variant is timed in a mode only if it differs from "ours" there (ours+compile trains eagerly otherwise).
    in_train = [v for v in variants if v.name != "ours+compile" or "train" in v.compiled]
    try:
        for v in variants:
            if "train" in v.compiled:  # the first call compiles: timed on its own, never in the medians
                v.compile_s["train"] = _timed(lambda v=v: train_step(v, y))
        alternate(in_train, lambda v: train_step(v, y), warmup, None)
        alternate(in_train, lambda v: train_step(v, y), steps, "train")
        in_infer = []
        for v in variants:
            to_inference(v)
            if "infer" in v.compiled:
                try:
                    v.compile_s["infer"] = _timed(lambda v=v: infer_step(v))
                except Exception as exc:  # a backbone that does not compile is a result too: report, go on
                    print(f"{name}: torch.compile for inference failed: {exc!r}"[:500], file=sys.stderr)
                    continue
            in_infer.append(v)
        alternate(in_infer, infer_step, warmup, None)
        alternate(in_infer, infer_step, steps, "infer")
    finally:
        if compile_modes:
            import torch._inductor.config as inductor_config

            inductor_config.freezing = False
            torch._dynamo.reset()
    return {
        "name": name,
        "size": spec.input_size,
        "gflops": gflops,
        "variants": {
            v.name: {mode: batch / statistics.median(v.times[mode]) for mode in MODES if v.times[mode]}
            | {"compile_s": v.compile_s, "step_s": v.times}
            for v in variants
        },
    }


def profile_ours(name: str, batch: int, top: int = 8) -> dict[str, Any]:
    """Share of CPU time of the `top` most expensive ops in one training and one inference step of ours,
    and of all convolution and matmul ops together (`compute`)."""
    from torch.profiler import ProfilerActivity, profile

    spec = get_spec(name)
    torch.manual_seed(0)
    model = create_model(name, weights="none")
    x = torch.rand(batch, 1, spec.input_size, spec.input_size)
    y = torch.randint(0, 2, (batch,)).float()
    (_, ours) = make_variants(model, x, set())
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
        shares[mode] = {
            "top": [(e.key, e.self_cpu_time_total / total) for e in events[:top]],
            "compute": sum(e.self_cpu_time_total for e in events if COMPUTE_OPS.search(e.key)) / total,
        }
    return shares


def noisy(result: dict[str, Any], mode: str) -> bool:
    """Whether any variant's step times in `mode` spread by more than NOISY (slowest / fastest)."""
    steps = [v.get("step_s", {}).get(mode) for v in result["variants"].values()]
    return any(s and max(s) / min(s) > NOISY for s in steps)


def render_table(results: list[dict[str, Any]], peaks: dict[str, float]) -> str:
    """Markdown table: per backbone and mode, images/s of each variant, ratios, share of the matmul peaks."""
    lines = [
        "| backbone | px | GFLOPs/img | mode | baseline img/s | ours img/s | ours / baseline "
        "| ours+compile img/s | compile / baseline | compile s | baseline % fp32 peak | best ours % bf16 peak |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        v = r["variants"]
        for mode, passes in (("train", 3), ("infer", 1)):
            base, ours = v["baseline"][mode], v["ours"][mode]
            best = ours
            flag = " (noisy)" if noisy(r, mode) else ""
            cells = [r["name"], str(r["size"]), f"{r['gflops']:.2f}", mode + flag, f"{base:.2f}", f"{ours:.2f}"]
            cells.append(f"**{ours / base:.2f}x**")
            if mode in v.get("ours+compile", {}):
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
            got = max(v[k][mode] for k in ("ours", "ours+compile") if mode in v.get(k, {})) / v["baseline"][mode]
            verdict = "met" if got >= want else f"NOT met, {want / got:.1f}x short"
            parts.append(f"{mode} >= {want:g}x: measured **{got:.2f}x** ({verdict})")
        lines.append(f"- Goal for {r['name']}: " + "; ".join(parts) + ".")
    return lines


def render_profile(name: str, shares: dict[str, Any]) -> str:
    rows = [f"Where the time of one eager step of ours goes ({name}, torch.profiler, self CPU time):", ""]
    rows += ["| mode | op | share |", "|---|---|---:|"]
    for mode, found in shares.items():
        rows += [f"| {mode} | `{op}` | {100 * share:.0f}% |" for op, share in found["top"]]
    return "\n".join(rows)


def render_limits(run: dict[str, Any]) -> str:
    """What bounds the speed-up, from this run's measurements."""
    peaks, results, env = run["peaks"], run["results"], run["env"]
    lines = ["What limits it:", ""]
    flags = env["cpu"]["flags"]
    amx = any(f.startswith("amx") for f in flags)
    lines.append(
        f"- The arithmetic: a bf16 matmul peaks at {peaks['bf16'] / peaks['fp32']:.2f}x the fp32 one here "
        + ("(AMX tiles)." if amx else "(AVX512-BF16 dot products; no AMX tiles on this CPU).")
        + " bf16 alone cannot speed a compute-bound convolution up by more than that; any speed-up beyond it "
        "comes from the other differences: channels_last (oneDNN's native layout, no reorders around the "
        "convolutions), fused AdamW and, for inference, compilation."
    )
    if run.get("profile"):
        name, shares = run["profile"]
        lines.append(
            f"- The ops around the convolutions: in an eager step of ours on {name}, convolutions and matmuls "
            f"take {100 * shares['train']['compute']:.0f}% of the CPU time in training and "
            f"{100 * shares['infer']['compute']:.0f}% in inference; the rest is batch norm, ReLU, pooling, "
            "concatenation, dtype casts (`copy_`) and the optimiser step: memory-bound work that bf16 only "
            "shortens by halving the bytes moved."
        )
    for r in results:
        if r["name"] not in GOALS:
            continue
        v, needs = r["variants"], []
        for mode, want, passes in zip(MODES, GOALS[r["name"]], (3, 1), strict=True):
            best = max(v[k][mode] for k in ("ours", "ours+compile") if mode in v.get(k, {}))
            share = passes * r["gflops"] / (1e3 * peaks["bf16"])
            baseline_fp32 = 100 * v["baseline"][mode] * share * peaks["bf16"] / peaks["fp32"]
            needs.append(
                f"{mode} {want:g}x needs {100 * want * v['baseline'][mode] * share:.0f}% (ours reaches "
                f"{100 * best * share:.0f}%; the baseline runs at {baseline_fp32:.0f}% of the fp32 peak)"
            )
        lines.append(
            f"- Headroom for {r['name']}, as a share of the measured bf16 matmul peak: " + "; ".join(needs) + "."
        )
    gains = [
        r["variants"]["ours+compile"]["infer"] / r["variants"]["ours"]["infer"]
        for r in results
        if "infer" in r["variants"].get("ours+compile", {})
    ]
    if gains:
        lines.append(
            "- Compiling inference with frozen weights folds batch norm into the convolutions and fuses the "
            f"activations: {statistics.median(gains):.2f}x over eager ours (median of {len(gains)} backbones, "
            f"range {min(gains):.2f}-{max(gains):.2f}x)."
            + (
                " `alnus predict-run RUN --compile` uses it (off by default: compiling once per batch shape costs"
                " tens of seconds, which a few hundred images do not win back; see docs/performance.md)."
                if statistics.median(gains) > 1
                else ""
            )
        )
    lines.append(
        f"- The machine: {env['cpu']['usable_cores']} cores shared with other jobs (load average "
        f"{run['load']:.1f} at the start), so absolute images/s may be below what the cores give alone; the "
        "variants alternate step by step, so their ratios are affected alike."
    )
    lines += [f"- {note}" for note in run.get("notes", [])]
    return "\n".join(lines)


def render(run: dict[str, Any]) -> str:
    """The Markdown section for one run (see `measure`)."""
    cpu, settings = run["env"]["cpu"], run["settings"]
    sections = [
        "## Training and inference throughput",
        render_table(run["results"], run["peaks"]),
        "\n".join(
            [
                f"- Batch {settings['batch']}; {settings['steps']} timed steps per variant and mode after "
                f"{settings['warmup']} warm-up step(s), variants alternating step by step; images/s from the "
                'median step. Random weights (`weights="none"`), one batch of random images in [0, 1].',
                f"- Ours on this machine: {run['precision']}; fused AdamW; inference under `torch.inference_mode()`.",
                f"- Rows marked (noisy): some variant's slowest step took over {NOISY:g}x its fastest, i.e. other "
                "jobs on the cores disturbed them; their ratios are not reliable. The other rows' steps agree "
                "within that spread (raw step times: `--save-json`).",
                f"- Measured matmul peak (best 4096x4096 matmul): fp32 {run['peaks']['fp32']:.3f} TFLOP/s, "
                f"bf16 {run['peaks']['bf16']:.3f} TFLOP/s. Training FLOPs counted as 3x forward.",
                *goal_lines(run["results"]),
                f"- Hardware: {cpu['model']}, {cpu['usable_cores']} usable cores, flags "
                f"{', '.join(cpu['flags'])}; torch {run['env']['torch']}, {cpu['torch_threads']} threads.",
                f"- Date: {run['date']}; load average (1 min) at the start {run['load']:.2f}; the whole run "
                f"took {run['minutes']:.1f} min.",
                f"- Command: `{run['command']}`"
                + (
                    f"; section written from its saved measurements by `{run['rendered_by']}`"
                    if run.get("rendered_by")
                    else ""
                ),
            ]
        ),
        render_limits(run),
    ]
    if run.get("profile"):
        sections.append(render_profile(*run["profile"]))
    return "\n\n".join(sections) + "\n"


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = sorted(set(names) - set(list_backbones()))
    if unknown:
        raise SystemExit(f"unknown backbone(s) {', '.join(unknown)}; registered: {', '.join(list_backbones())}")
    return names


def measure(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """Run the benchmark; returns everything `render` needs (JSON-serialisable)."""
    names = _names(args.models)
    compile_infer = set(names if args.compile_infer == "all" else _names(args.compile_infer))
    compile_train = set(_names(args.compile_train))
    started, load = time.perf_counter(), os.getloadavg()[0]
    peaks = {"fp32": 0.0, "bf16": 0.0}

    def measure_peaks() -> None:
        # Measured before, between and after the backbones, the best kept: on a shared machine the peak is
        # what the cores do in the quietest moment.
        peaks["fp32"] = max(peaks["fp32"], matmul_peak(torch.float32))
        peaks["bf16"] = max(peaks["bf16"], matmul_peak(torch.bfloat16))
        print(f"matmul peak so far: fp32 {peaks['fp32']:.3f}, bf16 {peaks['bf16']:.3f} TFLOP/s", flush=True)

    measure_peaks()
    results = []
    for name in names:
        t0 = time.perf_counter()
        modes = {m for m, chosen in (("train", compile_train), ("infer", compile_infer)) if name in chosen}
        results.append(bench_model(name, args.batch, args.steps, args.warmup, modes))
        summary = "; ".join(
            f"{k} " + " ".join(f"{m} {v[m]:.2f}" for m in MODES if m in v) for k, v in results[-1]["variants"].items()
        )
        print(f"{name}: {summary} img/s ({time.perf_counter() - t0:.0f} s)", flush=True)
        measure_peaks()
    depthwise = choose_precision(DEVICE, "auto", depthwise=True).reason
    return {
        "command": command,
        "settings": {"batch": args.batch, "steps": args.steps, "warmup": args.warmup},
        "precision": "; ".join(
            dict.fromkeys(
                [choose_precision(DEVICE, "auto").reason]
                + [f"training {n}: {depthwise}" for n in names if get_spec(n).depthwise]
            )
        ),
        "peaks": peaks,
        "results": results,
        "profile": (args.profile, profile_ours(args.profile, args.batch)) if args.profile else None,
        "env": environment_info(),
        "load": load,
        "minutes": (time.perf_counter() - started) / 60,
        "date": dt.date.today().isoformat(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(list_backbones()), help="comma-separated backbones")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant and mode")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant and mode")
    parser.add_argument(
        "--compile-infer", default="all", help="backbones whose inference is also measured under torch.compile"
    )
    parser.add_argument("--compile-train", default="", help="backbones whose training is also measured compiled")
    parser.add_argument("--profile", default="", help="a backbone whose op breakdown to add")
    parser.add_argument("--note", action="append", default=[], help="a line added under 'What limits it'")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="Markdown file to update")
    parser.add_argument("--no-write", action="store_true", help="print the section only")
    parser.add_argument("--save-json", type=Path, help="also save the raw measurements here")
    parser.add_argument("--from-json", type=Path, help="render saved measurements instead of measuring")
    args = parser.parse_args(argv)
    command = shlex.join([".venv/bin/python", "bench/throughput.py", *(sys.argv[1:] if argv is None else argv)])

    run = json.loads(args.from_json.read_text()) if args.from_json else measure(args, command)
    run["notes"] = run.get("notes", []) + args.note
    if args.from_json:
        # The notes are quoted above in full; the command line names only the file they came with.
        run["rendered_by"] = f"bench/throughput.py --from-json {args.from_json}" + (" --note ..." if args.note else "")
    if args.save_json:
        atomic_write_text(args.save_json, json.dumps(run, indent=1))
    section = render(run)
    print(section)
    if not args.no_write:
        write_section(args.out, "throughput", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
