"""Real data, issue 10: does the chosen model lean on the caliper marks of its training site?

Nearly every BUS-BRA lesion (the development site) was photographed with the sonographer's calipers on it: small "+"
marks at the lesion's extreme points, inside the lesion crop the network sees. The external BrEaST images carry none.
This probe draws BUS-BRA-like "+" marks on each external test image at the midpoints of its lesion box's four edges
(where calipers sit), predicts again with the shipped model's package, and compares per patient with the unmarked
images (paired DeLong). A model that ignores the marks gives the same AUC; a shift in the probabilities, or an AUC
that moves, says the marks carry weight in its features. It is a diagnostic on the test set, never used to choose a
model (the protocol in docs/results.md).

    .venv/bin/python bench/caliper_probe.py [--run runs/public_aux_birads] [--model efficientnet_lite0]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from _docs import write_section  # bench/ is on sys.path when a script here runs
from PIL import Image
from public_study import REPO, _cpu

# Drawn to look like BUS-BRA's calipers (thin light-grey "+" marks) on an image of BUS-BRA's typical width, and
# scaled to each image's width.
ARM, WIDTH, GREY, BUSBRA_WIDTH = 5, 1, 190, 290


def draw_calipers(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """A copy of the uint8 (H, W) image with a "+" at the midpoint of each edge of the lesion box (x, y, w, h)."""
    out = image.copy()
    height, width = out.shape
    scale = max(1.0, width / BUSBRA_WIDTH)
    arm, half = max(1, round(ARM * scale)), max(0, round(WIDTH * scale) // 2)
    x, y, w, h = box
    for cx, cy in ((x + w // 2, y), (x + w // 2, y + h - 1), (x, y + h // 2), (x + w - 1, y + h // 2)):
        out[max(0, cy - half) : cy + half + 1, max(0, cx - arm) : cx + arm + 1] = GREY
        out[max(0, cy - arm) : cy + arm + 1, max(0, cx - half) : cx + half + 1] = GREY
    return out


def _patients(pred: pd.DataFrame) -> pd.DataFrame:
    return pred.groupby(["site", "patient_id"], sort=False).agg(y=("y", "first"), prob=("prob", "mean"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=REPO / "runs" / "public_aux_birads")
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--no-write", action="store_true", help="print the section, leave docs/results.md alone")
    args = parser.parse_args(argv)
    from alnus import stats
    from alnus.data.images import load_image
    from alnus.data.roi import parse_box
    from alnus.predict import Predictor

    splits = args.run / "splits.csv"
    package = args.run / "models" / args.model / "model"
    if not splits.is_file() or not package.is_dir():
        print(f"{args.run} has no splits.csv or no package {package}: run the study first", file=sys.stderr)
        return 2
    started = time.perf_counter()
    table = pd.read_csv(splits, dtype=str, keep_default_na=False)
    table = table[table["split"] == "external_test"].reset_index(drop=True)
    predictor = Predictor(package, device="cpu")
    columns = ["image", "patient_id", "site", "label", "roi"]
    plain = predictor.predict_table(table[columns], "/")
    with tempfile.TemporaryDirectory(prefix="alnus-calipers-") as folder:
        marked = table[columns].copy()
        for i, row in marked.iterrows():
            image = load_image(row["image"])
            path = Path(folder) / f"{i:05d}.png"
            Image.fromarray(draw_calipers(image, parse_box(row["roi"]))).save(path)
            marked.loc[i, "image"] = str(path)
        drawn = predictor.predict_table(marked, "/")
    a, b = _patients(plain), _patients(drawn)
    y = a["y"].to_numpy().astype(int)
    test = stats.delong_test(y, b["prob"].to_numpy(), a["prob"].to_numpy())
    shift = b["prob"] - a["prob"]
    seconds = time.perf_counter() - started
    lines = [
        "## Real data: do caliper marks move the chosen model? (issue 10, diagnostic)",
        "",
        f"Command: `python bench/caliper_probe.py --run {os.path.relpath(args.run, REPO)} --model {args.model}`. "
        f"Date {dt.date.today().isoformat()}; {_cpu()}, {len(os.sched_getaffinity(0))} cores; {seconds / 60:.1f} min.",
        "",
        "BUS-BRA's lesions (training) nearly all carry the sonographer's calipers inside the lesion crop; BrEaST's "
        '(external test) carry none. Here each external image gets BUS-BRA-like "+" marks at the midpoints of its '
        "lesion box's edges and is predicted again with the same package; per patient, paired DeLong. A diagnostic "
        "on the test set, not used to choose anything.",
        "",
        "| external patients (malignant) | AUC as acquired | AUC with drawn calipers | difference (DeLong P) "
        "| mean probability change, malignant / benign | patients whose call changes |",
        "|---|---|---|---|---|---|",
    ]
    threshold = predictor.threshold
    changed = "" if threshold is None else str(int(((a["prob"] >= threshold) != (b["prob"] >= threshold)).sum()))
    lines.append(
        f"| {len(y)} ({int(y.sum())}) | {stats.auc(y, a['prob']):.3f} | {stats.auc(y, b['prob']):.3f} | "
        f"{test.estimate:+.3f} ({test.ci_low:+.3f} to {test.ci_high:+.3f}; P {test.p:.4f}) | "
        f"{shift[y == 1].mean():+.3f} / {shift[y == 0].mean():+.3f} | {changed} |"
    )
    section = "\n".join(lines)
    print(section)
    if not args.no_write:
        write_section(REPO / "docs" / "results.md", "caliper-probe", section, title="# Results")
    return 0


if __name__ == "__main__":
    sys.exit(main())
