"""Tests for alnus.data.augment; its speed is measured by bench/augment_speed.py, not asserted here."""

from __future__ import annotations

import numpy as np
import pytest

from alnus.data.augment import AugmentConfigError, UltrasoundAugment

OFF = dict(
    hflip=0.0,
    vflip=0.0,
    rotate_deg=0.0,
    scale=(1.0, 1.0),
    shift=0.0,
    brightness=0.0,
    contrast=0.0,
    gamma=(1.0, 1.0),
    speckle=0.0,
)


def only(**changes: object) -> UltrasoundAugment:
    """An augmentation with every step off except `changes`."""
    return UltrasoundAugment(**(OFF | changes))


@pytest.fixture
def image() -> np.ndarray:
    """A 60x80 image with no left-right or top-bottom symmetry: a gradient plus a bright block top-left."""
    rng = np.random.default_rng(7)
    picture = np.tile(np.linspace(20, 200, 80), (60, 1)) + rng.integers(0, 30, (60, 80))
    picture[5:20, 5:15] = 250
    return picture.astype(np.uint8)


def test_same_seed_same_result_and_different_seeds_differ(image: np.ndarray) -> None:
    augment = UltrasoundAugment()
    first = augment(image, np.random.default_rng(123))
    again = augment(image, np.random.default_rng(123))
    other = augment(image, np.random.default_rng(124))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_keeps_shape_and_dtype_and_leaves_the_input_alone(image: np.ndarray) -> None:
    before = image.copy()
    out = UltrasoundAugment()(image, np.random.default_rng(0))
    assert out.shape == image.shape and out.dtype == np.uint8
    assert out.flags.writeable
    np.testing.assert_array_equal(image, before)


def test_all_steps_off_is_the_identity(image: np.ndarray) -> None:
    out = only()(image, np.random.default_rng(0))
    np.testing.assert_array_equal(out, image)
    assert out is not image


def test_hflip_flips_left_right(image: np.ndarray) -> None:
    np.testing.assert_array_equal(only(hflip=1.0)(image, np.random.default_rng(0)), image[:, ::-1])
    np.testing.assert_array_equal(only(vflip=1.0)(image, np.random.default_rng(0)), image[::-1, :])


def test_defaults_never_flip_upside_down(image: np.ndarray) -> None:
    # Defaults without the geometric jitter, so a vertical flip would show exactly.
    augment = UltrasoundAugment(**(OFF | {"hflip": 0.5}))
    assert UltrasoundAugment().vflip == 0
    outcomes = {"none": 0, "h": 0}
    for seed in range(200):
        out = augment(image, np.random.default_rng(seed))
        if np.array_equal(out, image):
            outcomes["none"] += 1
        elif np.array_equal(out, image[:, ::-1]):
            outcomes["h"] += 1
        else:
            pytest.fail(f"seed {seed}: the result is neither the image nor its left-right mirror")
    # hflip=0.5 over 200 draws: both outcomes occur (each has probability 2**-200 of never happening).
    assert outcomes["none"] > 0 and outcomes["h"] > 0


def test_shift_moves_content_by_whole_pixels(image: np.ndarray) -> None:
    # shift=0.1 of 80 px wide is at most 8 px; find the drawn shift from where the bright block went.
    out = only(shift=0.1)(image, np.random.default_rng(3))
    ys, xs = np.nonzero(out >= 250)
    assert abs(xs.min() - 5) <= 8 and abs(ys.min() - 5) <= 6
    assert (xs.min(), ys.min()) != (5, 5)


def test_rotation_keeps_the_centre_and_fills_corners_with_black() -> None:
    square = np.full((101, 101), 128, np.uint8)
    out = only(rotate_deg=30)(square, np.random.default_rng(1))
    assert out[50, 50] == 128
    # A rotated full-frame square leaves at least one corner outside the source: black (no echo), not garbage.
    assert min(out[0, 0], out[0, -1], out[-1, 0], out[-1, -1]) == 0


@pytest.mark.parametrize(
    "changes",
    [
        {"brightness": 1.0},
        {"contrast": 1.0},
        {"gamma": (0.2, 5.0)},
        {"brightness": 1.0, "contrast": 1.0, "gamma": (0.2, 5.0)},
    ],
    ids=["brightness", "contrast", "gamma", "all"],
)
def test_intensity_steps_clip_instead_of_wrapping(changes: dict) -> None:
    # Black, grey and white thirds: an overflow past 255 or below 0 would wrap around in uint8, and a white
    # or black third would come out darker or brighter than its neighbour.
    thirds = np.zeros((30, 30), np.uint8)
    thirds[:, 10:20], thirds[:, 20:] = 128, 255
    augment = only(**changes)
    changed = False
    for seed in range(20):
        out = augment(thirds, np.random.default_rng(seed))
        assert out.dtype == np.uint8
        black, grey, white = (out[:, i : i + 10].astype(int).mean() for i in (0, 10, 20))
        # Every step is monotone in the input intensity, so the thirds stay in order and uniform.
        assert black <= grey <= white
        assert all(len(np.unique(out[:, i : i + 10])) == 1 for i in (0, 10, 20))
        changed |= not np.array_equal(out, thirds)
    assert changed


def test_speckle_clips_bright_pixels_at_white() -> None:
    # Rayleigh speckle exceeds its mean with probability exp(-pi/4) = 0.456 whatever its strength: that share
    # of a white image must come out exactly 255 (clipped); wrapping would scatter it over 0..254.
    white = np.full((100, 100), 255, np.uint8)
    for seed in range(5):
        out = only(speckle=1.0)(white, np.random.default_rng(seed))
        assert abs((out == 255).mean() - np.exp(-np.pi / 4)) < 0.03


def test_brightness_raises_or_lowers_the_mean() -> None:
    grey = np.full((30, 30), 100, np.uint8)
    means = [only(brightness=0.2)(grey, np.random.default_rng(seed)).mean() for seed in range(50)]
    assert min(means) >= 100 - 0.2 * 255 - 0.5 and max(means) <= 100 + 0.2 * 255 + 0.5
    assert min(means) < 90 and max(means) > 110


def test_speckle_is_multiplicative_noise_with_unit_mean() -> None:
    black = np.zeros((64, 64), np.uint8)
    np.testing.assert_array_equal(only(speckle=0.5)(black, np.random.default_rng(0)), black)
    grey = np.full((200, 200), 100, np.uint8)
    out = only(speckle=0.5)(grey, np.random.default_rng(0)).astype(float)
    assert out.std() > 1
    assert abs(out.mean() - 100) < 1


def test_config_round_trip_and_yaml_lists() -> None:
    augment = UltrasoundAugment.from_config({"rotate_deg": 5, "scale": [0.95, 1.05]})
    assert augment.scale == (0.95, 1.05) and augment.rotate_deg == 5.0
    assert UltrasoundAugment.from_config(augment.to_dict()) == augment
    assert UltrasoundAugment.from_config({}) == UltrasoundAugment()
    assert augment.to_dict()["scale"] == [0.95, 1.05]


def test_unknown_config_key_is_named() -> None:
    with pytest.raises(AugmentConfigError, match=r"unknown augmentation setting\(s\) 'rotation'.*rotate_deg"):
        UltrasoundAugment.from_config({"rotation": 10, "hflip": 0.5})
    with pytest.raises(AugmentConfigError, match="mapping"):
        UltrasoundAugment.from_config([("hflip", 0.5)])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"hflip": 1.5}, r"hflip must be a number in \[0, 1\]"),
        ({"speckle": -0.1}, r"speckle must be a number in \[0, 1\]"),
        ({"scale": (1.1, 0.9)}, "scale must satisfy 0 < low <= high"),
        ({"gamma": 1.2}, r"gamma must be a pair of numbers"),
        ({"rotate_deg": "10"}, "rotate_deg must be a number"),
    ],
)
def test_out_of_range_settings_are_errors(changes: dict, message: str) -> None:
    with pytest.raises(AugmentConfigError, match=message):
        UltrasoundAugment(**changes)


def test_rejects_images_that_are_not_uint8_2d() -> None:
    with pytest.raises(AugmentConfigError, match="uint8 \\(H, W\\)"):
        UltrasoundAugment()(np.zeros((8, 8, 3), np.uint8), np.random.default_rng(0))
    with pytest.raises(AugmentConfigError, match="float32"):
        UltrasoundAugment()(np.zeros((8, 8), np.float32), np.random.default_rng(0))


# ----------------------------------------------------------------------------------- scanner shift (issue 10)
def _flat(value: int = 100, shape: tuple[int, int] = (64, 48)) -> np.ndarray:
    return np.full(shape, value, dtype=np.uint8)


def _detail(picture: np.ndarray) -> float:
    """High-frequency energy: mean squared difference of neighbouring pixels."""
    p = picture.astype(np.float64)
    return float(np.mean(np.diff(p, axis=0) ** 2) + np.mean(np.diff(p, axis=1) ** 2))


def test_blur_and_lower_resolution_remove_detail_but_keep_the_shape_and_mean() -> None:
    rng = np.random.default_rng(3)
    picture = rng.integers(0, 256, (64, 48)).astype(np.uint8)
    for augment in (only(blur=3.0), only(resolution=(0.3, 0.3))):
        outs = [augment(picture, np.random.default_rng(seed)) for seed in range(4)]
        assert all(o.shape == picture.shape and o.dtype == np.uint8 for o in outs)
        # Each draws its strength: at least one draw removes most of the pixel-to-pixel detail.
        assert min(_detail(o) for o in outs) < 0.5 * _detail(picture)
        assert all(abs(float(o.mean()) - float(picture.mean())) < 6 for o in outs)


def test_attenuation_makes_the_gain_change_monotonically_with_depth() -> None:
    augment = only(attenuation=2.0)
    slopes = []
    for seed in range(8):
        out = augment(_flat(), np.random.default_rng(seed)).astype(float)
        rows = out.mean(axis=1)
        assert np.allclose(out, rows[:, None], atol=0.51), "the gain depends on depth only, not on the column"
        steps = np.diff(rows)
        assert (steps >= -0.51).all() or (steps <= 0.51).all(), "exponential gain: monotonic in depth"
        slopes.append(rows[-1] - rows[0])
    assert max(slopes) > 20 and min(slopes) < -20, "the slope is drawn from both signs"


def test_tgc_bands_are_smooth_gain_changes_along_depth() -> None:
    out = only(tgc=0.5)(_flat(), np.random.default_rng(1)).astype(float)
    rows = out.mean(axis=1)
    assert np.allclose(out, rows[:, None], atol=0.51)
    assert rows.max() - rows.min() > 10, "some band changes the gain visibly"
    assert np.abs(np.diff(rows)).max() < 8, "bands are smooth (no steps between neighbouring rows)"


def test_scanner_shift_steps_are_reproducible_and_combine_with_speckle() -> None:
    augment = UltrasoundAugment(blur=1.0, resolution=(0.5, 1.0), attenuation=1.0, tgc=0.3)
    picture = np.random.default_rng(0).integers(20, 230, (40, 30)).astype(np.uint8)
    first = augment(picture, np.random.default_rng(5))
    np.testing.assert_array_equal(first, augment(picture, np.random.default_rng(5)))
    assert not np.array_equal(first, augment(picture, np.random.default_rng(6)))
    assert UltrasoundAugment.from_config(augment.to_dict()) == augment


def test_scanner_shift_off_leaves_the_other_steps_draws_alone(image: np.ndarray) -> None:
    """Settings without the new steps draw exactly as before: the generator ends in the same state."""
    plain, rng_plain = UltrasoundAugment(), np.random.default_rng(9)
    shifted, rng_shifted = UltrasoundAugment(blur=1e-9), np.random.default_rng(9)
    np.testing.assert_array_equal(plain(image, rng_plain), plain(image, np.random.default_rng(9)))
    shifted(image, rng_shifted)
    assert rng_plain.random() != rng_shifted.random(), "a scanner-shift step on draws its own numbers"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"resolution": (0.05, 1.0)}, r"resolution must satisfy 0.1 <= low <= high <= 1"),
        ({"resolution": (0.5, 1.5)}, r"resolution must satisfy 0.1 <= low <= high <= 1"),
        ({"tgc": 1.5}, r"tgc must be a number in \[0, 0.9\]"),
        ({"blur": -1}, r"blur must be a number in \[0, 10\]"),
    ],
)
def test_scanner_shift_settings_out_of_range_are_errors(changes: dict, message: str) -> None:
    with pytest.raises(AugmentConfigError, match=message):
        UltrasoundAugment(**changes)
