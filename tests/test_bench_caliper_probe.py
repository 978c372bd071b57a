"""bench/caliper_probe.py draws BUS-BRA-like calipers where a sonographer puts them: a "+" at the midpoint of each
edge of the lesion box, scaled to the image, clipped at its border, on a copy."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture
def probe(bench):
    return bench("caliper_probe")


def test_a_plus_at_each_edge_midpoint_of_the_box(probe) -> None:
    image = np.zeros((200, 290), dtype=np.uint8)
    out = probe.draw_calipers(image, (100, 50, 60, 40))
    assert not image.any(), "the input is left alone"
    for cx, cy in ((130, 50), (130, 89), (100, 70), (159, 70)):
        assert out[cy, cx - probe.ARM] == out[cy, cx + probe.ARM] == probe.GREY
        assert out[cy - probe.ARM, cx] == out[cy + probe.ARM, cx] == probe.GREY
        assert out[cy - 2, cx - 2] == 0, "a plus, not a square"
    assert (out == probe.GREY).sum() == 4 * (4 * probe.ARM + 1)


def test_marks_scale_with_a_wider_image_and_clip_at_its_border(probe) -> None:
    wide = probe.draw_calipers(np.zeros((400, 580), dtype=np.uint8), (200, 100, 120, 80))
    assert wide[100, 260 + 2 * probe.ARM] == probe.GREY and wide[100, 260 + 2 * probe.ARM + 1] == 0
    edge = probe.draw_calipers(np.zeros((60, 60), dtype=np.uint8), (0, 0, 60, 60))
    assert edge.shape == (60, 60) and edge[0, 30] == probe.GREY and edge[30, 0] == probe.GREY
