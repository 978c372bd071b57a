"""Training checkpoints that cannot run code and cannot be resumed damaged.

A checkpoint holds tensors and plain values only (numpy's RNG state is stored as a tensor) and is read with
`torch.load(weights_only=True)`, so a crafted file is refused instead of run. It carries the SHA-256 of its contents
(every tensor's bytes and every value, as loaded): a flipped byte or an edited value is refused with a message that
says to delete the file, instead of resuming into a silently different model. Each value a resume needs is checked
for presence and type, and the weights for finite values.
"""

from __future__ import annotations

import hashlib
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alnus._io import atomic_path
from alnus.errors import AlnusError

CHECKPOINT_FORMAT = "alnus-checkpoint"
# 2: the SHA-256 of the contents, readable with weights_only=True (numpy's RNG state as a tensor).
CHECKPOINT_VERSION = 2


class CheckpointError(AlnusError):
    """A checkpoint that cannot be trusted or read; the message names the file and says to delete it."""


def rng_states() -> dict[str, Any]:
    """Every RNG state a training step draws from (python, numpy, torch CPU and CUDA), as tensors and plain values.

    numpy's state is stored as a dict with its key as a tensor: `weights_only` loading refuses numpy arrays.
    """
    version, internal, gauss = random.getstate()
    numpy_state = np.random.get_state(legacy=False)
    return {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {
            "bit_generator": numpy_state["bit_generator"],
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what `rng_states` returned."""
    python, numpy_state = states["python"], states["numpy"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss"]))
    np.random.set_state(
        {
            "bit_generator": numpy_state["bit_generator"],
            "state": {"key": numpy_state["key"].numpy().astype(np.uint32), "pos": numpy_state["pos"]},
            "has_gauss": numpy_state["has_gauss"],
            "gauss": numpy_state["gauss"],
        }
    )
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# What each kind of checkpoint holds, and the type each value must have (checked on load: a damaged or edited
# value is named, instead of surfacing later as, say, a diverged training).
_CHECKPOINT_KEYS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "best": {"model": dict, "epoch": int, "val_auc": float, "settings": dict},
    "last": {
        "model": dict,
        "optimizer": dict,
        "scheduler": dict,
        "scaler": dict,
        "rng": dict,
        "epoch": int,
        "best_val_auc": float,
        "best_epoch": int,
        "bad_epochs": int,
        "stopped_early": bool,
        "history": list,
        "settings": dict,
    },
}


# What a message about an unusable checkpoint tells the user to do.
def delete_advice(path: Path) -> str:
    """What to do with a checkpoint that cannot be used: inside a run, delete the model's folder (both checkpoints
    and the package go together; deleting one checkpoint leaves the other asking for it)."""
    if path.parent.name == "checkpoints":
        return f"delete {path.parent.parent} (this model's folder) to train the model again"
    return "replace or delete the file"


def content_sha256(value: Any) -> str:
    """SHA-256 of a checkpoint's contents as loaded: every tensor's dtype, shape and bytes, and every plain value,
    walked in a fixed order. It checks what a resume would use, whatever the file's container bytes are."""
    digest = hashlib.sha256()

    def feed(item: Any) -> None:
        if isinstance(item, torch.Tensor):
            flat = item.detach().cpu().contiguous().reshape(-1)
            digest.update(f"T{item.dtype}{tuple(item.shape)}".encode())
            digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
        elif isinstance(item, dict):
            digest.update(f"D{len(item)}".encode())
            for key in sorted(item, key=repr):
                feed(key)
                feed(item[key])
        elif isinstance(item, (list, tuple)):
            digest.update(f"{type(item).__name__[0]}{len(item)}".encode())
            for element in item:
                feed(element)
        else:
            digest.update(f"{type(item).__name__}:{item!r};".encode())

    feed(value)
    return digest.hexdigest()


def save_checkpoint(kind: str, payload: dict[str, Any], path: Path) -> None:
    """Write a checkpoint atomically: `payload` (tensors and plain values), its kind and the SHA-256 of its contents.

    The payload's keys stay at the top level, so `train.weights: file:.../best.pt` can start another model from it.
    """
    contents = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "kind": kind, **payload}
    with atomic_path(path) as tmp:
        torch.save({**contents, "sha256": content_sha256(contents)}, tmp)


def _safe_load(path: Path) -> Any:
    """`torch.load(weights_only=True)`: tensors and plain values only; anything else is refused, never run."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" not in str(exc).lower():
            raise CheckpointError(
                f"cannot read checkpoint {path} ({exc}): the file is damaged; {delete_advice(path)}."
            ) from None
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(
            f"checkpoint {path} holds objects other than tensors and plain values ({first}); alnus does not load "
            "such a file, since loading it could run code. An older alnus or another program wrote it: "
            f"{delete_advice(path)}."
        ) from None
    except Exception as exc:  # a damaged file is the same problem whatever torch raises
        raise CheckpointError(
            f"cannot read checkpoint {path} ({type(exc).__name__}: {exc}): the file is damaged; {delete_advice(path)}."
        ) from None


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint`: its SHA-256 is verified and every expected value checked.

    Raises:
        CheckpointError: the file is not an alnus checkpoint of this version, holds anything but tensors and plain
            values, does not match its SHA-256, or lacks a value or holds one of the wrong type.
    """
    path = Path(path)
    contents = _safe_load(path)
    if not isinstance(contents, dict) or contents.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not an alnus checkpoint; {delete_advice(path)}.")
    if contents.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path} is a checkpoint of version {contents.get('version')!r}, not {CHECKPOINT_VERSION} (written by "
            f"another alnus version); {delete_advice(path)}."
        )
    recorded = contents.pop("sha256", None)
    if recorded != content_sha256(contents):
        raise CheckpointError(
            f"{path} is damaged: its contents no longer match the SHA-256 stored with them (a disk error or an "
            f"edited file); {delete_advice(path)}."
        )
    _check_payload(contents, path)
    return contents


def peek_last(path: Path) -> tuple[int, bool] | None:
    """(epochs finished, stopped early) that a `last.pt` records, or None when there is none or it cannot be read.

    Cheap enough for a stop message: the weights are memory-mapped, not read, and their SHA-256 is not checked (a
    resume checks it); loaded with `weights_only`, so a crafted file runs nothing. Never raises.
    """
    try:
        if not Path(path).is_file():  # not a FIFO or a device, which loading would wait on
            return None
        contents = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # damaged, not a zip, unreadable: the stop message then says nothing of it
        return None
    if not isinstance(contents, dict) or contents.get("format") != CHECKPOINT_FORMAT or contents.get("kind") != "last":
        return None
    epoch, stopped = contents.get("epoch"), contents.get("stopped_early")
    if type(epoch) is not int or epoch < 0 or type(stopped) is not bool:
        return None
    return epoch + 1, stopped


def _check_payload(payload: Any, path: Path) -> None:
    """Every value a checkpoint of its kind needs, of the right type, and finite weights."""
    kind = payload.get("kind")
    if kind not in _CHECKPOINT_KEYS:
        raise CheckpointError(f"{path} does not say what it holds (no valid 'kind'); {delete_advice(path)}.")
    for key, expected in _CHECKPOINT_KEYS[kind].items():
        if key not in payload:
            raise CheckpointError(
                f"checkpoint {path} lacks its {key!r} value; the file was edited or damaged: {delete_advice(path)}."
            )
        value = payload[key]
        wrong_bool = isinstance(value, bool) and expected is not bool
        if wrong_bool or not isinstance(value, expected):
            raise CheckpointError(
                f"checkpoint {path}: {key!r} is {type(value).__name__} {str(value)[:60]!r}, not "
                f"{getattr(expected, '__name__', expected)}; the file was edited or damaged: {delete_advice(path)}."
            )
    for name, tensor in payload["model"].items():
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"checkpoint {path}: weight {name!r} is not a tensor; {delete_advice(path)}.")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(
                f"checkpoint {path}: weight {name!r} holds non-finite values (NaN or infinity); the file was edited "
                f"or damaged (training never saves such weights): {delete_advice(path)}."
            )
