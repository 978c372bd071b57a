"""Model package + images -> probabilities and calls: the one prediction path of the study, CLI and service.

Images are decoded by `alnus.data.images.load_image` and turned into the network's input by the same
`alnus.data.dataset.preprocess` (and the same dataset class and tensor scaling) that training used, with the
preprocessing spec stored in the package, so a prediction cannot disagree with the study. The operating
point, once `alnus evaluate` has frozen it on validation, comes from the package too, and is applied the way it
was frozen (`alnus.operating_point`): with a patient-level threshold the call is made on the mean (or max) of a
patient's image probabilities, and every image of the patient carries that call; an image without a patient id is
its own patient.

New data (`alnus predict PACKAGE INPUT...`, the service) goes through `Predictor.predict_inputs`: each file is decoded
on its own, and one that cannot be read (corrupt, unsupported, no lesion region where the model needs one) gets the
reason in its `error` cell while the others are predicted; an image whose lesion box is unlike one drawn around a
lesion (tiny, or nearly the whole image: `alnus.data.roi.box_warning`) is predicted, with the reason in its `warning`
cell, as is an image the model was trained or selected on (`alnus.data.seen`: its prediction is no test). The
forward pass runs on the package's fastest engine that passed its parity check at export (`alnus.export`: onnxruntime
fp32 or int8), or on PyTorch.

A package may be an ensemble (`alnus.models.package`, built by `alnus.ensemble`) and may list test-time augmentation
views (`alnus.data.tta`): every path here then preprocesses the image for each member with that member's spec, and the
probability is the mean over the members of each member's mean over the views.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from alnus._hardware import Precision, autocast, choose_precision
from alnus._io import NotAFileError, atomic_write_text, file_sha256, open_regular, write_csv
from alnus._levels import unit_keys
from alnus.data.dataset import ImageCache, PreprocessSpec, UltrasoundDataset, _to_tensor, preprocess
from alnus.data.images import frame_choice, load_image, parse_frame
from alnus.data.inputs import KEPT_PREFIX, shared_data_hint
from alnus.data.roi import (
    Box,
    RoiError,
    RoiPolicy,
    box_warning,
    format_box,
    lesion_box,
    mask_path,
    parse_box,
    sources_warning,
)
from alnus.data.seen import SeenImages, read_development_images
from alnus.data.tta import all_views, apply_view
from alnus.errors import AlnusError
from alnus.export import ENGINES
from alnus.models.package import Member, is_ensemble, load_members
from alnus.operating_point import apply_operating_point, describe, rule_name
from alnus.runfolder import EVALUATION_SPLITS as SPLITS
from alnus.runfolder import PREDICTION_COLUMNS, RunFolder, read_splits, run_models

# Columns of the input table carried into the predictions (when present).
KEPT_COLUMNS = ("image", "patient_id", "study_id", "site", "label")
# The engines a Predictor runs on: `auto` is the package's fastest export that passed its parity check (else torch).
ENGINE_CHOICES = ("auto", *ENGINES)
NOTICE = "Research use only; not for diagnosis."
# The model card (`alnus.report.card`) is read for the notes up to this size; a larger file is not a card of ours.
MAX_CARD_BYTES = 1024 * 1024
# Every column `Predictor.predict_inputs` (and `alnus predict --heatmaps`) may write: a manifest column kept with
# `--keep` must not take one of these names.
NEW_DATA_COLUMNS = frozenset({
    "image", "patient_id", "study_id", "site", "roi", "mask", "frame", "n_frames", "prob", "patient_prob", "study_prob",
    "n_images", "call", "call_level", "prediction", "threshold", "birads", "reader_call", "with_ai_call", "ruled_out",
    "with_ai", "engine", "error", "warning", "heatmap",
})  # fmt: skip


class PredictError(AlnusError):
    """A table, image or run folder that cannot be predicted; the message names the row or file."""


class ModelOutputError(PredictError):
    """The network gave something that is no probability (NaN, or outside [0, 1]): the package, not the image, is at
    fault, so no call is made from it."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`auto`: the first GPU when there is one, else the CPU; otherwise the named device (checked)."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise PredictError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N.") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise PredictError(f"device {device!r} was asked for but no CUDA GPU is available; use --device cpu.")
    return resolved


def _freezing(enabled: bool) -> contextlib.AbstractContextManager:
    """Inductor's weight freezing, scoped: it is a process-wide switch that training must not see."""
    if not enabled:
        return contextlib.nullcontext()
    import torch._inductor.config as inductor_config

    return inductor_config.patch(freezing=True)


class Network:
    """One network of a package, ready to predict: its folder and metadata, preprocessing, PyTorch model and engine.

    A plain package has one; an ensemble has one per member (`members/<i>`), each with its own preprocessing.
    """

    def __init__(
        self, member: Member, *, device: torch.device, precision: Precision, compiled: bool, batch_size: int
    ) -> None:
        self.folder = member.folder
        self.metadata: dict[str, Any] = member.metadata
        self.spec = PreprocessSpec.from_dict(member.metadata["preprocess"])
        self.device, self.precision, self.compiled, self.batch_size = device, precision, compiled, batch_size
        model = member.model.to(device)
        if precision.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model.eval()
        self._forward = torch.compile(self.model) if compiled else self.model
        self._onnx: Callable[[np.ndarray], np.ndarray] | None = None
        self.engine = "torch"

    @property
    def backbone(self) -> str:
        return str(self.metadata["backbone"])

    def start_engine(self, engine: str, *, export_advice: str | None = None) -> None:
        """Run on `engine`: `torch`, `onnx`, `onnx-int8`, or `auto` (the checked ONNX fp32 export on the CPU when the
        network's package has one, else torch). `export_advice` says how to get a missing export (an ensemble's member
        is not exported where it lies: its own package is, then the ensemble is built again)."""
        if engine == "torch" or (engine == "auto" and (self.device.type != "cpu" or self.compiled)):
            return
        from alnus.export import OnnxEngine, available_engines

        available = available_engines(self.folder)
        if engine == "auto":
            # Only engines that reproduce the study's probabilities: int8 must be asked for by name.
            engine = next(e for e in available if e != "onnx-int8")
            if engine == "torch":
                return
        elif self.device.type != "cpu":
            raise PredictError(f"engine {engine} runs on the CPU (onnxruntime); use --device cpu, or --engine torch.")
        elif engine not in available:
            advice = export_advice or f"write one with `alnus export {self.folder} --format {engine}`"
            raise PredictError(
                f"model package {self.folder} has no {engine} export that passed its parity check (it has: "
                f"{', '.join(available)}); {advice}, or use --engine torch."
            )
        self._onnx = OnnxEngine(self.folder, engine)
        self.engine = engine

    @property
    def engine_description(self) -> str:
        if self._onnx is not None:
            return f"{self.engine} (onnxruntime, cpu)"
        return f"torch ({self.precision.name} on {self.device}{', compiled' if self.compiled else ''})"

    def probabilities(self, x: torch.Tensor) -> np.ndarray:
        """Positive-class probabilities of one view of a batch `(B, 1, size, size)` in [0, 1], `batch_size` a pass.

        Raises:
            ModelOutputError: a value that is not a number from 0 to 1 (damaged weights or a tampered export).
        """
        probs = self._probabilities(x)
        bad = ~(np.isfinite(probs) & (probs >= 0) & (probs <= 1))
        if bad.any():
            example = probs[bad][0]
            raise ModelOutputError(
                f"the network of {self.folder} ({self.engine_description}) gave {float(example):g} as a probability "
                f"for {int(bad.sum())} of {len(probs)} image(s); a probability is a number from 0 to 1, so its weights "
                "or export are damaged: restore the package from its source (or export it again), and check it on "
                "labelled patients (`alnus score`) before using it."
            )
        return probs

    def _probabilities(self, x: torch.Tensor) -> np.ndarray:
        out = []
        if self._onnx is not None:
            array = x.detach().cpu().float().numpy()
            for start in range(0, array.shape[0], self.batch_size):
                chunk = np.ascontiguousarray(array[start : start + self.batch_size])
                out.append(np.asarray(self._onnx(chunk), dtype=np.float32).reshape(-1))
            return np.concatenate(out) if out else np.empty(0, dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, x.shape[0], self.batch_size):
                chunk = x[start : start + self.batch_size].to(self.device)
                if self.precision.channels_last:
                    chunk = chunk.contiguous(memory_format=torch.channels_last)
                with autocast(self.device, self.precision), _freezing(self.compiled):
                    logits = self._forward(chunk)
                out.append(torch.sigmoid(logits.float()).cpu().numpy())
        return np.concatenate(out) if out else np.empty(0, dtype=np.float32)


class Predictor:
    """A loaded model package that turns images into probabilities (and calls, once a threshold is frozen).

    The package may be a single network or an ensemble (`alnus.models.package`, `"kind": "ensemble"`), and may list
    test-time augmentation views (`tta`, `alnus.data.tta`). A probability is the mean over the package's networks
    (`networks`: one, or one per ensemble member, each preprocessing the image with its own spec) of each network's
    mean over the views (the unaugmented input first). `spec` and `model` are the first network's (for an ensemble,
    member 1's); `predict_arrays`, `predict_table` and `predict_inputs` preprocess for every member, while
    `predict_batch` takes one input batch and so needs members that share one preprocessing.

    Args:
        package_dir: a folder written by `alnus.models.package.save_package` or `alnus.ensemble.build_ensemble`.
        device: `auto`, `cpu`, `cuda` or `cuda:N`.
        batch_size: images per forward pass.
        precision: `fp32` (default: the reference that the study's results, the frozen threshold and every export
            are measured in), or `auto` (bf16 autocast + channels_last where the hardware supports it, see
            `alnus._hardware.choose_precision`), `bf16`, `fp16`: faster, but bf16 moved probabilities of the
            real-data model by up to 0.2 against fp32, enough to change calls near the threshold.
        compile: `torch.compile` the model with frozen weights (batch norm folded into the convolutions): faster
            per image after a one-off compilation per model and batch shape, so it pays off only on large image
            sets (measured by bench/throughput.py; the numbers are in docs/performance.md).
        engine: `torch`, `onnx` or `onnx-int8` (an export written by `alnus export`, CPU only), or `auto`: on the
            CPU the ONNX fp32 export when the package has one that passed its parity check (it reproduces the
            study's fp32 probabilities to 1e-4), else torch. int8 is used only when asked for by name: it keeps the
            AUC but moves single probabilities (by up to 0.33 on the real-data model), so calls near the threshold
            can change. The PyTorch model is loaded in every case (heat maps need it). `engine` names the one used.
            For an ensemble, `auto` chooses per member, and a named ONNX engine needs that export in every member.
    """

    def __init__(
        self,
        package_dir: str | os.PathLike[str],
        *,
        device: str | torch.device = "auto",
        batch_size: int = 32,
        precision: str = "fp32",
        compile: bool = False,
        max_pixels: int | None = None,
        engine: str = "auto",
    ) -> None:
        if engine not in ENGINE_CHOICES:
            raise PredictError(f"unknown engine {engine!r}; choose from {', '.join(ENGINE_CHOICES)}.")
        if int(batch_size) != batch_size or batch_size < 1:
            raise PredictError(f"batch_size must be a positive whole number, got {batch_size!r}.")
        self.package_dir = Path(package_dir)
        self.device = resolve_device(device)
        members, meta = load_members(self.package_dir)
        self.metadata: dict[str, Any] = meta
        self.tta: list[str] = list(meta["tta"])
        self.label_names: list[str] = [str(name) for name in meta["label_names"]]
        self.positive_label = str(meta["positive_label"])
        # The operating point as `read_metadata` checked it: value, rule, target, level, aggregate (or None).
        self.operating_point: dict[str, Any] | None = meta["threshold"]
        self.threshold: float | None = None if self.operating_point is None else self.operating_point["value"]
        self.batch_size = int(batch_size)
        self.max_pixels = max_pixels
        self.precision = choose_precision(self.device, precision)
        self.compiled = bool(compile)
        self.networks = [
            Network(m, device=self.device, precision=self.precision, compiled=self.compiled, batch_size=self.batch_size)
            for m in members
        ]
        self.spec = self.networks[0].spec
        self.model = self.networks[0].model
        for i, network in enumerate(self.networks, start=1):
            network.start_engine(engine, export_advice=_member_export_advice(self.package_dir, meta, i, engine))
        kinds = list(dict.fromkeys(network.engine for network in self.networks))
        self.engine = kinds[0] if len(kinds) == 1 else "+".join(kinds)
        # The images it was trained and selected on, as hashes (None: a package written before they were recorded).
        self.seen: SeenImages | None = read_development_images(self.package_dir, meta.get("training_data_hash"))

    @property
    def is_ensemble(self) -> bool:
        return is_ensemble(self.metadata)

    @property
    def shared_spec(self) -> bool:
        """Whether every network preprocesses alike (one input batch fits them all)."""
        return all(network.spec == self.spec for network in self.networks)

    @property
    def needs_roi(self) -> bool:
        """Whether any network crops to a lesion region (a box or mask must come with each image)."""
        return any(network.spec.roi.mode != "whole" for network in self.networks)

    @property
    def engine_description(self) -> str:
        """The engine in words, e.g. `torch (fp32 on cpu)` or `onnx-int8 (onnxruntime, cpu)`; an ensemble's names
        its members' engines, and TTA its views."""
        if not self.is_ensemble:
            text = self.networks[0].engine_description
        else:
            counts = Counter(network.engine_description for network in self.networks)
            engines = ", ".join(name if n == 1 else f"{name} x{n}" for name, n in counts.items())
            text = f"ensemble of {len(self.networks)}: {engines}"
        return text + (f"; TTA: mean of {', '.join(all_views(self.tta))}" if self.tta else "")

    @property
    def heatmap_note(self) -> str | None:
        """How heat maps of this package are made, when that is not simply the one network's map of the image."""
        notes = []
        if self.is_ensemble and self.shared_spec:
            notes.append(f"the heat map is the mean of the {len(self.networks)} ensemble members' maps")
        elif self.is_ensemble:
            notes.append(
                f"the {len(self.networks)} ensemble members see different inputs (size or crop), so their maps are "
                "averaged on the original image, and the box drawn is the smallest one holding every member's crop"
            )
        if self.tta:
            notes.append(
                f"the heat map is of the unaugmented image, while the probability is the mean over the TTA views "
                f"({', '.join(all_views(self.tta))})"
            )
        if not notes:
            return None
        text = "; ".join(notes)
        return text[0].upper() + text[1:] + "."

    @property
    def call_rule(self) -> str | None:
        """The rule the calls follow, in words (None until a threshold is frozen)."""
        if self.operating_point is None:
            return None
        point = self.operating_point
        frozen_on = str(point.get("frozen_on") or "val")
        # A run's threshold is frozen on its validation split; `alnus threshold` names the site's manifest.
        where = "validation" if frozen_on == "val" else frozen_on.split(" (", 1)[0]
        rule = f"{describe(point)} ({rule_name(point)}, frozen on {where})"
        if point["level"] == "image":
            return rule
        return f"{rule}; an image without a {point['level']} id is its own {point['level']}"

    @property
    def negative_label(self) -> str | None:
        """The other class's name when the package has exactly two labels."""
        others = [name for name in self.label_names if name != self.positive_label]
        return others[0] if len(others) == 1 else None

    def _network_probabilities(self, network: Network, x: torch.Tensor) -> np.ndarray:
        """One network's probabilities of a batch: the mean over the package's TTA views (the identity first)."""
        views = [network.probabilities(apply_view(x, name)) for name in all_views(self.tta)]
        if len(views) == 1:
            return views[0]
        return np.mean(np.stack(views).astype(np.float64), axis=0)

    def predict_members(self, batches: Sequence[torch.Tensor]) -> np.ndarray:
        """Probabilities from one input batch per network (`networks`' order, each preprocessed with that network's
        spec): each network's mean over the TTA views, then the mean over the networks."""
        if len(batches) != len(self.networks):
            raise PredictError(f"got {len(batches)} input batches for {len(self.networks)} networks; give one each.")
        probs = [self._network_probabilities(n, x) for n, x in zip(self.networks, batches, strict=True)]
        if len(probs) == 1:
            return probs[0]
        return np.mean(np.stack(probs).astype(np.float64), axis=0)

    def predict_batch(self, x: torch.Tensor) -> np.ndarray:
        """Probabilities of the positive class for a batch `(B, 1, size, size)` in [0, 1], on the chosen engine.

        For an ensemble the batch goes to every member, so its members must share one preprocessing; otherwise use
        `predict_arrays` or `predict_table`, which preprocess for each member.
        """
        if not self.shared_spec:
            raise PredictError(
                f"the members of {self.package_dir} preprocess differently ({self._specs_text()}), so one input batch "
                "cannot serve them all; predict decoded images (predict_arrays) or a table (predict_table) instead."
            )
        return self.predict_members([x] * len(self.networks))

    def _specs_text(self) -> str:
        return "; ".join(
            f"member {i} {n.backbone}: {n.spec.size} px, ROI {n.spec.roi.mode}"
            + (f" + {n.spec.roi.margin:g}" if n.spec.roi.mode != "whole" else "")
            for i, n in enumerate(self.networks, start=1)
        )

    def _inputs(
        self,
        image: np.ndarray,
        row: Mapping[str, str],
        root: Path,
        *,
        max_pixels: int | None = None,
        boxed: Mapping[str, Mapping[str, str]] | None = None,
    ) -> list[torch.Tensor]:
        """One decoded image as each network's input `(1, size, size)`, preprocessed once per distinct spec.

        `boxed`: the row of each ROI mode with its lesion box already found (`_boxed_rows`), so that a mask is not
        decoded again; a mode missing from it uses `row`.
        """
        done: dict[PreprocessSpec, torch.Tensor] = {}
        for network in self.networks:
            if network.spec not in done:
                cells = (boxed or {}).get(network.spec.roi.mode, row)
                done[network.spec] = _to_tensor(preprocess(image, cells, root, network.spec, max_pixels=max_pixels))
        return [done[network.spec] for network in self.networks]

    def roi_warning(
        self, shape: tuple[int, ...], row: Mapping[str, str], root: Path, *, max_pixels: int | None = None
    ) -> str:
        """The warning of an image whose lesion box is implausible (`alnus.data.roi.box_warning`), "" when it is not.

        The box judged is the lesion box before the margin, from the `roi` cell or the mask's bounding box, as each
        cropping network's ROI mode picks it. A row with both a drawn box and a mask also warns when the two disagree
        (`alnus.data.roi.sources_warning`; the mask is then decoded for a box network too). A package whose networks
        all see the whole image never warns; an ensemble warns once per image (twice only when its box and mask
        networks judge different boxes).

        Args:
            shape: the decoded image's (H, W).
            row: the image's `roi` / `mask` cells (mask paths relative to `root`).
        """
        return self._boxed_rows(shape, row, root, max_pixels=max_pixels)[1]

    def _boxed_rows(
        self, shape: tuple[int, ...], row: Mapping[str, str], root: Path, *, max_pixels: int | None = None
    ) -> tuple[dict[str, dict[str, str]], str]:
        """Each cropping ROI mode's lesion box, found once (a mask decoded once), as a row whose `roi` cell holds it
        and which names no mask, so cropping with it gives the same pixels; and the warning of those boxes
        (`roi_warning`)."""
        rows: dict[str, dict[str, str]] = {}
        texts: list[str] = []
        for mode in dict.fromkeys(n.spec.roi.mode for n in self.networks if n.spec.roi.mode != "whole"):
            box = lesion_box(row, root, shape[:2], RoiPolicy(mode), max_pixels=max_pixels)
            if box is None:
                continue
            rows[mode] = {**row, "roi": format_box(box), "mask": "", "mask_tumor": ""}
            drawn = _drawn_box(row)
            what = "lesion box" if drawn == box else "lesion mask's bounding box"
            found = [box_warning(shape, box, what=what)]
            if drawn is not None and mask_path(row) is not None:
                # Both given: the one this mode did not crop to is checked against the one it did.
                other = (
                    lesion_box(row, root, shape[:2], RoiPolicy("mask"), max_pixels=max_pixels)
                    if mode == "box"
                    else drawn
                )
                from_mask = other if mode == "box" else box
                if from_mask is not None:
                    found.append(sources_warning(drawn, from_mask, mode))
            texts += [text for text in found if text and text not in texts]
        return rows, " ".join(texts)

    def predict_arrays(
        self,
        images: Sequence[np.ndarray],
        rows: Sequence[Mapping[str, str]] | None = None,
        root: str | os.PathLike[str] = ".",
    ) -> np.ndarray:
        """Probabilities for decoded uint8 (H, W) images (from `load_image`).

        Args:
            rows: one manifest-like row per image, for the `roi`/`mask` cells a box or mask ROI policy needs;
                not needed when the package crops nothing (ROI mode `whole`).
            root: folder that relative mask paths in `rows` are resolved against.
        """
        if rows is not None and len(rows) != len(images):
            raise PredictError(f"got {len(images)} images but {len(rows)} rows; give one row per image.")
        inputs = []
        for i, image in enumerate(images):
            row = {} if rows is None else rows[i]
            try:
                inputs.append(self._inputs(np.asarray(image), row, Path(root)))
            except AlnusError as exc:
                raise PredictError(f"image {i}: {exc}") from exc
        if not inputs:
            return np.empty(0, dtype=np.float32)
        return self.predict_members([torch.stack(column) for column in zip(*inputs, strict=True)])

    def predict_table(
        self,
        table: pd.DataFrame,
        root: str | os.PathLike[str],
        *,
        cache: ImageCache | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> pd.DataFrame:
        """Predict every row of a manifest-like table (image paths relative to `root`, or absolute).

        Returns the table's image, patient_id, study_id, site and label columns (those it has), `y` (1 where
        label == the package's positive label) when it has labels, and `prob` (the image's probability). When
        the package has a frozen threshold, also the call made the way it was frozen (`alnus.operating_point`):
        for a patient-level threshold `patient_prob` (the mean, or max, of the patient's image probabilities)
        and `n_images`, then `call` (0/1, the same for every image of a patient) and `call_level`. Rows keep
        their order. Each network of an ensemble reads the images through the cache with its own preprocessing.
        """
        if "image" not in table.columns:
            raise PredictError("the table has no `image` column; give one image path per row.")
        has_labels = "label" in table.columns
        if has_labels:
            labels = table["label"].astype(object).fillna("").astype(str)
            unknown = np.flatnonzero(~labels.isin(self.label_names).to_numpy())
            if unknown.size:
                rows = ", ".join(f"row {i + 2} ({labels.iloc[i]!r})" for i in unknown[:8])
                raise PredictError(
                    f"{unknown.size} label(s) are not among the model's labels {self.label_names}: {rows}. "
                    "Fix the labels, or drop the label column to predict without them."
                )
            data = table
        else:
            data = table.assign(label="")
        datasets: dict[PreprocessSpec, UltrasoundDataset] = {}
        with warnings.catch_warnings():
            # Unlabelled tables have no positive rows by design; the dataset's warning about that is moot.
            warnings.filterwarnings("ignore", message="no row has label")
            for spec in dict.fromkeys(network.spec for network in self.networks):
                datasets[spec] = UltrasoundDataset(
                    data, root, spec, cache=cache, positive_label=self.positive_label, max_pixels=self.max_pixels
                )
        for dataset in datasets.values():
            dataset.warm(progress)
        first = datasets[self.spec]
        probs = np.empty(len(first), dtype=np.float64)
        for start in range(0, len(first), self.batch_size):
            stop = min(start + self.batch_size, len(first))
            batches = {spec: torch.stack([d[i][0] for i in range(start, stop)]) for spec, d in datasets.items()}
            probs[start:stop] = self.predict_members([batches[network.spec] for network in self.networks])
        out = table[[c for c in KEPT_COLUMNS if c in table.columns]].reset_index(drop=True).copy()
        if has_labels:
            out["y"] = first.targets
        out["prob"] = probs
        if self.operating_point is not None:
            out = _with_calls(out, self.operating_point)
        return out

    def predict_inputs(
        self, table: pd.DataFrame, *, progress: Callable[[int, int], None] | None = None
    ) -> pd.DataFrame:
        """Predict new images one file at a time: a file that fails gets its reason, the others their predictions.

        Args:
            table: one row per image as `alnus.data.inputs.collect_inputs` returns it: `image` (the name shown),
                `path` (the file read), and where known `patient_id`, `study_id`, `site`, `roi`, `mask` (absolute),
                `mask_name` (the mask as written, which the output shows), `frame`, and `error` (a row that already
                failed is not read).
            progress: called as `progress(done, total)` after each image.

        Returns:
            Rows in the table's order: `image`, `patient_id`, `study_id`, `site` and `roi` (when any row has one),
            `prob` (empty where the image failed); with a frozen threshold the call made the way it was frozen, on the
            images that were predicted (a failed image is left out of its patient's aggregate): `<level>_prob` and
            `n_images` (patient or study level), `call`, `call_level`, `prediction` (the call's label name) and
            `threshold` (what `<level>_prob` is compared with: `call` is 1 when it is at least that); then
            `engine`, `error` ("" where the image was predicted) and `warning` ("" unless the image was predicted with
            an implausible lesion box, see `roi_warning`; box and mask ROIs alike).
        """
        records = [{str(k): "" if pd.isna(v) else str(v) for k, v in r.items()} for r in table.to_dict("records")]
        if any("path" not in r for r in records):
            raise PredictError("the input table has no `path` column; build it with alnus.data.inputs.collect_inputs.")
        errors = [r.get("error", "") for r in records]
        warned, seen = [""] * len(records), [""] * len(records)
        frames: list[tuple[int, int | None] | None] = [None] * len(records)
        probs = np.full(len(records), np.nan)
        pending: list[tuple[int, list[torch.Tensor]]] = []

        def flush() -> None:
            if pending:
                columns = zip(*(x for _, x in pending), strict=True)
                probs[[i for i, _ in pending]] = self.predict_members([torch.stack(column) for column in columns])
                pending.clear()

        for i, row in enumerate(records):
            if not errors[i]:
                try:
                    inputs, warned[i], seen[i] = self._image_inputs(row)
                    frames[i] = self._frame_of(row)
                    pending.append((i, inputs))
                except (AlnusError, ValueError, OSError) as exc:
                    named = row.get("image") or row["path"]
                    errors[i] = _as_named(str(exc) or type(exc).__name__, row["path"], named)
                    if named != row["path"] and not Path(row["path"]).exists():
                        # A relative name: where it was resolved, and where README's real data belongs.
                        where = f" (looked for {row['path']}){shared_data_hint(row['path'])}"
                        errors[i] = f"{errors[i].removesuffix('.')}{where}."
            if len(pending) >= self.batch_size:
                flush()
            if progress is not None:
                progress(i + 1, len(records))
        flush()
        return self._new_data_table(records, probs, errors, warned, seen, frames)

    def _frame_of(self, row: Mapping[str, str]) -> tuple[int, int | None]:
        """(the frame predicted, the file's number of frames) from its header (`frame_choice`: the count is None for
        a PNG, JPEG, BMP or TIFF with no frame asked, whose first frame is read and whose pages are not counted)."""
        return frame_choice(row["path"], parse_frame(row.get("frame", "")), max_pixels=self.max_pixels)

    def network_inputs(self, row: Mapping[str, str]) -> tuple[list[torch.Tensor], str]:
        """One new image as each network's input (1, size, size), and its lesion box's warning ("" when none); raises
        with the reason it cannot be used."""
        inputs, warning, _ = self._image_inputs(row, seen=False)
        return inputs, warning

    def _image_inputs(self, row: Mapping[str, str], *, seen: bool = True) -> tuple[list[torch.Tensor], str, str]:
        """`network_inputs`, and with `seen` the warning when the image is one the model learned from
        (`seen_warning`; "" without)."""
        cropping = next((n.spec for n in self.networks if n.spec.roi.mode != "whole"), None)
        if cropping is not None and not row.get("roi") and not row.get("mask"):
            raise PredictError(f"{row.get('image', '?')}: {missing_roi_message(cropping)}")
        image = load_image(row["path"], frame=parse_frame(row.get("frame", "")), max_pixels=self.max_pixels)
        cells = {"image": row.get("image", row["path"]), "roi": row.get("roi", ""), "mask": row.get("mask", ""),
                 "mask_name": row.get("mask_name", "")}  # fmt: skip
        boxed, warning = self._boxed_rows(image.shape, cells, Path.cwd(), max_pixels=self.max_pixels)
        inputs = self._inputs(image, cells, Path.cwd(), max_pixels=self.max_pixels, boxed=boxed)
        return inputs, warning, self.seen_warning(image) if seen else ""

    def seen_warning(self, image: np.ndarray) -> str:
        """The warning for an image the model was trained or selected on, matched by perceptual hash against the
        package's development images (`alnus.data.seen`); "" for any other image, and for a package that does not
        list them (written before they were recorded)."""
        return "" if self.seen is None else self.seen.warning(image)

    def _new_data_table(
        self,
        records: list[dict[str, str]],
        probs: np.ndarray,
        errors: list[str],
        warned: list[str],
        seen: list[str],
        frames: Sequence[tuple[int, int | None] | None] = (),
    ) -> pd.DataFrame:
        """The output of `predict_inputs`: ids, probabilities, calls on the predicted images, engine, errors,
        warnings (`warned`: the lesion boxes'; `seen`: an image the model learned from); `frame` and `n_frames` (the
        frame predicted, 0-based, of how many where counted) when any image has several frames (`frames`)."""
        out = pd.DataFrame({"image": [r.get("image", r["path"]) for r in records]})
        out["patient_id"] = [r.get("patient_id", "") for r in records]
        # The lesion's box (or mask) says which lesion a row is when one image is listed with two of them.
        for column in ("study_id", "site", "roi", "mask"):
            # The mask as the user wrote it (as `image`), where the table says; the file read otherwise.
            named = "mask_name" if column == "mask" else column
            values = [r.get(named) or r.get(column, "") for r in records]
            if any(values):
                out[column] = values
        if any(f is not None and (f[1] or 1) > 1 for f in frames):
            # Which frame of a cine loop was read (a DICOM's middle one unless the row asked for another).
            out["frame"] = pd.array([None if f is None else f[0] for f in frames], dtype="Int64")
            out["n_frames"] = pd.array([None if f is None else f[1] for f in frames], dtype="Int64")
        for key in [k for k in (records[0] if records else {}) if k.startswith(KEPT_PREFIX)]:
            out[key.removeprefix(KEPT_PREFIX)] = [r.get(key, "") for r in records]  # `--keep`: as the manifest has it
        out["prob"] = probs
        ok = np.array([not e for e in errors], dtype=bool)
        if self.operating_point is not None:
            level = self.operating_point["level"]
            # With no image read there is nothing to aggregate (and no row to give a call).
            called = _with_calls(out[ok], self.operating_point) if ok.any() else pd.DataFrame(index=out.index[:0])
            for column in [*([f"{level}_prob", "n_images"] if level != "image" else []), "call", "call_level"]:
                values = called[column] if column in called.columns else pd.Series(index=called.index, dtype=object)
                if column in ("n_images", "call"):
                    values = values.astype("Int64")
                elif column == "call_level":
                    values = values.astype(object)
                else:
                    values = values.astype(float)
                out[column] = values.reindex(out.index)
            names = {1: self.positive_label, 0: self.negative_label or f"not {self.positive_label}"}
            out["call_level"] = out["call_level"].fillna("")
            out["prediction"] = [names[int(c)] if ok[i] else "" for i, c in enumerate(out["call"].fillna(0))]
            # The value the call compares with, so that a saved table reads on its own.
            out["threshold"] = np.where(ok, float(self.operating_point["value"]), np.nan)
        rule = self.metadata.get("reader_rule")
        reader_warned = [""] * len(records)
        if rule is not None:
            out, reader_warned = _with_reader_calls(out, [r.get("birads", "") for r in records], ok, rule)
        out["engine"] = self.engine
        out["error"] = errors
        box_warned = _case_warnings(out, warned, ok, self.operating_point)
        every = zip(box_warned, reader_warned, seen, strict=True)
        out["warning"] = ["; ".join(w for w in three if w) for three in every]
        return out


def _with_reader_calls(
    out: pd.DataFrame, readings: list[str], ok: np.ndarray, rule: Mapping[str, Any]
) -> tuple[pd.DataFrame, list[str]]:
    """The prediction table with the reader rule's columns (`alnus.combine.apply_reader_rule`) when any image has a
    reading, and each image's warning about them. A reading the rule cannot call costs its whole case (patient, at
    the rule's level) the reader columns, not the images their probabilities: the case's reading is its most
    suspicious one, which a refused reading could have been. A failed image gets no reader columns."""
    from alnus.combine import apply_reader_rule, has_readings, reading_problem

    warned = [""] * len(readings)
    if not has_readings(readings):
        return out, warned
    problems = [reading_problem(reading, rule) for reading in readings]
    called = apply_reader_rule(out.assign(prob=out["prob"].where(ok)), [
        "" if problem else reading for reading, problem in zip(readings, problems, strict=True)
    ], rule)  # fmt: skip
    units = unit_keys(out, rule["level"]).to_numpy()
    refused = {unit: problem for unit, problem in zip(units, problems, strict=True) if problem}
    blank = ~ok | np.array([unit in refused for unit in units], dtype=bool)
    out = out.assign(birads=called["birads"].where(~blank, ""))
    for column in ("reader_call", "with_ai_call", "ruled_out"):
        out[column] = called[column].astype("Int64").mask(blank).astype("Int64")
    out["with_ai"] = called["with_ai"].where(~blank, "")
    for i, unit in enumerate(units):
        if ok[i] and unit in refused:
            other = "" if problems[i] else f"another image of this {rule['level']} has one: "
            warned[i] = f"no call with the radiologist: {other}{refused[unit]}"
    return out, warned


def _case_warnings(out: pd.DataFrame, warned: list[str], ok: np.ndarray, point: Mapping[str, Any] | None) -> list[str]:
    """Each image's own warning; a patient's (study's) call averages its images, so its other predicted images say
    which of them had a box warning (implausible, or not matching its mask)."""
    warned = list(warned)
    if point is None or point["level"] == "image" or not any(warned):
        return warned
    keys = unit_keys(out, point["level"])
    for key in keys[[bool(w) for w in warned]].unique():
        rows = np.flatnonzero((keys == key).to_numpy() & ok)
        # The output row too: one image may be listed twice, with two lesions' boxes or masks.
        flagged = [f"{out['image'].iloc[i]} (row {i + 1})" for i in rows if warned[i]]
        for i in rows:
            if not warned[i]:
                warned[i] = (
                    f"this {point['level']}'s call also uses {', '.join(flagged)}, whose lesion box has a "
                    "warning (see its row)"
                )
    return warned


def _as_named(text: str, path: str, named: str) -> str:
    """An error about an image with the file as the user named it, not the absolute path it was read from. Only the
    path where it starts a name is replaced: a relative name such as ../../work/a.png already in the text holds the
    absolute path as its tail."""
    return re.sub(r"(?<![\w.~/-])" + re.escape(path), lambda _: named, text)


def _drawn_box(row: Mapping[str, str]) -> Box | None:
    """The box of the row's `roi` cell; None when it has none, or one a mask-first ROI mode never read (malformed)."""
    text = str(row.get("roi", "") or "").strip()
    if not text:
        return None
    try:
        return parse_box(text)
    except RoiError:
        return None


def _member_export_advice(package_dir: Path, meta: Mapping[str, Any], i: int, engine: str) -> str | None:
    """How to give member `i` of an ensemble an export (None for a single network): as `alnus export` says for an
    ensemble, export the member's own package (where the ensemble copied it from), then build the ensemble again."""
    if not is_ensemble(meta):
        return None
    source = Path(str(meta["members"][i - 1]["source"]))
    # `source` is relative to the run folder when the member came from inside it: runs/<run>/models/<NAME>/model.
    run_dir = package_dir.parent.parent.parent if package_dir.parent.parent.name == "models" else None
    if not source.is_absolute() and run_dir is not None:
        source = run_dir / source
    run = str(run_dir) if run_dir is not None else f"runs/{meta.get('run') or '<name>'}"
    name = meta.get("name") or package_dir.parent.name
    return (
        f"an ensemble's member is not exported inside the ensemble: export member {i}'s own package with `alnus "
        f"export {source} --format {engine}` (in the run it was trained in), then build the ensemble again "
        f"(`alnus ensemble {run} --name {name} --member PKG ... --force` copies each member's checked exports)"
    )


def missing_roi_message(spec: PreprocessSpec) -> str:
    """What to give when a package that crops to the lesion gets an image without a lesion region."""
    mode = spec.roi.mode
    return (
        f"no lesion region: this model was trained on images cropped to a lesion {mode} (ROI mode '{mode}'); give "
        "it with --roi x,y,w,h or --mask FILE (once per image, in order), or in the roi or mask column of a "
        "--manifest CSV."
    )


def read_card(package_dir: Path) -> str:
    """The package's model card (README.md, written by `alnus report`), or "" when it has none, it is unreadable or
    it is a symbolic link (a package's card is its own file: a link could show any file the reader may read)."""
    path = package_dir / "README.md"
    if path.is_symlink():
        return ""
    try:
        with open_regular(path) as fh:
            return fh.read(MAX_CARD_BYTES).decode("utf-8", errors="replace")
    except (OSError, NotAFileError):
        return ""


def _card_sections(card: str) -> dict[str, list[str]]:
    """The card's `## Heading` sections, each as its lines."""
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in card.splitlines():
        if line.startswith("## "):
            current = sections.setdefault(line[3:].strip(), [])
        elif current is not None:
            current.append(line)
    return sections


def _plain(markdown: str) -> str:
    """A Markdown line of the card as plain text: escapes undone, emphasis marks dropped."""
    return re.sub(r"\\(.)", r"\1", markdown.replace("**", "")).strip()


def _card_sites(lines: list[str]) -> list[str]:
    """The `site` column of the card's training-data table, each site once, in order."""
    table = [[_plain(c) for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]] for line in lines if line.startswith("|")]
    if len(table) < 3 or "site" not in table[0]:
        return []
    column = table[0].index("site")
    return list(dict.fromkeys(row[column] for row in table[2:] if len(row) > column and row[column]))


def package_notes(package_dir: str | os.PathLike[str], metadata: Mapping[str, Any]) -> list[str]:
    """What a user of the package must know before reading its predictions, as plain-text lines to print once.

    The intended use and the training sites come from the model card (README.md, `alnus.report.card`) when the package
    has one, else from metadata.json (a package saved before `alnus report` has no card). Whether new images resemble
    the training data cannot be checked in general, so the sites are named and the notice is always included.
    """
    sections = _card_sections(read_card(Path(package_dir)))
    use = [_plain(line) for line in sections.get("Intended use", []) if line.strip()]
    use = [line for line in use if line != NOTICE]
    positive = str(metadata.get("positive_label", "?"))
    others = [str(n) for n in metadata.get("label_names", []) if str(n) != positive]
    if use:
        intended = " ".join(use)
    else:
        intended = (
            f"the probability that a case is {positive} rather than {others[0] if others else 'not ' + positive}; "
            "the package has no model card (README.md, written by `alnus report RUN`) stating its intended use"
        )
    sites = _card_sites(sections.get("Training data", []))
    trained = (
        f"trained at {len(sites)} site(s): {', '.join(sites)}"
        if sites
        else "training sites not recorded in the package (no model card)"
    )
    run = metadata.get("run")
    adaptation = metadata.get("adaptation")
    adapted = []
    if isinstance(adaptation, Mapping):
        where = f" of {adaptation['site']}" if adaptation.get("site") else ""
        adapted = [
            f"Adapted (`alnus adapt`) to {adaptation.get('n_images', '?')} unlabelled image(s){where}: its BatchNorm "
            "statistics are that site's, every other weight is the source model's; the card's numbers were measured "
            "before adaptation."
            + ("" if metadata.get("threshold") else " It makes no calls until `alnus threshold` freezes a threshold.")
        ]
    return [
        f"Model: {metadata.get('backbone', '?')}" + (f" from run {run}" if run else "") + f", {trained}. It cannot "
        "tell whether new images resemble its training data (scanner, hospital, population, label): check that "
        "they do before trusting its output.",
        *adapted,
        f"Intended use: {intended}",
        NOTICE,
    ]


def _with_calls(out: pd.DataFrame, point: dict[str, Any]) -> pd.DataFrame:
    """The prediction table with the operating point's calls: `<level>_prob` and `n_images` (patient or study
    level), `call` and `call_level`."""
    calls = apply_operating_point(out, point)
    out = out.copy()
    if point["level"] != "image":
        out[f"{point['level']}_prob"] = calls["unit_prob"].to_numpy()
        out["n_images"] = calls["n_images"].to_numpy()
    out["call"] = calls["call"].to_numpy()
    out["call_level"] = calls["call_level"].to_numpy()
    return out


def _check_ensemble_data(run: RunFolder, model: str) -> None:
    """An ensemble predicts a run's splits only while the run's data are those it was built on: its members' training
    patients were checked against the split then (`alnus.ensemble`), and a split made again may put them in a test."""
    from alnus.models.package import read_metadata

    meta = read_metadata(run.model(model).package)
    if not is_ensemble(meta):
        return
    current = None
    if run.data_stamp.is_file():
        with contextlib.suppress(OSError, ValueError, AttributeError):
            current = json.loads(run.data_stamp.read_text(encoding="utf-8")).get("hash")
    if meta.get("run_data_hash") != current:
        raise PredictError(
            f"ensemble {model} was built before {run.root} was prepared again ({run.data_stamp.name} changed), so "
            "its members may have been trained on other patients than this split's training patients; build it "
            f"again from this run's trained packages (`alnus ensemble {run.root} --name {model} --member PKG ... "
            "--force`)."
        )


def _check_training_data(run: RunFolder, model: str, expected: Callable[[], str]) -> None:
    """A trained package predicts a run's splits only when it was trained and selected on the run's train and val
    rows: one trained on another split (copied in from another run, or left by a training stopped after the run was
    prepared again) may have learned this split's validation or test patients."""
    from alnus.models.package import read_metadata

    meta = read_metadata(run.model(model).package)
    recorded = meta.get("training_data_hash")
    if is_ensemble(meta) or not isinstance(recorded, str) or not recorded:
        return  # an ensemble's members were checked when it was built (`_check_ensemble_data`)
    if recorded != expected():
        raise PredictError(
            f"{run.model(model).package} was trained on other data than the train and val split of {run.root} "
            f"(training-data hash {recorded[:12]}..., this run's {expected()[:12]}...): it may have seen patients "
            "that this split puts in validation or a test, which would make its results look better than they are "
            "(or the training images changed since it was trained). Put back the package that training wrote there, "
            f"or train it again in this run: delete {run.model(model).root} and run `alnus study CONFIG` (or "
            "`alnus train CONFIG`)."
        )


def predict_run(
    run_dir: str | os.PathLike[str],
    *,
    models: Sequence[str] | None = None,
    splits: Sequence[str] = SPLITS,
    device: str = "auto",
    batch_size: int = 32,
    precision: str = "fp32",
    compile: bool = False,
    max_pixels: int | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Write `models/<backbone>/predictions/<split>.csv` for each model package of a run; return a summary.

    Each CSV has exactly the split's rows of `splits.csv` and the columns image, patient_id, study_id, site,
    label, y, prob. `predictions.json` (written last) records the weights (and TTA views) they came from, so evaluate
    can tell predictions of an older training. A trained package whose training-data hash is not the run's train and
    val rows' is refused, as is an ensemble of the run when the run was prepared again after it was built. Splits
    without rows are skipped. Images are read through the run's image cache (`runs/<name>/cache`, shared with
    training). The study's predictions always run on PyTorch (the weights it trained), never on an ONNX export of
    them.

    Args:
        precision: see `Predictor`; the study predicts in fp32, the reference every engine is checked against
            (training may run in bf16; its validation AUC only picks the best epoch).
        compile: see `Predictor`.
        max_pixels: decoding limit per image (the study passes its `data.max_image_pixels`).
        progress: called as `progress(f"{model} {split}", done, total)` while images are decoded.
    """
    run_dir = Path(run_dir)
    run = RunFolder(run_dir)
    table = read_splits(run_dir)
    unknown_splits = [s for s in splits if s not in SPLITS]
    if unknown_splits:
        raise PredictError(f"unknown split(s) {', '.join(unknown_splits)}; choose from {', '.join(SPLITS)}.")
    names = run_models(run_dir, models or [])
    cache = ImageCache(run.cache)
    summary: dict[str, Any] = {}
    training_hash: list[str] = []  # the run's, computed (every training image hashed) only when a package needs it

    def expected() -> str:
        from alnus.ensemble import run_training_hash

        if not training_hash:
            training_hash.append(run_training_hash(run_dir))
        return training_hash[0]

    for model in names:
        where = run.model(model)
        _check_ensemble_data(run, model)
        _check_training_data(run, model, expected)
        predictor = Predictor(
            where.package,
            device=device,
            batch_size=batch_size,
            precision=precision,
            compile=compile,
            max_pixels=max_pixels,
            engine="torch",
        )
        stamp = where.predictions_stamp
        # Removed first: CSVs of a half-finished run must not look like they match the current weights.
        stamp.unlink(missing_ok=True)
        written: dict[str, str] = {}
        counts: dict[str, int] = {}
        digests: dict[str, str] = {}
        for split in splits:
            rows = table[table["split"] == split]
            if rows.empty:
                continue
            report = None if progress is None else (lambda d, t, s=f"{model} {split}": progress(s, d, t))
            out = predictor.predict_table(rows, run_dir, cache=cache, progress=report)
            for column in ("study_id", "site"):
                if column not in out.columns:
                    out[column] = ""
            path = where.predictions_csv(split)
            write_csv(out[list(PREDICTION_COLUMNS)], path)
            written[split], counts[split], digests[split] = str(path), len(out), file_sha256(path)
        record = {
            "weights_sha256": predictor.metadata["weights_sha256"],
            "tta": predictor.tta,
            "backbone": predictor.metadata["backbone"],
            "device": str(predictor.device),
            "precision": predictor.precision.name,
            "rows": counts,
            # Each table as written: evaluate refuses one edited since, or one left by an earlier prediction.
            "sha256": digests,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        atomic_write_text(stamp, json.dumps(record, indent=2) + "\n")
        summary[model] = {**record, "predictions": written}
    return summary
