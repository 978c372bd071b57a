"""Real data, issue 10 (protocol item 27): how far each model's answer moves when its lesion box moves by 2 px.

The model card's measurement (`ship_model._box_jitter`: every external test box moved by 2 px left, right, up and
down, each image predicted again by the run's own package) for each configuration named, side by side, with that
configuration's AUCs from the configurations table. Writes the `box-shift` section of docs/results.md.

    .venv/bin/python bench/box_shift.py [--configurations aux_birads aux_geo]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time

from _docs import write_section  # bench/ is on sys.path when a script here runs
from public_study import REPO, _cpu

CONFIGURATIONS = ("aux_birads", "aux_geo")
MODEL = "efficientnet_lite0"


def row(name: str, jitter: dict, table_row: dict | None) -> str:
    """One table row: the configuration, its AUCs as the configurations table has them, and its box sensitivity."""
    aucs = [table_row.get(k, "") if table_row else "" for k in ("val AUC (selection)", "external AUC")]
    changed = f"{jitter['image_calls_changed']} of {jitter['calls_compared']}"
    return (f"| {name} | {aucs[0]} | {aucs[1]} | {jitter['median_abs_change']:.3f} | {jitter['max_abs_change']:.2f} "
            f"| {changed} |")  # fmt: skip


def section(rows: list[str], seconds: float, command: str, images: int) -> str:
    return "\n".join([
        "## Real data: how far a 2-pixel box shift moves each model (protocol item 27)",
        "",
        f"Command: `{command}`, {dt.date.today().isoformat()}, {_cpu()}, {os.cpu_count()} cores, {seconds / 60:.1f} "
        f"min. Each of the {images} external test images predicted again by the run's own package with its lesion "
        "box moved by 2 px left, right, up and down (the model card's measurement): the median (over the four "
        "directions, of the median over images) and the largest change of the probability, and how many of the "
        "image calls at the frozen threshold change. The AUCs are the configurations table's.",
        "",
        "| configuration | val AUC (selection) | external AUC | median change | largest change | calls changed |",
        "|---|---|---|---|---|---|",
        *rows,
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    import public_configs
    import ship_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configurations", nargs="+", default=list(CONFIGURATIONS))
    args = parser.parse_args(argv)
    started = time.perf_counter()
    rows, images = [], 0
    for name in args.configurations:
        config = next((c for c in public_configs.CONFIGURATIONS if c.name == name), None)
        run = REPO / "runs" / (config.run_name if config else f"public_{name}")
        package = run / "models" / MODEL / "model"
        if config is None or not (package / "metadata.json").is_file():
            print(f"{name}: no packaged {MODEL} in {run}: left out", file=sys.stderr)
            continue
        jitter = ship_model._box_jitter(package, run)
        images = jitter["images"]
        found = public_configs.rows_of(name)
        rows.append(row(name, jitter, found[0] if found else None))
        print(rows[-1], file=sys.stderr, flush=True)
    if not rows:
        return 2
    text = section(rows, time.perf_counter() - started, "python bench/box_shift.py", images)
    write_section(REPO / "docs" / "results.md", "box-shift", text, title="# Results")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
