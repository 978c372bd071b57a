"""The training engine: one loop for the CPU, one GPU and `torchrun` DDP.

Transfer learning as in Zhou et al. (Radiology 2020;294:19-28): pretrained backbones are fine-tuned
head-first (body frozen), then whole. AdamW (Loshchilov & Hutter 2019) or SGD with momentum, linear warm-up
then cosine decay per optimiser step (Loshchilov & Hutter 2017, SGDR; Goyal et al. 2017 for the warm-up).
The model is selected, and training stopped early, on the validation AUC computed on exactly the
validation images (DistributedSampler's padding duplicates are dropped by index after the gather).

A run is repeatable: python/numpy/torch are seeded, the sampler's order is drawn from (seed, epoch) and
each item's augmentation from (seed, epoch, index), and `last.pt` holds every RNG state, so a resumed run
sees the same data and draws as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from alnus._io import atomic_path, file_sha256, write_csv
from alnus.config import Config, stable_hash, training_settings
from alnus.errors import AlnusError

CHECKPOINT_VERSION = 1
HISTORY_COLUMNS = ("epoch", "phase", "train_loss", "val_loss", "val_auc", "lr", "images_per_s", "seconds")
_T = TypeVar("_T")


class TrainError(AlnusError):
    """Training cannot start or continue as configured; the message says what to change."""


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 writes files and prints."""
        return self.rank == 0


@dataclass
class TrainResult:
    """What `train_model` produced for one backbone."""

    backbone: str
    model_dir: Path
    package_dir: Path
    best_epoch: int
    best_val_auc: float
    epochs_run: int
    stopped_early: bool
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)


def dist_info() -> DistInfo:
    """Rank, world size and local rank of this process (0, 1, 0 without a process group)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return DistInfo()


@contextlib.contextmanager
def distributed(device: str = "auto") -> Iterator[DistInfo]:
    """Join the process group `torchrun` describes in the environment (gloo on CPU, NCCL on GPU), if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    started = False
    if world > 1 and not dist.is_initialized():
        use_cuda = device != "cpu" and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        started = True
    try:
        yield dist_info()
    finally:
        if started:
            dist.destroy_process_group()


def main_first(info: DistInfo, fn: Callable[[], _T]) -> _T | None:
    """Run `fn` on rank 0 while the other ranks wait; a failure there is raised on every rank."""
    result, error = None, None
    if info.is_main:
        try:
            result = fn()
        except Exception as exc:  # re-raised below, after the other ranks have heard of it
            error = exc
    if info.world_size > 1:
        message = [None if error is None else f"{type(error).__name__}: {error}"]
        dist.broadcast_object_list(message, src=0)
        if message[0] is not None and not info.is_main:
            raise TrainError(f"rank 0 failed: {message[0]}")
    if error is not None:
        raise error
    return result


def resolve_device(requested: str, info: DistInfo) -> torch.device:
    """`auto`: this rank's GPU when CUDA is available, else the CPU."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise TrainError("train.device is 'cuda' but PyTorch sees no CUDA GPU; use 'auto' or 'cpu'")
    if requested != "cpu" and torch.cuda.is_available():
        return torch.device("cuda", info.local_rank)
    return torch.device("cpu")


def seed_everything(seed: int, *, deterministic: bool = False) -> None:
    """Seed python, numpy and torch (all devices); optionally ask for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs this before its first use to be deterministic (PyTorch "Reproducibility" notes).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = not deterministic


def rng_states() -> dict[str, Any]:
    """Every RNG state a training step draws from (python, numpy, torch CPU and CUDA)."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what `rng_states` returned."""
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class WeightedDistributedSampler(Sampler[int]):
    """Class-balanced sampling with replacement, drawn from (seed, epoch) and split across ranks.

    Every rank draws the same `num_replicas * ceil(n / num_replicas)` indices and keeps every
    `num_replicas`-th one from its rank on; with one replica it is a seeded `WeightedRandomSampler`.
    """

    def __init__(self, weights: Sequence[float], *, num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        self.weights = torch.as_tensor(weights, dtype=torch.double)
        self.num_replicas, self.rank, self.seed, self.epoch = num_replicas, rank, seed, 0
        self.num_samples = math.ceil(len(self.weights) / num_replicas)

    def set_epoch(self, epoch: int) -> None:
        """Select the draw of `epoch`."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        total = self.num_samples * self.num_replicas
        drawn = torch.multinomial(self.weights, total, replacement=True, generator=generator)
        return iter(drawn[self.rank : total : self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.num_samples


class _Indexed(Dataset):
    """Items with their dataset index, so gathered predictions can be matched and de-duplicated."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        image, target = self.dataset[i]
        return image, target, i


def gather_predictions(
    indices: torch.Tensor, logits: torch.Tensor, n: int, info: DistInfo
) -> tuple[np.ndarray, np.ndarray]:
    """All ranks' (index, logit) pairs -> exactly one logit per dataset index 0..n-1, in index order.

    DistributedSampler pads the last round with repeated indices so every rank gets as many items; those
    duplicates are dropped here (keeping the first), so a metric is computed on exactly `n` cases.
    """
    if info.world_size > 1:
        parts_i = [torch.empty_like(indices) for _ in range(info.world_size)]
        parts_l = [torch.empty_like(logits) for _ in range(info.world_size)]
        dist.all_gather(parts_i, indices)
        dist.all_gather(parts_l, logits)
        indices, logits = torch.cat(parts_i), torch.cat(parts_l)
    idx = indices.cpu().numpy()
    values = logits.float().cpu().numpy()
    unique, first = np.unique(idx, return_index=True)
    if len(unique) != n or not np.array_equal(unique, np.arange(n)):
        raise RuntimeError(f"gathered predictions cover {len(unique)} distinct items of {n}")
    return unique, values[first]


def model_settings(cfg: Config, run_dir: str | os.PathLike[str], backbone: str) -> dict[str, Any]:
    """What a trained model depends on, as plain JSON values: the settings that change weights, the backbone, and
    the data its split came from (the run's `data.json` hash: manifest contents and split settings).

    Checkpoints and packages record it; a resume or a reuse of a finished model is refused when it differs, so a
    model trained on an earlier split never predicts patients that may have been in its training data.
    """
    from alnus.study import DATA_STAMP

    stamp = Path(run_dir) / DATA_STAMP
    data = json.loads(stamp.read_text(encoding="utf-8")).get("hash") if stamp.is_file() else None
    return json.loads(json.dumps({**training_settings(cfg), "backbone": backbone, "data_hash": data}, default=str))


def _freeze_batch_norm_statistics(model: torch.nn.Module) -> None:
    """Keep the body's batch-norm running statistics as loaded while only the head trains: a frozen body is
    frozen entirely (the head is fitted to the pretrained features, not to statistics drifting under it)."""
    head = {id(m) for m in model.classifier().modules()} if hasattr(model, "classifier") else set()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and id(module) not in head:
            module.eval()


def training_data_hash(table: pd.DataFrame) -> str:
    """SHA-256 of the training and validation rows (patient, label, split, ROI) and their images' contents.

    Image paths are left out, so the same data in another folder has the same hash.
    """
    records = []
    for row in table.to_dict("records"):
        keep = ("patient_id", "label", "split", "roi", "frame", "site")
        records.append({**{k: str(row.get(k, "")) for k in keep}, "sha256": file_sha256(row["image"])})
    records.sort(key=lambda r: (r["split"], r["sha256"], r["patient_id"]))
    return stable_hash(records)


def _lr_lambda(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # No weight decay on biases and normalisation parameters (1-D), as is usual for AdamW/SGD fine-tuning.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): value}


def _part(splits: pd.DataFrame, name: str, positive_label: str, path: Path) -> pd.DataFrame:
    table = splits[splits["split"] == name]
    positives = int((table["label"] == positive_label).sum())
    if len(table) == 0 or positives in (0, len(table)):
        raise TrainError(
            f"{path}: the {name} split has {len(table)} images, {positives} with label {positive_label!r}; "
            "training needs both classes in train and val: add patients or raise data.val_frac"
        )
    return table


class _Tracker:
    """TensorBoard and (when installed) MLflow, on rank 0 only."""

    def __init__(self, cfg: Config, model_dir: Path, backbone: str, start_epoch: int, enabled: bool) -> None:
        self.writer = None
        self.mlflow = None
        if not enabled:
            return
        if cfg.train.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a killed run wrote after its last checkpoint.
            self.writer = SummaryWriter(str(model_dir / "tb"), purge_step=start_epoch + 1 if start_epoch else None)
        if cfg.train.mlflow is not False:
            try:
                import mlflow
            except ImportError:
                if cfg.train.mlflow is True:
                    raise TrainError("train.mlflow is true but mlflow is not installed: pip install mlflow") from None
                return
            self.mlflow = mlflow
            mlflow.start_run(run_name=f"{cfg.name}/{backbone}")
            mlflow.log_params({k: str(v)[:250] for k, v in _flatten(training_settings(cfg)).items()})

    def log(self, row: dict[str, Any]) -> None:
        step = int(row["epoch"])
        metrics = {k: float(row[k]) for k in ("train_loss", "val_loss", "val_auc", "lr", "images_per_s")}
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(key.replace("_", "/", 1), value, step)
            self.writer.flush()
        if self.mlflow is not None:
            self.mlflow.log_metrics(metrics, step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.mlflow is not None:
            self.mlflow.end_run()


def _mismatch(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    a, b = _flatten(saved), _flatten(now)
    return [
        f"{k}: {a.get(k, '(unset)')!r} -> {b.get(k, '(unset)')!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by `train_model`.

    Not `weights_only`: the file holds numpy's RNG state, and it is our own file, written by this run.
    """
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a damaged file is the same problem whatever torch raises
        raise TrainError(
            f"cannot read checkpoint {path} ({type(exc).__name__}: {exc}); delete it to start again"
        ) from exc
    if not isinstance(ckpt, dict) or ckpt.get("version") != CHECKPOINT_VERSION:
        raise TrainError(f"{path} is not an alnus checkpoint of version {CHECKPOINT_VERSION}; delete it to start again")
    return ckpt


def resumable_checkpoint(
    cfg: Config, run_dir: str | os.PathLike[str], backbone: str, *, resume: bool
) -> dict[str, Any] | None:
    """The `last.pt` to continue from (None: start afresh); refuse to overwrite it or to resume changed settings."""
    model_dir = Path(run_dir) / "models" / backbone
    last_path = model_dir / "checkpoints" / "last.pt"
    if not last_path.is_file():
        return None
    if not resume:
        raise TrainError(
            f"{last_path} exists: pass --resume to continue that training, or delete {model_dir} to start again"
        )
    ckpt = load_checkpoint(last_path)
    changed = _mismatch(ckpt["settings"], model_settings(cfg, run_dir, backbone))
    if changed:
        raise TrainError(
            f"cannot resume {last_path}: settings that change the result differ from the checkpoint's "
            f"({'; '.join(changed)}); restore them, start a new run under another name, or delete {model_dir} to train "
            "this model again"
        )
    return ckpt


def train_model(
    cfg: Config,
    run_dir: str | os.PathLike[str],
    backbone: str,
    *,
    resume: bool = False,
    console: Console | None = None,
) -> TrainResult:
    """Train one backbone on the run's `train` split, select on `val`, and write its model package.

    Writes `models/<backbone>/`: `checkpoints/{last,best}.pt`, `history.csv`, `val_predictions_best.csv`,
    `tb/` (TensorBoard) and `model/` (the package). Works alone, on one GPU and under torchrun (DDP).

    Args:
        resume: continue from `checkpoints/last.pt` (refused when the settings that matter changed).
    """
    from alnus._hardware import autocast, choose_precision
    from alnus.data.augment import UltrasoundAugment
    from alnus.data.dataset import ImageCache, PreprocessSpec, UltrasoundDataset
    from alnus.data.roi import RoiPolicy
    from alnus.models import create_model, get_spec
    from alnus.models.package import save_package
    from alnus.stats import auc
    from alnus.study import read_splits

    started = time.perf_counter()
    run_dir = Path(run_dir)
    info = dist_info()
    console = console or Console()
    tc = cfg.train
    device = resolve_device(tc.device, info)
    model_dir = run_dir / "models" / backbone
    ckpt_dir = model_dir / "checkpoints"
    last_path, best_path = ckpt_dir / "last.pt", ckpt_dir / "best.pt"
    settings = model_settings(cfg, run_dir, backbone)

    ckpt = resumable_checkpoint(cfg, run_dir, backbone, resume=resume)

    seed_everything(tc.seed, deterministic=tc.deterministic)
    splits_path = run_dir / "splits.csv"
    splits = read_splits(run_dir)
    positive = cfg.data.positive_label
    train_table = _part(splits, "train", positive, splits_path)
    val_table = _part(splits, "val", positive, splits_path)
    net_spec = get_spec(backbone)
    spec = PreprocessSpec(
        size=cfg.preprocess.size or net_spec.input_size,
        roi=RoiPolicy(cfg.preprocess.roi, cfg.preprocess.margin),
        keep_aspect=cfg.preprocess.keep_aspect,
    )
    cache = ImageCache(run_dir / "cache")
    augment = UltrasoundAugment.from_config(tc.augment) if tc.augment is not None else None
    train_ds = UltrasoundDataset(
        train_table, run_dir, spec, cache=cache, positive_label=positive, transform=augment, seed=tc.seed
    )
    val_ds = UltrasoundDataset(val_table, run_dir, spec, cache=cache, positive_label=positive)
    # Rank 0 fills the cache; the others then only read it.
    for ds in (train_ds, val_ds):
        main_first(info, ds.warm)
        if not info.is_main:
            ds.warm()

    targets = train_ds.targets
    n_pos, n_neg = int(targets.sum()), int(len(targets) - targets.sum())
    if tc.balance == "sampler":
        class_weight = np.where(targets == 1, 1.0 / n_pos, 1.0 / n_neg)
        sampler: Any = WeightedDistributedSampler(
            class_weight, num_replicas=info.world_size, rank=info.rank, seed=tc.seed
        )
    else:
        sampler = DistributedSampler(
            train_ds,
            num_replicas=info.world_size,
            rank=info.rank,
            shuffle=True,
            seed=tc.seed,
            drop_last=False,
        )
    val_sampler = DistributedSampler(
        val_ds, num_replicas=info.world_size, rank=info.rank, shuffle=False, drop_last=False
    )
    # BatchNorm cannot train on a final batch of one image.
    drop_last = len(sampler) % tc.batch_size == 1 and len(sampler) > 1
    loader_args = {"num_workers": tc.num_workers, "pin_memory": device.type == "cuda"}
    train_loader = DataLoader(train_ds, batch_size=tc.batch_size, sampler=sampler, drop_last=drop_last, **loader_args)
    val_loader = DataLoader(_Indexed(val_ds), batch_size=tc.batch_size, sampler=val_sampler, **loader_args)

    model = create_model(backbone, weights=tc.weights).to(device)
    precision = choose_precision(device, tc.precision)
    channels_last = precision.channels_last if tc.channels_last == "auto" else bool(tc.channels_last)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    head_epochs = tc.head_epochs if tc.weights != "none" else 0
    pos_weight = torch.tensor(n_neg / n_pos, device=device) if tc.balance == "weighted_loss" else None
    criterion = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    groups = _param_groups(model, tc.weight_decay)
    if tc.optimizer == "adamw":
        # Fused: one kernel per step instead of one per parameter (faster on CPU and GPU; bench/throughput.py).
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(groups, lr=tc.lr, fused=True)
    else:
        optimizer = torch.optim.SGD(groups, lr=tc.lr, momentum=tc.momentum)
    steps_per_epoch = math.ceil(len(train_loader) / tc.grad_accum)
    total_steps = steps_per_epoch * tc.epochs
    warmup_steps = round(tc.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(warmup_steps, total_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=precision.autocast_dtype == torch.float16)

    start_epoch, best_auc, best_epoch, bad_epochs, stopped = 0, -math.inf, -1, 0, False
    history: list[dict[str, Any]] = []
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        set_rng_states(ckpt["rng"])
        start_epoch, best_auc, best_epoch = ckpt["epoch"] + 1, ckpt["best_val_auc"], ckpt["best_epoch"]
        bad_epochs, stopped, history = ckpt["bad_epochs"], ckpt["stopped_early"], list(ckpt["history"])

    if info.is_main:
        what = f"resuming after epoch {start_epoch}" if ckpt is not None else "training"
        console.print(
            f"[bold]{backbone}[/bold]: {what} on {device} ({precision.reason}); {len(train_ds)} train / "
            f"{len(val_ds)} val images at {spec.size} px, {info.world_size} process(es)",
            highlight=False,
        )
    tracker = _Tracker(cfg, model_dir, backbone, start_epoch, enabled=info.is_main)
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[speed]} img/s  loss {task.fields[loss]}"),
        console=console,
        transient=True,
        disable=not (info.is_main and console.is_terminal),
    )
    live = info.is_main and console.is_terminal
    net: torch.nn.Module = model
    phase = None
    try:
        with progress:
            for epoch in range(start_epoch, tc.epochs):
                if stopped:
                    break
                t0 = time.perf_counter()
                new_phase = "head" if epoch < head_epochs else "full"
                if new_phase != phase:
                    phase = new_phase
                    for p in model.body_parameters():
                        p.requires_grad_(phase == "full")
                    # DDP registers the parameters that need gradients when it wraps the model.
                    if info.world_size > 1:
                        net = DistributedDataParallel(
                            model, device_ids=[device.index] if device.type == "cuda" else None
                        )
                sampler.set_epoch(epoch)
                train_ds.set_epoch(epoch)
                net.train()
                if phase == "head":
                    _freeze_batch_norm_statistics(model)
                loss_sum = torch.zeros((), dtype=torch.float64, device=device)
                lr_used = optimizer.param_groups[0]["lr"]
                seen = 0
                task = progress.add_task(f"epoch {epoch + 1}/{tc.epochs}", total=len(train_loader), speed="-", loss="-")
                for step, (x, y) in enumerate(train_loader):
                    x = x.to(device, non_blocking=True)
                    if channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                    y = y.to(device, non_blocking=True).float()
                    boundary = (step + 1) % tc.grad_accum == 0 or step + 1 == len(train_loader)
                    sync = contextlib.nullcontext() if boundary or info.world_size == 1 else net.no_sync()
                    with sync:
                        with autocast(device, precision):
                            logits = net(x)
                        loss = criterion(logits.float(), y)
                        scaler.scale(loss / tc.grad_accum).backward()
                    if boundary:
                        lr_used = optimizer.param_groups[0]["lr"]
                        scaler.step(optimizer)
                        scaler.update()
                        optimizer.zero_grad(set_to_none=True)
                        scheduler.step()
                    loss_sum += loss.detach().double() * len(y)
                    seen += len(y)
                    if live:
                        elapsed = time.perf_counter() - t0
                        progress.update(
                            task,
                            advance=1,
                            speed=f"{seen * info.world_size / elapsed:.0f}",
                            loss=f"{loss.item():.3f}",
                        )
                progress.remove_task(task)
                train_seconds = time.perf_counter() - t0
                totals = torch.tensor([loss_sum.item(), float(seen)], dtype=torch.float64, device=device)
                if info.world_size > 1:
                    dist.all_reduce(totals)
                    # Each rank's BatchNorm statistics saw only its shard; evaluate with rank 0's everywhere.
                    for buffer in model.buffers():
                        dist.broadcast(buffer, src=0)

                idx, val_logits = _predict(model, val_loader, device, precision, channels_last, info, autocast)
                y_val = val_ds.targets[idx]
                val_loss = float(
                    torch.nn.functional.binary_cross_entropy_with_logits(
                        torch.from_numpy(val_logits), torch.from_numpy(y_val).float()
                    )
                )
                if not np.isfinite(val_logits).all():
                    raise TrainError(
                        f"training of {backbone} diverged in epoch {epoch + 1}: the validation outputs are not "
                        "finite; lower train.lr, or set train.precision to fp32"
                    )
                probs = 1.0 / (1.0 + np.exp(-val_logits.astype(np.float64)))
                val_auc = auc(y_val, probs)
                improved = val_auc > best_auc
                if improved:
                    best_auc, best_epoch, bad_epochs = val_auc, epoch + 1, 0
                else:
                    bad_epochs += 1
                patience = tc.early_stopping_patience
                stopped = patience is not None and bad_epochs >= patience and epoch + 1 < tc.epochs
                row = {
                    "epoch": epoch + 1,
                    "phase": phase,
                    "train_loss": totals[0].item() / max(1.0, totals[1].item()),
                    "val_loss": val_loss,
                    "val_auc": val_auc,
                    "lr": lr_used,  # of the epoch's last optimiser step
                    "images_per_s": totals[1].item() / train_seconds,
                    "seconds": time.perf_counter() - t0,
                }
                history.append(row)
                if info.is_main:
                    if improved:
                        _save(
                            {
                                "version": CHECKPOINT_VERSION,
                                "model": model.state_dict(),
                                "epoch": epoch,
                                "val_auc": val_auc,
                                "settings": settings,
                            },
                            best_path,
                        )
                        _write_predictions(
                            val_ds.table, idx, y_val, probs, epoch + 1, model_dir / "val_predictions_best.csv"
                        )
                    _save(
                        {
                            "version": CHECKPOINT_VERSION,
                            "model": model.state_dict(),
                            "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(),
                            "scaler": scaler.state_dict(),
                            "rng": rng_states(),
                            "epoch": epoch,
                            "best_val_auc": best_auc,
                            "best_epoch": best_epoch,
                            "bad_epochs": bad_epochs,
                            "stopped_early": stopped,
                            "history": history,
                            "settings": settings,
                            "config_hash": stable_hash(settings),
                        },
                        last_path,
                    )
                    write_csv(pd.DataFrame(history, columns=list(HISTORY_COLUMNS)), model_dir / "history.csv")
                    tracker.log(row)
                    console.print(
                        f"epoch {epoch + 1:>3}/{tc.epochs} [{phase}]  train loss {row['train_loss']:.4f}  "
                        f"val loss {val_loss:.4f}  val AUC {val_auc:.4f}{' *' if improved else '  '}  "
                        f"lr {row['lr']:.2e}  {row['images_per_s']:.0f} img/s  {row['seconds']:.1f} s",
                        highlight=False,
                    )
                    if stopped:
                        console.print(f"early stop: no val AUC gain for {patience} epochs", highlight=False)
    finally:
        tracker.close()

    package_dir = model_dir / "model"
    if info.is_main:
        best = load_checkpoint(best_path)
        final = copy.deepcopy(model)
        final.load_state_dict(best["model"])
        labels = cfg.data.labels or sorted(splits["label"].unique())
        save_package(
            package_dir,
            final,
            {
                "preprocess": spec.to_dict(),
                "label_names": list(labels),
                "positive_label": positive,
                "training_data_hash": training_data_hash(pd.concat([train_table, val_table])),
                "weights_source": model.weights_source,
                "best_epoch": best_epoch,
                "val_auc": best_auc,
                "run": cfg.name,
                "settings_hash": stable_hash(settings),
            },
        )
        console.print(
            f"[green]best[/green] epoch {best_epoch}, val AUC {best_auc:.4f} -> {package_dir}",
            highlight=False,
        )
    if info.world_size > 1:
        dist.barrier()
    return TrainResult(
        backbone=backbone,
        model_dir=model_dir,
        package_dir=package_dir,
        best_epoch=best_epoch,
        best_val_auc=best_auc,
        epochs_run=len(history),
        stopped_early=stopped,
        seconds=time.perf_counter() - started,
        history=history,
    )


def _save(obj: dict[str, Any], path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _write_predictions(
    table: pd.DataFrame, idx: np.ndarray, y: np.ndarray, probs: np.ndarray, epoch: int, path: Path
) -> None:
    rows = table.iloc[idx]
    out = pd.DataFrame(
        {
            "index": idx,
            "image": rows["image"].to_numpy(),
            "patient_id": rows["patient_id"].to_numpy(),
            "label": rows["label"].to_numpy(),
            "y": y,
            "prob": probs,
            "epoch": epoch,
        }
    )
    write_csv(out, path)


@torch.no_grad()
def _predict(
    model: torch.nn.Module,
    loader: DataLoader,
    device: torch.device,
    precision: Any,
    channels_last: bool,
    info: DistInfo,
    autocast: Callable[..., Any],
) -> tuple[np.ndarray, np.ndarray]:
    """This rank's shard of the validation set, then the gathered, de-duplicated (index, logit) arrays."""
    model.eval()
    indices, outputs = [], []
    for x, _, i in loader:
        x = x.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            outputs.append(model(x).float())
        indices.append(i.to(device))
    n = len(loader.dataset)  # type: ignore[arg-type]
    return gather_predictions(torch.cat(indices), torch.cat(outputs), n, info)


def run_training(
    cfg: Config, *, models: Sequence[str] | None = None, resume: bool = False, console: Console | None = None
) -> list[TrainResult]:
    """Prepare the run folder (rank 0) and train each backbone; under torchrun every rank calls this."""
    from alnus.study import prepare_run

    results = []
    with distributed(cfg.train.device) as info:
        backbones = list(models or cfg.models)
        # Checked before prepare_run rewrites config.yaml: a refused run must leave the folder as it was.
        for backbone in backbones:
            resumable_checkpoint(cfg, cfg.run_dir, backbone, resume=resume)
        main_first(info, lambda: prepare_run(cfg))
        for backbone in backbones:
            results.append(train_model(cfg, cfg.run_dir, backbone, resume=resume, console=console))
    return results
