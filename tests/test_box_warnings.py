"""Implausible lesion boxes (a few pixels, nearly the whole image) are predicted with a warning, never silently:
`alnus.data.roi.box_warning`, the `warning` column of `Predictor.predict_inputs`, `alnus predict --roi` and the
service's answer and page."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from alnus.cli import app
from alnus.data.dataset import PreprocessSpec
from alnus.data.inputs import collect_inputs
from alnus.data.roi import (
    BOX_ADVICE,
    MAX_BOX_FRACTION,
    MIN_BOX_FRACTION,
    MIN_BOX_SIDE,
    RoiError,
    RoiPolicy,
    box_warning,
    lesion_box,
    roi_box,
)
from alnus.predict import Predictor
from alnus.serve.app import STATIC_DIR
from tests.serve.conftest import AUTH, client_for, grey_image, png_bytes
from tests.test_predict import make_package

# The test image is 64 x 48 (W x H): 3072 pixels.
SHAPE = (48, 64)
GOOD = "10,10,30,20"  # 20 px short side, 19.5% of the image
TINY = "2,2,3,3"
WHOLE_IMAGE = "0,0,64,48"
OUTSIDE = "40,40,30,30"
# Box heights (of a 16 px wide box on a 400 x 400 image) and widths (of a 100 px high box on a 100 x 100 image) at the
# limits of the box's share of the image.
SMALLEST = round(MIN_BOX_FRACTION * 400 * 400 / 16)
LARGEST = round(MAX_BOX_FRACTION * 100)


# ----------------------------------------------------------------------------------------------- box_warning
def test_a_tiny_box_is_named_with_its_size_and_share_of_the_image_and_what_to_do() -> None:
    text = box_warning((100, 100), (40, 50, 3, 3))
    assert text.startswith("implausible lesion box 40,50,3,3: 3x3 px, 0.09% of the 100x100 image")
    assert f"shorter side is under {MIN_BOX_SIDE} px" in text and "covers under 0.5% of the image" in text
    assert text.endswith(BOX_ADVICE + ".") and "\n" not in text


def test_a_box_over_nearly_the_whole_image_warns() -> None:
    text = box_warning(SHAPE, (0, 0, 64, 48))
    assert "64x48 px, 100% of the 64x48 image" in text and "covers over 90% of the image" in text
    assert "shorter side" not in text and "reaches outside" not in text


def test_a_box_drawn_around_a_lesion_does_not_warn() -> None:
    assert box_warning(SHAPE, (10, 10, 30, 20)) == ""
    assert box_warning((400, 600), (200, 100, 120, 90)) == ""


@pytest.mark.parametrize(
    ("shape", "box", "reason"),
    [
        ((100, 100), (10, 10, MIN_BOX_SIDE, 40), None),  # the shorter side exactly at the limit
        ((100, 100), (10, 10, MIN_BOX_SIDE - 1, 40), "shorter side"),
        ((100, 100), (10, 10, 40, MIN_BOX_SIDE - 1), "shorter side"),
        ((400, 400), (10, 10, 16, SMALLEST), None),  # exactly MIN_BOX_FRACTION of the image
        ((400, 400), (10, 10, 16, SMALLEST - 1), "covers under 0.5%"),
        ((100, 100), (0, 0, LARGEST, 100), None),  # exactly MAX_BOX_FRACTION
        ((100, 100), (0, 0, LARGEST + 1, 100), "covers over 90%"),
    ],
)
def test_boxes_exactly_at_the_limits_pass_and_one_pixel_beyond_warns(
    shape: tuple[int, int], box: tuple[int, int, int, int], reason: str | None
) -> None:
    text = box_warning(shape, box)
    if reason is None:
        assert text == ""
    else:
        assert reason in text and text.count("(") == 1  # that one reason only


def test_a_box_partly_outside_warns_on_its_part_inside_while_roi_box_refuses_it() -> None:
    text = box_warning(SHAPE, (40, 40, 30, 30))
    assert "reaches outside the image" in text and "24x8 px inside the image" in text
    assert "shorter side is under" in text  # the 8 px that lie inside
    assert "reaches outside" in box_warning(SHAPE, (-1, 0, 40, 40))
    assert "0x0 px inside the image, 0% of" in box_warning(SHAPE, (100, 100, 20, 20))
    # The prediction path never gets there: a box from the roi column that reaches outside is an error.
    with pytest.raises(RoiError, match="extends outside the 64x48 image"):
        roi_box({"image": "a.png", "roi": OUTSIDE}, Path("."), SHAPE, RoiPolicy("box"))
    with pytest.raises(RoiError, match="empty image"):
        box_warning((0, 10), (0, 0, 1, 1))


def test_the_box_judged_is_the_lesion_box_before_the_margin(tmp_path: Path) -> None:
    row = {"image": "a.png", "roi": "10,10,20,20"}
    assert lesion_box(row, tmp_path, SHAPE, RoiPolicy("box", 0.5)) == (10, 10, 20, 20)
    assert roi_box(row, tmp_path, SHAPE, RoiPolicy("box", 0.5)) == (0, 0, 40, 40)
    assert lesion_box(row, tmp_path, SHAPE, RoiPolicy("whole")) is None
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[5:9, 7:10] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    assert lesion_box({"mask": "m.png", "roi": "10,10,20,20"}, tmp_path, SHAPE, RoiPolicy("mask")) == (7, 5, 3, 4)


# ------------------------------------------------------------------------------------------ predict_inputs, CLI
@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Packages cropping to the lesion box, to the mask, and seeing the whole image; a 64 x 48 image, a mask of it
    with a 4 x 3 px lesion."""
    root = tmp_path_factory.mktemp("box_warnings")
    make_package(root / "box", PreprocessSpec(size=32, roi=RoiPolicy("box", margin=0.1)))
    make_package(root / "mask", PreprocessSpec(size=32, roi=RoiPolicy("mask", margin=0.1)), seed=1)
    make_package(root / "whole", PreprocessSpec(size=32), seed=2)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, size=SHAPE).astype(np.uint8)).save(root / "a.png")
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[20:23, 30:34] = 255
    Image.fromarray(mask).save(root / "speck.png")
    return root


def _rows(data: Path, rois: list[str], masks: list[str] | None = None) -> pd.DataFrame:
    per_image = {"roi": rois, **({"mask": masks} if masks else {})}
    return collect_inputs([str(data / "a.png")] * len(rois), per_image=per_image)


def test_predict_inputs_warns_for_an_implausible_box_and_still_predicts(data: Path) -> None:
    got = Predictor(data / "box", device="cpu").predict_inputs(_rows(data, [GOOD, TINY, WHOLE_IMAGE, OUTSIDE]))
    assert list(got.columns)[-3:] == ["engine", "error", "warning"]
    assert got["warning"].iloc[0] == "" and got["error"].iloc[0] == ""
    assert got["warning"].iloc[1].startswith(f"implausible lesion box {TINY}: 3x3 px, 0.293% of the 64x48 image")
    assert "covers over 90%" in got["warning"].iloc[2]
    assert got["error"].iloc[1:3].tolist() == ["", ""] and np.isfinite(got["prob"].iloc[:3]).all()
    # A box outside the image is an error (as before), not also a warning.
    assert "extends outside" in got["error"].iloc[3] and got["warning"].iloc[3] == ""


def test_a_masks_bounding_box_is_judged_too(data: Path) -> None:
    got = Predictor(data / "mask", device="cpu").predict_inputs(_rows(data, [""], [str(data / "speck.png")]))
    warning = got["warning"].iloc[0]
    assert got["error"].iloc[0] == "" and np.isfinite(got["prob"].iloc[0])
    assert warning.startswith("implausible lesion mask's bounding box 30,20,4,3: 4x3 px")
    assert got["mask"].iloc[0] == str(data / "speck.png")  # the row says which lesion it is, as a roi would


def test_the_output_names_a_mask_as_it_was_written(data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As `image` keeps the path the user typed, so does `mask`: relative on the command line (from the working folder)
    and in a manifest (from the manifest's folder); the file read is the same in both."""
    monkeypatch.chdir(data)
    predictor = Predictor(data / "mask", device="cpu")
    typed = predictor.predict_inputs(collect_inputs(["a.png"], per_image={"mask": ["speck.png"]}))
    (data / "list.csv").write_text("image,mask\na.png,speck.png\n", encoding="utf-8")
    listed = predictor.predict_inputs(collect_inputs(manifest=data / "list.csv"))
    for got in (typed, listed):
        assert got["error"].iloc[0] == ""
        assert (got["image"].iloc[0], got["mask"].iloc[0]) == ("a.png", "speck.png")
    assert typed["prob"].iloc[0] == listed["prob"].iloc[0]


def test_a_mask_is_decoded_once_per_image_and_crops_as_before(data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The warning and the crop share one decode of the mask; the input is the one `preprocess` makes from the mask."""
    import alnus.data.masks as masks

    predictor = Predictor(data / "mask", device="cpu")
    image = np.asarray(Image.open(data / "a.png"))
    spec = predictor.networks[0].spec
    expected = predictor.predict_arrays([image], rows=[{"mask": "speck.png"}], root=data)
    decoded: list[str] = []
    real = masks.load_image
    monkeypatch.setattr(masks, "load_image", lambda path, **kw: decoded.append(str(path)) or real(path, **kw))
    got = predictor.predict_inputs(_rows(data, [""], [str(data / "speck.png")]))
    assert decoded == [str(data / "speck.png")]
    assert np.allclose(got["prob"].to_numpy(), expected[0], atol=1e-6)
    assert got["warning"].str.startswith("implausible lesion mask's bounding box 30,20,4,3").all()
    assert spec.roi.mode == "mask"


def test_a_drawn_box_that_disagrees_with_the_mask_warns_for_either_roi_mode(data: Path) -> None:
    """Both given and marking different places: the model crops to one of them, and says which (new-user review)."""
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[10:40, 10:50] = 255  # bounding box 10,10,40,30
    Image.fromarray(mask).save(data / "lesion.png")
    far, same = "40,20,20,20", "10,10,40,30"
    for mode, used in (("box", "the drawn box"), ("mask", "the mask")):
        got = Predictor(data / mode, device="cpu").predict_inputs(
            _rows(data, [far, same], [str(data / "lesion.png")] * 2)
        )
        assert got["error"].tolist() == ["", ""] and np.isfinite(got["prob"]).all()
        assert (
            got["warning"]
            .iloc[0]
            .startswith(f"the lesion box {far} and the mask's bounding box 10,10,40,30 disagree (overlap ")
        ), got["warning"].iloc[0]
        assert f"the model cropped to {used} (ROI mode {mode})" in got["warning"].iloc[0]
        assert got["warning"].iloc[1] == ""


def test_a_package_seeing_the_whole_image_never_warns(data: Path) -> None:
    got = Predictor(data / "whole", device="cpu").predict_inputs(_rows(data, [TINY, WHOLE_IMAGE]))
    assert got["warning"].tolist() == ["", ""] and np.isfinite(got["prob"]).all()


def test_an_ensemble_warns_once_per_image(data: Path) -> None:
    """A box network and a mask network (as an ensemble's members): both crop to the same box, one warning."""
    ensemble = Predictor(data / "box", device="cpu")
    ensemble.networks = [*ensemble.networks, *Predictor(data / "mask", device="cpu").networks]
    got = ensemble.predict_inputs(_rows(data, [TINY, GOOD]))
    assert got["warning"].iloc[0].count("implausible") == 1 and got["warning"].iloc[1] == ""
    # Box first for the box network, the mask first for the mask network: two different boxes, each judged.
    both = ensemble.predict_inputs(_rows(data, [WHOLE_IMAGE], [str(data / "speck.png")]))["warning"].iloc[0]
    assert "implausible lesion box 0,0,64,48" in both and "implausible lesion mask's bounding box 30,20,4,3" in both


def _predict(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["predict", *args, "--device", "cpu"], env={"COLUMNS": "200"})
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def test_alnus_predict_prints_the_warning_and_still_predicts(data: Path) -> None:
    image = str(data / "a.png")
    code, stdout, stderr = _predict(str(data / "box"), image, "--roi", TINY)
    said = " ".join(stderr.split())
    table = pd.read_csv(io.StringIO(stdout), keep_default_na=False)
    assert code == 0 and 0 < float(table["prob"].iloc[0]) < 1
    assert f"warning: {image}: implausible lesion box {TINY}: 3x3 px" in said and BOX_ADVICE in said
    assert table["warning"].iloc[0].startswith("implausible lesion box")

    # The terminal's table keeps the warning to the box it names; the reasons are on stderr (new-user review).
    code, stdout, stderr = _predict(str(data / "box"), image, "--roi", TINY, "--format", "table")
    assert code == 0 and f"implausible lesion box {TINY}" in stdout and "3x3 px" not in stdout
    assert "3x3 px" in stderr

    code, stdout, stderr = _predict(str(data / "box"), image, "--roi", GOOD, "--format", "json")
    assert code == 0 and "warning:" not in stderr and "implausible" not in stderr
    assert json.loads(stdout)["warning"] == ""


# ------------------------------------------------------------------------------------------------- the service
def _post(client: object, roi: str) -> dict:
    content = png_bytes(grey_image())  # 80 x 60
    files = {"image": ("scan.png", content, "image/png")}
    response = client.post("/v1/predict", files=files, data={"roi": roi, "heatmap": "false"}, headers=AUTH)
    assert response.status_code == 200, response.text
    return response.json()


def test_the_service_answers_with_the_warning(data: Path, tmp_path: Path) -> None:
    client = client_for(Predictor(data / "box", device="cpu", batch_size=1), tmp_path)
    tiny = _post(client, "1,1,3,3")
    assert tiny["warning"].startswith("implausible lesion box 1,1,3,3: 3x3 px, 0.188% of the 80x60 image")
    assert isinstance(tiny["probability"], float) and "upload" not in tiny["warning"]
    assert "covers over 90%" in _post(client, "0,0,80,60")["warning"]
    assert _post(client, "20,10,30,25")["warning"] is None
    whole = client_for(Predictor(data / "whole", device="cpu", batch_size=1), tmp_path / "whole")
    assert _post(whole, "1,1,3,3")["warning"] is None


def test_the_page_shows_the_warning_as_text_next_to_the_result() -> None:
    page = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    script = (STATIC_DIR / "app.js").read_text(encoding="utf-8")
    result = page[page.index('<div id="result"') : page.index('id="heatmap-figure"')]
    assert 'id="box-warning"' in result and 'role="alert"' in result
    # Set through `say` (textContent, never HTML), shown only when the answer has one.
    assert 'say("box-warning", result.warning ?' in script and 'show("box-warning", Boolean(result.warning))' in script


def test_a_patients_other_images_say_their_call_includes_an_implausible_box():
    from alnus.predict import _case_warnings

    out = pd.DataFrame({"image": ["a.png", "b.png", "c.png", "d.png"], "patient_id": ["P1", "P1", "P2", "P1"]})
    warned = ["implausible lesion box ...", "", "", ""]
    ok = np.array([True, True, True, False])  # d.png failed: no call, no note
    point = {"level": "patient"}
    got = _case_warnings(out, warned, ok, point)
    assert got[0] == warned[0] and got[2] == "" and got[3] == ""
    assert got[1] == "this patient's call also uses a.png (row 1), whose lesion box has a warning (see its row)"
    assert _case_warnings(out, warned, ok, {"level": "image"}) == warned
    # One image listed twice (two lesions' masks): the note names the other row, not the image alone.
    twice = pd.DataFrame({"image": ["a.png", "a.png"], "patient_id": ["P1", "P1"]})
    got = _case_warnings(twice, ["box does not match its mask", ""], np.array([True, True]), point)
    assert got[1] == "this patient's call also uses a.png (row 1), whose lesion box has a warning (see its row)"
    assert _case_warnings(out, warned, ok, None) == warned
