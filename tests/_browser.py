"""Debian's chromium driven by Playwright, for the tests of pages (the report, the service's web page).

The `browser` fixture installs chromium with apt-get when it is missing, and Playwright with pip when it cannot be
imported; tests skip, saying why, only where that is impossible (not root, no apt-get, no network). Nothing is
downloaded by Playwright itself (`playwright install` needs the internet).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path("/usr/bin/chromium")
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
# Package installation can be slow on a cold mirror; it happens once per machine.
INSTALL_TIMEOUT_S = 900


def _run(command: list[str]) -> bool:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        return subprocess.run(command, env=env, capture_output=True, timeout=INSTALL_TIMEOUT_S).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _install_chromium() -> str | None:
    """Install Debian's chromium when it is absent; return why not when that cannot be done."""
    if CHROMIUM.is_file():
        return None
    if shutil.which("apt-get") is None:
        return f"{CHROMIUM} is absent and this system has no apt-get to install Debian's chromium"
    if os.geteuid() != 0:
        return f"{CHROMIUM} is absent and installing it needs root: run `sudo apt-get install -y chromium`"
    install = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]
    if not _run(install) and not (_run(["apt-get", "update"]) and _run(install)):
        return "apt-get could not install chromium (no network or no package source?)"
    return None if CHROMIUM.is_file() else f"apt-get installed chromium but {CHROMIUM} is not there"


def _playwright() -> Any:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if not _run([sys.executable, "-m", "pip", "install", "-q", "playwright"]):
            pytest.skip("Python playwright is not installed and `pip install playwright` failed (no network?)")
        from playwright.sync_api import sync_playwright
    return sync_playwright


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    reason = _install_chromium()
    if reason is not None:
        pytest.skip(reason)
    with _playwright()() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS)
        yield chromium
        chromium.close()


class Watch:
    """Everything a page asks of the outside world or complains about: requests, console errors, dialogs."""

    def __init__(self, page: Any) -> None:
        self.requests: list[str] = []
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        page.on("request", lambda r: self.requests.append(r.url))
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.on("dialog", self._dialog)

    def _dialog(self, dialog: Any) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()
