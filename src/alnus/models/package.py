"""The model package: trained weights (safetensors) plus the clinical metadata that travels with them.

As in torchxrayvision, the package holds everything predict/serve need to reproduce the study's inputs and
calls: backbone, preprocessing (size, ROI policy), label names, positive class and, once evaluation has
frozen it on validation, the operating threshold. `metadata.json` records the SHA-256 of the weights
file, so a weights file and a metadata file from different trainings are refused.
"""

from __future__ import annotations

import copy
import datetime as dt
import importlib.metadata
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from alnus._io import atomic_path, atomic_write_text, file_sha256
from alnus.errors import AlnusError
from alnus.models.registry import UltrasoundNet, create_model

FORMAT = "alnus-model"
FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.safetensors"
METADATA_FILE = "metadata.json"
# What the caller states about the training; the rest (model facts, versions, date) is filled in here.
REQUIRED_KEYS = ("preprocess", "label_names", "positive_label")


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
            usually also `training_data_hash`, `weights_source`, `best_epoch`, `val_auc`. Backbone, input
            size, normalisation, versions, creation date and `threshold` (null until evaluation sets it)
            are added here.
    """
    from alnus.data.dataset import PreprocessSpec

    missing = [key for key in REQUIRED_KEYS if key not in metadata]
    if missing:
        raise PackageError(f"model package {folder}: metadata lacks {', '.join(missing)}")
    spec = PreprocessSpec.from_dict(metadata["preprocess"])
    if metadata["positive_label"] not in metadata["label_names"]:
        raise PackageError(
            f"model package {folder}: positive_label {metadata['positive_label']!r} is not one of "
            f"label_names {list(metadata['label_names'])}"
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # A CPU fp32 copy: the package must not depend on the device or precision training ran in.
    cpu_model = copy.deepcopy(model).float().cpu().to(memory_format=torch.contiguous_format)
    with atomic_path(folder / WEIGHTS_FILE) as tmp:
        save_model(cpu_model, str(tmp))
    net_spec = model.spec
    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "backbone": net_spec.name,
        "in_chans_mode": model.in_chans_mode,
        "input_size": spec.size,
        "normalisation": {"mean": list(net_spec.mean), "std": list(net_spec.std), "scale": "x / 255"},
        "threshold": None,
        "weights_source": getattr(model, "weights_source", "none"),
        **dict(metadata),
        "weights_sha256": file_sha256(folder / WEIGHTS_FILE),
        "versions": _versions(),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    # Metadata last: a package whose metadata names other weights is refused at load (weights_sha256).
    atomic_write_text(folder / METADATA_FILE, json.dumps(meta, indent=2, default=str) + "\n")
    return meta


def read_metadata(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check `metadata.json` of a package (format, version, required keys)."""
    path = Path(folder) / METADATA_FILE
    if not Path(folder).is_dir():
        raise PackageError(f"model package {folder} not found; train a model first (alnus train CONFIG)")
    if not path.is_file():
        raise PackageError(f"model package {folder} has no {METADATA_FILE}; it is incomplete: train again")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PackageError(f"{path} is not valid JSON ({exc}); the package is damaged: train again") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise PackageError(f'{path} is not an alnus model package (no "format": "{FORMAT}")')
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise PackageError(
            f"{path}: package format version {version!r} is newer than this alnus reads ({FORMAT_VERSION}); "
            "upgrade alnus"
        )
    missing = [k for k in ("backbone", "weights_sha256", *REQUIRED_KEYS) if k not in meta]
    if missing:
        raise PackageError(f"{path} lacks {', '.join(missing)}; the package is damaged: train again")
    return meta


def load_package(folder: str | os.PathLike[str], *, map_location: str = "cpu") -> tuple[UltrasoundNet, dict]:
    """Load a package written by `save_package`: the network (eval mode, weights checked) and its metadata."""
    folder = Path(folder)
    meta = read_metadata(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise PackageError(f"model package {folder} has no {WEIGHTS_FILE}; it is incomplete: train again")
    if file_sha256(weights) != meta["weights_sha256"]:
        raise PackageError(
            f"{weights} does not match {folder / METADATA_FILE} (SHA-256 differs): the files come from "
            "different trainings or the weights were damaged; copy the whole package folder again"
        )
    model = create_model(meta["backbone"], in_chans_mode=meta.get("in_chans_mode", "replicate"))
    try:
        missing, unexpected = load_model(model, str(weights), strict=False, device=map_location)
    except Exception as exc:  # safetensors raises several types for a truncated or foreign file
        raise PackageError(f"cannot read {weights} ({type(exc).__name__}: {exc}); train again") from exc
    if missing or unexpected:
        raise PackageError(
            f"{weights} does not fit backbone {meta['backbone']!r}: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    model.weights_source = f"package:{folder.resolve()}"
    return model.eval(), meta
