"""File edges (`alnus._io`): spreadsheet-safe CSVs, regular files only, atomic writes."""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from alnus._io import (
    NotAFileError,
    atomic_write_text,
    defuse_formulas,
    file_problem,
    file_sha256,
    open_regular,
    spreadsheet_formula,
    write_csv,
)
from alnus.errors import AlnusError


@pytest.fixture
def alarm() -> Iterator[None]:
    """Fail (instead of hanging the suite) when a call blocks for more than 10 s."""

    def hung(signum: int, frame: object) -> None:
        raise TimeoutError("the call blocked")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(10)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize(
    "text",
    ["=cmd|' /C calc'!A0", "+1+1", "-2+3+cmd|' /C calc'!A0", "@SUM(A1)", "\t=1", "\r=1", "=", "-x", "+ve"],
)
def test_formula_cells_are_recognised(text: str) -> None:
    """issue 7.12: what Excel, LibreOffice and Google Sheets would run as a formula."""
    assert spreadsheet_formula(text)


@pytest.mark.parametrize("text", ["-0.5", "-1", "+3", "1e-3", "-.25", "-1E+5", "-", "+", "P-001", "a=b", "", " =1"])
def test_numbers_and_plain_text_are_left_alone(text: str) -> None:
    """issue 7.12: numbers stay numbers; a lone sign and text not starting with a trigger are harmless."""
    assert not spreadsheet_formula(text)


def test_write_csv_defuses_text_cells_only(tmp_path: Path) -> None:
    """issue 7.12: `=cmd|...` gets a leading `'`; `-0.25` in a numeric column and `-1` as text stay as they are."""
    df = pd.DataFrame(
        {
            "note": ["=cmd|' /C calc'!A0", "-1", "fine", None],
            "score": [-0.25, 1.0, -3.0, 2.5],
            "count": [1, -2, 3, 4],
            "@header": ["+SUM(1)", "x", "-", "+"],
        }
    )
    write_csv(df, tmp_path / "out.csv")
    back = pd.read_csv(tmp_path / "out.csv", dtype={"note": str, "'@header": str})
    assert list(back.columns) == ["note", "score", "count", "'@header"]
    assert back["note"].tolist()[:3] == ["'=cmd|' /C calc'!A0", "-1", "fine"] and pd.isna(back["note"][3])
    assert back["score"].tolist() == [-0.25, 1.0, -3.0, 2.5]
    assert back["count"].tolist() == [1, -2, 3, 4]
    assert back["'@header"].tolist() == ["'+SUM(1)", "x", "-", "+"]
    lines = (tmp_path / "out.csv").read_text().splitlines()
    assert not any(spreadsheet_formula(cell) for line in lines for cell in line.split(","))
    assert df["note"][0] == "=cmd|' /C calc'!A0", "the caller's frame is not changed"


def test_defuse_keeps_dtypes_and_string_columns(tmp_path: Path) -> None:
    """issue 7.12: pandas' str/string dtypes are text columns too; numeric dtypes are untouched."""
    df = pd.DataFrame({"a": pd.array(["=1", "b"], dtype="string"), "b": [1.5, -2.0]})
    out = defuse_formulas(df)
    assert out["a"].tolist() == ["'=1", "b"] and out["b"].dtype == df["b"].dtype


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes need a POSIX system")
def test_special_files_are_named_and_never_read(tmp_path: Path, alarm: None) -> None:
    """issue 7.11: a FIFO or /dev/zero hashed or opened would block or never end: refused at once."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "gone")
    expected = {
        fifo: "is a named pipe (FIFO)",
        tmp_path: "is a folder",
        link: "is a broken symbolic link",
        tmp_path / "missing": "file not found",
    }
    if Path("/dev/zero").exists():
        expected[Path("/dev/zero")] = "is a device"
    for path, words in expected.items():
        assert words in (file_problem(path) or "")
        with pytest.raises(NotAFileError, match=re.escape(words)) as info:
            file_sha256(path)
        assert isinstance(info.value, AlnusError) and str(path) in str(info.value)


def test_regular_files_open_and_hash(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    atomic_write_text(path, "abc")
    assert file_problem(path) is None
    with open_regular(path) as fh:
        assert fh.read() == b"abc"
    assert file_sha256(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_atomic_writes_get_the_usual_permissions(tmp_path, monkeypatch) -> None:
    """A report or table written atomically is readable by the group and others as any new file would be (the
    temporary file's private 0600 used to stay on the result)."""
    import os
    import stat

    from alnus._io import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "report.html", "<p>x</p>")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "report.html").stat().st_mode) == 0o644
