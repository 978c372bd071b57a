"""The radiologist with AI in `alnus serve`: a request's BI-RADS gives the radiologist's call and the call with AI by
the package's reader rule (`alnus.reader_rule`), as `alnus predict --birads` gives them; /v1/model describes the rule;
a wrong BI-RADS, or one sent to a package without a rule, is a 422 that says what to do."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from alnus.combine import apply_reader_rule
from alnus.data.roi import format_box
from alnus.models.package import read_metadata
from alnus.reader_rule import call_words, describe_reader_rule, rule_caveats
from alnus.serve import ModelService, Settings
from tests.serve.conftest import (
    AUTH,
    BOX,
    LOW_BOX,
    assert_no_uploads_left,
    client_for,
    grey_image,
    png_bytes,
    predictor_of,
)


def _post(client: Any, box: tuple[int, int, int, int] = BOX, **data: str) -> Any:
    fields = {"roi": format_box(box), "heatmap": "false", **data}
    image = png_bytes(grey_image())
    return client.post("/v1/predict", files={"image": ("scan.png", image, "image/png")}, data=fields, headers=AUTH)


def _expected(probability: float, birads: str, rule: dict[str, Any]) -> dict[str, Any]:
    """What `alnus.reader_rule` says of one image, its own patient."""
    called = apply_reader_rule(pd.DataFrame({"prob": [probability]}), [birads], rule).iloc[0]
    return {"birads": called["birads"], "reader_call": int(called["reader_call"]),
            "with_ai_call": int(called["with_ai_call"])}  # fmt: skip


def test_a_birads_gives_the_radiologists_call_and_the_call_with_ai_by_the_packages_rule(
    rule_package: Path, tmp_path: Path
) -> None:
    rule = read_metadata(rule_package)["reader_rule"]
    client = client_for(predictor_of(rule_package), tmp_path)
    answers = {}
    for box, birads in [(LOW_BOX, "4a"), (BOX, "4a"), (LOW_BOX, "BI-RADS 4B"), (LOW_BOX, "3")]:
        response = _post(client, box, birads=birads)  # image, roi, heatmap and birads: within the field limit
        assert response.status_code == 200, response.text
        body = response.json()
        reader = body["reader_with_ai"]
        expected = _expected(body["probability"], birads, rule)
        assert {k: reader[k] for k in expected} == expected
        assert reader["with_ai"] == call_words(reader["reader_call"], reader["with_ai_call"])  # as `alnus predict`
        assert reader["rule"] == describe_reader_rule(rule) and reader["value"] == rule["value"]
        assert "this one image" in reader["note"]
        answers[box, birads] = reader
    # The rule's value lies between the two boxes' probabilities: only the lower one read as 4a is ruled out.
    assert (answers[LOW_BOX, "4a"]["reader_call"], answers[LOW_BOX, "4a"]["with_ai_call"]) == (1, 0)
    assert answers[LOW_BOX, "4a"]["ruled_out"] == 1 and answers[LOW_BOX, "4a"]["with_ai"].endswith("by the model)")
    assert (answers[BOX, "4a"]["with_ai_call"], answers[BOX, "4a"]["ruled_out"]) == (1, 0)
    # 4b is above the rule's lowest category: the radiologist's positive call stands whatever the model says.
    assert answers[LOW_BOX, "BI-RADS 4B"]["birads"] == "4b"
    assert (answers[LOW_BOX, "BI-RADS 4B"]["reader_call"], answers[LOW_BOX, "BI-RADS 4B"]["with_ai_call"]) == (1, 1)
    # A 3 is negative for the radiologist, and the rule never turns a negative call positive.
    assert (answers[LOW_BOX, "3"]["reader_call"], answers[LOW_BOX, "3"]["with_ai_call"]) == (0, 0)
    assert answers[LOW_BOX, "3"]["ruled_out"] == 0

    # Without a BI-RADS (or an empty one) the key is there, null; the rest of the answer is unchanged.
    plain, empty = _post(client).json(), _post(client, birads=" ").json()
    assert plain["reader_with_ai"] is None and empty["reader_with_ai"] is None
    with_birads = _post(client, birads="4a").json()
    assert {k: v for k, v in with_birads.items() if k != "reader_with_ai"} == {
        k: v for k, v in plain.items() if k != "reader_with_ai"
    }
    assert_no_uploads_left(tmp_path / "uploads")


def test_birads_0_is_incomplete_and_makes_no_call(rule_package: Path, tmp_path: Path) -> None:
    client = client_for(predictor_of(rule_package), tmp_path)
    reader = _post(client, birads="0").json()["reader_with_ai"]
    assert reader["birads"] == "0"
    assert [reader[k] for k in ("reader_call", "with_ai_call", "ruled_out")] == [None] * 3
    assert reader["with_ai"] == "" and "incomplete" in reader["note"]


def test_a_bad_birads_is_a_422_naming_the_field_and_the_categories(rule_package: Path, tmp_path: Path) -> None:
    client = client_for(predictor_of(rule_package), tmp_path)
    for value in ("4d", "7", "malignant", "x" * 500):
        response = _post(client, birads=value)
        assert response.status_code == 422, value
        detail = response.json()["detail"]
        assert detail.startswith("birads: ") and "4a, 4b, 4c" in detail, detail
        assert len(detail) < 200 and "x" * 21 not in detail  # a long value is not quoted whole
    assert_no_uploads_left(tmp_path / "uploads")


def test_a_birads_sent_to_a_package_without_a_rule_is_a_422_saying_how_to_set_one(
    package: Path, tmp_path: Path
) -> None:
    client = client_for(predictor_of(package), tmp_path)
    response = _post(client, birads="4a")
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert detail.startswith("birads: ") and "no reader rule" in detail
    assert "alnus reader-rule PACKAGE --manifest VALIDATION.csv" in detail
    assert _post(client).json()["reader_with_ai"] is None
    assert client.get("/v1/model", headers=AUTH).json()["reader_rule"] is None
    assert_no_uploads_left(tmp_path / "uploads")


def test_the_model_route_describes_the_rule_but_not_where_it_was_set(rule_package: Path, tmp_path: Path) -> None:
    rule = read_metadata(rule_package)["reader_rule"]
    client = client_for(predictor_of(rule_package), tmp_path)
    response = client.get("/v1/model", headers=AUTH)
    info = response.json()["reader_rule"]
    assert {k: info[k] for k in ("value", "positive_from", "lowest", "level", "aggregate", "chosen_on")} == {
        k: rule[k] for k in ("value", "positive_from", "lowest", "level", "aggregate", "chosen_on")
    }
    assert info["rule"] == describe_reader_rule(rule) and info["caveats"] == rule_caveats(rule, "positive")
    assert "this one image" in info["applied_here"]
    assert "secret-validation.csv" not in response.text  # the manifest it was set on (`frozen_on`) is left out
    schema = client.get("/openapi.json").json()["paths"]["/v1/predict"]["post"]["requestBody"]
    birads = schema["content"]["multipart/form-data"]["schema"]["properties"]["birads"]
    assert "reader rule" in birads["description"]


def test_images_predicted_together_each_get_their_own_reading(rule_package: Path) -> None:
    """The worker's batches mix requests with and without a BI-RADS: each answer gets its own (or none)."""
    service = ModelService(predictor_of(rule_package), Settings())
    try:
        value = service.predictor.metadata["reader_rule"]["value"]
        readers = service._reader_calls([value - 0.1, value + 0.1, value - 0.1, value - 0.1], ["4a", "4a", None, "4c"])
    finally:
        service.close()
    assert [r and (r["birads"], r["reader_call"], r["with_ai_call"]) for r in readers] == [
        ("4a", 1, 0),
        ("4a", 1, 1),
        None,
        ("4c", 1, 1),
    ]
    json.dumps(readers)  # the answer is plain JSON (no numpy or pandas scalars)


def test_a_repeated_birads_or_a_plain_4_under_a_4b_rule_is_a_422_not_a_guess(
    rule_package: Path, tmp_path: Path
) -> None:
    """Attack review: a repeated field was resolved last-one-wins (the call flipped with the fields' order), and a
    plain 4 under a rule that calls from 4b crashed the worker (500)."""
    client = client_for(predictor_of(rule_package), tmp_path)
    image = png_bytes(grey_image())
    response = client.post("/v1/predict", files={"image": ("scan.png", image, "image/png")}, headers=AUTH,
                           data={"roi": format_box(BOX), "heatmap": "false", "birads": ["4a", "5"]})  # fmt: skip
    assert response.status_code == 422 and "more than once" in response.json()["detail"]
    folder = tmp_path / "rule4b"
    import shutil

    from alnus.models.package import set_reader_rule
    from tests.serve.conftest import reader_rule_record

    shutil.copytree(rule_package, folder)
    set_reader_rule(folder, {**reader_rule_record(0.5), "positive_from": "4b", "lowest": ["4b"]}, refreeze=True)
    client = client_for(predictor_of(folder), tmp_path / "b")
    response = _post(client, birads="4")
    assert response.status_code == 422 and "plain BI-RADS 4" in response.json()["detail"]
    assert _post(client, birads="4b").status_code == 200
    assert_no_uploads_left(tmp_path / "uploads")


def test_a_package_changed_on_disk_while_serving_is_a_503_until_the_service_restarts(
    rule_package: Path, tmp_path: Path
) -> None:
    """An attack review: `alnus reader-rule --remove` (for a site where the rule does not hold) said "predict no longer
    gives the call with AI", but a running service went on applying the removed rule, as it would a threshold frozen
    again: the package is loaded once. A rewrite that changes nothing an answer depends on is not refused."""
    import shutil

    from alnus.models.package import remove_reader_rule

    package = tmp_path / "model"
    shutil.copytree(rule_package, package)
    client = client_for(predictor_of(package), tmp_path)
    assert _post(client, birads="4a").json()["reader_with_ai"] is not None
    metadata = package / "metadata.json"
    metadata.write_text(json.dumps(json.loads(metadata.read_text()), indent=1))  # same content, other bytes
    assert _post(client, birads="4a").status_code == 200
    remove_reader_rule(package)
    for fields in ({"birads": "4a"}, {}):
        response = _post(client, **fields)
        assert response.status_code == 503, response.text
        said = response.json()["detail"]
        assert "changed on disk after the service started (reader_rule)" in said and "restart `alnus serve`" in said
    assert_no_uploads_left(tmp_path / "uploads")
