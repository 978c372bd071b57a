"""The radiologist with the model, at prediction time: the reader rule a model package can carry.

`alnus evaluate` compares the radiologist with and without the model on a study's test splits (`alnus.combine`). The
rule-out form of that comparison is the one a clinic can use case by case, so a package can carry it: the
radiologist's call (BI-RADS >= `positive_from`), except that a patient in the least suspicious category called
positive (a plain 4 or 4a for a call at >= 4a) whose model probability is below the rule's value is called negative.
The value is the lowest model probability among the malignant validation patients of that category
(`alnus.combine.fit_rule_out`), so on those patients the radiologist's sensitivity is kept and every benign patient
below it is spared a biopsy. It is set once, on labelled validation patients with their BI-RADS
(`alnus reader-rule PACKAGE --manifest CSV`), at the level and aggregation of the package's threshold, and
`alnus.combine.apply_reader_rule` applies it the same way: a patient's images are combined as when it was set, and a
patient read on several images takes the most suspicious reading (`alnus.readers`). This module holds what a package
needs to check and state its rule, and nothing above the data layer: setting it lives in `alnus.evaluate`
(`reader_rule_on_validation`) and `alnus.adapt` (`freeze_reader_rule`), its card block in `alnus.report.card`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from alnus._levels import AGGREGATES, LEVELS
from alnus.errors import AlnusError

METHOD = "rule_out"
# The keys a reader rule must have, and the categories a call may start from (a rule-out needs a category below).
REQUIRED_KEYS = ("method", "scale", "positive_from", "lowest", "value", "level", "aggregate")
POSITIVE_FROM = ("4", "4a", "4b", "4c", "5")
# The columns a table of new images may name the radiologist's BI-RADS in (the first found is used).
BIRADS_COLUMNS = ("birads", "reader_birads")
CARD_START, CARD_END = "<!-- reader-rule:start -->", "<!-- reader-rule:end -->"
# The columns `apply_reader_rule` adds.
OUTPUT_COLUMNS = ("birads", "reader_call", "with_ai_call")


class ReaderRuleError(AlnusError):
    """A reader rule, or BI-RADS readings for one, that cannot be used as given; the message says what to do."""


def check_reader_rule(record: object, where: str) -> dict[str, Any] | None:
    """A reader rule read from a package, checked (None: the package has none)."""
    if record is None:
        return None
    fix = "correct reader_rule in metadata.json, or set it to null and set it again with `alnus reader-rule`"
    if not isinstance(record, Mapping):
        raise ReaderRuleError(f"{where}: reader_rule must be an object (or null); {fix}.")
    missing = [k for k in REQUIRED_KEYS if k not in record]
    if missing:
        raise ReaderRuleError(f"{where}: reader_rule lacks {', '.join(missing)}; {fix}.")
    out = dict(record)
    value = out["value"]
    problems = []
    if out["method"] != METHOD:
        problems.append(f"method {out['method']!r} is not {METHOD!r}")
    if out["scale"] != "birads":
        problems.append(f"scale {out['scale']!r} is not 'birads'")
    if out["positive_from"] not in POSITIVE_FROM:
        problems.append(f"positive_from {out['positive_from']!r} is not one of {', '.join(POSITIVE_FROM)}")
    elif list(out["lowest"]) != list(lowest_categories(out["positive_from"])):
        problems.append(f"lowest {out['lowest']!r} is not {list(lowest_categories(out['positive_from']))}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 <= float(value) <= 1.0):
        problems.append(f"value {value!r} is not a probability in [0, 1]")
    if out["level"] not in LEVELS:
        problems.append(f"level {out['level']!r} is not one of {', '.join(LEVELS)}")
    if out["aggregate"] not in AGGREGATES:
        problems.append(f"aggregate {out['aggregate']!r} is not one of {', '.join(AGGREGATES)}")
    if problems:
        raise ReaderRuleError(f"{where}: reader_rule: {'; '.join(problems)}; {fix}.")
    out["value"] = float(value)
    out["lowest"] = list(out["lowest"])
    return out


def lowest_categories(positive_from: str) -> tuple[str, ...]:
    """The BI-RADS categories of the least suspicious positive reading at a call from `positive_from`."""
    return ("4", "4a") if positive_from in ("4", "4a") else (positive_from,)


def describe_reader_rule(
    record: Mapping[str, Any], positive_label: str = "malignant", negative_label: str | None = None
) -> str:
    """The rule in one sentence, for notes, cards and the service (`negative_label`: the other label of a binary
    model; else "not <positive>")."""
    lowest = " or ".join(record["lowest"])
    unit = "patient" if record["level"] == "patient" else record["level"]
    how = f" ({record['aggregate']} of the {unit}'s images)" if record["level"] != "image" else ""
    return (
        f"radiologist with AI: the radiologist's call (BI-RADS >= {record['positive_from']}), except that a {unit} "
        f"read as BI-RADS {lowest} whose model probability{how} is below {record['value']:.3f} is called "
        f"{negative_label or 'not ' + positive_label}"
    )


def negative_label_of(meta: Mapping[str, Any]) -> str | None:
    """The negative label of a package's metadata: its other label when it has two, else None."""
    others = [str(n) for n in meta.get("label_names", []) if str(n) != str(meta.get("positive_label"))]
    return others[0] if len(others) == 1 else None


def birads_column(columns: Sequence[str]) -> str | None:
    """Which column of a table of new images holds the radiologist's BI-RADS (`BIRADS_COLUMNS`), if any."""
    return next((c for c in BIRADS_COLUMNS if c in columns), None)


def without_card_block(card: str) -> tuple[str, bool]:
    """A model card without its reader-rule block, and whether it had one."""
    head, start, rest = card.partition(CARD_START)
    if not start or CARD_END not in rest:
        return card, False
    return (head.rstrip("\n") + "\n" + rest.split(CARD_END, 1)[1].lstrip("\n")).strip(), True
