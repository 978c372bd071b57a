"""Heat maps of where a network looked (pytorch-grad-cam), drawn on the original image, and how faithful they are.

The heads here return one logit, the positive class's (`UltrasoundNet.forward` -> `(B,)`), so the explained target is
that logit (`PositiveLogit`), never the library's argmax or binary targets. Each backbone's CAM layer comes from the
registry (`UltrasoundNet.cam_target_layer`). The network sees the ROI crop letterboxed to its input size
(`alnus.data.dataset.preprocess`); `heatmap_to_image` undoes the letterbox and the crop, so a heat map lies on the
original image and the part outside the crop gets no heat. Methods: Grad-CAM (Selvaraju et al. 2017), Grad-CAM++
(Chattopadhyay et al. 2018), and the gradient-free Eigen-CAM (Muhammad & Yeasin 2020) and Score-CAM (Wang et al. 2020).
Faithfulness: `energy_share` (heat inside the lesion) against `gaussian_map` / `random_map` baselines, and
`deletion_score` (confidence drop when the hottest pixels are blurred away, against as many random pixels).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage
from torch import nn

from alnus._io import atomic_write_bytes, write_csv
from alnus._levels import unit_keys
from alnus.data.dataset import PreprocessSpec, _to_tensor, letterbox_box, preprocess
from alnus.data.images import load_image, parse_frame
from alnus.data.masks import load_mask
from alnus.data.roi import Box, box_from_mask, box_inside, mask_path, parse_box, roi_box
from alnus.errors import AlnusError
from alnus.evaluate import prediction_table_problem
from alnus.models.registry import UltrasoundNet, get_submodule
from alnus.operating_point import apply_operating_point
from alnus.predict import Predictor
from alnus.runfolder import EVALUATION_SPLITS, RunFolder, read_splits, run_models

METHODS = ("gradcam", "gradcam++", "eigencam", "scorecam")
# Methods that back-propagate the target (the gradient-free ones only run forward passes).
GRADIENT_METHODS = frozenset({"gradcam", "gradcam++"})
OUTCOMES = ("TP", "FP", "FN", "TN")
INDEX_COLUMNS = ("image", "patient_id", "label", "y", "prob", "call", "outcome", "method", "png", "energy_in_roi",
                 "gaussian_in_roi", "random_in_roi", "heat_on_image", "note")  # fmt: skip
# Overlays wider than this are scaled down: they are looked at in a report, not measured.
OVERLAY_WIDTH = 512
_HEAT_ALPHA = 0.5
_CROP_COLOUR = (0, 200, 255)
_LESION_COLOUR = (60, 255, 60)


class ExplainError(AlnusError):
    """A method, layer, run folder or image that cannot be explained; the message says what to do."""


class PositiveLogit:
    """The explained target: the positive-class logit of a one-logit head (one sample's output, a scalar)."""

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        if output.numel() != 1:
            raise ExplainError(
                f"heat maps explain a one-logit head (the positive class); this output has shape {tuple(output.shape)}."
            )
        return output.reshape(())


def _cam_class(method: str) -> type:
    """The pytorch-grad-cam class of a method name (imported here: it is a heavy optional import)."""
    if method not in METHODS:
        raise ExplainError(f"unknown heat-map method {method!r}; choose one of: {', '.join(METHODS)}.")
    try:
        import pytorch_grad_cam as cams
    except ImportError as exc:
        raise ExplainError(f"heat maps need pytorch-grad-cam: pip install grad-cam ({exc}).") from exc
    return {
        "gradcam": cams.GradCAM,
        "gradcam++": cams.GradCAMPlusPlus,
        "eigencam": cams.EigenCAM,
        "scorecam": cams.ScoreCAM,
    }[method]


def _layer_names(module: nn.Module, limit: int = 8) -> str:
    names = [name for name, _ in module.named_children()]
    shown = names[-limit:]
    return ", ".join(shown) + (f" (and {len(names) - len(shown)} earlier)" if len(names) > len(shown) else "")


def target_layer(model: UltrasoundNet, layer: str | None = None) -> nn.Module:
    """The module whose feature map is explained: `layer` (a dotted path in the backbone), else the registry's."""
    name = model.spec.cam_layer if layer is None else layer
    try:
        return model.cam_target_layer() if layer is None else get_submodule(model.backbone, layer)
    except (AttributeError, IndexError, TypeError, ValueError):
        where = "the registry's cam_layer" if layer is None else "layer"
        raise ExplainError(
            f"{where} {name!r} is not a module of backbone {model.spec.name!r}; valid names include "
            f"{_layer_names(model.backbone)} (nested ones as dotted paths, e.g. {model.spec.cam_layer!r})."
        ) from None


_QUIET_LOCK = threading.Lock()
_QUIET_USERS = 0
_QUIET_ORIGINAL: Any = None


@contextlib.contextmanager
def _quiet_score_cam() -> Iterator[None]:
    """Score-CAM draws a tqdm bar per image on stderr; hide it during a call (it would flood a command's output).

    The library reads `tqdm` from its module, so the name is swapped there; a count under a lock keeps concurrent
    calls (the service's worker threads) from restoring it early or leaving it swapped for good.
    """
    global _QUIET_USERS, _QUIET_ORIGINAL
    from types import SimpleNamespace

    from pytorch_grad_cam import score_cam

    with _QUIET_LOCK:
        if _QUIET_USERS == 0:
            _QUIET_ORIGINAL = score_cam.tqdm
            score_cam.tqdm = SimpleNamespace(tqdm=lambda iterable, **_: iterable)
        _QUIET_USERS += 1
    try:
        yield
    finally:
        with _QUIET_LOCK:
            _QUIET_USERS -= 1
            if _QUIET_USERS == 0:
                score_cam.tqdm = _QUIET_ORIGINAL


def heatmaps(
    model: UltrasoundNet,
    batch: torch.Tensor,
    *,
    method: str = "gradcam",
    layer: str | None = None,
    batch_size: int = 16,
) -> np.ndarray:
    """Heat maps `(B, H, W)` in [0, 1] at the input size for a `(B, 1, H, W)` batch in [0, 1], one per image.

    Each map is scaled to a maximum of 1 (an image without positive evidence gets zeros). The library's hooks are
    released when the call returns (its CAM objects are used as context managers), the model's train/eval mode is
    restored and its parameter gradients are cleared.

    Args:
        layer: a dotted module path in the backbone; None takes the registry's CAM layer.
        batch_size: images per forward pass (Score-CAM: masked copies per pass, one image at a time).
    """
    cam_class = _cam_class(method)
    if batch.ndim != 4 or batch.shape[1] != 1:
        raise ExplainError(f"heat maps need a (B, 1, H, W) grey-scale batch, got {tuple(batch.shape)}.")
    module = target_layer(model, layer)
    layer_name = model.spec.cam_layer if layer is None else layer
    device = _device(model)
    was_training = model.training
    out: list[np.ndarray] = []
    quiet = _quiet_score_cam() if method == "scorecam" else contextlib.nullcontext()
    try:
        # Heat maps are asked for inside inference code too (the service); gradients are needed here.
        with torch.inference_mode(False), torch.enable_grad(), quiet, cam_class(model, [module]) as cam:
            cam.batch_size = batch_size
            # Score-CAM holds every channel's masked copy of its images at once (channels x images x H x W): one
            # image per call keeps that to one image's worth; its masked inputs still go `batch_size` per pass.
            step = 1 if method == "scorecam" else batch_size
            for start in range(0, batch.shape[0], step):
                chunk = batch[start : start + step].detach().clone().float().to(device)
                # A gradient path even when the parameters are frozen: the input takes part in the graph.
                chunk.requires_grad_(method in GRADIENT_METHODS)
                try:
                    maps = cam(input_tensor=chunk, targets=[PositiveLogit()] * chunk.shape[0])
                except (IndexError, ValueError) as exc:
                    # Raised as ExplainError inside the block: the library's __exit__ swallows an IndexError.
                    raise ExplainError(
                        f"heat maps from layer {layer_name!r} of backbone {model.spec.name!r} failed ({exc}); the "
                        "layer must give a (B, C, h, w) feature map: use the registry's cam_layer or a conv block."
                    ) from exc
                out.append(np.asarray(maps, dtype=np.float32).reshape(chunk.shape[0], *chunk.shape[2:]))
    finally:
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    if not out:
        return np.zeros((0, *batch.shape[2:]), dtype=np.float32)
    return np.clip(np.nan_to_num(np.concatenate(out)), 0.0, 1.0)


def heatmap_to_image(
    heat: np.ndarray, crop_box: Box, input_box: tuple[int, int, int, int], shape: tuple[int, int]
) -> np.ndarray:
    """Undo the letterbox and the crop: a heat map `(size, size)` at the input -> `shape` (H, W) of the original.

    Args:
        crop_box: the ROI crop in the original image, (x, y, w, h).
        input_box: where the crop sits in the network's input, (top, left, height, width)
            (`alnus.data.dataset.letterbox_box`).
    Returns:
        float32 (H, W) in [0, 1]; zero outside the crop (and what fell on the letterbox padding is dropped).
    """
    top, left, height, width = input_box
    x, y, w, h = crop_box
    inside = np.ascontiguousarray(heat[top : top + height, left : left + width], dtype=np.float32)
    resized = np.asarray(Image.fromarray(inside).resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32)
    out = np.zeros(shape, dtype=np.float32)
    out[y : y + h, x : x + w] = np.clip(resized, 0.0, 1.0)
    return out


# eq=False: the fields are arrays, so instances compare by identity.
@dataclass(frozen=True, eq=False)
class Explanation:
    """One explained image: the original grey image, its heat map in the same coordinates, and what is known of it.

    `crop_box` and `lesion_box` are (x, y, w, h) in pixels of the original image; `lesion_mask` is a bool (H, W) array
    when the row has a mask. `prob` is the model's probability of the positive class for this image. What the network
    saw is kept too: `input_image` (uint8 (size, size)), `input_heatmap` (the map at that size) and `input_box`, where
    the crop sits in it (top, left, height, width); the rest is letterbox padding. `note` says how the map was made
    when that is not one network's map of the image (an ensemble, TTA; empty otherwise).
    """

    name: str
    image: np.ndarray
    heatmap: np.ndarray
    crop_box: Box
    lesion_box: Box | None
    lesion_mask: np.ndarray | None
    prob: float
    method: str
    input_image: np.ndarray
    input_heatmap: np.ndarray
    input_box: tuple[int, int, int, int]
    note: str = ""

    @property
    def lesion_region(self) -> np.ndarray | None:
        """Where the lesion is, as a bool (H, W) array: the mask when known, else the lesion box; None without."""
        if self.lesion_mask is not None:
            return self.lesion_mask
        if self.lesion_box is None:
            return None
        region = np.zeros(self.image.shape, dtype=bool)
        x, y, w, h = self.lesion_box
        region[y : y + h, x : x + w] = True
        return region

    @property
    def energy_in_roi(self) -> float | None:
        """Share of the heat inside the lesion (mask, else box); None without a lesion or without heat."""
        region = self.lesion_region
        return None if region is None else energy_share(self.heatmap, region)

    @property
    def heat_on_image(self) -> float | None:
        """Share of the network's map (at its input size) on the image crop rather than the letterbox padding; None
        when the map holds no heat. 0 means every bit of evidence fell on the padding: nothing on the image."""
        top, left, height, width = self.input_box
        region = np.zeros(np.shape(self.input_heatmap), dtype=bool)
        region[top : top + height, left : left + width] = True
        return energy_share(self.input_heatmap, region)

    def overlay(self, *, width: int | None = None) -> Image.Image:
        """RGB: the grey image, the heat map in colour (transparent where there is none), crop box and lesion; scaled
        down to `width` pixels first when wider, so a large image costs the overlay's size, not its own (an attack
        review saw 6.7 GB for a 9000 x 9000 upload)."""
        from matplotlib import colormaps

        image, heat, mask, scale = self.image, self.heatmap, self.lesion_mask, 1.0
        if width is not None and image.shape[1] > width:
            scale = width / image.shape[1]
            size = (width, max(1, round(image.shape[0] * scale)))
            image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX))
            heat = np.asarray(Image.fromarray(heat.astype(np.float32, copy=False)).resize(size, Image.Resampling.BOX))
            if mask is not None:  # a pixel of the outline where most of its area was inside
                area = Image.fromarray(np.ascontiguousarray(mask).view(np.uint8)).resize(size, Image.Resampling.BOX)
                mask = np.asarray(area) >= 1
        heat = np.clip(heat, 0.0, 1.0)
        grey = np.repeat(image[..., None].astype(np.float32) / 255.0, 3, axis=2)
        colour = colormaps["jet"](heat)[..., :3].astype(np.float32)
        alpha = (_HEAT_ALPHA * heat)[..., None]
        rgb = np.clip(grey * (1 - alpha) + colour * alpha, 0.0, 1.0)
        if mask is not None:
            edge = mask & ~ndimage.binary_erosion(mask, iterations=_line_width(image))
            rgb[edge] = np.asarray(_LESION_COLOUR, dtype=np.float32) / 255.0
        picture = Image.fromarray(np.round(rgb * 255).astype(np.uint8))
        draw = ImageDraw.Draw(picture)
        # The crop box shows what the network saw (not drawn when it saw the whole image); the lesion box only
        # when there is no mask, whose outline is drawn above.
        whole = self.crop_box == (0, 0, self.image.shape[1], self.image.shape[0])
        shapes = [] if whole else [(self.crop_box, _CROP_COLOUR)]
        if self.lesion_mask is None and self.lesion_box is not None:
            shapes.append((self.lesion_box, _LESION_COLOUR))
        for (x, y, w, h), outline in shapes:
            left, top = round(x * scale), round(y * scale)
            corners = (left, top, max(left, round((x + w) * scale) - 1), max(top, round((y + h) * scale) - 1))
            draw.rectangle(corners, outline=outline, width=_line_width(image))
        return picture

    def overlay_png(self, *, width: int | None = None, caption: str = "") -> bytes:
        """The overlay as PNG bytes (scaled down to `width` pixels when wider); with `caption`, a strip below it says
        what its colours are, then the caption (a file read on its own, away from the page or report that explains
        them)."""
        picture = self.overlay(width=width)
        if caption:
            whole = self.crop_box == (0, 0, self.image.shape[1], self.image.shape[0])
            outline = "lesion outline" if self.lesion_mask is not None else "lesion box"
            crop = [] if whole else [("what the network saw", _CROP_COLOUR, True)]
            parts = [(outline, _LESION_COLOUR, True), *crop,
                     ("heat map: blue (little weight, see-through) to red (most)", (230, 230, 230), False),
                     (caption, (255, 255, 255), False)]  # fmt: skip
            picture = _with_legend(picture, parts)
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG", optimize=True)
        return buffer.getvalue()


def _with_legend(picture: Image.Image, parts: list[tuple[str, tuple[int, int, int], bool]]) -> Image.Image:
    """`picture` above a dark strip holding `parts` (text, colour, whether a square of the colour goes first), each
    kept whole where a line holds it, else broken between words, folded onto as many lines as the picture's width
    needs."""
    font = ImageFont.load_default(size=max(11, min(18, picture.width // 40)))
    gap, pad = font.size, font.size // 2
    measure = ImageDraw.Draw(picture)
    pieces = []
    for text, colour, swatch in parts:
        room = picture.width - 2 * pad - (font.size if swatch else 0)
        for i, piece in enumerate(_fold(text, room, lambda t: measure.textlength(t, font=font))):
            pieces.append((piece, colour, swatch and i == 0))
    lines: list[list[tuple[str, tuple[int, int, int], bool]]] = [[]]
    used = pad
    for text, colour, swatch in pieces:
        length = measure.textlength(text, font=font) + (font.size if swatch else 0)
        if lines[-1] and used + length > picture.width - pad:
            lines.append([])
            used = pad
        lines[-1].append((text, colour, swatch))
        used += length + gap
    height = pad * 2 + len(lines) * (font.size + pad)
    framed = Image.new("RGB", (picture.width, picture.height + height), (24, 24, 24))
    framed.paste(picture, (0, 0))
    draw = ImageDraw.Draw(framed)
    y = picture.height + pad
    for line in lines:
        x = pad
        for text, colour, swatch in line:
            if swatch:
                side = font.size * 2 // 3
                top = y + (font.size - side) // 2 + 1
                draw.rectangle((x, top, x + side, top + side), outline=colour, width=2)
                x += font.size
            draw.text((x, y), text, fill=colour, font=font)
            x += draw.textlength(text, font=font) + gap
        y += font.size + pad
    return framed


def _fold(text: str, room: float, length: Callable[[str], float]) -> list[str]:
    """`text` as one piece when `length` of it fits `room`, else as pieces broken between words that each fit (a
    word longer than `room` stays whole): a narrow image's legend was cut at its right edge."""
    pieces: list[str] = []
    for word in text.split(" "):
        joined = f"{pieces[-1]} {word}" if pieces else word
        if pieces and length(joined) <= room:
            pieces[-1] = joined
        else:
            pieces.append(word)
    return pieces


def _line_width(image: np.ndarray) -> int:
    return max(1, round(max(image.shape) / 250))


def energy_share(heatmap: np.ndarray, region: np.ndarray) -> float | None:
    """Share of a heat map's total inside `region` (bool, same shape); None when the map holds no heat."""
    heat = np.asarray(heatmap, dtype=np.float64)
    if heat.shape != region.shape:
        raise ExplainError(f"heat map {heat.shape} and region {region.shape} differ in shape.")
    total = heat.sum()
    return None if total <= 0 else float(heat[region].sum() / total)


def gaussian_map(shape: tuple[int, int], *, sigma: float = 0.25) -> np.ndarray:
    """A centred Gaussian (sd `sigma` x the image's height and width), peak 1: the 'looks at the middle' baseline."""
    height, width = shape
    y = (np.arange(height, dtype=np.float32) - (height - 1) / 2) / (sigma * height)
    x = (np.arange(width, dtype=np.float32) - (width - 1) / 2) / (sigma * width)
    return np.exp(-0.5 * (y[:, None] ** 2 + x[None, :] ** 2)).astype(np.float32)


def random_map(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Uniform noise in [0, 1]: the 'looks anywhere' baseline (its energy share is the region's area share)."""
    return rng.random(shape, dtype=np.float32)


def crop_baselines(explanation: Explanation, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The baselines of one explanation, over the network's crop (zero outside it, like the heat map).

    `gaussian` looks at the middle of what the network saw, `random` anywhere in it; both in the original image's
    coordinates, the same size as `explanation.heatmap`. With a whole-image crop they are `gaussian_map` and
    `random_map` of the image.
    """
    x, y, w, h = explanation.crop_box
    out = {}
    for name, inner in (("gaussian", gaussian_map((h, w))), ("random", random_map((h, w), rng))):
        full = np.zeros(explanation.image.shape, dtype=np.float32)
        full[y : y + h, x : x + w] = inner
        out[name] = full
    return out


@dataclass(frozen=True, eq=False)
class DeletionScore:
    """Confidence drops per image: the hottest `fraction` of pixels blurred away vs as many random pixels."""

    fraction: float
    top_drop: np.ndarray
    random_drop: np.ndarray

    @property
    def score(self) -> float:
        """Mean extra drop of the heat map's pixels over random ones: above 0, the map found pixels that matter."""
        return float(np.mean(self.top_drop - self.random_drop)) if self.top_drop.size else float("nan")


def _device(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _probs(model: nn.Module, batch: torch.Tensor, batch_size: int) -> np.ndarray:
    device = _device(model)
    with torch.inference_mode():
        return np.concatenate(
            [
                torch.sigmoid(model(batch[i : i + batch_size].to(device)).float()).cpu().numpy()
                for i in range(0, batch.shape[0], batch_size)
            ]
        )


def deletion_score(
    model: UltrasoundNet,
    batch: torch.Tensor,
    maps: np.ndarray,
    *,
    fraction: float = 0.1,
    valid: np.ndarray | None = None,
    repeats: int = 3,
    seed: int = 0,
    batch_size: int = 16,
) -> DeletionScore:
    """How much the positive-class probability drops when the hottest pixels are deleted, against random pixels.

    A deletion test in the spirit of Petsiuk et al. 2018 (RISE) and Samek et al. 2017: the top `fraction` of each
    image's pixels by heat (ties broken at random) are replaced by a strongly blurred copy of the image (which keeps
    the brightness but removes texture and edges, so no new edges are drawn), and so are as many random pixels
    (`repeats` draws, averaged). Only `valid` pixels (bool (B, H, W), e.g. not the letterbox padding) are counted.
    """
    if not 0.0 < fraction < 1.0:
        raise ExplainError(f"fraction must be in (0, 1), got {fraction}.")
    images = batch.detach().float().cpu().numpy()[:, 0]
    if maps.shape != images.shape:
        raise ExplainError(f"heat maps {maps.shape} do not match the batch {images.shape}.")
    valid = np.ones(images.shape, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    rng = np.random.default_rng(seed)
    sigma = max(images.shape[1:]) / 16
    blurred = np.stack([ndimage.gaussian_filter(im, sigma) for im in images])
    base = _probs(model, batch, batch_size)
    top = np.empty_like(images)
    randoms = [np.empty_like(images) for _ in range(repeats)]
    for i, (image, heat, ok) in enumerate(zip(images, maps, valid, strict=True)):
        pixels = np.flatnonzero(ok)
        k = max(1, round(fraction * pixels.size))
        # Random order first, then a stable sort by heat: equal heat values are taken in random order.
        shuffled = rng.permutation(pixels)
        hottest = shuffled[np.argsort(-heat.ravel()[shuffled], kind="stable")[:k]]
        top[i] = _delete(image, blurred[i], hottest)
        for r in range(repeats):
            randoms[r][i] = _delete(image, blurred[i], rng.choice(pixels, size=k, replace=False))
    top_drop = base - _probs(model, torch.from_numpy(top)[:, None], batch_size)
    random_drop = np.mean([base - _probs(model, torch.from_numpy(r)[:, None], batch_size) for r in randoms], axis=0)
    return DeletionScore(fraction=fraction, top_drop=top_drop, random_drop=random_drop)


def _delete(image: np.ndarray, blurred: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    out = image.copy().ravel()
    out[pixels] = blurred.ravel()[pixels]
    return out.reshape(image.shape)


def deletion_of(
    model: UltrasoundNet, explanations: Sequence[Explanation], *, fraction: float = 0.1, seed: int = 0
) -> DeletionScore:
    """`deletion_score` of explanations (one method, one model), on the inputs the network saw, padding left alone."""
    if not explanations:
        empty = np.empty(0, dtype=np.float32)
        return DeletionScore(fraction=fraction, top_drop=empty, random_drop=empty)
    batch = torch.stack([_to_tensor(e.input_image) for e in explanations])
    maps = np.stack([e.input_heatmap for e in explanations])
    valid = np.zeros(maps.shape, dtype=bool)
    for v, e in zip(valid, explanations, strict=True):
        top, left, height, width = e.input_box
        v[top : top + height, left : left + width] = True
    return deletion_score(model, batch, maps, fraction=fraction, valid=valid, seed=seed)


# ------------------------------------------------------------------------------------------- images of a table
def _as_predictor(source: str | os.PathLike[str] | Predictor, device: str, batch_size: int) -> Predictor:
    if isinstance(source, Predictor):
        return source
    # Heat maps need the PyTorch network (gradients), and its probabilities pick the cases: the same engine for both.
    return Predictor(source, device=device, batch_size=batch_size, precision="fp32", engine="torch")


def _lesion(
    row: Mapping[str, str], root: Path, shape: tuple[int, int], max_pixels: int | None, where: str
) -> tuple[Box | None, np.ndarray | None]:
    """(lesion box, lesion mask) of a row: the `roi` box (else the mask's bounding box), the mask when it has one."""
    mask = None
    rel = mask_path(row)
    if rel is not None:
        mask = load_mask(root / rel, max_pixels=max_pixels)
        if mask.shape != shape:
            raise ExplainError(f"{where}: mask {rel} is {mask.shape[::-1]} (W, H) but the image is {shape[::-1]}.")
    box = None
    text = str(row.get("roi", "") or "").strip()
    if text:
        box = parse_box(text)
        if not box_inside(box, shape):
            raise ExplainError(f"{where}: roi {text} extends outside the {shape[1]}x{shape[0]} image.")
    elif mask is not None:
        box = box_from_mask(mask)
    return box, mask


def _decode(row: Mapping[str, str], root: Path, max_pixels: int | None) -> np.ndarray:
    return load_image(root / row["image"], frame=parse_frame(row.get("frame", "")), max_pixels=max_pixels)


def _network_input(
    image: np.ndarray, row: Mapping[str, str], root: Path, spec: PreprocessSpec, max_pixels: int | None
) -> tuple[np.ndarray, Box, tuple[int, int, int, int]]:
    """The network's uint8 input of a decoded image, the crop box in the image and where the crop sits in the input."""
    height, width = image.shape
    crop_box = roi_box(row, root, image.shape, spec.roi, max_pixels=max_pixels) or (0, 0, width, height)
    x = preprocess(image, row, root, spec, max_pixels=max_pixels)
    input_box = letterbox_box((crop_box[3], crop_box[2]), spec.size, keep_aspect=spec.keep_aspect)
    return x, crop_box, input_box


def _union(boxes: Sequence[Box]) -> Box:
    """The smallest box (x, y, w, h) holding every box."""
    left, top = min(b[0] for b in boxes), min(b[1] for b in boxes)
    right, bottom = max(b[0] + b[2] for b in boxes), max(b[1] + b[3] for b in boxes)
    return (left, top, right - left, bottom - top)


def explain_images(
    source: str | os.PathLike[str] | Predictor,
    rows: pd.DataFrame,
    root: str | os.PathLike[str],
    *,
    method: str = "gradcam",
    device: str = "auto",
    batch_size: int = 16,
    max_pixels: int | None = None,
    layer: str | None = None,
) -> list[Explanation]:
    """Heat maps of manifest-like rows (`image`, and `roi`/`mask`/`frame` where known), on their original images.

    Each network of the package is explained on its own input (an ensemble's members with their own preprocessing);
    members that share one preprocessing have their maps averaged at the input, others on the original image (the
    crop box is then the smallest box holding every member's crop, and `input_*` are member 1's). The maps are of the
    unaugmented image (TTA views are not explained); `prob` is the package's probability, TTA included, and `note`
    says how the map was made (`Predictor.heatmap_note`).

    Args:
        source: a model package folder, or a loaded `alnus.predict.Predictor` (its preprocessing is used).
        root: the folder relative image and mask paths are resolved against.
        max_pixels: decoding limit per image (None: the predictor's, else the default).
    """
    _cam_class(method)  # an unknown method fails before any image is decoded
    predictor = _as_predictor(source, device, batch_size)
    limit = predictor.max_pixels if max_pixels is None else max_pixels
    root = Path(root)
    networks = predictor.networks
    specs = list(dict.fromkeys(network.spec for network in networks))
    note = predictor.heatmap_note or ""
    records = [{str(k): "" if pd.isna(v) else str(v) for k, v in r.items()} for r in rows.to_dict("records")]
    explanations: list[Explanation] = []
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        images, lesions, inputs = [], [], []
        for offset, row in enumerate(chunk):
            where = f"row {start + offset + 1} (image {row.get('image', '?')!r})"
            try:
                images.append(_decode(row, root, limit))
                lesions.append(_lesion(row, root, images[-1].shape, limit, where))
                inputs.append({spec: _network_input(images[-1], row, root, spec, limit) for spec in specs})
            except (AlnusError, ValueError) as exc:
                raise ExplainError(f"{where}: {exc}") from exc
        batches = {spec: torch.stack([_to_tensor(item[spec][0]) for item in inputs]) for spec in specs}
        maps = [
            heatmaps(network.model, batches[network.spec], method=method, layer=layer, batch_size=batch_size)
            for network in networks
        ]
        probs = predictor.predict_members([batches[network.spec] for network in networks])
        for k, (row, image, (box, mask), prob) in enumerate(zip(chunk, images, lesions, probs, strict=True)):
            first = inputs[k][networks[0].spec]
            if len(specs) == 1:
                input_heat = np.mean([m[k] for m in maps], axis=0)
                heat, crop_box = heatmap_to_image(input_heat, first[1], first[2], image.shape), first[1]
            else:
                on_image = [
                    heatmap_to_image(m[k], inputs[k][n.spec][1], inputs[k][n.spec][2], image.shape)
                    for n, m in zip(networks, maps, strict=True)
                ]
                heat, input_heat = np.mean(on_image, axis=0), maps[0][k]
                crop_box = _union([inputs[k][spec][1] for spec in specs])
            explanations.append(
                Explanation(
                    name=row["image"],
                    image=image,
                    heatmap=heat.astype(np.float32),
                    crop_box=crop_box,
                    lesion_box=box,
                    lesion_mask=mask,
                    prob=float(prob),
                    method=method,
                    input_image=first[0],
                    input_heatmap=np.asarray(input_heat, dtype=np.float32),
                    input_box=first[2],
                    note=note,
                )
            )
    return explanations


# ------------------------------------------------------------------------------------------------- run folder
def select_cases(predictions: pd.DataFrame, n: int) -> pd.DataFrame:
    """Up to `n` rows, a few of each outcome (TP, FP, FN, TN) in turn, the most confident of each first.

    `predictions` needs `y` (0/1), `prob` and `call` (0/1). Confidence: the highest probability for a positive call,
    the lowest for a negative one. Returns the chosen rows with `outcome`, ordered by outcome, then confidence.
    """
    table = predictions.reset_index(drop=True).copy()
    y, call = table["y"].astype(int).to_numpy(), table["call"].astype(int).to_numpy()
    table["outcome"] = _outcomes(y, call)
    table["_confidence"] = np.where(call == 1, table["prob"], -table["prob"])
    table["_order"] = table["outcome"].map(OUTCOMES.index)
    table = table.sort_values(["_order", "_confidence", "image"], ascending=[True, False, True], kind="stable")
    # Another patient before a patient's second image: a few cases of each outcome, not one patient's images.
    table["_repeat"] = table.groupby([table["outcome"], unit_keys(table, "patient")]).cumcount()
    table = table.sort_values(["_order", "_repeat"], kind="stable")
    table["_rank"] = table.groupby("outcome").cumcount()
    chosen = table.sort_values(["_rank", "_order"], kind="stable").head(max(0, int(n)))
    dropped = ["_confidence", "_order", "_repeat", "_rank"]
    return chosen.sort_values(["_order", "_rank"], kind="stable").drop(columns=dropped)


def _run_max_pixels(run_dir: Path) -> int | None:
    """The run's decoding limit (`data.max_image_pixels` of its config.yaml), so images decode as in the study."""
    import yaml

    from alnus.config import ConfigError, config_from_dict, safe_yaml

    path = RunFolder(run_dir).config
    if not path.is_file():
        raise ExplainError(f"{run_dir} is not a run folder (no config.yaml); pass runs/<name>.")
    try:
        cfg = config_from_dict(safe_yaml(path.read_text(encoding="utf-8")) or {}, where=str(path))
    except (yaml.YAMLError, ConfigError) as exc:
        raise ExplainError(f"{path} cannot be read as a configuration: {exc}") from exc
    return cfg.data.max_image_pixels


def _predictions(run_dir: Path, model: str, split: str, predictor: Predictor) -> pd.DataFrame:
    """The model's predictions of `split`, checked to come from the package's current weights."""
    import json

    where = RunFolder(run_dir).model(model)
    again = f"run `alnus predict-run {run_dir}` first"
    try:
        stamp = json.loads(where.predictions_stamp.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ExplainError(f"{where.predictions_stamp} is missing or damaged ({exc}); {again}.") from None
    if not isinstance(stamp, dict) or stamp.get("weights_sha256") != predictor.metadata["weights_sha256"]:
        raise ExplainError(f"{where.predictions} holds predictions of other weights than {where.package}; {again}.")
    if stamp.get("tta", []) != predictor.tta:
        raise ExplainError(f"{where.predictions} holds predictions of other TTA views than {where.package}; {again}.")
    path = where.predictions_csv(split)
    if not path.is_file():
        raise ExplainError(f"{path} not found: model {model} has no {split} predictions (the split may be empty).")
    digests = stamp.get("sha256")
    problem = prediction_table_problem(digests if isinstance(digests, dict) else None, split, path)
    if problem:
        raise ExplainError(f"{problem}; {again}.")
    return pd.read_csv(path, dtype={"image": str, "patient_id": str, "study_id": str, "site": str, "label": str},
                       keep_default_na=False)  # fmt: skip


def _png_name(i: int, outcome: str, image: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(image).stem).strip("._")[:60] or "image"
    return f"{i:03d}_{outcome}_{stem}.png"


def case_table(run_dir: str | os.PathLike[str], model: str, split: str, predictor: Predictor) -> pd.DataFrame:
    """Every image of `split` with the model's prediction, the frozen threshold's call and outcome, and its cells.

    Columns: the prediction table's (image, patient_id, study_id, site, label, y, prob), then `call` (0/1, made the way
    the threshold was frozen: `alnus.operating_point`), `outcome` (TP/FP/FN/TN) and the split's other cells (`roi`,
    `mask`, `frame`, ...), so the rows can be given to `explain_images` with the run folder as root.
    """
    run_dir = Path(run_dir)
    run = RunFolder(run_dir)
    if predictor.operating_point is None:
        raise ExplainError(
            f"model {model} has no frozen threshold, so its images have no calls (TP/FP/FN/TN); "
            f"run `alnus evaluate {run_dir}` first."
        )
    predictions = _predictions(run_dir, model, split, predictor)
    calls = apply_operating_point(predictions, predictor.operating_point)
    y, call = predictions["y"].astype(int).to_numpy(), calls["call"].to_numpy().astype(int)
    table = predictions.assign(call=call, outcome=_outcomes(y, call))
    cells = read_splits(run_dir).drop_duplicates("image")
    missing = sorted(set(table["image"]) - set(cells["image"]))
    if missing:
        raise ExplainError(f"{run.splits} lacks image(s) {', '.join(missing[:3])} of the predictions; {run_dir} "
                           "was split again after predicting: run `alnus predict-run` again.")  # fmt: skip
    extra = ["image", *(c for c in cells.columns if c not in table.columns)]
    return table.merge(cells[extra], on="image", how="left", validate="many_to_one")


def _outcomes(y: np.ndarray, call: np.ndarray) -> np.ndarray:
    return np.select([(y == 1) & (call == 1), (y == 0) & (call == 1), (y == 1) & (call == 0)], OUTCOMES[:3], "TN")


def run_max_pixels(run_dir: str | os.PathLike[str]) -> int | None:
    """The run's decoding limit (`data.max_image_pixels` of its config.yaml), so images decode as in the study."""
    return _run_max_pixels(Path(run_dir))


def _explain_model(run_dir: Path, model: str, split: str, n: int, method: str, device: str, batch_size: int) -> Path:
    run = RunFolder(run_dir)
    predictor = Predictor(
        run.model(model).package, device=device, batch_size=batch_size, precision="fp32",
        max_pixels=_run_max_pixels(run_dir), engine="torch",
    )  # fmt: skip
    chosen = select_cases(case_table(run_dir, model, split, predictor), n)
    explanations = explain_images(predictor, chosen, run_dir, method=method, batch_size=batch_size)
    index = chosen[["image", "patient_id", "label", "y", "prob", "call", "outcome"]].reset_index(drop=True)
    index["method"] = method
    index["png"] = [_png_name(i, o, im) for i, (o, im) in enumerate(zip(index["outcome"], index["image"], strict=True))]
    index["energy_in_roi"] = [e.energy_in_roi for e in explanations]
    # The same share for a centred Gaussian and a random map over the same crop: a heat map tells something only
    # where it beats both (the report sets them side by side).
    rng = np.random.default_rng(0)
    baselines = [crop_baselines(e, rng) for e in explanations]
    for name in ("gaussian", "random"):
        index[f"{name}_in_roi"] = [
            None if e.lesion_region is None else energy_share(b[name], e.lesion_region)
            for e, b in zip(explanations, baselines, strict=True)
        ]
    index["heat_on_image"] = [e.heat_on_image for e in explanations]
    index["note"] = [e.note for e in explanations]
    final = run.heatmaps_for(model, split)
    run.output_folder(final.parent)  # refuses a symlinked heatmaps/ or heatmaps/<model> (nothing written through it)
    if final.is_symlink():
        final.unlink()  # replaced by the new folder, never written through
    # Folders of an earlier call that was killed (kill -9) before it could clean up; the run's lock is held here.
    for stale in final.parent.glob(f".{final.name}.*"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
    with _new_folder(final) as folder:
        for name, explanation in zip(index["png"], explanations, strict=True):
            atomic_write_bytes(folder / name, explanation.overlay_png(width=OVERLAY_WIDTH))
        write_csv(index[list(INDEX_COLUMNS)], folder / "index.csv")
    return final


@contextlib.contextmanager
def _new_folder(final: Path) -> Iterator[Path]:
    """A fresh folder that replaces `final` when the block succeeds, so no PNG of an earlier call is left in it."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    # mkdtemp makes the folder private (0700); the heat maps are as readable as the rest of the run (umask applies).
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    try:
        yield tmp
        old = final.with_name(f".{final.name}.old.{os.getpid()}")
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def explain_run(
    run_dir: str | os.PathLike[str],
    *,
    models: Sequence[str] | None = None,
    split: str = "external_test",
    n: int = 16,
    method: str = "gradcam",
    device: str = "auto",
    batch_size: int = 16,
) -> Path:
    """Write heat-map overlays of up to `n` images of `split` per model to `runs/<name>/heatmaps/<model>/<split>/`.

    Images are chosen from the model's predictions with its frozen threshold (`select_cases`: a few TP, FP, FN and
    TN, the most confident first). Each folder holds one PNG per image and `index.csv` (`INDEX_COLUMNS`; `png` is
    relative to the folder, `energy_in_roi` the share of heat inside the lesion mask, else its box (and
    `gaussian_in_roi`, `random_in_roi` the same for a centred Gaussian and a random map over the crop), empty when
    neither is known; `note` how an ensemble's or a TTA package's map was made). The caller holds the run's lock
    (`alnus.runfolder.lock_run`). Returns `runs/<name>/heatmaps`.
    """
    run_dir = Path(run_dir)
    _cam_class(method)
    if split not in EVALUATION_SPLITS:
        raise ExplainError(f"unknown split {split!r}; choose one of: {', '.join(EVALUATION_SPLITS)}.")
    if int(n) != n or n < 1:
        raise ExplainError(f"n must be a whole number >= 1, got {n!r}.")
    if not run_dir.is_dir():
        raise ExplainError(f"run folder {run_dir} not found; pass runs/<name> (made by `alnus study`).")
    for model in run_models(run_dir, models or []):
        _explain_model(run_dir, model, split, int(n), method, device, batch_size)
    return RunFolder(run_dir).heatmaps


__all__ = [
    "METHODS",
    "DeletionScore",
    "ExplainError",
    "Explanation",
    "PositiveLogit",
    "case_table",
    "crop_baselines",
    "deletion_of",
    "deletion_score",
    "energy_share",
    "explain_images",
    "explain_run",
    "gaussian_map",
    "heatmap_to_image",
    "heatmaps",
    "random_map",
    "run_max_pixels",
    "select_cases",
    "target_layer",
]
