"""Typed study configuration: YAML plus dotted command-line overrides, checked key by key.

Unknown keys are errors (a typo must not silently fall back to a default). The resolved configuration
(paths made absolute, defaults filled in) is what a run folder stores as `config.yaml`; loading that file
again gives the same configuration.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import sys
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from alnus.errors import AlnusError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# The longest run name: its folder, `alnus cv`'s NAME_cvK and the hidden working names beside them stay within the
# 255 bytes a file name may have.
MAX_NAME = 200
# The backbones `alnus.models.registry` registers when it is imported. A config naming another one is refused
# before torch and timm are imported (seconds), unless code has registered backbones of its own by then.
BUILT_IN_BACKBONES = (
    "efficientnet_lite0",
    "efficientnet_lite1",
    "efficientnet_lite2",
    "inception_resnet_v2",
    "inception_v3",
    "resnet101",
    "resnet18",
    "tiny_cnn",
)


class ConfigError(AlnusError):
    """A configuration that cannot be used; the message names the file and the key."""


@dataclass
class DataConfig:
    """Where the manifest is and how it is validated and split (see `alnus.data.split`)."""

    manifest: str = ""
    labels: list[str] | None = None
    positive_label: str = "positive"
    external_sites: list[str] = field(default_factory=list)
    internal_test_frac: float = 0.1
    val_frac: float = 0.1
    seed: int = 0
    group_duplicates: bool = False
    drop_invalid: bool = False
    check_duplicates: bool = True
    # Decoded-size limit per image (8-bit pixels; a 16-bit pixel counts 2, RGB 3); null: alnus.data.images.MAX_PIXELS.
    max_image_pixels: int | None = None
    # K-fold cross-validation inside the development patients (`alnus cv`): val is fold `cv_fold` of `cv_folds` of
    # the patients outside internal_test, train the other folds; val_frac is then not used. null: one val split.
    cv_folds: int | None = None
    cv_fold: int = 0


@dataclass
class PreprocessConfig:
    """ROI crop and resize; `size: null` takes each backbone's native input size."""

    size: int | None = None
    roi: Literal["box", "mask", "whole"] = "whole"
    margin: float = 0.15
    keep_aspect: bool = True
    # Grey-level normalisation of the ROI crop before resizing (`alnus.data.grey`): none, stretch or equalize.
    grey: Literal["none", "stretch", "equalize"] = "none"
    # Resolution harmonisation: a ROI crop longer than this many pixels is first downsampled to it (aspect kept), so
    # crops from a finer-pixelled scanner reach the network with the grain of the development site's. null: off.
    max_crop: int | None = None
    # Test-time augmentation views (`alnus.data.tta.VIEWS`, e.g. [hflip]) averaged with the unaugmented input when the
    # packages predict; written into each model package. They change predictions, not the trained weights.
    tta: list[str] = field(default_factory=list)


@dataclass
class TrainConfig:
    """The training engine's settings (see `alnus.train`)."""

    weights: str = "imagenet"
    epochs: int = 30
    batch_size: int = 32
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 3e-4
    weight_decay: float = 1e-4
    momentum: float = 0.9
    warmup_epochs: float = 1.0
    head_epochs: int = 1
    # When the body unfreezes after the head-only epochs, the learning rate warms up again over this many epochs
    # (0: no second warm-up), so pretrained features are not hit at the peak rate by a head still settling.
    body_warmup_epochs: float = 1.0
    # The body's learning rate as a fraction of train.lr (the head keeps train.lr). 1.0 by default: the second
    # warm-up already spares the pretrained features the peak rate, and ultrasound is far enough from ImageNet that
    # the body has to move; lower it (e.g. 0.1) to keep the body closer to its pretrained weights.
    body_lr_factor: float = 1.0
    balance: Literal["weighted_loss", "sampler", "none"] = "weighted_loss"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    channels_last: Literal["auto"] | bool = "auto"
    grad_accum: int = 1
    early_stopping_patience: int | None = 10
    # Which epoch is packaged: `val_auc`, the one with the best validation AUC (early stopping watches it too);
    # `last`, the last epoch, never chosen on validation. Cross-validation (`alnus cv`) scores each fold with the
    # validation patients that chose its epoch, which leans optimistic; `last` (with early_stopping_patience null)
    # gives the fold AUCs of a configuration trained for a fixed number of epochs instead.
    selection_metric: Literal["val_auc", "last"] = "val_auc"
    num_workers: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    deterministic: bool = False
    # A `reader_*` column of BI-RADS categories taught as an ordinal auxiliary target while training
    # (`alnus.reader_target`); the packaged model still predicts from the image alone. null: none.
    aux_reader: str | None = None
    # The auxiliary loss's weight beside the label's loss.
    aux_weight: float = 0.3
    # The lesion's shape measured on its mask (orientation, solidity, circularity: `alnus.shape_target`) taught as
    # an auxiliary regression target, at this weight beside the label's loss; images without a mask add nothing.
    # The packaged model still predicts from the image alone. null: none.
    aux_shape: float | None = None
    # Exponential moving average of the weights (timm's ModelEmaV3, with warm-up): the average is validated,
    # selected and packaged. null: none; e.g. 0.99 averages over about a hundred optimiser steps.
    ema_decay: float | None = None
    # Stochastic weight averaging: from this epoch (1-based) on, the weights at the end of each epoch enter an
    # equal-weight average (torch.optim.swa_utils.AveragedModel) whose BatchNorm statistics are recomputed on the
    # training images; the average is validated, selected (among those epochs only) and packaged. null: none.
    swa_start: int | None = None
    # MixStyle (alnus.models.mixstyle): the probability, per early stage and batch, that the feature maps' per-image
    # channel statistics are mixed between images while training (e.g. 0.5). Prediction is unchanged. null: none.
    mixstyle: float | None = None
    # The settings of `alnus.data.augment.UltrasoundAugment` ({} = its defaults); null turns augmentation off.
    augment: dict[str, Any] | None = field(default_factory=dict)
    tensorboard: bool = True
    mlflow: Literal["auto"] | bool = "auto"


@dataclass
class EvaluateConfig:
    """How the operating threshold is frozen on validation and how a patient's images are aggregated."""

    threshold_rule: Literal["youden", "sensitivity", "specificity"] = "youden"
    threshold_target: float | None = None
    # The study's level: the threshold is frozen, results are reported and the best epoch is chosen at this level.
    level: Literal["patient", "study", "image"] = "patient"
    aggregate: Literal["mean", "max"] = "mean"
    # How `reader_*` columns are read: BI-RADS categories (positive call from `reader_positive_from`) or numbers.
    reader_scale: Literal["birads", "score"] = "birads"
    reader_positive_from: str = "4a"
    # With reader_scale: score, a reading >= this value is a positive call (None: no calls, AUC only).
    reader_score_threshold: float | None = None
    # Manifest columns whose values the report breaks the test results down by (`alnus.subgroups`), e.g. [Device].
    subgroups: list[str] = field(default_factory=list)


@dataclass
class Config:
    """One study: data, preprocessing, the backbones to train, training and evaluation settings."""

    name: str = ""
    runs_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    models: list[str] = field(default_factory=lambda: ["efficientnet_lite0"])
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

    @property
    def run_dir(self) -> Path:
        """The run folder, `runs_dir/name`."""
        return Path(self.runs_dir) / self.name

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON-ready values."""
        return dataclasses.asdict(self)


# Data settings that change neither the split nor the weights: a moved manifest (its contents count, through the
# data hash) or a raised decoding limit.
DATA_FREE_KEYS = frozenset({"manifest", "max_image_pixels"})
# Training settings that do not change the trained weights; a resumed run may change them freely.
RESUME_FREE_KEYS = frozenset({"num_workers", "tensorboard", "mlflow", "device"})


class _NoAliasLoader(yaml.SafeLoader):
    """YAML without anchors and aliases: a config needs none, and aliases nested in aliases ("billion laughs")
    expand to gigabytes before any key is checked."""

    def compose_node(self, parent: Any, index: Any) -> Any:  # noqa: ANN401 - PyYAML's own node types
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise ConfigError(f"YAML alias (*name) at line {mark.line + 1}: aliases are not allowed in a config")
        return super().compose_node(parent, index)


def safe_yaml(text: str) -> Any:  # noqa: ANN401 - any YAML value
    """Parse YAML text as plain values, refusing aliases (see `_NoAliasLoader`); ValueError for text nested too deeply
    to parse."""
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:
        raise ValueError("nested too deeply to read") from None


def parse_overrides(items: Iterable[str]) -> list[tuple[str, Any]]:
    """Parse `key.sub=value` strings; values are YAML scalars or flow collections (`[a, b]`, `null`, `3`)."""
    out = []
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not KEY=VALUE (e.g. --set train.epochs=3)")
        try:
            value = safe_yaml(text) if text.strip() else ""
        except (yaml.YAMLError, ValueError) as exc:  # ValueError: e.g. an integer over 4300 digits
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({exc})") from None
        out.append((key, value))
    return out


@dataclass(frozen=True)
class Source:
    """Where a config's values came from, for error messages: the file, or the command-line option that set a key."""

    file: str
    overrides: tuple[tuple[str, str], ...] = ()  # (dotted key, the option as the user typed it), in order

    def of(self, *keys: str) -> str:
        """The source of the value(s) an error is about (`train.epochs`; `train.augment[0]`; for a cross-field error,
        each key involved): the last option that set a key, a section above it or a key below it, else the file."""
        shown: list[str] = []
        for key in keys:
            for set_key, text in reversed(self.overrides):
                if _related(key, set_key):
                    if text not in shown:
                        shown.append(text)
                    break
        if not shown:
            return self.file
        if len(shown) < len(keys):  # another key involved came from the file
            return f"{self.file} with {', '.join(shown)}"
        return ", ".join(shown)


def _related(key: str, set_key: str) -> bool:
    """Whether setting `set_key` set or changed `key`: the same key, a section above it, or a key inside it."""
    if not key or key == set_key:
        return True
    return key.startswith((set_key + ".", set_key + "[")) or set_key.startswith(key + ".")


def override_texts(items: Iterable[str]) -> tuple[tuple[str, str], ...]:
    """Each `KEY=VALUE` override as (dotted key, `--set KEY=VALUE`), for `Source`."""
    return tuple((item.partition("=")[0].strip(), f"--set {item.strip()}") for item in items)


def apply_overrides(raw: Mapping[str, Any], overrides: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    """Return a copy of the raw YAML mapping with each dotted key set (sections are created as needed)."""
    out = json.loads(json.dumps(dict(raw), default=str))
    for key, value in overrides:
        node = out
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {key}: {'.'.join(parts[: depth + 1])} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return out


def load_config(
    path: str | os.PathLike[str], overrides: Sequence[str] = (), *, options: Sequence[tuple[str, str]] = ()
) -> Config:
    """Read a YAML config, apply `--set` overrides, resolve paths and check every key and value.

    `options`: overrides a command made from its own options, each as (`KEY=VALUE`, the option as the user typed it,
    e.g. `--model resnet18`), applied after `overrides`; an error about their key names the option.

    `data.manifest` is relative to the config file's folder (given with `--set`, to the current folder);
    `runs_dir` is relative to the current folder. Both are stored absolute in the result.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        raw = safe_yaml(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, ValueError) as exc:  # ValueError: e.g. an integer over 4300 digits
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path}: the top level must be a mapping of sections")
    items = [*overrides, *(item for item, _ in options)]
    sources = [*override_texts(overrides), *((item.partition("=")[0].strip(), shown) for item, shown in options)]
    parsed = parse_overrides(items)
    # A path given on the command line is relative to the current folder, as a shell user expects; only the
    # config file's own `data.manifest` is relative to the config file.
    parsed = [
        (key, os.path.abspath(value)) if key == "data.manifest" and isinstance(value, str) and value else (key, value)
        for key, value in parsed
    ]
    raw = apply_overrides(raw, parsed)
    raw.setdefault("name", path.stem)
    return config_from_dict(raw, base=path.parent, where=Source(str(path), tuple(sources)))


def read_resolved_config(path: str | os.PathLike[str]) -> Config:
    """The resolved config a run wrote (`runs/<name>/config.yaml`: paths absolute, no overrides), checked."""
    from alnus._io import FILE_NOT_FOUND, file_problem

    path = Path(path)
    problem = file_problem(path)
    if problem == FILE_NOT_FOUND:
        raise ConfigError(f"{path} not found: not a run folder's config (run `alnus study CONFIG` first)")
    if problem is not None:
        raise ConfigError(f"{path} {problem}: not a run folder's config")
    try:
        raw = safe_yaml(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise ConfigError(f"{path} cannot be read ({exc.strerror or exc}); check its permissions") from None
    except (yaml.YAMLError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{path} is not valid YAML ({exc}); run the study again") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return config_from_dict(raw, where=str(path))


def config_from_dict(raw: Mapping[str, Any], *, base: Path = Path("."), where: str | Source = "config") -> Config:
    """Build and check a `Config` from plain values; relative `data.manifest` is resolved against `base`."""
    if isinstance(where, str):
        where = Source(where)
    cfg = _build(Config, raw, "", where)
    if not cfg.data.manifest:
        raise ConfigError(
            f"{where.of('data.manifest')}: data.manifest is required (the manifest CSV, relative to the config file)"
        )
    cfg.data.manifest = os.path.abspath(base / cfg.data.manifest)
    cfg.runs_dir = os.path.abspath(cfg.runs_dir)
    _check(cfg, where)
    return cfg


def dump_config(cfg: Config) -> str:
    """The configuration as YAML (what `config.yaml` in the run folder holds)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=False)


def stable_hash(value: Any) -> str:
    """SHA-256 of a JSON-ready value with sorted keys (config sections, metadata)."""
    blob = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def data_settings(cfg: Config) -> dict[str, Any]:
    """The data settings that decide the split (the run's data hash, `alnus.study.data_hash`) and the weights.

    The manifest's path is left out: a moved manifest trains the same model; its contents count, through the run's
    data hash. Settings added later (`DATA_ADDED`) are left out while at their defaults.
    """
    data = {k: v for k, v in dataclasses.asdict(cfg.data).items() if k not in DATA_FREE_KEYS}
    _drop_defaults(data, DATA_ADDED)
    return data


def training_settings(cfg: Config) -> dict[str, Any]:
    """The settings that change trained weights (data, preprocessing, training), for resume checks."""
    train = {k: v for k, v in dataclasses.asdict(cfg.train).items() if k not in RESUME_FREE_KEYS}
    data = data_settings(cfg)
    # TTA views act at prediction only: a package whose views differ is packaged again, not retrained
    # (`alnus.study.trained_package`), and a checkpoint resumes whatever the views.
    preprocess = {k: v for k, v in dataclasses.asdict(cfg.preprocess).items() if k != "tta"}
    _drop_defaults(preprocess, PREPROCESS_ADDED)
    _drop_defaults(train, TRAIN_ADDED)
    return {
        "data": data,
        "preprocess": preprocess,
        "train": train,
    }


# Settings added after models were trained and packaged: left out of the training settings while they keep their
# default (off), so models trained before they existed keep their settings hash and are reused, not retrained.
PREPROCESS_ADDED: dict[str, Any] = {"grey": "none", "max_crop": None}
DATA_ADDED: dict[str, Any] = {"cv_folds": None, "cv_fold": 0}
TRAIN_ADDED: dict[str, Any] = {
    "aux_reader": None,
    "aux_weight": 0.3,
    "aux_shape": None,
    "ema_decay": None,
    "swa_start": None,
    "mixstyle": None,
}


def _drop_defaults(section: dict[str, Any], added: Mapping[str, Any]) -> None:
    for key, default in added.items():
        if section.get(key) == default:
            section.pop(key, None)


def _build(cls: type, raw: Any, prefix: str, where: Source) -> Any:
    label = prefix.rstrip(".") or "the top level"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where.of(prefix.rstrip('.'))}: {label} must be a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = [str(k) for k in raw if k not in fields]
    if unknown:
        raise ConfigError(
            f"{where.of(prefix + unknown[0])}: unknown key(s) {', '.join(prefix + k for k in unknown)}; "
            f"known keys{' in ' + prefix.rstrip('.') if prefix else ''}: {', '.join(sorted(fields))}"
        )
    values = {name: _coerce(value, hints[name], prefix + name, where) for name, value in raw.items()}
    return cls(**values)


def _coerce(value: Any, tp: Any, key: str, where: Source) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, {} if value is None else value, key + ".", where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, key, where)
            except ConfigError as exc:
                errors.append(str(exc).rsplit(": ", 1)[-1])
        raise ConfigError(f"{where.of(key)}: {key} = {value!r} is not valid ({'; or '.join(errors)})")
    if origin is Literal:
        if value in args and type(value) in {type(a) for a in args}:
            return value
        raise ConfigError(f"{where.of(key)}: {key} = {value!r}: expected one of {', '.join(map(repr, args))}")
    if origin is list:
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise ConfigError(f"{where.of(key)}: {key} = {value!r}: expected a list, e.g. [a, b]")
        return [_coerce(v, args[0], f"{key}[{i}]", where) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where.of(key)}: {key} = {value!r}: expected a mapping of keys to values")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where.of(key)}: {key} = {value!r}: expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where.of(key)}: {key} = {value!r}: expected a whole number")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            # YAML 1.1 reads `1e-3` (no dot) as a string; accept it as the number it was meant to be.
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is None:
            raise ConfigError(f"{where.of(key)}: {key} = {value!r}: expected a number")
        if not math.isfinite(number):
            raise ConfigError(f"{where.of(key)}: {key} = {value!r}: expected a finite number (not NaN or infinity)")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where.of(key)}: {key} = {value!r}: expected text")
    raise TypeError(f"unsupported config type {tp!r} for {key}")


def _check(cfg: Config, where: Source) -> None:
    """Range and cross-field checks; each message names the key. The checks that need torch and timm (backbones,
    weights, crops, TTA views) come last, so that any other mistake is reported without waiting for their import."""

    def fail(key: str, why: str, *also: str) -> None:
        """Refuse `key`'s value; `also`: the other keys a cross-field rule read (their sources are named too)."""
        raise ConfigError(f"{where.of(key, *also)}: {key}: {why}")

    if not _NAME.match(cfg.name):
        fail("name", f"{cfg.name!r} must be a folder name (letters, digits, '.', '_', '-')")
    if len(cfg.name) > MAX_NAME:
        fail("name", f"{len(cfg.name)} characters is too long for a folder name with room for `alnus cv`'s "
                     f"suffixes; use at most {MAX_NAME}")  # fmt: skip
    data, pre, train, ev = cfg.data, cfg.preprocess, cfg.train, cfg.evaluate
    for key, frac in (("data.internal_test_frac", data.internal_test_frac), ("data.val_frac", data.val_frac)):
        if not 0 <= frac < 1:
            fail(key, f"{frac} must be at least 0 and below 1")
    if data.max_image_pixels is not None and data.max_image_pixels < 1:
        fail("data.max_image_pixels", f"{data.max_image_pixels} must be a positive number of pixels, or null")
    if data.val_frac == 0 and data.cv_folds is None:
        fail("data.val_frac", "training needs a validation set for model selection; use e.g. 0.1", "data.cv_folds")
    if data.cv_folds is not None:
        if data.cv_folds < 2:
            fail("data.cv_folds", f"{data.cv_folds} must be at least 2 (e.g. 5), or null for one val split")
        if not 0 <= data.cv_fold < data.cv_folds:
            fail(
                "data.cv_fold",
                f"{data.cv_fold} must be in 0..{data.cv_folds - 1} (data.cv_folds is {data.cv_folds})",
                "data.cv_folds",
            )
    elif data.cv_fold != 0:
        fail("data.cv_fold", f"{data.cv_fold} needs data.cv_folds (the number of folds); set both, or leave it at 0")
    if data.labels is not None:
        if len(set(data.labels)) != len(data.labels) or len(data.labels) != 2:
            fail("data.labels", f"{data.labels} must list exactly two distinct labels (negative, positive)")
        if data.positive_label not in data.labels:
            fail(
                "data.positive_label", f"{data.positive_label!r} is not one of data.labels {data.labels}", "data.labels"
            )
    if not cfg.models:
        fail("models", "list at least one backbone, e.g. [efficientnet_lite0]")
    if len(set(cfg.models)) != len(cfg.models):
        fail("models", f"{cfg.models} lists a backbone twice")
    if "alnus.models.registry" not in sys.modules:
        for name in cfg.models:
            if name not in BUILT_IN_BACKBONES:
                fail("models", f"unknown backbone {name!r}; choose one of: {', '.join(BUILT_IN_BACKBONES)}")
    if pre.size is not None and pre.size < 1:
        fail("preprocess.size", f"{pre.size} must be a positive number of pixels, or null")
    if not 0 <= pre.margin <= 2:
        fail("preprocess.margin", f"{pre.margin} must be in 0..2 (a fraction of the box added on each side)")
    for key in ("epochs", "batch_size", "grad_accum"):
        if getattr(train, key) < 1:
            fail(f"train.{key}", f"{getattr(train, key)} must be at least 1")
    for key in ("lr", "weight_decay", "momentum", "warmup_epochs", "body_warmup_epochs", "body_lr_factor"):
        positive = key in ("lr", "body_lr_factor")
        if getattr(train, key) < 0 or (positive and getattr(train, key) == 0):
            fail(f"train.{key}", f"{getattr(train, key)} must be {'positive' if positive else 'at least 0'}")
    if train.warmup_epochs > train.epochs:
        fail(
            "train.warmup_epochs",
            f"{train.warmup_epochs} must not exceed train.epochs ({train.epochs})",
            "train.epochs",
        )
    if not 0 <= train.head_epochs <= train.epochs:
        fail("train.head_epochs", f"{train.head_epochs} must be in 0..train.epochs ({train.epochs})", "train.epochs")
    if train.early_stopping_patience is not None and train.early_stopping_patience < 1:
        fail("train.early_stopping_patience", "must be at least 1, or null to train every epoch")
    if train.selection_metric == "last" and train.early_stopping_patience is not None:
        fail(
            "train.selection_metric",
            "last packages the last epoch, but early stopping would end training on the validation AUC: set "
            "train.early_stopping_patience: null",
            "train.early_stopping_patience",
        )
    if train.aux_weight <= 0:
        fail("train.aux_weight", f"{train.aux_weight} must be positive")
    if train.aux_shape is not None and not train.aux_shape > 0:
        fail("train.aux_shape", f"{train.aux_shape} must be positive (the shape loss's weight, e.g. 0.3), or null")
    if train.aux_reader is not None and not str(train.aux_reader).strip():
        fail("train.aux_reader", "must name a reader column (e.g. reader_birads), or be null")
    if train.ema_decay is not None and not 0 < train.ema_decay < 1:
        fail("train.ema_decay", f"{train.ema_decay} must be in (0, 1), e.g. 0.99, or null")
    if train.swa_start is not None:
        if not 1 <= train.swa_start <= train.epochs:
            fail(
                "train.swa_start",
                f"{train.swa_start} must be an epoch in 1..train.epochs ({train.epochs}), or null",
                "train.epochs",
            )
        if train.weights != "none" and train.swa_start <= train.head_epochs:
            fail(
                "train.swa_start",
                f"{train.swa_start} falls in the head-only epochs (train.head_epochs {train.head_epochs}), whose "
                f"frozen body would enter the average: start it after them, e.g. {train.head_epochs + 1}",
                "train.head_epochs",
                "train.weights",
            )
        if train.ema_decay is not None:
            fail(
                "train.swa_start",
                "averages the weights once: set train.ema_decay or train.swa_start, not both",
                "train.ema_decay",
            )
    if train.mixstyle is not None and not 0 < train.mixstyle <= 1:
        fail("train.mixstyle", f"{train.mixstyle} must be a probability in (0, 1], e.g. 0.5, or null")
    if train.num_workers < 0:
        fail("train.num_workers", f"{train.num_workers} must be at least 0")
    if train.augment is not None:
        from alnus.data.augment import UltrasoundAugment

        try:
            UltrasoundAugment.from_config(train.augment)
        except (AlnusError, TypeError, ValueError) as exc:
            fail("train.augment", str(exc))
    if ev.threshold_rule in ("sensitivity", "specificity"):
        if ev.threshold_target is None or not 0 < ev.threshold_target < 1:
            fail(
                "evaluate.threshold_target",
                f"threshold_rule {ev.threshold_rule!r} needs a target in (0, 1), e.g. 0.9",
                "evaluate.threshold_rule",
            )
    _check_with_libraries(cfg, where, fail)


def _check_with_libraries(cfg: Config, where: Source, fail: Callable[..., None]) -> None:
    """The checks of `_check` that import torch and timm: backbone names and input sizes, weights, crops, TTA."""
    from alnus.data.dataset import MIN_CROP_LIMIT
    from alnus.data.tta import TtaError, check_views
    from alnus.models import get_spec
    from alnus.models.weights import WeightsError, parse_weights

    pre, train = cfg.preprocess, cfg.train
    for name in cfg.models:
        try:
            spec = get_spec(name)
        except AlnusError as exc:
            fail("models", str(exc))
        if pre.size is not None and pre.size < spec.min_input_size:
            fail("preprocess.size", f"{pre.size} is below {name}'s minimum input size {spec.min_input_size}", "models")
    if pre.max_crop is not None and (isinstance(pre.max_crop, bool) or pre.max_crop < MIN_CROP_LIMIT):
        fail("preprocess.max_crop", f"{pre.max_crop} must be a whole number of pixels >= {MIN_CROP_LIMIT}, or null")
    try:
        check_views(pre.tta, f"{where.of('preprocess.tta')}: preprocess.tta")
    except TtaError as exc:
        raise ConfigError(str(exc)) from None
    try:
        parse_weights(train.weights)
    except WeightsError as exc:
        fail("train.weights", str(exc))
