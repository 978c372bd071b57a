"""Body warm-up on real data: BUS-BRA -> BrEaST (configs/public.yaml) trained twice, written to docs/results.md.

The same config, split and seed, trained once with the old schedule (the learning-rate warm-up ends inside the
head-only epochs, so the pretrained body unfreezes at the peak rate: `train.body_warmup_epochs=0`,
`train.body_lr_factor=1`) and once with the new defaults (the rate warms up again when the body unfreezes). It
reports each run's best validation AUC at the patient level (the level the best epoch is chosen at) and the val AUC of
every epoch. Images are imported from ../shared/data (not copied) into work/ and runs are written under runs/, both
ignored by git; the two runs share one decode cache. Takes tens of minutes on a 2-core CPU; run it in the background:

    nohup .venv/bin/python bench/body_warmup.py > /tmp/body_warmup.log 2>&1 &

Options: --data (the folder holding BUS-BRA/ and BrEaST-Lesions-USG/), --set KEY=VALUE (overrides for both runs,
e.g. --set train.epochs=3 for a quick look), --no-write (do not touch docs/results.md).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time
from pathlib import Path

from _docs import write_section  # bench/ is on sys.path when a script here runs
from public_study import _cpu, _markdown

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "work" / "body_warmup"
RUNS = REPO / "runs" / "body_warmup"
# The schedule before issue 7 (no second warm-up, one learning rate for head and body), and the new defaults.
VARIANTS = {
    "old": ["train.body_warmup_epochs=0", "train.body_lr_factor=1.0"],
    "new": [],
}


def build_manifest(data: Path) -> Path:
    """Import both datasets (manifests only; images stay where they are) and combine them, as public.yaml says.

    The radiologists' `reader_*` columns are left out: this benchmark trains only, and the reader comparison is
    `bench/public_study.py`'s.
    """
    from alnus._io import write_csv
    from alnus.data.importers import import_dataset
    from alnus.data.manifest import combine_manifests

    busbra = import_dataset("busbra", data / "BUS-BRA", WORK / "busbra")
    breast = import_dataset("breast", data / "BrEaST-Lesions-USG", WORK / "breast")
    combined = WORK / "public" / "manifest.csv"
    table = combine_manifests([busbra, breast], combined)
    write_csv(table.drop(columns=[c for c in table.columns if c.startswith("reader_")]), combined)
    return combined


def train_variant(name: str, manifest: Path, overrides: list[str]):  # noqa: ANN201 - alnus.train.TrainResult
    """Train configs/public.yaml's model under `runs/body_warmup/public-<name>`, sharing one decode cache."""
    from alnus.config import load_config
    from alnus.runfolder import RunFolder
    from alnus.study import run_training

    settings = [f"name=public-{name}", f"runs_dir={RUNS}", f"data.manifest={manifest}", *overrides, *VARIANTS[name]]
    cfg = load_config(REPO / "configs" / "public.yaml", settings)
    cache = RunFolder(cfg.run_dir).cache
    if not cache.exists():
        (RUNS / "cache").mkdir(parents=True, exist_ok=True)
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        cache.symlink_to(RUNS / "cache", target_is_directory=True)
    resume = any(RunFolder(cfg.run_dir).model(m).last_checkpoint.is_file() for m in cfg.models)
    [result] = run_training(cfg, resume=resume)
    return cfg, result


def _gpu() -> str:
    import torch

    return f"GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no GPU"


def section(results: dict, overrides: list[str], seconds: float) -> str:
    """The docs/results.md section: command, date, hardware, both runs' val AUCs."""
    import pandas as pd

    (cfg, _), *_ = results.values()
    rows, epochs = [], {}
    for name, (_, result) in results.items():
        rows.append(
            {
                "schedule": name,
                "settings": ", ".join(VARIANTS[name])
                or "defaults (train.body_warmup_epochs=1, train.body_lr_factor=1)",
                "best epoch": result.best_epoch,
                "val AUC (patient)": f"{result.best_val_auc:.4f}",
                "epochs run": result.epochs_run,
            }
        )
        epochs[name] = {row["epoch"]: f"{row['val_auc']:.4f}" for row in result.history}
    per_epoch = pd.DataFrame(epochs).rename_axis("epoch").reset_index().fillna("")
    command = "python bench/body_warmup.py" + "".join(f" --set {o}" for o in overrides)
    train = cfg.train
    return "\n".join(
        [
            "## Body warm-up: the pretrained body no longer unfreezes at the peak learning rate (BUS-BRA -> BrEaST)",
            "",
            f"Command: `{command}`",
            f"Date: {dt.date.today().isoformat()}; hardware: {_cpu()}, {len(os.sched_getaffinity(0))} cores, "
            f"{_gpu()}; wall time {seconds / 60:.1f} min (both runs).",
            "",
            f"configs/public.yaml ({', '.join(cfg.models)}, {train.optimizer} lr {train.lr:g}, {train.epochs} epochs, "
            f"{train.head_epochs} head-only, warm-up {train.warmup_epochs:g} epoch, early stopping after "
            f"{train.early_stopping_patience}), the same split and seed for both runs; the best epoch is chosen on the "
            "patient-level validation AUC (a patient's mean image probability).",
            "",
            _markdown(pd.DataFrame(rows)),
            "",
            "### Validation AUC (patient level) per epoch",
            _markdown(per_epoch),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    if not (args.data / "BUS-BRA").is_dir() or not (args.data / "BrEaST-Lesions-USG").is_dir():
        print(f"real data not found at {args.data}; pass --data", file=sys.stderr)
        return 2
    started = time.perf_counter()
    manifest = build_manifest(args.data)
    results = {name: train_variant(name, manifest, args.overrides) for name in VARIANTS}
    text = section(results, args.overrides, time.perf_counter() - started)
    print(text)
    if not args.no_write:
        path = REPO / "docs" / "results.md"
        title = "# Results\n\nMeasured results, each with the command that produced it."
        write_section(path, "body-warmup", text, title=title)
        print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
