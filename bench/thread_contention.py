"""How PyTorch's threads fare beside another busy job: one image's forward pass and Grad-CAM heat map with a model
package, at 1 thread and at one thread per usable core, on an idle machine, beside a Python loop on one core and
beside a PyTorch job on every core.

PyTorch starts one thread per core. When another job takes a core, every parallel step waits for the thread that
lost it, so batch-1 work (a heat map, one request to the service) can slow down by far more than the lost core's
share; `OMP_NUM_THREADS=1` avoids the wait. This bench measures by how much, on this machine.

Writes the section "Threads beside another busy process" of docs/performance.md (between the thread-contention
markers) and prints it.

Usage: .venv/bin/python bench/thread_contention.py [--package models/breast-us-malignancy] [--repeats 9]
       [--out docs/performance.md]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from _docs import write_section  # bench/ is on sys.path when a script here runs
from stats_speed import hardware

from alnus.explain import heatmaps
from alnus.predict import Predictor

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PACKAGE = REPO / "models" / "breast-us-malignancy"
DEFAULT_OUT = REPO / "docs" / "performance.md"


# Other jobs on a shared machine, each kept running until killed: a Python loop on one core, and a PyTorch job
# (matrix products, one thread per core, as a training run has).
_TORCH_JOB = "import torch\na = torch.rand(512, 512)\nwhile True: a @ a"
OTHER_JOBS = {
    "none": (),
    "a Python loop (one core)": ("while True: pass",),
    "a PyTorch job (every core)": (_TORCH_JOB,),
    "two PyTorch jobs (every core each)": (_TORCH_JOB, _TORCH_JOB),
}


def _median(repeats: int, fn: Callable[[], object]) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def measure(package: Path, repeats: int) -> list[dict[str, object]]:
    """Median seconds of a batch-1 forward pass and heat map, for each number of threads, idle and beside each of
    `OTHER_JOBS`."""
    model = Predictor(package, device="cpu", precision="fp32", engine="torch").networks[0].model
    size = model_input_size(package)
    x = torch.rand(1, 1, size, size)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads_tried = sorted({1, cores})

    def forward() -> None:
        with torch.inference_mode():
            model(x)

    rows = []
    for other, codes in OTHER_JOBS.items():
        jobs = [subprocess.Popen([sys.executable, "-c", code]) for code in codes]
        try:
            time.sleep(3 if jobs else 0)  # the other jobs up and running (torch imported)
            for threads in threads_tried:
                torch.set_num_threads(threads)
                forward()  # warm-up: the first call builds oneDNN's kernels
                heatmaps(model, x, batch_size=1)
                rows.append({
                    "other": other,
                    "threads": threads,
                    "forward_s": _median(repeats, forward),
                    "heatmap_s": _median(repeats, lambda: heatmaps(model, x, batch_size=1)),
                })  # fmt: skip
        finally:
            for job in jobs:
                job.kill()
                job.wait()
    torch.set_num_threads(cores)
    return rows


def model_input_size(package: Path) -> int:
    from alnus.models.package import read_metadata

    return int(read_metadata(package)["preprocess"]["size"])


def section(rows: list[dict[str, object]], package: Path, repeats: int, command: str, load: float) -> str:
    table = "\n".join(
        f"| {row['other']} | {row['threads']} | {row['forward_s']:.4f} | {row['heatmap_s']:.4f} |" for row in rows
    )
    at = {(row["other"], row["threads"]): row for row in rows}
    most = max(int(row["threads"]) for row in rows)
    lines = []
    if most > 1:
        idle_gain = at[("none", 1)]["forward_s"] / at[("none", most)]["forward_s"]
        lines.append(f"- Idle: {most} threads make a forward pass {idle_gain:.1f}x as fast as 1 thread.")
        for other in [name for name in OTHER_JOBS if name != "none"]:
            slow, fast = at[(other, most)], at[(other, 1)]
            lines.append(
                f"- Beside {other}: {most} threads take {slow['forward_s'] / fast['forward_s']:.1f}x as long as 1 "
                f"thread for a forward pass, {slow['heatmap_s'] / fast['heatmap_s']:.1f}x for a heat map."
            )
        lines.append(
            "- So on a machine whose cores other jobs use, run alnus with `OMP_NUM_THREADS=1` (or as many threads as "
            "cores are free); PyTorch reads it at start."
        )
    name = package.relative_to(REPO) if package.is_relative_to(REPO) else package.name
    reading = "\n".join(lines)
    return f"""## Threads beside another busy process

One image (batch 1) through `{name}` in fp32 with PyTorch: the forward pass, and a Grad-CAM heat map (forward and
backward), median of {repeats} runs after a warm-up, in seconds, while another job runs on the same machine.

| other job | torch threads | forward (s) | heat map (s) |
|---|---:|---:|---:|
{table}

{reading}
- Hardware: {hardware()}; torch {torch.__version__}. Date: {dt.date.today().isoformat()}. Load average (1 min) at
  the start: {load:.2f}.
- Command: `{command}`
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", type=Path, default=DEFAULT_PACKAGE)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    command = shlex.join(["python", "bench/thread_contention.py", *(argv if argv is not None else sys.argv[1:])])
    load = os.getloadavg()[0]
    text = section(measure(args.package, args.repeats), args.package.resolve(), args.repeats, command, load)
    write_section(args.out, "thread-contention", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
