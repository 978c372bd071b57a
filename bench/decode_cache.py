"""Measure what the decode-once image cache saves, on the 1,875 BUS-BRA images.

Three passes over every image, at one preprocessing spec (default 224 px, ROI mode "box" from BBOX):
(a) first pass: a new Dataset on an empty cache hashes, decodes, crops, resizes and writes the cache,
    then reads every item; (b) cached pass: a fresh Dataset object on the same cache (hashes the files,
    reads the cache index, reads every item); (c) second epoch over the dataset of (a), already in memory.
Writes the section "Decoding and the image cache" of docs/performance.md (between the decode-cache markers)
and exits 1 if the cached pass is less than 10x faster than the first.

Usage: .venv/bin/python bench/decode_cache.py [--data ../shared/data/BUS-BRA/manifest.csv] [--size 224]
       [--roi box|mask|whole] [--out docs/performance.md]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import PIL
import torch
from _docs import write_section  # bench/ is on sys.path when a script here runs

from alnus.data.dataset import INTERPOLATION, ImageCache, PreprocessSpec, UltrasoundDataset
from alnus.data.images import load_image
from alnus.data.roi import RoiPolicy, box_from_mask, format_box, parse_box

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "BUS-BRA" / "manifest.csv"
DEFAULT_OUT = REPO / "docs" / "performance.md"
MIN_SPEEDUP = 10.0
BBOX_CHECKS = 25


def bbox_convention(manifest: pd.DataFrame, root: Path, n: int = BBOX_CHECKS) -> tuple[int, int]:
    """Compare BBOX, read as x,y,w,h, with the mask's box on `n` spread rows: (rows agreeing, max px diff)."""
    rows = manifest.iloc[np.linspace(0, len(manifest) - 1, n).astype(int)]
    diffs = []
    for _, row in rows.iterrows():
        box = box_from_mask(load_image(root / row["mask"]))
        assert box is not None, f"{row['mask']}: empty mask"
        diffs.append(int(np.abs(np.subtract(parse_box(row["BBOX"]), box)).max()))
    return sum(d <= 1 for d in diffs), max(diffs)


def study_table(manifest: pd.DataFrame) -> pd.DataFrame:
    """The columns the Dataset reads, with BBOX "[x,y,w,h]" turned into the manifest's `roi` "x,y,w,h"."""
    roi = [format_box(parse_box(text)) for text in manifest["BBOX"]]
    return manifest[["image", "patient_id", "label", "mask"]].assign(roi=roi)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def epoch(dataset: UltrasoundDataset) -> None:
    for i in range(len(dataset)):
        dataset[i]


def hardware() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        model = platform.processor() or "unknown CPU"
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model}, {usable} usable cores ({os.cpu_count()} logical CPUs on the host)"


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="BUS-BRA manifest.csv")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--roi", choices=["box", "mask", "whole"], default="box")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="Markdown file to update")
    args = parser.parse_args(argv)

    if not args.data.is_file():
        print(f"BUS-BRA manifest not found at {args.data}; pass --data PATH/manifest.csv", file=sys.stderr)
        return 2
    root = args.data.parent
    manifest = pd.read_csv(args.data, dtype=str, keep_default_na=False)
    agree, max_diff = bbox_convention(manifest, root)
    if agree < BBOX_CHECKS:
        print(f"BBOX is not x,y,w,h: {agree}/{BBOX_CHECKS} rows match the mask box", file=sys.stderr)
        return 1
    load = os.getloadavg()[0]
    table = study_table(manifest)
    spec = PreprocessSpec(size=args.size, roi=RoiPolicy(mode=args.roi))
    n = len(table)

    with tempfile.TemporaryDirectory(prefix="alnus-decode-cache-") as tmp:
        cache = ImageCache(tmp)

        def make() -> UltrasoundDataset:
            return UltrasoundDataset(table, root, spec, cache=cache, positive_label="malignant")

        first = make()
        t_first = timed(lambda: (first.warm(), epoch(first)))
        cached = make()
        t_hash = timed(cached.keys)
        t_cached = t_hash + timed(lambda: (cached.warm(), epoch(cached)))
        t_second = timed(lambda: epoch(first))
        for i in (0, n // 2, n - 1):
            assert torch.equal(first[i][0], cached[i][0]), f"cached item {i} differs from the first pass"
        cache_mib = folder_size(Path(tmp)) / 2**20
        shards = len(list(cache.spec_folder(spec).glob("*.npy")))

    ratio_b, ratio_c = t_first / t_cached, t_first / t_second
    command = shlex.join([".venv/bin/python", "bench/decode_cache.py", *(argv if argv is not None else sys.argv[1:])])
    passes = [
        ("(a) first pass", "hash files, decode, crop, resize, write cache; read every item", t_first),
        (
            "(b) cached pass",
            f"fresh Dataset: hash files ({t_hash:.2f} s), read cache index, read every item",
            t_cached,
        ),
        (
            "(c) second epoch",
            "the Dataset of (a) again: read every item from the memory-mapped cache",
            t_second,
        ),
    ]
    rows = "\n".join(f"| {name} | {what} | {t:.2f} | {n / t:,.0f} |" for name, what, t in passes)
    section = f"""\
## Decoding and the image cache

`alnus.data.dataset.UltrasoundDataset` decodes and crops each image once; the preprocessed uint8 arrays
are kept in `ImageCache` shards (one `(N, {args.size}, {args.size})` `.npy` file per up to 1,024 images, read
by memory map), keyed by the SHA-256 of the image file (+ frame, roi box, mask file) and the preprocessing
spec. Measured over the {n:,} BUS-BRA images, spec size {args.size}, ROI mode `{args.roi}` (margin
{spec.roi.margin:g}, roi from `BBOX`), letterbox, Pillow {INTERPOLATION}; one process, no DataLoader workers.

| pass | what it does | seconds | images/s |
|---|---|---:|---:|
{rows}

- The cached pass (b) is **{ratio_b:.1f}x** faster than the first pass; a second epoch (c) is
  **{ratio_c:.0f}x** faster.
- Cache on disk: {cache_mib:.1f} MiB in {shards} shard(s). Images and cache were in the OS page cache for
  (b) and (c), as they are from the second epoch of training on; a cold disk adds its read time to (b).
- `BBOX` is `[x,y,w,h]`: it matched the lesion mask's bounding box within 1 px in {agree}/{BBOX_CHECKS}
  rows spread over the manifest (largest difference {max_diff} px).
- Hardware: {hardware()}; Python {platform.python_version()}, torch {torch.__version__}, Pillow
  {PIL.__version__}, numpy {np.__version__}. Date: {dt.date.today().isoformat()}.
  Load average (1 min) at the start: {load:.2f}.
- Command: `{command}`
"""
    write_section(args.out, "decode-cache", section)
    print(section)
    if ratio_b < MIN_SPEEDUP:
        print(f"cached pass only {ratio_b:.1f}x faster than the first (< {MIN_SPEEDUP:g}x)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
