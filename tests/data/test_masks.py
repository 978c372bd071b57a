"""Lesion masks are read by one rule wherever a mask is used (`alnus.data.masks`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from alnus.cli import app
from alnus.data.importers import run_import
from alnus.data.masks import MaskError, load_mask
from alnus.data.roi import RoiPolicy, lesion_box
from alnus.shape_target import mask_descriptors

LESION = (30, 20, 40, 25)  # x, y, w, h


def _lesion(value: int = 255, shape: tuple[int, int] = (96, 128)) -> np.ndarray:
    mask = np.zeros(shape, dtype=np.uint8)
    x, y, w, h = LESION
    mask[y : y + h, x : x + w] = value
    return mask


def _scan(shape: tuple[int, int] = (96, 128)) -> np.ndarray:
    """Speckle-like grey levels, as an ultrasound image has."""
    return np.random.default_rng(0).integers(20, 230, size=shape, dtype=np.uint8)


def _row(tmp_path: Path, mask: str) -> dict[str, str]:
    Image.fromarray(_scan()).save(tmp_path / "scan.png")
    return {"image": "scan.png", "mask": mask}


def test_a_mask_drawn_only_in_its_alpha_channel_is_read_from_it(tmp_path: Path) -> None:
    """A drawing tool's export: black everywhere, the lesion opaque and the rest transparent. It was read as grey
    (all black), an empty mask, and the row failed for want of a lesion."""
    rgba = np.zeros((96, 128, 4), dtype=np.uint8)
    rgba[..., 3] = _lesion()
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    assert lesion_box(_row(tmp_path, "alpha.png"), tmp_path, (96, 128), RoiPolicy(mode="mask")) == LESION


def test_a_palette_mask_with_transparency_is_read_from_it(tmp_path: Path) -> None:
    palette = Image.fromarray((_lesion() > 0).astype(np.uint8), "P")
    palette.putpalette([0, 0, 0] * 256)
    palette.info["transparency"] = 0
    palette.save(tmp_path / "palette.png", transparency=0)
    assert lesion_box(_row(tmp_path, "palette.png"), tmp_path, (96, 128), RoiPolicy(mode="mask")) == LESION


def test_faint_noise_far_from_the_lesion_does_not_grow_its_box(tmp_path: Path) -> None:
    """Any nonzero pixel counted for a box (while the shape target took half the maximum): a JPEG-like speck of
    grey level 3 in a corner made the box nearly the whole image."""
    mask = _lesion()
    mask[90, 120] = 3
    Image.fromarray(mask).save(tmp_path / "speck.png")
    assert lesion_box(_row(tmp_path, "speck.png"), tmp_path, (96, 128), RoiPolicy(mode="mask")) == LESION


def test_soft_edges_and_a_low_lesion_value_are_a_mask(tmp_path: Path) -> None:
    mask = _lesion(value=1).astype(np.float64)
    blurred = np.clip(mask + 0.5 * (np.roll(mask, 1, axis=0) + np.roll(mask, 1, axis=1)), 0, 1)
    Image.fromarray((blurred * 200).astype(np.uint8)).save(tmp_path / "soft.png")
    Image.fromarray(_lesion(value=1)).save(tmp_path / "ones.png")
    assert load_mask(tmp_path / "ones.png").sum() == LESION[2] * LESION[3]
    soft = load_mask(tmp_path / "soft.png")
    assert abs(int(soft.sum()) - LESION[2] * LESION[3]) <= LESION[2] + LESION[3] + 1


def test_the_scan_given_as_its_own_mask_is_refused_naming_it(tmp_path: Path) -> None:
    """It was read as a lesion covering nearly the whole image: the crop silently became the whole scan."""
    row = _row(tmp_path, "scan.png")
    with pytest.raises(MaskError, match=r"scan\.png: not a lesion mask: \d+% of its pixels are grey levels"):
        load_mask(tmp_path / "scan.png")
    with pytest.raises(Exception, match=r"image scan\.png: its lesion mask scan\.png cannot be used: .*not a lesion"):
        lesion_box(row, tmp_path, (96, 128), RoiPolicy(mode="mask"))


def test_validate_and_import_refuse_a_scan_given_as_mask(tmp_path: Path) -> None:
    _row(tmp_path, "scan.png")
    (tmp_path / "manifest.csv").write_text("image,patient_id,label,mask\nscan.png,p1,benign,scan.png\n")
    result = CliRunner().invoke(app, ["data", "validate", str(tmp_path / "manifest.csv"), "--labels", "benign,malig"])
    assert "row 2" in str(result.exception) and "not a lesion mask" in " ".join(str(result.exception).split())

    src = tmp_path / "busi" / "benign"
    src.mkdir(parents=True)
    Image.fromarray(_scan()).save(src / "benign (1).png")
    Image.fromarray(_scan()).save(src / "benign (1)_mask.png")
    with pytest.raises(Exception, match=r"benign \(1\)_mask\.png: not a lesion mask"):
        run_import("busi", tmp_path / "busi", tmp_path / "out")


def test_the_shape_target_reads_an_alpha_mask(tmp_path: Path) -> None:
    rgba = np.zeros((96, 128, 4), dtype=np.uint8)
    rgba[..., 3] = _lesion()
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    import pandas as pd

    values, skipped = mask_descriptors(pd.DataFrame([_row(tmp_path, "alpha.png")]), tmp_path, "test")
    assert skipped["an empty mask"] == 0 and np.isfinite(values).all()
