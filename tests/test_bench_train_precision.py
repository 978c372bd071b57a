"""bench/train_precision.py times fp32 and bf16 training steps per backbone and says what `auto` picks."""

from __future__ import annotations

import pytest


@pytest.fixture
def train_precision(bench):
    return bench("train_precision")


def test_a_section_with_every_variant_is_written_between_its_markers(train_precision, tmp_path, capsys) -> None:
    out = tmp_path / "performance.md"
    out.write_text("# Performance\n\nkept\n")
    assert train_precision.main(["--models", "tiny_cnn", "--size", "tiny_cnn=32", "--batch", "4", "--steps", "2",
                                 "--warmup", "0", "--out", str(out)]) == 0  # fmt: skip
    text = out.read_text()
    assert "kept" in text and "<!-- train-precision:start -->" in text and "<!-- train-precision:end -->" in text
    [row] = [line for line in text.splitlines() if line.startswith("| tiny_cnn |")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "32" and all(float(c) > 0 for c in cells[2:5])
    assert cells[5].startswith("**") and cells[5].removesuffix(" (noisy)").endswith("x**")
    assert "--size tiny_cnn=32" in text  # the command that measured it
