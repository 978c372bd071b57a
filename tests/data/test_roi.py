"""ROI: box parsing, mask boxes, peritumoral margin and clipping, and each policy mode."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from alnus.data.roi import (
    RoiPolicy,
    box_from_mask,
    box_inside,
    crop,
    crop_roi,
    expand_box,
    parse_box,
    roi_box,
)
from alnus.errors import AlnusError


def _write_mask(path: Path, shape: tuple[int, int], box: tuple[int, int, int, int] | None) -> None:
    mask = np.zeros(shape, dtype=np.uint8)
    if box is not None:
        x, y, w, h = box
        mask[y : y + h, x : x + w] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask).save(path)


@pytest.mark.parametrize(
    ("text", "box"),
    [
        ("10,20,30,40", (10, 20, 30, 40)),
        ("[10, 20, 30, 40]", (10, 20, 30, 40)),
        (" (1,2,3,4) ", (1, 2, 3, 4)),
        ("10.0,20,30.0,40", (10, 20, 30, 40)),
        ("-5,0,3,4", (-5, 0, 3, 4)),
    ],
)
def test_parse_box_formats(text: str, box: tuple[int, int, int, int]) -> None:
    assert parse_box(text) == box


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1,2,3", "has 3 field(s); expected 4"),
        ("[1,2,3,4,5]", "has 5 field(s); expected 4"),
        ("", "has 1 field(s); expected 4"),
        ("a,2,3,4", "x='a' is not a number"),
        ("1,2,3,four", "h='four' is not a number"),
        ("1.5,2,3,4", "x='1.5' is not a whole number"),
        ("1,2,nan,4", "w='nan' is not a number"),
        ("1_0,2,3,4", "x='1_0' is not a number"),  # float() reads it as 10 (attack review)
        ("\uff11,2,3,4", "x='\uff11' is not a number"),  # a full-width 1
        ("1,2,inf,4", "w='inf' is not a number"),
        ("1,2,0,4", "width and height must be positive (got w=0, h=4)"),
        # An attack review: 1e308 was taken as a pixel and quoted with its 309 digits in a later message.
        ("1e308,1,1,1", "x='1e308' is beyond any image (1,000,000,000 pixels at most)"),
        ("1," + "9" * 400 + ",1,1", "y='" + "9" * 77 + "...' is beyond any image"),
        ("1,2,3,-4", "width and height must be positive"),
        (
            "10;20;30;40",
            "roi separated by semicolons, not commas ('10;20;30;40'); write the box as x,y,w,h in pixels "
            "with commas, e.g. 10,20,30,40.",
        ),  # fmt: skip
        ("10 20 30 40", "roi separated by spaces, not commas ('10 20 30 40'); write the box as x,y,w,h"),
        ("[10|20|30|40]", "separated by bars, not commas ('[10|20|30|40]'); write the box as x,y,w,h"),
        (
            "10;20;30",
            "roi separated by semicolons, not commas ('10;20;30'); write the box as x,y,w,h in pixels with "
            "commas, four whole numbers.",
        ),  # fmt: skip
    ],
)
def test_parse_box_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match="roi") as info:
        parse_box(text)
    assert message in str(info.value)
    assert isinstance(info.value, AlnusError)


def test_box_from_mask() -> None:
    mask = np.zeros((30, 40), dtype=np.uint8)
    assert box_from_mask(mask) is None
    mask[5:9, 10:20] = 1
    assert box_from_mask(mask) == (10, 5, 10, 4)
    mask[29, 39] = 255
    assert box_from_mask(mask) == (10, 5, 30, 25)
    single = np.zeros((3, 3), dtype=bool)
    single[1, 2] = True
    assert box_from_mask(single) == (2, 1, 1, 1)
    with pytest.raises(ValueError, match="2-D"):
        box_from_mask(np.zeros((3, 3, 3), dtype=np.uint8))


def test_expand_box_adds_margin_on_each_side() -> None:
    assert expand_box((10, 10, 20, 10), 0.0, (100, 100)) == (10, 10, 20, 10)
    # 0.5 x w=20 -> 10 px left and right; 0.5 x h=10 -> 5 px above and below.
    assert expand_box((10, 10, 20, 10), 0.5, (100, 100)) == (0, 5, 40, 20)
    assert expand_box((40, 40, 20, 20), 0.15, (100, 100)) == (37, 37, 26, 26)


def test_expand_box_clips_to_the_image() -> None:
    assert expand_box((5, 5, 20, 20), 1.0, (30, 40)) == (0, 0, 40, 30)
    assert expand_box((30, 20, 20, 20), 0.0, (30, 40)) == (30, 20, 10, 10)
    # Wholly outside: still one pixel at the nearest corner, never empty.
    assert expand_box((100, 100, 5, 5), 0.0, (30, 40)) == (39, 29, 1, 1)
    assert expand_box((-20, -20, 5, 5), 0.0, (30, 40)) == (0, 0, 1, 1)


def test_expand_box_rejects_bad_margin_and_box() -> None:
    with pytest.raises(ValueError, match="margin"):
        expand_box((1, 1, 2, 2), -0.1, (10, 10))
    with pytest.raises(ValueError, match="margin"):
        expand_box((1, 1, 2, 2), 2.5, (10, 10))
    with pytest.raises(ValueError, match="non-positive"):
        expand_box((1, 1, 0, 2), 0.1, (10, 10))


@given(
    x=st.integers(-50, 150),
    y=st.integers(-50, 150),
    w=st.integers(1, 120),
    h=st.integers(1, 120),
    margin=st.floats(0, 2),
    height=st.integers(1, 100),
    width=st.integers(1, 100),
)
def test_expand_box_is_always_a_non_empty_box_inside_the_image(
    x: int, y: int, w: int, h: int, margin: float, height: int, width: int
) -> None:
    grown = expand_box((x, y, w, h), margin, (height, width))
    assert box_inside(grown, (height, width))
    gx, gy, gw, gh = grown
    # Whatever part of the original box lies in the image stays in the grown box.
    if x < width and y < height and x + w > 0 and y + h > 0:
        assert gx <= max(x, 0) and gy <= max(y, 0)
        assert gx + gw >= min(x + w, width) and gy + gh >= min(y + h, height)


def test_crop() -> None:
    image = np.arange(30 * 40, dtype=np.uint32).reshape(30, 40).astype(np.uint8)
    out = crop(image, (10, 5, 4, 3))
    assert out.shape == (3, 4)
    assert np.array_equal(out, image[5:8, 10:14])
    out[:] = 0
    assert image[5, 10] == 5 * 40 + 10, "crop must return a copy"
    with pytest.raises(ValueError, match="extends outside the 40x30 image"):
        crop(image, (30, 0, 20, 5))


def test_policy_validation_and_round_trip() -> None:
    assert RoiPolicy() == RoiPolicy(mode="whole", margin=0.15)
    policy = RoiPolicy(mode="mask", margin=0.3)
    assert policy.to_dict() == {"mode": "mask", "margin": 0.3}
    assert RoiPolicy.from_dict(policy.to_dict()) == policy
    assert RoiPolicy.from_dict({"mode": "box"}) == RoiPolicy("box", 0.15)
    assert RoiPolicy(margin=1).margin == 1.0
    with pytest.raises(AlnusError, match="unknown ROI mode 'crop'"):
        RoiPolicy(mode="crop")  # type: ignore[arg-type]
    for margin in (-0.01, 2.01, float("nan")):
        with pytest.raises(AlnusError, match="outside 0..2"):
            RoiPolicy(margin=margin)
    with pytest.raises(AlnusError, match="must be a number"):
        RoiPolicy(margin="0.2")  # type: ignore[arg-type]
    with pytest.raises(AlnusError, match="unknown ROI policy key"):
        RoiPolicy.from_dict({"mode": "box", "pad": 3})


SHAPE = (60, 80)  # H, W


def test_whole_mode_gives_no_box(tmp_path: Path) -> None:
    row = {"image": "a.png", "roi": "1,2,3,4"}
    assert roi_box(row, tmp_path, SHAPE, RoiPolicy("whole")) is None
    image = np.ones(SHAPE, dtype=np.uint8)
    assert crop_roi(image, row, tmp_path, RoiPolicy("whole")).shape == SHAPE


def test_box_mode_uses_roi_then_mask(tmp_path: Path) -> None:
    _write_mask(tmp_path / "m.png", SHAPE, (40, 30, 10, 10))
    with_roi = {"image": "a.png", "roi": "10,10,20,10", "mask": "m.png"}
    assert roi_box(with_roi, tmp_path, SHAPE, RoiPolicy("box", 0.5)) == (0, 5, 40, 20)
    mask_only = {"image": "a.png", "roi": "", "mask": "m.png"}
    assert roi_box(mask_only, tmp_path, SHAPE, RoiPolicy("box", 0.0)) == (40, 30, 10, 10)


def test_mask_mode_prefers_mask_then_roi(tmp_path: Path) -> None:
    _write_mask(tmp_path / "m.png", SHAPE, (40, 30, 10, 10))
    _write_mask(tmp_path / "t1.png", SHAPE, (0, 0, 5, 5))
    _write_mask(tmp_path / "t2.png", SHAPE, (70, 50, 5, 5))
    _write_mask(tmp_path / "empty.png", SHAPE, None)
    policy = RoiPolicy("mask", 0.0)
    assert roi_box({"image": "a.png", "roi": "1,1,2,2", "mask": "m.png"}, tmp_path, SHAPE, policy) == (
        40,
        30,
        10,
        10,
    )
    # BrEaST-style `mask_tumor` with several outlines: the first one is the lesion.
    assert roi_box({"image": "a.png", "mask_tumor": "t1.png;t2.png"}, tmp_path, SHAPE, policy) == (0, 0, 5, 5)
    assert roi_box({"image": "a.png", "roi": "1,1,2,2", "mask": ""}, tmp_path, SHAPE, policy) == (1, 1, 2, 2)
    # An empty mask (e.g. a normal case) counts as no mask.
    assert roi_box({"image": "a.png", "roi": "1,1,2,2", "mask": "empty.png"}, tmp_path, SHAPE, policy) == (
        1,
        1,
        2,
        2,
    )


@pytest.mark.parametrize("mode", ["box", "mask"])
def test_row_lacking_what_its_mode_needs_is_an_error(tmp_path: Path, mode: str) -> None:
    _write_mask(tmp_path / "empty.png", SHAPE, None)
    with pytest.raises(AlnusError, match=r"image x/lesion7\.png: ROI mode .* needs a lesion box .* or --mask\)"):
        roi_box({"image": "x/lesion7.png"}, tmp_path, SHAPE, RoiPolicy(mode))  # type: ignore[arg-type]
    # An empty mask is named as such, not as a missing one.
    row = {"image": "x/lesion7.png", "roi": "", "mask": "empty.png"}
    with pytest.raises(AlnusError, match=r"image x/lesion7\.png: its lesion mask empty\.png is empty \(no lesion"):
        roi_box(row, tmp_path, SHAPE, RoiPolicy(mode))  # type: ignore[arg-type]


def test_a_missing_mask_is_named_as_the_mask(tmp_path: Path) -> None:
    with pytest.raises(AlnusError, match=r"image a\.png: its lesion mask gone\.png was not found \(looked for .*gone"):
        roi_box({"image": "a.png", "mask": "gone.png"}, tmp_path, SHAPE, RoiPolicy("mask"))


def test_bad_roi_or_mask_names_the_image(tmp_path: Path) -> None:
    policy = RoiPolicy("box")
    with pytest.raises(AlnusError, match=r"image a\.png: roi 'a,b,c,d': x='a' is not a number"):
        roi_box({"image": "a.png", "roi": "a,b,c,d"}, tmp_path, SHAPE, policy)
    with pytest.raises(AlnusError, match=r"image a\.png: roi 70,10,20,10 extends outside the 80x60 image"):
        roi_box({"image": "a.png", "roi": "70,10,20,10"}, tmp_path, SHAPE, policy)
    _write_mask(tmp_path / "small.png", (30, 40), (1, 1, 5, 5))
    with pytest.raises(AlnusError, match=r"image a\.png: mask small\.png is 40x30 but the image is 80x60"):
        roi_box({"image": "a.png", "mask": "small.png"}, tmp_path, SHAPE, RoiPolicy("mask"))


def test_crop_roi_crops_the_expanded_box(tmp_path: Path) -> None:
    image = np.zeros(SHAPE, dtype=np.uint8)
    image[30:40, 40:50] = 200
    _write_mask(tmp_path / "m.png", SHAPE, (40, 30, 10, 10))
    row = {"image": "a.png", "mask": "m.png"}
    out = crop_roi(image, row, tmp_path, RoiPolicy("mask", 0.2))
    assert out.shape == (14, 14)
    assert out[2:12, 2:12].min() == 200 and out[0].max() == 0 and out[:, 0].max() == 0


def test_mask_decoding_honours_max_pixels_and_refuses_a_fifo(tmp_path: Path) -> None:
    """issue 7.11: a mask is bounded by the caller's decoded-size limit; a FIFO mask is refused, not read."""
    import os

    _write_mask(tmp_path / "m.png", SHAPE, (40, 30, 10, 10))
    row = {"image": "a.png", "mask": "m.png"}
    policy = RoiPolicy("mask", 0.0)
    assert roi_box(row, tmp_path, SHAPE, policy, max_pixels=SHAPE[0] * SHAPE[1]) == (40, 30, 10, 10)
    with pytest.raises(AlnusError, match="--max-pixels"):
        crop_roi(np.zeros(SHAPE, dtype=np.uint8), row, tmp_path, policy, max_pixels=SHAPE[0] * SHAPE[1] - 1)
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "pipe.png")
        with pytest.raises(AlnusError, match="named pipe"):
            roi_box({"image": "a.png", "mask": "pipe.png"}, tmp_path, SHAPE, policy)


def test_a_whole_frame_mask_or_box_on_a_cropped_dicom_says_where_it_was_cropped(tmp_path: Path) -> None:
    """A new user's review: a DICOM with an ultrasound region is read cropped to it, and a mask drawn on the whole
    frame was refused with 'the image is 485x537' (its viewer shows 645x657) and nothing about the crop; a box read
    on the whole frame was moved silently or refused the same way. Both errors now say where the crop lies, in
    `alnus predict` (roi_box) and in `alnus data validate` (validate_manifest)."""
    import pandas as pd

    from alnus.data.images import image_shape
    from alnus.data.manifest import validate_manifest
    from tests.data.test_images import _write_dicom

    pixels = np.random.default_rng(0).integers(0, 256, (40, 60), dtype=np.uint8)
    _write_dicom(tmp_path / "r.dcm", pixels, regions=[(1, 10, 5, 49, 34)])  # x 10-49, y 5-34: a 40x30 crop
    Image.fromarray(pixels).save(tmp_path / "plain.png")
    _write_mask(tmp_path / "frame_mask.png", (40, 60), (20, 10, 8, 8))
    said = r"cropped to its ultrasound region, x 10-49 and y 5-34 of its 60x40 frame: .* subtract 10 from x and 5"
    shape = image_shape(tmp_path / "r.dcm")
    with pytest.raises(AlnusError, match=r"mask frame_mask\.png is 60x40 but the image is 40x30; .*" + said):
        roi_box({"image": "r.dcm", "mask": "frame_mask.png"}, tmp_path, shape, RoiPolicy("box"))
    with pytest.raises(AlnusError, match=r"roi 30,10,20,8 extends outside the 40x30 image; .*" + said):
        roi_box({"image": "r.dcm", "roi": "30,10,20,8"}, tmp_path, shape, RoiPolicy("box"))
    with pytest.raises(AlnusError, match=r"the 80x60 image; fix the box \(the roi column, or --roi: .*\)\.$"):
        roi_box({"image": "plain.png", "roi": "70,10,20,10"}, tmp_path, SHAPE, RoiPolicy("box"))  # not a DICOM

    table = pd.DataFrame({"image": ["r.dcm", "r.dcm", "plain.png"], "patient_id": ["a", "b", "c"],
                          "label": ["benign", "malignant", "benign"], "roi": ["", "30,10,20,8", ""],
                          "mask": ["frame_mask.png", "", "small_mask.png"]})  # fmt: skip
    _write_mask(tmp_path / "small_mask.png", (30, 40), (1, 1, 5, 5))
    reasons = {(p.row, p.column): p.reason for p in validate_manifest(table, tmp_path, check_images=True).problems}
    assert re.search(said, reasons[(2, "mask")]) and re.search(said, reasons[(3, "roi")])  # spreadsheet rows
    assert "ultrasound region" not in reasons[(4, "mask")]  # a PNG's mask of the wrong size: no word of a crop
