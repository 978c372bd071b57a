"""Backbones for grey-scale ultrasound: a registry of named backbones, one factory, and weight sources."""

from __future__ import annotations

from alnus.models.factory import create_model
from alnus.models.registry import (
    BackboneSpec,
    ImageNetSource,
    UltrasoundNet,
    UnknownBackboneError,
    get_spec,
    list_backbones,
    register_backbone,
)
from alnus.models.weights import (
    LoadReport,
    WeightsError,
    WeightsMismatchError,
    WeightsUnavailableError,
)

__all__ = [
    "BackboneSpec",
    "ImageNetSource",
    "LoadReport",
    "UltrasoundNet",
    "UnknownBackboneError",
    "WeightsError",
    "WeightsMismatchError",
    "WeightsUnavailableError",
    "create_model",
    "get_spec",
    "list_backbones",
    "register_backbone",
]
