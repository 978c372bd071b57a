"""Ship a trained model package under models/ (issue 10.6), checked against the study's fp32 predictions.

The package of a run (`runs/<run>/models/<model>/model`, a single model or an ensemble) is copied, ONNX exports left
out (`alnus export` writes them again from the shipped copy). With `--dtype auto` (default) every
`weights.safetensors` is first stored in float16 (half the size; the network still runs in fp32: the weights are
widened when loaded) and its SHA-256 values updated. The copy is run on every image of the run's validation,
internal and external test splits and compared with the study's fp32 predictions of the original: a copy whose
probabilities move by more than `--max-diff`, or whose calls at the frozen threshold change (image or patient level),
is not shipped; `auto` then ships the float32 weights (which must reproduce the study exactly). The check's numbers
go into the model card (`README.md`, section "Shipped copy") and `parity.json`; models/<name> is replaced
atomically.

    .venv/bin/python bench/ship_model.py runs/public_final/models/seeds/model --name breast-us-malignancy
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from public_study import REPO, _cpu

SPLITS = ("val", "internal_test", "external_test")
LEAVE_OUT = ("model.onnx", "model-int8.onnx")  # exports are rewritten from the shipped copy by `alnus export`
MAX_BYTES = 50 * 1024 * 1024  # the repository stays lean (issue 10.6)


def _half_weights(package: Path) -> None:
    """Store every weights.safetensors under `package` in float16 and update the SHA-256 values that name them."""
    from safetensors.torch import load_file, save_file

    from alnus._io import atomic_write_text, file_sha256

    metadata_files = sorted(package.rglob("metadata.json"), key=lambda p: len(p.parts), reverse=True)
    for meta_path in metadata_files:  # members first, then the ensemble that lists them
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        weights = meta_path.parent / "weights.safetensors"
        if weights.is_file():
            tensors = load_file(weights)
            save_file({k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}, weights)
            meta["weights_sha256"] = file_sha256(weights)
            meta["weights_dtype"] = "float16"
        for member in meta.get("members", []):
            member_meta = json.loads((meta_path.parent / member["folder"] / "metadata.json").read_text("utf-8"))
            member["weights_sha256"] = member_meta["weights_sha256"]
        atomic_write_text(meta_path, json.dumps(meta, indent=2) + "\n")


def _without_machine_paths(package: Path) -> None:
    """Drop the export records (their files stay behind) and write this machine's folders out of every
    metadata.json (training settings and member sources name files): paths become relative to the repository."""
    from alnus._io import atomic_write_text

    prefixes = {f"{REPO}{os.sep}": "", f"{REPO.parent}{os.sep}": f"..{os.sep}"}

    def clean(value: object) -> object:
        if isinstance(value, str):
            for prefix, replacement in prefixes.items():
                if value.startswith(prefix):
                    return replacement + value[len(prefix) :]
            return value
        if isinstance(value, list):
            return [clean(v) for v in value]
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        return value

    for meta_path in package.rglob("metadata.json"):
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        meta.pop("exports", None)  # the export files are not shipped: `alnus export` writes them again
        atomic_write_text(meta_path, json.dumps(clean(meta), indent=2) + "\n")


def _parity(shipped: Path, source: Path, run: Path, model: str) -> dict[str, object]:
    """Predict the run's splits with the shipped copy; compare with the study's fp32 predictions of `source`."""
    from alnus.evaluate import aggregate_predictions, read_predictions
    from alnus.predict import Predictor
    from alnus.runfolder import read_splits

    predictor = Predictor(shipped, device="cpu", engine="torch")
    reference = read_predictions(run, model)
    splits = read_splits(run)
    point = predictor.operating_point
    assert point is not None, f"{source} has no frozen threshold: evaluate the run first"
    found: dict[str, object] = {"threshold": point["value"], "level": point["level"]}
    worst, image_changes, patient_changes, n = 0.0, 0, 0, 0
    for split in SPLITS:
        rows = splits[splits["split"] == split]
        if rows.empty:
            continue
        new = predictor.predict_table(rows, run)
        old = reference[split]
        merged = old.merge(new[["image", "prob"]], on="image", suffixes=("", "_shipped"), validate="one_to_one")
        diff = np.abs(merged["prob"].to_numpy() - merged["prob_shipped"].to_numpy())
        worst = max(worst, float(diff.max()))
        t = point["value"]
        image_changes += int(((merged["prob"] >= t) != (merged["prob_shipped"] >= t)).sum())
        a = aggregate_predictions(old, "patient", point["aggregate"])
        b = aggregate_predictions(merged.assign(prob=merged["prob_shipped"]), "patient", point["aggregate"])
        patient_changes += int(((a["prob"].to_numpy() >= t) != (b["prob"].to_numpy() >= t)).sum())
        n += len(merged)
    found |= {"images": n, "max_abs_diff": worst, "image_calls_changed": image_changes,
              "patient_calls_changed": patient_changes}  # fmt: skip
    return found


def _examples(shipped: Path, run: Path, target: Path, per_label: int = 4) -> pd.DataFrame:
    """A few external test images with the shipped copy's probability on this machine: `tests/test_shipped_model.py`
    checks that a fresh clone reproduces them. The images stay in the data folder; their paths are relative to the
    package's folder `target` (../../../shared/data/... beside the repository), so the file is a manifest:
    `alnus predict PACKAGE --manifest PACKAGE/examples.csv`."""
    from alnus.predict import Predictor
    from alnus.runfolder import read_splits

    splits = read_splits(run)
    external = splits[splits["split"] == "external_test"].sort_values("image")
    rows = pd.concat([group.head(per_label) for _, group in external.groupby("label")])
    probs = Predictor(shipped, device="cpu", engine="torch").predict_table(rows, run)["prob"].to_numpy()
    images = [Path(os.path.relpath((run / image).resolve(), target.resolve())).as_posix() for image in rows["image"]]
    return pd.DataFrame({"image": images, "roi": rows["roi"].to_numpy(), "label": rows["label"].to_numpy(),
                         "prob": probs})  # fmt: skip


def _box_jitter(shipped: Path, run: Path, shift: int = 2) -> dict[str, object]:
    """How much the answer moves when the lesion box moves by `shift` pixels (left, right, up, down) on the external
    test images: a box drawn by hand is never exactly the study's."""
    from alnus.data.roi import format_box, parse_box
    from alnus.predict import Predictor
    from alnus.runfolder import read_splits

    splits = read_splits(run)
    rows = splits[(splits["split"] == "external_test") & (splits["roi"].str.strip() != "")]
    predictor = Predictor(shipped, device="cpu", engine="torch")
    base = predictor.predict_table(rows, run)["prob"].to_numpy()
    t = predictor.threshold
    moved, flips, worst = [], 0, 0.0
    for dx, dy in ((-shift, 0), (shift, 0), (0, -shift), (0, shift)):
        boxes = []
        for roi in rows["roi"]:
            x, y, w, h = parse_box(roi)
            boxes.append(format_box((max(0, x + dx), max(0, y + dy), w, h)))
        probs = predictor.predict_table(rows.assign(roi=boxes), run)["prob"].to_numpy()
        diff = np.abs(probs - base)
        moved.append(float(np.median(diff)))
        worst = max(worst, float(diff.max()))
        if t is not None:
            flips += int(((probs >= t) != (base >= t)).sum())
    return {"shift_px": shift, "images": len(rows), "median_abs_change": float(np.median(moved)),
            "max_abs_change": worst, "image_calls_changed": flips, "calls_compared": 4 * len(rows)}  # fmt: skip


def _reader_rule(shipped: Path, run: Path, tmp: Path) -> dict[str, object] | None:
    """Set the shipped copy's reader rule (`alnus reader-rule`) on the run's validation patients with their BI-RADS,
    so that `alnus predict --birads` gives the radiologist with AI; None when the run has no BI-RADS readings."""
    from alnus.adapt import freeze_reader_rule

    splits = pd.read_csv(run / "splits.csv", dtype=str, keep_default_na=False)
    if "reader_birads" not in splits.columns:
        return None
    _without_reader_rule(shipped)
    val = splits[splits["split"] == "val"].drop(columns=["split"])
    manifest = tmp / f"{run.name}-validation.csv"
    val.to_csv(manifest, index=False)
    where = f"the {val['patient_id'].nunique()} validation patients of {run.name} ({run.name}/splits.csv, split val)"
    rule, _ = freeze_reader_rule(shipped, manifest, column="reader_birads", refreeze=True, described_as=where)
    return rule


def _without_reader_rule(package: Path) -> None:
    """Drop the rule a copied package carries (a run rebuilt from a shipped package has one, with its history): the
    shipped copy's rule is set once, here, on the run's validation patients, and its history starts with it."""
    from alnus._io import atomic_write_text

    meta_path = package / "metadata.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    meta.pop("reader_rule", None)
    meta.pop("reader_rule_history", None)
    atomic_write_text(meta_path, json.dumps(meta, indent=2) + "\n")


def _development_images(package: Path, run: Path) -> int:
    """Write the package's development images (`alnus.data.seen`: the hashes of the run's train and val images, which
    prediction warns about) from the run, after checking that they are the images the weights were trained on (the
    run's training hash equals the package's); return how many hashes it holds."""
    from alnus.config import read_resolved_config
    from alnus.data.seen import development_record, write_development_images
    from alnus.ensemble import run_training_hash
    from alnus.models.package import read_metadata
    from alnus.runfolder import RunFolder, read_splits

    recorded = read_metadata(package)["training_data_hash"]
    if run_training_hash(run) != recorded:
        raise SystemExit(f"refused: the train and val images of {run} are not those {package} was trained on")
    splits = read_splits(run)
    rows = splits[splits["split"].isin(["train", "val"])].copy()
    rows["image"] = [p if Path(p).is_absolute() else str(run / p) for p in rows["image"]]
    limit = read_resolved_config(RunFolder(run).config).data.max_image_pixels
    record = development_record(rows.to_dict("records"), recorded, limit)
    write_development_images(package, record)
    return sum(len(hashes) for hashes in record["splits"].values())


def _card_section(found: dict[str, object], jitter: dict[str, object], source: str, note: str) -> str:
    return "\n".join([
        "",
        "## Shipped copy",
        "",
        f"This folder is the model of `{source}` "
        f"(copied on {dt.date.today().isoformat()}) with its weights stored in {found['weights_dtype']} (the network "
        "runs in fp32; float16 weights are widened when loaded, and are shipped only when they pass this check).",
        f"Checked on the {found['images']} validation, internal and external test images of the study: largest "
        f"probability difference against the study's fp32 predictions {found['max_abs_diff']:.2e}; calls changed at "
        f"the frozen threshold: {found['image_calls_changed']} images, {found['patient_calls_changed']} patients "
        f"(checked on {_cpu()}).",
        "",
        f"Sensitivity to the box: moving the lesion box by {jitter['shift_px']} pixels (left, right, up or down) on "
        "the "
        f"{jitter['images']} external test images changes the probability by {jitter['median_abs_change']:.3f} "
        f"(median; up to {jitter['max_abs_change']:.2f}) and the call in {jitter['image_calls_changed']} of "
        f"{jitter['calls_compared']} cases: draw the lesion's tight bounding box, as the study did (the package adds "
        "its 15% margin; BUS-BRA's BBOX column is 1 px off the masks' box) and read calls near the threshold with "
        "care.",
        "",
        "What it is validated for: the malignancy (benign vs malignant) of a breast lesion in a box drawn by a "
        "sonographer on a B-mode ultrasound image, trained on BUS-BRA (Brazil) and tested on BrEaST-Lesions-USG "
        "(Poland); **not** axillary lymph node status, which no public dataset offers. Research use only.",
        "",
        "Training data: BUS-BRA (Gómez-Flores W, Gregorio-Calas MJ, Coelho de Albuquerque Pereira W. Medical Physics "
        "2024;51(4):3110-3123, doi:10.1002/mp.16812); its licence notice is in DATA-LICENCE-BUS-BRA.txt.",
        *(["", note] if note else []),
        "",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("package", type=Path, help="runs/<run>/models/<model>/model")
    parser.add_argument("--name", default="breast-us-malignancy", help="folder under models/")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data", help="holds BUS-BRA/")
    parser.add_argument("--max-diff", type=float, default=1e-3, help="largest probability change allowed")
    parser.add_argument("--dtype", choices=("auto", "float16", "float32"), default="auto",
                        help="weights stored as; auto: float16 when it passes the check, else float32")  # fmt: skip
    parser.add_argument("--card-note", default="", help="markdown added to the card's shipped-copy section")
    parser.add_argument("--images-only", action="store_true",
                        help="only write the shipped package's development images (hashes) from the run")  # fmt: skip
    args = parser.parse_args(argv)
    from alnus.report._inputs import read_run_inputs
    from alnus.report.card import model_card

    source = args.package.resolve()
    run, model = source.parents[2], source.parent.name
    target = REPO / "models" / args.name
    if args.images_only:
        written = _development_images(target, run)
        print(f"{written} development image hashes written into {target}")
        return 0
    target.parent.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{args.name}.") as tmp:
        for dtype in ("float16", "float32") if args.dtype == "auto" else (args.dtype,):
            shipped = Path(tmp) / dtype / args.name
            shutil.copytree(source, shipped, ignore=shutil.ignore_patterns(*LEAVE_OUT), symlinks=False)
            if dtype == "float16":
                _half_weights(shipped)
            _without_machine_paths(shipped)
            found = {"weights_dtype": dtype, **_parity(shipped, source, run, model)}
            print(json.dumps(found, indent=2))
            if (
                found["max_abs_diff"] <= args.max_diff
                and not found["image_calls_changed"] + found["patient_calls_changed"]
            ):
                break
            print(f"{dtype} copy does not reproduce {source} (limit {args.max_diff})", file=sys.stderr)
        else:
            print("refused: no copy reproduces the study's predictions", file=sys.stderr)
            return 1
        # BUS-BRA's licence asks that its copyright and permission notice travel with what is derived from it.
        shutil.copyfile(args.data / "BUS-BRA" / "source_meta" / "LICENSE.txt", shipped / "DATA-LICENCE-BUS-BRA.txt")
        card = shipped / "README.md"
        relative = source.relative_to(REPO) if source.is_relative_to(REPO) else source
        jitter = _box_jitter(shipped, run)
        found["box_jitter"] = jitter
        section = _card_section(found, jitter, str(relative), args.card_note)
        found["development_images"] = _development_images(shipped, run)
        # Written afresh from the run, so that a package shipped again gets the card the current code writes; of the
        # shipped folder's files (its development images).
        card.write_text(model_card(read_run_inputs(run), model, package=shipped) + section, encoding="utf-8")
        found["reader_rule"] = _reader_rule(shipped, run, Path(tmp))
        size = sum(p.stat().st_size for p in shipped.rglob("*") if p.is_file())
        if size > MAX_BYTES:
            print(f"refused: {size / 2**20:.1f} MiB is over {MAX_BYTES / 2**20:.0f} MiB", file=sys.stderr)
            return 1
        _examples(shipped, run, target).to_csv(shipped / "examples.csv", index=False)
        (shipped / "parity.json").write_text(json.dumps(found, indent=2) + "\n", encoding="utf-8")
        old = Path(tmp) / "previous"  # the earlier shipped copy, removed with the temporary folder
        if target.exists():
            target.rename(old)
        shipped.rename(target)
    print(f"shipped {relative} -> {target.relative_to(REPO)} ({size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
