"""Wall time of the demo (`alnus demo`, what `make demo` runs after installing), cold and warm, in docs/performance.md.

Runs the demo twice in a fresh temporary folder: the first run does everything (phantom data, split, training,
prediction, evaluation, heat maps, figures, report), the second reuses the finished model. The goal (issue 8) is under
3 minutes on a 2-core CPU after installation.

Usage: .venv/bin/python bench/demo_time.py [--no-write]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _docs import write_section  # bench/ is on sys.path when a script here runs
from public_study import REPO, _cpu

GOAL_S = 180


def _run(folder: Path) -> float:
    started = time.perf_counter()
    command = [str(REPO / ".venv" / "bin" / "alnus"), "demo", str(folder / "demo")]
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        cold, warm = _run(Path(tmp)), _run(Path(tmp))
    load_after = os.getloadavg()[0]
    verdict = "met" if cold < GOAL_S else "not met"
    section = "\n".join([
        "## The demo's wall time",
        "",
        f"Command: `python bench/demo_time.py`; {dt.date.today().isoformat()}; {_cpu()}, "
        f"{len(os.sched_getaffinity(0))} cores; load average (1 min) {load_before:.2f} before, {load_after:.2f} after.",
        "",
        f"- First run (phantom data, split, training, prediction, evaluation, heat maps, figures, report): "
        f"**{cold:.0f} s** (goal under {GOAL_S} s after installation: {verdict}).",
        f"- Second run (the trained model reused; heat maps, figures and the report drawn again): {warm:.0f} s.",
        "- Installation (`make setup`: the virtual environment and the pinned stack) comes before and is not counted.",
    ])  # fmt: skip
    print(section)
    if not args.no_write:
        write_section(REPO / "docs" / "performance.md", "demo-time", section)
    return 0 if cold < GOAL_S else 1


if __name__ == "__main__":
    sys.exit(main())
