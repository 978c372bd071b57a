"""The `alnus` command as a user runs it, for tests: a user error (AlnusError) is its message and exit code, as
`alnus.cli.main` prints them; anything else propagates."""

from __future__ import annotations

from typer.testing import CliRunner

from alnus.cli import app
from alnus.errors import AlnusError


def run_cli(*args: str) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of `alnus ARGS...` (the error's message appended to stderr)."""
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})
    if isinstance(result.exception, AlnusError):
        return result.exception.exit_code, result.stdout, result.stderr + str(result.exception)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr
