"""Text that users wrote (file names, labels, site names), made safe to print through rich."""

from __future__ import annotations

import re

from rich.markup import escape as _escape_markup

# C0 and C1 control characters but newline and tab: ESC sequences could move the cursor, recolour or retitle the
# terminal, or clear what was printed (a file name is data, never a terminal command).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# Unicode bidirectional controls (embeddings, overrides, isolates, marks): a right-to-left override in a site name
# would display the numbers after it backwards ("(60)" as "(06)"). They are shown as `\u202e`, never applied.
_BIDI = re.compile("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def no_bidi(text: object) -> str:
    """`text` with its bidirectional control characters shown as code points, e.g. `\\u202e` (for HTML, Markdown
    and figures)."""
    return _BIDI.sub(lambda m: f"\\u{ord(m.group()):04x}", str(text))


def escape(text: object) -> str:
    """`text` as rich prints it literally: markup brackets escaped, control characters shown as `\\xNN`."""
    return _escape_markup(printable(text))


def printable(text: object) -> str:
    """`text` with control characters shown as `\\xNN`, for rich `Text` objects (which take no markup)."""
    return no_bidi(_CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(text)))
