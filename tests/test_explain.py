"""Heat maps (issue 8.1) and their faithfulness (issue 8.2): every backbone, original coordinates, errors, the CLI."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from alnus._levels import patients_first
from alnus.cli import app
from alnus.config import load_config
from alnus.data.dataset import PreprocessSpec, _to_tensor, letterbox_box, preprocess
from alnus.data.phantom import make_phantom, render_case, sample_case
from alnus.data.roi import RoiPolicy
from alnus.evaluate import evaluate_run
from alnus.explain import (
    INDEX_COLUMNS,
    METHODS,
    ExplainError,
    Explanation,
    PositiveLogit,
    crop_baselines,
    deletion_of,
    deletion_score,
    energy_share,
    explain_images,
    explain_run,
    gaussian_map,
    heatmap_to_image,
    heatmaps,
    random_map,
    select_cases,
)
from alnus.models import create_model, get_spec, list_backbones
from alnus.models.package import save_package
from alnus.models.registry import UltrasoundNet
from alnus.operating_point import apply_operating_point
from alnus.predict import Predictor, predict_run
from alnus.runfolder import RunFolder, RunLockedError, lock_run
from alnus.study import prepare_run
from alnus.train import train_model

runner = CliRunner()
# The lesion model fixture: package folder, data root, held-out rows (image, mask), their masks.
LesionModel = tuple[Path, Path, pd.DataFrame, list[np.ndarray]]
LIME = (60, 255, 60)
CYAN = (0, 200, 255)


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def _input_size(name: str) -> int:
    # Small, but large enough for a feature map of at least 2 x 2 at each backbone's CAM layer.
    return 107 if get_spec(name).input_size >= 299 else 64


def _package(folder: Path, spec: PreprocessSpec, model: UltrasoundNet | None = None) -> Path:
    torch.manual_seed(0)
    net = model if model is not None else create_model("tiny_cnn")
    metadata = {"preprocess": spec.to_dict(), "label_names": ["negative", "positive"], "positive_label": "positive"}
    save_package(folder, net, metadata)
    return folder


def _png(path: Path, array: np.ndarray) -> str:
    """Write a PNG; return its path relative to the folder above its own (the rows' root)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return f"{path.parent.name}/{path.name}"


# ------------------------------------------------------------------------------------------------ heatmaps()
@pytest.mark.parametrize("name", list_backbones())
def test_every_registered_backbone_gives_heat_maps_and_releases_its_hooks(name: str) -> None:
    """Issue 8.1: Grad-CAM at each backbone's registry CAM layer, (B, H, W) in [0, 1]; hooks, mode, grads restored."""
    torch.manual_seed(0)
    model = create_model(name).train()
    with torch.no_grad():
        # Positive head weights over post-activation features: positive evidence wherever a feature fires.
        model.classifier().weight.abs_()
    size = _input_size(name)
    maps = heatmaps(model, torch.rand(2, 1, size, size), method="gradcam")
    assert maps.shape == (2, size, size) and maps.dtype == np.float32
    assert np.isfinite(maps).all() and maps.min() >= 0.0 and maps.max() <= 1.0
    assert maps.reshape(2, -1).max(axis=1).min() > 0.0
    assert _hooks(model) == 0
    assert model.training  # the mode the caller left it in
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_batched_on_tiny_cnn(method: str) -> None:
    """Issue 8.1: Grad-CAM, Grad-CAM++ and the gradient-free EigenCAM and Score-CAM, in chunks of `batch_size`."""
    torch.manual_seed(0)
    model = create_model("tiny_cnn")
    batch = torch.rand(5, 1, 32, 32)
    maps = heatmaps(model, batch, method=method, batch_size=2)
    assert maps.shape == (5, 32, 32) and 0.0 <= maps.min() and maps.max() <= 1.0
    # Batched or one by one: the same maps.
    np.testing.assert_allclose(maps[3], heatmaps(model, batch[3:4], method=method)[0], atol=1e-5)
    assert _hooks(model) == 0


def test_heat_maps_work_inside_inference_mode() -> None:
    """Issue 8.1: a service calls heat maps inside inference code; gradients are switched on for the call."""
    model = create_model("tiny_cnn").eval()
    with torch.inference_mode():
        batch = torch.rand(2, 1, 32, 32)
        maps = heatmaps(model, batch)
    assert maps.shape == (2, 32, 32) and maps.max() > 0


def test_concurrent_score_cam_calls_leave_the_library_as_it_was() -> None:
    """Score-CAM's progress bar is hidden by swapping a name in the library; threads (the service) must not leave it
    swapped for good or restore it while another call still runs."""
    from concurrent.futures import ThreadPoolExecutor

    from pytorch_grad_cam import score_cam

    original = score_cam.tqdm
    # One model per call: CAM hooks on a shared model would catch each other's activations (the service runs one
    # inference at a time for that reason).
    models = [create_model("tiny_cnn").eval() for _ in range(8)]
    batch = torch.rand(2, 1, 32, 32)
    with ThreadPoolExecutor(max_workers=4) as pool:
        maps = list(pool.map(lambda model: heatmaps(model, batch, method="scorecam"), models))
    assert all(m.shape == (2, 32, 32) for m in maps)
    assert score_cam.tqdm is original


def _manual_cam(model: UltrasoundNet, batch: torch.Tensor) -> np.ndarray:
    """Grad-CAM of a global-average-pooled linear head, by hand: ReLU(sum_c w_c A_c), upsampled, scaled to max 1."""
    features = model.backbone.features(((batch.expand(-1, 3, -1, -1)) - model.mean) / model.std)
    weights = model.backbone.classifier.weight[0]
    cam = torch.relu(torch.einsum("c,bchw->bhw", weights, features))[:, None]
    up = F.interpolate(cam, size=batch.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    up = up - up.amin(dim=(1, 2), keepdim=True)
    return (up / up.amax(dim=(1, 2), keepdim=True).clamp_min(1e-7)).detach().numpy()


def test_the_target_is_the_positive_class_logit() -> None:
    """Issue 8.1: the one-logit head's logit is the target: the map is Grad-CAM by hand, and follows the sign."""
    torch.manual_seed(1)
    model = create_model("tiny_cnn").eval()
    batch = torch.rand(3, 1, 64, 64)
    ours = heatmaps(model, batch)
    manual = _manual_cam(model, batch)
    for a, b in zip(ours, manual, strict=True):
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99
    with torch.no_grad():
        model.backbone.classifier.weight.neg_()
    negated = heatmaps(model, batch)
    for a, b in zip(negated, _manual_cam(model, batch), strict=True):
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99
    assert not np.allclose(ours, negated, atol=0.1)


def test_a_two_logit_head_is_refused_and_the_hooks_are_still_released() -> None:
    """Issue 8.1: heat maps explain a one-logit head; another is an error, never a map of the wrong class."""
    model = create_model("tiny_cnn", num_classes=2)
    with pytest.raises(ExplainError, match="one-logit head"):
        heatmaps(model, torch.rand(2, 1, 32, 32))
    assert _hooks(model) == 0
    with pytest.raises(ExplainError, match="one-logit"):
        PositiveLogit()(torch.zeros(2))


def test_an_unknown_method_names_the_choices() -> None:
    """Issue 8.1: an unsupported method is a clear error listing the methods."""
    with pytest.raises(ExplainError, match=r"unknown heat-map method 'lime'.*gradcam, gradcam\+\+, eigencam, scorecam"):
        heatmaps(create_model("tiny_cnn"), torch.rand(1, 1, 32, 32), method="lime")


def test_a_bad_layer_names_the_backbone_and_valid_modules() -> None:
    """Issue 8.1: an explicit layer that does not exist, a registry cam_layer that is wrong, a layer without a map."""
    model = create_model("resnet18")
    with pytest.raises(ExplainError, match=r"layer 'layer9' is not a module of backbone 'resnet18'.*layer3, layer4"):
        heatmaps(model, torch.rand(1, 1, 32, 32), layer="layer9")
    spec = dataclasses.replace(get_spec("tiny_cnn"), cam_layer="features.9")
    broken = UltrasoundNet(spec, create_model("tiny_cnn").backbone)
    with pytest.raises(
        ExplainError, match=r"registry's cam_layer 'features.9'.*'tiny_cnn'.*features, pool, classifier"
    ):
        heatmaps(broken, torch.rand(1, 1, 32, 32))
    with pytest.raises(ExplainError, match=r"layer 'classifier' of backbone 'tiny_cnn'.*\(B, C, h, w\) feature map"):
        heatmaps(create_model("tiny_cnn"), torch.rand(1, 1, 32, 32), layer="classifier")


# -------------------------------------------------------------------------------------- original coordinates
def test_heat_is_mapped_back_through_the_letterbox_and_the_crop() -> None:
    """Issue 8.1: undo letterbox + crop; the padding's heat is dropped and outside the crop there is none."""
    crop = (34, 6, 42, 28)  # x, y, w, h in a 60 x 100 image
    box = letterbox_box((crop[3], crop[2]), 32)
    full = heatmap_to_image(np.ones((32, 32), np.float32), crop, box, (60, 100))
    inside = np.zeros((60, 100), bool)
    inside[6:34, 34:76] = True
    assert np.all(full[inside] == pytest.approx(1.0)) and np.all(full[~inside] == 0.0)
    padding_only = np.zeros((32, 32), np.float32)
    padding_only[: box[0]] = 1.0  # the band above the letterboxed crop
    assert heatmap_to_image(padding_only, crop, box, (60, 100)).max() == 0.0
    stretched = heatmap_to_image(np.ones((32, 32), np.float32), crop, (0, 0, 32, 32), (60, 100))
    assert np.array_equal(stretched > 0, inside)


def _overlay_pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_explanations_lie_on_the_original_image_with_the_lesion_box_drawn(tmp_path: Path) -> None:
    """Issue 8.1: a synthetic image with a known ROI: heat only inside the crop, crop and lesion boxes in place."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (60, 100), dtype=np.uint8)
    rel = _png(tmp_path / "images" / "a.png", image)
    package = _package(tmp_path / "pkg", PreprocessSpec(size=32, roi=RoiPolicy("box", margin=0.2)))
    rows = pd.DataFrame({"image": [rel], "roi": ["40,10,30,20"]})
    (e,) = explain_images(package, rows, tmp_path, method="gradcam", device="cpu")
    assert e.image.shape == (60, 100) and np.array_equal(e.image, image)
    assert e.crop_box == (34, 6, 42, 28)  # the roi grown by 20% of its width and height on each side
    assert e.lesion_box == (40, 10, 30, 20) and e.lesion_mask is None
    outside = np.ones((60, 100), bool)
    outside[6:34, 34:76] = False
    assert e.heatmap[outside].max() == 0.0 and e.heatmap[~outside].max() > 0.0
    assert 0.0 <= e.prob <= 1.0 and e.energy_in_roi is not None
    pixels = _overlay_pixels(e.overlay_png())
    assert tuple(pixels[10, 55]) == LIME and tuple(pixels[29, 40]) == LIME  # lesion box: top and bottom edges
    assert tuple(pixels[6, 50]) == CYAN and tuple(pixels[20, 75]) == CYAN  # crop box: top and right edges
    grey = pixels[50, 5]
    assert grey[0] == grey[1] == grey[2] == image[50, 5]  # no heat outside the crop: the image as it was
    small = Image.open(io.BytesIO(e.overlay_png(width=50)))
    assert small.size == (50, 30)


def test_a_mask_is_outlined_and_measures_the_energy(tmp_path: Path) -> None:
    """Issue 8.1: with a lesion mask the outline is drawn and energy_in_roi is the share of heat inside the mask."""
    image = np.full((48, 64), 120, np.uint8)
    mask = np.zeros((48, 64), np.uint8)
    mask[14:30, 20:44] = 255
    rows = pd.DataFrame(
        {"image": [_png(tmp_path / "im" / "a.png", image)], "mask": [_png(tmp_path / "masks" / "a.png", mask)]}
    )
    package = _package(tmp_path / "pkg", PreprocessSpec(size=32, roi=RoiPolicy("whole")))
    (e,) = explain_images(package, rows, tmp_path, method="eigencam", device="cpu")
    assert e.crop_box == (0, 0, 64, 48) and e.lesion_box == (20, 14, 24, 16)
    assert e.energy_in_roi == pytest.approx(energy_share(e.heatmap, mask > 0))
    pixels = _overlay_pixels(e.overlay_png())
    assert tuple(pixels[14, 30]) == LIME and tuple(pixels[22, 20]) == LIME  # the mask's top and left edges
    assert tuple(pixels[22, 30]) != LIME  # inside the mask: not painted over


def test_a_mask_of_another_size_names_the_row(tmp_path: Path) -> None:
    """Issue 8.1: bad input is an error naming the row and the file, not a traceback."""
    rows = pd.DataFrame(
        {
            "image": [_png(tmp_path / "im" / "a.png", np.zeros((48, 64), np.uint8))],
            "mask": [_png(tmp_path / "masks" / "a.png", np.zeros((40, 64), np.uint8))],
        }
    )
    package = _package(tmp_path / "pkg", PreprocessSpec(size=32, roi=RoiPolicy("whole")))
    with pytest.raises(ExplainError, match=r"row 1 \(image 'im/a.png'\).*mask masks/a.png"):
        explain_images(package, rows, tmp_path, device="cpu")


# -------------------------------------------------------------------------------------------- faithfulness
def test_energy_share_and_the_baselines() -> None:
    """Issue 8.2: energy share of a map inside a region; the Gaussian is centred, the random map matches area."""
    region = np.zeros((40, 60), bool)
    region[10:30, 15:45] = True
    assert energy_share(region.astype(float), region) == 1.0
    assert energy_share(np.zeros((40, 60)), region) is None
    gauss = gaussian_map((40, 60))
    assert gauss.shape == (40, 60) and np.unravel_index(gauss.argmax(), gauss.shape) in {(19, 29), (20, 30)}
    assert energy_share(random_map((40, 60), np.random.default_rng(0)), region) == pytest.approx(0.25, abs=0.02)


class _RegionModel(nn.Module):
    """A 'model' whose logit is the brightness of a known region: the pixels that matter are known."""

    def __init__(self, region: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("region", region)
        self.scale = nn.Parameter(torch.tensor(8.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inside = (x[:, 0] * self.region).sum((1, 2)) / self.region.sum()
        return self.scale * (inside - 0.5)


def test_deletion_score_rewards_a_map_of_the_pixels_that_matter() -> None:
    """Issue 8.2: blurring the hottest pixels drops the confidence more than random ones, for a map that is right."""
    region = torch.zeros(32, 32)
    region[8:16, 8:16] = 1.0
    model = _RegionModel(region)
    batch = torch.rand(4, 1, 32, 32) * 0.2 + region * 0.8
    right = np.repeat(region.numpy()[None], 4, axis=0)
    wrong = 1.0 - right
    good = deletion_score(model, batch, right, fraction=0.1)
    bad = deletion_score(model, batch, wrong, fraction=0.1)
    assert good.top_drop.shape == (4,) and good.score > 0.1
    assert bad.score < good.score / 4
    with pytest.raises(ExplainError, match="fraction"):
        deletion_score(model, batch, right, fraction=1.5)


def _lesion_phantom(n: int, seed: int) -> tuple[list[np.ndarray], list[np.ndarray], list[int]]:
    """Phantom frames whose class signal lies only inside the lesion, at a varied place.

    Positive: a hypoechoic lesion; negative: an isoechoic one (the mask is still drawn). No posterior shadowing (a
    model would rightly look below the lesion for it, outside the mask), and each frame is a random 64 x 80 window of
    a larger one, because the generator places lesions near the middle, where a centred Gaussian would find them.
    """
    rng = np.random.default_rng(seed)
    images, masks, labels = [], [], []
    for i in range(n):
        positive = i % 2 == 0
        case = sample_case(rng, positive)
        latent = (case.latent[0], case.latent[1], 2.0 if positive else -3.0, 0.0, case.latent[4])
        case = dataclasses.replace(case, latent=latent)
        while True:
            image, mask = render_case(case, rng, image_size=(96, 128))
            y0, x0 = int(rng.integers(0, 33)), int(rng.integers(0, 49))
            if (mask[y0 : y0 + 64, x0 : x0 + 80] > 0).sum() >= 0.9 * (mask > 0).sum():
                break
        images.append(image[y0 : y0 + 64, x0 : x0 + 80].copy())
        masks.append(mask[y0 : y0 + 64, x0 : x0 + 80].copy())
        labels.append(int(positive))
    return images, masks, labels


def _train(model: UltrasoundNet, x: torch.Tensor, y: torch.Tensor, epochs: int) -> None:
    torch.manual_seed(0)
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(32):
            batch = x[idx]
            batch = torch.where(torch.rand(len(idx), 1, 1, 1) < 0.5, batch.flip(-1), batch)
            loss = F.binary_cross_entropy_with_logits(model(batch), y[idx])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    model.eval()


@pytest.fixture(scope="module")
def lesion_model(tmp_path_factory: pytest.TempPathFactory) -> LesionModel:
    """A tiny_cnn that learnt the lesion (whole frames, 96 px input), packaged, and held-out frames on disk."""
    root = tmp_path_factory.mktemp("lesions")
    images, masks, labels = _lesion_phantom(160, seed=0)
    spec = PreprocessSpec(size=96, roi=RoiPolicy("whole"))
    x = torch.stack([_to_tensor(preprocess(im, {}, root, spec)) for im in images])
    y = torch.tensor(labels, dtype=torch.float32)
    torch.manual_seed(0)
    model = create_model("tiny_cnn")
    _train(model, x[:120], y[:120], epochs=10)
    package = _package(root / "pkg", spec, model)
    held_out = [i for i in range(120, 160) if labels[i] == 1]
    rows = pd.DataFrame(
        {
            "image": [_png(root / "images" / f"{i}.png", images[i]) for i in held_out],
            "mask": [_png(root / "masks" / f"{i}.png", masks[i]) for i in held_out],
        }
    )
    return package, root, rows, [masks[i] > 0 for i in held_out]


@pytest.fixture(scope="module")
def lesion_explanations(lesion_model: LesionModel) -> dict[str, list[Explanation]]:
    package, root, rows, _ = lesion_model
    predictor = Predictor(package, device="cpu", precision="fp32")
    return {m: explain_images(predictor, rows, root, method=m) for m in ("gradcam", "gradcam++")}


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_heat_falls_on_the_lesion_more_than_a_centred_gaussian_or_noise(
    lesion_explanations: dict[str, list[Explanation]], method: str
) -> None:
    """Issue 8.2: on phantom frames, the share of heat inside the lesion mask clearly beats both baselines.

    Measured on held-out positives through the public path (package -> original coordinates). The CAM grid of
    tiny_cnn's last block is 6 x 6 at a 96 px input: a perfect map at that resolution cannot put all its energy
    in a mask of a few percent of the frame, so the margins asked for are ratios, not absolute shares.
    """
    explanations = lesion_explanations[method]
    rng = np.random.default_rng(0)
    ours, gauss, noise = [], [], []
    for e in explanations:
        baselines = crop_baselines(e, rng)
        ours.append(e.energy_in_roi)
        gauss.append(energy_share(baselines["gaussian"], e.lesion_mask))
        noise.append(energy_share(baselines["random"], e.lesion_mask))
    ours, gauss, noise = (np.array(v, dtype=float) for v in (ours, gauss, noise))
    assert np.isfinite(ours).all() and len(ours) >= 15
    assert ours.mean() >= 1.25 * gauss.mean()
    assert ours.mean() >= 2.0 * noise.mean()
    assert (ours > gauss).mean() >= 0.7  # per image, not only on average


def test_deleting_the_hottest_pixels_drops_the_confidence_more_than_random_ones(
    lesion_model: LesionModel, lesion_explanations: dict[str, list[Explanation]]
) -> None:
    """Issue 8.2: the deletion check on the model that learnt the lesion, with the letterbox padding left alone."""
    predictor = Predictor(lesion_model[0], device="cpu", precision="fp32")
    score = deletion_of(predictor.model, lesion_explanations["gradcam"], fraction=0.1)
    assert score.top_drop.shape == (len(lesion_explanations["gradcam"]),)
    assert score.score > 0.02 and score.top_drop.mean() > 2 * score.random_drop.mean()


def test_baselines_cover_the_crop_the_network_saw(tmp_path: Path) -> None:
    """Issue 8.2: with an ROI crop, the baselines lie over the crop (like the heat), centred on it, zero outside."""
    rel = _png(tmp_path / "images" / "a.png", np.full((60, 100), 90, np.uint8))
    package = _package(tmp_path / "pkg", PreprocessSpec(size=32, roi=RoiPolicy("box", margin=0.0)))
    (e,) = explain_images(package, pd.DataFrame({"image": [rel], "roi": ["40,10,31,21"]}), tmp_path, device="cpu")
    baselines = crop_baselines(e, np.random.default_rng(0))
    for name in ("gaussian", "random"):
        assert baselines[name].shape == (60, 100)
        assert baselines[name][:10].max() == 0.0 and baselines[name][:, :40].max() == 0.0
    assert np.unravel_index(baselines["gaussian"].argmax(), (60, 100)) == (20, 55)


# ------------------------------------------------------------------------------------------------ run folder
def test_select_cases_takes_a_few_of_each_outcome_most_confident_first() -> None:
    """Issue 8.1: up to n images, outcomes in turn (TP, FP, FN, TN), the most confident of each first."""
    table = pd.DataFrame(
        {
            "image": [f"i{k}" for k in range(10)],
            "y": [1, 1, 1, 0, 0, 1, 0, 0, 0, 0],
            "call": [1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
            "prob": [0.9, 0.7, 0.95, 0.8, 0.6, 0.3, 0.1, 0.05, 0.2, 0.15],
        }
    )
    chosen = select_cases(table, 6)
    assert list(chosen["outcome"]) == ["TP", "TP", "FP", "FP", "FN", "TN"]
    assert list(chosen["image"]) == ["i2", "i0", "i3", "i4", "i5", "i7"]
    assert list(select_cases(table, 3)["outcome"]) == ["TP", "FP", "FN"]


def test_select_cases_shows_other_patients_before_a_patients_second_image() -> None:
    """New-user review: the report's gallery showed one patient twice among three true positives."""
    table = pd.DataFrame({
        "image": [f"i{k}" for k in range(6)],
        "patient_id": ["A", "A", "A", "B", "", ""],  # an image without a patient id is its own patient
        "y": [1] * 6,
        "call": [1] * 6,
        "prob": [0.99, 0.98, 0.97, 0.6, 0.5, 0.4],
    })  # fmt: skip
    assert list(select_cases(table, 4)["image"]) == ["i0", "i3", "i4", "i5"]
    assert list(patients_first(table.iloc[::-1])["image"]) == ["i5", "i4", "i3", "i2", "i1", "i0"]
    assert list(patients_first(table)["image"]) == ["i0", "i3", "i4", "i5", "i1", "i2"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A phantom run: split, tiny_cnn trained for 2 epochs at 32 px on box crops, predicted, evaluated."""
    root = tmp_path_factory.mktemp("explain_run")
    manifest = make_phantom(root / "data", patients=30, external_patients=12, image_size=(64, 80), seed=2)
    config = root / "study.yaml"
    config.write_text(
        "name: explain\n"
        f"runs_dir: {root / 'runs'}\n"
        f"data: {{manifest: {manifest}, labels: [negative, positive], external_sites: [external_hospital]}}\n"
        "models: [tiny_cnn]\n"
        "preprocess: {size: 32, roi: box}\n"
        "train: {weights: none, epochs: 2, batch_size: 16, precision: fp32, early_stopping_patience: null}\n"
    )
    cfg = load_config(config)
    run_dir = prepare_run(cfg)
    train_model(cfg, run_dir, "tiny_cnn")
    predict_run(run_dir, models=["tiny_cnn"], device="cpu", precision="fp32")
    evaluate_run(run_dir, models=["tiny_cnn"], n_boot=50)
    return run_dir


def test_alnus_explain_writes_overlays_and_an_index(tiny_run: Path) -> None:
    """Issue 8.1: `alnus explain RUN` writes heatmaps/<model>/<split>/ with one PNG per image and index.csv."""
    result = runner.invoke(app, ["explain", str(tiny_run), "--n", "8", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    folder = RunFolder(tiny_run).heatmaps_for("tiny_cnn", "external_test")
    assert "heatmaps" in result.output and "external_test" in result.output
    index = pd.read_csv(folder / "index.csv", dtype={"image": str})
    assert tuple(index.columns) == INDEX_COLUMNS and 1 <= len(index) <= 8
    assert set(index["outcome"]) <= {"TP", "FP", "FN", "TN"} and set(index["method"]) == {"gradcam"}
    assert sorted(p.name for p in folder.glob("*.png")) == sorted(index["png"])
    for name in index["png"]:
        assert Image.open(folder / name).format == "PNG"
    assert index["energy_in_roi"].between(0, 1).all()  # the phantom has lesion masks
    # The calls are the frozen threshold's, applied as it was frozen, to the run's predictions.
    predictor = Predictor(RunFolder(tiny_run).model("tiny_cnn").package, device="cpu")
    predictions = pd.read_csv(RunFolder(tiny_run).model("tiny_cnn").predictions_csv("external_test"), dtype=str)
    predictions["prob"] = predictions["prob"].astype(float)
    calls = apply_operating_point(predictions, predictor.operating_point)
    expected = dict(zip(predictions["image"], calls["call"], strict=True))
    assert all(int(c) == expected[im] for im, c in zip(index["image"], index["call"], strict=True))
    y, call = index["y"].to_numpy(), index["call"].to_numpy()
    assert ((index["outcome"] == "TP") == ((y == 1) & (call == 1))).all()
    # Another method replaces the split's maps, and says so (new-user review: it used to do it silently).
    other = runner.invoke(app, ["explain", str(tiny_run), "--n", "2", "--device", "cpu", "--method", "eigencam"])
    assert other.exit_code == 0 and "replacing the gradcam heat maps" in " ".join(other.output.split())
    # A smaller second call leaves no overlay of the first behind.
    assert runner.invoke(app, ["explain", str(tiny_run), "--n", "2", "--device", "cpu"]).exit_code == 0
    assert len(list(folder.glob("*.png"))) == 2 and len(pd.read_csv(folder / "index.csv")) == 2
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]
    # As readable as the rest of the run (new-user review: mkdtemp made the folders private).
    assert folder.stat().st_mode & 0o777 == RunFolder(tiny_run).figures.parent.stat().st_mode & 0o777


def test_alnus_explain_says_the_report_shows_the_earlier_maps_until_rebuilt(tiny_run: Path) -> None:
    """A new user's review: after `alnus explain RUN` the report still showed the earlier heat maps, and nothing said
    so (`alnus evaluate` says it of its numbers)."""
    report = RunFolder(tiny_run).report
    assert not report.exists()
    quiet = runner.invoke(app, ["explain", str(tiny_run), "--n", "2", "--device", "cpu"])
    assert quiet.exit_code == 0 and "rebuilds it" not in quiet.output  # no report yet: nothing to say
    report.write_text("<html></html>", encoding="utf-8")
    try:
        result = runner.invoke(app, ["explain", str(tiny_run), "--n", "2", "--device", "cpu"])
    finally:
        report.unlink()
    said = " ".join(result.output.split())
    assert result.exit_code == 0 and f"still shows the earlier heat maps; `alnus report {tiny_run}` rebuilds it" in said


def test_alnus_explain_errors_are_clear(tiny_run: Path) -> None:
    """Issue 8.1: an unknown method or split names the choices; a busy run folder is refused."""
    result = runner.invoke(app, ["explain", str(tiny_run), "--method", "lime"])
    assert isinstance(result.exception, ExplainError) and "gradcam++" in str(result.exception)
    result = runner.invoke(app, ["explain", str(tiny_run), "--split", "train"])
    assert isinstance(result.exception, ExplainError) and "external_test" in str(result.exception)
    with lock_run(tiny_run, command="another writer"):
        result = runner.invoke(app, ["explain", str(tiny_run)])
    assert isinstance(result.exception, RunLockedError) and "another writer" in str(result.exception)


def test_a_run_without_a_frozen_threshold_or_with_stale_predictions_says_what_to_run(
    tiny_run: Path, tmp_path: Path
) -> None:
    """Issue 8.1: outcomes need the frozen threshold, and predictions of the package's own weights."""
    run = tmp_path / "copy"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("cache", "heatmaps", ".lock*"))
    metadata = RunFolder(run).model("tiny_cnn").metadata
    meta = json.loads(metadata.read_text())
    metadata.write_text(json.dumps({**meta, "threshold": None}))
    with pytest.raises(ExplainError, match=r"no frozen threshold.*alnus evaluate"):
        explain_run(run, n=2, device="cpu")
    metadata.write_text(json.dumps(meta))
    stamp = RunFolder(run).model("tiny_cnn").predictions_stamp
    stamp.write_text(json.dumps({**json.loads(stamp.read_text()), "weights_sha256": "0" * 64}))
    with pytest.raises(ExplainError, match=r"other weights.*alnus predict"):
        explain_run(run, n=2, device="cpu")
    assert not RunFolder(run).heatmaps.exists()


def test_heat_on_the_padding_only_is_told_from_heat_on_the_image() -> None:
    """Issue 10 (weak point): a map whose heat fell only on the letterbox padding showed as an empty overlay without
    a reason; `heat_on_image` records the share of the network's map on the image crop (the report labels 0)."""
    size = 32
    base = {"name": "a.png", "image": np.zeros((40, 60), np.uint8), "heatmap": np.zeros((40, 60), np.float32),
            "crop_box": (0, 0, 60, 40), "lesion_box": None, "lesion_mask": None, "prob": 0.5, "method": "gradcam",
            "input_image": np.zeros((size, size), np.uint8), "input_box": (5, 0, 22, 32)}  # fmt: skip
    padding = np.zeros((size, size), np.float32)
    padding[:5] = 1.0  # above the crop: the letterbox band
    assert Explanation(**base, input_heatmap=padding).heat_on_image == 0.0
    half = padding.copy()
    half[10:15] = 1.0  # as much heat again, inside the crop
    assert Explanation(**base, input_heatmap=half).heat_on_image == pytest.approx(0.5)
    assert Explanation(**base, input_heatmap=np.zeros((size, size), np.float32)).heat_on_image is None
    assert "heat_on_image" in INDEX_COLUMNS


def test_an_overlay_of_a_large_image_is_drawn_at_the_overlays_size() -> None:
    """Attack review: a 9000 x 9000 upload's overlay took 6.7 GB, drawn at the image's size and then scaled down."""
    import tracemalloc

    from alnus.explain import Explanation

    side = 3000
    heat = np.zeros((side, side), np.float32)
    heat[1000:2000, 1000:2000] = 1.0
    mask = np.zeros((side, side), bool)
    mask[1200:1800, 1200:1800] = True
    image = np.full((side, side), 100, np.uint8)
    e = Explanation(name="big", image=image, heatmap=heat, crop_box=(900, 900, 1200, 1200),
                    lesion_box=(1200, 1200, 600, 600), lesion_mask=mask, prob=0.5, method="gradcam",
                    input_image=np.zeros((8, 8), np.uint8), input_heatmap=np.zeros((8, 8), np.float32),
                    input_box=(0, 0, 8, 8))  # fmt: skip
    tracemalloc.start()
    try:
        picture = e.overlay(width=300)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert picture.size == (300, 300) and peak < 16 * 2**20, f"{peak / 2**20:.0f} MiB"
    pixels = np.asarray(picture)
    assert tuple(pixels[120, 120]) == LIME and tuple(pixels[90, 150]) == CYAN  # mask outline and crop box, scaled
    assert tuple(pixels[20, 20]) == (100, 100, 100)  # no heat there: the grey image


def test_a_narrow_images_legend_is_folded_between_words_not_cut() -> None:
    """A new user's review: a BUS-BRA image 276 px wide showed 'heat map: blue (little weight, see-through) to red
    (mo' in its PNG's legend, the rest cut off at the right edge; each part was kept whole on a line too short."""
    from alnus.explain import _with_legend

    picture = Image.new("RGB", (276, 100), (128, 128, 128))
    parts = [("lesion outline", LIME, True), ("what the network saw", CYAN, True),
             ("heat map: blue (little weight, see-through) to red (most)", (230, 230, 230), False),
             ("P(malignant) = 0.186; the patient's call: benign", (255, 255, 255), False)]  # fmt: skip
    strip = np.asarray(_with_legend(picture, parts))[100:]
    background = (strip == np.asarray((24, 24, 24), dtype=np.uint8)).all(axis=2)
    assert background[:, -4:].all()  # nothing written up to the right edge
    rows_with_text = np.flatnonzero(~background.all(axis=1))
    assert rows_with_text.size > 0 and strip.shape[0] > 4 * 11  # the legend took more lines instead
