"""Hardware facts: which numeric precision and memory layout to train in, and what a run ran on.

On CPUs with bf16 instructions (Intel AMX, or AVX512-BF16 on Intel Cooper Lake / AMD Zen 4 and later) oneDNN
runs convolutions and matmuls in bf16 with fp32 accumulation, and its fast kernels want channels-last
(NHWC) tensors; without those instructions bf16 is emulated and slower than fp32. On GPUs autocast to bf16
(Ampere and later) or fp16 with a GradScaler (older cards) is the standard mixed precision recipe
(Micikevicius et al. 2018, "Mixed Precision Training").
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import importlib.metadata
import os
import platform
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alnus.errors import AlnusError

PRECISION_ENV = "ALNUS_PRECISION"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# /proc/cpuinfo flag names that mean the CPU computes in bf16 natively.
BF16_FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16")
# Flags worth recording with a run: they decide which kernels PyTorch picks.
REPORTED_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16")
REPORTED_FLAGS += ("amx_tile", "amx_bf16", "amx_int8")
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class PrecisionError(AlnusError):
    """A precision that is unknown or that the device cannot run."""


@dataclass(frozen=True)
class Precision:
    """How to run a model: the autocast dtype (None: plain fp32), the memory layout, and why."""

    autocast_dtype: torch.dtype | None
    channels_last: bool
    reason: str

    @property
    def name(self) -> str:
        """`fp32`, `bf16` or `fp16`."""
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.autocast_dtype]


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags: `/proc/cpuinfo` on Linux, else what PyTorch's cpuinfo reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    # macOS and Windows have no /proc: torch.cpu.get_capabilities() names the same features, mostly with
    # an underscore where Linux has none (avx512_f vs avx512f); both spellings are kept.
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)
    if get_capabilities is None:
        return frozenset()
    names = {name for name, value in get_capabilities().items() if value is True}
    return frozenset(names | {name.replace("avx512_", "avx512") for name in names if name.count("_") == 1})


def cpu_has_bf16(flags: frozenset[str] | None = None) -> bool:
    """Whether the CPU has native bf16 instructions (AMX or AVX512-BF16)."""
    flags = cpu_flags() if flags is None else flags
    return any(flag in flags for flag in BF16_FLAGS)


def _requested(requested: str) -> tuple[str, str]:
    """Resolve the argument and `ALNUS_PRECISION` into (precision, where it came from)."""
    env = os.environ.get(PRECISION_ENV, "").strip().lower()
    value, source = requested.strip().lower(), "requested"
    # An explicit argument wins over the environment, as a command-line flag wins over an env variable.
    if value == "auto" and env:
        value, source = env, f"{PRECISION_ENV}={env}"
    if value not in PRECISIONS:
        where = f"environment variable {PRECISION_ENV}" if source != "requested" else "precision setting"
        raise PrecisionError(f"unknown precision {value!r} in the {where}; use one of {', '.join(PRECISIONS)}.")
    return value, source


def choose_precision(device: torch.device, requested: str = "auto", *, depthwise: bool = False) -> Precision:
    """Choose the autocast dtype and memory layout for `device`.

    Args:
        device: where the model runs.
        requested: `auto` (decide from the hardware), or `fp32`, `bf16`, `fp16` to force one. When it is
            `auto`, the environment variable `ALNUS_PRECISION` (same values) is honoured.
        depthwise: the network is built from depthwise-separable convolutions (`BackboneSpec.depthwise`). On a
            CPU `auto` then keeps fp32 (with channels_last): their bf16 training measured slower than fp32
            (`bench/train_precision.py`, docs/performance.md).

    Returns:
        A `Precision`. For fp16 on a GPU the caller adds a `torch.amp.GradScaler`.
    """
    device = torch.device(device)
    value, source = _requested(requested)
    if device.type == "cuda":
        return _choose_cuda(device, value, source)
    if device.type != "cpu":
        if value == "auto":
            return Precision(None, False, f"fp32: no automatic mixed precision policy for {device.type}")
        return Precision(_DTYPES[value], False, f"{value}: {source} on {device.type}")
    return _choose_cpu(value, source, depthwise)


def _choose_cpu(value: str, source: str, depthwise: bool) -> Precision:
    native = cpu_has_bf16()
    if value == "fp16":
        raise PrecisionError(
            f"fp16 ({source}) is not supported for training on the CPU; use bf16 (on a CPU with AMX or "
            "AVX512-BF16) or fp32, or set precision to auto."
        )
    if value == "auto":
        if native and depthwise:
            return Precision(
                None, True, "fp32 + channels_last: depthwise convolutions train slower in bf16 than in fp32 on the CPU"
            )
        if native:
            found = ", ".join(flag for flag in BF16_FLAGS if flag in cpu_flags())
            return Precision(torch.bfloat16, True, f"bf16 + channels_last: the CPU has {found}")
        return Precision(None, False, "fp32: the CPU has no bf16 instructions (AMX or AVX512-BF16)")
    if value == "bf16":
        note = "" if native else " (no AMX/AVX512-BF16 on this CPU: bf16 is emulated and slow)"
        return Precision(torch.bfloat16, True, f"bf16 + channels_last: {source}{note}")
    return Precision(None, False, f"fp32: {source}")


def _choose_cuda(device: torch.device, value: str, source: str) -> Precision:
    bf16_ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if value == "auto":
        if bf16_ok:
            return Precision(torch.bfloat16, True, "bf16 autocast + channels_last: the GPU supports bf16")
        return Precision(torch.float16, True, "fp16 autocast + channels_last: the GPU has no bf16 (use a GradScaler)")
    if value == "bf16" and not bf16_ok:
        raise PrecisionError(
            f"bf16 ({source}) is not supported by {device}; use fp16 or fp32, or set precision to auto."
        )
    return Precision(_DTYPES[value], True, f"{value} + channels_last: {source}")


@contextlib.contextmanager
def autocast(device: torch.device, precision: Precision) -> Iterator[None]:
    """`torch.autocast` to the precision's dtype on `device`, or nothing for fp32."""
    if precision.autocast_dtype is None:
        yield
        return
    with torch.autocast(device_type=torch.device(device).type, dtype=precision.autocast_dtype):
        yield


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str, cwd: Path) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def git_revision() -> dict[str, Any] | None:
    """The commit and dirty state of the alnus checkout, or None when alnus is not run from a git checkout."""
    package = Path(__file__).resolve().parent
    # ls-files makes sure this file is tracked: an installed copy inside some unrelated repository (a venv
    # below a project folder) must not report that repository's commit.
    if _git("ls-files", "--error-unmatch", "__init__.py", cwd=package) is None:
        return None
    sha = _git("rev-parse", "HEAD", cwd=package)
    if not sha:
        return None
    status = _git("status", "--porcelain", "--untracked-files=no", cwd=package)
    return {"sha": sha, "dirty": bool(status)}


def cpu_model() -> str:
    """The CPU's marketing name (`model name` in /proc/cpuinfo), or what the platform module knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment_info() -> dict[str, Any]:
    """Versions, git commit and hardware of this run, JSON-serialisable; no host name or user name."""
    import alnus

    flags = cpu_flags()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpus = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    )
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "alnus": alnus.__version__,
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "timm": _version("timm"),
        "git": git_revision(),
        "cpu": {
            "model": cpu_model(),
            "logical_cores": os.cpu_count(),
            "usable_cores": usable,
            "torch_threads": torch.get_num_threads(),
            "flags": sorted(flag for flag in REPORTED_FLAGS if flag in flags),
            "bf16": cpu_has_bf16(flags),
        },
        "gpu": {"count": len(gpus), "names": gpus, "cuda": torch.version.cuda if gpus else None},
    }
