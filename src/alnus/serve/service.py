"""The model behind the service: one package loaded once, its forward passes run by one worker thread.

Every prediction takes the study's one path (`alnus.predict.Predictor` for the probability, `alnus.explain` for the
heat map on the original image) and the package's frozen operating point (`alnus.operating_point`), so the service
cannot disagree with `alnus predict` on the same image and box. The worker is a single thread: the event loop keeps
answering (`/healthz` above all) while a prediction runs, and it decodes at most `MAX_BATCH` images at a time, which
bounds memory whatever the number of callers; predictions that queued while it was busy share one forward pass. Heat
maps are drawn over the original image by `DRAWING_THREADS` other threads while the worker goes on. With the
radiologist's BI-RADS and a package that carries a reader rule (`alnus.reader_rule`), an answer also gives the
radiologist's call and the call with AI, by the rule `alnus predict --birads` applies.
A request that waits or runs longer than the timeout is answered 504; a job still queued is dropped, one already
running finishes in the worker and its files are removed when it ends.

What is said about an upload never names its file or quotes its contents: messages of the decoder name our temporary
copy, which is replaced by "the uploaded image", and DICOM identifiers are never read (`alnus.data.images`).
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import re
import threading
import traceback
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
from PIL import Image

from alnus.combine import apply_reader_rule, reading_problem
from alnus.data.dataset import PreprocessSpec
from alnus.data.images import FrameError, frame_choice, load_image, us_region_note
from alnus.data.roi import Box, RoiError, box_inside, format_box, parse_box
from alnus.data.tta import all_views
from alnus.errors import AlnusError
from alnus.explain import OVERLAY_WIDTH, Explanation, explain_images
from alnus.models.package import METADATA_FILE, read_metadata
from alnus.operating_point import apply_operating_point, describe, rule_name
from alnus.predict import ModelOutputError, Predictor
from alnus.predict import read_card as read_package_card
from alnus.reader_rule import describe_reader_rule, rule_caveats
from alnus.report.card import CARD_FILE, NOTICE, intended_use
from alnus.serve.security import ServeError
from alnus.serve.uploads import ApiError, new_upload_folder, remove_upload_folder

logger = logging.getLogger("alnus.serve")
T = TypeVar("T")

UPLOAD_NAME = "the uploaded image"
HEATMAP_METHOD = "gradcam"
# Heat maps are made at the image's own size: above this many pixels (4096 x 4096) an answer comes without one.
HEATMAP_MAX_PIXELS = 4096 * 4096
# The preview the page draws the lesion box on: the decoded image, scaled down to this many pixels on its long side.
PREVIEW_SIDE = 1024
# zlib level of the PNGs sent (heat maps, previews): 1 is the fastest.
PNG_COMPRESS_LEVEL = 1
# Predictions queued while the worker was busy run together, up to this many images per forward pass.
MAX_BATCH = 8
# Threads that draw heat-map overlays (while the worker runs the next batch).
DRAWING_THREADS = 2
# A model card is a few kB of Markdown; a larger README is not one.
MAX_CARD_BYTES = 1 << 20
# Characters of a refused BI-RADS value quoted back in the error.
QUOTED_CHARS = 20
# What an answer depends on in the package's metadata.json: a threshold frozen again, a reader rule set or removed, or
# weights trained again there make the package loaded at start another one than the package on disk.
ANSWERING_KEYS = ("weights_sha256", "threshold", "reader_rule", "preprocess", "tta", "label_names", "positive_label")


@dataclass(frozen=True)
class Settings:
    """What the operator chose at start: heat maps on or off, the per-request timeout, the decoding limit."""

    heatmap: bool = True
    timeout_s: float = 30.0
    max_pixels: int | None = None
    work_dir: Path | None = None


def _scrub(text: str, folder: Path) -> str:
    """A decoder's message with the temporary copy's path replaced by words (the folder name is random and private)."""
    for path in sorted((str(p) for p in folder.glob("upload*")), key=len, reverse=True):
        text = text.replace(path, UPLOAD_NAME)
    text = text.replace(str(folder), "the upload folder")
    return re.sub(r"row \d+ \(image '[^']*'\)", UPLOAD_NAME, text)


def _plain(markdown: str) -> str:
    """Markdown text of the card as plain text (bold marks and backslash escapes removed)."""
    return re.sub(r"\\(.)", r"\1", markdown.replace("**", ""))


def _cells(line: str) -> list[str]:
    """The cells of one Markdown table row (pipes escaped as `\\|` stay in their cell)."""
    inner = line.strip()
    inner = inner[1:] if inner.startswith("|") else inner
    inner = inner[:-1] if inner.endswith("|") and not inner.endswith("\\|") else inner
    return [_plain(cell.strip()) for cell in re.split(r"(?<!\\)\|", inner)]


def card_section(card: str, title: str) -> str | None:
    """The text under `## title` of a model card, up to the next `## ` heading; None when the card has no such one."""
    match = re.search(rf"^## {re.escape(title)}[ \t]*$(.*?)(?=^## |\Z)", card, flags=re.M | re.S)
    return None if match is None else match.group(1).strip()


def validation_table(card: str) -> dict[str, Any] | None:
    """The card's validation results as {note, columns, rows} (plain text cells); None when the card has none."""
    section = card_section(card, "Validation results")
    if section is None:
        return None
    table = [line for line in section.splitlines() if line.strip().startswith("|")]
    note = " ".join(_plain(line.strip()) for line in section.splitlines() if line.strip() and line not in table)
    rows = [_cells(line) for line in table if not re.fullmatch(r"\|?[\s:|-]+\|?", line.strip())]
    if not rows:
        return {"note": note, "columns": [], "rows": []}
    return {"note": note, "columns": rows[0], "rows": rows[1:]}


def read_card(package_dir: Path) -> str | None:
    """The package's model card (README.md) as text, None when there is none (a package not yet reported)."""
    path = package_dir / CARD_FILE
    if path.is_symlink() or not path.is_file() or path.stat().st_size > MAX_CARD_BYTES:
        return None  # a link could hand out any file the server may read
    return read_package_card(package_dir) or None


def model_info(predictor: Predictor, settings: Settings) -> dict[str, Any]:
    """What `/v1/model` says of the package: identity, input, operating point, intended use, validation results.

    A subset of metadata.json: the training settings (which hold the study's file paths) are left out.
    """
    meta = predictor.metadata
    card = read_card(predictor.package_dir)
    point = predictor.operating_point
    validation = None if card is None else validation_table(card)
    return {
        "model": _identity(meta),
        "labels": {
            "names": predictor.label_names,
            "positive": predictor.positive_label,
            "negative": predictor.negative_label,
        },
        "input": _input_info(predictor),
        "threshold": None
        if point is None
        else {
            "value": point["value"],
            "rule": rule_name(point),
            "level": point["level"],
            "aggregate": point["aggregate"],
            "description": describe(point),
            "frozen_at": point.get("frozen_at"),
            "applied_here": _applied_here(point),
        },
        "intended_use": [_plain(line) for line in intended_use(meta) if line.strip()],
        "notice": NOTICE,
        "validation": validation,
        "validation_source": _validation_source(validation is not None, meta.get("adaptation")),
        "adaptation": meta.get("adaptation"),
        "val_auc_at_selection": meta.get("val_auc"),
        "model_card": card,
        "reader_rule": _reader_rule_info(meta.get("reader_rule"), predictor.positive_label),
        "heatmap": settings.heatmap,
        "heatmap_note": predictor.heatmap_note,
        "engine": predictor.engine_description,
    }


def _reader_rule_info(rule: dict[str, Any] | None, positive_label: str) -> dict[str, Any] | None:
    """What `/v1/model` says of the package's reader rule (None: it has none). Where it was set (`frozen_on`, a
    manifest's name) is left out, as the training settings are."""
    if rule is None:
        return None
    return {
        "value": rule["value"],
        "positive_from": rule["positive_from"],
        "lowest": list(rule["lowest"]),
        "level": rule["level"],
        "aggregate": rule["aggregate"],
        "rule": describe_reader_rule(rule),
        "caveats": rule_caveats(rule, positive_label),
        "chosen_on": rule.get("chosen_on"),
        "frozen_at": rule.get("frozen_at"),
        "applied_here": _rule_applied_here(rule),
    }


def _rule_applied_here(rule: dict[str, Any]) -> str:
    """How a reader rule set at some level is applied to the one image (and its one reading) a request sends."""
    if rule["level"] == "image":
        return "The rule was set per image, and is applied to this image and its BI-RADS reading."
    return (
        f"The rule was set per {rule['level']} (the {rule['aggregate']} probability of a {rule['level']}'s images); "
        f"here it is applied to this one image and its BI-RADS reading as if it were the {rule['level']}'s only "
        "image."
    )


def _validation_source(found: bool, adaptation: object) -> str:
    if not found:
        return (
            f"none: the package has no model card with validation results ({CARD_FILE}; `alnus report RUN` writes it)"
        )
    if adaptation:
        return (
            f"the model card ({CARD_FILE}): the source model's results, measured before `alnus adapt` re-estimated "
            "its BatchNorm statistics (see `adaptation`)"
        )
    return f"the model card ({CARD_FILE})"


def _input_text(spec: PreprocessSpec) -> str:
    roi = spec.roi
    region = "the whole image" if roi.mode == "whole" else f"the lesion {roi.mode} with a margin of {roi.margin:g}"
    grey = {"stretch": ", grey levels stretched", "equalize": ", histogram equalised"}.get(spec.grey, "")
    limit = "" if spec.max_crop is None else f", first reduced to at most {spec.max_crop} px"
    return f"{region}{limit}{grey}, resized to {spec.size} px"


def _input_info(predictor: Predictor) -> dict[str, Any]:
    """What the network(s) look at. `roi_mode` and `roi_margin` are those of the (first) network that crops to the
    lesion, when any does: what the box a request sends is for; `size` is the first network's."""
    networks = predictor.networks
    cropping = next((n.spec for n in networks if n.spec.roi.mode != "whole"), predictor.spec)
    description = _input_text(predictor.spec)
    if predictor.is_ensemble:
        parts = [f"member {i} ({n.backbone}): {_input_text(n.spec)}" for i, n in enumerate(networks, start=1)]
        description = f"{predictor.metadata['backbone']}; " + "; ".join(parts)
    if predictor.tta:
        description += f"; test-time augmentation: the mean over {', '.join(all_views(predictor.tta))}"
    info = {
        "size": predictor.spec.size,
        "roi_mode": cropping.roi.mode,
        "roi_margin": cropping.roi.margin,
        "needs_roi": predictor.needs_roi,
        "keep_aspect": predictor.spec.keep_aspect,
        "tta": list(predictor.tta),
        "description": description,
    }
    if predictor.is_ensemble:
        info["members"] = [
            {"backbone": n.backbone, "size": n.spec.size, "roi_mode": n.spec.roi.mode, "roi_margin": n.spec.roi.margin,
             "keep_aspect": n.spec.keep_aspect}
            for n in networks
        ]  # fmt: skip
    return info


def _identity(meta: dict[str, Any]) -> dict[str, Any]:
    # An ensemble carries the name of its model folder (`name`); a single network is named by its backbone.
    run, backbone = meta.get("run"), str(meta["backbone"])
    name = str(meta.get("name") or backbone)
    return {
        "name": f"{run}/{name}" if run else name,
        "backbone": backbone,
        "version": str(meta.get("created") or ""),
        "weights_sha256": str(meta["weights_sha256"]),
        "alnus_version": (meta.get("versions") or {}).get("alnus"),
    }


def _applied_here(point: dict[str, Any]) -> str:
    """How a threshold frozen at some level is applied to the one image a request sends."""
    level = point["level"]
    if level == "image":
        return "The threshold was frozen per image, and is applied to this image."
    return (
        f"The threshold was frozen per {level} (the {point['aggregate']} probability of a {level}'s images); here it "
        f"is applied to this one image as if it were the {level}'s only image. To combine several images of a "
        f"{level}, ask for them to be predicted together (the command-line tool takes a {level} id per image)."
    )


@dataclass(eq=False)
class _Job:
    """One request's work for the worker: the preview or the prediction of the uploaded file at `path`; its answer
    (or error) arrives in `future`."""

    kind: str
    path: Path
    roi: str | None = None
    heatmap: bool = False
    birads: str | None = None
    frame: int | None = None
    future: Future = field(default_factory=Future)


@dataclass(eq=False)
class _Ready:
    """A prediction whose image is decoded and whose box is checked, waiting for the forward pass."""

    job: _Job
    image: np.ndarray
    box: Box | None
    frame: int = 0
    frames: int | None = 1

    @property
    def row(self) -> dict[str, str]:
        """The manifest-like row of the prediction path (absolute image path; the box, when one was sent; the frame
        decoded, so that the heat map is drawn on the same one)."""
        row = {"image": str(self.job.path), "frame": str(self.frame)}
        return row | ({"roi": format_box(self.box)} if self.box is not None else {})


class ModelService:
    """A loaded model package with a one-thread worker that previews and predicts uploaded image files.

    Predictions that queue while the worker is busy run together, up to `MAX_BATCH` images per forward pass (one
    pass of several images costs less than as many passes of one); each image is decoded on its own, so one broken
    upload answers its own request with its error and the others theirs with their results.

    Args:
        predictor: the package, loaded once (`alnus.predict.Predictor`); its `batch_size` should be `MAX_BATCH`.
        settings: heat maps, timeout, decoding limit, where uploads are kept while a request runs.
    """

    def __init__(self, predictor: Predictor, settings: Settings | None = None) -> None:
        self.predictor = predictor
        self.settings = settings or Settings()
        if self.settings.timeout_s <= 0:
            raise AlnusError(f"the timeout must be above 0 seconds, got {self.settings.timeout_s}.")
        self.info = model_info(predictor, self.settings)
        self._loaded = {key: predictor.metadata.get(key) for key in ANSWERING_KEYS}
        self._metadata_seen = _file_signature(predictor.package_dir / METADATA_FILE)
        self._pending: list[_Job] = []
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="alnus-predict")
        # Heat-map overlays are drawn by their own few threads, a bounded number (and so bounded memory).
        self._drawing = ThreadPoolExecutor(max_workers=DRAWING_THREADS, thread_name_prefix="alnus-draw")
        self.busy = False

    def close(self) -> None:
        """Stop the worker (a job still running finishes first; queued ones are dropped)."""
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._drawing.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            dropped, self._pending = self._pending, []
        for job in dropped:
            job.future.cancel()

    def check_package(self) -> None:
        """A 503 when the package's metadata.json now says something else than at start about what an answer depends
        on (`ANSWERING_KEYS`): the service would answer with a threshold, reader rule or weights the package no longer
        has. The file is read again only when its size, time or inode changed."""
        path = self.predictor.package_dir / METADATA_FILE
        signature = _file_signature(path)
        if signature == self._metadata_seen:
            return
        try:
            now = read_metadata(self.predictor.package_dir)
        except AlnusError:
            changed = ["metadata.json"]
        else:
            changed = [key for key in ANSWERING_KEYS if now.get(key) != self._loaded[key]]
        if changed:
            raise ApiError(
                503,
                f"the model package changed on disk after the service started ({', '.join(changed)}): answers would "
                "not be the package's any more; restart `alnus serve` to load it as it is now.",
            )
        self._metadata_seen = signature  # rewritten with the same content (an export recorded, say)

    async def preview(
        self, path: Path, cleanup: Callable[[], None] | None = None, frame: int | None = None
    ) -> dict[str, Any]:
        """The decoded image (its `frame`; None: the default one) to draw the lesion box on (see `_preview`), from
        the worker."""
        return await self._submit(_Job("preview", path, frame=frame), cleanup)

    def birads(self, value: str | None) -> str | None:
        """The radiologist's BI-RADS a request sent, checked (None: none sent); a 422 when it is not a category or
        the package carries no reader rule to use it with. Checked before the image is queued."""
        text = (value or "").strip()
        if not text:
            return None
        if self.predictor.metadata.get("reader_rule") is None:
            raise ApiError(
                422,
                "birads: this model package carries no reader rule, so the radiologist's BI-RADS cannot be used; set "
                "one on labelled validation patients with their BI-RADS (`alnus reader-rule PACKAGE --manifest "
                "VALIDATION.csv`) and restart the service, or send no birads.",
            )
        problem = reading_problem(text, self.predictor.metadata["reader_rule"])
        if problem:
            shown = text if len(text) <= QUOTED_CHARS else text[:QUOTED_CHARS] + "..."
            raise ApiError(422, f"birads: {problem.replace(repr(text), repr(shown), 1)}.")
        return text

    async def predict(
        self,
        path: Path,
        roi: str | None,
        heatmap: bool,
        cleanup: Callable[[], None] | None = None,
        birads: str | None = None,
        frame: int | None = None,
    ) -> dict[str, Any]:
        """Probability, call at the frozen threshold, (when asked) heat map and (with a BI-RADS reading) the
        radiologist's call and the call with AI of one uploaded image file.

        Args:
            roi: the lesion box `x,y,w,h` as sent (checked here).
            cleanup: called once the file is no longer needed: when the job ends, or when it is dropped from the
                queue because its caller stopped waiting (timeout), even after this call has returned.
            birads: the radiologist's BI-RADS, checked by `birads` (None: none sent).
            frame: the 0-based frame of a multi-frame image (None: a DICOM's middle frame, a TIFF's first page).
        """
        try:
            self.check_package()
            reading = self.birads(birads)
        except ApiError:
            if cleanup is not None:
                cleanup()
            raise
        answer, explanation = await self._submit(_Job("predict", path, roi, heatmap, reading, frame), cleanup)
        if explanation is not None:
            # Drawn off the worker, which runs the next batch meanwhile: the overlay on the original image, its PNG.
            answer["heatmap"] = await asyncio.wrap_future(self._drawing.submit(_overlay_uri, explanation))
            answer["heatmap_note"] = explanation.note or None
        return answer

    async def _submit(self, job: _Job, cleanup: Callable[[], None] | None) -> Any:
        """Queue `job` for the worker and wait at most the timeout for its answer (504 after it)."""
        if cleanup is not None:
            job.future.add_done_callback(lambda _: cleanup())
        with self._lock:
            self._pending.append(job)
        try:
            self._executor.submit(self._drain)
        except RuntimeError:  # the worker was shut down: the service is stopping
            job.future.cancel()
            raise ApiError(503, "the service is shutting down; try again when it is back.") from None
        try:
            return await asyncio.wait_for(asyncio.wrap_future(job.future), self.settings.timeout_s)
        except asyncio.TimeoutError:
            job.future.cancel()  # dropped if still queued; one already running finishes and then cleans up
            raise ApiError(
                504,
                f"the prediction did not finish within the service's timeout of {self.settings.timeout_s:g} s (the "
                "server is busy, or the image is very large); try again later.",
            ) from None

    # ---------------------------------------------------------------------------------------- the worker thread
    def _drain(self) -> None:
        """Take the jobs queued so far (up to `MAX_BATCH`), skip those whose callers stopped waiting, answer the rest.

        Every job taken is answered, whatever fails: an unexpected error is a 500 that names its type only.
        """
        with self._lock:
            jobs, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
        live = [job for job in jobs if job.future.set_running_or_notify_cancel()]
        if not live:
            return
        self.busy = True
        try:
            for job in live:
                if job.kind == "preview":
                    self._answer_with(job, lambda job=job: self._preview(job.path, job.frame))
            for heatmap in (False, True):
                group = [job for job in live if job.kind == "predict" and job.heatmap == heatmap]
                if group:
                    self._predict_group(group, heatmap)
        finally:
            self.busy = False
            for job in live:
                if not job.future.done():
                    job.future.set_exception(_unexpected())

    def _attempt(self, job: _Job, work: Callable[[], T]) -> T | None:
        """`work()`; on failure, answer `job` with the error and return None."""
        try:
            return work()
        except ApiError as exc:
            job.future.set_exception(exc)
        except Exception as exc:
            log_failure(exc, "a prediction")
            job.future.set_exception(_unexpected(exc))
        return None

    def _answer_with(self, job: _Job, work: Callable[[], Any]) -> None:
        answer = self._attempt(job, work)
        if answer is not None:
            job.future.set_result(answer)

    def _predict_group(self, jobs: list[_Job], heatmap: bool) -> None:
        """Decode each image, then one forward pass for all (each on its own if that pass fails, so that an error is
        told to its own request only)."""
        ready = [r for r in (self._attempt(job, lambda job=job: self._prepare(job)) for job in jobs) if r is not None]
        if len(ready) > 1:
            try:
                answers = self._infer(ready, heatmap)
            except Exception:  # noqa: BLE001 - retried one by one below, where the error is reported
                pass
            else:
                for item, answer in zip(ready, answers, strict=True):
                    item.job.future.set_result(answer)
                return
        for item in ready:
            self._answer_with(item.job, lambda item=item: self._infer([item], heatmap)[0])

    def _decode(self, path: Path, frame: int | None = None) -> tuple[np.ndarray, int, int | None]:
        """The image's `frame` (None: the default one), decoded; the frame's index, and how many the file has."""
        try:
            index, frames = frame_choice(path, frame, max_pixels=self.settings.max_pixels)
            return load_image(path, frame=index, max_pixels=self.settings.max_pixels), index, frames
        except FrameError as exc:
            raise ApiError(422, f"frame: {_scrub(str(exc), path.parent)}") from None
        except AlnusError as exc:
            raise ApiError(422, f"image: {_scrub(str(exc), path.parent)}") from None

    def _preview(self, path: Path, frame: int | None = None) -> dict[str, Any]:
        """The decoded image as the model sees it before cropping (grey, DICOM cut to its ultrasound region), scaled
        to at most `PREVIEW_SIDE` pixels, with its full size: the page draws the lesion box on it in those pixels."""
        image, index, frames = self._decode(path, frame)
        height, width = image.shape
        picture = Image.fromarray(image)
        if max(width, height) > PREVIEW_SIDE:
            scale = PREVIEW_SIDE / max(width, height)
            picture = picture.resize((max(1, round(width * scale)), max(1, round(height * scale))))
        return {
            "width": width, "height": height, "image": _data_uri(_png(picture)),
            "frame": _frame_info(index, frames, frame is not None),
        }  # fmt: skip

    def _prepare(self, job: _Job) -> _Ready:
        """Check the box, decode the image, check that the box lies inside it."""
        box = self._box(job.roi)
        image, index, frames = self._decode(job.path, job.frame)
        height, width = image.shape
        if box is not None and not box_inside(box, image.shape):
            cropped = us_region_note(job.path)  # a box read on a DICOM's whole frame: say where the crop lies
            raise ApiError(
                422,
                f"roi: the box {format_box(box)} (x,y,w,h) extends outside the {width} x {height} image; draw it "
                "inside the image, in pixels of the decoded image" + (f"; {cropped}." if cropped else "."),
            )
        return _Ready(job=job, image=image, box=box, frame=index, frames=frames)

    def _infer(self, ready: list[_Ready], heatmap: bool) -> list[tuple[dict[str, Any], Explanation | None]]:
        """The answers of decoded images, each with its heat map's explanation (to draw) when asked: one forward pass
        (Grad-CAM's, for heat maps) over all of them. An image over `HEATMAP_MAX_PIXELS` gets no heat map (its map at
        the image's size would take gigabytes), and its answer says so."""
        if heatmap and any(item.image.size > HEATMAP_MAX_PIXELS for item in ready):
            answers = []
            for item in ready:
                large = item.image.size > HEATMAP_MAX_PIXELS
                answer, explanation = self._infer([item], heatmap=not large)[0]
                if large:
                    answer["heatmap_note"] = (
                        f"No heat map: the image has {item.image.size:,} pixels, more than the {HEATMAP_MAX_PIXELS:,} "
                        "this service draws heat maps for; send it smaller, or use `alnus predict --heatmaps`."
                    )
                answers.append((answer, explanation))
            return answers
        rows = [item.row for item in ready]
        root = ready[0].job.path.parent  # the rows' image paths are absolute
        try:
            if heatmap:
                explanations = explain_images(
                    self.predictor, pd.DataFrame(rows), root, method=HEATMAP_METHOD, batch_size=len(rows),
                    max_pixels=self.settings.max_pixels,
                )  # fmt: skip
                probabilities = [e.prob for e in explanations]
                drawn: list[Explanation | None] = list(explanations)
            else:
                probs = self.predictor.predict_arrays([item.image for item in ready], rows=rows, root=root)
                probabilities, drawn = [float(p) for p in probs], [None] * len(ready)
        except ModelOutputError as exc:  # the model's fault, not the upload's; the server's paths stay in its log
            logger.error("%s", exc)
            raise ApiError(
                500,
                "the model's output is not a probability (a number from 0 to 1): its package is damaged; tell the "
                "service's operator (the server's log says more).",
            ) from exc
        except AlnusError as exc:
            raise ApiError(422, _scrub(str(exc), root)) from None
        calls = self._calls(probabilities)
        readers = self._reader_calls(probabilities, [item.job.birads for item in ready])
        # The box passed the checks of `_prepare`, so judging it cannot fail (and a request sends no mask to decode).
        boxes = [self.predictor.roi_warning(item.image.shape, item.row, root) for item in ready]
        seen = [self.predictor.seen_warning(item.image) for item in ready]
        warnings = ["; ".join(w for w in pair if w) for pair in zip(boxes, seen, strict=True)]
        answers = []
        for item, probability, call, reader, warning, explanation in zip(
            ready, probabilities, calls, readers, warnings, drawn, strict=True
        ):
            answer = self._answer(probability, call, item.box, item.image.shape, warning)
            answer["frame"] = _frame_info(item.frame, item.frames, item.job.frame is not None)
            answer["reader_with_ai"] = reader
            answers.append((answer, explanation))
        return answers

    def _calls(self, probabilities: list[float]) -> list[str | None]:
        """The call of each image at the frozen operating point, each image its own patient (None: no threshold)."""
        predictor, point = self.predictor, self.predictor.operating_point
        if point is None:
            return [None] * len(probabilities)
        negative = predictor.negative_label or f"not {predictor.positive_label}"
        called = apply_operating_point(pd.DataFrame({"prob": probabilities}), point)["call"]
        return [predictor.positive_label if c else negative for c in called.to_numpy()]

    def _reader_calls(self, probabilities: list[float], readings: list[str | None]) -> list[dict[str, Any] | None]:
        """The radiologist's call and the call with AI of each image sent with a BI-RADS reading, by the package's
        reader rule, each image its own patient (None: no reading sent)."""
        rule = self.predictor.metadata.get("reader_rule")
        if rule is None or not any(readings):
            return [None] * len(probabilities)
        called = apply_reader_rule(pd.DataFrame({"prob": probabilities}), [r or "" for r in readings], rule)
        sentence = describe_reader_rule(rule)
        out: list[dict[str, Any] | None] = []
        for reading, row in zip(readings, called.itertuples(index=False), strict=True):
            if not reading:
                out.append(None)
                continue
            note = _rule_applied_here(rule)
            if row.birads == "0":
                note = (
                    "BI-RADS 0 is an incomplete assessment (additional imaging needed): it makes no call, with or "
                    "without AI. " + note
                )
            # The same fields as `alnus predict`'s columns (a call is the radiologist's recommendation: positive,
            # biopsy; not a diagnosis).
            out.append(
                {
                    "birads": row.birads,
                    "reader_call": None if pd.isna(row.reader_call) else int(row.reader_call),
                    "with_ai_call": None if pd.isna(row.with_ai_call) else int(row.with_ai_call),
                    "ruled_out": None if pd.isna(row.ruled_out) else int(row.ruled_out),
                    "with_ai": row.with_ai,
                    "rule": sentence,
                    "value": rule["value"],
                    "note": note,
                }
            )
        return out

    def _box(self, roi: str | None) -> Box | None:
        roi = (roi or "").strip()
        needs = self.info["input"]["needs_roi"]
        if not roi:
            if needs:
                mode = self.info["input"]["roi_mode"]
                raise ApiError(
                    422,
                    f"roi: this model looks at the lesion only (ROI mode {mode!r}, as in its training): send the "
                    "lesion box as roi=x,y,w,h in pixels of the image (on the page, draw it on the image).",
                )
            return None
        try:
            return parse_box(roi)
        except RoiError as exc:
            raise ApiError(422, f"roi: {exc}") from None

    def _answer(
        self, probability: float, call: str | None, box: Box | None, shape: tuple[int, ...], warning: str = ""
    ) -> dict[str, Any]:
        """The JSON answer of one image; its `heatmap` (a PNG data URI) is drawn afterwards, off the worker.

        `warning` is the reason the lesion box is implausible (`Predictor.roi_warning`), or that the image is one the
        model learned from (`Predictor.seen_warning`); null when neither: the probability is given all the same.
        """
        predictor, point = self.predictor, self.predictor.operating_point
        info = self.info
        return {
            "probability": probability,
            "positive_label": predictor.positive_label,
            "call": call,
            "threshold": None if point is None else point["value"],
            "threshold_level": None if point is None else point["level"],
            "threshold_rule": None if point is None else info["threshold"]["rule"],
            "threshold_note": "The package has no frozen threshold yet (`alnus threshold PACKAGE --manifest CSV` "
            "freezes it on labelled validation patients; `alnus evaluate RUN` for a run's model), so there is no call."
            if point is None
            else info["threshold"]["applied_here"],
            "roi": None if box is None else {"box": list(box), "used": info["input"]["needs_roi"]},
            "warning": warning or None,
            "image_size": {"width": int(shape[1]), "height": int(shape[0])},
            "frame": None,
            "model": {k: info["model"][k] for k in ("name", "version", "weights_sha256")},
            "heatmap": None,
            "heatmap_note": None,
            "reader_with_ai": None,
            "notice": NOTICE,
        }

    def warm_up(self) -> None:
        """Predictions of a blank image through the whole path (with a heat map when they are on), so the first
        caller does not pay for the libraries' lazy start-up. A compiled network is run at batch sizes 1 and 2: the
        second shape makes torch.compile build its graph for any batch size, so no caller waits for a compilation."""
        size = self.predictor.spec.size
        folder = new_upload_folder(self.settings.work_dir)
        try:
            path = folder / "upload.png"
            Image.fromarray(np.zeros((size, size), dtype=np.uint8)).save(path)
            ready = self._prepare(_Job("predict", path, f"0,0,{size},{size}"))
            for batch in ([ready], [ready, ready]) if self.predictor.compiled else ([ready],):
                self._infer(batch, heatmap=False)
            if self.settings.heatmap:
                _overlay_uri(self._infer([ready], heatmap=True)[0][1])
        except ApiError as exc:  # a package that fails on a blank image is not served
            reason = str(exc.__cause__) if isinstance(exc.__cause__, ModelOutputError) else exc.detail
            raise ServeError(f"{self.predictor.package_dir} cannot be served: on a blank image, {reason}") from None
        finally:
            remove_upload_folder(folder)


def _frame_info(index: int, frames: int | None, sent: bool) -> dict[str, Any] | None:
    """Which frame of a multi-frame image was used (0-based), of how many, and whether the request chose it (else a
    DICOM's middle frame); None for a single-frame image, and for a PNG, JPEG, BMP or TIFF sent without a frame (its
    first frame is read, and a TIFF's pages are not counted: `frame_choice`)."""
    return None if frames in (None, 1) else {"index": index, "count": frames, "sent": sent}


def _file_signature(path: Path) -> tuple[int, int, int] | None:
    """(inode, size, modification time) of a file, None when it cannot be read: an atomic rewrite changes it."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _unexpected(exc: BaseException | None = None) -> ApiError:
    """The 500 answer of an unexpected failure: its type only (its message could quote an upload's contents)."""
    kind = f" ({type(exc).__name__})" if exc is not None else ""
    return ApiError(500, f"the prediction failed unexpectedly{kind}; the service's log has the details.")


def log_failure(exc: BaseException, what: str) -> None:
    """Log an unexpected failure by type and code location only: its message could quote an upload's contents."""
    frames = "".join(traceback.format_tb(exc.__traceback__))
    logger.error("%s failed: %s\n%s", what, type(exc).__name__, frames)


def _overlay_uri(explanation: Explanation | None) -> str | None:
    """The heat map over the original image (with the lesion box and the crop drawn) as a PNG data URI."""
    return None if explanation is None else _data_uri(_png(explanation.overlay(width=OVERLAY_WIDTH)))


def _png(picture: Image.Image) -> bytes:
    """PNG bytes, quickly compressed: a picture sent once to a browser on the local network, not archived, so the
    smallest file (Pillow's `optimize`, a slow search) is not worth its encoding time on every request."""
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
