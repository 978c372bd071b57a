"""Model package + images -> probabilities and calls: the one prediction path of the study, CLI and service.

Images are decoded by `alnus.data.images.load_image` and turned into the network's input by the same
`alnus.data.dataset.preprocess` (and the same dataset class and tensor scaling) that training used, with the
preprocessing spec stored in the package, so a prediction cannot disagree with the study. The operating
point, once `alnus evaluate` has frozen it on validation, comes from the package too, and is applied the way it
was frozen (`alnus.operating_point`): with a patient-level threshold the call is made on the mean (or max) of a
patient's image probabilities, and every image of the patient carries that call; an image without a patient id is
its own patient.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from alnus._hardware import autocast, choose_precision
from alnus._io import atomic_write_text, write_csv
from alnus.data.dataset import ImageCache, PreprocessSpec, UltrasoundDataset, _to_tensor, preprocess
from alnus.errors import AlnusError
from alnus.models.package import load_package
from alnus.operating_point import apply_operating_point, describe, rule_name
from alnus.runfolder import EVALUATION_SPLITS as SPLITS
from alnus.runfolder import PREDICTION_COLUMNS, RunFolder, read_splits, run_models

# Columns of the input table carried into the predictions (when present).
KEPT_COLUMNS = ("image", "patient_id", "study_id", "site", "label")


class PredictError(AlnusError):
    """A table, image or run folder that cannot be predicted; the message names the row or file."""


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


class Predictor:
    """A loaded model package that turns images into probabilities (and calls, once a threshold is frozen).

    Args:
        package_dir: a folder written by `alnus.models.package.save_package`.
        device: `auto`, `cpu`, `cuda` or `cuda:N`.
        batch_size: images per forward pass.
        precision: `auto` (bf16 autocast + channels_last where the hardware supports it, see
            `alnus._hardware.choose_precision`), `fp32`, `bf16` or `fp16`.
        compile: `torch.compile` the model with frozen weights (batch norm folded into the convolutions): faster
            per image after a one-off compilation per model and batch shape, so it pays off only on large image
            sets (measured by bench/throughput.py; the numbers are in docs/performance.md).
    """

    def __init__(
        self,
        package_dir: str | os.PathLike[str],
        *,
        device: str | torch.device = "auto",
        batch_size: int = 32,
        precision: str = "auto",
        compile: bool = False,
        max_pixels: int | None = None,
    ) -> None:
        if int(batch_size) != batch_size or batch_size < 1:
            raise PredictError(f"batch_size must be a positive whole number, got {batch_size!r}.")
        self.package_dir = Path(package_dir)
        self.device = resolve_device(device)
        model, meta = load_package(self.package_dir)
        self.metadata: dict[str, Any] = meta
        self.spec = PreprocessSpec.from_dict(meta["preprocess"])
        self.label_names: list[str] = [str(name) for name in meta["label_names"]]
        self.positive_label = str(meta["positive_label"])
        # The operating point as `read_metadata` checked it: value, rule, target, level, aggregate (or None).
        self.operating_point: dict[str, Any] | None = meta["threshold"]
        self.threshold: float | None = None if self.operating_point is None else self.operating_point["value"]
        self.batch_size = int(batch_size)
        self.max_pixels = max_pixels
        self.precision = choose_precision(self.device, precision)
        model = model.to(self.device)
        if self.precision.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model.eval()
        self.compiled = bool(compile)
        self._forward = torch.compile(self.model) if self.compiled else self.model

    @property
    def call_rule(self) -> str | None:
        """The rule the calls follow, in words (None until a threshold is frozen)."""
        if self.operating_point is None:
            return None
        point = self.operating_point
        rule = f"{describe(point)} ({rule_name(point)}, frozen on validation)"
        if point["level"] == "image":
            return rule
        return f"{rule}; an image without a {point['level']} id is its own {point['level']}"

    @property
    def negative_label(self) -> str | None:
        """The other class's name when the package has exactly two labels."""
        others = [name for name in self.label_names if name != self.positive_label]
        return others[0] if len(others) == 1 else None

    def predict_batch(self, x: torch.Tensor) -> np.ndarray:
        """Probabilities of the positive class for a batch `(B, 1, size, size)` in [0, 1]."""
        out = []
        with torch.inference_mode():
            for start in range(0, x.shape[0], self.batch_size):
                chunk = x[start : start + self.batch_size].to(self.device)
                if self.precision.channels_last:
                    chunk = chunk.contiguous(memory_format=torch.channels_last)
                with autocast(self.device, self.precision), _freezing(self.compiled):
                    logits = self._forward(chunk)
                out.append(torch.sigmoid(logits.float()).cpu().numpy())
        return np.concatenate(out) if out else np.empty(0, dtype=np.float32)

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
                inputs.append(_to_tensor(preprocess(np.asarray(image), row, Path(root), self.spec)))
            except AlnusError as exc:
                raise PredictError(f"image {i}: {exc}") from exc
        if not inputs:
            return np.empty(0, dtype=np.float32)
        return self.predict_batch(torch.stack(inputs))

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
        their order.
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
        with warnings.catch_warnings():
            # Unlabelled tables have no positive rows by design; the dataset's warning about that is moot.
            warnings.filterwarnings("ignore", message="no row has label")
            dataset = UltrasoundDataset(
                data, root, self.spec, cache=cache, positive_label=self.positive_label, max_pixels=self.max_pixels
            )
        dataset.warm(progress)
        probs = np.empty(len(dataset), dtype=np.float64)
        for start in range(0, len(dataset), self.batch_size):
            stop = min(start + self.batch_size, len(dataset))
            batch = torch.stack([dataset[i][0] for i in range(start, stop)])
            probs[start:stop] = self.predict_batch(batch)
        out = table[[c for c in KEPT_COLUMNS if c in table.columns]].reset_index(drop=True).copy()
        if has_labels:
            out["y"] = dataset.targets
        out["prob"] = probs
        if self.operating_point is not None:
            out = _with_calls(out, self.operating_point)
        return out


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


def predict_run(
    run_dir: str | os.PathLike[str],
    *,
    models: Sequence[str] | None = None,
    splits: Sequence[str] = SPLITS,
    device: str = "auto",
    batch_size: int = 32,
    precision: str = "auto",
    compile: bool = False,
    max_pixels: int | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Write `models/<backbone>/predictions/<split>.csv` for each model package of a run; return a summary.

    Each CSV has exactly the split's rows of `splits.csv` and the columns image, patient_id, study_id, site,
    label, y, prob. `predictions.json` (written last) records the weights they came from, so evaluate can tell
    predictions of an older training. Splits without rows are skipped. Images are read through the run's
    image cache (`runs/<name>/cache`, shared with training).

    Args:
        precision: see `Predictor`; the study passes its `train.precision`, so prediction runs as training did.
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
    for model in names:
        where = run.model(model)
        predictor = Predictor(
            where.package,
            device=device,
            batch_size=batch_size,
            precision=precision,
            compile=compile,
            max_pixels=max_pixels,
        )
        stamp = where.predictions_stamp
        # Removed first: CSVs of a half-finished run must not look like they match the current weights.
        stamp.unlink(missing_ok=True)
        written: dict[str, str] = {}
        counts: dict[str, int] = {}
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
            written[split], counts[split] = str(path), len(out)
        record = {
            "weights_sha256": predictor.metadata["weights_sha256"],
            "backbone": predictor.metadata["backbone"],
            "device": str(predictor.device),
            "precision": predictor.precision.name,
            "rows": counts,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        atomic_write_text(stamp, json.dumps(record, indent=2) + "\n")
        summary[model] = {**record, "predictions": written}
    return summary
