"""The reader rule a package carries (`alnus.reader_rule`): set on labelled validation patients with their BI-RADS by
`alnus reader-rule`, applied by `alnus predict --birads` and written into the model card."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from alnus.adapt import write_card_section
from alnus.combine import apply_reader_rule, fit_rule_out
from alnus.data.dataset import PreprocessSpec
from alnus.evaluate import reader_rule_on_validation
from alnus.models import create_model
from alnus.models.package import PackageError, freeze_threshold, read_metadata, save_package, set_reader_rule
from alnus.predict import NEW_DATA_COLUMNS, Predictor
from alnus.reader_rule import CARD_END, CARD_START, ReaderRuleError, check_reader_rule
from alnus.readers import birads_call, birads_score, lowest_positive_scores
from tests._cli import run_cli

LABELS = ["benign", "malignant"]
META = {"label_names": LABELS, "positive_label": "malignant"}


def _rule(value: float = 0.5, **changes: object) -> dict:
    return {"method": "rule_out", "scale": "birads", "positive_from": "4a", "lowest": ["4", "4a"], "value": value,
            "level": "patient", "aggregate": "mean", **changes}  # fmt: skip


def test_the_rule_calls_a_patient_from_the_most_suspicious_reading_and_the_mean_of_the_predicted_images() -> None:
    table = pd.DataFrame({
        "patient_id": ["a", "a", "b", "c", "d", "e", "f", "g", "g"],
        "prob": [0.1, 0.5, 0.2, 0.2, 0.9, 0.1, 0.1, 0.1, np.nan],
    })  # fmt: skip
    birads = ["3", "4a", "4", "4b", "3", "", "0", "4a", "5"]
    out = apply_reader_rule(table, birads, _rule(0.4))
    # a: two images, mean 0.3 < 0.4, read 3 and 4a: the 4a counts, and the model rules it out.
    assert out.loc[0:1, "birads"].tolist() == ["4a", "4a"]
    assert out.loc[0:1, "reader_call"].tolist() == [1, 1] and out.loc[0:1, "with_ai_call"].tolist() == [0, 0]
    assert out.loc[2, "with_ai_call"] == 0 and out.loc[2, "reader_call"] == 1  # a plain 4 is in the lowest category
    assert out.loc[3, "with_ai_call"] == 1  # 4b is above the lowest category: never ruled out
    assert out.loc[4, "reader_call"] == 0 and out.loc[4, "with_ai_call"] == 0  # the model never calls a 3 positive
    assert out.loc[5:6, "with_ai_call"].isna().all()  # no reading, an incomplete one: no call with the radiologist
    # g: its second image failed (no probability): the patient's mean is the first's alone, its reading the worse.
    assert out.loc[7, "birads"] == "5" and out.loc[7, "with_ai_call"] == 1
    with pytest.raises(ReaderRuleError, match="2 BI-RADS value"):
        apply_reader_rule(table, ["3", "4"], _rule())


def test_prediction_calls_as_the_evaluation_does_on_the_same_cases() -> None:
    rng = np.random.default_rng(3)
    keys = np.array(["2", "3", "4", "4a", "4b", "4c", "5"])
    birads = rng.choice(keys, size=300)
    y = (rng.random(300) < birads_score(birads) / 7).astype(int)
    prob = np.clip(0.15 * y + rng.random(300) * 0.85, 0, 1)
    call = birads_call(birads)
    fitted = fit_rule_out(y, prob, birads_score(birads), call, lowest_positive_scores("4a"))
    at_prediction = apply_reader_rule(pd.DataFrame({"prob": prob}), list(birads), _rule(fitted.threshold))
    assert (at_prediction["with_ai_call"].to_numpy(dtype=int) == fitted.calls(prob, birads_score(birads), call)).all()
    assert (at_prediction["reader_call"].to_numpy(dtype=int) == call).all()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"value": 1.5}, "not a probability"),
        ({"value": True}, "not a probability"),
        ({"method": "fitted"}, "method"),
        ({"lowest": ["4b"]}, "lowest"),
        ({"positive_from": "3"}, "positive_from"),
        ({"level": "ward"}, "level"),
        ({"aggregate": "median"}, "aggregate"),
    ],
)
def test_a_damaged_rule_is_refused_naming_what_and_how_to_fix_it(changes: dict, message: str) -> None:
    with pytest.raises(ReaderRuleError, match=message) as err:
        check_reader_rule(_rule(**changes), "pkg/metadata.json")
    assert "pkg/metadata.json" in str(err.value) and "alnus reader-rule" in str(err.value)
    assert check_reader_rule(None, "x") is None
    with pytest.raises(ReaderRuleError, match="lacks value"):
        check_reader_rule({k: v for k, v in _rule().items() if k != "value"}, "x")
    with pytest.raises(ReaderRuleError, match="must be an object"):
        check_reader_rule([1], "x")


def test_the_value_is_the_lowest_probability_of_the_malignant_patients_in_the_lowest_category() -> None:
    rows = pd.DataFrame({
        "image": [f"i{i}.png" for i in range(8)],
        "patient_id": ["p0", "p0", "p1", "p2", "p3", "p4", "p5", "p6"],
        "label": ["malignant", "malignant", "malignant", "benign", "benign", "malignant", "benign", "benign"],
        "reader_birads": ["4", "4", "4a", "4a", "4", "5", "2", "0"],
    })  # fmt: skip
    predictions = rows[["image", "patient_id", "label"]].assign(
        y=(rows["label"] == "malignant").astype(int), prob=[0.2, 0.4, 0.6, 0.1, 0.5, 0.9, 0.05, 0.3]
    )
    rule = reader_rule_on_validation(rows, predictions, "reader_birads", positive_from="4a", level="patient",
                                aggregate="mean")  # fmt: skip
    assert rule["value"] == pytest.approx(0.3)  # p0's mean: the lower of the two malignant patients read 4 or 4a
    chosen = rule["chosen_on"]
    assert (chosen["n_cases"], chosen["n_lowest"], chosen["n_lowest_pos"], chosen["n_incomplete"]) == (6, 4, 2, 1)
    assert chosen["reader_sensitivity"] == 1.0
    # p2 (benign, 4a, 0.1) is ruled out; p3 (benign, 4, 0.5) is not: specificity 1/3 -> 2/3.
    assert chosen["reader_specificity"] == pytest.approx(1 / 3)
    assert chosen["with_ai_specificity"] == pytest.approx(2 / 3)
    no_cancer = rows.assign(label=["benign", "benign", "benign", "benign", "benign", "malignant", "benign", "benign"])
    with pytest.raises(ReaderRuleError, match="no validation case of the positive label was read BI-RADS 4 or 4a"):
        reader_rule_on_validation(no_cancer, predictions.assign(y=(no_cancer["label"] == "malignant").astype(int)),
                             "reader_birads", positive_from="4a", level="patient", aggregate="mean")  # fmt: skip
    with pytest.raises(ReaderRuleError, match="positive-from"):
        reader_rule_on_validation(
            rows, predictions, "reader_birads", positive_from="3", level="patient", aggregate="mean"
        )


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A package (threshold frozen, a model card) and a site's labelled validation images with BI-RADS readings."""
    torch.manual_seed(0)
    meta = {"preprocess": PreprocessSpec(size=32).to_dict(), "label_names": LABELS, "positive_label": "malignant"}
    package = tmp_path / "model"
    save_package(package, create_model("tiny_cnn").eval(), meta)
    point = {"value": 0.5, "rule": "youden", "target": None, "level": "patient", "aggregate": "mean"}
    freeze_threshold(package, point, reason="test")
    card = "# Model card\n\n## Operating threshold\n\n0.5.\n\n## Known limitations\n\nMany.\n"
    (package / "README.md").write_text(card)
    images = tmp_path / "site"
    images.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(24):
        pixels = np.clip(rng.normal(100 + 4 * i, 30, size=(40, 48)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(images / f"im{i:02d}.png")
        birads = ["3", "4", "4a", "4b", "5", "2"][i % 6]
        rows.append({"image": f"im{i:02d}.png", "patient_id": f"p{i}", "label": LABELS[int(i % 6 in (1, 2, 3, 4))],
                     "reader_birads": birads})  # fmt: skip
    pd.DataFrame(rows).to_csv(images / "validation.csv", index=False)
    return tmp_path


def test_reader_rule_is_set_once_on_the_validation_patients_and_written_into_the_card(site: Path) -> None:
    package, manifest = site / "model", site / "site" / "validation.csv"
    code, stdout, stderr = run_cli("reader-rule", str(package), "--manifest", str(manifest))
    assert code == 0, stdout + stderr
    rule = read_metadata(package)["reader_rule"]
    predictor = Predictor(package, device="cpu", precision="fp32")
    predictions = predictor.predict_table(pd.read_csv(manifest), manifest.parent)
    lowest = pd.read_csv(manifest)["reader_birads"].astype(str).isin(["4", "4a"]).to_numpy()
    malignant = predictions["y"].to_numpy() == 1
    assert rule["value"] == pytest.approx(predictions["prob"][lowest & malignant].min())
    assert rule["chosen_on"]["n_lowest"] == 8 and rule["chosen_on"]["n_lowest_pos"] == 8
    assert rule["frozen_on"].startswith("validation.csv") and "Set " in stdout and "only 8 malignant" in stderr
    card = (package / "README.md").read_text()
    assert card.count(CARD_START) == 1 and card.index(CARD_START) < card.index("## Known limitations")
    assert card.index("## Operating threshold") < card.index(CARD_START)
    code, _, stderr = run_cli("reader-rule", str(package), "--manifest", str(manifest))
    assert code == 2 and "already has a reader rule" in stderr and "--refreeze" in stderr
    assert run_cli("reader-rule", str(package), "--manifest", str(manifest), "--refreeze")[0] == 0
    assert len(read_metadata(package)["reader_rule_history"]) == 1
    assert (package / "README.md").read_text().count(CARD_START) == 1
    code, _, stderr = run_cli("reader-rule", str(package), "--manifest", str(manifest), "--reader", "reader_r9",
                           "--refreeze")  # fmt: skip
    assert code == 2 and "no column 'reader_r9'" in stderr and "reader_birads" in stderr
    # A run folder is refused with the package it meant.
    run = site / "run"
    (run / "models" / "tiny_cnn").mkdir(parents=True)
    (run / "splits.csv").write_text("x\n")
    code, _, stderr = run_cli("reader-rule", str(run), "--manifest", str(manifest))
    assert code == 2 and "run folder" in stderr


def test_a_bad_reading_or_one_class_is_refused_naming_the_manifest_before_any_image_is_predicted(
    site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attack review of issue 10: the BI-RADS error named a row but not the file, and came after every image was
    predicted; a manifest of one class got a message about "the validation split"."""
    import alnus.predict

    table = pd.read_csv(site / "site" / "validation.csv", dtype=str)
    table.loc[1, "reader_birads"] = "abc"
    table.to_csv(site / "site" / "odd.csv", index=False)
    table[table["label"] == "malignant"].to_csv(site / "site" / "one.csv", index=False)
    monkeypatch.setattr(alnus.predict.Predictor, "predict_table", lambda *a, **k: pytest.fail("predicted first"))
    code, _, stderr = run_cli("reader-rule", str(site / "model"), "--manifest", str(site / "site" / "odd.csv"))
    said = " ".join(stderr.split())
    assert code == 2 and "odd.csv: row 3, column reader_birads: 'abc' is not a BI-RADS category" in said
    for command in ("reader-rule", "threshold"):
        code, _, stderr = run_cli(command, str(site / "model"), "--manifest", str(site / "site" / "one.csv"),
                                  "--refreeze")  # fmt: skip
        said = " ".join(stderr.split())
        assert code == 2 and "one.csv has patients of one class only ('malignant')" in said, said
        assert "give a manifest with both" in said


def test_predict_gives_the_radiologist_and_the_radiologist_with_ai(site: Path) -> None:
    package, folder = site / "model", site / "site"
    image = str(folder / "im02.png")
    code, _, stderr = run_cli("predict", str(package), image, "--birads", "4a")
    assert code == 2 and "carries no reader rule" in stderr and "alnus reader-rule" in stderr
    prob = float(Predictor(package, device="cpu").predict_inputs(pd.DataFrame([{"image": image, "path": image}]))
                 ["prob"].iloc[0])  # fmt: skip
    for value, ruled_out in ((prob + 0.01, True), (prob - 0.01, False)):
        set_reader_rule(package, _rule(value), refreeze=True)
        code, stdout, stderr = run_cli("predict", str(package), image, "--birads", "4a", "--format", "csv")
        row = pd.read_csv(io.StringIO(stdout), dtype={"birads": str}).iloc[0]
        assert code == 0 and row["birads"] == "4a" and row["reader_call"] == 1
        assert row["with_ai_call"] == (0 if ruled_out else 1)
        assert row["ruled_out"] == int(ruled_out)
        assert row["with_ai"] == ("negative (ruled out by the model)" if ruled_out else "positive")
        assert "radiologist with AI" in stderr
        assert set(row.index) <= NEW_DATA_COLUMNS  # what `--keep` may not name
    assert {"patient_prob", "n_images", "call", "threshold"} <= set(row.index)  # this package has a threshold too
    code, _, stderr = run_cli("predict", str(package), image, "--birads", "7")
    assert code == 2 and "'7' is not a BI-RADS category" in stderr
    code, _, stderr = run_cli("predict", str(package), image, image, "--birads", "4a")
    assert code == 2 and "--birads was given 1 time(s) for 2 image(s)" in stderr


def test_a_manifests_readings_are_used_and_a_bad_one_costs_only_its_call(site: Path) -> None:
    package, folder = site / "model", site / "site"
    table = pd.DataFrame({"image": ["im00.png", "im01.png", "im02.png"], "patient_id": ["a", "b", "c"],
                          "reader_birads": ["4a", "four", ""]})  # fmt: skip
    table.to_csv(folder / "new.csv", index=False)
    code, _, stderr = run_cli("predict", str(package), "--manifest", str(folder / "new.csv"), "--format", "csv")
    assert code == 0 and "readings are not used: this package carries no reader rule" in stderr
    set_reader_rule(package, _rule(1.0))  # every 4a is ruled out
    code, stdout, stderr = run_cli("predict", str(package), "--manifest", str(folder / "new.csv"), "--format", "csv")
    out = pd.read_csv(io.StringIO(stdout), dtype=str, keep_default_na=False)
    assert code == 0 and out["prob"].ne("").all()  # every image is predicted
    assert out["with_ai_call"].tolist() == ["0", "", ""] and out["reader_call"].tolist() == ["1", "", ""]
    assert "'four' is not a BI-RADS category" in out.loc[1, "warning"] and out.loc[0, "warning"] == ""
    assert "no call with the radiologist" in stderr


def test_a_damaged_rule_in_a_package_is_refused_when_it_is_read(site: Path) -> None:
    package = site / "model"
    meta = json.loads((package / "metadata.json").read_text())
    meta["reader_rule"] = _rule(-0.2)
    (package / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(PackageError, match="value -0.2 is not a probability") as err:
        read_metadata(package)
    assert "metadata.json" in str(err.value)
    code, _, stderr = run_cli("predict", str(package), str(site / "site" / "im00.png"))
    assert code == 2 and "reader_rule" in stderr


def test_the_card_block_goes_after_the_threshold_or_at_the_end_and_is_replaced_not_repeated(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("# Card\n\nNo sections.\n")
    rule = {**_rule(0.25), "frozen_on": "v`al.csv", "chosen_on": {"n_cases": 3, "reader": "reader_x"}}
    assert write_card_section(tmp_path, rule, META)
    card = (tmp_path / "README.md").read_text()
    assert card.startswith("# Card\n\nNo sections.\n") and card.count(CARD_START) == 1 and "below 0.250" in card
    assert "v\\`al.csv" in card  # user text is escaped
    assert write_card_section(tmp_path, _rule(0.75), META)
    card = (tmp_path / "README.md").read_text()
    assert card.count(CARD_START) == 1 and "below 0.750" in card and "below 0.250" not in card
    (tmp_path / "README.md").unlink()
    assert not write_card_section(tmp_path, _rule(), META)  # no card: nothing written
    assert not (tmp_path / "README.md").exists()


def test_an_adapted_package_does_not_carry_its_sources_rule(site: Path) -> None:
    """The rule was set on the source's probabilities; new BatchNorm statistics move them, as for the threshold."""
    set_reader_rule(site / "model", _rule(0.4))
    assert write_card_section(site / "model", _rule(0.4), META)
    out = site / "adapted"
    code, stdout, stderr = run_cli("adapt", str(site / "model"), str(site / "site"), "--out", str(out))
    assert code == 0, stdout + stderr
    assert read_metadata(out)["reader_rule"] is None and read_metadata(site / "model")["reader_rule"] is not None
    card = (out / "README.md").read_text()
    assert CARD_START not in card and "Nor is the source's reader rule" in card and "## Known limitations" in card


def test_a_reading_the_rule_cannot_call_costs_only_that_images_reader_columns(site: Path) -> None:
    """Attack review: a plain 4 under a rule from 4b, or a bad reading on an image that failed, ended the whole run."""
    package, folder = site / "model", site / "site"
    set_reader_rule(package, _rule(0.5, positive_from="4b", lowest=["4b"]))
    (folder / "corrupt.png").write_bytes(b"not a png")
    images = ["im00.png", "corrupt.png", "im01.png", "im02.png"]
    table = pd.DataFrame({"image": images, "patient_id": ["a", "b", "c", "d"], "birads": ["4", "four", "4b", "0"]})
    table.to_csv(folder / "mixed.csv", index=False)
    code, stdout, stderr = run_cli("predict", str(package), "--manifest", str(folder / "mixed.csv"), "--format", "csv")
    assert stdout, stderr
    out = pd.read_csv(io.StringIO(stdout), dtype=str, keep_default_na=False)
    assert code == 1 and len(out) == 4 and out.loc[1, "error"] != ""  # only the corrupt file failed
    assert "plain BI-RADS 4" in out.loc[0, "warning"] and out.loc[0, "with_ai_call"] == "" and out.loc[0, "prob"]
    assert out.loc[2, "reader_call"] == "1" and out.loc[2, "with_ai"] in (
        "positive",
        "negative (ruled out by the model)",
    )
    assert out.loc[3, "birads"] == "0" and out.loc[3, "with_ai_call"] == "" and "BI-RADS 0 (incomplete)" in stderr


def test_predict_reads_the_column_the_rule_was_set_from_when_there_is_no_birads_column(site: Path) -> None:
    package, folder = site / "model", site / "site"
    rows = pd.read_csv(folder / "validation.csv").rename(columns={"reader_birads": "reader_dr_a"})
    rows.to_csv(folder / "dr_a.csv", index=False)
    code, _, _ = run_cli("reader-rule", str(package), "--manifest", str(folder / "dr_a.csv"), "--reader", "reader_dr_a")
    assert code == 0
    code, stdout, _ = run_cli("predict", str(package), "--manifest", str(folder / "dr_a.csv"), "--format", "csv")
    out = pd.read_csv(io.StringIO(stdout), dtype=str, keep_default_na=False)
    assert code == 0 and (out["birads"] == rows["reader_dr_a"].astype(str)).all()


@pytest.mark.parametrize("column", ["patient_id", "image", "label"])
def test_an_identifying_column_is_no_column_of_readings(site: Path, column: str) -> None:
    code, _, stderr = run_cli("reader-rule", str(site / "model"), "--manifest", str(site / "site" / "validation.csv"),
                           "--reader", column)  # fmt: skip
    assert code == 2 and "no column of readings" in stderr


@pytest.mark.parametrize(
    ("changes", "message"),
    [({"lowest": 5}, "lowest"), ({"lowest": None}, "lowest"), ({"value": 10**400}, "an integer of"),
     ({"chosen_on": "x"}, "chosen_on")],
)  # fmt: skip
def test_crafted_rules_are_refused_cleanly(changes: dict, message: str) -> None:
    """Attack review: these raised TypeError, OverflowError or (in the card) AttributeError."""
    with pytest.raises(ReaderRuleError, match=message):
        check_reader_rule(_rule(**changes), "pkg/metadata.json")


def test_the_card_is_repaired_from_metadata_and_placed_in_the_adapted_part(site: Path) -> None:
    """Attack review: a run killed between metadata.json and the card left them disagreeing (and a plain rerun only
    refused); in an adapted package's card the block went under the source model's part; a quoted marker in the
    card's prose cut part of it away."""
    package, manifest = site / "model", site / "site" / "validation.csv"
    assert run_cli("reader-rule", str(package), "--manifest", str(manifest))[0] == 0
    rule = read_metadata(package)["reader_rule"]
    set_reader_rule(package, {**rule, "value": 0.0123}, refreeze=True)  # as if killed before the card was written
    code, _, stderr = run_cli("reader-rule", str(package), "--manifest", str(manifest))
    assert code == 2 and "already has a reader rule" in stderr
    assert "below 0.012" in (package / "README.md").read_text()  # the card now says what metadata.json holds
    out = site / "adapted"
    assert run_cli("adapt", str(package), str(site / "site"), "--out", str(out))[0] == 0
    assert run_cli("reader-rule", str(out), "--manifest", str(manifest))[0] == 0
    card = (out / "README.md").read_text()
    assert card.count(CARD_START) == 1 and card.index(CARD_START) < card.index("## Before adaptation")
    quoted = f"# Card\n\nThe block starts at `{CARD_START}` in prose.\n\n## Operating threshold\n\n0.5.\n"
    (package / "README.md").write_text(quoted)
    assert write_card_section(package, read_metadata(package)["reader_rule"], META)
    card = (package / "README.md").read_text()
    assert "in prose." in card and "## Operating threshold" in card and "below 0.012" in card


def test_the_history_stays_short_and_control_characters_stay_out_of_the_card(site: Path) -> None:
    package = site / "model"
    for i in range(25):
        set_reader_rule(package, _rule(0.01 * (i + 1)), refreeze=True)
    assert len(read_metadata(package)["reader_rule_history"]) == 20
    evil = site / "site" / "v\x1b[31mal.csv"
    (site / "site" / "validation.csv").rename(evil)
    code, stdout, _ = run_cli("reader-rule", str(package), "--manifest", str(evil), "--refreeze")
    assert code == 0 and "\x1b" not in (package / "README.md").read_text() and "\x1b" not in stdout
    assert "\\x1b" in read_metadata(package)["reader_rule"]["frozen_on"]


def test_the_caveats_are_in_the_card_and_on_the_terminal(site: Path) -> None:
    package, manifest = site / "model", site / "site" / "validation.csv"
    code, _, stderr = run_cli("reader-rule", str(package), "--manifest", str(manifest))
    assert code == 0 and "about 1 in 9 malignant patients" in stderr and "only 8 malignant" in stderr.lower()
    card = (package / "README.md").read_text()
    assert "about 1 in 9 malignant patients read so can be expected to fall below it" in card
    assert "not a diagnosis" in card


def test_score_checks_the_rule_against_the_radiologist_on_a_sites_labelled_patients(site: Path) -> None:
    """What the caveats ask for: the rule scored on other labelled patients, with counts that `alnus predict` gives."""
    package, folder = site / "model", site / "site"
    prob = Predictor(package, device="cpu", precision="fp32").predict_table(pd.read_csv(folder / "validation.csv"),
                                                                           folder)["prob"]  # fmt: skip
    set_reader_rule(package, _rule(float(prob.median())))
    code, stdout, _ = run_cli("score", str(package), "--manifest", str(folder / "validation.csv"))
    assert code == 0 and "vs alone, 24 patients with a reading" in " ".join(stdout.split())
    _, csv, _ = run_cli("predict", str(package), "--manifest", str(folder / "validation.csv"), "--format", "csv")
    out = pd.read_csv(io.StringIO(csv))
    truth = pd.read_csv(folder / "validation.csv")["label"] == "malignant"
    for metric, cases, hit in (("sensitivity", truth, 1), ("specificity", ~truth, 0)):
        reader, with_ai = (
            int((out.loc[cases, "reader_call"] == hit).sum()),
            int((out.loc[cases, "with_ai_call"] == hit).sum()),
        )
        assert f"{reader}/{int(cases.sum())}" in stdout and f"{with_ai}/{int(cases.sum())}" in stdout, metric
    turned = out["ruled_out"] == 1
    wrong = int((turned & truth).sum())
    assert (f"{int(turned.sum())} patient(s) the radiologist called positive were ruled out by the model: "
            f"{int(turned.sum()) - wrong} negative and {wrong} positive by the truth") in stdout  # fmt: skip
    assert f"ruled out below {float(prob.median()):.3f}" in stdout
    band = pd.read_csv(folder / "validation.csv")["reader_birads"].astype(str).isin(["4", "4a"])
    assert (f"The rule's band here: {int(band.sum())} patient(s) read 4 or 4a, {int((band & truth).sum())} "
            "positive") in " ".join(stdout.split())  # fmt: skip


def test_a_refused_reading_costs_its_whole_patient_the_reader_columns(site: Path) -> None:
    """Second attack review: the refused reading was dropped and the patient called from its other images, so a
    suspicious reading could be lost (a plain 4 under a 4b rule beside a 3 called the patient negative)."""
    package, folder = site / "model", site / "site"
    set_reader_rule(package, _rule(0.99, positive_from="4b", lowest=["4b"]))
    (folder / "corrupt.png").write_bytes(b"not a png")
    table = pd.DataFrame({"image": ["im00.png", "im01.png", "im02.png", "corrupt.png", "im03.png", "im04.png"],
                          "patient_id": ["a", "a", "b", "b", "c", "c"],
                          "birads": ["4", "3", "3", "4c?", "4b", "3"]})  # fmt: skip
    table.to_csv(folder / "patients.csv", index=False)
    code, stdout, _ = run_cli("predict", str(package), "--manifest", str(folder / "patients.csv"), "--format", "csv")
    out = pd.read_csv(io.StringIO(stdout), dtype=str, keep_default_na=False)
    assert code == 1 and (out.loc[:3, ["birads", "reader_call", "with_ai_call", "with_ai"]] == "").all().all()
    assert "plain BI-RADS 4" in out.loc[0, "warning"] and "another image of this patient" in out.loc[1, "warning"]
    assert "'4c?' is not a BI-RADS category" in out.loc[2, "warning"]  # its sibling failed: said on the good image
    assert "lesion box" not in out.loc[1, "warning"]  # the reading, not the box, is what went wrong
    assert out.loc[4:, "birads"].tolist() == ["4b", "4b"] and out.loc[4:, "ruled_out"].tolist() == ["1", "1"]


def test_an_empty_birads_column_does_not_hide_the_readings_of_another(site: Path) -> None:
    package, folder = site / "model", site / "site"
    set_reader_rule(package, _rule(0.5))
    pd.DataFrame({"image": ["im00.png"], "birads": [""], "reader_birads": ["4a"]}).to_csv(folder / "e.csv", index=False)
    code, stdout, _ = run_cli("predict", str(package), "--manifest", str(folder / "e.csv"), "--format", "csv")
    assert code == 0 and pd.read_csv(io.StringIO(stdout), dtype=str)["birads"].iloc[0] == "4a"


def test_card_markers_quoted_or_shown_as_an_example_are_not_the_block(site: Path, tmp_path: Path) -> None:
    example = f"## How to read\n\n```\n{CARD_START}\n```\n\nKeep me.\n\n"
    (tmp_path / "README.md").write_text(f"# Card\n\n{example}## Operating threshold\n\n0.5.\n")
    for value in (0.25, 0.75):
        assert write_card_section(tmp_path, _rule(value), META)
    card = (tmp_path / "README.md").read_text()
    assert "Keep me." in card and "## Operating threshold" in card and "below 0.750" in card
    assert "below 0.250" not in card
    from alnus.reader_rule import without_card_block

    kept, had = without_card_block(f"# Card\n\nThe block starts at `{CARD_START}`.\n\n## Intended use\n\nAdults.\n")
    assert not had and "## Intended use" in kept
    kept, had = without_card_block(card)
    assert had and "Keep me." in kept and "below 0.750" not in kept


@pytest.mark.parametrize(
    "chosen",
    [{"reader_sensitivity": "a"}, {"n_lowest_pos": True}, {"n_cases": 1.5}, {"reader": 5}],
)
def test_the_recorded_counts_and_proportions_are_checked(chosen: dict) -> None:
    with pytest.raises(ReaderRuleError, match="chosen_on"):
        check_reader_rule(_rule(chosen_on=chosen), "pkg/metadata.json")


def test_control_characters_in_a_column_name_stay_out_of_the_card(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("# Card\n")
    rule = _rule(0.3, chosen_on={"reader": "dr\x1b[31mX\x07", "n_cases": 3})
    assert write_card_section(tmp_path, rule, META)
    card = (tmp_path / "README.md").read_text()
    assert "\x1b" not in card and "\x07" not in card and "x1b" in card  # shown as text, never sent to a terminal


def test_two_writers_of_one_package_take_turns(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Attack review: a threshold frozen while a reader rule was being set was lost (read-modify-write of
    metadata.json without a lock). A writer now waits for the other, and says so when it waited too long; no lock
    file is left in the package."""
    import threading

    import alnus.models.package as package_module

    monkeypatch.setattr(package_module, "LOCK_TIMEOUT_S", 0.3)
    package = site / "model"
    held, release = threading.Event(), threading.Event()

    def other_writer() -> None:
        with package_module.package_lock(package, timeout_s=5):
            held.set()
            release.wait(5)

    thread = threading.Thread(target=other_writer)
    thread.start()
    held.wait(5)
    with pytest.raises(PackageError, match="another command has been updating"):
        set_reader_rule(package, _rule(0.3))
    release.set()
    thread.join()
    assert read_metadata(package)["reader_rule"] is None
    set_reader_rule(package, _rule(0.3))  # once the other writer is done
    assert read_metadata(package)["reader_rule"]["value"] == 0.3
    assert sorted(p.name for p in package.iterdir() if p.name.startswith(".")) == []


def test_a_rule_is_removed_into_its_history_with_its_card_block_and_predict_stops_using_it(site: Path) -> None:
    package, manifest = site / "model", site / "site" / "validation.csv"
    code, _, stderr = run_cli("reader-rule", str(package))
    assert code == 2 and "give --manifest" in stderr and "--remove" in stderr
    code, _, stderr = run_cli("reader-rule", str(package), "--remove")
    assert code == 2 and "has no reader rule to remove" in stderr
    assert run_cli("reader-rule", str(package), "--manifest", str(manifest))[0] == 0
    rule = read_metadata(package)["reader_rule"]
    code, _, stderr = run_cli("reader-rule", str(package), "--remove", "--manifest", str(manifest))
    assert code == 2 and "--remove takes no --manifest" in stderr and read_metadata(package)["reader_rule"] == rule
    code, stdout, stderr = run_cli("reader-rule", str(package), "--remove")
    assert code == 0 and "Removed" in stdout and "and its block in the model card" in stdout, stdout + stderr
    meta = read_metadata(package)
    assert meta["reader_rule"] is None and {**meta["reader_rule_history"][-1], "removed_at": None} == {
        **rule,
        "removed_at": None,
    }
    card = (package / "README.md").read_text()
    assert CARD_START not in card and "## Known limitations" in card and "## Operating threshold" in card
    assert meta["reader_rule_history"][-1]["removed_at"][:2] == "20"
    code, _, stderr = run_cli("predict", str(package), str(site / "site" / "im02.png"), "--birads", "4a")
    assert code == 2 and "carries no reader rule (its rule was removed on 20" in " ".join(stderr.split())
    # A card block left behind (metadata.json edited by hand) is removed on its own, and said.
    assert run_cli("reader-rule", str(package), "--manifest", str(manifest))[0] == 0
    edited = read_metadata(package) | {"reader_rule": None}
    (package / "metadata.json").write_text(json.dumps(edited))
    code, stdout, _ = run_cli("reader-rule", str(package), "--remove")
    assert code == 0 and "stale rule block was removed" in stdout
    assert CARD_START not in (package / "README.md").read_text()


def test_remove_takes_every_block_out_and_says_what_it_could_not(site: Path) -> None:
    """Third attack review: a card with two blocks kept one, a lone marker or a linked card kept the rule's text,
    and each time the command said all was removed."""
    package, manifest = site / "model", site / "site" / "validation.csv"
    assert run_cli("reader-rule", str(package), "--manifest", str(manifest))[0] == 0
    card = (package / "README.md").read_text()
    block = card[card.index(CARD_START) : card.index(CARD_END) + len(CARD_END)]
    (package / "README.md").write_text(card + "\n" + block + "\n\n" + CARD_START + "\n")
    code, stdout, stderr = run_cli("reader-rule", str(package), "--remove")
    assert code == 0 and "and its block in the model card" in stdout
    left = (package / "README.md").read_text()
    assert left.count(CARD_START) == 1 and CARD_END not in left  # both blocks went; the lone marker is said
    assert "still has a reader-rule marker on line" in " ".join(stderr.split()) and "by hand" in stderr
    # A card that is a link is not rewritten, and that is said.
    assert run_cli("reader-rule", str(package), "--manifest", str(manifest), "--refreeze")[0] == 0
    (package / "README.md").rename(site / "card.md")
    (package / "README.md").symlink_to(site / "card.md")
    code, _, stderr = run_cli("reader-rule", str(package), "--remove")
    assert code == 0 and "symbolic link or over 1 MB, so it was not changed" in " ".join(stderr.split())
    assert CARD_END in (site / "card.md").read_text()
    # Options that only setting a rule uses are refused with --remove, not ignored.
    code, _, stderr = run_cli("reader-rule", str(package), "--remove", "--reader", "reader_r2", "--positive-from", "4b")
    assert code == 2 and "--remove takes no --reader, --positive-from" in stderr


def test_a_removal_date_that_is_no_date_is_not_shown(site: Path) -> None:
    package = site / "model"
    meta = read_metadata(package) | {"reader_rule_history": [{"removed_at": {"a": [1, "\x1b[31m"]}}]}
    (package / "metadata.json").write_text(json.dumps(meta))
    code, _, stderr = run_cli("predict", str(package), str(site / "site" / "im02.png"), "--birads", "4a")
    said = " ".join(stderr.split())
    assert code == 2 and "carries no reader rule, so --birads" in said and "removed on" not in said


def test_the_package_lock_is_reentrant_within_a_thread_and_exclusive_between_processes(site: Path) -> None:
    import subprocess
    import sys

    from alnus.models.package import package_lock, remove_reader_rule

    package = site / "model"
    set_reader_rule(package, _rule(0.4))
    with package_lock(package):
        remove_reader_rule(package)  # takes the same lock inside: no wait for itself
        other = subprocess.run(
            [sys.executable, "-c", "import sys; from pathlib import Path; from alnus.models.package import "
             "package_lock\ntry:\n    with package_lock(Path(sys.argv[1]), timeout_s=0.3): pass\nexcept Exception as e:"
             " print(type(e).__name__)", str(package)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert other.stdout.strip() == "PackageError"  # another process waits, then gives up with a message
    assert read_metadata(package)["reader_rule"] is None


@pytest.mark.parametrize(("ruled_out", "disagree"), [(5, True), (10, False)])
def test_score_says_when_a_mcnemar_p_and_its_interval_disagree(
    ruled_out: int, disagree: bool, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A statistician's review: `alnus score` showed an exact McNemar P of 0.0625 beside a difference interval that
    excluded 0 without a word; where the two methods disagree it now says so (5 of 20 ruled out: they do; 10: P 0.002
    and the interval agree)."""
    from alnus import cli, stats

    y = np.r_[np.zeros(20, dtype=bool), np.ones(5, dtype=bool)]
    reader = np.ones(25, dtype=bool)  # the radiologist calls everyone positive
    with_ai = reader.copy()
    with_ai[:ruled_out] = False  # the model rules out that many benign patients
    found: dict = {"reader": "reader_birads", "value": 0.2, "n": 25, "n_positive": 5, "level": "patient",
                   "n_incomplete": 0, "n_ruled_out": ruled_out, "n_ruled_out_positive": 0, "n_lowest": 25,
                   "lowest": ["4a"], "n_lowest_positive": 5}  # fmt: skip
    for metric, subset in (("sensitivity", "positives"), ("specificity", "negatives")):
        r = stats.mcnemar_test(y, with_ai, reader, subset=subset)
        found[metric] = {"reader": r.prop_b, "combined": r.prop_a, "difference": r.estimate, "ci_low": r.ci_low,
                         "ci_high": r.ci_high, "p": r.p}  # fmt: skip
        cases = y if subset == "positives" else ~y
        found[f"reader_{metric}_k"] = int((reader[cases] == y[cases]).sum())
        found[f"with_ai_{metric}_k"] = int((with_ai[cases] == y[cases]).sum())
    auc = {"estimate": 0.5, "ci_low": 0.4, "ci_high": 0.6, "p": 1.0}
    found |= {"auc_reader": auc, "auc_combined": auc, "auc_difference": auc}
    from rich.console import Console

    monkeypatch.setattr(cli, "console", Console(width=300))
    cli._show_rule_on_site("pkg", found)
    printed = capsys.readouterr()
    said = " ".join(printed.err.split())
    spec = found["specificity"]
    assert ((spec["p"] < 0.05) != (spec["ci_low"] > 0)) == disagree
    assert ("specificity: the exact test (P" in said) == disagree, said
    assert "sensitivity: the exact test" not in said  # no discordant positive: nothing to reconcile
    # The AUC row's label says what each column ranks by (a new user read the tie-break as the radiologist's alone).
    assert "AUC (alone: the category; with AI: the category, then the model inside it)" in printed.out


def test_score_shows_one_table_for_a_reader_rule_two_packages_share(site: Path) -> None:
    """A new user's review: two packages with one reader rule (a copy re-thresholded) printed the same
    radiologist-with-AI table twice."""
    import shutil

    package, folder = site / "model", site / "site"
    prob = Predictor(package, device="cpu", precision="fp32").predict_table(pd.read_csv(folder / "validation.csv"),
                                                                           folder)["prob"]  # fmt: skip
    set_reader_rule(package, _rule(float(prob.median())))
    shutil.copytree(package, site / "copy")
    manifest = str(folder / "validation.csv")
    run_cli("threshold", str(site / "copy"), "--manifest", manifest, "--rule", "sensitivity", "--target", "0.95",
            "--refreeze")  # fmt: skip
    code, stdout, stderr = run_cli("score", str(site / "copy"), str(package), "--manifest", manifest)
    assert code == 0, stdout + stderr
    assert stdout.count("the radiologist with AI") == 1
    assert "its reader rule is the same as the first package's, with the same results" in " ".join(stderr.split())


def test_a_run_packages_rule_is_not_set_on_the_runs_test_patients(site: Path) -> None:
    """An attack review: `alnus evaluate` says to set a run package's rule with `alnus reader-rule` when the run has
    several readers, and the command took the run's external test patients as readily as its validation ones."""
    import shutil

    from alnus.adapt import AdaptError, freeze_reader_rule

    run = site / "runs" / "demo"
    package = run / "models" / "tiny_cnn" / "model"
    shutil.copytree(site / "model", package)
    (run / "config.yaml").write_text("name: demo\n")
    table = pd.read_csv(site / "site" / "validation.csv", dtype=str)
    splits = table.assign(image=[str(site / "site" / p) for p in table["image"]], site="a",
                          split=["external_test"] * 6 + ["val"] * 18)  # fmt: skip
    splits.to_csv(run / "splits.csv", index=False)
    with pytest.raises(AdaptError, match=r"6 of the 24 images \(rows 2, 3, 4, 5, 6 \.\.\., e\.g\. im00\.png\) are test "
                       r"images of the run .*Set it on the run's validation patients"):  # fmt: skip
        freeze_reader_rule(package, site / "site" / "validation.csv")
    assert read_metadata(package)["reader_rule"] is None
    table.iloc[6:].to_csv(site / "site" / "val_only.csv", index=False)
    rule, _ = freeze_reader_rule(package, site / "site" / "val_only.csv")
    assert read_metadata(package)["reader_rule"]["value"] == rule["value"]
