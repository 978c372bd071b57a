"""Real data, issue 10 (protocol item 29, a control for item 28): the same training size at the development site.

Item 28's `site_only` learned from 171 BrEaST patients (one image each; 31 more chose the epoch). Here BUS-BRA gets
the same: 5 draws of 171 training and 31 validation patients from the public split's BUS-BRA train and validation
patients, one image per patient, trained with the same base settings, and scored per patient on the public split's
BUS-BRA internal test and on every BrEaST patient. It writes the `busbra-small` section of docs/results.md and
docs/busbra_small.json; it needs docs/site_cv.json (bench/site_cv.py) for the comparison.

    OMP_NUM_THREADS=2 nohup nice .venv/bin/python bench/busbra_small.py > busbra_small.log 2>&1 &
    .venv/bin/python bench/busbra_small.py --report      # the section from the draws finished so far
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from _docs import publish  # bench/ is on sys.path when a script here runs
from public_study import REPO, _cpu, public_manifest
from site_cv import MODEL, WALL_FILE, train_arm

DRAWS = 5
TRAIN, VAL = 171, 31  # item 28's site_only: training and validation patients per fold
SITE = "BUS-BRA"
SCORED = ("internal_test", "external_test")
MARGIN = 0.05  # the reading fixed in advance: at least this far above site_only means BrEaST's cases are harder
COMMAND = "python bench/busbra_small.py"


def paths() -> dict[str, Path]:
    return {"work": REPO / "work" / "site_cv", "runs": REPO / "runs" / "site_cv",
            "record": REPO / "docs" / "busbra_small.json", "site_cv": REPO / "docs" / "site_cv.json"}  # fmt: skip


def public_splits() -> pd.DataFrame:
    """The public study's split (runs/public/splits.csv, made when missing as `alnus study` makes it)."""
    from alnus.config import load_config
    from alnus.runfolder import lock_run, read_splits
    from alnus.study import prepare_run

    cfg = load_config(REPO / "configs" / "public.yaml", [f"runs_dir={REPO / 'runs'}"])
    with lock_run(cfg.run_dir, command=f"{COMMAND} (the public split)"):
        return read_splits(prepare_run(cfg))


def draw(splits: pd.DataFrame, seed: int) -> pd.DataFrame:
    """Draw `seed`'s manifest: TRAIN + VAL development patients (stratified by label) with one image each, in train
    and val; every image of the BUS-BRA internal test and of the external test, as the public split has them."""
    from sklearn.model_selection import train_test_split

    table = splits.drop(columns=["split"]).assign(split=splits["split"].to_numpy())
    dev = table[(table["site"] == SITE) & table["split"].isin(["train", "val"])]
    labels = dev.groupby("patient_id")["label"].agg(["first", "nunique"])
    if (labels["nunique"] > 1).any():
        raise RuntimeError("a BUS-BRA patient has images with different labels")
    patients = labels["first"].sort_index()
    chosen, _ = train_test_split(patients.index.to_numpy(), train_size=TRAIN + VAL, stratify=patients.to_numpy(),
                                 random_state=seed)  # fmt: skip
    chosen = np.sort(chosen)
    train, val = train_test_split(chosen, test_size=VAL, stratify=patients.loc[chosen].to_numpy(), random_state=seed)
    one = dev[dev["patient_id"].isin(chosen)].groupby("patient_id", sort=True).sample(n=1, random_state=seed)
    one = one.assign(split=np.where(one["patient_id"].isin(set(val)), "val", "train"))
    assert set(one.loc[one["split"] == "train", "patient_id"]) == set(train)
    tests = table[((table["site"] == SITE) & (table["split"] == "internal_test")) | (table["split"] == "external_test")]
    return pd.concat([one, tests], ignore_index=True)


def manifest(splits: pd.DataFrame, seed: int) -> Path:
    from alnus._io import write_csv

    path = paths()["work"] / f"busbra_small{seed}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_csv(draw(splits, seed), path)
    return path


def draw_config(seed: int, path: Path):
    from alnus.config import load_config

    overrides = [f"name=busbra_small_d{seed}", f"runs_dir={paths()['runs']}", f"data.manifest={path}"]
    return load_config(REPO / "configs" / "public.yaml", overrides)


def run_dir(seed: int) -> Path:
    return paths()["runs"] / f"busbra_small_d{seed}"


def finished_draws() -> list[int]:
    from alnus.runfolder import RunFolder

    return [d for d in range(DRAWS)
            if all(RunFolder(run_dir(d)).model(MODEL).predictions_csv(s).is_file() for s in SCORED)]  # fmt: skip


def patient_auc(seed: int, split: str) -> dict[str, float]:
    """The draw's per-patient AUC (mean of a patient's images, `alnus.evaluate.aggregate_predictions`) on `split`."""
    from alnus import stats
    from alnus.evaluate import aggregate_predictions
    from alnus.runfolder import RunFolder

    preds = pd.read_csv(RunFolder(run_dir(seed)).model(MODEL).predictions_csv(split), dtype={"patient_id": str},
                        keep_default_na=False)  # fmt: skip
    cases = aggregate_predictions(preds, "patient", "mean")
    ci = stats.auc_ci(cases["y"].to_numpy(int), cases["prob"].to_numpy(float))
    positive = int(cases["y"].sum())
    return {"auc": ci.estimate, "low": ci.ci_low, "high": ci.ci_high, "n": len(cases), "positive": positive}


def compute(draws: list[int], splits: pd.DataFrame) -> dict[str, object]:
    site_cv = json.loads(paths()["site_cv"].read_text(encoding="utf-8"))
    site_only = next(m for m in site_cv["models"] if m["model"] == "site_only")
    rows = []
    for seed in draws:
        written = pd.read_csv(paths()["work"] / f"busbra_small{seed}.csv", dtype=str, keep_default_na=False)
        if written["image"].tolist() != draw(splits, seed)["image"].tolist():
            raise RuntimeError(f"work/site_cv/busbra_small{seed}.csv holds another draw; train again")
        meta = json.loads((run_dir(seed) / "models" / MODEL / "model" / "metadata.json").read_text(encoding="utf-8"))
        wall = run_dir(seed) / WALL_FILE
        rows.append({"seed": seed, **{s: patient_auc(seed, s) for s in SCORED}, "best_epoch": meta.get("best_epoch"),
                     "minutes": json.loads(wall.read_text())["seconds"] / 60 if wall.is_file() else None})  # fmt: skip
    internal = [r["internal_test"]["auc"] for r in rows]
    external = [r["external_test"]["auc"] for r in rows]
    dev = splits[(splits["site"] == SITE) & splits["split"].isin(["train", "val"])]["patient_id"].nunique()
    return {"draws": rows, "internal_mean": float(np.mean(internal)), "external_mean": float(np.mean(external)),
            "development_patients": int(dev),
            "site_only_mean": site_only["fold_auc_mean"], "site_only_folds": site_only["fold_aucs"],
            "train_patients": TRAIN, "val_patients": VAL, "date": dt.date.today().isoformat(),
            # The reading fixed in advance, once every draw is in: None until then.
            "cases_harder": None if len(rows) < DRAWS else bool(np.mean(internal) - site_only["fold_auc_mean"]
                                                                 >= MARGIN)}  # fmt: skip


def reading(result: dict[str, object]) -> str:
    n = len(result["draws"])
    if n < DRAWS:
        return f"Only {n} of {DRAWS} draws are finished, so the protocol's reading waits for the rest."
    gap = result["internal_mean"] - result["site_only_mean"]
    if gap >= MARGIN:
        return (
            f"At the same training size a model scores {gap:.3f} higher on its own site's test at BUS-BRA than at "
            f"BrEaST (at least {MARGIN}): by the reading fixed in advance, BrEaST's cases are harder than BUS-BRA's "
            "for this backbone, whoever trained it (explanation (ii) of item 28)."
        )
    return (
        f"At the same training size a model's AUC on its own site's test differs by only {gap:+.3f} between BUS-BRA "
        f"and BrEaST (within {MARGIN}): by the reading fixed in advance, the small training set explains site_only's "
        "low AUC, and item 28's site_only arm says nothing about case difficulty."
    )


def _auc(cell: dict[str, float]) -> str:
    return f"{cell['auc']:.3f} ({cell['low']:.3f}-{cell['high']:.3f})"


def section(result: dict[str, object], seconds: float) -> str:
    draws = result["draws"]
    first = draws[0]
    lines = [
        "## Real data: the same training size at the development site (protocol item 29, control for item 28)",
        "",
        f"Command: `{COMMAND}`, {dt.date.today().isoformat()}, {_cpu()}, {os.cpu_count()} cores; this report "
        f"{seconds:.0f} s. Each draw: {TRAIN} training and {VAL} validation BUS-BRA patients (stratified by label, "
        f"one image each, from the public split's train and validation patients), configs/public.yaml's base "
        f"settings as item 28's site_only; scored per patient (mean of a patient's images) on the public split's "
        f"BUS-BRA internal test ({first['internal_test']['n']} patients, {first['internal_test']['positive']} "
        f"malignant) and on BrEaST ({first['external_test']['n']} patients). Not a candidate.",
        "",
        "| draw (seed) | BUS-BRA internal AUC (95% CI) | BrEaST AUC (95% CI) | best epoch | training (min) |",
        "|---|---|---|---|---|",
    ]
    for r in draws:
        minutes = "?" if r["minutes"] is None else f"{r['minutes']:.0f}"
        lines.append(f"| {r['seed']} | {_auc(r['internal_test'])} | {_auc(r['external_test'])} | {r['best_epoch']} | "
                     f"{minutes} |")  # fmt: skip
    internal = [r["internal_test"]["auc"] for r in draws]
    external = [r["external_test"]["auc"] for r in draws]
    lines += [
        f"| mean (range) | {result['internal_mean']:.3f} ({min(internal):.3f}-{max(internal):.3f}) | "
        f"{result['external_mean']:.3f} ({min(external):.3f}-{max(external):.3f}) | | |",
        "",
        f"Item 28's site_only (BrEaST's own {TRAIN} + {VAL} patients per fold, scored on its held-out folds): mean "
        f"fold AUC {result['site_only_mean']:.3f} (folds {' '.join(f'{x:.3f}' for x in result['site_only_folds'])}). "
        f"The draws overlap in patients ({len(draws)} x {TRAIN + VAL} of {result['development_patients']}), so they "
        "show training and sampling spread, not independent replicates.",
        "",
        reading(result),
        "",
        transfer_note(result),
    ]
    return "\n".join(lines)


def transfer_note(result: dict[str, object]) -> str:
    """What the small BUS-BRA models score on BrEaST next to BrEaST's own models of the same size (an observation
    the protocol did not register a reading for)."""
    diff = result["external_mean"] - result["site_only_mean"]
    how = "about as much as" if abs(diff) <= 0.03 else ("more than" if diff > 0 else "less than")
    return (f"Not registered in advance, an observation: on BrEaST these small BUS-BRA models score "
            f"{result['external_mean']:.3f} (mean of the draws) against {result['site_only_mean']:.3f} for models "
            f"trained on the same number of BrEaST's own patients ({diff:+.3f}), so at this size the development "
            f"site's images teach {how} BrEaST's own about BrEaST's cases.")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data", help="the shared data folder")
    parser.add_argument("--report", action="store_true", help="write the section from the finished draws; no training")
    args = parser.parse_args(argv)
    os.chdir(REPO)
    if not paths()["site_cv"].is_file():
        print("docs/site_cv.json not found: run bench/site_cv.py first (item 28)", file=sys.stderr)
        return 2
    if not (REPO / "work" / "public" / "manifest.csv").is_file():
        public_manifest(args.data)
    splits = public_splits()
    if not args.report:
        for seed in range(DRAWS):
            print(f"== draw {seed + 1} of {DRAWS}", flush=True)
            train_arm(draw_config(seed, manifest(splits, seed)), splits=SCORED)
    draws = finished_draws()
    if not draws:
        print("no draw is finished yet; run without --report first", file=sys.stderr)
        return 2
    started = time.perf_counter()
    result = compute(draws, splits)
    text = section(result, time.perf_counter() - started)
    publish(paths()["record"], result, REPO / "docs" / "results.md", "busbra-small", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
