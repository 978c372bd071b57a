"""Training speed per backbone in fp32 and bf16 on this CPU: does `precision: auto` pick the faster one?

`train.precision: auto` trains in bf16 (autocast, channels_last) on a CPU with AMX or AVX512-BF16. That pays where
convolutions are dense; EfficientNet-Lite's depthwise convolutions have little arithmetic per byte, and bf16 adds a
cast around each of them. This measures, per backbone at its training input size, one process, the same weights and
batch, three variants whose training steps alternate (A B C, then C B A, ...; `bench/throughput.py`'s loop):
- fp32: contiguous NCHW (what a user writes);
- fp32 + channels_last;
- bf16 + channels_last (autocast; what `auto` chose for every backbone before this bench).
images/s come from the median step; a row whose slowest step took over 1.5x its fastest is marked noisy. The
section it writes (docs/performance.md, between the train-precision markers) also says which precision
`alnus._hardware.choose_precision(device, "auto", depthwise=...)` picks now for that backbone.

Usage: .venv/bin/python bench/train_precision.py [--models efficientnet_lite0,inception_v3] [--batch 16]
       [--steps 5] [--size NAME=PX ...] [--no-write]
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

import torch
from _docs import write_section  # bench/ is on sys.path when a script here runs
from throughput import BASELINE, DEFAULT_OUT, NOISY, Variant, alternate, train_step

from alnus._hardware import Precision, choose_precision, environment_info
from alnus.models import create_model, get_spec, list_backbones

DEVICE = torch.device("cpu")
VARIANTS = (
    ("fp32", BASELINE, False),
    ("fp32 + channels_last", Precision(None, True, "fp32 + channels_last"), True),
    ("bf16 + channels_last", Precision(torch.bfloat16, True, "bf16 + channels_last"), True),
)


def bench_model(name: str, size: int, batch: int, steps: int, warmup: int) -> dict:
    """Training images/s of each variant for one backbone (median step) and the spread of its steps."""
    torch.manual_seed(0)
    model = create_model(name, weights="none")
    x = torch.rand(batch, 1, size, size)
    y = torch.randint(0, 2, (batch,)).float()
    variants = []
    for label, precision, channels_last in VARIANTS:
        layout = torch.channels_last if channels_last else torch.contiguous_format
        clone = copy.deepcopy(model).to(memory_format=layout)
        optimizer = torch.optim.AdamW(clone.parameters(), lr=1e-4, fused=True)
        variants.append(Variant(label, precision, clone, optimizer, x.contiguous(memory_format=layout), set(), clone))
    alternate(variants, lambda v: train_step(v, y), warmup, None)
    alternate(variants, lambda v: train_step(v, y), steps, "train")
    return {
        "name": name,
        "size": size,
        "img_s": {v.name: batch / statistics.median(v.times["train"]) for v in variants},
        "spread": max(max(v.times["train"]) / min(v.times["train"]) for v in variants),
        "auto": choose_precision(DEVICE, "auto", depthwise=get_spec(name).depthwise).reason,
    }


def render(run: dict) -> str:
    lines = [
        "## Training precision on the CPU: fp32 or bf16 per backbone",
        "",
        f"Command: `{run['command']}`. Date {run['date']}; {run['cpu']}, {run['threads']} threads, torch "
        f"{run['torch']}; load average {run['load']:.1f} at the start; {run['minutes']:.1f} min. Batch "
        f"{run['batch']}, {run['steps']} timed training steps per variant after {run['warmup']} warm-up, variants "
        "alternating step by step; images/s from the median step. Random weights, random 1-channel images.",
        "",
        "| backbone | px | fp32 img/s | fp32 + channels_last img/s | bf16 + channels_last img/s "
        "| bf16 / best fp32 | `auto` now picks |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in run["results"]:
        speeds = r["img_s"]
        best_fp32 = max(speeds["fp32"], speeds["fp32 + channels_last"])
        ratio = speeds["bf16 + channels_last"] / best_fp32
        noisy = " (noisy)" if r["spread"] > NOISY else ""
        lines.append(
            f"| {r['name']} | {r['size']} | {speeds['fp32']:.2f} | {speeds['fp32 + channels_last']:.2f} | "
            f"{speeds['bf16 + channels_last']:.2f} | **{ratio:.2f}x**{noisy} | {r['auto']} |"
        )
    lines += [
        "",
        "- bf16 / best fp32 below 1 means bf16 training is slower than fp32 on this CPU for that backbone.",
        "- Rows marked (noisy): some variant's slowest step took over 1.5x its fastest (other jobs on the cores).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(list_backbones()), help="comma-separated backbones")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--size", action="append", default=[], help="NAME=PX: train this backbone at PX")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--no-write", action="store_true", help="print the section only")
    args = parser.parse_args(argv)
    sizes = dict(item.split("=", 1) for item in args.size)
    command = shlex.join([".venv/bin/python", "bench/train_precision.py", *(sys.argv[1:] if argv is None else argv)])
    started, load = time.perf_counter(), os.getloadavg()[0]
    results = []
    for name in [n.strip() for n in args.models.split(",") if n.strip()]:
        size = int(sizes.get(name, get_spec(name).input_size))
        results.append(bench_model(name, size, args.batch, args.steps, args.warmup))
        print(name, size, {k: round(v, 2) for k, v in results[-1]["img_s"].items()}, flush=True)
    env = environment_info()
    run = {
        "command": command,
        "date": dt.date.today().isoformat(),
        "cpu": env["cpu"]["model"],
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load": load,
        "minutes": (time.perf_counter() - started) / 60,
        "batch": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "results": results,
    }
    section = render(run)
    print(section)
    if not args.no_write:
        from pathlib import Path

        write_section(Path(args.out), "train-precision", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
