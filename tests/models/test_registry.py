"""Backbone registry and the UltrasoundNet wrapper: every registered backbone at a small input size."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from timm.models import get_pretrained_cfg

from alnus.config import BUILT_IN_BACKBONES
from alnus.errors import AlnusError
from alnus.models import UltrasoundNet, UnknownBackboneError, create_model, get_spec, list_backbones
from alnus.models.registry import get_submodule

BACKBONES = list_backbones()
# The published pretrained configs of the weights each backbone loads: our preprocessing must match theirs.
PUBLISHED_CFG = {
    "inception_v3": "inception_v3.tv_in1k",
    "inception_resnet_v2": "inception_resnet_v2.tf_in1k",
    "resnet101": "resnet101.tv2_in1k",
    "resnet18": "resnet18.tv_in1k",
    "efficientnet_lite0": "tf_efficientnet_lite0.in1k",
    "efficientnet_lite1": "tf_efficientnet_lite1.in1k",
    "efficientnet_lite2": "tf_efficientnet_lite2.in1k",
}


def _size(name: str) -> int:
    return max(get_spec(name).min_input_size, 64)


def test_registry_holds_the_papers_backbones_and_the_extras() -> None:
    assert set(BACKBONES) == {
        "inception_v3",
        "inception_resnet_v2",
        "resnet101",
        "efficientnet_lite0",
        "efficientnet_lite1",
        "efficientnet_lite2",
        "resnet18",
        "tiny_cnn",
    }
    # The config refuses other names before importing this registry: its list must be the registry's.
    assert set(BACKBONES) == set(BUILT_IN_BACKBONES)


def test_unknown_backbone_names_the_choices() -> None:
    with pytest.raises(UnknownBackboneError, match="resnet101") as info:
        get_spec("resnet-101")
    assert isinstance(info.value, AlnusError)
    assert "'resnet-101'" in str(info.value)


@pytest.mark.parametrize(
    ("name", "size"),
    [
        ("inception_v3", 299),
        ("inception_resnet_v2", 299),
        ("resnet101", 224),
        ("resnet18", 224),
        ("efficientnet_lite0", 224),
        ("efficientnet_lite1", 240),
        ("efficientnet_lite2", 260),
    ],
)
def test_spec_matches_the_published_weights(name: str, size: int) -> None:
    spec, cfg = get_spec(name), get_pretrained_cfg(PUBLISHED_CFG[name])
    assert spec.input_size == size
    # Inception V3's torchvision weights come from Google's TF checkpoint: inputs in [-1, 1], i.e. 0.5/0.5.
    assert spec.mean == pytest.approx(cfg.mean)
    assert spec.std == pytest.approx(cfg.std)
    assert spec.classifier == cfg.classifier
    assert spec.first_conv == cfg.first_conv
    assert spec.weight_sources == ("none", "imagenet", "file")
    assert spec.licence


def test_tiny_cnn_is_small_and_has_no_pretrained_weights() -> None:
    spec = get_spec("tiny_cnn")
    assert spec.weight_sources == ("none", "file")
    n_params = sum(p.numel() for p in create_model("tiny_cnn").parameters())
    assert 50_000 < n_params < 150_000


@pytest.mark.parametrize("name", BACKBONES)
def test_forward_backward_cam_and_parameter_split(name: str) -> None:
    torch.manual_seed(0)
    net = create_model(name)
    size = _size(name)
    assert isinstance(net, UltrasoundNet) and net.spec.name == name and net.weights_source == "none"

    maps: list[torch.Tensor] = []
    hook = net.cam_target_layer().register_forward_hook(lambda m, i, o: maps.append(o))
    logits = net(torch.rand(2, 1, size, size))
    hook.remove()
    assert logits.shape == (2,)
    assert torch.isfinite(logits).all()
    assert len(maps) == 1 and maps[0].ndim == 4 and maps[0].shape[0] == 2

    logits.sum().backward()
    first = get_submodule(net.backbone, net.spec.first_conv)
    assert first.in_channels == 3
    assert first.weight.grad is not None and first.weight.grad.abs().sum() > 0

    head, body = list(net.head_parameters()), list(net.body_parameters())
    ids = [id(p) for p in head + body]
    assert len(ids) == len(set(ids)), "a parameter is in both the head and the body"
    assert set(ids) == {id(p) for p in net.parameters()}
    assert head and sum(p.numel() for p in head) < sum(p.numel() for p in body)


@pytest.mark.parametrize("name", BACKBONES)
def test_adapt_mode_runs_on_one_input_channel(name: str) -> None:
    torch.manual_seed(0)
    net = create_model(name, in_chans_mode="adapt").eval()
    first = get_submodule(net.backbone, net.spec.first_conv)
    assert first.in_channels == 1 and first.weight.shape[1] == 1
    assert net.mean.shape == (1, 1, 1, 1)
    # Only the first conv needs a gradient here: the backward pass still runs through every layer, at a
    # fraction of the cost of weight gradients for 50M parameters.
    for param in net.parameters():
        param.requires_grad_(param is first.weight)
    size = _size(name)
    logits = net(torch.rand(2, 1, size, size))
    assert logits.shape == (2,)
    logits.sum().backward()
    assert first.weight.grad is not None and first.weight.grad.abs().sum() > 0


def test_backbone_sees_the_grey_channel_replicated_and_normalised() -> None:
    net = create_model("resnet18").eval()
    seen: list[torch.Tensor] = []
    net.backbone.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    x = torch.rand(2, 1, 32, 32)
    net(x)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(seen[0], (x.expand(-1, 3, -1, -1) - mean) / std)
    # The normalisation travels with the weights.
    assert {"mean", "std"} <= set(net.state_dict())


def test_adapt_equals_replicate_when_channel_statistics_are_equal() -> None:
    torch.manual_seed(0)
    replicate = create_model("tiny_cnn").eval()
    adapt = create_model("tiny_cnn", in_chans_mode="adapt").eval()
    state = {k: v for k, v in replicate.state_dict().items() if k not in ("mean", "std")}
    state["backbone.features.0.0.weight"] = state["backbone.features.0.0.weight"].sum(1, keepdim=True)
    adapt.load_state_dict({**adapt.state_dict(), **state})
    x = torch.rand(3, 1, 40, 40)
    torch.testing.assert_close(adapt(x), replicate(x), rtol=1e-5, atol=1e-5)


def test_more_than_one_class_returns_a_logit_per_class() -> None:
    net = create_model("tiny_cnn", num_classes=3)
    assert net(torch.rand(2, 1, 32, 32)).shape == (2, 3)
    assert net.classifier().out_features == 3


def test_bad_arguments_are_refused() -> None:
    net = create_model("tiny_cnn")
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        net(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match="in_chans_mode"):
        create_model("tiny_cnn", in_chans_mode="mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_classes"):
        create_model("tiny_cnn", num_classes=0)


def test_get_submodule_accepts_negative_indices() -> None:
    net = create_model("tiny_cnn")
    assert get_submodule(net.backbone, "features.-1") is net.backbone.features[3]
    assert net.cam_target_layer() is net.backbone.features[3]


def test_model_pickles_and_deep_copies() -> None:
    """Needed for EMA copies, multiprocessing and torch.save(model); the spec's builder must be picklable."""
    net = create_model("tiny_cnn").eval()
    x = torch.rand(1, 1, 32, 32)
    for clone in (copy.deepcopy(net), pickle.loads(pickle.dumps(net))):
        assert clone.spec == net.spec
        torch.testing.assert_close(clone(x), net(x))
    for name in BACKBONES:
        assert pickle.loads(pickle.dumps(get_spec(name))) == get_spec(name)


@pytest.mark.parametrize("name", list_backbones())
def test_new_head_starts_near_probability_one_half(name: str) -> None:
    """Every backbone's fresh head gives logits near 0, whatever its library's own init (timm's goog init for a
    1-output EfficientNet head gave |logit| ~ 20). Train mode: batch norm's running statistics are not yet
    estimated at the start of training."""
    torch.manual_seed(0)
    net = create_model(name).train()
    size = max(get_spec(name).min_input_size, 75)
    with torch.no_grad():
        logits = net(torch.rand(4, 1, size, size))
    assert logits.abs().max().item() < 2.0
    head = net.classifier()
    assert float(head.bias.detach().abs().max()) == 0.0
