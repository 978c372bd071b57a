"""Issue 10, item 7: the final configuration (the shipped model's configuration with all its training seeds, each
trained, predicted, evaluated and reported) from scratch, as one timed command.

The run folders of bench/public_configs.py are reused across sessions, so their epoch times add up pieces measured on
different days. This command trains every seed of the final configuration (`public_final.FINAL_MEMBERS`) again, in
fresh run folders under `--runs-dir`, with the precision `train.precision: auto` picks today, and writes the wall
time, the CPU time other processes took meanwhile (from /proc/stat), and the retrained seeds' AUCs to the
final-timing section of docs/results.md and to docs/final_timing.json (which public_final's speed note cites).

    nohup .venv/bin/python bench/final_timing.py > final_timing.log 2>&1 &

A timing is one uninterrupted run: the folder under `--runs-dir` must not exist yet (an interrupted timing is
started again, in a new folder).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import sys
import time
from pathlib import Path

import pandas as pd
import public_configs
from _docs import write_section  # bench/ is on sys.path when a script here runs
from public_final import FINAL_MEMBERS
from public_study import REPO, _cpu, _markdown, public_manifest

RECORD = Path("docs") / "final_timing.json"
SECTION = "final-timing"


def machine_busy_seconds() -> float:
    """CPU seconds every process on the machine has used since boot (all cores), from /proc/stat's `cpu` line."""
    fields = Path("/proc/stat").read_text(encoding="ascii").splitlines()[0].split()
    # user nice system idle iowait irq softirq steal: everything but idle and iowait is busy.
    ticks = [int(v) for v in fields[1:9]]
    busy = sum(ticks) - ticks[3] - ticks[4]
    return busy / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds this process and its waited-for children have used."""
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def _auc_rows(run: Path) -> dict[str, float]:
    from alnus.evaluate import results_values_table

    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    values = results_values_table(metrics, "patient")
    values = values[values["operating_point"].str.startswith("frozen")]
    return {str(r.split): float(r.auc) for r in values.itertuples()}


def _precision(run: Path) -> str:
    meta = next((run / "models").glob("*/model/metadata.json"), None)
    if meta is None:
        return "?"
    precision = json.loads(meta.read_text(encoding="utf-8")).get("precision") or {}
    return str(precision.get("name", "?"))


def time_final(runs_dir: Path, data: Path) -> dict[str, object]:
    """Train, predict, evaluate and report every seed of the final configuration in `runs_dir`; the timing record."""
    from alnus.config import load_config
    from alnus.study import run_study

    configurations = {c.name: c for c in public_configs.CONFIGURATIONS}
    busy0, own0, started = machine_busy_seconds(), own_cpu_seconds(), time.perf_counter()
    public_manifest(data)
    seeds = []
    for name in FINAL_MEMBERS:
        config = configurations[name]
        cfg = load_config(
            REPO / "configs" / "public.yaml", [f"name={config.run_name}", f"runs_dir={runs_dir}", *config.overrides]
        )
        seed_started = time.perf_counter()
        run_study(cfg)
        seeds.append({"configuration": name, "overrides": list(config.overrides),
                      "minutes": round((time.perf_counter() - seed_started) / 60, 1),
                      "precision": _precision(cfg.run_dir), "auc": _auc_rows(cfg.run_dir)})  # fmt: skip
        print(f"{name}: {seeds[-1]['minutes']} min, AUC {seeds[-1]['auc']}", flush=True)
    wall = time.perf_counter() - started
    own = own_cpu_seconds() - own0
    others = max(0.0, machine_busy_seconds() - busy0 - own)
    cores = len(os.sched_getaffinity(0))
    return {
        "command": "python bench/final_timing.py",
        "date": dt.date.today().isoformat(),
        "cpu": _cpu(),
        "cores": cores,
        "wall_minutes": round(wall / 60, 1),
        "own_cpu_minutes": round(own / 60, 1),
        "other_processes_cpu_minutes": round(others / 60, 1),
        "limit_minutes": 180,
        "seeds": seeds,
    }


def section(record: dict[str, object]) -> str:
    seeds = record["seeds"]
    splits = ("val", "internal_test", "external_test")
    table = pd.DataFrame([
        {"configuration": s["configuration"], "precision": s["precision"], "wall (min)": f"{s['minutes']:.0f}",
         **{f"{split} AUC": f"{s['auc'].get(split, float('nan')):.3f}" for split in splits}}
        for s in seeds
    ])  # fmt: skip
    external = [s["auc"]["external_test"] for s in seeds if "external_test" in s["auc"]]
    spread = (
        f"mean {sum(external) / len(external):.3f}, range {min(external):.3f}-{max(external):.3f}" if external else "-"
    )
    within = "within" if record["wall_minutes"] <= record["limit_minutes"] else "over"
    return "\n".join([
        "## Real data: the final configuration from scratch, timed (issue 10, item 7)",
        "",
        f"Command: `{record['command']}`. Date {record['date']}; hardware {record['cpu']}, {record['cores']} cores, "
        "no GPU. Every training seed of the final configuration, trained from scratch in fresh run folders (nothing "
        "reused, the decode cache empty), predicted, evaluated and reported, in one process.",
        "",
        f"**Wall time {record['wall_minutes']:.0f} min for {len(seeds)} seeds, {within} the {record['limit_minutes']} "
        f"min bound.** This command used {record['own_cpu_minutes']:.0f} CPU-minutes; other processes on the machine "
        f"used {record['other_processes_cpu_minutes']:.0f} CPU-minutes meanwhile (from /proc/stat), so the wall time "
        "is an upper bound for an idle machine.",
        "",
        _markdown(table),
        "",
        f"External AUC over these retrained seeds: {spread}. They replicate the final configuration's seeds in "
        "runs/public_* (same split, same seeds); the numbers differ where the training precision or the machine "
        "differs, since floating-point order changes the path of training.",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument(
        "--runs-dir",
        type=Path,
        default=REPO / "runs" / f"timed_final_{dt.datetime.now():%Y%m%d_%H%M}",
        help="a folder that does not exist yet; the seeds' run folders go inside",
    )
    args = parser.parse_args(argv)
    if not (args.data / "BUS-BRA").is_dir():
        print(f"real data not found at {args.data}; pass --data", file=sys.stderr)
        return 2
    if args.runs_dir.exists():
        print(f"{args.runs_dir} exists: a timing starts from scratch; pass a new --runs-dir", file=sys.stderr)
        return 2
    args.runs_dir.mkdir(parents=True)
    record = time_final(args.runs_dir.resolve(), args.data)
    from alnus._io import atomic_write_text

    atomic_write_text(REPO / RECORD, json.dumps(record, indent=2) + "\n")
    text = section(record)
    write_section(REPO / "docs" / "results.md", SECTION, text, title="# Results")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
