"""The paper's three CNNs at their native input sizes on one GPU (issue 10, item 5).

Zhou et al. (2020) trained Inception V3 and Inception-ResNet V2 at 299 px and ResNet-101 at 224 px. On 2 CPU cores
the configuration table has them at 112 and 192 px for a few epochs (`paper_cnns`, `paper_cnns_192`); this script
trains them with `alnus study` at their native sizes on a GPU machine, on the same patient split, and brings the run
folder back (without weights) so that its rows join the table. Offline there are no ImageNet weights for these
backbones, so they start from random initialisation: a comparison at the paper's resolution, not a reproduction of
its transfer learning.

Three steps:

    python bench/gpu_paper_cnns.py bundle                        # here: lesion crops + manifest -> runs/gpu_bundle
    python3 bench/gpu_paper_cnns.py train --out DIR [--budget S]  # on the GPU machine, with runs/gpu_bundle
    python bench/gpu_paper_cnns.py collect DIR                     # here: -> runs/public_paper_cnns_gpu + the table

The bundle holds each image's lesion crop exactly as `alnus` cuts it (ROI box with the configured margin), limited
to 299 px on its long side (`preprocess.max_crop`, the largest of the three inputs), as lossless PNG, with a
manifest whose box is the whole crop and whose split column is the run's own. The GPU run sets the same max_crop
and resizes these crops with the same code, so it sees the pixels that a run on the original images with
`preprocess.max_crop=299` would see (for ResNet-101 a crop above 299 px is thus resized twice, 299 then 224).
The crops are derived from the real images: the bundle lives under runs/ (ignored by git) and is never committed.

On the GPU machine the number of epochs is set from a throughput probe of each backbone so that the three trainings
fit the budget (one number of epochs for all three, so each gets the same schedule).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLE = Path("runs") / "gpu_bundle"
RUN_NAME = "public_paper_cnns_gpu"
PAPER_CNNS = ("inception_v3", "inception_resnet_v2", "resnet101")
MAX_CROP = 299  # keeps the bundle small enough to travel (a crop's long side above it is downsampled first)
# Written with the manifest: the columns a study needs (the reader's BI-RADS for the reader comparisons).
COLUMNS = ("image", "patient_id", "study_id", "label", "site", "roi", "reader_birads", "split")
# Overrides of configs/public.yaml for the GPU run (the number of epochs is added from the probe). The recipe of the
# CPU rows (random init, no head-only phase, lr 1e-3, batch 32) at the native sizes; patience 10 instead of 5,
# since a longer schedule from random init is noisier from epoch to epoch.
OVERRIDES = (
    f"name={RUN_NAME}",
    f"models=[{','.join(PAPER_CNNS)}]",
    "preprocess.size=null",
    "preprocess.margin=0",
    f"preprocess.max_crop={MAX_CROP}",
    "train.weights=none",
    "train.head_epochs=0",
    "train.lr=1e-3",
    "train.early_stopping_patience=10",
    "train.device=cuda",
    "train.num_workers=8",
    "train.mlflow=false",
    "train.tensorboard=false",
)
# Imported by alnus (the split's hashes, the heat maps) and missing from the GPU machine's image.
WHEELS_PURE = ("ImageHash", "grad-cam", "ttach")
WHEELS_BINARY = ("PyWavelets",)
RESULTS = "run.tar.gz"
PARTIAL = "partial.tar.gz"
WALL_FILE = "bench_wall.json"


def bundle(data: Path, out: Path) -> Path:
    """Cut every image of the run's split into its lesion crop (PNG) and write the bundle's manifest."""
    import pandas as pd
    from PIL import Image

    from alnus._io import atomic_write_text, write_csv
    from alnus.config import load_config
    from alnus.data.dataset import limit_crop
    from alnus.data.images import load_image
    from alnus.data.roi import RoiPolicy, crop_roi

    cfg = load_config(REPO / "configs" / "public.yaml")
    splits_csv = cfg.run_dir / "splits.csv"
    if not splits_csv.is_file():
        from public_study import public_manifest

        from alnus.study import prepare_run

        public_manifest(data)
        prepare_run(cfg)
    splits = pd.read_csv(splits_csv, dtype=str, keep_default_na=False)
    policy = RoiPolicy(cfg.preprocess.roi, cfg.preprocess.margin)
    root = Path(cfg.data.manifest).resolve().parent
    crops = out / "crops"
    crops.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, row in enumerate(splits.to_dict("records")):
        if row.get("frame"):
            raise SystemExit(f"row {i} names a frame ({row['frame']}); the bundle keeps one frame per file only")
        crop = limit_crop(crop_roi(load_image(row["image"]), row, root, policy), MAX_CROP)
        name = f"crops/{i:05d}.png"
        Image.fromarray(crop).save(out / name, optimize=True)
        height, width = crop.shape
        rows.append({**{c: row.get(c, "") for c in COLUMNS}, "image": name, "roi": f"0,0,{width},{height}"})
    write_csv(pd.DataFrame(rows, columns=list(COLUMNS)), out / "manifest.csv")
    size = sum(p.stat().st_size for p in crops.iterdir())
    about = {"made": dt.datetime.now().isoformat(timespec="seconds"), "images": len(rows), "crop_bytes": size,
             "roi": policy.to_dict(), "max_crop": MAX_CROP, "splits": str(splits_csv.relative_to(REPO))}  # fmt: skip
    atomic_write_text(out / "bundle.json", json.dumps(about, indent=2) + "\n")
    _fetch_wheels(out / "wheels")
    return out


def _fetch_wheels(folder: Path) -> None:
    """Wheels of the packages that alnus imports and the GPU machine's image lacks, at this environment's versions:
    pure-Python ones built here (grad-cam ships no wheel), PyWavelets for CPython 3.12 on x86-64."""
    from importlib.metadata import version

    folder.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip"]
    pure = [f"{name}=={version(name)}" for name in WHEELS_PURE]
    subprocess.run([*pip, "wheel", "--quiet", "--no-deps", "-w", str(folder), *pure], check=True)
    platforms = [f"--platform=manylinux_2_{n}_x86_64" for n in (17, 27, 28)] + ["--platform=manylinux2014_x86_64"]
    binary = [f"{name}=={version(name)}" for name in WHEELS_BINARY]
    subprocess.run(
        [*pip, "download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
         "--implementation", "cp", *platforms, "-d", str(folder), *binary],
        check=True,
    )  # fmt: skip


def probe(names: tuple[str, ...], device: str, steps: int = 12) -> dict[str, float]:
    """Training images per second of each backbone (random init, batch 32, the run's precision), on `device`."""
    import torch

    from alnus._hardware import autocast, choose_precision
    from alnus.models.factory import create_model
    from alnus.models.registry import get_spec

    out = {}
    for name in names:
        torch.manual_seed(0)
        dev = torch.device(device)
        net = create_model(name, weights="none").to(dev)
        precision = choose_precision(dev, "auto")
        if precision.channels_last:
            net = net.to(memory_format=torch.channels_last)
        optimiser = torch.optim.AdamW(net.parameters(), lr=1e-3)
        size = get_spec(name).input_size
        x = torch.randn(32, 1, size, size, device=dev)
        y = torch.randint(0, 2, (32,), device=dev).float()
        net.train()
        for step in range(steps + 3):
            if step == 3:
                _sync(dev)
                started = time.perf_counter()
            with autocast(dev, precision):
                loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x).float(), y)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
        _sync(dev)
        out[name] = 32 * steps / (time.perf_counter() - started)
        del net, optimiser
    return out


def _sync(device: object) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def epochs_for(budget_s: float, per_second: dict[str, float], n_train: int, *, lo: int = 8, hi: int = 80) -> int:
    """Epochs that fit the three trainings in `budget_s`: each epoch costs its images at the probed rate twice over
    (loading, augmentation, validation) plus 2 s (checkpoint, bookkeeping)."""
    per_epoch = sum(2.0 * n_train / rate + 2.0 for rate in per_second.values())
    return max(lo, min(hi, math.floor(budget_s / per_epoch)))


def train(
    bundle_dir: Path,
    out: Path,
    runs_dir: Path,
    budget_s: float,
    extra: list[str],
    *,
    epochs: int | None = None,
    probe_steps: int = 12,
    deadline_s: float = 0.0,
) -> int:
    """On the GPU machine: probe, run the study on the bundle, pack the run folder (weights left out) into `out`."""
    import pandas as pd
    import torch

    from alnus.config import load_config
    from alnus.study import run_study

    started = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    manifest = (bundle_dir / "manifest.csv").resolve()
    n_train = int((pd.read_csv(manifest, dtype=str)["split"] == "train").sum())
    rates = probe(PAPER_CNNS, device, steps=probe_steps)
    epochs = epochs or epochs_for(budget_s, rates, n_train)
    log = {"device": _device_name(), "probe_images_per_s": rates, "train_images": n_train, "budget_s": budget_s,
           "epochs": epochs}  # fmt: skip
    print(json.dumps(log, indent=1), flush=True)
    overrides = [*OVERRIDES, f"data.manifest={manifest}", f"runs_dir={runs_dir.resolve()}",
                 f"train.epochs={epochs}", *extra]  # fmt: skip
    if device == "cpu":
        overrides.append("train.device=cpu")
    cfg = load_config(REPO / "configs" / "public.yaml", overrides)
    # Insurance against the machine's time limit: at the deadline, what the run has written so far (the epochs'
    # histories) is packed beside, since a command stopped at its limit leaves only what is already in `out`.
    timer = threading.Timer(max(0.0, deadline_s - (time.perf_counter() - started)), _pack,
                            (cfg.run_dir, out / PARTIAL))  # fmt: skip
    timer.daemon = True
    if deadline_s:
        timer.start()
    try:
        run_study(cfg)
    finally:
        timer.cancel()
        seconds = time.perf_counter() - started
        wall = {"seconds": seconds, "date": dt.date.today().isoformat(), "cpu": _device_name(),
                "cores": os.cpu_count(), "overrides": overrides, **log}  # fmt: skip
        if cfg.run_dir.is_dir():
            (cfg.run_dir / WALL_FILE).write_text(json.dumps(wall, indent=2) + "\n", encoding="utf-8")
            _pack(cfg.run_dir, out / RESULTS)
    return 0


def _device_name() -> str:
    import torch

    cores = os.cpu_count()
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} GPU (+{cores} CPU cores)"
    return f"CPU only ({cores} cores)"


def _pack(run_dir: Path, target: Path) -> None:
    """The run folder without what cannot travel back or is not needed to read the results: the image cache, the
    checkpoints and the weights (a packaged model's metadata and card stay)."""

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        parts = Path(info.name).parts
        if "cache" in parts or "checkpoints" in parts or "tb" in parts or info.name.endswith(".safetensors"):
            return None
        return info

    with tarfile.open(target, "w:gz") as tar:
        tar.add(run_dir, arcname=RUN_NAME, filter=keep)
    print(f"packed {target} ({target.stat().st_size / 2**20:.1f} MiB)", flush=True)


def collect(results: Path) -> Path:
    """Unpack the GPU run into runs/public_paper_cnns_gpu (refusing links and paths outside it, and a pack without a
    finished run); an earlier collection is replaced only by a good one."""
    import tempfile

    target = REPO / "runs" / RUN_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".collect-") as tmp:
        with tarfile.open(results / RESULTS if results.is_dir() else results, "r:gz") as tar:
            tar.extractall(tmp, filter="data")
        if not (Path(tmp) / RUN_NAME / "metrics.json").is_file():
            raise SystemExit(f"{results} holds no finished run ({RUN_NAME}/metrics.json); nothing collected")
        if target.exists():
            shutil.rmtree(target)
        (Path(tmp) / RUN_NAME).rename(target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    steps = parser.add_subparsers(dest="step", required=True)
    make = steps.add_parser("bundle", help="here: the lesion crops and manifest, and the wheels the GPU machine lacks")
    make.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    make.add_argument("--out", type=Path, default=REPO / BUNDLE)
    run = steps.add_parser("train", help="on the GPU machine: probe, study, pack")
    run.add_argument("--bundle", type=Path, default=REPO / BUNDLE)
    run.add_argument("--out", type=Path, required=True, help="where the packed results go ($OUT on the GPU machine)")
    run.add_argument("--runs-dir", type=Path, default=REPO / "runs", help="where the run folder is made (not --out)")
    run.add_argument("--budget", type=float, default=300.0, help="seconds of training for the three backbones")
    run.add_argument("--epochs", type=int, help="this many epochs instead of the number the probe fits in --budget")
    run.add_argument("--probe-steps", type=int, default=12, help="timed training steps per backbone in the probe")
    run.add_argument("--deadline", type=float, default=0.0, help="seconds after which a partial run is packed too")
    run.add_argument("--set", dest="overrides", action="append", default=[], help="more config overrides")
    back = steps.add_parser("collect", help="here: unpack the GPU run and rewrite the configuration table")
    back.add_argument("results", type=Path, help=f"the folder holding {RESULTS}, or the file")
    args = parser.parse_args(argv)
    if args.step == "bundle":
        print(bundle(args.data, args.out))
    elif args.step == "train":
        args.out.mkdir(parents=True, exist_ok=True)
        return train(
            args.bundle,
            args.out,
            args.runs_dir,
            args.budget,
            args.overrides,
            epochs=args.epochs,
            probe_steps=args.probe_steps,
            deadline_s=args.deadline,
        )
    else:
        print(collect(args.results))
        import public_configs

        public_configs.main(["--table"])  # the GPU rows join the table of every configuration
    return 0


if __name__ == "__main__":
    sys.exit(main())
