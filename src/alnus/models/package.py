"""The model package: trained weights (safetensors) plus the clinical metadata that travels with them.

As in torchxrayvision, the package holds everything predict/serve need to reproduce the study's inputs and
calls: backbone, preprocessing (size, ROI policy), label names, positive class and, once evaluation has
frozen it on validation, the operating point (`alnus.operating_point`: the threshold with its rule, level and
aggregation), set once and changed only by an explicit re-freeze that `threshold_history` records.
`metadata.json` records the SHA-256 of the weights file, so a weights file and a metadata file from different
trainings are refused; every value predict needs is checked when the file is read, not when it is first used.
Exports of the network (`alnus.export`: `model.onnx`, `model-int8.onnx`) are recorded under `exports` with their
own SHA-256, the weights they were made from and their parity check; each kind has one fixed file name.

A package may list test-time augmentation views (`tta`, `alnus.data.tta`): its probability is then the mean over the
unaugmented input and those views. An *ensemble* package (`"kind": "ensemble"`, built by `alnus.ensemble`) holds no
weights of its own: it lists its members, complete single-network packages copied into `members/<i>/`, and its
probability is the mean of theirs. Its `weights_sha256` is the SHA-256 of the members' weights digests (one per line,
in order), so every check that compares weights works for it unchanged. `load_members` checks each member (fixed
folder names, no symbolic links, no nesting, the weights and facts the ensemble recorded) before anything is loaded.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import functools
import importlib.metadata
import json
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from alnus._io import atomic_path, atomic_write_text, file_sha256
from alnus.data.tta import TtaError, check_views
from alnus.errors import AlnusError
from alnus.models.factory import create_model
from alnus.models.registry import UltrasoundNet
from alnus.operating_point import OperatingPointError, check_operating_point, rule_name
from alnus.reader_rule import MAX_HISTORY, ReaderRuleError, check_reader_rule

# A package's metadata is a few kB (its training settings included); anything far larger is not one of ours.
MAX_METADATA_BYTES = 4 * 1024 * 1024
# The largest network input a package may ask for (pixels per side); the registry's backbones use 224-299.
MAX_INPUT_SIZE = 4096
FORMAT = "alnus-model"
# 1: `threshold` a number with its record in `threshold_selection`; 2: `threshold` the record itself; 3: a package an
# older alnus would misread (TTA views, or an ensemble). The newest is read; a package is written with the oldest
# version that describes it (`format_version_of`), so a plain package stays readable by older alnus.
FORMAT_VERSION = 3
BASE_FORMAT_VERSION = 2
# `kind` of an ensemble package (a single network's package has no `kind`, or "model").
ENSEMBLE = "ensemble"
MEMBERS_DIR = "members"
# An ensemble's members; each is loaded in memory at once, so the number is kept modest.
MAX_MEMBERS = 16
# What an ensemble records of each member (and checks against the member's own metadata.json when loading).
MEMBER_KEYS = ("folder", "backbone", "weights_sha256", "training_data_hash", "source", "preprocess")
WEIGHTS_FILE = "weights.safetensors"
METADATA_FILE = "metadata.json"
# What the caller states about the training; the rest (model facts, versions, date) is filled in here.
REQUIRED_KEYS = ("preprocess", "label_names", "positive_label")
# Exported networks (`alnus.export`) and the one file name each may have: metadata.json never names another path.
EXPORT_FILES = {"onnx": "model.onnx", "onnx-int8": "model-int8.onnx"}
# The ONNX operator-set versions an export may record (the exporters write 7 and later; 30 leaves room to grow).
OPSET_RANGE = (7, 30)


class PackageError(AlnusError):
    """A model package that cannot be written or loaded; the message names the folder and what to do."""


def _versions() -> dict[str, str | None]:
    import alnus

    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {"alnus": alnus.__version__, "torch": torch.__version__, "timm": version("timm")}


def save_package(folder: str | os.PathLike[str], model: UltrasoundNet, metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Write `weights.safetensors` and `metadata.json` into `folder`, each atomically; return the metadata.

    Args:
        model: the trained network (unwrapped from DDP); saved in fp32 on the CPU.
        metadata: at least `preprocess` (`PreprocessSpec.to_dict()`), `label_names`, `positive_label`;
            usually also `training_data_hash`, `weights_source`, `best_epoch`, `val_auc`, and `tta` (the
            test-time augmentation views, `alnus.data.tta`; default none). Backbone, input size, normalisation,
            versions, creation date and `threshold` (null until evaluation sets it) are added here.
    """
    from alnus.data.dataset import PreprocessSpec

    missing = [key for key in REQUIRED_KEYS if key not in metadata]
    if missing:
        raise PackageError(f"model package {folder}: metadata lacks {', '.join(missing)}")
    if metadata.get("kind", "model") != "model":
        raise PackageError(f"model package {folder}: save_package writes one network; kind must be 'model'")
    spec = PreprocessSpec.from_dict(metadata["preprocess"])
    if metadata["positive_label"] not in metadata["label_names"]:
        raise PackageError(
            f"model package {folder}: positive_label {metadata['positive_label']!r} is not one of "
            f"label_names {list(metadata['label_names'])}"
        )
    folder = Path(folder)
    views = _checked_tta(metadata.get("tta", []), folder / METADATA_FILE)
    folder.mkdir(parents=True, exist_ok=True)
    # Exports of earlier weights would be orphans beside the new metadata (which records none): removed.
    for name in EXPORT_FILES.values():
        (folder / name).unlink(missing_ok=True)
    # A CPU fp32 copy: the package must not depend on the device or precision training ran in.
    cpu_model = copy.deepcopy(model).float().cpu().to(memory_format=torch.contiguous_format)
    with atomic_path(folder / WEIGHTS_FILE) as tmp:
        save_model(cpu_model, str(tmp))
    net_spec = model.spec
    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": BASE_FORMAT_VERSION,
        "backbone": net_spec.name,
        "in_chans_mode": model.in_chans_mode,
        "input_size": spec.size,
        "normalisation": {"mean": list(net_spec.mean), "std": list(net_spec.std), "scale": "x / 255"},
        "threshold": None,
        "threshold_history": [],
        "reader_rule": None,
        "exports": {},
        "tta": [],
        "weights_source": getattr(model, "weights_source", "none"),
        **dict(metadata),
        "weights_sha256": file_sha256(folder / WEIGHTS_FILE),
        "versions": _versions(),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    meta["tta"] = views
    meta["format_version"] = format_version_of(meta)
    # Metadata last: a package whose metadata names other weights is refused at load (weights_sha256).
    atomic_write_text(folder / METADATA_FILE, json.dumps(meta, indent=2, default=str) + "\n")
    return meta


def read_metadata(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check `metadata.json` of a package: format, version, required keys and the values predict uses.

    A version-1 package (threshold as a bare number beside `threshold_selection`) is returned in the current form.
    """
    path = Path(folder) / METADATA_FILE
    if Path(folder).is_file():
        # A package's own file (e.g. .../model/metadata.json) names its folder; any other file is no package.
        own = Path(folder).name in (METADATA_FILE, WEIGHTS_FILE, "README.md", *EXPORT_FILES.values())
        hint = f"pass its folder, {Path(folder).parent}" if own else "pass a package folder (one with metadata.json)"
        raise PackageError(f"{folder} is a file, not a model package folder; {hint}")
    if not Path(folder).is_dir():
        if Path(folder).is_symlink():  # a link to nothing, or one of a loop
            raise PackageError(f"{folder} is a symbolic link that leads to no folder (its target is missing, or the "
                               "links go round in a loop); pass the package folder itself")  # fmt: skip
        raise PackageError(f"model package {folder} not found; train a model first (alnus train CONFIG)")
    _refuse_file_link(path)  # first: a link to nothing is named as a link, not as a missing file
    if not path.is_file():
        inner = Path(folder) / "model" / METADATA_FILE
        if inner.is_file():
            raise PackageError(f"{folder} is a model's folder, not its package; pass {inner.parent}")
        found = sorted(p.parent for p in Path(folder).glob(f"models/*/model/{METADATA_FILE}"))
        if found:
            raise PackageError(
                f"{folder} is a run folder, not a model package; pass one of: {', '.join(map(str, found))}"
            )
        raise PackageError(f"model package {folder} has no {METADATA_FILE}; it is incomplete: train again")
    if path.stat().st_size > MAX_METADATA_BYTES:
        raise PackageError(
            f"{path} is {path.stat().st_size:,} bytes, far more than a package's metadata; it is damaged or not ours"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_without_repeats)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        # ValueError covers JSONDecodeError, a key given twice and Python's limit on the digits of an integer;
        # RecursionError a crafted nesting depth.
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:200]
        raise PackageError(f"{path} is not valid JSON ({reason}); the package is damaged: train again") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise PackageError(f'{path} is not an alnus model package (no "format": "{FORMAT}")')
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise PackageError(f"{path}: format_version = {version!r} is not a package format version; it is damaged")
    if version > FORMAT_VERSION:
        raise PackageError(
            f"{path}: package format version {version!r} is newer than this alnus reads ({FORMAT_VERSION}); "
            "upgrade alnus"
        )
    kind = meta.get("kind", "model")
    if kind == ENSEMBLE:
        return _read_ensemble(meta, path)
    if kind != "model":
        raise PackageError(f"{path}: kind = {kind!r} is neither 'model' nor '{ENSEMBLE}'; the package is damaged")
    missing = [k for k in ("backbone", "weights_sha256", *REQUIRED_KEYS) if k not in meta]
    if missing:
        raise PackageError(f"{path} lacks {', '.join(missing)}; the package is damaged: train again")
    if version == 1:
        meta = _from_version_1(meta, path)
    _check_model_keys(meta, path)
    _check_preprocess(meta["preprocess"], path)
    _check_against_training(meta, path)
    _check_common(meta, path)
    meta["exports"] = _checked_exports(meta.get("exports"), path)
    _check_adaptation(meta.get("adaptation"), path)
    return meta


# What an adapted package's site may be called (`alnus adapt --site`; it is written into the model card).
SITE_NAME = re.compile(r"[\w .,()/+-]{1,80}")


def _check_adaptation(record: object, path: Path) -> None:
    """The record `alnus adapt` writes (absent in a package that was not adapted): what the notes and service show."""
    if record is None:
        return
    if not isinstance(record, dict):
        raise PackageError(f"{path}: adaptation must be an object (written by `alnus adapt`); it is damaged")
    site = record.get("site", "")
    if not _is_count(record.get("n_images")) or not isinstance(site, str) or (site and not SITE_NAME.fullmatch(site)):
        raise PackageError(
            f"{path}: adaptation.n_images must be a count and adaptation.site a one-line name; the package is "
            "damaged: adapt again (`alnus adapt`)"
        )
    if not _is_sha256(record.get("images_sha256")) or not _is_sha256(record.get("source_weights_sha256")):
        raise PackageError(
            f"{path}: adaptation.images_sha256 or source_weights_sha256 is not a SHA-256; the package is damaged: "
            "adapt again"
        )
    texts = [record.get(key, "") for key in ("method", "source_package", "date", "images_list")]
    skipped = record.get("n_skipped", 0)
    if not (_is_count(skipped) or (skipped == 0 and type(skipped) is int)) or not all(_is_line(t) for t in texts):
        raise PackageError(
            f"{path}: adaptation.n_skipped must be a count and its method, source_package, date and images_list "
            "one line of text each; the package is damaged: adapt again (`alnus adapt`)"
        )
    if record.get("source_threshold") is not None:
        try:
            record["source_threshold"] = check_operating_point(record["source_threshold"], f"{path}: adaptation")
        except OperatingPointError as exc:
            raise PackageError(f"{exc} The package is damaged: adapt again.") from None


def _is_line(value: object) -> bool:
    """One line of printable text of reasonable length (a path, a date), safe to show in notes and the service."""
    return isinstance(value, str) and len(value) <= 4096 and value.isprintable()


def _check_common(meta: dict[str, Any], path: Path) -> None:
    """What both kinds hold: the operating point, its history and the TTA views (checked and normalised in place)."""
    meta["threshold"] = _checked_threshold(meta.get("threshold"), path)
    if not isinstance(meta.setdefault("threshold_history", []), list):
        raise PackageError(f"{path}: threshold_history must be a list; {_FIX_THRESHOLD}")
    meta["tta"] = _checked_tta(meta.get("tta"), path)
    try:
        meta["reader_rule"] = check_reader_rule(meta.get("reader_rule"), str(path))
    except ReaderRuleError as exc:
        raise PackageError(str(exc)) from None


def _checked_tta(value: object, path: Path) -> list[str]:
    """The package's TTA views (`alnus.data.tta`); absent (older packages) means none."""
    try:
        return check_views(value, f"{path}: tta")
    except TtaError as exc:
        raise PackageError(f"{exc}. Correct tta in metadata.json (or set it to []), then predict again.") from None


def format_version_of(meta: Mapping[str, Any]) -> int:
    """The package format version that describes `meta`: 3 when an older alnus would misread it (TTA views, an
    ensemble, grey-level normalisation, a crop limit), else 2."""
    preprocess = meta.get("preprocess")
    newer = isinstance(preprocess, Mapping) and (
        preprocess.get("grey", "none") != "none" or preprocess.get("max_crop") is not None
    )
    return FORMAT_VERSION if meta.get("kind") == ENSEMBLE or meta.get("tta") or newer else BASE_FORMAT_VERSION


def is_ensemble(meta: Mapping[str, Any]) -> bool:
    """Whether a package's metadata (from `read_metadata`) describes an ensemble."""
    return meta.get("kind") == ENSEMBLE


def kept_last_epoch(meta: Mapping[str, Any]) -> bool:
    """Whether a package's metadata says it kept its last epoch (`train.selection_metric: last`) rather than the
    epoch with the best validation AUC."""
    selection = meta.get("selection")
    return isinstance(selection, Mapping) and selection.get("metric") == "last"


def ensemble_digest(digests: Sequence[str]) -> str:
    """An ensemble's `weights_sha256`: the SHA-256 of its members' weights digests, one per line, in order."""
    import hashlib

    return hashlib.sha256("\n".join(digests).encode("ascii")).hexdigest()


def ensemble_name(backbones: Sequence[str]) -> str:
    """The display name of an ensemble, e.g. `ensemble of 3: efficientnet_lite0 x2, efficientnet_lite2`."""
    counts: dict[str, int] = {}
    for name in backbones:
        counts[name] = counts.get(name, 0) + 1
    parts = [name if n == 1 else f"{name} x{n}" for name, n in counts.items()]
    return f"ensemble of {len(backbones)}: {', '.join(parts)}"


def preprocess_of(meta: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The preprocessing (`PreprocessSpec.to_dict()`) of each network of a package: one for a single network, one
    per member for an ensemble."""
    if is_ensemble(meta):
        return [dict(member["preprocess"]) for member in meta["members"]]
    return [dict(meta["preprocess"])]


def _read_ensemble(meta: dict[str, Any], path: Path) -> dict[str, Any]:
    """Check an ensemble's metadata: labels, member records (fixed folders, facts of the right types), its digest."""
    required = ("backbone", "weights_sha256", "label_names", "positive_label", "members", "training_data_hash")
    missing = [k for k in required if k not in meta]
    if missing:
        raise PackageError(
            f"{path} lacks {', '.join(missing)}; the ensemble is damaged: build it again (alnus ensemble)"
        )
    _check_model_keys(meta, path)
    digest = meta["training_data_hash"]
    if not isinstance(digest, str) or not digest:
        raise PackageError(
            f"{path}: training_data_hash = {digest!r} is not the hash of the training data its members were checked "
            "against; the ensemble is damaged: build it again (alnus ensemble)"
        )
    members = meta["members"]
    if not isinstance(members, list) or not 1 <= len(members) <= MAX_MEMBERS:
        raise PackageError(
            f"{path}: members must list 1 to {MAX_MEMBERS} member records; the ensemble is damaged: build it again"
        )
    for i, record in enumerate(members, start=1):
        where = f"{path}: members[{i}]"
        if not isinstance(record, dict):
            raise PackageError(f"{where} is not an object; the ensemble is damaged: build it again")
        lacking = [k for k in MEMBER_KEYS if k not in record]
        if lacking:
            raise PackageError(f"{where} lacks {', '.join(lacking)}; the ensemble is damaged: build it again")
        if record["folder"] != f"{MEMBERS_DIR}/{i}":
            raise PackageError(
                f"{where}.folder = {record['folder']!r}; member {i} lives in {MEMBERS_DIR}/{i} inside the package "
                "(member folders are fixed: metadata.json never names a path). Build the ensemble again"
            )
        if not isinstance(record["backbone"], str) or not record["backbone"]:
            raise PackageError(f"{where}.backbone = {record['backbone']!r} is not a backbone name; build it again")
        if not _is_sha256(record["weights_sha256"]):
            raise PackageError(f"{where}.weights_sha256 is not a SHA-256 hex digest; build the ensemble again")
        if not isinstance(record["training_data_hash"], str) or not isinstance(record["source"], str):
            raise PackageError(f"{where}: training_data_hash and source must be text; build the ensemble again")
        # Every member was trained on the patients the ensemble's hash names (the build checks it against the run).
        if record["training_data_hash"] != digest:
            raise PackageError(
                f"{where}.training_data_hash = {record['training_data_hash'][:12]}... differs from the ensemble's "
                f"({digest[:12]}...): that member was trained on other patients, who may include this run's "
                "validation or test patients. Build the ensemble again from this run's packages (alnus ensemble)"
            )
        # A network listed twice only weighs it twice; the build refuses it, so a package that has it was edited.
        earlier = next(
            (j for j, m in enumerate(members[: i - 1], start=1) if m["weights_sha256"] == record["weights_sha256"]),
            None,
        )
        if earlier is not None:
            raise PackageError(
                f"{where} has the same weights as members[{earlier}] (a network listed twice weighs it twice); the "
                "ensemble was edited by hand: build it again (alnus ensemble) with each network once"
            )
        _check_preprocess(record["preprocess"], path, key=f"members[{i}].preprocess")
    if meta["weights_sha256"] != ensemble_digest([m["weights_sha256"] for m in members]):
        raise PackageError(
            f"{path}: weights_sha256 is not the digest of its members' weights (members were changed by hand); "
            "build the ensemble again"
        )
    if meta.get("exports"):
        raise PackageError(
            f"{path}: exports = {meta['exports']!r}; an ensemble has no exports of its own (each member's are in "
            f"{MEMBERS_DIR}/<i>/metadata.json): delete exports from metadata.json"
        )
    meta["exports"] = {}
    _check_common(meta, path)
    _check_adaptation(meta.get("adaptation"), path)
    return meta


_FIX_THRESHOLD = (
    "correct it in metadata.json, or set threshold to null and run `alnus evaluate RUN` to freeze it on validation "
    "again"
)


def _from_version_1(meta: dict[str, Any], path: Path) -> dict[str, Any]:
    """Version 1 kept the number in `threshold` and how it was chosen in `threshold_selection`: merge them."""
    meta = dict(meta)
    value = meta.get("threshold")
    selection = meta.pop("threshold_selection", None)
    if value is not None:
        if not isinstance(selection, dict):
            raise PackageError(
                f"{path}: threshold {value!r} has no threshold_selection saying how it was chosen (rule, level, "
                f"aggregate), so it cannot be applied the way it was frozen; {_FIX_THRESHOLD}"
            )
        frozen = {"frozen_on": "val", "frozen_at": selection.get("frozen"), **selection, "value": value}
        frozen.pop("frozen", None)
        meta["threshold"] = frozen
    meta["format_version"] = BASE_FORMAT_VERSION
    return meta


def _check_model_keys(meta: dict[str, Any], path: Path) -> None:
    """Backbone, weights hash and labels: present and of the types predict relies on."""
    if not isinstance(meta["backbone"], str) or not meta["backbone"]:
        raise PackageError(f"{path}: backbone = {meta['backbone']!r} is not a backbone name; the package is damaged")
    sha = meta["weights_sha256"]
    if not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise PackageError(f"{path}: weights_sha256 = {sha!r} is not a SHA-256 hex digest; the package is damaged")
    names = meta["label_names"]
    if (
        not isinstance(names, list)
        or len(names) < 2
        or not all(isinstance(n, str) and n for n in names)
        or len(set(names)) != len(names)
    ):
        raise PackageError(
            f"{path}: label_names = {names!r} must list the two (or more) distinct class names; the package is damaged"
        )
    if meta["positive_label"] not in names:
        raise PackageError(
            f"{path}: positive_label = {meta['positive_label']!r} is not one of label_names {names}; "
            "the package is damaged"
        )


def _refuse_file_link(path: Path) -> None:
    """A package's metadata and weights are plain files inside its folder, as an ensemble's members are: a symbolic
    link could lead anywhere (an attack review: a plain package took links that ensembles and the service refuse)."""
    if path.is_symlink():
        raise PackageError(
            f"{path} is a symbolic link; a model package's files are plain files inside its folder (nothing is read "
            f"from elsewhere): copy the package without links (cp -rL {path.parent} NEW_FOLDER)"
        )


def _without_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are each given once: with a key given twice, JSON keeps the last, so an appended
    `"positive_label": ...` would quietly replace the one written by training."""
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"the key {key[:80]!r} is given twice")
        seen[key] = value
    return seen


def _check_against_training(meta: Mapping[str, Any], path: Path) -> None:
    """The labels and preprocessing a package predicts with must be the ones it was trained with, as its training
    record says (where it has one): an edited `positive_label` would turn every call round, an edited `preprocess`
    feed the network inputs it never saw, and either predict wrong quietly."""
    training = meta.get("training")
    data = training.get("data") if isinstance(training, Mapping) else None
    if isinstance(data, Mapping):
        trained_positive, trained_labels = data.get("positive_label"), data.get("labels")
        if trained_positive is not None and trained_positive != meta["positive_label"]:
            raise PackageError(
                f"{path}: positive_label {meta['positive_label']!r} differs from the training record's "
                f"{trained_positive!r}: the network's probability is of {trained_positive!r}, so every call would be "
                "turned round; restore metadata.json from the run folder's package, or train again"
            )
        names = sorted(map(str, meta["label_names"]))
        if isinstance(trained_labels, list) and sorted(map(str, trained_labels)) != names:
            raise PackageError(
                f"{path}: label_names {list(meta['label_names'])} differ from the training record's labels "
                f"{trained_labels}; restore metadata.json from the run folder's package, or train again"
            )
    pre = meta["preprocess"]
    written = meta.get("input_size")
    if isinstance(written, bool) or not isinstance(written, int) or written < 1:
        # Written by every `save_package`; without it an edited preprocess.size would have nothing to be held to.
        raise PackageError(
            f"{path}: input_size = {written!r} is not the size the network was packaged with (a whole number of "
            "pixels); restore metadata.json from the run folder's package, or train again"
        )
    if pre.get("size") != written:
        # `save_package` writes both from one spec: an edited size (a training record's `size: null`, "native", gives
        # nothing to compare it with there) would feed the network inputs of another scale.
        raise PackageError(
            f"{path}: preprocess.size {pre.get('size')!r} differs from input_size {written!r}, the size the network "
            "was packaged with: it would see inputs of another scale; restore metadata.json from the run folder's "
            "package, or train again"
        )
    trained = training.get("preprocess") if isinstance(training, Mapping) else None
    if not isinstance(trained, Mapping):
        return
    pairs = {
        "grey": (pre.get("grey", "none"), trained.get("grey", "none")),
        "max_crop": (pre.get("max_crop"), trained.get("max_crop")),
        "roi.mode": (pre["roi"].get("mode"), trained.get("roi", pre["roi"].get("mode"))),
        "roi.margin": (pre["roi"].get("margin"), trained.get("margin", pre["roi"].get("margin"))),
        "keep_aspect": (pre.get("keep_aspect"), trained.get("keep_aspect", pre.get("keep_aspect"))),
    }
    if trained.get("size") is not None:
        pairs["size"] = (pre.get("size"), trained["size"])
    differ = [f"{key} {now!r} (trained with {then!r})" for key, (now, then) in pairs.items() if now != then]
    if differ:
        raise PackageError(
            f"{path}: preprocess differs from the training record ({'; '.join(differ)}): the network would see inputs "
            "unlike its training; restore metadata.json from the run folder's package, or train again"
        )


def _check_preprocess(preprocess: object, path: Path, key: str = "preprocess") -> None:
    """The preprocessing spec rebuilds (`PreprocessSpec.from_dict`); a bad value names its key."""
    from alnus.data.dataset import PreprocessSpec

    if not isinstance(preprocess, dict):
        raise PackageError(f"{path}: {key} = {preprocess!r} is not an object; the package is damaged")
    size = preprocess.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= MAX_INPUT_SIZE:
        raise PackageError(
            f"{path}: {key}.size = {size!r} is not a whole number of pixels from 1 to {MAX_INPUT_SIZE}; the "
            "package is damaged"
        )
    for part in ("roi", "keep_aspect"):
        if part not in preprocess:
            raise PackageError(f"{path} lacks {key}.{part}; the package is damaged: train again")
    try:
        PreprocessSpec.from_dict(preprocess)
    except AlnusError as exc:
        raise PackageError(f"{path}: {key}: {exc}") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise PackageError(f"{path}: {key} cannot be read ({exc!r}); the package is damaged") from None


def _checked_threshold(threshold: object, path: Path) -> dict[str, Any] | None:
    if threshold is None:
        return None
    try:
        return check_operating_point(threshold, str(path))
    except OperatingPointError as exc:
        raise PackageError(f"{exc} The threshold must be what `alnus evaluate` froze: {_FIX_THRESHOLD}.") from None


_FIX_EXPORT = "export it again (alnus export PACKAGE --format {kind}), or delete exports.{kind} from metadata.json"


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _is_sha256(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _is_probability(value: object) -> bool:
    return _is_number(value) and 0.0 <= value <= 1.0  # type: ignore[operator]


# What each export record holds and what each value must be; `onnx-int8` adds its calibration and AUCs.
_EXPORT_CHECKS: dict[str, tuple[Any, str]] = {
    "sha256": (_is_sha256, "a SHA-256 hex digest"),
    "weights_sha256": (_is_sha256, "a SHA-256 hex digest"),
    "opset": (
        lambda v: isinstance(v, int) and not isinstance(v, bool) and OPSET_RANGE[0] <= v <= OPSET_RANGE[1],
        f"an ONNX opset from {OPSET_RANGE[0]} to {OPSET_RANGE[1]}",
    ),
    "exporter": (lambda v: isinstance(v, str) and bool(v), "the exporter's name"),
    "max_abs_diff": (_is_probability, "a probability difference in [0, 1]"),
    "n_images": (_is_count, "a positive whole number"),
    "passed": (lambda v: isinstance(v, bool), "true or false"),
    "created": (lambda v: isinstance(v, str) and bool(v), "a date"),
}
_INT8_CHECKS: dict[str, tuple[Any, str]] = {
    "auc_torch": (_is_probability, "an AUC in [0, 1]"),
    "auc_int8": (_is_probability, "an AUC in [0, 1]"),
    "calibration": (
        lambda v: isinstance(v, dict) and _is_count(v.get("n_images")) and isinstance(v.get("method"), str),
        "an object with n_images (a positive whole number) and method (a name)",
    ),
}


def _checked_exports(exports: object, path: Path) -> dict[str, dict[str, Any]]:
    """The `exports` records (`alnus.export`), checked: known kinds, their fixed file names, values in range.

    A file name other than the kind's own is refused outright, so metadata.json cannot point a loader at a path
    outside the package.
    """
    if exports is None:
        return {}
    if not isinstance(exports, dict):
        raise PackageError(f"{path}: exports = {exports!r} is not an object; delete it from metadata.json, then export")
    for kind, record in exports.items():
        if kind not in EXPORT_FILES:
            raise PackageError(
                f"{path}: exports.{kind} is not an export alnus makes ({', '.join(EXPORT_FILES)}); delete it from "
                "metadata.json"
            )
        fix = _FIX_EXPORT.format(kind=kind)
        if not isinstance(record, dict):
            raise PackageError(f"{path}: exports.{kind} = {record!r} is not an object; {fix}")
        if record.get("file") != EXPORT_FILES[kind]:
            raise PackageError(
                f"{path}: exports.{kind}.file = {record.get('file')!r}; it must be {EXPORT_FILES[kind]!r}; {fix}"
            )
        checks = {**_EXPORT_CHECKS, **(_INT8_CHECKS if kind == "onnx-int8" else {})}
        for key, (ok, what) in checks.items():
            if key not in record:
                raise PackageError(f"{path}: exports.{kind} lacks {key}; {fix}")
            if not ok(record[key]):
                raise PackageError(f"{path}: exports.{kind}.{key} = {record[key]!r} is not {what}; {fix}")
    return exports


# How long a writer of metadata.json waits for another one before giving up with a message.
LOCK_TIMEOUT_S = 60.0


# The package folders this thread holds the lock of: taking it again inside (a metadata write within a command that
# locked the package for its metadata and card together) goes through instead of waiting for itself.
_HELD = threading.local()


@contextlib.contextmanager
def package_lock(folder: Path, timeout_s: float | None = None) -> Iterator[None]:
    """An exclusive OS lock (flock) on the package folder itself, so no lock file is left in the package; the kernel
    releases it when its holder dies. Where flock is missing (not POSIX) nothing is locked. Re-entrant within a
    thread."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    held: set[str] = _HELD.__dict__.setdefault("folders", set())
    key = os.path.realpath(folder)
    if key in held:
        yield
        return
    timeout_s = LOCK_TIMEOUT_S if timeout_s is None else timeout_s
    fd = os.open(folder, os.O_RDONLY)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise PackageError(
                        f"another command has been updating {folder / METADATA_FILE} for {timeout_s:.0f} s; wait for "
                        "it to end, then run this one again"
                    ) from None
                time.sleep(0.05)
        held.add(key)
        yield
    finally:
        held.discard(key)
        os.close(fd)  # releases the lock


def _one_writer(update: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    """Run a read-modify-write of a package's metadata.json under `package_lock`, so that two commands updating one
    package at once (a threshold and a reader rule, say) cannot lose one's change."""

    @functools.wraps(update)
    def locked(folder: str | os.PathLike[str], *args: Any, **kwargs: Any) -> dict[str, Any]:
        path = Path(folder)
        if not (path / METADATA_FILE).is_file():
            return update(folder, *args, **kwargs)  # read_metadata names what is wrong with the folder
        with package_lock(path):
            return update(folder, *args, **kwargs)

    return locked


@_one_writer
def record_export(folder: str | os.PathLike[str], kind: str, record: Mapping[str, Any]) -> dict[str, Any]:
    """Record an exported network (`alnus.export`) under `exports.<kind>` in metadata.json; return the metadata.

    The record is checked as `read_metadata` checks it, and must name the package's current weights; the weights
    and their hash are left as they are. metadata.json is rewritten atomically.
    """
    folder = Path(folder)
    meta = read_metadata(folder)
    if kind not in EXPORT_FILES:
        raise PackageError(f"unknown export {kind!r}; alnus exports {', '.join(EXPORT_FILES)}")
    if record.get("weights_sha256") != meta["weights_sha256"]:
        raise PackageError(
            f"the {kind} export of {folder} was made from other weights than the package holds now; export again"
        )
    exports = {**meta["exports"], kind: dict(record)}
    meta["exports"] = _checked_exports(exports, folder / METADATA_FILE)
    atomic_write_text(folder / METADATA_FILE, json.dumps(meta, indent=2, default=str) + "\n")
    return meta


@_one_writer
def freeze_threshold(
    folder: str | os.PathLike[str], record: Mapping[str, Any], *, reason: str, refreeze: bool = False
) -> dict[str, Any]:
    """Freeze an operating point (`alnus.operating_point`) into the package's metadata.json; return the metadata.

    The package's threshold is set once: a package that has one is changed only with `refreeze=True`, and every
    change is appended to `threshold_history` (date, old and new value and rule, `reason`).
    """
    folder = Path(folder)
    meta = read_metadata(folder)
    new = check_operating_point(record, "the threshold to freeze")
    old = meta["threshold"]
    if old is not None and not refreeze:
        raise PackageError(
            f"{folder / METADATA_FILE} already has a frozen threshold ({old['value']:.4g}, {rule_name(old)}, frozen "
            f"{old.get('frozen_at') or 'earlier'}); it is set once. Re-freeze explicitly to replace it: "
            "`alnus evaluate RUN --refreeze` for a run's model, `alnus threshold PACKAGE --manifest CSV --refreeze` "
            "for a package on its own."
        )
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    new = {**new, "frozen_on": new.get("frozen_on", "val"), "frozen_at": now}
    meta["threshold"] = new
    meta["threshold_history"] = [
        *meta["threshold_history"],
        {
            "date": now,
            "old_value": None if old is None else old["value"],
            "new_value": new["value"],
            "old_rule": None if old is None else rule_name(old),
            "new_rule": rule_name(new),
            "reason": reason,
        },
    ]
    meta["format_version"] = format_version_of(meta)
    atomic_write_text(folder / METADATA_FILE, json.dumps(meta, indent=2, default=str) + "\n")
    return meta


@_one_writer
def set_reader_rule(
    folder: str | os.PathLike[str], record: Mapping[str, Any], *, refreeze: bool = False
) -> dict[str, Any]:
    """Write a reader rule (`alnus.reader_rule`) into the package's metadata.json; return the metadata.

    Like the threshold it is set once: a package that has one is changed only with `refreeze=True`, and the rule it
    replaces is kept in `reader_rule_history` (the latest `MAX_HISTORY`).
    """
    folder = Path(folder)
    meta = read_metadata(folder)
    try:
        new = check_reader_rule(dict(record), "the reader rule to set")
    except ReaderRuleError as exc:
        raise PackageError(str(exc)) from None
    old = meta.get("reader_rule")
    if old is not None and not refreeze:
        raise PackageError(
            f"{folder / METADATA_FILE} already has a reader rule ({old['value']:.4g}, set "
            f"{old.get('frozen_at') or 'earlier'}); it is set once. Set it again explicitly to replace it: "
            "`alnus reader-rule PACKAGE --manifest CSV --refreeze`."
        )
    if old:
        _keep_in_history(meta, old)
    meta["reader_rule"] = new
    atomic_write_text(folder / METADATA_FILE, json.dumps(meta, indent=2, default=str) + "\n")
    return meta


def _keep_in_history(meta: dict[str, Any], rule: Mapping[str, Any]) -> None:
    """Append a replaced or removed rule to `reader_rule_history`, keeping the latest `MAX_HISTORY` (metadata.json
    stays small)."""
    history = meta.get("reader_rule_history")
    meta["reader_rule_history"] = [*(history if isinstance(history, list) else []), dict(rule)][-MAX_HISTORY:]


@_one_writer
def remove_reader_rule(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Take a package's reader rule away (kept as the latest of `reader_rule_history`, with `removed_at`); return the
    metadata.

    Raises:
        PackageError: the package has no reader rule.
    """
    folder = Path(folder)
    meta = read_metadata(folder)
    old = meta.get("reader_rule")
    if old is None:
        raise PackageError(f"{folder} has no reader rule to remove.")
    _keep_in_history(meta, {**old, "removed_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")})
    meta["reader_rule"] = None
    atomic_write_text(folder / METADATA_FILE, json.dumps(meta, indent=2, default=str) + "\n")
    return meta


def load_package(folder: str | os.PathLike[str], *, map_location: str = "cpu") -> tuple[UltrasoundNet, dict]:
    """Load a package written by `save_package`: the network (eval mode, weights checked) and its metadata."""
    folder = Path(folder)
    meta = read_metadata(folder)
    if is_ensemble(meta):
        raise PackageError(
            f"{folder} is an ensemble package ({meta['backbone']}), not one network; load it with "
            "alnus.predict.Predictor (or alnus.models.package.load_members)"
        )
    weights = folder / WEIGHTS_FILE
    _refuse_file_link(weights)  # first: a link to nothing is named as a link, not as a missing file
    if not weights.is_file():
        raise PackageError(f"model package {folder} has no {WEIGHTS_FILE}; it is incomplete: train again")
    if file_sha256(weights) != meta["weights_sha256"]:
        raise PackageError(
            f"{weights} does not match {folder / METADATA_FILE} (SHA-256 differs): the files come from "
            "different trainings or the weights were damaged; copy the whole package folder again"
        )
    in_chans_mode = meta.get("in_chans_mode", "replicate")
    if in_chans_mode not in ("replicate", "adapt"):
        raise PackageError(f"{folder / METADATA_FILE}: in_chans_mode = {in_chans_mode!r} is not replicate or adapt")
    model = create_model(meta["backbone"], in_chans_mode=in_chans_mode)
    try:
        _check_weight_types(weights, model)
        missing, unexpected = load_model(model, str(weights), strict=False, device=map_location)
    except PackageError:
        raise
    except Exception as exc:  # safetensors raises several types for a truncated or foreign file
        raise PackageError(f"cannot read {weights} ({type(exc).__name__}: {exc}); train again") from exc
    if missing or unexpected:
        raise PackageError(
            f"{weights} does not fit backbone {meta['backbone']!r}: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    tensors = model.state_dict().items()
    infinite = next((k for k, t in tensors if t.is_floating_point() and not t.isfinite().all()), None)
    if infinite is not None:
        raise PackageError(
            f"{weights}: {infinite} holds NaN or infinite values, so the network's output means nothing (an infinite "
            "bias calls every image the same); copy the package again from its run folder, or train again"
        )
    model.weights_source = f"package:{folder.resolve()}"
    return model.eval(), meta


# The stored types a network's tensor may have: float16 weights (a shipped copy) are widened to the network's float32;
# any other change of type (integers, float64) would be cast without a word.
_WIDENED = {"F16": "F32"}


def _check_weight_types(weights: Path, model: torch.nn.Module) -> None:
    """Each stored tensor has the type of the network's (float32, or float16 for a float32 one), read from the file's
    header before anything is loaded; `load_model` would otherwise cast an integer or float64 tensor silently."""
    from safetensors import safe_open

    names = {torch.float32: "F32", torch.float16: "F16", torch.int64: "I64", torch.bfloat16: "BF16"}
    expected = {k: names.get(t.dtype, str(t.dtype)) for k, t in model.state_dict().items()}
    with safe_open(str(weights), framework="pt") as fh:
        for key in fh.keys():  # noqa: SIM118 - safe_open has keys(), not iteration
            stored = fh.get_slice(key).get_dtype()
            wanted = expected.get(key)
            if wanted is not None and stored != wanted and _WIDENED.get(stored) != wanted:
                raise PackageError(
                    f"{weights}: {key} is stored as {stored}, where the network holds {wanted}; a package's weights "
                    "are float32 (or float16); copy the package again from its run folder, or train again"
                )


@dataclass(frozen=True, eq=False)
class Member:
    """One network of a package: its folder (the package itself, or `members/<i>` of an ensemble), the network
    (eval mode, weights checked) and its own metadata."""

    folder: Path
    model: UltrasoundNet
    metadata: dict[str, Any]


def load_members(folder: str | os.PathLike[str], *, map_location: str = "cpu") -> tuple[list[Member], dict[str, Any]]:
    """The networks of a package and the package's metadata: the one network of a plain package, or each member of an
    ensemble (every member checked by `member_folders` first, then loaded as any package)."""
    folder = Path(folder)
    meta = read_metadata(folder)
    if not is_ensemble(meta):
        model, meta = load_package(folder, map_location=map_location)
        return [Member(folder, model, meta)], meta
    members = []
    for member in member_folders(folder, meta):
        model, member_meta = load_package(member, map_location=map_location)
        members.append(Member(member, model, member_meta))
    return members, meta


def _refuse_link(path: Path, where: Path) -> None:
    if path.is_symlink():
        raise PackageError(
            f"{path} is a symbolic link; an ensemble's members are plain folders and files inside it (nothing is "
            f"read from elsewhere). Build the ensemble again (alnus ensemble), or copy {where} without links"
        )


def member_folders(folder: str | os.PathLike[str], meta: Mapping[str, Any]) -> list[Path]:
    """The member folders of an ensemble (`meta` from `read_metadata`), each checked before use.

    A member lives in `members/<i>` (never a path read from the JSON), is a real folder with real files (no symbolic
    link), is a single network's package (an ensemble of ensembles is refused), and its metadata names the backbone,
    weights, training data and preprocessing that the ensemble recorded, and the ensemble's labels. The weights file
    itself is checked against its SHA-256 when the member is loaded (`load_package`).
    """
    root = Path(folder)
    where = root / METADATA_FILE
    base = root / MEMBERS_DIR
    _refuse_link(base, root)
    if not base.is_dir():
        raise PackageError(f"{where} describes an ensemble, but {base} is missing; copy the whole package folder again")
    folders = []
    for i, record in enumerate(meta["members"], start=1):
        member = base / str(i)
        _refuse_link(member, root)
        if not member.is_dir():
            raise PackageError(
                f"{where} lists member {i}, but {member} is missing; copy the whole package folder again"
            )
        for name in (METADATA_FILE, WEIGHTS_FILE, *EXPORT_FILES.values()):
            _refuse_link(member / name, root)
        member_meta = read_metadata(member)
        if is_ensemble(member_meta):
            raise PackageError(
                f"{member} is itself an ensemble; the members of an ensemble must be single networks (ensembles are "
                "not nested): build it from the networks' own packages"
            )
        _check_member(member, member_meta, record, meta, where, i)
        folders.append(member)
    return folders


def _check_member(
    member: Path,
    member_meta: Mapping[str, Any],
    record: Mapping[str, Any],
    meta: Mapping[str, Any],
    where: Path,
    i: int,
) -> None:
    """The member's own metadata agrees with what the ensemble recorded of it, and with the ensemble's labels."""
    from alnus.data.dataset import PreprocessSpec

    fix = "the member was replaced or damaged after the ensemble was built: build the ensemble again (alnus ensemble)"
    for key in ("backbone", "weights_sha256", "training_data_hash"):
        if member_meta.get(key) != record[key]:
            raise PackageError(
                f"{member / METADATA_FILE}: {key} = {member_meta.get(key)!r}, but {where} records "
                f"{record[key]!r} for member {i}; {fix}"
            )
    if PreprocessSpec.from_dict(member_meta["preprocess"]) != PreprocessSpec.from_dict(record["preprocess"]):
        raise PackageError(
            f"{member / METADATA_FILE}: its preprocessing differs from what {where} records for member {i}; {fix}"
        )
    if (
        list(member_meta["label_names"]) != list(meta["label_names"])
        or member_meta["positive_label"] != meta["positive_label"]
    ):
        raise PackageError(
            f"{member / METADATA_FILE}: labels {member_meta['label_names']} (positive "
            f"{member_meta['positive_label']!r}) differ from the ensemble's {meta['label_names']} (positive "
            f"{meta['positive_label']!r}) in {where}; {fix}"
        )
