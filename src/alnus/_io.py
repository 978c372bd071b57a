"""File edges: atomic writes, reading only regular files, and CSV cells that a spreadsheet cannot run.

See docs/architecture.md ("Conventions" and "Output CSVs").
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from alnus.errors import AlnusError

# A cell starting with one of these is read as a formula by Excel, LibreOffice and Google Sheets (tab and carriage
# return are dropped by some of them, so what follows still counts); OWASP's CSV-injection list.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
# A plain number (`-0.5`, `+3`, `-1e-3`): a spreadsheet reads it as that number, so it is left as it is.
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
# What `file_problem` says of a path that does not exist (callers word that case themselves).
FILE_NOT_FOUND = "file not found"


class NotAFileError(AlnusError):
    """A path that cannot be read as a regular file: missing, a folder, a FIFO, a device, a broken link."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path` in one rename."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes the file private (0600); a new result gets the permissions any new file would (0666 - umask),
        # a replaced one keeps its own (a private file stays private).
        if tmp_path.exists():
            os.chmod(tmp_path, _kept_mode(target))
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


# The name `atomic_path` gives its temporary file: "." + the target's name + "." + mkstemp's 8 characters + ".tmp".
_TEMPORARY = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")


def remove_temporaries(folder: str | os.PathLike[str], since: float) -> int:
    """Remove the temporary files `atomic_path` left under `folder` when its writer, which started at `since` (a
    POSIX time), was killed (kill -9, power loss) before it could clean up; only for a folder no other writer is using
    (a run folder whose lock was taken over). A file last changed before that writer started is not its own and is
    kept, whatever its name; links are neither followed nor removed. Returns how many were removed."""
    removed = 0
    for root, _, files in os.walk(folder, followlinks=False):
        for name in files:
            path = Path(root) / name
            if (_TEMPORARY.fullmatch(name) and not path.is_symlink() and path.is_file()
                    and path.stat().st_mtime >= since - 2):  # fmt: skip
                with contextlib.suppress(OSError):
                    path.unlink()
                    removed += 1
    return removed


def file_identity(path: str | os.PathLike[str]) -> tuple[int, int] | None:
    """The file's (device, inode): one value however it is named (a link, a hard link, another spelling on a
    case-insensitive file system); None when it cannot be read."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return (st.st_dev, st.st_ino)


def _kept_mode(target: Path) -> int:
    """The permission bits of the regular file `target`, or those of a new file when there is none."""
    with contextlib.suppress(OSError):
        st = os.stat(target)
        if stat.S_ISREG(st.st_mode):
            return stat.S_IMODE(st.st_mode)
    return 0o666 & ~_umask()


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (os.umask would, for all threads)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status", encoding="ascii") as fh:
            return int(next(line for line in fh if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` atomically (temporary file in the same folder, fsync, rename)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def spreadsheet_formula(text: str) -> bool:
    """Whether a spreadsheet opening a CSV would run `text` as a formula.

    True for text starting with `=`, `+`, `-`, `@`, tab or carriage return, except plain numbers (`-0.5`, `+3`,
    `1e-3`) and a lone `+` or `-` (which spreadsheets keep as text).
    """
    if not text.startswith(_FORMULA_STARTS):
        return False
    return text not in ("+", "-") and _NUMBER.fullmatch(text) is None


def _defuse(value: object) -> object:
    return "'" + value if isinstance(value, str) and spreadsheet_formula(value) else value


def defuse_formulas(df):  # noqa: ANN001, ANN201 - pandas is imported lazily
    """A copy of `df` whose text cells and column names that a spreadsheet would run get a leading `'`.

    Numeric columns and text that is a plain number are left alone, so values read back as they were written.
    """
    out = df.copy()
    for column in out.columns:
        # Text columns (object, str, string dtypes) have kind "O"; numbers, booleans and dates are left alone.
        if out[column].dtype.kind == "O":
            out[column] = out[column].map(_defuse)
    out.columns = [_defuse(name) for name in out.columns]
    return out


def write_csv(df, path: str | os.PathLike[str]) -> None:  # noqa: ANN001 - pandas is imported lazily
    """Write a DataFrame as CSV atomically, without the index; cells a spreadsheet would run are defused.

    See `defuse_formulas`. Identifiers that later stages read back (image paths, patient IDs, labels, sites) are
    refused by `alnus.data.manifest.validate_manifest` when they look like a formula, so they never change here.
    """
    with atomic_path(path) as tmp:
        defuse_formulas(df).to_csv(tmp, index=False)


def file_problem(path: str | os.PathLike[str]) -> str | None:
    """Why `path` is not a readable regular file, in words (e.g. "is a named pipe (FIFO)"); None when it is one.

    Looks at the file's type only (`os.stat`): it never opens it, so a FIFO or a device cannot block.
    """
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        if os.path.islink(path):
            return f"is a broken symbolic link (its target {os.readlink(path)} does not exist)"
        return FILE_NOT_FOUND
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "is a folder, not a file"
    if stat.S_ISFIFO(mode):
        return "is a named pipe (FIFO), not a file: reading it would wait for a writer"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "is a device, not a file"
    if stat.S_ISSOCK(mode):
        return "is a socket, not a file"
    return "is not a regular file"


@contextlib.contextmanager
def open_regular(path: str | os.PathLike[str]) -> Iterator[IO[bytes]]:
    """Open a regular file for binary reading; anything else raises `NotAFileError` at once, without blocking.

    The type is checked before opening and again on the open descriptor, so a file swapped for a FIFO in between
    is refused too (the open itself does not block: O_NONBLOCK).
    """
    problem = file_problem(path)
    if problem is not None:
        raise NotAFileError(f"{path}: {problem}")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotAFileError(f"{path}: is not a regular file (it changed while being opened)")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        fh = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with fh:
        yield fh


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB chunks (content hashes for caches, packages and data stamps).

    Raises:
        NotAFileError: `path` is not a regular file (a FIFO or a device would never end).
    """
    import hashlib

    digest = hashlib.sha256()
    with open_regular(path) as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def split_paths(cell: object) -> list[str]:
    """The paths in a manifest cell that may hold several, separated by `;` (mask columns), stripped, none empty."""
    return [part.strip() for part in str(cell).split(";") if part.strip()]
