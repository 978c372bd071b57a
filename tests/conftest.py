"""Shared fixtures: the real-data folder (skipped with a reason when absent)."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest

# Debian's chromium under Playwright, for the tests of pages (tests/_browser.py says how it is installed).
from tests._browser import browser  # noqa: F401 - a fixture, registered by its import here

REPO = Path(__file__).resolve().parents[1]
# The CLI's console follows COLUMNS when it is set (alnus.cli._piped_width); the tests read its tables at the width
# it uses for piped output, whatever terminal started them.
os.environ.pop("COLUMNS", None)


def _shared_data() -> Path:
    return Path(os.environ.get("ALNUS_SHARED_DATA", REPO.parent / "shared" / "data")).resolve()


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], ModuleType]]:
    """Import a script of bench/ by name, as it runs (bench/ on sys.path); forgotten again after the test."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    loaded: list[str] = []

    def load(name: str) -> ModuleType:
        loaded.append(name)
        return importlib.import_module(name)

    yield load
    for name in loaded:
        sys.modules.pop(name, None)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The staged public datasets (BUS-BRA, BrEaST-Lesions-USG); skip when they are not on this machine."""
    root = _shared_data()
    if not (root / "BUS-BRA" / "manifest.csv").is_file():
        pytest.skip(f"real data not found at {root} (set ALNUS_SHARED_DATA to the folder holding BUS-BRA/)")
    return root


def pytest_configure(config: pytest.Config) -> None:
    """One intra-op thread per test process: `make test` runs 2 workers on 2 cores, and oversubscribed torch
    threads make the model tests several times slower in CPU time."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
