"""Every configuration tried on the real data (issue 10), one table: chosen on BUS-BRA, scored once on BrEaST.

Each configuration is configs/public.yaml with a few overrides, trained in its own run folder (runs/public_<name>;
the base configuration is runs/public itself) on the same patient split (the split depends on the data and
`data.seed` only). The selection rule is fixed before any run (docs/results.md, "Protocol"): the configuration with
the highest validation AUC per patient (BUS-BRA validation patients) is chosen; the external test (BrEaST) is
scored for every finished configuration and shown beside it, so the selection is visible, but never used to choose.

Runs go one at a time (two trainings at once on 2 cores are several times slower); a finished run is reused as it
is (`--rerun` predicts, evaluates and reports it again), an interrupted one resumes. Wall time per configuration is
kept in its run folder (`bench_wall.json`). The table goes to
docs/results.md between the public-configurations markers.

    nohup .venv/bin/python bench/public_configs.py > public_configs.log 2>&1 &      # all, in order
    .venv/bin/python bench/public_configs.py --only shift_aug,lite2                    # some
    .venv/bin/python bench/public_configs.py --table                                   # rewrite the table only
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

import pandas as pd
from _docs import write_section  # bench/ is on sys.path when a script here runs
from public_study import REPO, _cpu, _markdown, public_manifest


@dataclass(frozen=True)
class Configuration:
    name: str
    change: str
    overrides: tuple[str, ...] = ()
    # The command that trains it when that is not this script (a GPU run): this script then only reads its run folder.
    trained_by: str = ""

    @property
    def run_name(self) -> str:
        return "public" if self.name == "base" else f"public_{self.name}"


SHIFT_AUGMENT = "train.augment={blur: 1.5, resolution: [0.5, 1.0], attenuation: 1.0, tgc: 0.3}"
# In the order they run. Seeds of the base configuration measure how much a rerun moves the numbers.
CONFIGURATIONS = (
    Configuration("base", "EfficientNet-Lite0, 224 px, ROI margin 0.15, 12 epochs (configs/public.yaml)"),
    Configuration(
        "shift_aug", "base + scanner-shift augmentation (blur, resolution, attenuation, TGC bands)", (SHIFT_AUGMENT,)
    ),  # fmt: skip
    Configuration("lite2", "EfficientNet-Lite2 at its native 260 px", ("models=[efficientnet_lite2]",)),
    Configuration("margin30", "base with ROI margin 0.30 (more context around the lesion)", ("preprocess.margin=0.3",)),
    Configuration("seed1", "base, training seed 1 (same split)", ("train.seed=1",)),
    Configuration("seed2", "base, training seed 2 (same split)", ("train.seed=2",)),
    Configuration(
        "grey_eq",
        "base + histogram equalisation of each lesion crop (preprocess.grey: equalize)",
        ("preprocess.grey=equalize",),
    ),  # fmt: skip
    Configuration(
        "aux_birads",
        "base + the BI-RADS category as an ordinal auxiliary target (train.aux_reader, weight 0.3)",
        ("train.aux_reader=reader_birads",),
    ),  # fmt: skip
    Configuration(
        "ema",
        "base + a moving average of the weights (train.ema_decay 0.99), validated and packaged",
        ("train.ema_decay=0.99",),
    ),  # fmt: skip
    # Training seeds of aux_birads, the protocol's variance check (item 5) once the rule pointed to it.
    Configuration(
        "aux_seed1", "aux_birads, training seed 1 (same split)", ("train.aux_reader=reader_birads", "train.seed=1")
    ),
    Configuration(
        "aux_seed2", "aux_birads, training seed 2 (same split)", ("train.aux_reader=reader_birads", "train.seed=2")
    ),
    Configuration(
        "body_lr",
        "base with layer-wise learning rates: the pretrained body at 0.3 x the head's (train.body_lr_factor)",
        ("train.body_lr_factor=0.3",),
    ),  # fmt: skip
    # Protocol item 9 (2026-12-03): the chosen lever (the BI-RADS auxiliary target) on the larger backbone.
    Configuration(
        "aux_lite2",
        "aux_birads on EfficientNet-Lite2 at its native 260 px",
        ("models=[efficientnet_lite2]", "train.aux_reader=reader_birads"),
    ),  # fmt: skip
    # Protocol item 10 (2026-12-03): resolution harmonisation with the chosen lever; the limit comes from BUS-BRA's
    # lesion-crop sizes (development data) only.
    Configuration(
        "aux_crop128",
        "aux_birads + every lesion crop longer than 128 px downsampled to 128 px first (preprocess.max_crop)",
        ("train.aux_reader=reader_birads", "preprocess.max_crop=128"),
    ),  # fmt: skip
    # Protocol item 13 (2026-12-03, fixed before it was trained): the lesion with wide context, one scale of a
    # two-scale ensemble (aux_scales in bench/public_final.py).
    Configuration(
        "aux_margin50",
        "aux_birads with ROI margin 0.50 (the lesion with wide context)",
        ("train.aux_reader=reader_birads", "preprocess.margin=0.5"),
    ),  # fmt: skip
    # Protocol item 14 (2026-12-03, fixed before it was trained): weight averaging over the epochs from aux_birads's
    # validation peak (epoch 4 in its history.csv) on.
    Configuration(
        "aux_swa",
        "aux_birads + stochastic weight averaging from epoch 4 (train.swa_start), validated and packaged",
        ("train.aux_reader=reader_birads", "train.swa_start=4"),
    ),  # fmt: skip
    # Protocol item 15 (2026-12-03, fixed before it was trained): MixStyle on the early stages.
    Configuration(
        "aux_mixstyle",
        "aux_birads + MixStyle on the first three stages while training (train.mixstyle 0.5)",
        ("train.aux_reader=reader_birads", "train.mixstyle=0.5"),
    ),  # fmt: skip
    # Protocol item 16 (2026-12-03, fixed before it was trained): the auxiliary BI-RADS target at full weight.
    Configuration(
        "aux_w1",
        "aux_birads with the auxiliary BI-RADS loss at weight 1.0 instead of 0.3 (train.aux_weight)",
        ("train.aux_reader=reader_birads", "train.aux_weight=1.0"),
    ),  # fmt: skip
    # Protocol item 17 (2026-12-03, fixed before it was trained): the Lite1 at its native size, the one
    # EfficientNet-Lite size not yet run.
    Configuration(
        "aux_lite1",
        "aux_birads on EfficientNet-Lite1 at its native 240 px",
        ("models=[efficientnet_lite1]", "train.aux_reader=reader_birads"),
    ),  # fmt: skip
    # Protocol item 19 (2026-12-04, fixed before it was trained): the chosen backbone with a finer input.
    Configuration(
        "aux_288",
        "aux_birads with 288 px lesion crops instead of Lite0's native 224 (preprocess.size)",
        ("train.aux_reader=reader_birads", "preprocess.size=288"),
    ),  # fmt: skip
    # Protocol item 20 (2026-12-04, fixed before it was trained): the auxiliary target with the shift augmentation.
    Configuration(
        "aux_shift",
        "aux_birads + the scanner-shift augmentation of shift_aug (blur, resolution, attenuation, TGC bands)",
        ("train.aux_reader=reader_birads", SHIFT_AUGMENT),
    ),  # fmt: skip
    # Protocol item 22 (2026-12-04, fixed before it was trained): the lesion's shape from the training masks as a
    # second auxiliary target.
    Configuration(
        "aux_shape",
        "aux_birads + the lesion's shape on its mask (orientation, solidity, circularity) as a second auxiliary target",
        ("train.aux_reader=reader_birads", "train.aux_shape=0.3"),
    ),  # fmt: skip
    # Protocol item 27 (2026-12-05, fixed before it was trained): wider zoom and shift, for boxes drawn differently.
    Configuration(
        "aux_geo",
        "aux_birads + wider zoom (0.75-1.33) and shift (15%) of the lesion crop while training (train.augment)",
        ("train.aux_reader=reader_birads", "train.augment={scale: [0.75, 1.33], shift: 0.15}"),
    ),  # fmt: skip
    # The chosen configuration trained again with the same settings and seed (2026-12-04, after the run folder of its
    # first training was lost with its machine; CPU training is not bit-reproducible: bf16, threads): how far a rerun
    # moves the numbers. It is no candidate: the rule chose aux_birads on its first training, the shipped weights.
    Configuration(
        "aux_birads_rerun",
        "aux_birads trained again, same settings and seed (CPU training is not bit-reproducible): not a candidate",
        ("train.aux_reader=reader_birads",),
    ),
    # The paper's three CNNs (Zhou et al. 2020). Offline there are no ImageNet weights for them, so they start from
    # random initialisation; on 2 CPU cores they get bounded budgets (112 px for 2 epochs, 192 px for 6): rows for
    # comparison, not a reproduction of the paper's transfer learning.
    Configuration(
        "paper_cnns",
        "the paper's Inception V3, Inception-ResNet V2, ResNet-101: random init (offline), 112 px, 2 epochs",
        (
            "models=[inception_v3,inception_resnet_v2,resnet101]",
            "train.weights=none",
            "preprocess.size=112",
            "train.epochs=2",
            "train.head_epochs=0",
            "train.lr=1e-3",
        ),  # fmt: skip
    ),
    Configuration(
        "paper_cnns_192",
        "the paper's three CNNs, random init (offline), a larger budget: 192 px, 6 epochs",
        (
            "models=[inception_v3,inception_resnet_v2,resnet101]",
            "train.weights=none",
            "preprocess.size=192",
            "train.epochs=6",
            "train.head_epochs=0",
            "train.lr=1e-3",
        ),  # fmt: skip
    ),
    # Protocol item 21 (2026-12-04): the same three at their native sizes, trained on a GPU machine.
    Configuration(
        "paper_cnns_gpu",
        "the paper's three CNNs, random init (offline), native sizes (299/299/224 px) on one GPU, epochs fitted to a "
        "fixed budget",
        trained_by="bench/gpu_paper_cnns.py",
    ),
)
WALL_FILE = "bench_wall.json"
# Every finished configuration's rows, as measured: run folders stay on the machine that trained them (runs/ is not
# committed), so the table keeps the rows of configurations whose run folder is elsewhere from this record, each with
# where and when it was measured. A configuration whose run folder is here is read from it again (and its record
# replaced).
RECORD = Path("docs") / "public_configurations.json"
# In a run folder rebuilt from a shipped package (bench/public_final.py): its row is the record's, which holds the
# training time and the date and machine it was measured on.
REBUILT_FILE = "rebuilt_from_package.json"
MARKER_FIELDS = ("package", "weights_sha256", "date", "cpu")


def rebuilt_marker(run: Path) -> dict[str, object] | None:
    """The rebuild record of a run folder, or None when its models were trained here: no record, or one whose weights
    are no longer the run's package's (a model trained here since). An unreadable or incomplete record reads as `{}`:
    a rebuild that was never checked."""
    path = run / REBUILT_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return {}
    if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in MARKER_FIELDS):
        return {}
    packages = []
    for meta in (run / "models").glob("*/model/metadata.json"):
        try:
            packages.append(json.loads(meta.read_text(encoding="utf-8")).get("weights_sha256"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError, AttributeError):
            return {}
    if packages and record["weights_sha256"] not in packages:
        return None  # trained here after the rebuild: the record no longer describes the model
    if "reproduces" in record and not isinstance(record["reproduces"], dict):
        return {}
    return record


def _run_one(config: Configuration, *, rerun: bool = False) -> None:
    if config.trained_by:
        print(f"{config.name}: trained by {config.trained_by} (runs/{config.run_name}); not trained here")
        return
    from alnus.config import load_config
    from alnus.study import run_study, trained_package

    overrides = [f"name={config.run_name}", *config.overrides]
    cfg = load_config(REPO / "configs" / "public.yaml", overrides)
    finished = (cfg.run_dir / "metrics.json").is_file() and all(trained_package(cfg, m) for m in cfg.models)
    if finished and not rerun:
        print(f"{config.name}: finished earlier (runs/{config.run_name}); reused (--rerun evaluates it again)")
        return
    started = time.perf_counter()
    run_study(cfg)
    seconds = time.perf_counter() - started
    wall = cfg.run_dir / WALL_FILE
    previous = json.loads(wall.read_text(encoding="utf-8")) if wall.is_file() else {}
    # A rerun that only reuses finished work is quick: keep the wall time of the run that trained.
    if seconds > previous.get("seconds", 0):
        from alnus._io import atomic_write_text

        record = {"seconds": seconds, "date": dt.date.today().isoformat(), "cpu": _cpu(),
                  "cores": len(os.sched_getaffinity(0)), "overrides": overrides}  # fmt: skip
        atomic_write_text(wall, json.dumps(record, indent=2) + "\n")


def _read_record() -> dict[str, list[dict[str, object]]]:
    path = REPO / RECORD
    return json.loads(path.read_text(encoding="utf-8"))["rows"] if path.is_file() else {}


def _write_record(rows: dict[str, list[dict[str, object]]]) -> None:
    from alnus._io import atomic_write_text

    about = "Rows of docs/results.md's configuration table as measured, written by bench/public_configs.py."
    text = json.dumps({"about": about, "rows": rows}, indent=1, ensure_ascii=False) + "\n"
    atomic_write_text(REPO / RECORD, text)


def _rows(config: Configuration) -> list[dict[str, object]]:
    """The configuration's rows, from its run folder when it is here (the record is updated), else as recorded."""
    measured = measured_rows(config)
    record = _read_record()
    if not measured:
        return [dict(r) for r in record.get(config.name, [])]
    if record.get(config.name) != measured:
        record[config.name] = measured
        _write_record(record)
    return measured


def measured_rows(config: Configuration, *, rebuilt: bool = False) -> list[dict[str, object]]:
    """The configuration's rows from its run folder here (none for a folder rebuilt from a package, unless
    `rebuilt`)."""
    from alnus.evaluate import results_values_table

    run = REPO / "runs" / config.run_name
    if not (run / "metrics.json").is_file() or (rebuilt_marker(run) is not None and not rebuilt):
        return []
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    values = results_values_table(metrics, "patient")
    values = values[values["operating_point"].str.startswith("frozen")]
    wall = json.loads((run / WALL_FILE).read_text(encoding="utf-8")) if (run / WALL_FILE).is_file() else {}
    rows = []
    for model, by_model in values.groupby("model", sort=False):
        at = {r.split: r for r in by_model.itertuples()}
        ext = at.get("external_test")
        row: dict[str, object] = {
            "configuration": config.name,
            "change": config.change,
            "model": model,
            "val AUC (selection)": _auc(at.get("val")),
            "internal AUC": _auc(at.get("internal_test")),
            "external AUC": _auc(ext),
            "external sens / spec": "" if ext is None else f"{100 * ext.sensitivity:.1f} / {100 * ext.specificity:.1f}",
            "training (min)": _training_minutes(run / "models" / str(model) / "history.csv"),
            "last study run (min)": f"{wall['seconds'] / 60:.0f}" if "seconds" in wall else "?",
            "measured": _measured(run, wall),
        }
        rows.append(row)
    return rows


def _measured(run: Path, wall: dict[str, object]) -> str:
    """When and on what the run was evaluated: its wall record's date and CPU, else metrics.json's date here."""
    if "date" in wall and "cpu" in wall:
        return f"{wall['date']}, {wall['cpu']}, {wall.get('cores', '?')} cores"
    when = dt.date.fromtimestamp((run / "metrics.json").stat().st_mtime).isoformat()
    return f"{when}, {_cpu()}, {len(os.sched_getaffinity(0))} cores"


def rows_of(name: str) -> list[dict[str, object]]:
    """The table rows of the configuration called `name` (empty until its run has finished)."""
    return _rows(next(c for c in CONFIGURATIONS if c.name == name))


def training_seconds(name: str) -> float:
    """Training time of a configuration's models: the sum of their epochs' times in history.csv, or, where its
    run folder is not here, the minutes its recorded rows give."""
    config = next(c for c in CONFIGURATIONS if c.name == name)
    histories = list((REPO / "runs" / config.run_name / "models").glob("*/history.csv"))
    if not histories:
        minutes = [str(r.get("training (min)", "")) for r in rows_of(name)]
        return 60.0 * sum(float(m) for m in minutes if m.replace(".", "", 1).isdigit())
    total = 0.0
    for history in histories:
        epochs = pd.read_csv(history)
        total += float(epochs["seconds"].sum()) if "seconds" in epochs.columns else 0.0
    return total


def _training_minutes(history: Path) -> str:
    """The sum of the epochs' times in a model's history.csv (a rerun that reuses the model does not train again);
    `-` for a model that was not trained in its run folder (an ensemble of trained models)."""
    if not history.is_file():
        return "-"
    epochs = pd.read_csv(history)
    return f"{float(epochs['seconds'].sum()) / 60:.0f}" if "seconds" in epochs.columns else "?"


def _auc(r: object) -> str:
    """`0.873 (0.821-0.925)` from a row of `results_values_table`, or empty."""
    if r is None or pd.isna(r.auc):
        return ""
    return f"{r.auc:.3f} ({r.auc_ci_low:.3f}-{r.auc_ci_high:.3f})"


def table_section() -> str:
    rows = [r for c in CONFIGURATIONS for r in _rows(c)]
    pending = [c.name for c in CONFIGURATIONS if not _rows(c)]
    out = [
        "## Real data: every configuration tried (issue 10)",
        "",
        "Command: `python bench/public_configs.py` (one run folder per configuration, runs/public_<name>; the table "
        f"is rewritten from them, and from {RECORD} for configurations whose run folder is on another machine). "
        "Per patient; AUC with DeLong 95% CI; sensitivity/specificity (%) at the threshold "
        "frozen on the validation patients. Selection uses the **val AUC column only** (BUS-BRA validation "
        "patients); the external columns are shown for every configuration so that the selection is visible.",
        f"Updated {dt.date.today().isoformat()}. Each row says when and on which machine it was measured (a CPU "
        "without a GPU unless the row names one; training: the sum of the epochs' times in history.csv; last study "
        "run: the wall time of the latest `run_study` of that configuration, short when it reused a trained model; "
        "other jobs shared the machine for some of them, and the base run was paused for about ten minutes while it "
        "trained).",
        "",
        _markdown(pd.DataFrame(rows)) if rows else "(no configuration finished yet)",
    ]
    out += ["", _rule_line(rows)]
    if pending:
        out += ["", f"Not run yet: {', '.join(pending)}."]
    return "\n".join(out)


def auc_of(cell: object) -> float | None:
    """0.873 from a table cell `0.873 (0.821-0.925)`; None for an empty cell."""
    text = str(cell or "").split(" ")[0]
    return float(text) if text else None


def is_candidate(configuration: str) -> bool:
    """Whether a configuration's rows enter the rule: not the paper's CNNs (protocol, item 6), not a rerun."""
    return not configuration.startswith("paper_cnns") and not configuration.endswith("_rerun")


def _rule_line(rows: list[dict[str, object]]) -> str:
    """Which single configuration the protocol's rule points to among the rows (the paper's CNNs and reruns are not
    candidates; the ensembles compete in the final section)."""
    scored = [
        (auc_of(r["val AUC (selection)"]), str(r["configuration"]))
        for r in rows
        if is_candidate(str(r["configuration"])) and auc_of(r["val AUC (selection)"]) is not None
    ]
    if not scored:
        return "No candidate configuration has finished yet."
    best, name = max(scored)
    close = sorted(n for a, n in scored if best - 0.005 <= a and n != name)
    tie = f"; within 0.005 of it: {', '.join(close)}" if close else ""
    return (
        f"Among the single configurations the rule (highest val AUC) points to **{name}** (val AUC {best:.3f}){tie}. "
        "The ensembles and the final choice are in the final section below (bench/public_final.py); where it chose "
        "another configuration than the one named here, it predates this row, and protocol item 7 applies: the "
        "configuration named here is retrained with 3 seeds before it replaces the final section."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--only", default="", help="comma-separated configuration names (default: all, in order)")
    parser.add_argument("--table", action="store_true", help="only rewrite the table from the finished runs")
    parser.add_argument("--list", action="store_true", help="list the configurations and stop")
    parser.add_argument("--rerun", action="store_true", help="predict, evaluate and report finished runs again")
    args = parser.parse_args(argv)
    if args.list:
        for c in CONFIGURATIONS:
            print(f"{c.name:10s} runs/{c.run_name}: {c.change}  {' '.join(c.overrides)}")
        return 0
    known = {c.name: c for c in CONFIGURATIONS}
    names = [n for n in args.only.split(",") if n] or list(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        print(f"unknown configuration(s) {', '.join(unknown)}; known: {', '.join(known)}", file=sys.stderr)
        return 2
    path = REPO / "docs" / "results.md"
    if not args.table:
        if not (args.data / "BUS-BRA").is_dir():
            print(f"real data not found at {args.data}; pass --data", file=sys.stderr)
            return 2
        public_manifest(args.data)
        for name in names:
            print(f"=== {name}: {known[name].change}", flush=True)
            _run_one(known[name], rerun=args.rerun)
            write_section(path, "public-configurations", table_section(), title="# Results")
    write_section(path, "public-configurations", table_section(), title="# Results")
    print(table_section())
    return 0


if __name__ == "__main__":
    sys.exit(main())
