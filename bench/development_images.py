"""Real data: does the shipped model's development-images check tell its own images from the others?

The shipped model (`models/breast-us-malignancy`) lists the perceptual hashes of its training and validation images
(`alnus.data.seen`). Every image of the public split is hashed as `alnus predict` decodes it, and its distance to the
nearest listed hash is measured: every train and val image should match (distance 0), no internal or external test
image should (the cut-off is `DEFAULT_MAX_DISTANCE` bits). Copies of the first training images, re-saved as JPEG and
rescaled, should still match. It writes the `development-images` section of docs/results.md and
docs/development_images.json; the package is not changed.

    OMP_NUM_THREADS=2 .venv/bin/python bench/development_images.py
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import sys
import time
from pathlib import Path

import numpy as np
from _docs import publish  # bench/ is on sys.path when a script here runs
from public_study import REPO, _cpu, data_argument, public_split

SPLITS = ("train", "val", "internal_test", "external_test")
COPIES = 40  # training images re-saved for each kind of copy
COMMAND = "python bench/development_images.py"


def _copies(pixels: np.ndarray) -> dict[str, np.ndarray]:
    """The image re-saved as JPEG (quality 75 and 50) and rescaled (half and double size), decoded again."""
    from PIL import Image

    def jpeg(image: Image.Image, quality: int) -> np.ndarray:
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=quality)
        return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("L"))

    image = Image.fromarray(pixels)
    w, h = image.size
    return {
        "JPEG quality 75": jpeg(image, 75),
        "JPEG quality 50": jpeg(image, 50),
        "half size": np.asarray(image.resize((max(1, w // 2), max(1, h // 2)), Image.BILINEAR)),
        "double size": np.asarray(image.resize((2 * w, 2 * h), Image.BILINEAR)),
    }


def compute(splits, package: Path) -> dict:  # noqa: ANN001 - pandas DataFrame
    from alnus.data.images import load_image, parse_frame
    from alnus.data.seen import read_development_images
    from alnus.models.package import read_metadata

    seen = read_development_images(package, read_metadata(package)["training_data_hash"])
    if seen is None:
        raise SystemExit(f"{package} lists no development images; write them with bench/ship_model.py --images-only")
    result: dict = {"n_hashes": seen.n_images, "max_distance": seen.max_distance, "splits": {}, "copies": {}}
    hashing = []
    for split in SPLITS:
        part = splits[splits["split"] == split]
        distances = []
        for image, frame in zip(part["image"], part.get("frame", [""] * len(part)), strict=True):
            pixels = load_image(image, frame=parse_frame("" if frame != frame else str(frame)))
            started = time.perf_counter()
            distances.append(seen.nearest(pixels)[1])
            hashing.append(time.perf_counter() - started)
        d = np.array(distances)
        result["splits"][split] = {"images": int(d.size), "matched": int((d <= seen.max_distance).sum()),
                                   "min": int(d.min()), "median": float(np.median(d)), "max": int(d.max())}  # fmt: skip
    train = splits[splits["split"] == "train"]["image"].head(COPIES)
    for image in train:
        for kind, copy in _copies(load_image(image)).items():
            found = result["copies"].setdefault(kind, {"images": 0, "matched": 0, "max": 0})
            distance = seen.nearest(copy)[1]
            found["images"] += 1
            found["matched"] += int(distance <= seen.max_distance)
            found["max"] = max(found["max"], distance)
    result["ms_per_image"] = 1000 * float(np.median(hashing))
    return result


def section(result: dict, seconds: float) -> str:
    lines = [
        "## Real data: the shipped model's development images (which images it learned from)",
        "",
        f"Command: `{COMMAND}`, {dt.date.today().isoformat()}, {_cpu()}, {seconds:.0f} s. The shipped model lists "
        f"{result['n_hashes']} perceptual hashes (pHash-16) of its training and validation images "
        "(`development_images.json`); each image of the public split is hashed as `alnus predict` decodes it and "
        f"compared with them. An image within {result['max_distance']} bits of one is reported as one the model "
        "learned from.",
        "",
        "| split | images | matched | nearest distance: min | median | max |",
        "|---|---|---|---|---|---|",
    ]
    for split, m in result["splits"].items():
        lines.append(f"| {split} | {m['images']} | {m['matched']} | {m['min']} | {m['median']:.0f} | {m['max']} |")
    lines += ["", f"Copies of the first {COPIES} training images:", "", "| copy | matched | largest distance |",
              "|---|---|---|"]  # fmt: skip
    for kind, m in result["copies"].items():
        lines.append(f"| {kind} | {m['matched']} of {m['images']} | {m['max']} |")
    lines += ["", f"Hashing and matching one image took {result['ms_per_image']:.1f} ms (median), decoding aside. "
              "Cropped, padded or mirrored copies are not recognised (a pHash of the whole image)."]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    data_argument(parser)
    args = parser.parse_args(argv)
    splits = public_split(args.data)
    started = time.perf_counter()
    result = compute(splits, REPO / "models" / "breast-us-malignancy")
    text = section(result, time.perf_counter() - started)
    publish(REPO / "docs" / "development_images.json", result, REPO / "docs" / "results.md", "development-images", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
