"""The report's methods, written from the run's resolved config, env.json, data.json, the model packages' metadata
and the training histories: what was done, with the settings that did it, in sentences a reader of a paper expects.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from alnus.data.tta import all_views
from alnus.models.package import is_ensemble
from alnus.operating_point import describe, rule_name
from alnus.report._inputs import Network, RunInputs, members, shareable_text, single_model
from alnus.report.tables import Block, pct

# Heat-map methods by their `alnus explain --method` name, as a paper names them.
_CAM_NAMES = {
    "gradcam": "Grad-CAM (Selvaraju et al. 2017)",
    "gradcam++": "Grad-CAM++ (Chattopadhay et al. 2018)",
    "gradcampp": "Grad-CAM++ (Chattopadhay et al. 2018)",
    "eigencam": "EigenCAM (Muhammad & Yeasin 2020)",
    "scorecam": "Score-CAM (Wang et al. 2020)",
}

_CI_NAMES = {"clopper-pearson": "exact Clopper-Pearson (1934)", "wilson": "Wilson score (1927)"}


def _data(inputs: RunInputs) -> Block:
    data = inputs.config.get("data", {})
    stamp = inputs.data_stamp
    rows, valid = stamp.get("rows"), stamp.get("valid_rows")
    labels = data.get("labels") or sorted(inputs.splits["label"].unique())
    positive = data.get("positive_label", "positive")
    sites = sorted(inputs.splits["site"].unique())
    external = data.get("external_sites") or []
    counted = (
        f"The manifest had {rows} image rows; {valid} passed validation and {rows - valid} were excluded "
        "(reasons under Patient flow)."
        if isinstance(rows, int) and isinstance(valid, int)
        else f"The split holds {len(inputs.splits)} images (the manifest's row count was not recorded)."
    )
    return Block(
        "methods-data",
        "Data and reference standard",
        paragraphs=[
            SIMULATED
            if stamp.get("simulated") is True
            else "Retrospective: the images, labels and readings existed before this analysis; one manifest row per "
            "image (image, patient, site, label, region of interest, readings, clinical columns).",
            counted,
            f"Reference standard: the manifest's label column ({', '.join(map(str, labels))}); the positive class is "
            f"{positive}. Sites: {', '.join(s or 'unnamed' for s in sites)}; held out as the external test: "
            f"{', '.join(map(str, external)) or 'none'}.",
        ],
    )


def _val_role(inputs: RunInputs) -> str:
    """What the validation split chose: the threshold, and the epoch unless the last one is kept."""
    last = inputs.config.get("train", {}).get("selection_metric") == "last"
    return "threshold selection; the last epoch is kept" if last else "threshold and epoch selection"


def _split(inputs: RunInputs) -> Block:
    data = inputs.config.get("data", {})
    duplicates = "checked (perceptual hash)" if data.get("check_duplicates", True) else "not checked"
    if data.get("group_duplicates"):
        duplicates += "; patients sharing near-duplicate images were kept together"
    return Block(
        "methods-split",
        "Split",
        paragraphs=[
            "Patient-level and label-stratified: all images of a patient are in one split, so no patient is both "
            "trained and tested on. External sites are only ever tested on. Of the development patients, "
            f"{pct(data.get('internal_test_frac', 0.1))} form the internal test; of the rest, "
            f"{pct(data.get('val_frac', 0.1))} form the validation split ({_val_role(inputs)}); the others "
            f"train. Random seed {data.get('seed', 0)}. Near-duplicate images across splits: {duplicates}.",
        ],
        items=[shareable_text(note, inputs.run) for note in inputs.data_stamp.get("notes", [])],
    )


def _input_text(pre: Mapping[str, Any]) -> str:
    roi = pre["roi"]
    crop = (
        "the whole image"
        if roi["mode"] == "whole"
        else f"the lesion {roi['mode']} plus a margin of {pct(roi['margin'])} of its width and height on each side"
    )
    grey = GREY_TEXT.get(pre.get("grey", "none"), "")
    if pre.get("max_crop") is not None:
        grey = (
            f", first downsampled to at most {pre['max_crop']} px on its longer side (resolution harmonisation){grey}"
        )
    return (
        f"{crop}{grey}, resized to {pre['size']} x {pre['size']} px ({pre.get('interpolation', 'bilinear')}"
        f"{', aspect ratio kept (letterbox)' if pre['keep_aspect'] else ', stretched'})"
    )


GREY_TEXT = {
    "none": "",
    "stretch": ", its grey levels stretched linearly from the crop's 1st-99th percentile to the full range",
    "equalize": ", its grey-level histogram equalised",
}


# How the AUC intervals' methods (`alnus.stats.auc_ci`) are written in the methods text.
_CI_METHODS = {"delong": "DeLong (1988)", "bootstrap": "bootstrap"}


# A study of a phantom's manifest (`alnus data phantom`; the data stamp's `simulated`), in the report and the cards.
SIMULATED = (
    "Simulated data: the images, patients, labels and readers are a phantom made by `alnus data phantom`, not "
    "patients; the numbers show what the pipeline does, not how a model performs on real images. PHANTOM.md beside "
    "the manifest says how they are made and what each column is (true_score: the ideal observer's)."
)


def _head_epochs_text(train: Mapping[str, Any]) -> str:
    """The head-only epochs as trained: none from random initialisation, whatever `train.head_epochs` says."""
    if train.get("weights") == "none":
        return "no head-only epochs: from random initialisation every layer trained from the first epoch"
    return f"{train.get('head_epochs')} head-only epochs"


def averaged_weights_text(train: Mapping[str, Any], best_epoch: Any) -> str:
    """What the packaged weights of a run with weight averaging are ("" without averaging)."""
    if train.get("swa_start"):
        return f"the average of the weights of epochs {train['swa_start']}-{best_epoch}"
    if train.get("ema_decay"):
        return f"the moving average of the weights at the end of epoch {best_epoch}"
    return ""


def levers_text(train: Mapping[str, Any]) -> str:
    """The auxiliary targets and weight averaging of a training, as sentences (empty when neither was used)."""
    out = ""
    if train.get("aux_reader"):
        out += (
            f" Auxiliary target: the radiologists' BI-RADS category ({train['aux_reader']}) as an ordinal target of "
            f"extra outputs (one per step between the categories seen in training, binary cross-entropy weighted "
            f"{train.get('aux_weight')}), used during training only; the packaged model keeps the label's output."
        )
    if train.get("aux_shape"):
        out += (
            " Auxiliary target: the lesion's shape measured on its mask (orientation, solidity, circularity; "
            f"standardised) regressed by three extra outputs (smooth L1 loss weighted {train['aux_shape']}), used "
            "during training only; the packaged model keeps the label's output."
        )
    if train.get("ema_decay"):
        out += (
            f" The weights were averaged over the optimiser steps (exponential moving average, decay "
            f"{train['ema_decay']} with warm-up); the average is what was validated, selected and packaged."
        )
    if train.get("swa_start"):
        out += (
            f" The weights were averaged over the epochs (stochastic weight averaging from epoch {train['swa_start']}"
            " on, with equal weights, its batch-normalisation statistics recomputed on the training images); the "
            "average is what was validated, selected and packaged: the best epoch and early stopping count only the "
            "epochs from that one on (earlier epochs' validation AUCs, of the unaveraged weights, are logged only)."
        )
    if train.get("mixstyle"):
        out += (
            f" MixStyle while training (probability {train['mixstyle']} per early stage and batch): the per-image "
            "channel means and standard deviations of the early feature maps were mixed between images of the batch "
            "(weights from Beta(0.1, 0.1)), so that the network learns across image styles; prediction is unchanged."
        )
    return out


def _tta_text(meta: Mapping[str, Any]) -> str:
    views = list(meta.get("tta") or [])
    return f"; test-time augmentation: the mean over the views {', '.join(all_views(views))}" if views else ""


def _preprocessing(inputs: RunInputs) -> Block:
    items = []
    for model, meta in inputs.metadata.items():
        if is_ensemble(meta):
            members = "; ".join(
                f"member {i} ({m['backbone']}): {_input_text(m['preprocess'])}"
                for i, m in enumerate(meta["members"], start=1)
            )
            items.append(f"{model}: {meta['backbone']}, each member as in its training ({members}){_tta_text(meta)}.")
            continue
        norm = meta.get("normalisation", {})
        items.append(
            f"{model}: {_input_text(meta['preprocess'])}; normalised with mean {norm.get('mean', '?')} and std "
            f"{norm.get('std', '?')}{_tta_text(meta)}."
        )
    return Block(
        "methods-preprocessing",
        "Preprocessing and region of interest",
        paragraphs=[
            "Each image is decoded once to 8-bit grey-scale (DICOM, PNG, JPEG; colour to luminance), cropped to "
            "the region of interest and resized; the network sees the grey image replicated to three channels. "
            "Training, prediction and the service share this one preprocessing function."
        ],
        items=items,
    )


def _augmentation(inputs: RunInputs) -> Block:
    from alnus.data.augment import AugmentConfigError, UltrasoundAugment

    augment = inputs.config.get("train", {}).get("augment", {})
    if augment is None:
        return Block("methods-augmentation", "Augmentation", paragraphs=["None: training images were not augmented."])
    try:
        settings = UltrasoundAugment.from_config(augment).to_dict()
    except (AugmentConfigError, TypeError, ValueError):
        settings = dict(augment)
    shown = ", ".join(f"{k} {v}" for k, v in settings.items())
    return Block(
        "methods-augmentation",
        "Augmentation",
        paragraphs=[
            "Training images only, drawn anew each epoch from (seed, epoch, image): left-right flips, small "
            f"rotations, scaling and shifts, brightness, contrast and gamma, multiplicative speckle. Settings: {shown}."
        ],
    )


def _training_time(inputs: RunInputs, model: str) -> str:
    if is_ensemble(inputs.metadata.get(model, {})):
        return "no training of its own (an ensemble of trained models)"
    history = inputs.history.get(model)
    if history is None or "seconds" not in history.columns:
        return "training time not recorded"
    return f"{len(history)} epochs in {history['seconds'].sum():.0f} s"


def _member_text(i: int, member: Network) -> str:
    differs = f"; trained with other settings than this run: {', '.join(member.other_settings)}"
    return (
        f"member {i}: {member.backbone} from {member.source}, {member.training_text()}"
        f"{differs if member.other_settings else ''}"
    )


def _models(inputs: RunInputs) -> Block:
    train = inputs.config.get("train", {})
    items = []
    ensembles = [model for model, meta in inputs.metadata.items() if is_ensemble(meta)]
    for model, meta in inputs.metadata.items():
        if is_ensemble(meta):
            listed = "; ".join(_member_text(i, m) for i, m in enumerate(members(inputs, model), start=1))
            items.append(
                f"{model}: {meta['backbone']}, the mean of its members' probabilities{_tta_text(meta)}; ensemble "
                f"identity SHA-256 {meta.get('weights_sha256', '')[:12]}. Members: {listed}."
            )
            continue
        single = single_model(inputs, model)
        items.append(
            f"{model}: {single.training_text()}; {_training_time(inputs, model)}; weights SHA-256 "
            f"{single.weights_sha256[:12]}."
        )
    stop = train.get("early_stopping_patience")
    return Block(
        "methods-models",
        "Models and training",
        paragraphs=[
            "One output (the positive-class logit) per backbone, trained with binary cross-entropy "
            f"({train.get('balance', 'weighted_loss')} for class balance), {train.get('optimizer', 'adamw')} at "
            f"learning rate {train.get('lr')} (weight decay {train.get('weight_decay')}, {train.get('warmup_epochs')} "
            f"warm-up epochs, {_head_epochs_text(train)}), batch size {train.get('batch_size')}, up "
            f"to {train.get('epochs')} epochs"
            + (f" with early stopping after {stop} epochs without improvement" if stop else "")
            + f", precision {train.get('precision')}: this run's settings. Each network's seed, the precision it "
            "trained in (precision auto chooses it by hardware and backbone), the kept epoch and its validation AUC "
            "are listed below. "
            + (
                "The last epoch is kept, whatever its validation AUC (train.selection_metric last)"
                if train.get("selection_metric") == "last"
                else "The epoch with the best validation AUC is kept"
            )
            + (
                "; with weight averaging, the average at that epoch's end is what was validated and is kept (below)."
                if train.get("swa_start") or train.get("ema_decay")
                else "."
            )
            + levers_text(train)
            + " "
            + (
                f"Ensembles ({', '.join(ensembles)}) average the probabilities of models trained on the same training "
                "patients (checked by the training-data hash) and are reported as models of their own, with their "
                "own threshold frozen on validation. A member trained in another run (another seed of the same "
                "split, say) was trained with that run's settings; where they differ from this run's, its line says "
                "so. The members must have been chosen on validation results alone, never on the test splits."
                if ensembles
                else "No ensembling: each model is reported on its own."
            ),
        ],
        items=items,
    )


def _threshold(inputs: RunInputs) -> Block:
    items = []
    for model in inputs.models:
        t = inputs.metrics["models"][model]["threshold"]
        items.append(
            f"{model}: {t['value']:.4g} by {rule_name(t)} on the validation split ({describe(t)}), frozen "
            f"{str(t.get('frozen_at', ''))[:10]} into the model package."
        )
    return Block(
        "methods-threshold",
        "Operating threshold",
        paragraphs=[
            "Chosen once per model on the validation split only, by a named rule at the study's level, and frozen "
            "into the model package; the internal and external tests, `alnus predict` and the service apply it "
            "unchanged at that level."
        ],
        items=items,
    )


def _has_panel(inputs: RunInputs) -> bool:
    """Whether any model was compared with two or more readers (with one there is no panel analysis)."""
    compared = [c for by_model in inputs.metrics.get("readers", {}).values() for c in by_model.values()]
    return any(c.get("n_readers", 0) >= 2 for c in compared if isinstance(c, Mapping))


def _statistics(inputs: RunInputs) -> Block:
    settings: Mapping[str, Any] = inputs.metrics.get("settings", {})
    auc_ci = settings.get("auc_ci", {})
    ci = str(settings.get("proportion_ci", "clopper-pearson"))
    ci = _CI_NAMES.get(ci, ci)
    scale = settings.get("reader_scale", "birads")
    if scale == "birads":
        calls = f"BI-RADS >= {settings.get('reader_positive_from', '4a')}"
    else:
        cut = settings.get("reader_score_threshold")
        calls = "none (scores compared by AUC only)" if cut is None else f"score >= {cut}"
    items = [
        f"Proportions (accuracy, sensitivity, specificity, PPV, NPV): {ci} 95% intervals"
        + (
            f"; per image {settings['proportion_ci_by_level']['image']}, as a patient's images are not independent."
            if "image" in settings.get("proportion_ci_by_level", {})
            else "."
        ),
        *(f"AUC 95% CI per {level}: {_CI_METHODS.get(method, method)}." for level, method in auc_ci.items()),
        "Model vs model: DeLong (1988) test of paired AUCs (Sun & Xu 2014), P adjusted by Holm (1979).",
        "Model vs each reader: exact McNemar (1947) tests of sensitivity and specificity on the cases both read, "
        "their differences with Newcombe's (1998) hybrid score interval (two methods, which can disagree near the "
        "5% level: a row says so where they do); DeLong test of AUC with the reader's BI-RADS categories as an "
        "ordinal score.",
        *(
            [
                "Model vs the reader panel: Obuchowski-Rockette multi-reader multi-case analysis with Hillis' degrees "
                "of freedom (fixed model, random readers and cases)."
            ]
            if _has_panel(inputs)
            else []
        ),
        *(
            [
                "Each reader with the model (AI + reader), set on the validation cases only: (a) a logistic regression"
                " of the model's logit and the BI-RADS score fitted by Firth's penalised likelihood (finite where the "
                "categories separate the classes; profile-likelihood CIs of its coefficients; the score codes 4 as 4.0"
                " and 4a-4c as 4.25-4.75, and the weight treats its steps as distances), positive from the threshold "
                "that matches the reader's validation sensitivity; (b) the reader's category first and the model's "
                "probability inside a category (nothing fitted), with the reader's calls except that the lowest "
                "positive category is called negative below the highest model threshold that keeps the reader's "
                "validation sensitivity. Each against the reader alone on the test cases: paired DeLong test of AUC, "
                "exact McNemar tests; with two or more readers, the readers with AI against the same readers alone: "
                "Obuchowski-Rockette multi-reader multi-case analysis with Hillis' degrees of freedom (random readers "
                "and cases)."
            ]
            if inputs.metrics.get("reader_plus_ai")
            else []
        ),
        "Calibration: Brier score, Cox slope and calibration-in-the-large (per image with cluster-robust Wald "
        "intervals, a patient's images not being independent), expected calibration error.",
        f"Significance level {settings.get('alpha', 0.05)}; bootstrap resamples {settings.get('n_boot', '?')} "
        f"(seed {settings.get('seed', 0)}); a reader's positive call: {calls}.",
    ]
    return Block("methods-statistics", "Statistics", items=items)


def _explain(methods: list[str]) -> Block:
    if not methods:
        text = "No heat maps were made for this run (`alnus explain RUN` makes them)."
    else:
        names = ", ".join(_CAM_NAMES.get(m.lower(), m) for m in methods)
        text = (
            f"Heat maps by {names} with pytorch-grad-cam, on the positive-class logit at each backbone's CAM layer "
            "(from the model registry), shown over the network's input crop in the original image's coordinates "
            "with the lesion outline where known. The share of heat-map energy inside the lesion is given per "
            "image; a map without heat (no positive evidence: nothing in the crop raised the positive-class score) "
            "is called empty and left out of the averages."
        )
    return Block("methods-explain", "Heat-map methods", paragraphs=[text])


def _software(inputs: RunInputs) -> Block:
    env = inputs.env
    versions = ", ".join(f"{k} {env[k]}" for k in ("alnus", "python", "torch", "torchvision", "timm") if env.get(k))
    git = env.get("git") if isinstance(env.get("git"), dict) else {}
    code = (
        f"git {str(git['sha'])[:12]}{' (with uncommitted changes)' if git.get('dirty') else ''}"
        if git.get("sha")
        else ""
    )
    cpu = env.get("cpu") if isinstance(env.get("cpu"), dict) else {}
    gpu = env.get("gpu") if isinstance(env.get("gpu"), dict) else {}
    gpus = ", ".join(map(str, gpu.get("names", []))) or "none"
    items = [
        f"Software: {versions or 'not recorded'}{'; ' + code if code else ''}; OS {env.get('os', 'not recorded')}.",
        f"Hardware: CPU {cpu.get('model', 'not recorded')} ({cpu.get('usable_cores', '?')} usable cores); GPU {gpus}.",
        *(f"Training time, {model}: {_training_time(inputs, model)}." for model in inputs.metadata),
        f"Run prepared {str(env.get('date', '?'))[:19]}; evaluated {str(inputs.metrics.get('created', '?'))[:19]} "
        "(UTC).",
    ]
    return Block("methods-software", "Software, hardware and time", items=items)


def methods_blocks(inputs: RunInputs, heatmap_methods: list[str]) -> list[Block]:
    """The methods section's sub-sections, in the order a paper gives them."""
    return [
        _data(inputs),
        _split(inputs),
        _preprocessing(inputs),
        _augmentation(inputs),
        _models(inputs),
        _threshold(inputs),
        _statistics(inputs),
        _explain(heatmap_methods),
        _software(inputs),
    ]
