"""Time the training augmentation on a 299 x 299 image, and its affine warp (Pillow) against scipy's.

Writes the section "Augmentation speed" of docs/performance.md (between the augment-speed markers) and exits 1 when
the whole augmentation takes LIMIT_MS or more CPU time per image. CPU time (not wall time), so that other processes
on a shared machine do not count. This replaces a timing assertion that used to sit in the test suite.

Usage: .venv/bin/python bench/augment_speed.py [--images 200] [--out docs/performance.md]
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
from _docs import write_section  # bench/ is on sys.path when a script here runs
from stats_speed import hardware

from alnus.data.augment import UltrasoundAugment, _affine

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "docs" / "performance.md"
SIZE = 299
LIMIT_MS = 6.0


def cpu_ms_per_call(fn, calls: int) -> float:  # noqa: ANN001
    """CPU milliseconds per call of `fn`, after a few warm-up calls."""
    for _ in range(5):
        fn()
    start = time.process_time()
    for _ in range(calls):
        fn()
    return (time.process_time() - start) / calls * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    from scipy import ndimage

    image = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE), dtype=np.uint8)
    augment, rng = UltrasoundAugment(), np.random.default_rng(0)
    whole = cpu_ms_per_call(lambda: augment(image, rng), args.images)
    angle, zoom = math.radians(7), 1.05
    pillow = cpu_ms_per_call(lambda: _affine(image, angle, zoom, 3.0, -2.0), args.images)
    c, s = math.cos(angle) / zoom, math.sin(angle) / zoom
    matrix = np.array([[c, s], [-s, c]])
    centre = np.array([SIZE / 2, SIZE / 2])
    offset = centre - matrix @ (centre + np.array([-2.0, 3.0]))
    scipy_ms = cpu_ms_per_call(lambda: ndimage.affine_transform(image, matrix, offset, order=1), args.images)
    command = "python bench/augment_speed.py" + "".join(f" {shlex.quote(a)}" for a in (argv or sys.argv[1:]))
    section = f"""## Augmentation speed

`alnus.data.augment.UltrasoundAugment()` (the defaults: flip, rotation, zoom and shift as one affine warp,
brightness/contrast/gamma as one lookup table, speckle) on a {SIZE} x {SIZE} uint8 image; CPU milliseconds per image,
mean of {args.images} calls in one process.

| step | CPU ms per image |
|---|---:|
| whole augmentation | {whole:.2f} |
| affine warp, Pillow bilinear (what alnus uses) | {pillow:.2f} |
| affine warp, `scipy.ndimage.affine_transform` order 1 | {scipy_ms:.2f} |

- Target: under {LIMIT_MS:.0f} ms per image for the whole augmentation: **{"met" if whole < LIMIT_MS else "NOT met"}**.
- Hardware: {hardware()}; Python {platform.python_version()}, numpy {np.__version__}.
  Date: {dt.date.today().isoformat()}.
- Command: `{command}`
"""
    print(section)
    write_section(args.out, "augment-speed", section)
    print(f"wrote {args.out}")
    return 0 if whole < LIMIT_MS else 1


if __name__ == "__main__":
    sys.exit(main())
