"""One way to make a model: `create_model(name, weights=...)` builds a registered backbone and loads its weights.

The registry (`alnus.models.registry`) knows the backbones' facts; `alnus.models.weights` knows where weights come
from; this module puts the two together, so neither imports the other's caller.
"""

from __future__ import annotations

from torch import nn

from alnus.models.registry import InChansMode, UltrasoundNet, get_spec
from alnus.models.weights import load_backbone_weights, parse_weights


def create_model(
    name: str,
    *,
    weights: str = "none",
    num_classes: int = 1,
    in_chans_mode: InChansMode = "replicate",
) -> UltrasoundNet:
    """Build a registered backbone for grey-scale ultrasound.

    Args:
        name: a name from `list_backbones()`.
        weights: `none` (random initialisation), `imagenet`, or `file:PATH` (see `alnus.models.weights`).
        num_classes: 1 for a binary task (the model returns the positive-class logit, shape `(B,)`).
        in_chans_mode: `replicate` or `adapt` (see `UltrasoundNet`).
    """
    spec = get_spec(name)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    kind, _ = parse_weights(weights)
    net = UltrasoundNet(spec, spec.builder(num_classes, kind == "none"), in_chans_mode=in_chans_mode)
    _init_head(net.classifier())
    if kind != "none":
        net.weights_report = load_backbone_weights(net, weights)
        net.weights_source = net.weights_report.source
    return net


def _init_head(head: nn.Module) -> None:
    """Start every backbone's new head at logits ~0 (probability ~0.5): small normal weights, zero bias.

    Libraries differ here: timm's EfficientNet init draws a 1-output head's weights from a wide uniform range, which
    puts the first logits of a pretrained backbone far from 0 and spends a head-first epoch undoing the init.
    """
    for module in head.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.01)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
