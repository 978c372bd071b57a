"""The model shipped under models/ (issue 10.6): it loads on a fresh clone, predicts a lesion box from the command
line, says what it is validated for, keeps the repository lean, and reproduces its recorded probabilities on real
images (bench/ship_model.py wrote them, with the paths of those images inside ../shared/data)."""

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

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p.parent for p in (REPO / "models").glob("*/metadata.json"))
runner = CliRunner()
pytestmark = pytest.mark.skipif(not SHIPPED, reason="no model package under models/ (bench/ship_model.py writes one)")


@pytest.fixture(params=SHIPPED, ids=[p.name for p in SHIPPED])
def package(request: pytest.FixtureRequest) -> Path:
    return request.param


def test_models_folder_stays_lean() -> None:
    size = sum(p.stat().st_size for p in (REPO / "models").rglob("*") if p.is_file())
    assert size < 50 * 1024 * 1024, f"models/ holds {size / 2**20:.1f} MiB"


def test_shipped_package_is_frozen_and_says_what_it_is_validated_for(package: Path) -> None:
    meta = json.loads((package / "metadata.json").read_text(encoding="utf-8"))
    assert meta["threshold"] is not None, "evaluate froze the operating point on validation before shipping"
    assert meta["positive_label"] == "malignant"
    card = (package / "README.md").read_text(encoding="utf-8")
    assert "not** axillary lymph node status" in card and "Research use only" in card
    assert (package / "DATA-LICENCE-BUS-BRA.txt").read_text(encoding="utf-8").startswith("Copyright")
    parity = json.loads((package / "parity.json").read_text(encoding="utf-8"))
    assert parity["image_calls_changed"] == 0 and parity["patient_calls_changed"] == 0
    assert parity["max_abs_diff"] <= 1e-3


def test_predict_with_a_box_works_from_the_shipped_folder(package: Path, tmp_path: Path) -> None:
    """What README tells a new user to run: `alnus predict models/<name> IMAGE --roi x,y,w,h`."""
    yy, xx = np.mgrid[0:300, 0:400]
    rng = np.random.default_rng(0)
    image = 90 + 25 * rng.standard_normal((300, 400))
    image[((xx - 200) / 60) ** 2 + ((yy - 150) / 40) ** 2 < 1] = 30  # a dark, oval "lesion"
    path = tmp_path / "lesion.png"
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(path)
    result = runner.invoke(app, ["predict", str(package), str(path), "--roi", "130,100,140,100", "--format", "json"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    assert len(records) == 1 and 0.0 <= records[0]["prob"] <= 1.0
    assert records[0]["prediction"] in ("malignant", "benign") and records[0]["call"] in (0, 1)
    result = runner.invoke(app, ["predict", str(package), str(path), "--format", "json"])
    assert result.exit_code == 1 and "box" in result.output.lower(), "a package trained on boxes needs one"


@pytest.mark.realdata
def test_shipped_model_reproduces_its_recorded_probabilities_on_real_images(package: Path, shared_data: Path) -> None:
    from alnus.predict import Predictor

    examples = pd.read_csv(package / "examples.csv", dtype={"roi": str})
    assert set(examples["label"]) == {"benign", "malignant"}
    # Paths relative to the package's folder, into ../shared/data beside the repository: the file is a manifest.
    prefix = "../../../shared/data/"
    assert all(image.startswith(prefix) for image in examples["image"])
    rows = examples.assign(image=[str(shared_data / image.removeprefix(prefix)) for image in examples["image"]])
    probs = Predictor(package, device="cpu", engine="torch").predict_table(rows, package)["prob"].to_numpy()
    np.testing.assert_allclose(probs, examples["prob"].to_numpy(), atol=1e-4)
    if (package / prefix).resolve() != shared_data.resolve():
        pytest.skip(f"the data ({shared_data}) is not beside the repository, so examples.csv is no manifest here")
    # As README says: `alnus predict PACKAGE --manifest PACKAGE/examples.csv` predicts them all.
    result = CliRunner().invoke(app, ["predict", str(package), "--manifest", str(package / "examples.csv"),
                                      "--format", "csv", "--device", "cpu"])  # fmt: skip
    assert result.exit_code == 0, result.output
    table = pd.read_csv(io.StringIO(result.stdout))
    np.testing.assert_allclose(table["prob"].to_numpy(), examples["prob"].to_numpy(), atol=1e-4)


def test_shipped_package_lists_the_images_it_learned_from_as_hashes(package: Path) -> None:
    """A new user's review: the shipped model predicted its own BUS-BRA training images without a word. It carries
    its training and validation images' hashes, bound to its weights' training (never the images themselves)."""
    from alnus.data.seen import FILE, read_development_images
    from alnus.models.package import read_metadata

    seen = read_development_images(package, read_metadata(package)["training_data_hash"])
    assert seen is not None and set(seen.splits) == {"train", "val"}
    assert (package / FILE).stat().st_size < 1024 * 1024  # hashes only


@pytest.mark.realdata
def test_the_shipped_model_warns_about_its_training_images_and_not_about_the_external_ones(
    package: Path, shared_data: Path
) -> None:
    from alnus.data.images import load_image
    from alnus.predict import Predictor

    predictor = Predictor(package, device="cpu", engine="torch")
    bus = sorted((shared_data / "BUS-BRA" / "images").glob("*.png"))
    warned = [bool(predictor.seen_warning(load_image(p))) for p in bus[:40]]
    assert sum(warned) >= 25  # about 80% of BUS-BRA's patients are training or validation patients
    breast = sorted((shared_data / "BrEaST-Lesions-USG" / "images").glob("case*.png"))[:40]
    assert breast and not any(predictor.seen_warning(load_image(p)) for p in breast)


def test_shipped_package_carries_a_reader_rule_set_on_validation(package: Path) -> None:
    from alnus.models.package import read_metadata

    rule = read_metadata(package)["reader_rule"]
    assert rule is not None and 0.0 < rule["value"] < 1.0 and rule["positive_from"] == "4a"
    assert rule["chosen_on"]["n_lowest_pos"] >= 20 and rule["chosen_on"]["reader_sensitivity"] == 1.0
    assert "validation" in rule["frozen_on"]
    assert (package / "README.md").read_text(encoding="utf-8").count("<!-- reader-rule:start -->") == 1
    assert not read_metadata(package).get("reader_rule_history"), "the ship sets the rule once"


def test_the_shipped_card_is_the_one_the_current_code_writes(package: Path) -> None:
    """bench/ship_model.py writes the card afresh from the run: its selection line says where its AUC comes from."""
    card = (package / "README.md").read_text(encoding="utf-8")
    assert "per patient, as computed while training)" in card


@pytest.mark.realdata
def test_the_shipped_reader_rule_spares_benign_biopsies_on_the_external_patients(package: Path, shared_data: Path,
                                                                                 tmp_path: Path) -> None:  # fmt: skip
    """README's numbers: with the BrEaST radiologists' BI-RADS, the calls with AI keep their sensitivity and raise
    their specificity, per patient, as `alnus predict` gives them from a manifest with a reader_birads column."""
    from alnus.data.importers import import_dataset

    manifest = import_dataset("breast", shared_data / "BrEaST-Lesions-USG", tmp_path / "breast")
    rows = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    rows = rows[rows["label"].isin(["benign", "malignant"])]
    rows.to_csv(tmp_path / "external.csv", index=False)
    result = CliRunner().invoke(app, ["predict", str(package), "--manifest", str(tmp_path / "external.csv"),
                                      "--format", "csv", "--device", "cpu", "--engine", "torch"])  # fmt: skip
    assert result.exit_code == 0, result.output
    out = pd.read_csv(io.StringIO(result.stdout))
    truth = dict(zip(rows["image"].map(lambda p: str(Path(p).name)), rows["label"], strict=True))
    out["y"] = [truth[Path(p).name] == "malignant" for p in out["image"]]
    patients = out.groupby("patient_id").first()
    sick, well = patients[patients["y"]], patients[~patients["y"]]
    assert len(patients) == 252 and len(well) == 154
    assert sick["reader_call"].mean() == sick["with_ai_call"].mean() == 1.0
    assert (well["reader_call"] == 0).sum() == 67 and (well["with_ai_call"] == 0).sum() == 80


def test_readme_says_what_its_first_example_is_and_what_the_model_gives() -> None:
    """A new user's review: README's first example (case001) is a benign lesion the model calls malignant, and README
    did not say so; its words now state the truth, the probability and the threshold, checked here against the
    package's own examples.csv and metadata."""
    package = REPO / "models" / "breast-us-malignancy"
    if not package.is_dir():
        pytest.skip("the real-data package is not shipped here")
    readme = " ".join((REPO / "README.md").read_text(encoding="utf-8").split())
    first = pd.read_csv(package / "examples.csv").iloc[0]
    threshold = json.loads((package / "metadata.json").read_text())["threshold"]["value"]
    assert first["image"].endswith("case001.png") and first["label"] == "benign" and first["prob"] >= threshold
    assert "case001 is benign by the dataset's truth" in readme
    assert f"calls it malignant ({first['prob']:.3f}, above its threshold {threshold:.3f})" in readme
    results = (REPO / "docs" / "results.md").read_text(encoding="utf-8")
    assert "the specificity of 67.5% on this external site" in readme and "at 67.5% specificity" in results
