"""Text that users wrote (file names, labels, site names), made safe to print through rich."""

from __future__ import annotations

import re

from rich.markup import escape as _escape_markup

# C0 and C1 control characters but newline and tab: ESC sequences could move the cursor, recolour or retitle the
# terminal, or clear what was printed (a file name is data, never a terminal command).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def escape(text: object) -> str:
    """`text` as rich prints it literally: markup brackets escaped, control characters shown as `\\xNN`."""
    return _escape_markup(printable(text))


def printable(text: object) -> str:
    """`text` with control characters shown as `\\xNN`, for rich `Text` objects (which take no markup)."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(text))
