"""The operating point: the threshold frozen on validation, with the rule, level and aggregation it was chosen by.

The threshold is chosen once, on validation only, by a named rule at a named level (patient: the mean, or the max,
of a patient's image probabilities; study; or image) and frozen into the model package with that rule, level and
aggregation. Every later use applies it the same way: `apply_operating_point` combines a patient's (study's) images
exactly as they were combined when it was frozen, and makes the call on that combined probability. A row without a
patient id (study id) is its own patient (study). `check_operating_point` validates a record read from a package and
`describe` says the rule in words. Pure pandas, so prediction, evaluation, a report and a service share it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from alnus._levels import AGGREGATES, LEVELS, unit_keys
from alnus.errors import AlnusError

RULES = ("youden", "sensitivity", "specificity")
# Fewer validation cases of a class than this, and a threshold chosen on them is said to be unstable.
FEW_CASES = 20
# The keys an operating point must have; `target` may be null (it is for the Youden rule).
REQUIRED_KEYS = ("value", "rule", "target", "level", "aggregate")


class OperatingPointError(AlnusError):
    """An operating point that cannot be used as given; the message names where it came from and what to do."""


def few_cases_note(point: Mapping[str, Any]) -> str:
    """A warning when the threshold was chosen on fewer than `FEW_CASES` cases of a class ("" otherwise)."""
    chosen = point.get("chosen_on") or {}
    few = min(chosen.get("n_pos", FEW_CASES), chosen.get("n_neg", FEW_CASES))
    if not isinstance(few, int) or few >= FEW_CASES:
        return ""
    return (f"the threshold was chosen on validation cases whose smaller class has only {few}: a threshold chosen "
            "on so few moves a lot with the next patients; give more validation patients.")  # fmt: skip


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def check_operating_point(record: object, where: str) -> dict[str, Any]:
    """A checked copy of an operating point record (`value` as a float), or OperatingPointError naming the key.

    Args:
        record: a mapping with value (in [0, 1]), rule, target, level and aggregate, plus any descriptive keys.
        where: what the record came from (e.g. the metadata.json path), for the message.
    """
    if not isinstance(record, Mapping):
        raise OperatingPointError(
            f"{where}: threshold must be an object with {', '.join(REQUIRED_KEYS)} (or null when none is frozen); "
            f"got {record!r}."
        )
    missing = [key for key in REQUIRED_KEYS if key not in record]
    if missing:
        raise OperatingPointError(f"{where}: threshold lacks {', '.join(f'threshold.{k}' for k in missing)}.")
    value, rule, target = record["value"], record["rule"], record["target"]
    if not _is_number(value) or not math.isfinite(float(value)) or not 0.0 <= float(value) <= 1.0:
        raise OperatingPointError(f"{where}: threshold.value = {value!r} is not a probability in [0, 1].")
    if rule not in RULES:
        raise OperatingPointError(f"{where}: threshold.rule = {rule!r} is not one of {', '.join(RULES)}.")
    if rule == "youden" and target is not None:
        raise OperatingPointError(f"{where}: threshold.target = {target!r}, but the Youden rule takes no target.")
    if rule != "youden" and (not _is_number(target) or not 0.0 < float(target) <= 1.0):
        raise OperatingPointError(f"{where}: threshold.target = {target!r} is not a {rule} in (0, 1] for rule {rule}.")
    if record["level"] not in LEVELS:
        raise OperatingPointError(f"{where}: threshold.level = {record['level']!r} is not one of {', '.join(LEVELS)}.")
    if record["aggregate"] not in AGGREGATES:
        raise OperatingPointError(
            f"{where}: threshold.aggregate = {record['aggregate']!r} is not one of {', '.join(AGGREGATES)}."
        )
    return {**dict(record), "value": float(value), "target": None if target is None else float(target)}


def rule_name(record: Mapping[str, Any]) -> str:
    """Short name of how a threshold is chosen, e.g. `youden, patient mean` or `sensitivity>=0.9, image`."""
    rule = record["rule"] if record["rule"] == "youden" else f"{record['rule']}>={record['target']:g}"
    level = record["level"] if record["level"] == "image" else f"{record['level']} {record['aggregate']}"
    return f"{rule}, {level}"


def same_rule(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two records were chosen the same way (rule, target, level, aggregate), whatever their values."""
    keys = ("rule", "target", "level", "aggregate")
    if a["level"] == "image" and b["level"] == "image":
        keys = keys[:3]  # images are not combined, so the aggregation does not matter
    return all(a[k] == b[k] for k in keys)


def describe(record: Mapping[str, Any]) -> str:
    """The call rule in words, e.g. `call = mean probability of a patient's images >= 0.4321`."""
    value = f"{float(record['value']):.4g}"
    if record["level"] == "image":
        return f"call = probability of each image >= {value}"
    return f"call = {record['aggregate']} probability of a {record['level']}'s images >= {value}"


def apply_operating_point(table: pd.DataFrame, record: Mapping[str, Any]) -> pd.DataFrame:
    """Calls for every row of a table of image probabilities, made the way the threshold was frozen.

    Args:
        table: one row per image with `prob`, and the unit's ids where known (site, patient_id, study_id).
        record: a checked operating point (`check_operating_point`).

    Returns:
        A frame aligned with `table`: `unit_prob` (the aggregate of the unit's image probabilities: the mean or
        the max at patient/study level, the image's own at image level), `n_images` (images in the unit),
        `call` (0/1, `unit_prob >= value`, the same for every image of a unit) and `call_level`.
    """
    level, how = record["level"], record["aggregate"]
    prob = pd.to_numeric(table["prob"], errors="coerce").astype(float)
    if level not in LEVELS:
        raise OperatingPointError(f"level must be one of {', '.join(LEVELS)}; got {level!r}.")
    keys = unit_keys(table, level)
    grouped = prob.groupby(keys, sort=False)
    unit_prob = grouped.transform(how) if level != "image" else prob
    out = pd.DataFrame(
        {
            "unit_prob": unit_prob.to_numpy(),
            "n_images": grouped.transform("size").to_numpy().astype(int),
            "call": (unit_prob.to_numpy() >= float(record["value"])).astype(int),
            "call_level": level,
        },
        index=table.index,
    )
    return out
