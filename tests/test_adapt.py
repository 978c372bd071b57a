"""`alnus adapt` (BatchNorm statistics re-estimated on a new site's unlabelled images) and `alnus threshold` (a
threshold frozen on a site's labelled validation patients)."""

from __future__ import annotations

import json
import re
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

from alnus.adapt import MIN_IMAGES, AdaptError, adapt_batchnorm, adapt_package, batchnorm_layers, images_digest
from alnus.cli import app
from alnus.data.dataset import PreprocessSpec
from alnus.models import create_model
from alnus.models.package import PackageError, freeze_threshold, read_metadata, save_package
from alnus.predict import Predictor, package_notes
from tests._cli import run_cli

LABELS = ["benign", "malignant"]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return create_model("tiny_cnn").eval()


def test_the_statistics_become_those_of_the_new_images_whatever_the_batching_and_nothing_else_changes() -> None:
    batch = torch.rand(MIN_IMAGES + 5, 1, 32, 32) * 0.3 + 0.7  # a brighter site than the network was made for
    # The reference: one training-mode pass over all images at once, each layer normalising with (and keeping) the
    # statistics of the whole set, which is what the adapted network computes.
    reference = _model()
    for bn in batchnorm_layers(reference):
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    with torch.no_grad():
        reference(batch)
    expected = [(bn.running_mean.clone(), bn.running_var.clone()) for bn in batchnorm_layers(reference)]
    assert len(expected) >= 2  # a layer after another, so the order of estimation matters
    adapted = []
    # One training-mode pass when the activations fit in memory; else layer by layer (memory=0), whatever the batching.
    for sizes, memory in (((len(batch),), 0), ((10, 11), 0), ((4,) * 5 + (1,), 0), ((4,) * 5 + (1,), 2**30)):
        model = _model()
        weights = {k: v.clone() for k, v in model.state_dict().items() if "running_" not in k}
        momenta = [bn.momentum for bn in batchnorm_layers(model)]
        steps: list[tuple[int, int]] = []
        batches = list(torch.split(batch, sizes))
        notes: list[str] = []
        n = adapt_batchnorm(
            model, batches, progress=lambda d, t, into=steps: into.append((d, t)), memory=memory, note=notes.append
        )
        assert n == len(batch)
        assert (notes == []) == (memory > 0) and all("one at a time" in text for text in notes)
        everyone = len(expected)
        assert steps == ([(i + 1, everyone) for i in range(everyone)] if memory == 0 else [(everyone, everyone)])
        # Training mode normalises with the biased variance and prediction with the kept (unbiased) one, so the
        # deeper layers of the reference differ by up to sqrt(n / (n - 1)) for their n pixels per channel.
        for bn, (mean, var) in zip(batchnorm_layers(model), expected, strict=True):
            assert torch.allclose(bn.running_mean, mean, rtol=5e-3, atol=1e-4), sizes
            assert torch.allclose(bn.running_var, var, rtol=1e-2, atol=1e-5), sizes
        assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())  # num_batches_tracked too
        assert [bn.momentum for bn in batchnorm_layers(model)] == momenta
        assert not any(m.training for m in model.modules())
        adapted.append([torch.cat([bn.running_mean, bn.running_var]) for bn in batchnorm_layers(model)])
    for other in adapted[1:3]:  # the batching does not matter
        assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(adapted[0], other, strict=True))


def test_the_one_pass_budget_is_a_share_of_the_memory_available(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins
    import os

    from alnus import adapt

    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert 0 < adapt.one_pass_memory() <= adapt.ONE_PASS_SHARE * total  # half of what is available, not of all
    real_open = builtins.open

    def no_meminfo(path, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if str(path) == "/proc/meminfo":
            raise OSError("no /proc here")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_meminfo)
    assert adapt.one_pass_memory() == adapt.ONE_PASS_FALLBACK


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
    code, stdout, stderr = run_cli("adapt", str(source), str(site / "site"), "--out", str(out), "--site", "B")
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
    code, _, stderr = run_cli("adapt", str(source), images, "--out", str(source / "inside"))
    assert code == 2 and "would write into the source package" in stderr
    code, _, stderr = run_cli("adapt", str(source), images, "--out", str(site), "--force")
    assert code == 2 and "holds the source package" in stderr and (source / "weights.safetensors").is_file()
    (site / "taken").mkdir()
    (site / "taken" / "precious.txt").write_text("keep")
    code, _, stderr = run_cli("adapt", str(source), images, "--out", str(site / "taken"))
    assert code == 2 and "exists; name a new folder, or pass --force" in stderr
    code, _, stderr = run_cli("adapt", str(source), images, "--out", str(site / "taken"), "--force")
    assert code == 2 and "not a model package" in stderr and (site / "taken" / "precious.txt").is_file()
    work = site / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    (work / "precious.txt").write_text("keep")
    for out in (".", str(site)):
        code, _, stderr = run_cli("adapt", str(source), images, "--out", out, "--force")
        assert code == 2 and (work / "precious.txt").is_file()
    assert "the current folder or one above it" in stderr or "holds the source package" in stderr
    (site / "run").mkdir()
    (site / "run" / "config.yaml").write_text("foo: 1\n")  # a project's own config.yaml makes no run folder
    assert run_cli("adapt", str(source), images, "--out", str(site / "run" / "models" / "y"))[0] == 0
    (site / "run" / "splits.csv").write_text("image\n")
    code, _, stderr = run_cli("adapt", str(source), images, "--out", str(site / "run" / "models" / "x" / "model"))
    assert code == 2 and "inside the run folder" in stderr
    # Never inside another package (an ensemble's member, say), nor holding the images adapted on.
    for out in (site / "run" / "models" / "y" / "members" / "1", site / "run" / "models" / "y" / "inner"):
        code, _, stderr = run_cli("adapt", str(source), images, "--out", str(out), "--force")
        assert code == 2 and "inside the model package" in stderr, stderr
    (site / "link").symlink_to(source)
    code, _, stderr = run_cli("adapt", str(source), images, "--out", str(site / "link"), "--force")
    assert code == 2 and "symbolic link" in stderr
    code, _, stderr = run_cli("adapt", str(source), images, "--out", str(site / "x"), "--site", "a\n## Intended use")
    assert code == 2 and "--site" in stderr and not (site / "x").exists()
    # A package of its own is replaced with --force (and only then).
    assert run_cli("adapt", str(source), images, "--out", str(site / "mine"), "--site", "B")[0] == 0
    assert run_cli("adapt", str(source), images, "--out", str(site / "mine"), "--site", "C", "--force")[0] == 0
    shutil.copytree(images, site / "mine" / "images")
    code, _, stderr = run_cli(
        "adapt", str(source), str(site / "mine" / "images"), "--out", str(site / "mine"), "--force"
    )
    assert (
        code == 2
        and "is inside --out" in stderr
        and len(list((site / "mine" / "images").iterdir())) == len(list(Path(images).iterdir()))
    )
    assert read_metadata(site / "mine")["adaptation"]["site"] == "C"
    assert not [p for p in site.iterdir() if p.name.startswith(".mine.")]  # nothing left aside
    same = site / "same.csv"
    same.write_text("image,roi\n" + "".join(f'site/im00.png,"{i},0,8,8"\n' for i in range(20)))
    code, _, stderr = run_cli("adapt", str(source), "--manifest", str(same), "--out", str(site / "same"))
    assert code == 2 and "20 image(s) were read but only 1 different file(s)" in stderr
    few = site / "few"
    few.mkdir()
    for name in ("im00.png", "im01.png"):
        (few / name).write_bytes((site / "site" / name).read_bytes())
    (few / "boxless.dcm").write_bytes(b"not a dicom")
    code, _, stderr = run_cli("adapt", str(source), str(few), "--out", str(site / "none"))
    assert code == 2 and "2 image(s) were read" in stderr and not (site / "none").exists()
    assert "1 image(s) were left out: " in stderr and "boxless.dcm" in stderr  # why, when it fails
    assert stderr.count("Give more images") == 1
    # None usable: the reasons (each once, with a count) and what to fix, not "give more images".
    broken = site / "broken"
    broken.mkdir()
    for i in range(20):
        (broken / f"b{i}.png").write_bytes(b"not a png")
    code, _, stderr = run_cli("adapt", str(source), str(broken), "--out", str(site / "none"))
    assert code == 2 and "none of the 20 image(s) could be used" in stderr and "and 19 more" in stderr, stderr
    assert "Give more images" not in stderr and "Fix what the reasons say" in stderr
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
    assert run_cli("adapt", str(site / "model"), str(site / "site"), "--out", str(out))[0] == 0
    manifest = site / "site" / "validation.csv"
    code, stdout, stderr = run_cli("threshold", str(out), "--manifest", str(manifest))
    assert code == 0, stdout + stderr
    point = read_metadata(out)["threshold"]
    # The adapted package follows the rule its source threshold was frozen with.
    assert point["rule"] == "sensitivity" and point["target"] == 0.9 and point["val_sensitivity"] >= 0.9
    assert point["n_val_units"] == 24
    assert "Froze" in stdout and "24 patient cases: 12 malignant, 12 benign" in stdout and "optimistic" in stdout
    assert "whose smaller class has only 12:" in stderr
    history = read_metadata(out)["threshold_history"]
    assert "validation.csv" in history[-1]["reason"] and point["frozen_on"].startswith("validation.csv")
    card = (out / "README.md").read_text()
    assert f"Threshold {point['value']:.4g}" in card and "No threshold is carried over" not in card
    assert card.count("<!-- site-threshold:start -->") == 1
    code, _, stderr = run_cli("threshold", str(out), "--manifest", str(manifest))
    assert code == 2 and "already has a frozen threshold" in stderr and "--refreeze" in stderr
    frozen = len(read_metadata(out)["threshold_history"])
    assert run_cli("threshold", str(out), "--manifest", str(manifest), "--refreeze")[0] == 0
    assert len(read_metadata(out)["threshold_history"]) == frozen  # the same threshold again: nothing recorded
    # A card left stale (a run killed between the metadata and the card) is brought up to date by a refreeze.
    (out / "README.md").write_text(card.replace(f"Threshold {point['value']:.4g}", "No threshold is carried over"))
    assert run_cli("threshold", str(out), "--manifest", str(manifest), "--refreeze")[0] == 0
    assert f"Threshold {point['value']:.4g}" in (out / "README.md").read_text()
    # The same value frozen on other patients is recorded with where it was frozen now.
    pd.read_csv(manifest).drop(index=[0, 2]).to_csv(site / "site" / "fewer.csv", index=False)
    code, stdout, _ = run_cli("threshold", str(out), "--manifest", str(site / "site" / "fewer.csv"), "--refreeze")
    now = read_metadata(out)["threshold"]
    assert code == 0 and now["frozen_on"].startswith("fewer.csv") and now["n_val_units"] == 22
    assert "22 patient cases" in stdout and len(read_metadata(out)["threshold_history"]) == frozen + 1
    assert "frozen on fewer.csv)" in str(Predictor(out, device="cpu").call_rule)  # not "on validation"
    code, _, _ = run_cli("threshold", str(out), "--manifest", str(manifest), "--rule", "youden", "--refreeze")
    assert code == 0 and read_metadata(out)["threshold"]["rule"] == "youden"
    card = (out / "README.md").read_text()
    assert card.count("<!-- site-threshold:start -->") == 1 and "(youden," in card
    # Section markers out of order (a hand edit) give a new section, not a traceback.
    (out / "README.md").write_text(
        "# Card\n\nnotes <!-- site-threshold:end --> x\n\n<!-- site-threshold:start -->\nold\n"
    )
    assert run_cli("threshold", str(out), "--manifest", str(manifest), "--refreeze")[0] == 0
    assert "## Threshold frozen at a site" in (out / "README.md").read_text()
    image = str(site / "site" / "im03.png")
    predicted = Predictor(out, device="cpu").predict_inputs(pd.DataFrame([{"image": image, "path": image}]))
    assert predicted["call"].notna().all()


def test_threshold_needs_labels_and_a_target(site: Path) -> None:
    package = site / "model"
    table = pd.read_csv(site / "site" / "validation.csv")
    table.drop(columns="label").to_csv(site / "site" / "unlabelled.csv", index=False)
    code, _, stderr = run_cli(
        "threshold", str(package), "--manifest", str(site / "site" / "unlabelled.csv"), "--refreeze"
    )
    assert code == 2 and "column 'label': required column is missing" in stderr
    for options, expected in (
        (["--rule", "specificity"], "needs a target"),
        (["--level", "lesion"], "--level must be one of patient, study, image"),
    ):
        code, _, stderr = run_cli(
            "threshold", str(package), "--manifest", str(site / "site" / "validation.csv"), *options, "--refreeze"
        )
        assert code == 2 and expected in stderr
    table.assign(label=table["label"].str.title()).to_csv(site / "site" / "titled.csv", index=False)
    code, _, stderr = run_cli("threshold", str(package), "--manifest", str(site / "site" / "titled.csv"), "--refreeze")
    assert code == 2 and "label(s) ['Benign', 'Malignant']" in stderr and "rename the labels" in stderr
    assert "drop the label column" not in stderr
    manifest = str(site / "site" / "validation.csv")
    code, _, stderr = run_cli("threshold", str(package), "--manifest", manifest)
    assert code == 2 and "already has a frozen threshold (0.5" in stderr
    code, _, stderr = run_cli("threshold", str(package), "--manifest", manifest, "--rule", "youden", "--target", "0.9",
                             "--refreeze")  # fmt: skip
    assert code == 2 and "Youden's takes none" in stderr
    code, _, stderr = run_cli("threshold", str(package), "--manifest", manifest, "--target", "1.5", "--refreeze")
    assert code == 2 and "must be a proportion in (0, 1]" in stderr
    run_model = site / "run" / "models" / "tiny_cnn" / "model"
    run_model.parent.mkdir(parents=True)
    (site / "run" / "splits.csv").write_text("image\n")
    (site / "run" / "config.yaml").write_text("name: run\n")
    shutil.copytree(package, run_model)
    code, _, stderr = run_cli("threshold", str(run_model), "--manifest", manifest, "--refreeze")
    assert code == 2 and "is a model of the run" in stderr and "alnus evaluate" in stderr
    # A file listed twice, or one that is not an image, is named by its row before anything is predicted.
    doubled = pd.concat([table, table.iloc[[3]]], ignore_index=True)
    doubled.loc[len(doubled)] = {"image": "zz_truncated.png", "patient_id": "p99", "label": "benign"}
    doubled.to_csv(site / "site" / "doubled.csv", index=False)
    code, _, stderr = run_cli("threshold", str(package), "--manifest", str(site / "site" / "doubled.csv"), "--refreeze")
    assert code == 2 and "2 problems" in stderr, stderr
    assert "row 26" in stderr and "same image as row 5 (im03.png)" in stderr
    assert "row 27" in stderr and "zz_truncated.png" in stderr
    # None of the refused commands touched the package.
    assert json.loads((package / "metadata.json").read_text())["threshold"]["value"] == 0.5


def test_a_damaged_adaptation_record_is_refused_on_reading(site: Path) -> None:
    out = site / "adapted"
    assert run_cli("adapt", str(site / "model"), str(site / "site"), "--out", str(out))[0] == 0
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


def test_the_benchs_halves_split_whole_patients_without_labels(bench) -> None:
    site_adaptation = bench("site_adaptation")

    table = pd.DataFrame({"patient_id": [f"p{i // 2}" for i in range(40)], "site": "A", "image": range(40)})
    half = site_adaptation.halves(table)
    assert set(half) == {0, 1} and (half == 0).sum() == 20
    assert all(len(set(half[table["patient_id"] == p])) == 1 for p in table["patient_id"])
    assert (site_adaptation.halves(table.assign(label="x")) == half).all()  # labels play no part
    assert (site_adaptation.halves(table.iloc[::-1].reset_index(drop=True))[::-1] == half).all()  # nor row order


def test_the_terminals_progress_shows_reading_and_estimating_in_one_display(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from rich.console import Console

    from alnus import cli

    shown = io.StringIO()
    monkeypatch.setattr(cli, "err_console", Console(file=shown, force_terminal=True, width=100))
    monkeypatch.setattr(cli.sys.stderr, "isatty", lambda: True)
    with cli._progress_bars(100, "reading", "estimating layers") as (reading, layers):
        for i in range(1, 101):
            reading(i, 100)
        for i in range(1, 50):
            layers(i, 49)  # two bars at once: rich allows one live display, so both are tasks of one
    text = shown.getvalue()
    assert "reading" in text and "estimating layers" in text
    with cli._progress_bars(3, "reading", "estimating layers") as callbacks:  # few images: no bars
        assert callbacks == [None, None]


_SLOW_ADAPT = """
import sys, time
import alnus.adapt as adapt
write = adapt.save_package
def slow(*args, **kwargs):
    written = write(*args, **kwargs)
    print("writing", flush=True)
    time.sleep(60)
    return written
adapt.save_package = slow
from alnus.cli import main
sys.argv = ["alnus", *sys.argv[1:]]
main()
"""


def test_a_killed_adapt_leaves_nothing_the_next_one_does_not_clear(site: Path) -> None:
    """kill -9 while the package is being written leaves a hidden half-written folder beside --out; the next adapt
    removes it (its process is gone), keeps one of a process that still runs, and restores a package that a killed
    --force had moved aside before the new one took its place."""
    import os
    import signal
    import subprocess
    import sys

    source, out = site / "model", site / "adapted"
    args = [str(source), str(site / "site"), "--out", str(out)]
    child = subprocess.Popen([sys.executable, "-c", _SLOW_ADAPT, "adapt", *args], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "writing\n"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=60)
    left = sorted(p.name for p in site.glob(".adapted.*"))
    assert len(left) == 1 and left[0].startswith(f".adapted.adapting-{child.pid}.") and not out.exists()
    alive = site / f".adapted.adapting-{os.getpid()}.x"  # this test's own process, running
    alive.mkdir()
    code, stdout, stderr = run_cli("adapt", *args)
    assert code == 0, stdout + stderr
    assert sorted(p.name for p in site.glob(".adapted.*")) == [alive.name]
    # A --force killed between moving the old package aside and renaming the new one into place.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    aside = site / f".adapted.replaced-{int(dead.stdout)}"
    out.rename(aside)
    code, stdout, stderr = run_cli("adapt", *args)
    assert code == 2 and "exists" in stderr, stdout + stderr  # the old package is back, and kept without --force
    assert read_metadata(out)["adaptation"]["site"] == "" and not aside.exists()


def test_an_ensemble_is_adapted_member_by_member_each_with_its_own_preprocessing(tmp_path: Path) -> None:
    from alnus.ensemble import EnsembleError, build_ensemble
    from alnus.models.package import load_members
    from tests.test_ensemble import BOX, make_run, pkg

    run = make_run(tmp_path)
    build_ensemble(run, "ens", [pkg(run, "tiny_cnn"), pkg(run, "tiny_box")], tta=["hflip"])
    source = pkg(run, "ens")
    images = sorted(str(p) for p in (tmp_path / "data").glob("*.png"))
    site = pd.DataFrame({"path": images, "image": [Path(p).name for p in images], "roi": BOX})
    adapted = adapt_package(source, site, tmp_path / "ens-b", site="B")
    meta = read_metadata(adapted.package)
    before = read_metadata(source)
    assert meta["kind"] == "ensemble" and meta["tta"] == ["hflip"] and meta["threshold"] is None
    assert meta["adaptation"]["site"] == "B" and meta["adaptation"]["n_images"] == len(images)
    assert meta["adaptation"]["source_weights_sha256"] == before["weights_sha256"] != meta["weights_sha256"]
    members, _ = load_members(adapted.package)
    for member, old in zip(members, before["members"], strict=True):
        assert member.metadata["adaptation"]["source_weights_sha256"] == old["weights_sha256"]
        assert member.metadata["weights_sha256"] != old["weights_sha256"]
    # Each member as if adapted alone: the box-cropping member read the images through its own crop.
    alone = adapt_package(pkg(run, "tiny_box"), site, tmp_path / "box-b", site="B")
    assert members[1].metadata["weights_sha256"] == read_metadata(alone.package)["weights_sha256"]
    from alnus.export import ExportError, export_package

    with pytest.raises(ExportError, match=r"Export each member inside it, .*members/1 to .*members/2"):
        export_package(adapted.package, "onnx")
    # An adapted package is no member of a run's ensemble: its statistics may come from the run's test patients.
    with pytest.raises(EnsembleError, match="was adapted to B"):
        build_ensemble(run, "leak", [pkg(run, "tiny_cnn"), alone.package])
    x = Predictor(source).predict_table(site.assign(image=images).drop(columns="path"), tmp_path)["prob"]
    y = Predictor(adapted.package).predict_table(site.assign(image=images).drop(columns="path"), tmp_path)["prob"]
    assert np.abs(x.to_numpy() - y.to_numpy()).max() > 1e-3
    assert "each of its 2 members" in (adapted.package / "README.md").read_text()
    # The ensemble's record is checked on reading as a single network's is.
    path = adapted.package / "metadata.json"
    good = json.loads(path.read_text())
    for damage in (["x"], {**good["adaptation"], "site": "<img src=x>\n## Intended use"},
                   {**good["adaptation"], "n_images": -5}, {**good["adaptation"], "source_package": "a\nb"},
                   {**good["adaptation"], "source_threshold": "x"}):  # fmt: skip
        path.write_text(json.dumps({**good, "adaptation": damage}))
        with pytest.raises(PackageError, match="adaptation"):
            read_metadata(adapted.package)


def test_a_failed_adaptation_leaves_the_statistics_as_they_were() -> None:
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []

    def interrupt(done: int, of: int) -> None:
        calls.append(done)
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        adapt_batchnorm(model, [torch.rand(20, 1, 32, 32) + 0.5], progress=interrupt, memory=0)
    assert calls == [1, 2]  # the first layers were already re-estimated when it stopped
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_adapting_again_replaces_the_earlier_sites_statistics_and_says_so(site: Path) -> None:
    first, second = site / "at-b", site / "at-c"
    assert run_cli("adapt", str(site / "model"), str(site / "site"), "--out", str(first), "--site", "B")[0] == 0
    assert run_cli("adapt", str(first), str(site / "site"), "--out", str(second), "--site", "C")[0] == 0
    card = (second / "README.md").read_text()
    assert card.startswith("# Model card, adapted to C\n") and "adapted to B" not in card.splitlines()[0]
    assert "itself adapted (to B); those statistics are replaced" in card
    assert card.count("## Site adaptation") == 1 and card.count("## Before adaptation") == 1
    assert "Trained at site A." in card  # the original card is still quoted
    # A source without a card: no promise of a card that follows.
    (site / "model" / "README.md").unlink()
    assert run_cli("adapt", str(site / "model"), str(site / "site"), "--out", str(site / "bare"))[0] == 0
    bare = (site / "bare" / "README.md").read_text()
    assert "whose card follows" not in bare and "## Before adaptation" not in bare


def test_a_repeated_image_counts_once_and_an_implausible_box_is_reported(site: Path) -> None:
    for copy in ("copy_a.png", "copy_b.png"):  # the same bytes under other names
        shutil.copy(site / "site" / "im00.png", site / "site" / copy)
    rows = "".join(f"site/im{i:02d}.png\n" for i in range(20)) + "site/copy_a.png\nsite/copy_b.png\n"
    (site / "twice.csv").write_text("image\n" + rows)
    code, stdout, stderr = run_cli("adapt", str(site / "model"), "--manifest", str(site / "twice.csv"), "--out",
                                  str(site / "twice"))  # fmt: skip
    assert code == 0, stdout + stderr
    assert read_metadata(site / "twice")["adaptation"]["n_images"] == 20
    assert "same image and lesion region as site/im00.png: counted once" in stderr
    assert len((site / "twice" / "adaptation-images.sha256").read_text().split()) == 20
    # A box the lesion cannot fill is used by a cropping package, and said (as `alnus predict` says it).
    from alnus.data.roi import RoiPolicy

    meta = {"preprocess": PreprocessSpec(size=32, roi=RoiPolicy("box", 0.1)).to_dict(), "label_names": LABELS,
            "positive_label": "malignant"}  # fmt: skip
    save_package(site / "cropping", _model(), meta)
    (site / "boxed.csv").write_text("image,roi\n" + "".join(f'site/im{i:02d}.png,"0,0,3,3"\n' for i in range(20)))
    code, stdout, stderr = run_cli("adapt", str(site / "cropping"), "--manifest", str(site / "boxed.csv"), "--out",
                                  str(site / "boxed"))  # fmt: skip
    assert code == 0 and "site/im00.png was used, but:" in stderr and "and 15 more image(s) with a warning" in stderr


def test_score_compares_an_adapted_package_with_its_source_on_labelled_patients(site: Path) -> None:
    from alnus import stats
    from alnus.adapt import score_on_labelled

    out, manifest = site / "adapted", str(site / "site" / "validation.csv")
    assert run_cli("adapt", str(site / "model"), str(site / "site"), "--out", str(out))[0] == 0
    code, stdout, stderr = run_cli("score", str(out), str(site / "model"), "--manifest", manifest)
    assert code == 0, stdout + stderr
    assert "24 patients, 12 positive" in stdout and "none frozen" in stdout and "/12" in stdout
    # Sensitivity and specificity as the tables show a proportion: %, k/n and the exact CI.
    assert re.search(r"\d+\.\d \(\d+/12; \d+\.\d-\d+\.\d\)", stdout) and "exact 95% CI" in stderr
    assert "AUC difference (first minus second)" in stdout and "on the same 24 patients" in stdout
    result = score_on_labelled([out, site / "model"], manifest)
    # The same numbers as scoring each package's own predictions directly.
    table = pd.read_csv(manifest)
    y = (table["label"] == "malignant").to_numpy().astype(int)
    for row, package in zip(result.rows.to_dict("records"), (out, site / "model"), strict=True):
        probs = Predictor(package, device="cpu", precision="fp32", engine="torch").predict_table(table, site / "site")
        assert abs(row["AUC"] - stats.auc(y, probs["prob"].to_numpy())) < 1e-9
    table[table["label"] == "malignant"].to_csv(site / "site" / "one.csv", index=False)
    code, _, stderr = run_cli("score", str(out), "--manifest", str(site / "site" / "one.csv"))
    assert code == 2 and "one class only" in stderr
    code, _, stderr = run_cli("score", str(out), str(out), str(out), "--manifest", manifest)
    assert code == 2 and "two to compare" in stderr
    # The same package twice (a copy, too) gives the same probabilities: "difference +0.000, P 1" says nothing.
    shutil.copytree(out, site / "copy")
    code, stdout, stderr = run_cli("score", str(out), str(site / "copy"), "--manifest", manifest)
    assert code == 2 and "have the same weights" in " ".join(stderr.split()) and "AUC difference" not in stdout
    # A second attack review: a copy re-thresholded at the site differs in its calls, which is worth comparing.
    run_cli("threshold", str(site / "copy"), "--manifest", manifest, "--rule", "sensitivity", "--target", "0.95")
    code, stdout, stderr = run_cli("score", str(site / "copy"), str(out), "--manifest", manifest)
    said = " ".join(stderr.split())
    assert code == 0 and "AUC difference" not in stdout and "there is no AUC difference to test" in said
    assert "none frozen" in stdout and "/12" in stdout  # the re-thresholded copy's calls, beside the other's
    assert "calls not compared: only one of the two packages has a frozen threshold" in said
    # A new user's review: "whose calls are compared above" while they were only listed side by side. Two frozen
    # thresholds on the same weights: the calls are compared by exact McNemar tests on the same patients.
    shutil.copytree(site / "copy", site / "copy2")
    run_cli("threshold", str(site / "copy2"), "--manifest", manifest, "--rule", "youden", "--refreeze")
    code, stdout, stderr = run_cli("score", str(site / "copy"), str(site / "copy2"), "--manifest", manifest)
    printed = " ".join(stdout.split())
    assert code == 0, stdout + stderr
    found = score_on_labelled([site / "copy", site / "copy2"], manifest).calls
    sens, spec = found["sensitivity"], found["specificity"]
    assert f"Calls of the first package vs the second on the same {found['n']} {found['level']}s: sensitivity" in (
        printed
    )
    assert f"({sens.b} vs {sens.c} discordant;" in printed and f"({spec.b} vs {spec.c} discordant;" in printed
    assert sens.n == 12 and spec.n == 12 and found["level"] == "patient"
    # Rows of a class the model does not know (BrEaST's normal scans) are left out and named; the rest is scored.
    normal = table.iloc[:2].assign(label="normal", patient_id=["n1", "n2"])
    pd.concat([table, normal]).to_csv(site / "site" / "with_normal.csv", index=False)
    code, stdout, stderr = run_cli("score", str(out), "--manifest", str(site / "site" / "with_normal.csv"))
    assert code == 0 and "24 patients, 12 positive" in stdout, stdout + stderr
    assert f"2 row(s) of with_normal.csv labelled 'normal' (rows {len(table) + 2}, {len(table) + 3})" in stderr
    pd.concat([table, normal.iloc[:1]]).to_csv(site / "site" / "one_normal.csv", index=False)
    code, stdout, stderr = run_cli("score", str(out), "--manifest", str(site / "site" / "one_normal.csv"))
    assert code == 0 and f"labelled 'normal' (row {len(table) + 2})" in stderr  # one row: "row", not "rows"
    assert "were left out" in stderr
    normal.to_csv(site / "site" / "only_normal.csv", index=False)
    code, _, stderr = run_cli("score", str(out), "--manifest", str(site / "site" / "only_normal.csv"))
    assert (
        code == 2
        and "no row is labelled with one of the model's labels" in stderr
        and "its labels are 'normal'" in stderr
    )
    # A misspelt, differently cased or empty label is a mistake to correct, not a class to leave out.
    mistakes = (("Malignant", "differs from 'malignant' only in case"), ("malignat", "which is close to 'malignant'"),
                ("", "which is empty"), ("malig", "looks like 'malignant' cut short"),
                ("".join(chr(0xFEE0 + ord(c)) for c in "malignant"), "only in case or character width"))  # fmt: skip
    for label, why in mistakes:
        table.assign(label=table["label"].replace("malignant", label)).to_csv(site / "site" / "typo.csv", index=False)
        code, _, stderr = run_cli("score", str(out), "--manifest", str(site / "site" / "typo.csv"))
        assert code == 2 and why in " ".join(stderr.split()) and "correct the label" in " ".join(stderr.split())
    # Leaving rows out that leaves one class says what was left out.
    table.assign(label=table["label"].replace("malignant", "normal")).to_csv(site / "site" / "one2.csv", index=False)
    code, _, stderr = run_cli("score", str(out), "--manifest", str(site / "site" / "one2.csv"))
    assert code == 2 and "one class only" in stderr and "labelled 'normal'" in stderr
    # Freezing a threshold on them is still refused: what is frozen on must be what the user gave.
    code, _, stderr = run_cli("threshold", str(out), "--manifest", str(site / "site" / "with_normal.csv"))
    assert code == 2 and "label(s) ['normal']" in stderr and "rename the labels" in stderr


def test_odd_outs_sites_links_and_members_are_refused_or_said(site: Path) -> None:
    import os

    source, images = str(site / "model"), str(site / "site")
    (site / "afile").write_text("x")
    for out, expected in ((site / "afile" / "x", "is a file, not a folder"), (site / ("n" * 230), "too long")):
        code, _, stderr = run_cli("adapt", source, images, "--out", str(out))
        assert code == 2 and expected in stderr, stderr
    code, _, stderr = run_cli("adapt", source, images, "--out", str(site / "x"), "--site", "   ")
    assert code == 2 and "--site" in stderr
    # The image size limit is the user's to raise, as for predict.
    code, _, stderr = run_cli("adapt", source, images, "--out", str(site / "x"), "--max-pixels", "100")
    assert code == 2 and "none of the 25 image(s) could be used" in stderr and "max-pixels" in stderr
    # A licence that is a link is not followed, and said.
    (site / "model" / "DATA-LICENCE.txt").rename(site / "licence.txt")
    (site / "model" / "DATA-LICENCE.txt").symlink_to(site / "licence.txt")
    code, _, stderr = run_cli("adapt", source, images, "--out", str(site / "linked"))
    assert code == 0 and "not copied from" in stderr and "DATA-LICENCE.txt (a symbolic link" in stderr
    assert not (site / "linked" / "DATA-LICENCE.txt").exists()
    # A live adapt's working folder for another --out whose name looks like a left-over is never touched.
    other = site / f".linked.replaced-999999.adapting-{os.getpid()}.abc"
    other.mkdir()
    assert run_cli("adapt", source, images, "--out", str(site / "linked"), "--force")[0] == 0
    assert other.is_dir()


def test_a_member_of_an_ensemble_gets_no_threshold_of_its_own(tmp_path: Path) -> None:
    from alnus.ensemble import build_ensemble
    from tests.test_ensemble import make_run, pkg

    run = make_run(tmp_path)
    build_ensemble(run, "ens", [pkg(run, "tiny_cnn"), pkg(run, "tiny_same")])
    copy = Path(shutil.copytree(pkg(run, "ens"), tmp_path / "ens"))
    (tmp_path / "v.csv").write_text("image,patient_id,label\n")
    code, _, stderr = run_cli("threshold", str(copy / "members" / "1"), "--manifest", str(tmp_path / "v.csv"))
    assert code == 2 and "is a member of the ensemble" in stderr


def test_predicting_the_images_adapted_on_says_they_are_no_independent_test(site: Path) -> None:
    out = site / "adapted"
    assert run_cli("adapt", str(site / "model"), str(site / "site"), "--out", str(out))[0] == 0
    fresh = site / "fresh.png"
    Image.fromarray(np.full((40, 48), 99, dtype=np.uint8)).save(fresh)
    seen = [str(site / "site" / "im00.png"), str(site / "site" / "im05.png")]
    code, stdout, stderr = run_cli("predict", str(out), *seen, str(fresh), "--format", "csv")
    assert code == 0, stderr
    assert "2 of these image(s) were among those" in stderr and "no independent test" in stderr
    code, _, stderr = run_cli("predict", str(out), str(fresh), "--format", "csv")
    assert code == 0 and "were among those" not in stderr


def test_two_packages_calls_are_compared_when_they_call_the_same_cases(capsys: pytest.CaptureFixture[str]) -> None:
    """A second attack review: with no threshold in either package it said "only one of the two"; a patient mean
    against a patient max was refused though both call the same patients; "10 studys"."""
    import numpy as np

    from alnus import cli
    from alnus.adapt import _compare_calls

    truth = np.array([True] * 5 + [False] * 5)
    first, second = truth.copy(), np.ones(10, dtype=bool)
    assert _compare_calls([]).startswith("neither package has a frozen threshold")
    assert _compare_calls([("patient", "mean", truth, first)]).startswith("only one of the two packages has")
    found = _compare_calls([("study", "mean", truth, first), ("study", "max", truth, second)])
    assert found["specificity"].b == 5 and found["specificity"].c == 0 and found["sensitivity"].b == 0
    assert "different levels" in _compare_calls([("patient", "mean", truth, first), ("image", "mean", truth, second)])
    cli._show_calls_compared(found)
    assert "on the same 10 studies: sensitivity 100.0% vs 100.0%" in " ".join(capsys.readouterr().out.split())
    cli._show_calls_compared({**found, "level": "image"})
    assert "images of one patient count as independent cases here" in " ".join(capsys.readouterr().err.split())


def test_threshold_and_reader_rule_are_not_set_on_images_the_package_was_trained_on(site: Path) -> None:
    """An attack review: `alnus threshold` and `alnus reader-rule` froze their value on the package's own training
    images (100% sensitivity and specificity there) without a word, though the package lists them; its validation
    images stay allowed, as `alnus evaluate` freezes on them."""
    from alnus.adapt import freeze_reader_rule
    from alnus.data.seen import development_record, write_development_images

    package, folder = site / "model", site / "site"
    digest = "ab" * 32
    metadata = package / "metadata.json"
    metadata.write_text(json.dumps({**json.loads(metadata.read_text()), "training_data_hash": digest}))
    rows = [{"image": str(folder / f"im{i:02d}.png"), "split": "train" if i < 4 else "val"} for i in range(8)]
    write_development_images(package, development_record(rows, digest, None))
    table = pd.read_csv(folder / "validation.csv")
    table.assign(reader_birads=["4a", "4a", "3", "5"] * 6).to_csv(folder / "validation.csv", index=False)
    code, _, stderr = run_cli("threshold", str(package), "--manifest", str(folder / "validation.csv"), "--refreeze")
    said = " ".join(stderr.split())
    assert code == 2 and "4 of the 24 images (4 patient(s); rows 2, 3, 4, 5, e.g. im00.png)" in said, stderr
    assert "a threshold set on them would fit the model's own training data" in said and "Remove those" in said
    with pytest.raises(AdaptError, match="a reader rule set on them would fit the model's own training data"):
        freeze_reader_rule(package, folder / "validation.csv", refreeze=True)
    table.iloc[4:].to_csv(folder / "unseen.csv", index=False)  # validation images (4-7) and new ones
    assert run_cli("threshold", str(package), "--manifest", str(folder / "unseen.csv"), "--refreeze")[0] == 0
