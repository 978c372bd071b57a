"""Measure perceptual-hash distances to choose the near-duplicate threshold of `alnus.data.split`.

Hashes every BUS-BRA image (and BrEaST-Lesions-USG, as more distinct scans) with pHash and dHash
(16x16 = 256 bits), then re-saves a sample of BUS-BRA images (JPEG q=75, 0.8x resize, both; harsher:
0.5x + JPEG q=50, a 1% crop) and prints: distances between an image and its re-saved copies, between the
-l/-r views of one patient, and the smallest distances between any two distinct images. A good threshold
lies above every copy and below every distinct pair. The output is also written to the `duplicate-threshold`
section of docs/results.md, with the command, date and hardware.

Usage: .venv/bin/python bench/duplicate_threshold.py [--data ../shared/data] [--every 10] [--no-write]
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
import time
from pathlib import Path

import imagehash
import numpy as np
import pandas as pd
from PIL import Image

from alnus._hardware import cpu_model
from alnus.data.images import load_image
from alnus.data.split import _pack, _pairs_within

HASHES = {"phash": imagehash.phash, "dhash": imagehash.dhash}
HASH_SIZE = 16


def hash_files(paths: list[Path], method: str) -> pd.Series:
    """Hex hash of each decoded image, decoded as `image_hashes` does (load_image, whole image)."""
    fn = HASHES[method]
    return pd.Series([str(fn(Image.fromarray(load_image(p, us_region=False)), hash_size=HASH_SIZE)) for p in paths])


def distances(a: pd.Series, b: pd.Series) -> np.ndarray:
    """Row-wise Hamming distance between two aligned hash series."""
    return np.bitwise_count(_pack(a) ^ _pack(b)).sum(axis=1)


def resave(paths: list[Path], folder: Path) -> dict[str, list[Path]]:
    """Re-saved copies of each image: JPEG q=75, 0.8x resized, both; harsher: 0.5x + JPEG q=50, 1% crop."""
    out: dict[str, list[Path]] = {}
    for p in paths:
        im = Image.fromarray(load_image(p, us_region=False))
        w, h = im.size
        small = im.resize((round(w * 0.8), round(h * 0.8)), Image.Resampling.BICUBIC)
        half = im.resize((round(w * 0.5), round(h * 0.5)), Image.Resampling.BICUBIC)
        cropped = im.crop((w // 100, h // 100, w - w // 100, h - h // 100))
        variants = (
            ("jpeg75", im, "JPEG", 75),
            ("resize0.8", small, "PNG", None),
            ("resize0.8+jpeg75", small, "JPEG", 75),
            ("resize0.5+jpeg50", half, "JPEG", 50),
            ("crop1%", cropped, "PNG", None),
        )
        for name, img, fmt, quality in variants:
            target = folder / f"{p.stem}.{name}.{fmt.lower()}"
            img.save(target, fmt, **({"quality": quality} if quality else {}))
            out.setdefault(name, []).append(target)
    return out


def summary(values: np.ndarray) -> str:
    q = np.percentile(values, [0, 1, 50, 99, 100])
    return f"n={len(values)} min={q[0]:.0f} p1={q[1]:.0f} median={q[2]:.0f} p99={q[3]:.0f} max={q[4]:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--every", type=int, default=10, help="re-save every Nth BUS-BRA image")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/results.md alone")
    args = parser.parse_args()
    lines: list[str] = []

    def print(text: str = "") -> None:  # noqa: A001 - every printed line also goes to the docs section
        lines.append(text)
        sys.stdout.write(text + "\n")

    bra = pd.read_csv(args.data / "BUS-BRA" / "manifest.csv", dtype=str, keep_default_na=False)
    breast = pd.read_csv(args.data / "BrEaST-Lesions-USG" / "manifest.csv", dtype=str, keep_default_na=False)
    bra_paths = [args.data / "BUS-BRA" / p for p in bra["image"]]
    all_paths = bra_paths + [args.data / "BrEaST-Lesions-USG" / p for p in breast["image"]]
    sample = bra_paths[:: args.every]
    print(f"{len(bra_paths)} BUS-BRA + {len(breast)} BrEaST images; re-saving {len(sample)}")

    with tempfile.TemporaryDirectory() as tmp:
        copies = resave(sample, Path(tmp))
        for method in HASHES:
            t0 = time.perf_counter()
            hashes = hash_files(all_paths, method)
            took = time.perf_counter() - t0
            bits = HASH_SIZE**2
            print(f"\n== {method} {HASH_SIZE}x{HASH_SIZE} ({bits} bits); {len(all_paths)} images, {took:.1f} s")
            originals = hashes[:: args.every].iloc[: len(sample)].reset_index(drop=True)
            worst_copy = 0
            for name, paths in copies.items():
                d = distances(originals, hash_files(paths, method))
                worst_copy = max(worst_copy, int(d.max()))
                print(f"re-saved {name:17s}: {summary(d)}")

            bra_h = hashes[: len(bra)]
            side = bra["ID"].str[-2:]
            left = bra_h[(side == "-l").to_numpy()].set_axis(bra["patient_id"][side == "-l"])
            right = bra_h[(side == "-r").to_numpy()].set_axis(bra["patient_id"][side == "-r"])
            both = left.index.intersection(right.index)
            print(f"-l/-r views, one patient : {summary(distances(left[both], right[both]))}")

            t0 = time.perf_counter()
            packed = _pack(hashes)
            i, j, d = _pairs_within(packed, HASH_SIZE**2)
            took = time.perf_counter() - t0
            print(f"all distinct pairs       : {summary(d)} ({took:.2f} s for {len(d)} pairs)")
            for k in sorted({10, 20, 30, 40, worst_copy}):
                print(f"  distinct pairs <= {k:3d}: {int((d <= k).sum())}")
            cross = (i < len(bra)) != (j < len(bra))
            print(f"  BUS-BRA x BrEaST pairs  : min={int(d[cross].min())}")
            close = np.argsort(d, kind="stable")[:5]
            for k in close:
                print(f"  closest: {all_paths[i[k]].name} ~ {all_paths[j[k]].name} distance {d[k]}")
    if not args.no_write:
        _write_docs(lines, args.every)


def _write_docs(lines: list[str], every: int) -> None:
    from _docs import write_section

    section = "\n".join(
        [
            "## Near-duplicate threshold (perceptual hashes)",
            "",
            f"Command: `.venv/bin/python bench/duplicate_threshold.py --every {every}`; "
            f"{dt.date.today().isoformat()}, {cpu_model()}. The split's leakage check treats two images at pHash-16",
            "distance <= `alnus.data.split.DEFAULT_MAX_DISTANCE` as the same image: that threshold must lie above",
            "every re-saved copy and below every pair of distinct images.",
            "",
            "```",
            *lines,
            "```",
        ]
    )
    write_section(Path(__file__).resolve().parents[1] / "docs" / "results.md", "duplicate-threshold", section)


if __name__ == "__main__":
    main()
