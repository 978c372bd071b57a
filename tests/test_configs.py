"""The shipped configs load, name registered backbones, and keep the study's rules (external site held out)."""

from __future__ import annotations

from pathlib import Path

import pytest

from alnus.config import load_config
from alnus.models import list_backbones

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_the_three_configs_of_the_design_ship() -> None:
    assert {p.stem for p in CONFIGS} >= {"demo", "paper", "public"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads_with_registered_models_and_an_external_site(path: Path) -> None:
    cfg = load_config(path)
    assert set(cfg.models) <= set(list_backbones())
    assert cfg.data.external_sites, "every study holds out an external site"
    assert cfg.data.positive_label in (cfg.data.labels or [cfg.data.positive_label])


def test_paper_config_is_zhou_2020() -> None:
    cfg = load_config(next(p for p in CONFIGS if p.stem == "paper"))
    assert cfg.models == ["inception_v3", "inception_resnet_v2", "resnet101"]
    assert cfg.data.internal_test_frac == pytest.approx(0.1)
    assert cfg.train.weights == "imagenet"
