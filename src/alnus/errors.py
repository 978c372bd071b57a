"""Errors a user can act on: they name the file, the row and what to do."""

from __future__ import annotations


class AlnusError(Exception):
    """Bad input or a failed precondition; the CLI prints the message and exits with code 2."""

    exit_code = 2
