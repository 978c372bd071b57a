"""bench/box_shift.py (protocol item 27): the model card's box-shift measurement, one row per configuration."""

from __future__ import annotations


def test_a_row_holds_the_table_aucs_and_the_measured_changes(bench) -> None:
    box_shift = bench("box_shift")

    jitter = {"median_abs_change": 0.0163, "max_abs_change": 0.391, "image_calls_changed": 36, "calls_compared": 1008}
    line = box_shift.row("aux_geo", jitter, {"val AUC (selection)": "0.950 (0.9-1.0)", "external AUC": "0.86 (x)"})
    assert line == "| aux_geo | 0.950 (0.9-1.0) | 0.86 (x) | 0.016 | 0.39 | 36 of 1008 |"
    assert box_shift.row("x", jitter, None).startswith("| x |  |  | 0.016 |")  # not in the table yet: blank AUCs
    text = box_shift.section([line], 90.0, "python bench/box_shift.py", 252)
    assert "1.5 min" in text and "Each of the 252 external test images" in text and text.endswith(line)
