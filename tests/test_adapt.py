"""`alnus adapt` (BatchNorm statistics re-estimated on a new site's unlabelled images) and `alnus threshold` (a
threshold frozen on a site's labelled validation patients)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

from alnus.adapt import MIN_IMAGES, AdaptError, adapt_batchnorm, batchnorm_layers, images_digest
from alnus.cli import app
from alnus.data.dataset import PreprocessSpec
from alnus.errors import AlnusError
from alnus.models import create_model
from alnus.models.package import PackageError, freeze_threshold, read_metadata, save_package
from alnus.predict import Predictor, package_notes

LABELS = ["benign", "malignant"]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return create_model("tiny_cnn").eval()


def test_the_statistics_become_those_of_the_new_images_and_nothing_else_changes() -> None:
    model = _model()
    first = batchnorm_layers(model)[0]
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    momenta = [bn.momentum for bn in batchnorm_layers(model)]
    seen: list[torch.Tensor] = []
    hook = first.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    batch = torch.rand(MIN_IMAGES, 1, 32, 32) * 0.3 + 0.7  # a brighter site than the network was made for
    n = adapt_batchnorm(model, [batch[:10], batch[10:]])
    hook.remove()
    assert n == MIN_IMAGES
    features = torch.cat(seen)  # what the first BatchNorm saw, all images
    # A cumulative average of the two batches' statistics, each weighted alike (AdaBN).
    means = torch.stack([s.mean(dim=(0, 2, 3)) for s in seen]).mean(0)
    variances = torch.stack([s.var(dim=(0, 2, 3), unbiased=True) for s in seen]).mean(0)
    assert torch.allclose(first.running_mean, means, atol=1e-5)
    assert torch.allclose(first.running_var, variances, rtol=1e-4, atol=1e-6)
    assert features.shape[0] == MIN_IMAGES
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    assert [bn.momentum for bn in batchnorm_layers(model)] == momenta
    assert not model.training and not any(m.training for m in model.modules())


def test_the_help_states_the_minimum() -> None:
    assert f"At least {MIN_IMAGES} images" in " ".join(CliRunner().invoke(app, ["adapt", "--help"]).stdout.split())


def test_too_few_images_leave_the_statistics_as_they_were() -> None:
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdaptError, match=f"3 image\\(s\\) were read; BatchNorm statistics need at least {MIN_IMAGES}"):
        adapt_batchnorm(model, [torch.rand(3, 1, 32, 32)])
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_a_network_without_batchnorm_is_refused() -> None:
    with pytest.raises(AdaptError, match="no BatchNorm layer"):
        adapt_batchnorm(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten()), [torch.rand(20, 1, 8, 8)])


def _adapt(*args: str) -> tuple[int, str, str]:
    """The command as `alnus` runs it: a user error (AlnusError) is its message and exit code, as `cli.main` prints."""
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})
    if isinstance(result.exception, AlnusError):
        return result.exception.exit_code, result.stdout, result.stderr + str(result.exception)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A package (with a frozen threshold, a card, a data licence and examples) and a new site's images: 24 PNGs
    brighter than anything the package saw, one truncated file, and a labelled validation manifest of them."""
    model = _model()
    meta = {"preprocess": PreprocessSpec(size=32).to_dict(), "label_names": LABELS, "positive_label": "malignant"}
    package = tmp_path / "model"
    save_package(package, model, meta)
    point = {"value": 0.5, "rule": "sensitivity", "target": 0.9, "level": "patient", "aggregate": "mean"}
    freeze_threshold(package, point, reason="test")
    (package / "README.md").write_text("# Model card\n\nTrained at site A.\n")
    (package / "DATA-LICENCE.txt").write_text("licence")
    (package / "examples.csv").write_text("image,prob\nx.png,0.5\n")
    images = tmp_path / "site"
    images.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(24):
        level = 150 + 60 * (i % 2)  # the malignant half is brighter still, so a threshold can separate them
        pixels = np.clip(rng.normal(level, 20, size=(40, 48)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(images / f"im{i:02d}.png")
        rows.append({"image": f"im{i:02d}.png", "patient_id": f"p{i}", "label": LABELS[i % 2]})
    pd.DataFrame(rows).to_csv(images / "validation.csv", index=False)
    (images / "zz_truncated.png").write_bytes((images / "im00.png").read_bytes()[:60])
    return tmp_path


def test_adapt_writes_a_new_package_that_records_its_images_and_predicts_differently(site: Path) -> None:
    source, out = site / "model", site / "adapted"
    source_meta = read_metadata(source)
    code, stdout, stderr = _adapt("adapt", str(source), str(site / "site"), "--out", str(out), "--site", "B")
    assert code == 0, stdout + stderr
    assert "left out" in stderr and "zz_truncated.png" in stderr
    assert "Adapted" in stdout and "on 24 image(s) (1 left out)" in stdout and "alnus threshold" in stdout
    meta = read_metadata(out)
    adaptation = meta["adaptation"]
    assert adaptation["n_images"] == 24 and adaptation["n_skipped"] == 1 and adaptation["site"] == "B"
    assert adaptation["images_sha256"] == images_digest(sorted((site / "site").glob("im*.png")))
    assert adaptation["source_weights_sha256"] == source_meta["weights_sha256"]
    assert adaptation["source_threshold"]["value"] == 0.5
    assert meta["threshold"] is None and meta["threshold_history"] == []
    # Only BatchNorm statistics moved.
    before, after = load_file(source / "weights.safetensors"), load_file(out / "weights.safetensors")
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all("running" in k or "num_batches" in k for k in moved)
    # The card says first what was done and what no longer holds; the licence travels; the source's examples (its
    # probabilities) do not.
    card = (out / "README.md").read_text()
    assert card.startswith("# Model card, adapted to B\n") and "24 unlabelled image(s) of B" in card
    assert meta["weights_sha256"][:16] in card and "the source's: `" + source_meta["weights_sha256"][:16] in card
    assert card.index("No threshold is carried over (the source's, 0.5,") < card.index("Trained at site A.")
    assert "## Before adaptation: the source model's card" in card
    digests = (out / "adaptation-images.sha256").read_text().split()
    assert len(digests) == 24 and digests == sorted(digests)
    from alnus._io import file_sha256

    assert file_sha256(site / "site" / "im05.png") in digests
    assert adaptation["source_package"] == str(source)
    assert oct((out).stat().st_mode & 0o777) != oct(0o700)  # an ordinary folder, not mkdtemp's private one
    assert (out / "DATA-LICENCE.txt").read_text() == "licence" and not (out / "examples.csv").exists()
    assert read_metadata(source)["weights_sha256"] == source_meta["weights_sha256"]  # the source is untouched
    image = str(site / "site" / "im03.png")
    p_source = Predictor(source, device="cpu").predict_inputs(pd.DataFrame([{"image": image, "path": image}]))
    p_adapted = Predictor(out, device="cpu").predict_inputs(pd.DataFrame([{"image": image, "path": image}]))
    assert abs(p_source["prob"][0] - p_adapted["prob"][0]) > 1e-4
    assert "call" not in p_adapted.columns  # no threshold until one is frozen on the site
    notes = " ".join(package_notes(out, meta))
    assert (
        "Adapted (`alnus adapt`) to 24 unlabelled image(s) of B" in notes
        and "no calls until `alnus threshold`" in notes
    )
    assert "Adapted" not in " ".join(package_notes(source, source_meta))


def test_adapt_never_overwrites_what_is_not_its_own_package(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source, images = site / "model", str(site / "site")
    code, _, stderr = _adapt("adapt", str(source), images, "--out", str(source / "inside"))
    assert code == 2 and "would write into the source package" in stderr
    code, _, stderr = _adapt("adapt", str(source), images, "--out", str(site), "--force")
    assert code == 2 and "holds the source package" in stderr and (source / "weights.safetensors").is_file()
    (site / "taken").mkdir()
    (site / "taken" / "precious.txt").write_text("keep")
    code, _, stderr = _adapt("adapt", str(source), images, "--out", str(site / "taken"))
    assert code == 2 and "exists; name a new folder, or pass --force" in stderr
    code, _, stderr = _adapt("adapt", str(source), images, "--out", str(site / "taken"), "--force")
    assert code == 2 and "not a model package" in stderr and (site / "taken" / "precious.txt").is_file()
    work = site / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    (work / "precious.txt").write_text("keep")
    for out in (".", str(site)):
        code, _, stderr = _adapt("adapt", str(source), images, "--out", out, "--force")
        assert code == 2 and (work / "precious.txt").is_file()
    assert "the current folder or one above it" in stderr or "holds the source package" in stderr
    (site / "run").mkdir()
    (site / "run" / "splits.csv").write_text("image\n")
    code, _, stderr = _adapt("adapt", str(source), images, "--out", str(site / "run" / "models" / "x" / "model"))
    assert code == 2 and "inside the run folder" in stderr
    (site / "link").symlink_to(source)
    code, _, stderr = _adapt("adapt", str(source), images, "--out", str(site / "link"), "--force")
    assert code == 2 and "symbolic link" in stderr
    code, _, stderr = _adapt("adapt", str(source), images, "--out", str(site / "x"), "--site", "a\n## Intended use")
    assert code == 2 and "--site" in stderr and not (site / "x").exists()
    # A package of its own is replaced with --force (and only then).
    assert _adapt("adapt", str(source), images, "--out", str(site / "mine"), "--site", "B")[0] == 0
    assert _adapt("adapt", str(source), images, "--out", str(site / "mine"), "--site", "C", "--force")[0] == 0
    assert read_metadata(site / "mine")["adaptation"]["site"] == "C"
    assert not [p for p in site.iterdir() if p.name.startswith(".mine.")]  # nothing left aside
    same = site / "same.csv"
    same.write_text("image,roi\n" + "".join(f'site/im00.png,"{i},0,8,8"\n' for i in range(20)))
    code, _, stderr = _adapt("adapt", str(source), "--manifest", str(same), "--out", str(site / "same"))
    assert code == 2 and "20 image(s) were read but only 1 different file(s)" in stderr
    few = site / "few"
    few.mkdir()
    for name in ("im00.png", "im01.png"):
        (few / name).write_bytes((site / "site" / name).read_bytes())
    (few / "boxless.dcm").write_bytes(b"not a dicom")
    code, _, stderr = _adapt("adapt", str(source), str(few), "--out", str(site / "none"))
    assert code == 2 and "2 image(s) were read" in stderr and not (site / "none").exists()
    assert "1 image(s) were left out: " in stderr and "boxless.dcm" in stderr  # why, when it fails
    assert not [p for p in site.iterdir() if p.name.startswith(".none.")]  # no half-written folder left behind


def test_a_folder_that_appears_meanwhile_is_never_replaced_without_force(site: Path) -> None:
    from alnus.adapt import _move_into_place

    work, target = site / ".out.tmp", site / "out"
    work.mkdir()
    (work / "metadata.json").write_text("{}")
    target.mkdir()
    (target / "precious.txt").write_text("keep")  # another command made it while images were read
    with pytest.raises(AdaptError, match="appeared while adapting"):
        _move_into_place(work, site / "model", target, force=False)
    assert (target / "precious.txt").read_text() == "keep"
    with pytest.raises(AdaptError, match="not a model package"):
        _move_into_place(work, site / "model", target, force=True)
    assert (target / "precious.txt").read_text() == "keep"


def test_threshold_freezes_on_the_sites_labelled_patients(site: Path) -> None:
    out = site / "adapted"
    assert _adapt("adapt", str(site / "model"), str(site / "site"), "--out", str(out))[0] == 0
    manifest = site / "site" / "validation.csv"
    code, stdout, stderr = _adapt("threshold", str(out), "--manifest", str(manifest))
    assert code == 0, stdout + stderr
    point = read_metadata(out)["threshold"]
    # The adapted package follows the rule its source threshold was frozen with.
    assert point["rule"] == "sensitivity" and point["target"] == 0.9 and point["val_sensitivity"] >= 0.9
    assert point["n_val_units"] == 24
    assert "Froze" in stdout and "24 patient cases: 12 malignant, 12 benign" in stdout and "optimistic" in stdout
    assert "only 12 case(s) of one class" in stderr
    history = read_metadata(out)["threshold_history"]
    assert "validation.csv" in history[-1]["reason"] and point["frozen_on"].startswith("validation.csv")
    card = (out / "README.md").read_text()
    assert f"Threshold {point['value']:.4g}" in card and "No threshold is carried over" not in card
    assert card.count("<!-- site-threshold:start -->") == 1
    code, _, stderr = _adapt("threshold", str(out), "--manifest", str(manifest))
    assert code == 2 and "already has a frozen threshold" in stderr and "--refreeze" in stderr
    frozen = len(read_metadata(out)["threshold_history"])
    assert _adapt("threshold", str(out), "--manifest", str(manifest), "--refreeze")[0] == 0
    assert len(read_metadata(out)["threshold_history"]) == frozen  # the same threshold again: nothing recorded
    code, _, _ = _adapt("threshold", str(out), "--manifest", str(manifest), "--rule", "youden", "--refreeze")
    assert code == 0 and read_metadata(out)["threshold"]["rule"] == "youden"
    card = (out / "README.md").read_text()
    assert card.count("<!-- site-threshold:start -->") == 1 and "(youden," in card
    image = str(site / "site" / "im03.png")
    predicted = Predictor(out, device="cpu").predict_inputs(pd.DataFrame([{"image": image, "path": image}]))
    assert predicted["call"].notna().all()


def test_threshold_needs_labels_and_a_target(site: Path) -> None:
    package = site / "model"
    table = pd.read_csv(site / "site" / "validation.csv")
    table.drop(columns="label").to_csv(site / "site" / "unlabelled.csv", index=False)
    code, _, stderr = _adapt(
        "threshold", str(package), "--manifest", str(site / "site" / "unlabelled.csv"), "--refreeze"
    )
    assert code == 2 and "column 'label': required column is missing" in stderr
    for options, expected in (
        (["--rule", "specificity"], "needs a target"),
        (["--level", "lesion"], "--level must be one of patient, study, image"),
    ):
        code, _, stderr = _adapt(
            "threshold", str(package), "--manifest", str(site / "site" / "validation.csv"), *options, "--refreeze"
        )
        assert code == 2 and expected in stderr
    table.assign(label=table["label"].str.title()).to_csv(site / "site" / "titled.csv", index=False)
    code, _, stderr = _adapt("threshold", str(package), "--manifest", str(site / "site" / "titled.csv"), "--refreeze")
    assert code == 2 and "label(s) ['Benign', 'Malignant']" in stderr and "rename the labels" in stderr
    assert "drop the label column" not in stderr
    manifest = str(site / "site" / "validation.csv")
    code, _, stderr = _adapt("threshold", str(package), "--manifest", manifest)
    assert code == 2 and "already has a frozen threshold (0.5" in stderr
    code, _, stderr = _adapt("threshold", str(package), "--manifest", manifest, "--rule", "youden", "--target", "0.9",
                             "--refreeze")  # fmt: skip
    assert code == 2 and "Youden's takes none" in stderr
    code, _, stderr = _adapt("threshold", str(package), "--manifest", manifest, "--target", "1.5", "--refreeze")
    assert code == 2 and "must be a proportion in (0, 1]" in stderr
    run_model = site / "run" / "models" / "tiny_cnn" / "model"
    run_model.parent.mkdir(parents=True)
    (site / "run" / "splits.csv").write_text("image\n")
    shutil.copytree(package, run_model)
    code, _, stderr = _adapt("threshold", str(run_model), "--manifest", manifest, "--refreeze")
    assert code == 2 and "is a model of the run" in stderr and "alnus evaluate" in stderr
    # None of the refused commands touched the package.
    assert json.loads((package / "metadata.json").read_text())["threshold"]["value"] == 0.5


def test_a_damaged_adaptation_record_is_refused_on_reading(site: Path) -> None:
    out = site / "adapted"
    assert _adapt("adapt", str(site / "model"), str(site / "site"), "--out", str(out))[0] == 0
    meta = json.loads((out / "metadata.json").read_text())
    for field, value in (("source_threshold", "x"), ("source_threshold", {"rule": "banana"}), ("site", "a\n# b")):
        damaged = {**meta, "adaptation": {**meta["adaptation"], field: value}}
        (out / "metadata.json").write_text(json.dumps(damaged))
        with pytest.raises(PackageError, match="damaged"):
            read_metadata(out)


def test_adapt_predictor_adapts_in_place_from_a_manifest_without_reading_labels(site: Path) -> None:
    from alnus.adapt import adapt_predictor

    table = pd.read_csv(site / "site" / "validation.csv")
    table["label"] = "not a label of the model"  # never read: a label the package does not know would be refused
    predictor = Predictor(site / "model", device="cpu", engine="torch")
    before = batchnorm_layers(predictor.networks[0].model)[0].running_mean.clone()
    assert adapt_predictor(predictor, table, site / "site") == 24
    assert not torch.equal(before, batchnorm_layers(predictor.networks[0].model)[0].running_mean)
    compiled = Predictor(site / "model", device="cpu", engine="torch", compile=True)
    with pytest.raises(AdaptError, match="engine='torch', uncompiled"):
        adapt_predictor(compiled, table, site / "site")


def test_the_benchs_halves_split_whole_patients_without_labels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    import site_adaptation

    table = pd.DataFrame({"patient_id": [f"p{i // 2}" for i in range(40)], "site": "A", "image": range(40)})
    half = site_adaptation.halves(table)
    assert set(half) == {0, 1} and (half == 0).sum() == 20
    assert all(len(set(half[table["patient_id"] == p])) == 1 for p in table["patient_id"])
    assert (site_adaptation.halves(table.assign(label="x")) == half).all()  # labels play no part
    assert (site_adaptation.halves(table.iloc[::-1].reset_index(drop=True))[::-1] == half).all()  # nor row order
