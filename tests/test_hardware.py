from __future__ import annotations

import json
import socket

import pytest
import torch

from alnus import _hardware
from alnus._hardware import Precision, PrecisionError, autocast, choose_precision, environment_info

CPU = torch.device("cpu")
ZEN4 = frozenset({"avx2", "avx512f", "avx512_bf16", "avx512_vnni"})
SAPPHIRE_RAPIDS = frozenset({"avx2", "avx512f", "amx_tile", "amx_bf16", "amx_int8"})
SKYLAKE = frozenset({"avx2", "avx512f", "avx512bw"})


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(_hardware.PRECISION_ENV, raising=False)


def fake_flags(monkeypatch: pytest.MonkeyPatch, flags: frozenset[str]) -> None:
    monkeypatch.setattr(_hardware, "cpu_flags", lambda: flags)


@pytest.mark.parametrize("flags", [ZEN4, SAPPHIRE_RAPIDS], ids=["avx512_bf16", "amx"])
def test_auto_picks_bf16_channels_last_on_cpus_with_bf16(monkeypatch: pytest.MonkeyPatch, flags) -> None:
    fake_flags(monkeypatch, flags)
    precision = choose_precision(CPU)
    assert precision.autocast_dtype is torch.bfloat16
    assert precision.channels_last is True
    assert precision.name == "bf16"
    assert "amx" in precision.reason or "avx512_bf16" in precision.reason


def test_auto_picks_fp32_without_bf16_instructions(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_flags(monkeypatch, SKYLAKE)
    precision = choose_precision(CPU, "auto")
    assert precision == Precision(None, False, precision.reason)
    assert "no bf16" in precision.reason


def test_explicit_request_overrides_the_hardware(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_flags(monkeypatch, ZEN4)
    assert choose_precision(CPU, "fp32").autocast_dtype is None
    assert choose_precision(CPU, "FP32").channels_last is False
    fake_flags(monkeypatch, SKYLAKE)
    forced = choose_precision(CPU, "bf16")
    assert forced.autocast_dtype is torch.bfloat16
    assert "emulated" in forced.reason


def test_environment_variable_overrides_auto_but_not_an_explicit_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake_flags(monkeypatch, ZEN4)
    monkeypatch.setenv(_hardware.PRECISION_ENV, "fp32")
    from_env = choose_precision(CPU)
    assert from_env.autocast_dtype is None
    assert _hardware.PRECISION_ENV in from_env.reason
    assert choose_precision(CPU, "bf16").autocast_dtype is torch.bfloat16


def test_fp16_on_cpu_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_flags(monkeypatch, SAPPHIRE_RAPIDS)
    with pytest.raises(PrecisionError, match="fp16 .* not supported .* CPU; use bf16"):
        choose_precision(CPU, "fp16")
    monkeypatch.setenv(_hardware.PRECISION_ENV, "fp16")
    with pytest.raises(PrecisionError, match="ALNUS_PRECISION=fp16"):
        choose_precision(CPU)


@pytest.mark.parametrize("where", ["argument", "env"])
def test_unknown_precision_names_the_choices(monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    if where == "env":
        monkeypatch.setenv(_hardware.PRECISION_ENV, "half")
    with pytest.raises(PrecisionError, match="unknown precision 'half'.*auto, fp32, bf16, fp16") as info:
        choose_precision(CPU, "half" if where == "argument" else "auto")
    assert ("ALNUS_PRECISION" in str(info.value)) == (where == "env")


@pytest.mark.parametrize("bf16_supported", [True, False])
def test_cuda_auto_uses_bf16_or_fp16(monkeypatch: pytest.MonkeyPatch, bf16_supported: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16_supported)
    precision = choose_precision(torch.device("cuda", 0))
    assert precision.autocast_dtype is (torch.bfloat16 if bf16_supported else torch.float16)
    assert precision.channels_last is True
    if not bf16_supported:
        assert "GradScaler" in precision.reason
        with pytest.raises(PrecisionError, match="bf16 .* not supported by cuda:0"):
            choose_precision(torch.device("cuda", 0), "bf16")


def test_autocast_runs_a_linear_layer_in_bf16_when_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_flags(monkeypatch, ZEN4)
    layer = torch.nn.Linear(8, 4)
    x = torch.randn(2, 8)
    with autocast(CPU, choose_precision(CPU)):
        assert layer(x).dtype is torch.bfloat16
    with autocast(CPU, choose_precision(CPU, "fp32")):
        assert layer(x).dtype is torch.float32


def test_cpu_flags_reads_this_machine() -> None:
    flags = _hardware.cpu_flags()
    assert isinstance(flags, frozenset)
    # Every x86-64 CPU has SSE2; elsewhere just require that something was read.
    if torch.cpu.get_capabilities().get("architecture") == "x86_64":
        assert "sse2" in flags


def test_environment_info_is_json_and_has_no_hostname() -> None:
    info = environment_info()
    text = json.dumps(info)
    assert {"python", "alnus", "torch", "torchvision", "timm", "git", "cpu", "gpu", "date"} <= set(info)
    assert info["torch"] == torch.__version__
    assert info["cpu"]["logical_cores"] >= 1
    assert set(info["cpu"]["flags"]) <= set(_hardware.REPORTED_FLAGS)
    assert info["gpu"]["count"] == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert "hostname" not in text.lower() and "node" not in info
    hostname = socket.gethostname()
    assert len(hostname) < 4 or hostname not in text
    if info["git"] is not None:
        assert len(info["git"]["sha"]) == 40 and isinstance(info["git"]["dirty"], bool)


def test_environment_info_outside_a_git_checkout_has_no_commit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_hardware, "_git", lambda *args, cwd: None)
    assert environment_info()["git"] is None


@pytest.mark.parametrize("flags", [ZEN4, SAPPHIRE_RAPIDS], ids=["avx512_bf16", "amx"])
def test_auto_keeps_fp32_for_depthwise_networks_on_the_cpu(monkeypatch: pytest.MonkeyPatch, flags) -> None:
    """bench/train_precision.py: EfficientNet-Lite trained slower in bf16 than in fp32 on a CPU with AMX."""
    fake_flags(monkeypatch, flags)
    precision = choose_precision(CPU, depthwise=True)
    assert precision.autocast_dtype is None and precision.channels_last is True and "depthwise" in precision.reason
    assert choose_precision(CPU, "bf16", depthwise=True).autocast_dtype is torch.bfloat16  # asked for: obeyed
    monkeypatch.setenv(_hardware.PRECISION_ENV, "bf16")
    assert choose_precision(CPU, depthwise=True).autocast_dtype is torch.bfloat16
    if torch.cuda.is_available():
        assert choose_precision(torch.device("cuda"), depthwise=True).autocast_dtype is not None


def test_the_depthwise_flag_matches_each_backbones_convolutions() -> None:
    from alnus.models import create_model, get_spec, list_backbones

    for name in list_backbones():
        model = create_model(name, weights="none")
        found = any(
            isinstance(m, torch.nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels for m in model.modules()
        )
        assert get_spec(name).depthwise == found, name
