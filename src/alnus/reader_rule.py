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
from alnus._text import printable
from alnus.errors import AlnusError

METHOD = "rule_out"
# The keys a reader rule must have, and the categories a call may start from (a rule-out needs a category below).
REQUIRED_KEYS = ("method", "scale", "positive_from", "lowest", "value", "level", "aggregate")
POSITIVE_FROM = ("4", "4a", "4b", "4c", "5")
# The columns a table of new images may name the radiologist's BI-RADS in, in the order they are looked for
# (`alnus predict` looks for the rule's own `--reader` column between them).
BIRADS_COLUMNS = ("birads", "reader_birads")
CARD_START, CARD_END = "<!-- reader-rule:start -->", "<!-- reader-rule:end -->"
# Manifest columns that identify or label an image: never a column of readings.
KEY_COLUMNS = ("image", "patient_id", "study_id", "site", "label", "roi", "mask", "frame", "split")
# The rules a package keeps in reader_rule_history (the latest ones): its metadata stays small.
MAX_HISTORY = 20
# The proportions a rule's `chosen_on` records (each in [0, 1], or null).
_SHARES = ("reader_sensitivity", "reader_specificity", "with_ai_specificity")
# Fewer malignant validation patients than this in the lowest category make a value that moves with the next few.
FEW_POSITIVES = 20


class ReaderRuleError(AlnusError):
    """A reader rule, or BI-RADS readings for one, that cannot be used as given; the message says what to do."""


def _is_probability(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return 0.0 <= float(value) <= 1.0
    except OverflowError:  # an integer too long for a float
        return False


def _shown(value: object) -> str:
    """A metadata value as an error quotes it: its repr, cut short (a crafted one can be megabytes, or an integer too
    long to print)."""
    text = (
        repr(value)
        if not isinstance(value, int) or value.bit_length() < 128
        else f"<an integer of {value.bit_length()} bits>"
    )
    return text if len(text) <= 40 else text[:37] + "..."


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
    value, lowest = out["value"], out["lowest"]
    problems = []
    if out["method"] != METHOD:
        problems.append(f"method {out['method']!r} is not {METHOD!r}")
    if out["scale"] != "birads":
        problems.append(f"scale {out['scale']!r} is not 'birads'")
    if out["positive_from"] not in POSITIVE_FROM:
        problems.append(f"positive_from {out['positive_from']!r} is not one of {', '.join(POSITIVE_FROM)}")
    elif not isinstance(lowest, list) or lowest != list(lowest_categories(out["positive_from"])):
        problems.append(f"lowest {lowest!r} is not {list(lowest_categories(out['positive_from']))}")
    if not _is_probability(value):
        problems.append(f"value {_shown(value)} is not a probability in [0, 1]")
    if out["level"] not in LEVELS:
        problems.append(f"level {out['level']!r} is not one of {', '.join(LEVELS)}")
    if out["aggregate"] not in AGGREGATES:
        problems.append(f"aggregate {out['aggregate']!r} is not one of {', '.join(AGGREGATES)}")
    chosen = out.get("chosen_on")
    if chosen is not None and not isinstance(chosen, Mapping):
        problems.append("chosen_on is not an object")
    elif chosen is not None:
        counts = [
            k for k, v in chosen.items() if k.startswith("n_") and (isinstance(v, bool) or not isinstance(v, int))
        ]
        shares = [k for k in _SHARES if chosen.get(k) is not None and not _is_probability(chosen[k])]
        if counts or shares:
            problems.append(f"chosen_on.{(counts + shares)[0]} is not a {'count' if counts else 'proportion'}")
        if not isinstance(chosen.get("reader", ""), str):
            problems.append("chosen_on.reader is not a column name")
    if problems:
        raise ReaderRuleError(f"{where}: reader_rule: {'; '.join(problems)}; {fix}.")
    out["value"] = float(value)
    return out


def check_rule_request(column: str, positive_from: str) -> None:
    """Refuse, before anything is predicted, a reader rule asked for on a column that is no column of readings (an
    identifying one, or a crafted name) or from a category a rule-out cannot start at."""
    if positive_from not in POSITIVE_FROM:
        raise ReaderRuleError(f"--positive-from {positive_from!r} must be one of {', '.join(POSITIVE_FROM)}.")
    if column in KEY_COLUMNS or len(column) > 200:
        raise ReaderRuleError(f"--reader {printable(column[:60])!r} is no column of readings; name the manifest's "
                              "column of BI-RADS readings (e.g. reader_birads).")  # fmt: skip


def reading_columns(rule: Mapping[str, Any] | None) -> tuple[str, ...]:
    """Where a table of new images holds the radiologist's reading, in the order looked for: `birads`, the column the
    package's rule was set from (`--reader`), then `reader_birads` (the importers')."""
    own = str(((rule or {}).get("chosen_on") or {}).get("reader") or "")
    return tuple(dict.fromkeys([BIRADS_COLUMNS[0], *([own] if own else []), *BIRADS_COLUMNS[1:]]))


def lowest_categories(positive_from: str) -> tuple[str, ...]:
    """The BI-RADS categories of the least suspicious positive reading at a call from `positive_from`."""
    return ("4", "4a") if positive_from in ("4", "4a") else (positive_from,)


def describe_reader_rule(record: Mapping[str, Any]) -> str:
    """The rule in one sentence, for notes, cards and the service. Calls are the radiologist's positive (BI-RADS at
    or above `positive_from`: biopsy) or negative, never a diagnosis."""
    lowest = " or ".join(record["lowest"])
    unit = record["level"]
    how = f" ({record['aggregate']} of the {unit}'s images)" if unit != "image" else ""
    return (
        f"radiologist with AI: the radiologist's call (positive at BI-RADS >= {record['positive_from']}), except that "
        f"a {unit} read as BI-RADS {lowest} whose model probability{how} is below {record['value']:.3f} is called "
        "negative (ruled out by the model)"
    )


def call_words(reader_call: int | None, with_ai_call: int | None) -> str:
    """The call with AI in words: positive, negative, or negative because the model ruled it out ("" for none)."""
    if reader_call is None or with_ai_call is None:
        return ""
    if int(with_ai_call):
        return "positive"
    return "negative (ruled out by the model)" if int(reader_call) else "negative"


def rule_caveats(record: Mapping[str, Any], positive_label: str = "malignant") -> list[str]:
    """What a user of the rule must know about how it was set: the misses a lowest-value rule-out allows, a value set
    by few patients, a rule that changed no validation call, and categories the setting site did not use."""
    chosen = record.get("chosen_on") or {}
    n = chosen.get("n_lowest_pos")
    lowest, unit = " or ".join(record["lowest"]), record["level"]
    out = []
    if isinstance(n, int) and n > 0:
        out.append(
            f"The value is the lowest model probability of {n} {positive_label} validation {unit}(s) read {lowest}: "
            f"about 1 in {n + 1} {positive_label} {unit}s read so can be expected to fall below it, so the rule-out "
            f"will miss some {positive_label} {unit}s the radiologist would have called positive (biopsy)."
        )
        if n < FEW_POSITIVES:
            out.append(f"Only {n} {positive_label} {unit}(s) set it: it moves a lot with the next ones.")
    spec, with_ai = chosen.get("reader_specificity"), chosen.get("with_ai_specificity")
    if spec is not None and spec == with_ai:
        out.append("On the validation patients it changed no call: it adds nothing there.")
    counts = chosen.get("lowest_counts")
    if isinstance(counts, Mapping) and len(record["lowest"]) > 1:
        used = [k for k in record["lowest"] if counts.get(k)]
        if len(used) == 1:
            out.append(
                f"Every validation {record['level']} in that band was read {used[0]}; a site that reads "
                f"{' or '.join(k for k in record['lowest'] if k != used[0])} instead may put fewer {positive_label} "
                f"{record['level']}s there: "
                "check the rule on labelled patients of that site before using it."
            )
    return out


def card_block_span(lines: Sequence[str]) -> tuple[int, int] | None:
    """Where a card's reader-rule block is: the first end marker on a line of its own, and the nearest start marker
    above it on a line of its own (a marker quoted in prose, or an example of one further up, is not the block)."""
    end = next((i for i, line in enumerate(lines) if line.strip() == CARD_END), None)
    if end is None:
        return None
    start = next((i for i in range(end - 1, -1, -1) if lines[i].strip() == CARD_START), None)
    return None if start is None else (start, end)


def without_card_block(card: str) -> tuple[str, bool]:
    """A model card without its reader-rule block, and whether it had one."""
    lines = card.splitlines()
    span = card_block_span(lines)
    if span is None:
        return card, False
    start, end = span
    kept = [*lines[:start], *lines[end + 1 :]]
    return "\n".join(kept).strip(), True
