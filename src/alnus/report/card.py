"""The model card: `README.md` in every model package, beside weights.safetensors and metadata.json.

Written at report time (`alnus report`, the last stage of `alnus study`) from the package's metadata, the run's
split and metrics.json: intended and out-of-scope use, training data, validation results with CIs per split, the
frozen threshold, known limitations, licence and how to cite (Mitchell et al., "Model cards for model reporting",
FAT* 2019). The report shows the same Markdown, rendered to HTML by `render_markdown`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from alnus._io import atomic_write_text
from alnus._text import printable
from alnus.data.tta import all_views
from alnus.evaluate import format_auc, format_proportion
from alnus.models.package import is_ensemble, preprocess_of
from alnus.operating_point import describe, rule_name
from alnus.report._inputs import Network, RunInputs, members, shareable_text, single_model, starting_weights
from alnus.report.methods import SIMULATED, averaged_weights_text, levers_text
from alnus.runfolder import EVALUATION_SPLITS

CARD_FILE = "README.md"
NOTICE = "Research use only; not for diagnosis."
ZHOU_2020 = (
    "Zhou L-Q, Wu X-L, Huang S-Y, et al. Lymph node metastasis prediction from primary breast cancer US images "
    "using deep learning. Radiology 2020;294(1):19-28. doi:10.1148/radiol.2019190372"
)
# The characters that make Markdown of text inside a line (code, emphasis, links, raw HTML, entities, table cells,
# headings, and math: `$` in GitHub's Markdown); CommonMark lets any of them be backslash-escaped. The others stay
# readable in the raw README.md.
_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>&|#$])")
# At the start of a line (e.g. a list item that is user text), these would begin a nested list.
_MD_LINE_START = re.compile(r"^(\d*)([-+.)])(?=\s|$)")


def md_text(value: object) -> str:
    """User text as literal Markdown text: its Markdown characters escaped, line breaks as spaces, other control
    characters shown as `\\xNN` (a raw ESC in a card would act on the terminal that prints it)."""
    text = _MD_SPECIAL.sub(r"\\\1", printable(" ".join(str(value).split())))
    return _MD_LINE_START.sub(r"\1\\\2", text)


def render_markdown(text: str, heading_offset: int = 0) -> str:
    """Markdown -> HTML for the report: raw HTML, links and images are off, so the result requests nothing.

    `heading_offset` moves every heading down that many levels (at most to h6), so that a card shown inside a report
    block keeps its headings under the block's own.
    """
    import re

    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": False}).enable("table").disable(["link", "image", "autolink"])
    html = md.render(text)
    if not heading_offset:
        return html
    # With raw HTML off, every <hN> tag of the output is a Markdown heading (text of the card is escaped).
    return re.sub(r"<(/?)h([1-6])>", lambda m: f"<{m[1]}h{min(6, int(m[2]) + heading_offset)}>", html)


def _table(columns: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _label_text(meta: Mapping[str, Any]) -> tuple[str, str]:
    positive = str(meta["positive_label"])
    others = [str(x) for x in meta.get("label_names", []) if str(x) != positive]
    return positive, (others[0] if others else f"not {positive}")


_REGION = {"box": "inside a lesion box", "mask": "inside a lesion mask", "whole": "of the whole image"}


def _roi_modes(meta: Mapping[str, Any]) -> list[str]:
    """The ROI modes of the package's networks (one for a single network, each member's for an ensemble), each once."""
    return list(dict.fromkeys(pre["roi"]["mode"] for pre in preprocess_of(meta)))


def intended_use(meta: Mapping[str, Any]) -> list[str]:
    """The intended and out-of-scope use as Markdown lines (the card's section and the report's opening)."""
    positive, negative = _label_text(meta)
    modes = _roi_modes(meta)
    where = _REGION[modes[0]] if len(modes) == 1 else f"its members look at ({'; '.join(_REGION[m] for m in modes)})"
    return [
        f"Research on retrospective breast ultrasound images: the model gives the probability that a case is "
        f"**{md_text(positive)}** rather than **{md_text(negative)}** from the image region {where}, and a call at "
        "the threshold frozen on validation. It is meant for studying and re-validating the method on new data, "
        "and for comparison with radiologists' readings.",
        "",
        f"**{NOTICE}**",
        "",
        "Out of scope: any clinical decision for a patient (diagnosis, biopsy or surgery, axillary staging); images "
        "of other modalities or body parts; scanners, hospitals or populations unlike the training data, without "
        "validating the model there first; a label other than the one it was trained on; images whose region of "
        "interest is chosen differently from the training data.",
    ]


def _development_images(inputs: RunInputs, model: str, package: Path) -> list[str]:
    """What the package knows of the images it learned from (`alnus.data.seen`), and what prediction does with it."""
    from alnus.data.seen import FILE, SPLITS, SeenImagesError, read_development_images

    meta = inputs.metadata[model]
    try:
        seen = read_development_images(package, meta.get("training_data_hash"))
    except SeenImagesError as exc:
        return ["", f"The package's `{FILE}` cannot be used ({md_text(exc)}), so prediction does not check it."]
    if seen is None:
        return ["", f"The package holds no `{FILE}` (it was written before alnus recorded one), so `alnus predict` "
                "cannot say when an image is one the model was trained or selected on."]  # fmt: skip
    listed = " and ".join(f"{seen.splits.count(split)} {split}" for split in SPLITS if split in seen.splits)
    return [
        "",
        f"Development images: `{FILE}` holds the perceptual hashes (pHash, 256 bits) of the {listed} images, not "
        "their pixels. `alnus predict`, the service and `alnus score` warn when an image lies within "
        f"{seen.max_distance} bits of one of them (the image itself, or a re-saved or rescaled copy), since the "
        "model's output on it is no test of the model. Crops, padding and mirror images of them are not recognised.",
    ]


def _training_data(inputs: RunInputs, model: str, package: Path) -> list[str]:
    splits = inputs.splits
    dev = splits[splits["split"].isin(["train", "val"])]
    positive = inputs.config.get("data", {}).get("positive_label", "positive")
    rows = []
    for (split, site), part in dev.groupby(["split", "site"]):
        pos = part[part["label"] == positive]
        rows.append([
            md_text(split), md_text(site), str(part["patient_id"].nunique()), str(len(part)),
            str(pos["patient_id"].nunique()), str(len(pos)),
        ])  # fmt: skip
    dates = [c for c in splits.columns if "date" in c.lower()]
    when = "the manifest records no dates"
    if dates:
        values = pd.to_datetime(dev[dates[0]], errors="coerce").dropna()
        when = f"{md_text(dates[0])} from {values.min():%Y-%m-%d} to {values.max():%Y-%m-%d}" if len(values) else when
    digest = inputs.metadata[model].get("training_data_hash", "")
    return [
        "## Training data",
        "",
        f"Patients and images the model was trained (train) and selected (val) on; dates: {when}.",
        "",
        *([f"**{SIMULATED}**", ""] if inputs.data_stamp.get("simulated") is True else []),
        _table(["split", "site", "patients", "images", "positive patients", "positive images"], rows),
        "",
        f"Training-data hash: `{md_text(digest[:16])}` (in metadata.json).",
        *_development_images(inputs, model, package),
    ]


def _input_text(pre: Mapping[str, Any]) -> str:
    roi = pre["roi"]
    crop = "whole image" if roi["mode"] == "whole" else f"{roi['mode']} crop with a margin of {roi['margin']:g}"
    grey = {"stretch": ", grey levels stretched", "equalize": ", histogram equalised"}.get(pre.get("grey", "none"), "")
    if pre.get("max_crop") is not None:
        grey = f", reduced to at most {pre['max_crop']} px{grey}"
    return f"{crop}{grey}, resized to {pre['size']} px ({'aspect kept' if pre['keep_aspect'] else 'stretched'})"


def _tta_line(meta: Mapping[str, Any]) -> list[str]:
    views = list(meta.get("tta") or [])
    if not views:
        return []
    return [
        f"- Test-time augmentation: the probability is the mean over the views {', '.join(all_views(views))} "
        "(`alnus.data.tta`); heat maps show the unaugmented image"
    ]


def _selected(network: Network) -> str:
    """'selected at epoch 15 by validation AUC (0.966 per patient, as computed while training)' as Markdown: the
    training loop's figure, in its precision and before packaging, so it may differ a little from the evaluation's."""
    auc = (
        f" ({network.val_auc:.3f} per {md_text(network.level)}, as computed while training)"
        if network.val_auc is not None
        else ""
    )
    if network.last_epoch:
        its = auc.replace(" (", " (its validation AUC ", 1)
        return f"the last epoch ({md_text(network.best_epoch)}) kept, not chosen on validation{its}"
    return f"selected at epoch {md_text(network.best_epoch)} by validation AUC{auc}"


def _trained(network: Network) -> str:
    """'seed 1; starting weights: none; selected at epoch 15 by validation AUC (...)' as Markdown."""
    seed = "not recorded" if network.seed is None else md_text(network.seed)
    start = md_text(network.weights_source)
    return f"training seed {seed}; weights at the start of training: {start}; {_selected(network)}"


def _model_facts(inputs: RunInputs, model: str) -> list[str]:
    meta = inputs.metadata[model]
    if is_ensemble(meta):
        return _ensemble_facts(inputs, model)
    single = single_model(inputs, model)
    return [
        "## Model",
        "",
        f"- Backbone: {md_text(meta['backbone'])}; weights at the start of training: {md_text(meta['weights_source'])}",
        f"- Input: {_input_text(meta['preprocess'])}, grey-scale replicated to 3 channels",
        f"- Training seed {'not recorded' if single.seed is None else md_text(single.seed)}; {_selected(single)}"
        + _averaged(meta, single.best_epoch),
        *_levers_line(meta),
        *_tta_line(meta),
        f"- Weights SHA-256: `{md_text(str(meta['weights_sha256'])[:16])}`",
    ]


def _averaged(meta: Mapping[str, Any], best_epoch: Any) -> str:
    """'; packaged: the average of the weights of epochs 3-4' where the weights were averaged, else ''."""
    text = averaged_weights_text((meta.get("training") or {}).get("train") or {}, best_epoch)
    return f"; packaged: {md_text(text)}" if text else ""


def _levers_line(meta: Mapping[str, Any]) -> list[str]:
    """How the packaged weights were made, where a training lever changed it (auxiliary target, averaging, MixStyle)."""
    text = levers_text((meta.get("training") or {}).get("train") or {}).strip()
    return [f"- Training: {md_text(text)}"] if text else []


def _ensemble_facts(inputs: RunInputs, model: str) -> list[str]:
    meta = inputs.metadata[model]
    records = meta["members"]
    lines = []
    for i, (record, network) in enumerate(zip(records, members(inputs, model), strict=True), start=1):
        differs = (
            f"; trained with other settings than this run: {md_text(', '.join(network.other_settings))}"
            if network.other_settings
            else ""
        )
        lines.append(
            f"  - member {i}: {md_text(network.backbone)}; input: {_input_text(record['preprocess'])}; "
            f"{_trained(network)}{differs}; from {md_text(network.source)}; weights SHA-256 "
            f"`{md_text(network.weights_sha256[:16])}`"
        )
    return [
        "## Model",
        "",
        f"- {md_text(meta['backbone'])}: the probability is the mean of its {len(records)} members' probabilities, "
        "each member preprocessing the image as it did in training. It has no training of its own: each member was "
        "trained on this run's training patients (their training-data hash was checked when the ensemble was built) "
        "and selected on its validation patients.",
        *lines,
        *_tta_line(meta),
        f"- Ensemble identity (SHA-256 of the members' weights digests): `{md_text(str(meta['weights_sha256'])[:16])}`",
    ]


def _threshold(meta: Mapping[str, Any]) -> list[str]:
    t = meta.get("threshold")
    if not t:
        return ["## Operating threshold", "", "No threshold frozen yet: run `alnus evaluate RUN`."]
    chosen = t.get("chosen_on", {})
    units = f"{t.get('n_val_units', '?')} validation {t['level']}s" if t["level"] != "image" else "validation images"
    return [
        "## Operating threshold",
        "",
        f"{t['value']:.4g}, chosen by the rule {md_text(rule_name(t))} on {units} "
        f"({chosen.get('n_pos', '?')} positive, {chosen.get('n_neg', '?')} negative) and frozen on "
        f"{md_text(str(t.get('frozen_at', '?'))[:10])}: {md_text(describe(t))}. Every test set, `alnus predict` "
        "and the service apply it at this level.",
        *_reader_rule(meta),
    ]


def _reader_rule(meta: Mapping[str, Any]) -> list[str]:
    """The package's reader rule (`alnus.reader_rule`), when it carries one."""
    rule = meta.get("reader_rule")
    return [] if not rule else ["", *card_block(rule, meta)]


def _results(inputs: RunInputs, model: str) -> list[str]:
    entry = inputs.metrics["models"][model]
    level = entry["threshold"]["level"]
    case_level = "patient" if level == "image" else level
    rows = []
    for split in EVALUATION_SPLITS:
        m = entry["splits"].get(split, {}).get(case_level)
        if m is None:
            continue
        auc_key = m.get("auc_reported")
        rows.append([
            md_text(split), f"{m['n']} ({m['n_pos']}/{m['n_neg']})",
            format_auc(m[auc_key] if auc_key else None) or "n/a",
            *(format_proportion(m[k]) or "n/a" for k in ("sensitivity", "specificity", "ppv", "npv", "accuracy")),
        ])  # fmt: skip
    columns = ["split", f"{case_level}s (pos/neg)", "AUC (95% CI)", "sensitivity", "specificity", "PPV", "NPV",
               "accuracy"]  # fmt: skip
    return [
        "## Validation results",
        "",
        f"Per {case_level}, at the frozen threshold; proportions in % (k/n; 95% CI, Clopper-Pearson).",
        "",
        _table(columns, rows),
    ]


def _limitations(inputs: RunInputs, model: str) -> list[str]:
    meta = inputs.metadata[model]
    positive, negative = _label_text(meta)
    cropped = [m for m in _roi_modes(meta) if m in ("box", "mask")]
    splits = inputs.splits
    sites = sorted(splits.loc[splits["split"].isin(["train", "val"]), "site"].unique())
    external = sorted(splits.loc[splits["split"] == "external_test", "site"].unique())
    items = [
        f"The label is the manifest's: {md_text(positive)} vs {md_text(negative)}. Where it stands in for another "
        "target (the public-data runs use benign vs malignant in place of axillary lymph node status), the model "
        "does not predict that other target.",
        (
            "The data are simulated (a phantom), not patients: these numbers say nothing about real images."
            if inputs.data_stamp.get("simulated") is True
            else "The study is retrospective; prevalence in the test sets sets PPV and NPV, which change with "
            "prevalence."
        ),
        f"Trained at {_plural(len(sites), 'site')} ({', '.join(md_text(s) for s in sites) or 'none named'}); "
        + (
            f"tested externally at {', '.join(md_text(s) for s in external)}. "
            if external
            else "no external test site. "
        )
        + "Performance on other scanners, settings or populations is unknown until measured there.",
        "Confidence intervals cover the sampling of test cases only, not a shift in population or equipment.",
    ]
    if cropped:
        items.insert(
            1,
            f"The input is cropped around a lesion {' or '.join(cropped)} given with each image (an expert's "
            "annotation in the study data). New images need a region drawn the same way; results with other regions "
            "(e.g. drawn by a detector or another person) were not measured.",
        )
    if is_ensemble(meta):
        items.append(
            "The ensemble's members were chosen by whoever built it: its test results are unbiased only if that "
            "choice did not look at the test splits (choose members on validation results alone)."
        )
    notes = [shareable_text(note, inputs.run) for note in inputs.metrics["models"][model].get("notes", [])]
    items += [md_text(note[:1].upper() + note[1:]) for note in notes]  # the run's notes start lower case
    return ["## Known limitations", "", *(f"- {item}" for item in items)]


def _licence_and_citation(inputs: RunInputs, model: str) -> list[str]:
    meta = inputs.metadata[model]
    version = meta.get("versions", {}).get("alnus", "?")
    git = inputs.env.get("git", {}) if isinstance(inputs.env.get("git"), dict) else {}
    sha = f", git {md_text(str(git['sha'])[:12])}" if git.get("sha") else ""
    source = str(meta.get("weights_source", "?"))
    if is_ensemble(meta):
        derived = (
            "the training data and, where a member started from pretrained weights (its members' starting weights: "
            f"{md_text(starting_weights(members(inputs, model)))}, listed per member under Model), from those "
            "weights: their use is bound by the licences of those data sets and weights"
        )
    elif source == "none":  # trained from random initialisation: the data are the only source
        derived = "the training data only (training started from random weights): their use is bound by its licence"
    else:
        derived = (
            f"the training data and the pretrained weights training started from ({md_text(source)}): their use is "
            "bound by the licences of those data sets and weights"
        )
    return [
        "## Licence",
        "",
        f"The alnus software is Apache-2.0. These weights were derived from {derived} (for the public data sets, see "
        "each one's PROVENANCE.md).",
        "",
        "## How to cite",
        "",
        f"- The software: alnus {md_text(version)}{sha}, run {md_text(inputs.run.name)}.",
        f"- The study design it reproduces: {md_text(ZHOU_2020)}.",
        "- The data sets the model was trained and tested on, as their licences require.",
    ]


def model_card(inputs: RunInputs, model: str, package: Path | None = None) -> str:
    """The model card of `model` as Markdown (all user text escaped). `package`: the folder it describes, where that
    is not the run's (a shipped copy, whose files the card speaks of)."""
    meta = inputs.metadata[model]
    sections = [
        [f"# Model card: {md_text(model)} (run {md_text(inputs.run.name)})"],
        ["## Intended use", "", *intended_use(meta)],
        _training_data(inputs, model, package or inputs.run.model(model).package),
        _model_facts(inputs, model),
        _threshold(meta),
        _results(inputs, model),
        _limitations(inputs, model),
        _licence_and_citation(inputs, model),
    ]
    return "\n\n".join("\n".join(lines) for lines in sections) + "\n"


def write_model_cards(inputs: RunInputs) -> dict[str, str]:
    """Write `README.md` into every evaluated model's package (atomically); return each model's card."""
    cards = {}
    for model in inputs.models:
        cards[model] = model_card(inputs, model)
        atomic_write_text(card_path(inputs, model), cards[model])
    return cards


def card_path(inputs: RunInputs, model: str) -> Path:
    return inputs.run.model(model).package / CARD_FILE


def card_block(record: Mapping[str, Any], meta: Mapping[str, Any]) -> list[str]:
    """The model card's block on the rule (between markers, so `write_card_section` can replace it): what it does,
    where it was set, what it gave there and its caveats (user text escaped)."""
    from alnus.reader_rule import CARD_END, CARD_START, describe_reader_rule, rule_caveats

    positive_label = str(meta.get("positive_label", "positive"))
    chosen = record.get("chosen_on") or {}
    rule = describe_reader_rule(record)
    lines = [CARD_START, "### With the radiologist's BI-RADS", "", md_text(rule[0].upper() + rule[1:] + ".")]
    if chosen:
        sens, spec, with_ai = (chosen.get(k) for k in ("reader_sensitivity", "reader_specificity",
                                                        "with_ai_specificity"))  # fmt: skip
        text = (f"Set on {record.get('frozen_on', 'validation patients')} on {str(record.get('frozen_at', ''))[:10]}: "
                f"{chosen.get('n_cases')} {record['level']}s with a reading in {chosen.get('reader')}, "
                f"{chosen.get('n_lowest')} of them read BI-RADS {' or '.join(record['lowest'])} "
                f"({chosen.get('n_lowest_pos')} {positive_label}; the value is the lowest of their "
                "probabilities)")  # fmt: skip
        if None not in (sens, spec, with_ai):
            text += (f". There the radiologist's sensitivity stays {100 * sens:.1f}% and the specificity goes from "
                     f"{100 * spec:.1f}% to {100 * with_ai:.1f}% (measured on the patients that set it, so "
                     "optimistic)")  # fmt: skip
        lines += ["", md_text(text + ".")]
    caveats = rule_caveats(record, positive_label)
    if caveats:
        lines += ["", *(f"- {md_text(c)}" for c in caveats)]
    lines += ["", "`alnus predict PACKAGE IMAGE --roi X,Y,W,H --birads 4a` (or a `birads` or `reader_birads` column "
              "in a manifest) gives the radiologist's call and the call with AI beside the model's. A call here is "
              "the radiologist's recommendation (positive: biopsy), not a diagnosis.", CARD_END]  # fmt: skip
    return lines
