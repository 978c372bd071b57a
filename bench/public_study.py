"""Real-data study: BUS-BRA (development) -> BrEaST-Lesions-USG (external), written to docs/results.md.

Imports both datasets from ../shared/data (images are not copied), combines them, runs `alnus study
configs/public.yaml` (split -> train -> predict -> evaluate; resumable: rerun after an interruption) and writes
the paper-style tables, the model-vs-radiologist comparison and the command, date and hardware to
docs/results.md. Takes tens of minutes on a 2-core CPU; run it in the background:

    nohup .venv/bin/python bench/public_study.py > public_study.log 2>&1 &

Options: --data (the folder holding BUS-BRA/ and BrEaST-Lesions-USG/), --set KEY=VALUE (config overrides,
e.g. --set train.epochs=3 for a quick look), --no-write (do not touch docs/results.md).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
from _docs import write_section  # bench/ is on sys.path when a script here runs

REPO = Path(__file__).resolve().parents[1]


def _cpu() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown CPU"


def _p_value(p: float | None) -> str:
    if p is None or pd.isna(p):
        return ""
    return "<0.0001" if p < 1e-4 else f"{p:.4f}"


def _markdown(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def _training_minutes(run_dir: Path) -> str:
    """Training time per model from its history.csv (the sum of its epochs' times, measured while it trained)."""
    parts = []
    for history in sorted((run_dir / "models").glob("*/history.csv")):
        table = pd.read_csv(history)
        if "seconds" in table.columns:
            parts.append(f"{history.parent.name} {table['seconds'].sum() / 60:.1f} min ({len(table)} epochs)")
    return "; ".join(parts) or "time not recorded"


def _section(run_dir: Path, metrics: dict, command: str, seconds: float, overrides: list[str]) -> str:
    # Paths of the machine that ran it are shown relative to the repository (docs hold no machine paths).
    config = (run_dir / "config.yaml").read_text(encoding="utf-8").replace(f"{REPO}{os.sep}", "")
    report = pd.read_csv(run_dir / "split_report.csv")
    exclusions = pd.read_csv(run_dir / "exclusions.csv", dtype=str, keep_default_na=False)
    out = [
        "## Public data: BUS-BRA -> BrEaST-Lesions-USG (benign vs malignant as the stand-in label)",
        "",
        f"Command: `{command}`" + (f" (overrides: {' '.join(overrides)})" if overrides else ""),
        f"Date: {dt.date.today().isoformat()}; hardware: {_cpu()}, {len(os.sched_getaffinity(0))} "
        f"cores, no GPU; wall time of this command {seconds / 60:.1f} min (import, split, training unless a "
        f"finished model was reused, prediction, evaluation, report); training {_training_minutes(run_dir)}. "
        f"Load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())} (1, 5, 15 min; above the core "
        "count means other jobs shared the CPU).",
        "",
        "### Data and split (patients, images)",
        _markdown(report),
        "",
        f"Excluded rows: {len(exclusions)} ({'; '.join(sorted(set(exclusions['reason'])) or ['none'])}).",
        "",
    ]
    out += _results_section(metrics)
    out += _figures(run_dir)
    out += ["", "<details><summary>Resolved config</summary>", "", "```yaml", config.strip(), "```", "</details>"]
    return "\n".join(out)


def _results_section(metrics: dict) -> list[str]:
    """Paper-style tables per patient and per image, the frozen thresholds, and each model against the readers."""
    from alnus.evaluate import results_table

    out: list[str] = []
    settings = metrics.get("settings", {})
    for level in ("patient", "image"):
        table = results_table(metrics, level).drop(columns=["level"])
        # Each level's intervals as evaluate computed them (older metrics.json: Clopper-Pearson at every level).
        proportions = settings.get("proportion_ci_by_level", {}).get(level, "Clopper-Pearson")
        auc = settings.get("auc_ci", {}).get(level, "DeLong")
        heading = f"### Results per {level} (95% CIs; proportions % (k/n; {proportions} CI); AUC CI: {auc})"
        out += [heading, _markdown(table), ""]
    for model, entry in metrics["models"].items():
        t = entry["threshold"]
        out.append(
            f"- {model}: threshold {t['value']:.4g} ({t['rule']}), chosen on the validation {t['level']}s only "
            "and applied unchanged to the internal and external tests."
        )
    for split, by_model in metrics.get("readers", {}).items():
        for model, found in by_model.items():
            if "error" in found:
                out += ["", f"Readers ({split}): not compared: {found['error']}"]
                continue
            perf = pd.DataFrame(found["performance"])
            keep = [c for c in ("reader", "n_read", "sensitivity", "specificity", "auc") if c in perf.columns]
            panel = pd.DataFrame(found["panel"])
            if "p" in panel.columns:
                panel["p"] = [_p_value(p) for p in panel["p"]]
            pcols = [c for c in ("metric", "n", "model", "readers", "difference", "ci_low", "ci_high", "p", "note")
                     if c in panel.columns]  # fmt: skip
            out += [
                "",
                f"### {model} vs the radiologists' BI-RADS ({split}, per {found['level']}; call at >= 4a)",
                _markdown(perf[keep].round(4)),
                "",
                _markdown(panel[pcols].round(4).astype(object).where(panel[pcols].notna(), "")),
                "",
                f"Note: {found.get('note') or ''}",
            ]
    return out


def _figures(run_dir: Path, *, prefix: str = "public", models: list[str] | None = None, flow: bool = True) -> list[str]:
    """Copy the run's flow diagram and test-split ROC figures (of `models`, default all) to docs/img as
    `<prefix>_<figure>.png` and link them."""
    import shutil

    from alnus.report.figures import read_figures_index

    tests = ("internal_test", "external_test")
    wanted = [f for f in read_figures_index(run_dir)
              if (flow and f.name == "flow") or (f.section == "roc" and f.model and f.split in tests
                                      and (models is None or f.model in models))]  # fmt: skip
    if not wanted:
        return []
    img = REPO / "docs" / "img"
    img.mkdir(parents=True, exist_ok=True)
    out = ["", "### Figures (from the run's report)"]
    for figure in wanted:
        target = img / f"{prefix}_{figure.name}.png"
        shutil.copyfile(figure.path, target)
        out += ["", f"![{figure.name}](img/{target.name})", "", f"*{figure.caption}*"]
    run = run_dir.relative_to(REPO)
    out += ["", f"The full report (all figures, heat-map gallery, model card, CLAIM checklist): `{run}/report.html` "
            f"(regenerate it with `alnus report {run}`)."]  # fmt: skip
    return out


def data_argument(parser: argparse.ArgumentParser) -> None:
    """The `--data` option of the real-data benches: the shared folder holding BUS-BRA/ and BrEaST-Lesions-USG/."""
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data", help="the shared data folder")


def public_split(data: Path) -> pd.DataFrame:
    """From the repository's folder, the public study's split: its manifest imported from `data` when missing, the
    split made as `alnus study` makes it (busbra_small.public_splits)."""
    from busbra_small import public_splits

    os.chdir(REPO)
    if not (REPO / "work" / "public" / "manifest.csv").is_file():
        public_manifest(data)
    return public_splits()


def public_manifest(data: Path) -> Path:
    """Import BUS-BRA and BrEaST from `data` (images are not copied) and combine them into the manifest that
    configs/public.yaml names (work/public/manifest.csv); returns its path."""
    from alnus._io import write_csv
    from alnus.data.importers import import_dataset
    from alnus.data.manifest import combine_manifests

    work = REPO / "work"
    busbra = import_dataset("busbra", data / "BUS-BRA", work / "busbra")
    breast = import_dataset("breast", data / "BrEaST-Lesions-USG", work / "breast")
    combined = work / "public" / "manifest.csv"
    write_csv(combine_manifests([busbra, breast], combined), combined)
    return combined


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)

    from alnus.config import load_config
    from alnus.study import run_study

    if not (args.data / "BUS-BRA").is_dir():
        print(f"real data not found at {args.data}; pass --data", file=sys.stderr)
        return 2
    started = time.perf_counter()
    public_manifest(args.data)
    cfg = load_config(REPO / "configs" / "public.yaml", args.overrides)
    metrics = run_study(cfg)
    seconds = time.perf_counter() - started
    command = "python bench/public_study.py" + "".join(f" --set {o}" for o in args.overrides)
    section = _section(cfg.run_dir, metrics, command, seconds, args.overrides)
    print(section)
    if not args.no_write:
        path = REPO / "docs" / "results.md"
        title = "# Results\n\nMeasured results, each with the command that produced it."
        write_section(path, "public-study", section, title=title)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
