"""Time the vectorised AUC bootstrap: 2,000 resamples over 10,000 cases, plain and clustered by patient.

Writes the section "Statistics: AUC bootstrap" of docs/performance.md (between the stats-speed markers; the
file is created with "# Performance" when absent) and exits 1 if any bootstrap row takes 5 s or more.

Usage: .venv/bin/python bench/stats_speed.py [--cases 10000] [--boot 2000] [--repeats 3]
       [--out docs/performance.md]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _docs import write_section  # bench/ is on sys.path when a script here runs

from alnus.stats import _BOOT_BLOCK, auc_ci

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "docs" / "performance.md"
LIMIT_S = 5.0


def hardware() -> str:
    """CPU model (lscpu) and the cores this process may use."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        lines = out.splitlines()
        model = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        model = platform.processor() or "unknown CPU"
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model}, {usable} usable cores ({os.cpu_count()} logical CPUs on the host)"


def best_of(repeats: int, fn) -> tuple[float, object]:  # noqa: ANN001
    """Smallest wall time of `repeats` calls (the machine is shared) and the last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--boot", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    y = rng.random(args.cases) < 0.3
    continuous = 1 / (1 + np.exp(-(rng.normal(size=args.cases) + 1.2 * y)))
    # Probabilities in a predictions file are often rounded (here to 3 decimals): many ties, fewer distinct
    # values to count over. Continuous scores are the slow case (every value distinct).
    rounded = np.round(continuous, 3)
    groups = np.arange(args.cases) // 3  # three images per patient
    n_patients = int(groups.max()) + 1
    load = os.getloadavg()[0]
    rows = []
    for label, score in ((f"{np.unique(rounded).size:,} distinct", rounded), ("all distinct", continuous)):
        t_plain, plain = best_of(args.repeats, lambda s=score: auc_ci(y, s, "bootstrap", n_boot=args.boot))
        t_clustered, clustered = best_of(
            args.repeats, lambda s=score: auc_ci(y, s, "bootstrap", groups=groups, n_boot=args.boot)
        )
        t_delong, delong = best_of(args.repeats, lambda s=score: auc_ci(y, s))
        rows += [
            (f"bootstrap, stratified by class; scores {label}", t_plain, plain),
            (
                f"bootstrap, clustered ({n_patients:,} patients x 3 images); scores {label}",
                t_clustered,
                clustered,
            ),
            (f"DeLong (fast, midranks); scores {label}", t_delong, delong),
        ]
    t_worst = max(secs for name, secs, _ in rows if name.startswith("bootstrap"))
    for name, secs, res in rows:
        print(f"{name}: {secs:.3f} s  AUC {res.estimate:.4f} ({res.ci_low:.4f}-{res.ci_high:.4f})")

    given = sys.argv[1:] if argv is None else argv
    command = " ".join([".venv/bin/python bench/stats_speed.py", shlex.join(given)]).strip()
    table = "\n".join(
        f"| {name} | {secs:.3f} | {res.estimate:.4f} ({res.ci_low:.4f}-{res.ci_high:.4f}) |" for name, secs, res in rows
    )
    section = f"""## Statistics: AUC bootstrap

`alnus.stats.auc_ci(method="bootstrap")` resamples case weights in blocks of {_BOOT_BLOCK} and computes
each AUC from one sort of the scores (weighted midrank counts over the distinct score values), so
{args.boot:,} resamples over {args.cases:,} cases ({int(y.sum()):,} positive) need no Python loop per
resample.
Scores are simulated probabilities, rounded to 3 decimals (ties, as in a predictions file) or not.
Best of {args.repeats} runs, one process.

| method | seconds | AUC (95% CI) |
|---|---:|---|
{table}

- Target: {args.boot:,} resamples over {args.cases:,} cases in under {LIMIT_S:.0f} s:
  **{"met" if t_worst < LIMIT_S else "NOT met"}** (slowest bootstrap row: {t_worst:.2f} s).
- Hardware: {hardware()}; Python {platform.python_version()}, numpy {np.__version__}.
  Date: {dt.date.today().isoformat()}. Load average (1 min) at the start: {load:.2f}.
- Command: `{command}`
"""
    write_section(args.out, "stats-speed", section)
    print(f"wrote {args.out}")
    return 0 if t_worst < LIMIT_S else 1


if __name__ == "__main__":
    sys.exit(main())
