"""The figures' shared look: palette, resolution, fonts, a new figure, and user text shown literally."""

from __future__ import annotations

from matplotlib.figure import Figure as MplFigure

from alnus._text import printable

# Okabe & Ito (2008), "Color universal design": distinguishable with every common colour-vision deficiency.
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000")
DPI = 100
FONT = {"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8}


def plain(text: object, width: int | None = None) -> str:
    """User text shown as written: `$` would start mathtext in matplotlib; long names are shortened."""
    out = printable(text)  # control characters (ESC) and bidi overrides shown as text, not drawn or applied
    if width is not None and len(out) > width:
        out = out[: width - 1] + "\u2026"
    return out.replace("$", r"\$")


def new_figure(width: float, height: float) -> MplFigure:
    return MplFigure(figsize=(width, height), dpi=DPI, layout="constrained")
