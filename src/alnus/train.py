"""The training engine: one loop for the CPU, one GPU and `torchrun` DDP.

Transfer learning as in Zhou et al. (Radiology 2020;294:19-28): pretrained backbones are fine-tuned head-first
(body frozen), then whole. AdamW (Loshchilov & Hutter 2019) or SGD with momentum, linear warm-up then cosine decay
per optimiser step (Loshchilov & Hutter 2017, SGDR; Goyal et al. 2017 for the warm-up); when the body unfreezes,
the learning rate warms up again (`train.body_warmup_epochs`), and the body may learn at a fraction of the head's
rate (`train.body_lr_factor`, discriminative fine-tuning: Howard & Ruder 2018).

The model is selected, and training stopped early, on the validation AUC at the study's level
(`evaluate.level`, `evaluate.aggregate`: by default a patient's mean image probability), the level the threshold
is frozen and the results are reported at; it is computed on exactly the validation images (DistributedSampler's
padding duplicates are dropped by index after the gather).

A run is repeatable: python/numpy/torch are seeded, the sampler's order is drawn from (seed, epoch) and each item's
augmentation from (seed, epoch, index), and `last.pt` holds every RNG state, so a resumed run sees the same data and
draws as an uninterrupted one. Checkpoints hold tensors and plain values only and are read with
`torch.load(weights_only=True)`, so a crafted file cannot run code; each carries the SHA-256 of its contents, so a
damaged one is refused instead of resumed (`alnus._checkpoint`). Ranks, the sampler and the gather of predictions
across ranks are in `alnus._distributed`.

The steps, in the order `train_model` wires them: `build_data`, `build_engine` (model, optimiser, schedule),
`TrainState` (saves and restores itself), then per epoch `train_one_epoch`, `validate`, `save_checkpoint`; last
`write_package`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from alnus._checkpoint import (
    CheckpointError,
    delete_advice,
    load_checkpoint,
    rng_states,
    save_checkpoint,
    set_rng_states,
)
from alnus._distributed import (
    DistInfo,
    IndexedDataset,
    WeightedDistributedSampler,
    dist_info,
    gather_predictions,
    main_first,
)
from alnus._io import atomic_write_text, file_sha256, write_csv
from alnus._levels import aggregate_cases, case_ids, mixed_cases
from alnus._text import escape
from alnus.config import Config, dump_config, stable_hash, training_settings
from alnus.errors import AlnusError
from alnus.runfolder import ModelFolder, RunFolder, read_splits

if TYPE_CHECKING:
    from alnus._hardware import Precision
    from alnus.data.dataset import PreprocessSpec, UltrasoundDataset
    from alnus.models import UltrasoundNet
    from alnus.reader_target import ReaderTarget
    from alnus.shape_target import ShapeTarget

# `val_auc` is at the study's level (`evaluate.level`); `lr` is the head's rate at the epoch's last optimiser step.
# `validated`: which weights the epoch's validation scored (`Engine.validated`): `epoch` (this epoch's own), `ema` or
# `swa` (an average).
HISTORY_COLUMNS = (
    "epoch", "phase", "train_loss", "val_loss", "val_auc", "lr", "images_per_s", "seconds", "validated"
)  # fmt: skip


class TrainError(AlnusError):
    """Training cannot start or continue as configured; the message says what to change."""


@dataclass
class TrainResult:
    """What `train_model` produced for one backbone; `best_val_auc` is at the study's level (`evaluate.level`)."""

    backbone: str
    model_dir: Path
    package_dir: Path
    best_epoch: int
    best_val_auc: float
    epochs_run: int
    stopped_early: bool
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)


def rank_device(requested: str, info: DistInfo) -> torch.device:
    """This rank's device: with `auto` or `cuda`, the GPU of its local rank (one GPU per torchrun process), else CPU.

    Not `alnus.predict.resolve_device`: prediction runs in one process and may name any GPU (`cuda:N`), while a
    training rank must use the GPU torchrun gave it.
    """
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


def model_settings(cfg: Config, run_dir: str | os.PathLike[str], backbone: str) -> dict[str, Any]:
    """What a trained model depends on, as plain JSON values: the settings that change weights, the level the best
    epoch is chosen at, the backbone, and the data its split came from (the run's `data.json` hash: manifest
    contents and split settings).

    Checkpoints and packages record it; a resume or a reuse of a finished model is refused when it differs, so a
    model trained on an earlier split never predicts patients that may have been in its training data.
    """
    stamp = RunFolder(run_dir).data_stamp
    data = json.loads(stamp.read_text(encoding="utf-8")).get("hash") if stamp.is_file() else None
    selection = {"level": cfg.evaluate.level, "aggregate": cfg.evaluate.aggregate}
    settings = {**training_settings(cfg), "selection": selection, "backbone": backbone, "data_hash": data}
    return json.loads(json.dumps(settings, default=str))


def training_record(cfg: Config) -> dict[str, Any]:
    """The resolved data, preprocess, train and evaluate sections as plain JSON: what a model package records."""
    sections = cfg.to_dict()
    return json.loads(json.dumps({k: sections[k] for k in ("data", "preprocess", "train", "evaluate")}, default=str))


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


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): value}


def settings_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Each setting that differs between two nested settings dicts, as `section.key: old -> new`, sorted."""
    a, b = _flatten(saved), _flatten(now)
    return [
        f"{k}: {a.get(k, '(unset)')!r} -> {b.get(k, '(unset)')!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]


# ------------------------------------------------------------------------------------- learning-rate schedule
def lr_factor(step: int, *, total: int, warmup: int, unfreeze: int | None = None, body_warmup: int = 0) -> float:
    """The multiplier of each group's base learning rate at optimiser step `step` (0-based).

    Linear warm-up over `warmup` steps, then cosine decay to 0 at `total`; from `unfreeze` (the first step that
    trains the body), a second linear warm-up over `body_warmup` steps scales the cosine down and back up, so the
    freshly unfrozen body starts at a low rate instead of near the peak.
    """
    ramp = (step + 1) / warmup if step < warmup else 1.0
    if unfreeze is not None and unfreeze <= step < unfreeze + body_warmup:
        ramp = min(ramp, (step - unfreeze + 1) / body_warmup)
    if step < warmup:
        return ramp
    progress = (step - warmup) / max(1, total - warmup)
    return ramp * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _param_groups(model: torch.nn.Module, lr: float, body_lr_factor: float, weight_decay: float) -> list[dict]:
    """Head, then body parameters, each with and without weight decay; the body at `body_lr_factor` x `lr`.

    No weight decay on biases and normalisation parameters (1-D), as is usual for AdamW/SGD fine-tuning.
    """
    head = {id(p) for p in model.head_parameters()}  # type: ignore[operator]
    groups = []
    for part, part_lr in (("head", lr), ("body", lr * body_lr_factor)):
        params = [p for p in model.parameters() if (id(p) in head) == (part == "head")]
        for decay in (True, False):
            chosen = [p for p in params if (p.ndim > 1) == decay]
            if chosen:
                name = part if decay else f"{part}_no_decay"
                groups.append(
                    {"params": chosen, "lr": part_lr, "weight_decay": weight_decay if decay else 0.0, "name": name}
                )
    return groups


def build_optimizer(
    model: torch.nn.Module, tc: Any, *, steps_per_epoch: int, head_epochs: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The optimiser (head and body parameter groups) and its per-step schedule (`lr_factor`).

    Args:
        tc: the config's `train` section.
        head_epochs: epochs that train the head alone (0: the body trains from the start, no second warm-up).
    """
    groups = _param_groups(model, tc.lr, tc.body_lr_factor, tc.weight_decay)
    if tc.optimizer == "adamw":
        # Fused: one kernel per step instead of one per parameter (faster on CPU and GPU; bench/throughput.py).
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(groups, lr=tc.lr, fused=True)
    else:
        optimizer = torch.optim.SGD(groups, lr=tc.lr, momentum=tc.momentum)
    unfreeze = head_epochs * steps_per_epoch if 0 < head_epochs < tc.epochs else None
    schedule = {
        "total": steps_per_epoch * tc.epochs,
        "warmup": round(tc.warmup_epochs * steps_per_epoch),
        "unfreeze": unfreeze,
        "body_warmup": round(tc.body_warmup_epochs * steps_per_epoch) if unfreeze is not None else 0,
    }
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, **schedule))
    return optimizer, scheduler


def group_lr(optimizer: torch.optim.Optimizer, part: str) -> float:
    """The current learning rate of the `head` or `body` parameters."""
    return next(float(g["lr"]) for g in optimizer.param_groups if g["name"].startswith(part))


# ------------------------------------------------------------------------------------------------------ data
@dataclass
class TrainData:
    """The train and val datasets and loaders, and the val cases the selection AUC is computed on."""

    spec: PreprocessSpec
    train_table: pd.DataFrame
    val_table: pd.DataFrame
    train_ds: UltrasoundDataset
    val_ds: UltrasoundDataset
    sampler: DistributedSampler | WeightedDistributedSampler
    train_loader: DataLoader
    val_loader: DataLoader
    val_cases: np.ndarray  # the case (image, patient or study) of each val image, as integers
    label_names: list[str]
    n_pos: int
    n_neg: int
    # The auxiliary targets of each training image, in the order of their outputs after the label's logit: the
    # BI-RADS category (`train.aux_reader`), then the lesion's shape (`train.aux_shape`).
    aux: tuple[ReaderTarget | ShapeTarget, ...] = ()

    @property
    def aux_outputs(self) -> int:
        """Network outputs beyond the label's logit."""
        return sum(target.outputs for target in self.aux)

    def aux_loss(self, extra_logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The auxiliary targets' summed loss on the outputs after the label's logit."""
        total, start = extra_logits.sum() * 0.0, 0
        for target in self.aux:
            total = total + target.loss(extra_logits[:, start : start + target.outputs], index)
            start += target.outputs
        return total


def _part(splits: pd.DataFrame, name: str, positive_label: str, path: Path) -> pd.DataFrame:
    table = splits[splits["split"] == name]
    positives = int((table["label"] == positive_label).sum())
    if len(table) == 0 or positives in (0, len(table)):
        raise TrainError(
            f"{path}: the {name} split has {len(table)} images, {positives} with label {positive_label!r}; "
            "training needs both classes in train and val: add patients or raise data.val_frac"
        )
    return table


def _val_cases(val_table: pd.DataFrame, positive: str, level: str, path: Path) -> np.ndarray:
    """The case of each val image at the study's level; refuse cases without an id or with mixed labels."""
    try:
        cases = case_ids(val_table, level)
    except ValueError as exc:
        raise TrainError(
            f"{path}: the val split cannot be scored per {level}: {exc}; fill it in the manifest, or set "
            "evaluate.level to patient or image"
        ) from None
    mixed = mixed_cases(cases, (val_table["label"] == positive).to_numpy(int))
    if mixed.size:
        first = pd.Series(np.arange(len(cases))).groupby(cases).first()
        names = [str(val_table["patient_id"].iloc[first[case]]) for case in mixed[:8]]
        raise TrainError(
            f"{path}: {mixed.size} val {level}(s) have images with different labels ({', '.join(names)}); a "
            f"{level}-level AUC needs one label per {level}: check the labels, or set evaluate.level to image"
        )
    return cases


def build_data(cfg: Config, run: RunFolder, backbone: str, info: DistInfo, device: torch.device) -> TrainData:
    """The run's train and val splits as warmed datasets (rank 0 fills the decode cache) and their loaders."""
    from alnus.data.augment import UltrasoundAugment
    from alnus.data.dataset import ImageCache, PreprocessSpec, UltrasoundDataset
    from alnus.data.roi import RoiPolicy
    from alnus.models import get_spec

    tc, positive = cfg.train, cfg.data.positive_label
    splits = read_splits(run.root)
    train_table = _part(splits, "train", positive, run.splits)
    val_table = _part(splits, "val", positive, run.splits)
    val_cases = _val_cases(val_table, positive, cfg.evaluate.level, run.splits)
    spec = PreprocessSpec(
        size=cfg.preprocess.size or get_spec(backbone).input_size,
        roi=RoiPolicy(cfg.preprocess.roi, cfg.preprocess.margin),
        keep_aspect=cfg.preprocess.keep_aspect,
        grey=cfg.preprocess.grey,
        max_crop=cfg.preprocess.max_crop,
    )
    cache = ImageCache(run.cache)
    augment = UltrasoundAugment.from_config(tc.augment) if tc.augment is not None else None
    limit = cfg.data.max_image_pixels
    train_ds = UltrasoundDataset(
        train_table, run.root, spec, cache=cache, positive_label=positive, transform=augment, seed=tc.seed,
        max_pixels=limit,
    )  # fmt: skip
    val_ds = UltrasoundDataset(val_table, run.root, spec, cache=cache, positive_label=positive, max_pixels=limit)
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
            train_ds, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=tc.seed, drop_last=False
        )
    val_sampler = DistributedSampler(val_ds, num_replicas=info.world_size, rank=info.rank, shuffle=False)
    # BatchNorm cannot train on a final batch of one image.
    drop_last = len(sampler) % tc.batch_size == 1 and len(sampler) > 1
    loader_args = {"num_workers": tc.num_workers, "pin_memory": device.type == "cuda"}
    # Indexed, so a batch finds its images' auxiliary targets; the sampler's order is the same.
    train_loader = DataLoader(
        IndexedDataset(train_ds), batch_size=tc.batch_size, sampler=sampler, drop_last=drop_last, **loader_args
    )
    val_loader = DataLoader(IndexedDataset(val_ds), batch_size=tc.batch_size, sampler=val_sampler, **loader_args)
    labels = list(cfg.data.labels or sorted(splits["label"].unique()))
    aux: list[ReaderTarget | ShapeTarget] = []
    if tc.aux_reader is not None:
        from alnus.reader_target import reader_target

        aux.append(reader_target(train_ds.table, tc.aux_reader, tc.aux_weight, str(run.splits)))
    if tc.aux_shape is not None:
        from alnus.shape_target import shape_target

        aux.append(shape_target(train_ds.table, run.root, tc.aux_shape, str(run.splits), max_pixels=limit))
    return TrainData(
        spec,
        train_table,
        val_table,
        train_ds,
        val_ds,
        sampler,
        train_loader,
        val_loader,
        val_cases,
        labels,
        n_pos,
        n_neg,
        tuple(aux),
    )


# ---------------------------------------------------------------------------------------------------- engine
@dataclass
class Engine:
    """The model, its optimiser, schedule and gradient scaler, and how batches run (device, precision, layout)."""

    model: UltrasoundNet
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    criterion: torch.nn.Module
    device: torch.device
    precision: Precision
    channels_last: bool
    head_epochs: int
    grad_accum: int
    net: torch.nn.Module | None = None  # the model as this process runs it (DDP-wrapped with several ranks)
    phase: str | None = None
    ema: Any = None  # timm's ModelEmaV3 of the weights (`train.ema_decay`), or None
    swa: Any = None  # torch's AveragedModel of the epochs' weights (`train.swa_start`), or None
    swa_start: int | None = None  # the first epoch (1-based) whose weights enter `swa`
    mixstyle: Any = None  # the MixStyle hooks on `model` (`train.mixstyle`), or None

    def eval_model(self) -> torch.nn.Module:
        """The weights that are validated, selected and packaged: the average when there is one."""
        if self.ema is not None:
            return self.ema.module
        if self.swa is not None and int(self.swa.n_averaged) > 0:
            return self.swa.module
        return self.model

    def validated(self, epoch: int) -> str:
        """Which weights epoch `epoch` (1-based) validated, for history.csv: `epoch` (its own), `ema` or `swa`."""
        if self.ema is not None:
            return "ema"
        if self.swa_start is not None and epoch >= self.swa_start:
            return "swa"
        return "epoch"

    def selectable(self, epoch: int) -> bool:
        """Whether epoch `epoch` (1-based) may be chosen as the best: with weight averaging, only from its start."""
        return self.swa_start is None or epoch >= self.swa_start

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """A batch on the device, in the engine's memory layout."""
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def enter_phase(self, epoch: int, info: DistInfo) -> str:
        """`head` (body frozen) for the first `head_epochs` epochs, then `full`; (re)wraps DDP when it changes."""
        phase = "head" if epoch < self.head_epochs else "full"
        if phase != self.phase:
            self.phase = phase
            for p in self.model.body_parameters():
                p.requires_grad_(phase == "full")
            self.net = self.model
            if info.world_size > 1:
                # DDP registers the parameters that need gradients when it wraps the model: wrap again.
                ids = [self.device.index] if self.device.type == "cuda" else None
                self.net = DistributedDataParallel(self.model, device_ids=ids)
        return phase


def build_engine(cfg: Config, backbone: str, data: TrainData, device: torch.device) -> Engine:
    """Create the model (with its start weights), loss, optimiser, per-step schedule and gradient scaler."""
    from alnus._hardware import choose_precision
    from alnus.models import create_model

    tc = cfg.train
    extra = data.aux_outputs
    model = create_model(backbone, weights=tc.weights, num_classes=1 + extra).to(device)
    precision = choose_precision(device, tc.precision, depthwise=model.spec.depthwise)
    channels_last = precision.channels_last if tc.channels_last == "auto" else bool(tc.channels_last)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    head_epochs = tc.head_epochs if tc.weights != "none" else 0
    pos_weight = torch.tensor(data.n_neg / data.n_pos, device=device) if tc.balance == "weighted_loss" else None
    steps_per_epoch = math.ceil(len(data.train_loader) / tc.grad_accum)
    optimizer, scheduler = build_optimizer(model, tc, steps_per_epoch=steps_per_epoch, head_epochs=head_epochs)
    ema = None
    if tc.ema_decay is not None:
        from timm.utils import ModelEmaV3

        # Warm-up: the average starts short and lengthens towards `ema_decay`, so the first weights fade quickly.
        ema = ModelEmaV3(model, decay=tc.ema_decay, use_warmup=True)
    swa = None
    if tc.swa_start is not None:
        from torch.optim.swa_utils import AveragedModel

        swa = AveragedModel(model)
    mixstyle = None
    if tc.mixstyle is not None:
        from alnus.models.mixstyle import MixStyle

        # After the averages' copies are made: a copy would carry the hooks (and restyle update_bn's pass).
        try:
            mixstyle = MixStyle(model, tc.mixstyle)
        except ValueError as exc:
            raise TrainError(f"train.mixstyle: {exc}; set it to null for this backbone") from None
    return Engine(
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=torch.amp.GradScaler(device.type, enabled=precision.autocast_dtype == torch.float16),
        criterion=torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight),
        device=device,
        precision=precision,
        channels_last=channels_last,
        head_epochs=head_epochs,
        grad_accum=tc.grad_accum,
        ema=ema,
        swa=swa,
        swa_start=tc.swa_start,
        mixstyle=mixstyle,
    )


# ----------------------------------------------------------------------------------------------------- state
@dataclass
class TrainState:
    """Where training stands: epochs done, the best epoch so far, early stopping, the history; it saves itself
    (with the engine's states and every RNG state) as `last.pt` and restores itself from it."""

    epochs_done: int = 0
    best_auc: float = -math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    stopped: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)

    def record(
        self, row: dict[str, Any], *, patience: int | None, epochs: int, selectable: bool = True, last: bool = False
    ) -> bool:
        """Add an epoch's history row; returns whether it is now the chosen epoch: its val AUC is the best so far or,
        with `last` (`train.selection_metric: last`), every selectable epoch replaces the one before (and stops early
        if due).

        An epoch that is not `selectable` (before weight averaging starts) is recorded but neither chosen nor
        counted towards early stopping."""
        self.history.append(row)
        self.epochs_done = int(row["epoch"])
        improved = selectable and (last or row["val_auc"] > self.best_auc)
        if improved:
            self.best_auc, self.best_epoch, self.bad_epochs = float(row["val_auc"]), self.epochs_done, 0
        elif selectable:
            self.bad_epochs += 1
        self.stopped = patience is not None and self.bad_epochs >= patience and self.epochs_done < epochs
        return improved

    def checkpoint(self, engine: Engine, settings: dict[str, Any]) -> dict[str, Any]:
        """The `last.pt` payload: engine states, RNG states and this state, as tensors and plain values."""
        return {
            "model": engine.model.state_dict(),
            **({"ema": engine.ema.state_dict()} if engine.ema is not None else {}),
            **({"swa": engine.swa.state_dict()} if engine.swa is not None else {}),
            "optimizer": engine.optimizer.state_dict(),
            "scheduler": engine.scheduler.state_dict(),
            "scaler": engine.scaler.state_dict(),
            "rng": rng_states(),
            "epoch": self.epochs_done - 1,
            "best_val_auc": float(self.best_auc),
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "stopped_early": self.stopped,
            "history": [dict(row) for row in self.history],
            "settings": settings,
            # The precision it trained in: `auto` and ALNUS_PRECISION resolve by hardware and backbone.
            "precision": engine.precision.name,
        }

    @classmethod
    def restore(cls, payload: dict[str, Any], engine: Engine, path: Path) -> TrainState:
        """Load a `last.pt` payload into the engine and the RNGs; returns the state it was saved in.

        Refuses a checkpoint that trained in another precision than the engine's (a checkpoint from before the
        precision was recorded resumes in the engine's)."""
        saved = payload.get("precision")
        if saved is not None and saved != engine.precision.name:
            raise TrainError(
                f"cannot resume {path}: it trained in {saved}, and this run would go on in {engine.precision.name} "
                f"({engine.precision.reason}); resume with the environment variable ALNUS_PRECISION={saved}, or "
                f"{delete_advice(path)}."
            )
        try:
            engine.model.load_state_dict(payload["model"])
            if engine.ema is not None:
                engine.ema.load_state_dict(payload["ema"])
            if engine.swa is not None:
                engine.swa.load_state_dict(payload["swa"])
            engine.optimizer.load_state_dict(payload["optimizer"])
            engine.scheduler.load_state_dict(payload["scheduler"])
            engine.scaler.load_state_dict(payload["scaler"])
            set_rng_states(payload["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(
                f"checkpoint {path} does not fit this model and optimiser ({type(exc).__name__}: {exc}); "
                f"{delete_advice(path)}."
            ) from None
        return cls(
            epochs_done=payload["epoch"] + 1,
            best_auc=payload["best_val_auc"],
            best_epoch=payload["best_epoch"],
            bad_epochs=payload["bad_epochs"],
            stopped=payload["stopped_early"],
            history=list(payload["history"]),
        )


# ----------------------------------------------------------------------------------------------------- steps
def _freeze_batch_norm_statistics(model: torch.nn.Module) -> None:
    """Keep the body's batch-norm running statistics as loaded while only the head trains: a frozen body is
    frozen entirely (the head is fitted to the pretrained features, not to statistics drifting under it)."""
    head = {id(m) for m in model.classifier().modules()} if hasattr(model, "classifier") else set()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and id(module) not in head:
            module.eval()


def train_one_epoch(engine: Engine, data: TrainData, info: DistInfo, progress: Progress, title: str) -> dict[str, Any]:
    """One pass over this rank's share of the training data; returns the epoch's loss, speed and head LR."""
    from alnus._hardware import autocast

    t0 = time.perf_counter()
    net = engine.net or engine.model
    net.train()
    if engine.phase == "head":
        _freeze_batch_norm_statistics(engine.model)
    loss_sum = torch.zeros((), dtype=torch.float64, device=engine.device)
    lr_used, seen = group_lr(engine.optimizer, "head"), 0
    live = info.is_main and not progress.disable
    task = progress.add_task(title, total=len(data.train_loader), speed="-", loss="-")
    for step, (x, y, index) in enumerate(data.train_loader):
        x, y = engine.prepare(x), y.to(engine.device, non_blocking=True).float()
        boundary = (step + 1) % engine.grad_accum == 0 or step + 1 == len(data.train_loader)
        sync = contextlib.nullcontext() if boundary or info.world_size == 1 else net.no_sync()
        with sync:
            with autocast(engine.device, engine.precision):
                logits = net(x)
            if not data.aux:
                loss = engine.criterion(logits.float(), y)
            else:
                loss = engine.criterion(logits[:, 0].float(), y) + data.aux_loss(logits[:, 1:], index)
            engine.scaler.scale(loss / engine.grad_accum).backward()
        if boundary:
            lr_used = group_lr(engine.optimizer, "head")
            engine.scaler.step(engine.optimizer)
            engine.scaler.update()
            engine.optimizer.zero_grad(set_to_none=True)
            engine.scheduler.step()
            if engine.ema is not None:
                engine.ema.update(engine.model, step=engine.scheduler.last_epoch)
        loss_sum += loss.detach().double() * len(y)
        seen += len(y)
        if live:
            speed = f"{seen * info.world_size / (time.perf_counter() - t0):.0f}"
            progress.update(task, advance=1, speed=speed, loss=f"{loss.item():.3f}")
    progress.remove_task(task)
    seconds = time.perf_counter() - t0
    totals = torch.tensor([loss_sum.item(), float(seen)], dtype=torch.float64, device=engine.device)
    if info.world_size > 1:
        dist.all_reduce(totals)
        # Each rank's BatchNorm statistics saw only its shard; evaluate with rank 0's everywhere.
        for buffer in engine.model.buffers():
            dist.broadcast(buffer, src=0)
    images = totals[1].item()
    return {"train_loss": totals[0].item() / max(1.0, images), "lr": lr_used, "images_per_s": images / seconds}


@torch.no_grad()
def predict_logits(engine: Engine, loader: DataLoader, info: DistInfo) -> tuple[np.ndarray, np.ndarray]:
    """This rank's shard of the validation set, then the gathered, de-duplicated (index, logit) arrays.

    In fp32 whatever the training precision: the epoch is chosen on the probabilities its package will give
    (`alnus predict` and the study's predictions run in fp32), not on bf16 ones that rank some cases differently.
    """
    model = engine.eval_model()
    model.eval()
    indices, outputs = [], []
    for x, _, i in loader:
        logits = model(engine.prepare(x)).float()
        # With an auxiliary target the first output is the label's logit.
        outputs.append(logits[:, 0] if logits.ndim == 2 else logits)
        indices.append(i.to(engine.device))
    n = len(loader.dataset)  # type: ignore[arg-type]
    return gather_predictions(torch.cat(indices), torch.cat(outputs), n, info)


@dataclass
class Validation:
    """One epoch's validation: per image (index, target, probability), the loss, and the AUC at the study's level."""

    idx: np.ndarray
    y: np.ndarray
    probs: np.ndarray
    loss: float
    auc: float


def validate(
    engine: Engine, data: TrainData, info: DistInfo, aggregate: str, *, epoch: int, backbone: str
) -> Validation:
    """Predict the val images and score them: image-level loss, and the AUC over the val cases (`data.val_cases`)."""
    from alnus.stats import auc

    idx, logits = predict_logits(engine, data.val_loader, info)
    if not np.isfinite(logits).all():
        mixed = ", or set train.precision to fp32" if engine.precision.autocast_dtype is not None else ""
        raise TrainError(
            f"training of {backbone} diverged in epoch {epoch}: the validation outputs are not finite; lower "
            f"train.lr{mixed}"
        )
    y = data.val_ds.targets[idx]
    loss = float(
        torch.nn.functional.binary_cross_entropy_with_logits(torch.from_numpy(logits), torch.from_numpy(y).float())
    )
    probs = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    case_y, case_probs = aggregate_cases(data.val_cases[idx], y, probs, aggregate)
    return Validation(idx, y, probs, loss, float(auc(case_y, case_probs)))


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


class _Tracker:
    """TensorBoard and (when installed) MLflow, on rank 0 only."""

    def __init__(self, cfg: Config, model_dir: ModelFolder, backbone: str, start_epoch: int, enabled: bool) -> None:
        self.writer = None
        self.mlflow = None
        if not enabled:
            return
        if cfg.train.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a killed run wrote after its last checkpoint.
            purge = start_epoch + 1 if start_epoch else None
            self.writer = SummaryWriter(str(model_dir.tensorboard), purge_step=purge)
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


def _progress(console: Console, info: DistInfo) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[speed]} img/s  loss {task.fields[loss]}"),
        console=console,
        transient=True,
        disable=not (info.is_main and console.is_terminal),
    )


# ------------------------------------------------------------------------------------------------ the loop
def resumable_checkpoint(
    cfg: Config, run_dir: str | os.PathLike[str], backbone: str, *, resume: bool
) -> dict[str, Any] | None:
    """The `last.pt` to continue from (None: start afresh); refuse to overwrite it or to resume changed settings."""
    model_dir = RunFolder(run_dir).model(backbone)
    last_path = model_dir.last_checkpoint
    if not last_path.is_file():
        return None
    if not resume:
        raise TrainError(
            f"{last_path} exists: pass --resume to continue that training, or delete {model_dir.root} to start again"
        )
    ckpt = load_checkpoint(last_path)
    changed = settings_changes(ckpt["settings"], model_settings(cfg, run_dir, backbone))
    if changed:
        raise TrainError(
            f"cannot resume {last_path}: settings that change the result differ from the checkpoint's "
            f"({'; '.join(changed)}); restore them, start a new run under another name, or delete {model_dir.root} "
            "to train this model again"
        )
    return ckpt


def _record_settings(cfg: Config, model_dir: ModelFolder) -> None:
    """This model's own copy of the config and environment it trains with (the run's copies may change later)."""
    from alnus._hardware import environment_info

    atomic_write_text(model_dir.config, dump_config(cfg))
    atomic_write_text(model_dir.env, json.dumps(environment_info(), indent=2) + "\n")


def save_epoch(
    engine: Engine,
    state: TrainState,
    val: Validation,
    data: TrainData,
    model_dir: ModelFolder,
    *,
    improved: bool,
    settings: dict[str, Any],
) -> None:
    """Rank 0, after each epoch: `best.pt` and its val predictions when the epoch improved, then `last.pt` and
    the history (last: a kill in between resumes from the previous epoch, which writes both again)."""
    if improved:
        best = {"model": engine.eval_model().state_dict(), "epoch": state.epochs_done - 1, "val_auc": state.best_auc}
        save_checkpoint("best", {**best, "settings": settings}, model_dir.best_checkpoint)
        _write_predictions(
            data.val_ds.table, val.idx, val.y, val.probs, state.epochs_done, model_dir.val_predictions_best
        )
    save_checkpoint("last", state.checkpoint(engine, settings), model_dir.last_checkpoint)
    write_csv(pd.DataFrame(state.history, columns=list(HISTORY_COLUMNS)), model_dir.history)


def write_package(
    cfg: Config, engine: Engine, data: TrainData, state: TrainState, model_dir: ModelFolder, settings: dict[str, Any]
) -> None:
    """The model package from `best.pt`: weights and metadata, including the full training settings."""
    from alnus.data.seen import development_record, write_development_images
    from alnus.models.package import METADATA_FILE, save_package

    best = load_checkpoint(model_dir.best_checkpoint)
    final = copy.deepcopy(engine.model)
    final.load_state_dict(best["model"])
    if data.aux:
        from alnus.reader_target import narrow_head

        # The package predicts from the image alone: keep the label's output, drop the auxiliary ones.
        final.backbone.set_submodule(final.spec.classifier, narrow_head(final.classifier()))
    splits = pd.concat([data.train_table, data.val_table])
    digest = training_data_hash(splits)
    # The images it learned from, as hashes, so that prediction can say when it is asked about one of them; before
    # the metadata, which save_package writes last: a package cut short in between is incomplete, not unchecked.
    model_dir.package.mkdir(parents=True, exist_ok=True)
    # An earlier training's metadata must not stand beside the new hashes if this is cut short: the folder is then
    # no package ("train again"), never one whose check could be switched off by deleting a file said to be foreign.
    (model_dir.package / METADATA_FILE).unlink(missing_ok=True)
    seen = development_record(splits.to_dict("records"), digest, cfg.data.max_image_pixels)
    write_development_images(model_dir.package, seen)
    save_package(
        model_dir.package,
        final,
        {
            "preprocess": data.spec.to_dict(),
            "label_names": data.label_names,
            "positive_label": cfg.data.positive_label,
            "training_data_hash": digest,
            "weights_source": engine.model.weights_source,
            "best_epoch": state.best_epoch,
            "val_auc": state.best_auc,
            # `auc`: the epoch chosen by validation AUC; `last`: the last epoch (train.selection_metric).
            "selection": {
                "metric": "last" if cfg.train.selection_metric == "last" else "auc",
                "level": cfg.evaluate.level,
                "aggregate": cfg.evaluate.aggregate,
            },  # fmt: skip
            "run": cfg.name,
            "settings_hash": stable_hash(settings),
            # The chosen epoch's val predictions as written, so that `alnus cv` can tell a hand-edited table.
            "val_predictions_sha256": (
                file_sha256(model_dir.val_predictions_best) if model_dir.val_predictions_best.is_file() else None
            ),
            "training": training_record(cfg),
            "tta": list(cfg.preprocess.tta),
            "precision": {"name": engine.precision.name, "reason": engine.precision.reason},
        },
    )


def train_model(
    cfg: Config,
    run_dir: str | os.PathLike[str],
    backbone: str,
    *,
    resume: bool = False,
    console: Console | None = None,
) -> TrainResult:
    """Train one backbone on the run's `train` split, select on `val`, and write its model package.

    Writes `models/<backbone>/`: `config.yaml` and `env.json` (what this model trains with), `checkpoints/
    {last,best}.pt`, `history.csv`, `val_predictions_best.csv`, `tb/` (TensorBoard) and `model/` (the package).
    Works alone, on one GPU and under torchrun (DDP).

    Args:
        resume: continue from `checkpoints/last.pt` (refused when the settings that matter changed).
    """
    started = time.perf_counter()
    run, info, console, tc = RunFolder(run_dir), dist_info(), console or Console(), cfg.train
    model_dir, device = run.model(backbone), rank_device(tc.device, info)
    settings = model_settings(cfg, run.root, backbone)
    ckpt = resumable_checkpoint(cfg, run.root, backbone, resume=resume)
    seed_everything(tc.seed, deterministic=tc.deterministic)
    data = build_data(cfg, run, backbone, info, device)
    engine = build_engine(cfg, backbone, data, device)
    state = TrainState.restore(ckpt, engine, model_dir.last_checkpoint) if ckpt is not None else TrainState()
    for row in state.history:  # a checkpoint written before history.csv had the column
        row.setdefault("validated", engine.validated(int(row["epoch"])))
    if info.is_main:
        _record_settings(cfg, model_dir)
        what = f"resuming after epoch {state.epochs_done}" if ckpt is not None else "training"
        console.print(
            f"[bold]{escape(backbone)}[/bold]: {what} on {device} ({engine.precision.reason}); {len(data.train_ds)} "
            f"train / {len(data.val_ds)} val images at {data.spec.size} px, {info.world_size} process(es)",
            highlight=False,
        )
        for note in _start_notes(cfg, data):
            console.print(escape(note), highlight=False)
    tracker = _Tracker(cfg, model_dir, backbone, state.epochs_done, enabled=info.is_main)
    try:
        with _progress(console, info) as progress:
            for epoch in range(state.epochs_done, tc.epochs):
                if state.stopped:
                    break
                row, val, improved = run_epoch(cfg, engine, data, state, info, progress, epoch, backbone)
                if info.is_main:
                    save_epoch(engine, state, val, data, model_dir, improved=improved, settings=settings)
                    tracker.log(row)
                    _print_epoch(console, row, cfg, improved, stopped=state.stopped)
    finally:
        tracker.close()
    if engine.mixstyle is not None:
        engine.mixstyle.remove()  # training is over: no copy of the model carries the hooks on
    if info.is_main:
        write_package(cfg, engine, data, state, model_dir, settings)
        chosen = "last" if cfg.train.selection_metric == "last" else "best"
        console.print(
            f"[green]{chosen}[/green] epoch {state.best_epoch}, {cfg.evaluate.level}-level val AUC "
            f"{state.best_auc:.4f} -> {escape(str(model_dir.package))}",
            highlight=False,
        )
    if info.world_size > 1:
        dist.barrier()
    return TrainResult(
        backbone=backbone,
        model_dir=model_dir.root,
        package_dir=model_dir.package,
        best_epoch=state.best_epoch,
        best_val_auc=state.best_auc,
        epochs_run=len(state.history),
        stopped_early=state.stopped,
        seconds=time.perf_counter() - started,
        history=state.history,
    )


def run_epoch(
    cfg: Config,
    engine: Engine,
    data: TrainData,
    state: TrainState,
    info: DistInfo,
    progress: Progress,
    epoch: int,
    backbone: str,
) -> tuple[dict[str, Any], Validation, bool]:
    """Train epoch `epoch` (0-based) and validate it; returns its history row, its validation, whether it improved."""
    t0 = time.perf_counter()
    phase = engine.enter_phase(epoch, info)
    data.sampler.set_epoch(epoch)
    data.train_ds.set_epoch(epoch)
    trained = train_one_epoch(engine, data, info, progress, f"epoch {epoch + 1}/{cfg.train.epochs}")
    if engine.swa is not None and engine.selectable(epoch + 1):
        average_epoch(engine, data, info)
    val = validate(engine, data, info, cfg.evaluate.aggregate, epoch=epoch + 1, backbone=backbone)
    row = {"epoch": epoch + 1, "phase": phase, "val_loss": val.loss, "val_auc": val.auc, **trained}
    row["seconds"] = time.perf_counter() - t0
    row["validated"] = engine.validated(epoch + 1)
    tc = cfg.train
    improved = state.record(
        row,
        patience=tc.early_stopping_patience,
        epochs=tc.epochs,
        selectable=engine.selectable(epoch + 1),
        last=tc.selection_metric == "last",
    )
    return row, val, improved


@torch.no_grad()
def average_epoch(engine: Engine, data: TrainData, info: DistInfo) -> None:
    """Add this epoch's weights to the weight average, then give the average its own BatchNorm statistics: one
    training-mode pass over the training batches under the averaged weights, each layer's mean and variance averaged
    over the batches (torch's `update_bn`, momentum None), since the averaged weights' activations differ from those
    of any one epoch."""
    from torch.optim.swa_utils import update_bn

    engine.swa.update_parameters(engine.model)
    loader = ((engine.prepare(x),) for x, _, _ in data.train_loader)
    update_bn(loader, engine.swa)
    if info.world_size > 1:
        # Each rank saw its own shard of the training images: use rank 0's statistics everywhere.
        for buffer in engine.swa.module.buffers():
            dist.broadcast(buffer, src=0)


def _start_notes(cfg: Config, data: TrainData) -> list[str]:
    """What a training's settings change that its user should hear of before the first epoch."""
    from alnus.shape_target import ShapeTarget

    tc, notes = cfg.train, []
    if tc.swa_start is not None:
        notes.append(
            f"weights averaged over the epochs from epoch {tc.swa_start} on (train.swa_start): that average is "
            "validated and packaged, and earlier epochs are not selected"
        )
    if tc.weights == "none" and tc.head_epochs > 0:
        notes.append(
            f"random initialisation: every layer trains from epoch 1 (train.head_epochs {tc.head_epochs} applies to "
            "pretrained weights only)"
        )
    if tc.mixstyle is not None:
        notes.append(
            f"MixStyle on while training (train.mixstyle {tc.mixstyle}): the early feature maps' styles are mixed "
            "between the images of a batch"
        )
    for target in data.aux:
        if isinstance(target, ShapeTarget):
            notes.append(target.note)
    if data.aux:
        notes.append("the train loss below is the label's loss plus the auxiliary targets' weighted losses")
    if tc.aux_shape is not None and not cfg.preprocess.keep_aspect:
        notes.append(
            "preprocess.keep_aspect is false, so the lesion crop is stretched to a square and the network cannot see "
            "the orientation that train.aux_shape asks of it; set keep_aspect: true"
        )
    return notes


def _print_epoch(console: Console, row: dict[str, Any], cfg: Config, improved: bool, *, stopped: bool) -> None:
    level = cfg.evaluate.level
    # `*`: a new best validation AUC, the epoch kept so far; with selection_metric last every epoch is kept in turn,
    # so nothing is starred.
    star = improved and cfg.train.selection_metric != "last"
    console.print(
        f"epoch {row['epoch']:>3}/{cfg.train.epochs} [{row['phase']}]  train loss {row['train_loss']:.4f}  "
        f"val loss {row['val_loss']:.4f}  val AUC ({level}) {row['val_auc']:.4f}{' *' if star else '  '}  "
        f"lr {row['lr']:.2e}  {row['images_per_s']:.0f} img/s  {row['seconds']:.1f} s",
        highlight=False,
        markup=False,
    )
    if stopped:
        patience = cfg.train.early_stopping_patience
        console.print(f"early stop: no {level}-level val AUC gain for {patience} epochs", highlight=False)
