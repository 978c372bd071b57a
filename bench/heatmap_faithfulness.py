"""Heat-map faithfulness on real data (BUS-BRA -> BrEaST), per method, written to docs/results.md and docs/img/.

For each heat-map method, on a seeded sample of the external test images of the public run, two checks
(`alnus.explain`): the share of the heat map inside the lesion mask against a centred Gaussian and a random map over
the same crop (`crop_baselines`), and a deletion check: how much the malignant probability drops when the hottest 10%
of the crop's pixels are blurred away, against as many random pixels (`deletion_of`). It also saves four small
Grad-CAM overlays (the most confident TP, FP, FN and TN) under docs/img/.

The run is `runs/public` (made by bench/public_study.py). When it has no evaluated model, this script makes one with
configs/public.yaml: the same manifest and the same stages as bench/public_study.py (split, train, predict,
evaluate), so either benchmark reuses the other's model. Training takes tens of minutes on a 2-core CPU; run it in
the background:

    nohup nice .venv/bin/python bench/heatmap_faithfulness.py > /tmp/heatmap_faithfulness.log 2>&1 &

Options: --run RUN (another evaluated run folder), --data (the folder holding BUS-BRA/ and BrEaST-Lesions-USG/),
--set KEY=VALUE (config overrides when it trains), --n (images per method), --scorecam-n (Score-CAM runs one forward
pass per feature channel, so it gets fewer images), --methods, --no-write (print only).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from _docs import write_section  # bench/ is on sys.path when a script here runs
from public_study import _cpu, _markdown

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
SPLIT = "external_test"
FRACTION = 0.1
EXAMPLE_WIDTH = 256
EXAMPLE_COLOURS = 96


def _evaluated(run_dir: Path, models: list[str]) -> bool:
    """Whether every model of the run has a frozen threshold and external-test predictions."""
    from alnus.errors import AlnusError
    from alnus.models.package import read_metadata
    from alnus.runfolder import RunFolder

    run = RunFolder(run_dir)
    try:
        return all(
            read_metadata(run.model(m).package)["threshold"] is not None
            and run.model(m).predictions_stamp.is_file()
            and run.model(m).predictions_csv(SPLIT).is_file()
            for m in models
        )
    except AlnusError:
        return False


def public_run(data: Path, overrides: list[str]) -> Path:
    """`runs/public`, trained, predicted and evaluated with configs/public.yaml when it is not yet."""
    from alnus._io import write_csv
    from alnus.config import load_config
    from alnus.data.importers import import_dataset
    from alnus.data.manifest import combine_manifests
    from alnus.evaluate import evaluate_run
    from alnus.predict import predict_run
    from alnus.runfolder import RunFolder, lock_run
    from alnus.study import prepare_run, trained_package
    from alnus.train import train_model

    cfg = load_config(REPO / "configs" / "public.yaml", overrides)
    if _evaluated(cfg.run_dir, cfg.models):
        return cfg.run_dir
    if not (data / "BUS-BRA").is_dir():
        raise SystemExit(f"real data not found at {data}; pass --data (or --run an evaluated run folder)")
    # The manifest exactly as bench/public_study.py builds it: the same data hash, so its model is reused.
    work = REPO / "work"
    busbra = import_dataset("busbra", data / "BUS-BRA", work / "busbra")
    breast = import_dataset("breast", data / "BrEaST-Lesions-USG", work / "breast")
    combined = work / "public" / "manifest.csv"
    write_csv(combine_manifests([busbra, breast], combined), combined)
    with lock_run(cfg.run_dir, command="bench/heatmap_faithfulness.py"):
        run_dir = prepare_run(cfg)
        for backbone in cfg.models:
            if trained_package(cfg, backbone) is None:
                resume = RunFolder(run_dir).model(backbone).last_checkpoint.is_file()
                print(f"training {backbone} ({'resumed' if resume else 'from the start'}) ...", flush=True)
                train_model(cfg, run_dir, backbone, resume=resume)
        predict_run(run_dir, models=cfg.models, device=cfg.train.device, precision=cfg.train.precision,
                    max_pixels=cfg.data.max_image_pixels)  # fmt: skip
        evaluate_run(run_dir, models=cfg.models)
    return run_dir


def measure(predictor, cases: pd.DataFrame, run_dir: Path, method: str, seed: int) -> dict:  # noqa: ANN001 - Predictor
    """One method on the given rows: energy in the lesion vs the baselines, the deletion check, seconds per image."""
    from alnus.explain import crop_baselines, deletion_of, energy_share, explain_images

    started = time.perf_counter()
    explanations = explain_images(predictor, cases, run_dir, method=method)
    seconds = (time.perf_counter() - started) / max(1, len(explanations))
    rng = np.random.default_rng(seed)
    ours, gauss, noise = [], [], []
    for e in explanations:
        region = e.lesion_region
        if region is None:
            continue
        baselines = crop_baselines(e, rng)
        ours.append(e.energy_in_roi)
        gauss.append(energy_share(baselines["gaussian"], region))
        noise.append(energy_share(baselines["random"], region))
    ours_a, gauss_a, noise_a = (np.array(v, dtype=float) for v in (ours, gauss, noise))
    deletion = deletion_of(predictor.model, explanations, fraction=FRACTION, seed=seed)
    return {
        "method": method,
        "images": len(explanations),
        "with lesion": len(ours_a),
        "energy in lesion": np.nanmean(ours_a),
        "centred Gaussian": np.nanmean(gauss_a),
        "random": np.nanmean(noise_a),
        "beats Gaussian (% of images)": 100 * np.nanmean(ours_a > gauss_a),
        "top-10% drop": float(np.mean(deletion.top_drop)),
        "random-10% drop": float(np.mean(deletion.random_drop)),
        "deletion score": deletion.score,
        "s/image": seconds,
    }


def save_examples(predictor, cases: pd.DataFrame, run_dir: Path, model: str) -> list[tuple[str, str, float]]:  # noqa: ANN001
    """Grad-CAM overlays of the most confident TP, FP, FN and TN, small PNGs in docs/img/; (outcome, file, prob)."""
    import io

    from PIL import Image

    from alnus._io import atomic_write_bytes
    from alnus.explain import OUTCOMES, explain_images, select_cases

    chosen = select_cases(cases, len(OUTCOMES))
    explanations = explain_images(predictor, chosen, run_dir, method="gradcam")
    out = []
    for outcome, explanation in zip(chosen["outcome"], explanations, strict=True):
        picture = explanation.overlay(width=EXAMPLE_WIDTH).quantize(colors=EXAMPLE_COLOURS, dither=Image.Dither.NONE)
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG", optimize=True)
        name = f"heatmap_{model}_{outcome}.png"
        atomic_write_bytes(DOCS / "img" / name, buffer.getvalue())
        out.append((outcome, name, explanation.prob))
    return out


def section(results: pd.DataFrame, examples: list, facts: dict, command: str) -> str:
    shown = results.copy()
    ratios = ("energy in lesion", "centred Gaussian", "random", "top-10% drop", "random-10% drop", "deletion score")
    for column in ratios:
        shown[column] = shown[column].map(lambda v: f"{v:.3f}")
    shown["beats Gaussian (% of images)"] = shown["beats Gaussian (% of images)"].map(lambda v: f"{v:.0f}")
    shown["s/image"] = shown["s/image"].map(lambda v: f"{v:.2f}")
    pictures = " ".join(f"![{o}, P({facts['positive']}) {p:.2f}](img/{name})" for o, name, p in examples)
    captions = ", ".join(f"{o} (P = {p:.2f})" for o, _, p in examples)
    return "\n".join(
        [
            "## Heat maps: how faithful each method is (BUS-BRA -> BrEaST)",
            "",
            f"Command: `{command}`",
            f"Date: {dt.date.today().isoformat()}; hardware: {_cpu()}, {len(os.sched_getaffinity(0))} cores, no GPU.",
            "",
            f"Model: {facts['model']} of the public run (configs/public.yaml; ROI {facts['roi']}, input "
            f"{facts['size']} px), threshold {facts['threshold']:.3g} frozen on validation. Images: a seeded sample "
            f"of {facts['sample']} of the {facts['n_split']} external test images (BrEaST, lesion masks drawn by "
            "its authors); Score-CAM, one forward pass per feature channel, on the first images of that sample.",
            "",
            "- *energy in lesion*: share of the heat map inside the lesion mask, in the original image's coordinates "
            "(the mean over images). The baselines lie over the same crop as the heat map: a *centred Gaussian* "
            "(sd a quarter of the crop's sides) and a *random* map (its share is the mask's share of the crop). With "
            "a lesion-centred ROI crop the centred Gaussian is a strong baseline: it looks where the lesion is.",
            f"- *deletion*: the drop of P({facts['positive']}) when the hottest {FRACTION:.0%} of the crop's input "
            "pixels are replaced by a blurred copy of the image, against as many random pixels (three draws); the "
            "score is the mean difference (above 0: the map found pixels that matter to the model).",
            "",
            _markdown(shown),
            "",
            f"Grad-CAM examples, the most confident of each outcome: {captions}. Cyan box: the network's input "
            "crop; green: the lesion mask's outline.",
            "",
            pictures,
        ]
    )


def _command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str:
    """The command as a reader would rerun it: options that differ from the defaults, paths relative to the repo."""
    parts = ["python bench/heatmap_faithfulness.py"]
    for name in ("run", "n", "scorecam_n", "methods", "seed"):
        value = getattr(args, name)
        if value != parser.get_default(name):
            if isinstance(value, Path):
                value = value.resolve().relative_to(REPO) if value.resolve().is_relative_to(REPO) else "RUN"
            parts.append(f"--{name.replace('_', '-')} {value}")
    parts += [f"--set {o}" for o in args.overrides]
    return " ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=None)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--scorecam-n", type=int, default=16)
    parser.add_argument("--methods", default="gradcam,gradcam++,eigencam,scorecam")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    os.chdir(REPO)  # configs/public.yaml's runs_dir is relative to the current folder

    from alnus.explain import case_table, run_max_pixels
    from alnus.predict import Predictor
    from alnus.runfolder import RunFolder, run_models

    run_dir = args.run if args.run is not None else public_run(args.data, args.overrides)
    model = run_models(run_dir)[0]
    predictor = Predictor(RunFolder(run_dir).model(model).package, device="cpu", precision="fp32",
                          max_pixels=run_max_pixels(run_dir), engine="torch")  # fmt: skip
    cases = case_table(run_dir, model, SPLIT, predictor)
    sample = cases.sample(n=min(args.n, len(cases)), random_state=args.seed).reset_index(drop=True)
    rows = []
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        subset = sample.head(args.scorecam_n) if method == "scorecam" else sample
        print(f"{method}: {len(subset)} images ...", flush=True)
        rows.append(measure(predictor, subset, run_dir, method, args.seed))
        print(rows[-1], flush=True)
    results = pd.DataFrame(rows)
    facts = {
        "model": model,
        "roi": predictor.spec.roi.mode,
        "size": predictor.spec.size,
        "threshold": predictor.threshold,
        "positive": predictor.positive_label,
        "sample": len(sample),
        "n_split": len(cases),
    }
    command = _command(args, parser)
    if args.no_write:
        print(section(results, [], facts, command))
        return 0
    examples = save_examples(predictor, cases, run_dir, model)
    text = section(results, examples, facts, command)
    print(text)
    title = "# Results\n\nMeasured results, each with the command that produced it."
    write_section(DOCS / "results.md", "heatmap-faithfulness", text, title=title)
    print(f"wrote {DOCS / 'results.md'} and {len(examples)} images in {DOCS / 'img'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
