"""Augmentation suited to breast ultrasound: small geometric changes, gain/contrast/gamma, speckle.

Depth has a direction in an ultrasound image (transducer and near field at the top), so images are flipped
left-right but not upside down unless asked. Rotation, scaling and shift are one affine warp (Pillow, bilinear:
faster than `scipy.ndimage.affine_transform`; bench/augment_speed.py measures both and writes docs/performance.md).
Brightness, contrast and gamma are folded into one 256-entry lookup table. Speckle is
multiplicative noise with unit mean whose amplitude follows the Rayleigh law of fully developed speckle
(Burckhardt 1978, "Speckle in ultrasound B-mode scans"; Goodman 1976).

Scanner shift (another hospital's machine and settings) has its own steps, all off by default: `blur` (a softer
point-spread function), `resolution` (lower lateral/axial resolution: down- then up-sampling), `attenuation` (depth
gain compensation set too high or too low: a gain that rises or falls exponentially with depth) and `tgc` (the
time-gain-compensation sliders: smooth gain bands at random depths). Depth runs down the rows.

The dataset (`alnus.data.dataset.UltrasoundDataset`) hands this augmentation the image without its letterbox
padding and pads the result again, so the padding is exactly what inference sees.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
from PIL import Image

from alnus.errors import AlnusError

# Mean and standard deviation of a Rayleigh variable with scale 1: turn its samples into unit-variance noise.
_RAYLEIGH_MEAN = math.sqrt(math.pi / 2)
_RAYLEIGH_STD = math.sqrt((4 - math.pi) / 2)


class AugmentConfigError(AlnusError):
    """An augmentation setting that is unknown or out of range."""


@dataclass(frozen=True)
class UltrasoundAugment:
    """Random augmentation of one grey-scale uint8 image, `(image, rng) -> image` of the same shape.

    Each magnitude is the largest change drawn; a value of zero (a range of `(1, 1)`) turns the step off.

    Args:
        hflip: probability of a left-right flip.
        vflip: probability of an upside-down flip (0 by default: depth has a direction).
        rotate_deg: rotation angle drawn uniformly from +-rotate_deg degrees.
        scale: zoom factor range (log-uniform); > 1 enlarges.
        shift: translation drawn uniformly from +-shift of the width and height.
        brightness: offset drawn from +-brightness, in units of the full 0..255 range.
        contrast: factor drawn from 1 +- contrast, applied around the image mean.
        gamma: exponent range (log-uniform) applied to intensities scaled to 0..1.
        speckle: largest standard deviation of the multiplicative noise; each image draws one in 0..speckle.
        blur: largest Gaussian blur sigma in pixels; each image draws one in 0..blur.
        resolution: range of the resampling factor (log-uniform, <= 1): the image is shrunk by it and enlarged back.
        attenuation: largest depth-gain slope: the gain is exp(a * (depth - 0.5)) with a drawn from +-attenuation and
            depth 0 (top row) to 1 (bottom row).
        tgc: largest amplitude of the gain bands: three smooth bumps (width 0.1 of the depth) at random depths, each
            with a gain change drawn from +-tgc.
    """

    hflip: float = 0.5
    vflip: float = 0.0
    rotate_deg: float = 10
    scale: tuple[float, float] = (0.9, 1.1)
    shift: float = 0.05
    brightness: float = 0.15
    contrast: float = 0.15
    gamma: tuple[float, float] = (0.8, 1.25)
    speckle: float = 0.1
    blur: float = 0.0
    resolution: tuple[float, float] = (1.0, 1.0)
    attenuation: float = 0.0
    tgc: float = 0.0

    def __post_init__(self) -> None:
        for name in ("scale", "gamma", "resolution"):
            value = getattr(self, name)
            try:
                low, high = (float(v) for v in value)
            except (TypeError, ValueError):
                raise AugmentConfigError(
                    f"augmentation {name} must be a pair of numbers (low, high), not {value!r}."
                ) from None
            if not 0 < low <= high:
                raise AugmentConfigError(f"augmentation {name} must satisfy 0 < low <= high, not {value!r}.")
            object.__setattr__(self, name, (low, high))
        if not 0.1 <= self.resolution[0] <= self.resolution[1] <= 1:
            raise AugmentConfigError(
                f"augmentation resolution must satisfy 0.1 <= low <= high <= 1, not {self.resolution!r}."
            )
        limits = {"hflip": 1.0, "vflip": 1.0, "rotate_deg": 180.0, "shift": 1.0, "brightness": 1.0}
        limits |= {"contrast": 1.0, "speckle": 1.0, "blur": 10.0, "attenuation": 3.0, "tgc": 0.9}
        for name, upper in limits.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= upper:
                raise AugmentConfigError(f"augmentation {name} must be a number in [0, {upper:g}], not {value!r}.")
            object.__setattr__(self, name, float(value))

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None) -> UltrasoundAugment:
        """Build from a config mapping (YAML lists accepted for ranges); unknown keys are an error."""
        if config is not None and not isinstance(config, Mapping):
            raise AugmentConfigError(
                f"the augmentation settings must be a mapping of name: value, not {type(config).__name__}."
            )
        config = dict(config or {})
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(config) - set(known))
        if unknown:
            raise AugmentConfigError(
                f"unknown augmentation setting(s) {', '.join(map(repr, unknown))}; the settings are {', '.join(known)}."
            )
        return cls(**config)

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain numbers and lists, ready for YAML/JSON and `from_config`."""
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Augment `image` (uint8, (H, W)); the same generator state gives the same result."""
        if image.dtype != np.uint8 or image.ndim != 2:
            raise AugmentConfigError(
                f"augmentation expects a uint8 (H, W) image, got {image.dtype} with shape {image.shape}."
            )
        # All ten draws happen whatever the settings, so turning one step off leaves the others' draws alone.
        draws = rng.random(10)
        flip_h, flip_v, unit_angle, unit_scale, unit_dx, unit_dy, unit_b, unit_c, unit_g, unit_s = draws
        out = image
        if flip_h < self.hflip:
            out = out[:, ::-1]
        if flip_v < self.vflip:
            out = out[::-1, :]
        angle = math.radians(self.rotate_deg * (2 * unit_angle - 1))
        zoom = _log_uniform(self.scale, unit_scale)
        height, width = out.shape
        dx, dy = self.shift * (2 * unit_dx - 1) * width, self.shift * (2 * unit_dy - 1) * height
        if angle or zoom != 1 or dx or dy:
            out = _affine(out, angle, zoom, dx, dy)
        gain = None
        if self._scanner_shift:
            # Drawn only when a scanner-shift step is on, so settings without them give the same images as before.
            shift_draws = rng.random(9)
            out = self._soften(out, shift_draws[0], shift_draws[1])
            gain = self._depth_gain(out.shape[0], shift_draws[2:])
        lut = self._lookup_table(out, unit_b, unit_c, unit_g)
        sigma = self.speckle * unit_s
        if gain is not None:
            table = np.arange(256, dtype=np.float32) if lut is None else lut.astype(np.float32)
            values = table[out] * gain[:, None]
            if sigma:
                values *= _speckle(rng, out.shape, sigma)
            return _to_uint8(values)
        if sigma:
            noise = _speckle(rng, out.shape, sigma)
            table = np.arange(256, dtype=np.float32) if lut is None else lut.astype(np.float32)
            values = np.multiply(noise, table[out], out=noise)
            return _to_uint8(values)
        if lut is not None:
            return _to_uint8(lut)[out]
        return np.array(out)

    @property
    def _scanner_shift(self) -> bool:
        return bool(self.blur or self.resolution != (1.0, 1.0) or self.attenuation or self.tgc)

    def _soften(self, image: np.ndarray, unit_blur: float, unit_resolution: float) -> np.ndarray:
        """Blur, then lower the resolution (shrink and enlarge back, bilinear); the shape is kept."""
        out = image
        sigma = float(self.blur * unit_blur)
        if sigma > 0.05:
            from PIL import ImageFilter

            out = np.asarray(Image.fromarray(np.ascontiguousarray(out)).filter(ImageFilter.GaussianBlur(sigma)))
        factor = _log_uniform(self.resolution, unit_resolution)
        height, width = out.shape
        small = (max(1, round(width * factor)), max(1, round(height * factor)))
        if small != (width, height):
            picture = Image.fromarray(np.ascontiguousarray(out)).resize(small, Image.Resampling.BILINEAR)
            out = np.asarray(picture.resize((width, height), Image.Resampling.BILINEAR))
        return out

    def _depth_gain(self, height: int, units: np.ndarray) -> np.ndarray | None:
        """Gain per row: exp(a * (depth - 0.5)) times 1 + three smooth TGC bands; None when both are off."""
        if not (self.attenuation or self.tgc):
            return None
        depth = np.linspace(0.0, 1.0, height, dtype=np.float32)
        gain = np.exp(self.attenuation * (2 * units[0] - 1) * (depth - 0.5)).astype(np.float32)
        if self.tgc:
            bands = np.zeros(height, dtype=np.float32)
            for centre, amplitude in zip(units[1:4], units[4:7], strict=True):
                bands += self.tgc * (2 * amplitude - 1) * np.exp(-0.5 * ((depth - centre) / 0.1) ** 2)
            gain *= np.clip(1 + bands, 0.1, None)
        return gain

    def _lookup_table(self, image: np.ndarray, unit_b: float, unit_c: float, unit_g: float) -> np.ndarray | None:
        """Gamma, then contrast around the mean, then brightness, as floats on 0..255; None when all off."""
        gamma = _log_uniform(self.gamma, unit_g)
        contrast = 1 + self.contrast * (2 * unit_c - 1)
        brightness = self.brightness * (2 * unit_b - 1)
        if gamma == 1 and contrast == 1 and brightness == 0:
            return None
        levels = np.linspace(0.0, 1.0, 256) ** gamma
        if contrast != 1:
            histogram = np.bincount(image.ravel(), minlength=256)
            mean = histogram @ levels / image.size
            levels = (levels - mean) * contrast + mean
        return (levels + brightness) * 255


def _speckle(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Multiplicative Rayleigh speckle with unit mean and standard deviation `sigma` (float32): the amplitude
    sqrt(-2 ln U), U uniform in (0, 1], computed in place for speed."""
    noise = rng.random(size=shape, dtype=np.float32)
    np.subtract(1, noise, out=noise)
    np.log(noise, out=noise)
    np.negative(noise, out=noise)
    np.sqrt(noise, out=noise)
    noise *= sigma * math.sqrt(2) / _RAYLEIGH_STD
    noise += 1 - sigma * _RAYLEIGH_MEAN / _RAYLEIGH_STD
    return noise


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """Round intensities to uint8, clipping (never wrapping) what falls outside 0..255."""
    values = np.clip(values, 0, 255, out=values if values.dtype.kind == "f" else None)
    values += 0.5  # non-negative, so truncation after +0.5 rounds half up
    return values.astype(np.uint8)


def _log_uniform(bounds: tuple[float, float], unit: float) -> float:
    low, high = bounds
    return low if low == high else math.exp(math.log(low) + unit * (math.log(high) - math.log(low)))


def _affine(image: np.ndarray, angle: float, zoom: float, dx: float, dy: float) -> np.ndarray:
    """Rotate by `angle` (radians) and zoom about the centre, then shift by (dx, dy) pixels; zeros fill in."""
    height, width = image.shape
    cx, cy = width / 2, height / 2
    # Pillow wants the inverse map, output (x, y) -> input, as (a, b, c, d, e, f); pixel centres sit at +0.5.
    cos, sin = math.cos(angle) / zoom, math.sin(angle) / zoom
    ox, oy = cx + dx, cy + dy
    coeffs = (cos, -sin, cx - cos * ox + sin * oy, sin, cos, cy - sin * ox - cos * oy)
    warped = Image.fromarray(np.ascontiguousarray(image)).transform(
        (width, height), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR, fillcolor=0
    )
    return np.asarray(warped)
