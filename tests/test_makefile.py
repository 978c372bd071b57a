"""README's two commands install through the Makefile's stamp: once per content of pyproject.toml, not per touch."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed on this machine")
def test_the_install_runs_again_only_when_the_dependency_list_changes(tmp_path: Path) -> None:
    """A new user's review: a fresh clone or a checkout left pyproject.toml newer than the stamp, so `make demo`
    reinstalled everything although its content (the stamp's name) had not changed."""
    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    digest = hashlib.sha256((tmp_path / "pyproject.toml").read_bytes()).hexdigest()[:16]
    (tmp_path / ".venv").mkdir()
    stamp = tmp_path / ".venv" / f".installed-{digest}"
    stamp.touch()
    os.utime(stamp, (1_000_000_000, 1_000_000_000))  # older than the pyproject.toml just copied

    def planned() -> str:
        done = subprocess.run(["make", "-n", "setup"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert "pip install" not in planned()  # touched, same content: nothing to install
    with (tmp_path / "pyproject.toml").open("a") as fh:
        fh.write("\n# another dependency list\n")
    assert "pip install" in planned()  # another content: another stamp name, installed again
