"""bench/ship_model.py: a package shipped again gets its reader rule set once, on the run's validation patients, and
not stacked on the rule (and history) its source already carried."""

from __future__ import annotations

import json


def test_the_copied_packages_rule_and_its_history_are_dropped_before_the_ship_sets_its_own(bench, tmp_path):
    ship_model = bench("ship_model")
    meta = {"backbone": "efficientnet_lite0", "threshold": {"value": 0.7}, "reader_rule": {"value": 0.2},
            "reader_rule_history": [{"value": 0.3}]}  # fmt: skip
    (tmp_path / "metadata.json").write_text(json.dumps(meta), encoding="utf-8")
    ship_model._without_reader_rule(tmp_path)
    kept = json.loads((tmp_path / "metadata.json").read_text(encoding="utf-8"))
    assert kept == {"backbone": "efficientnet_lite0", "threshold": {"value": 0.7}}
