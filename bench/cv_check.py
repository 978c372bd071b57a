"""Real data, issue 10 (protocol items 25 and 31): does patient-level cross-validation confirm the choice of aux_birads?

The rule chose aux_birads over base on one validation split of 96 BUS-BRA patients. Here both configurations are
trained on the same 3 patient-level folds of the BUS-BRA train and validation patients (`alnus.cv`; the internal
and external tests are neither trained on nor scored), folds interleaved so that an interrupted session leaves paired
folds, and their out-of-fold validation predictions are compared per patient: each configuration's pooled AUC, each
fold's AUC, and the paired DeLong difference over the patients of the folds both have finished. Item 25 keeps each
fold's epoch of highest validation AUC (`--selection val_auc`, section `cv-check`); item 31 keeps each fold's last
epoch (`--selection last`, section `cv-check-last`, run names ending in `_last`), so that nothing in a fold's model
was chosen on the patients it is scored on. Each writes its record to docs/cv_check_<selection>.json.

    OMP_NUM_THREADS=2 nohup nice .venv/bin/python bench/cv_check.py --data ../shared/data > cv_check.log 2>&1 &
    .venv/bin/python bench/cv_check.py --report      # the section from the folds finished so far
    .venv/bin/python bench/cv_check.py --selection last ...
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from _docs import publish  # bench/ is on sys.path when a script here runs
from public_configs import CONFIGURATIONS, WALL_FILE, auc_of, rows_of
from public_study import REPO, _cpu, public_manifest

FOLDS = 3
COMPARED = ("base", "aux_birads")  # the reference first: differences are aux_birads minus base
BACKBONE = "efficientnet_lite0"
COMMAND = "python bench/cv_check.py"


@dataclass(frozen=True)
class Selection:
    """How each fold's model is kept: its protocol item, docs section, run-name suffix and extra overrides."""

    item: int
    section: str
    suffix: str
    overrides: tuple[str, ...]
    kept: str  # the table's column for the epoch each fold kept


SELECTIONS = {
    "val_auc": Selection(25, "cv-check", "", (), "best epoch per fold"),
    "last": Selection(
        31, "cv-check-last", "_last", ("train.selection_metric=last", "train.early_stopping_patience=null"),
        "epoch kept per fold (the last)",
    ),
}  # fmt: skip


def record_path(selection: str) -> Path:
    return REPO / "docs" / f"cv_check_{selection}.json"


def configs(selection: str = "val_auc") -> dict[str, object]:
    """The study config of each compared configuration, as bench/public_configs.py builds it, kept by `selection`."""
    from alnus.config import load_config

    by_name = {c.name: c for c in CONFIGURATIONS}
    how = SELECTIONS[selection]
    public = REPO / "configs" / "public.yaml"
    return {
        n: load_config(public, [f"name={by_name[n].run_name}{how.suffix}", *by_name[n].overrides, *how.overrides])
        for n in COMPARED
    }


def train(selection: str, *, resume: bool) -> None:
    """Train fold 0 of each configuration, then fold 1 of each, ...; finished folds are reused."""
    from rich.console import Console

    from alnus.cv import fold_config, train_fold

    console = Console()
    for fold in range(FOLDS):
        for name, cfg in configs(selection).items():
            fold_cfg = fold_config(cfg, FOLDS, fold)
            console.rule(f"{name}: fold {fold} of {FOLDS} ({fold_cfg.name})")
            started = time.perf_counter()
            trained, _ = train_fold(fold_cfg, resume=resume, console=console)
            if trained:
                from alnus._io import atomic_write_text

                record = {"seconds": time.perf_counter() - started, "date": dt.date.today().isoformat(),
                          "cpu": _cpu(), "cores": len(os.sched_getaffinity(0)), "resumed": resume}  # fmt: skip
                atomic_write_text(fold_cfg.run_dir / WALL_FILE, json.dumps(record, indent=2) + "\n")


def finished_folds(selection: str) -> list[int]:
    """The folds that every compared configuration has finished training."""
    from alnus.cv import fold_config
    from alnus.runfolder import RunFolder

    return [
        fold
        for fold in range(FOLDS)
        if all(
            RunFolder(fold_config(cfg, FOLDS, fold).run_dir).model(BACKBONE).val_predictions_best.is_file()
            for cfg in configs(selection).values()
        )
    ]


def _minutes(run_dir: Path) -> float | None:
    path = run_dir / WALL_FILE
    return json.loads(path.read_text(encoding="utf-8"))["seconds"] / 60 if path.is_file() else None


def compare(folds: list[int], selection: str = "val_auc") -> dict[str, object]:
    """Pooled and per-fold AUCs of each configuration and their paired difference (`alnus.cv.compare_folds`), over
    `folds`, with each fold's training time and kept epoch."""
    from alnus.cv import compare_folds, fold_cases, fold_config, fold_predictions

    cases, minutes, epochs = {}, {}, {}
    for name, cfg in configs(selection).items():
        runs = [fold_config(cfg, FOLDS, fold).run_dir for fold in folds]
        tables = [fold_predictions(run, BACKBONE, cfg.data.positive_label) for run in runs]
        cases[name] = [fold_cases(t, "patient", cfg.evaluate.aggregate) for t in tables]
        minutes[name] = [_minutes(run) for run in runs]
        epochs[name] = [int(t["epoch"].iloc[0]) for t in tables]
    result = compare_folds(cases)
    for row in result["models"]:
        row.update(minutes=minutes[row["model"]], kept_epochs=epochs[row["model"]])
    return {**result, "fold_numbers": folds, "selection": selection}


def section(result: dict[str, object], seconds: float, earlier: dict[str, object] | None = None) -> str:
    """The docs section of `result` (`compare`); `earlier`: item 25's record, set beside item 31's fold AUCs."""
    folds = result["fold_numbers"]
    selection = result.get("selection", "val_auc")
    how = SELECTIONS[selection]
    reference, other = COMPARED
    rows = {row["model"]: row for row in result["models"]}
    d = rows[other]
    title = (
        "does cross-validation confirm the choice?"
        if selection == "val_auc"
        else "cross-validation with nothing chosen on the scored patients"
    )
    command = COMMAND if selection == "val_auc" else f"{COMMAND} --selection {selection}"
    kept = (
        "each fold keeps the epoch of highest AUC on its own validation patients"
        if selection == "val_auc"
        else "each fold trains every epoch and keeps the last (`train.selection_metric: last`, no early stopping)"
    )
    lines = [
        f"## Real data: {title} (protocol item {how.item}, diagnostic)",
        "",
        f"Command: `{command}`, {dt.date.today().isoformat()}, {_cpu()}, {os.cpu_count()} cores; this report "
        f"{seconds:.0f} s. base and aux_birads, each trained on {FOLDS} patient-level folds of the BUS-BRA train and "
        f"validation patients (`alnus cv` folds, `data.seed` 0; the same folds for both); folds finished by both: "
        f"{', '.join(str(f) for f in folds)} (of {', '.join(str(k) for k in range(FOLDS))}; "
        f"{', '.join(str(n) for n in result['fold_cases'])} patients; {result['positive']} malignant, "
        f"{result['negative']} benign in all). AUC per patient (mean of a patient's images) on each fold's validation "
        f"patients, by the model trained without them; {kept}. The pooled AUC mixes the folds' models (DeLong CI), so "
        "it ranks and is no model's AUC. The internal and external tests were neither trained on nor scored.",
        "",
        f"| configuration | AUC per fold | mean of the folds | pooled out-of-fold AUC (95% CI) | {how.kept} "
        "| training per fold (min) |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in rows.items():
        minutes = " ".join("?" if x is None else f"{x:.0f}" for x in m["minutes"])
        lines.append(
            f"| {name} | {' '.join(f'{x:.3f}' for x in m['fold_aucs'])} | {m['fold_auc_mean']:.3f} | "
            f"{m['pooled_auc']:.3f} ({m['pooled_auc_ci'][0]:.3f}-{m['pooled_auc_ci'][1]:.3f}) | "
            f"{' '.join(str(e) for e in m['kept_epochs'])} | {minutes} |"
        )
    fold_diffs = np.asarray(d["fold_differences"])
    single = {name: auc_of(r["val AUC (selection)"]) for name in COMPARED for r in rows_of(name)}
    against = ""
    if len(single) == 2 and None not in single.values():
        a, b = single[other], single[reference]
        against = (f" On the single validation split the rule used, the difference was {a - b:+.3f} ({a:.3f} against "
                   f"{b:.3f}, the configurations table).")  # fmt: skip
    ahead = int((fold_diffs > 0).sum())
    verdict = (
        "the folds do not separate the two configurations at the 5% level"
        if d["p"] >= 0.05
        else f"the folds favour {other if d['difference'] > 0 else reference} at the 5% level"
    )
    pooled = (
        " The pooled AUCs rank the two the other way: the fold models' scores sit on different scales."
        if d["pooled_disagrees"]
        else ""
    )
    lines += [
        "",
        f"{other} minus {reference}, within each fold over the same patients and averaged over the folds (`alnus "
        f"cv-compare`'s test: paired DeLong per fold, the folds' variances summed): {d['difference']:+.3f} "
        f"({d['difference_ci'][0]:+.3f} to {d['difference_ci'][1]:+.3f}), P {d['p']:.3f}; {other} is ahead in "
        f"{ahead} of {len(folds)} folds (per fold: {', '.join(f'{x:+.3f}' for x in fold_diffs)}). So {verdict}."
        f"{pooled}{against} The CI and P cover the sampling of patients given these trained models, not training "
        + (
            "randomness; each fold's epoch was chosen on that fold's validation patients, for both alike."
            if selection == "val_auc"
            else "randomness; no fold's model was chosen on its validation patients."
        ),
    ]
    if earlier is not None:
        lines += ["", _optimism(result, earlier)]
    return "\n".join(lines)


def _optimism(result: dict[str, object], earlier: dict[str, object]) -> str:
    """Each configuration's mean fold AUC beside item 25's (epoch chosen on the scored patients), over the folds
    both records hold."""
    parts = []
    for row in result["models"]:
        then = next((m for m in earlier["models"] if m["model"] == row["model"]), None)
        if then is None:
            continue
        shared = [f for f in result["fold_numbers"] if f in earlier["fold_numbers"]]
        now_aucs = [row["fold_aucs"][result["fold_numbers"].index(f)] for f in shared]
        then_aucs = [then["fold_aucs"][earlier["fold_numbers"].index(f)] for f in shared]
        if not shared:
            continue
        now, before = float(np.mean(now_aucs)), float(np.mean(then_aucs))
        parts.append(
            f"{row['model']} {now:.3f} against {before:.3f} ({now - before:+.3f}; per fold "
            f"{', '.join(f'{a - b:+.3f}' for a, b in zip(now_aucs, then_aucs, strict=True))})"
        )
    if not parts:
        return "Item 25's record holds none of these folds, so the selection optimism is not computed."
    d_now = next(m for m in result["models"] if m["model"] == COMPARED[1])
    d_then = next((m for m in earlier["models"] if m["model"] == COMPARED[1]), {})
    then = f" (item 25: {d_then['difference']:+.3f}, P {d_then['p']:.3f})" if "difference" in d_then else ""
    return (
        "Against item 25, where each fold kept its epoch of highest AUC on the same patients it was scored on (mean "
        f"fold AUC with the last epoch against the chosen one, over the folds both ran): {'; '.join(parts)}. The "
        f"difference aux_birads minus base with the last epoch is {d_now['difference']:+.3f}{then}."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data", help="the shared data folder")
    parser.add_argument("--report", action="store_true", help="write the section from the finished folds; no training")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted fold from its last.pt")
    parser.add_argument(
        "--selection", choices=sorted(SELECTIONS), default="val_auc",
        help="the epoch each fold keeps: val_auc (item 25) or last (item 31)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    os.chdir(REPO)  # configs/public.yaml's runs_dir is relative to the working directory
    if not args.report:
        if not (REPO / "work" / "public" / "manifest.csv").is_file():
            public_manifest(args.data)
        train(args.selection, resume=args.resume)
    folds = finished_folds(args.selection)
    if not folds:
        print("no fold is finished by both configurations yet; run without --report first", file=sys.stderr)
        return 2
    started = time.perf_counter()
    result = compare(folds, args.selection)
    earlier, item25 = None, record_path("val_auc")
    if args.selection != "val_auc" and item25.is_file():
        earlier = json.loads(item25.read_text(encoding="utf-8"))
    text = section(result, time.perf_counter() - started, earlier)
    publish(record_path(args.selection), result, REPO / "docs" / "results.md", SELECTIONS[args.selection].section, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
