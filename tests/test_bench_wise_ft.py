"""bench/wise_ft.py (protocol item 26): a linear probe on frozen features, folded into a network's head, and the
weight interpolation between that network and a fine-tuned one."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch


@pytest.fixture
def wise(bench):
    return bench("wise_ft")


def _net(seed: int):
    from alnus.models import create_model

    torch.manual_seed(seed)
    net = create_model("tiny_cnn").eval()
    with torch.no_grad():  # a head whose outputs are far from 0, so that the networks' outputs differ visibly
        net.classifier().weight.normal_()
    return net


def test_the_ends_of_the_interpolation_are_the_two_networks_and_the_middle_is_neither(wise) -> None:
    probe, tuned = _net(0), _net(1)
    with torch.no_grad():  # batch-norm statistics that differ, so they are interpolated too
        for m in tuned.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.fill_(-0.1)
                m.running_var.fill_(0.5)
                m.num_batches_tracked.fill_(7)
    a_state, b_state = probe.state_dict(), tuned.state_dict()
    x = torch.rand(3, 1, 32, 32)
    out = {}
    for a in (0.0, 0.5, 1.0):
        net = _net(2)
        net.load_state_dict(wise.interpolate(a_state, b_state, a))
        out[a] = net.eval()(x)
    torch.testing.assert_close(out[0.0], probe(x))
    torch.testing.assert_close(out[1.0], tuned(x))
    assert not torch.allclose(out[0.5], out[0.0]) and not torch.allclose(out[0.5], out[1.0])
    half = wise.interpolate(a_state, b_state, 0.5)
    key = next(k for k in half if k.endswith("running_mean"))
    torch.testing.assert_close(half[key], (a_state[key] + b_state[key]) / 2)
    counter = next(k for k in half if k.endswith("num_batches_tracked"))
    assert half[counter].item() == 7  # integer tensors are the tuned network's, not averaged


def test_networks_that_differ_are_refused(wise) -> None:
    state = _net(0).state_dict()
    with pytest.raises(ValueError, match="differ in their tensors"):
        wise.interpolate(state, {k: v for k, v in state.items() if "classifier" not in k}, 0.5)
    wrong = dict(state)
    key = next(k for k in wrong if k.endswith("classifier.weight"))
    wrong[key] = torch.zeros(2, wrong[key].shape[1])
    with pytest.raises(ValueError, match="shape"):
        wise.interpolate(state, wrong, 0.5)


def test_the_standardisation_folded_into_the_head_gives_the_same_scores(wise) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(5.0, 3.0, size=(50, 4))
    mean, scale = x.mean(0), x.std(0)
    coef, intercept = rng.normal(size=4), 0.7
    weight, bias = wise.fold_standardisation(coef, intercept, mean, scale)
    np.testing.assert_allclose(x @ weight + bias, ((x - mean) / scale) @ coef + intercept)


def test_the_probe_separates_informative_features_and_keeps_patients_together(wise) -> None:
    rng = np.random.default_rng(1)
    patients = np.repeat(np.arange(60), 2)  # two images per patient
    y = (patients % 2).astype(int)
    x = rng.normal(size=(120, 6))
    x[:, 0] += 2.5 * y  # one informative feature, the rest noise; a constant column must not break the scaling
    x[:, 5] = 1.0
    probe = wise.fit_probe(x, y, patients.astype(str))
    assert probe["C"] in wise.C_GRID and set(probe["cv_auc"]) == set(wise.C_GRID)
    assert probe["cv_auc"][probe["C"]] > 0.85
    score = x @ probe["weight"] + probe["bias"]
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(y, score) > 0.9
    assert abs(probe["weight"][0]) == np.abs(probe["weight"]).max()


def _rows(val: dict[float, float]) -> list[dict]:
    return [{"split": "val", "a": a, "auc": auc} for a, auc in val.items()]


def _candidates(*rows: tuple[str, int, float]) -> pd.DataFrame:
    return pd.DataFrame([{"name": n, "passes": k, "val AUC": v} for n, k, v in rows])


def test_the_rule_takes_the_best_middle_a_and_applies_the_choice_rule_to_rounded_aucs(wise) -> None:
    val = {0.0: 0.90, 0.25: 0.95, 0.5: 0.97, 0.75: 0.97, 1.0: 0.96}
    current = _candidates(("aux_birads", 1, 0.959), ("seeds", 3, 0.957))
    text, a_star = wise.verdict({"rows": _rows(val)}, current)
    assert a_star == 0.75  # the tie goes to the larger a, nearer the registered model
    assert "the rule points to wise_ft (a = 0.75)" in text
    lower = {**val, 0.5: 0.94, 0.75: 0.93}
    text, _ = wise.verdict({"rows": _rows(lower)}, current)
    assert "still points there" in text and "**0.25**" in text and "so far is aux_birads" in text
    # 0.9594 rounds to 0.959, as the recorded row: a tie, which the current choice keeps.
    text, _ = wise.verdict({"rows": _rows({**lower, 0.0: 0.9594})}, current)
    assert "still points there" in text
    # Within 0.005 of a costlier ensemble, the single forward pass wins, as public_final's rule says.
    text, _ = wise.verdict({"rows": _rows({**lower, 0.0: 0.957})}, _candidates(("all_tta", 12, 0.960)))
    assert "the rule points to probe" in text


def _result(val: dict[float, float], internal: float, external: dict[float, float], c: float) -> dict:
    rows = [{"split": "val", "a": a, "auc": auc} for a, auc in val.items()]
    rows += [{"split": "internal_test", "a": a, "auc": internal} for a in val]
    rows += [{"split": "external_test", "a": a, "auc": external.get(a, 0.8)} for a in val]
    return {"rows": rows, "C": c}


def test_the_reading_is_computed_from_the_table(wise) -> None:
    dip = {0.0: 0.88, 0.25: 0.85, 0.5: 0.80, 0.75: 0.86, 1.0: 0.95}
    smooth = {0.0: 0.88, 0.25: 0.90, 0.5: 0.92, 0.75: 0.94, 1.0: 0.95}
    results = {"one": _result(dip, 0.95, {0.0: 0.82, 1.0: 0.85}, 1e-3),
               "two": _result(smooth, 0.95, {0.0: 0.90, 1.0: 0.85}, 0.1)}  # fmt: skip
    text = wise.reading(results)
    assert "below both ends in 1 of 2 runs, so in some runs" in text
    assert "the probe falls by 0.090 on average (0.050-0.130)" in text
    assert "the fine-tuned networks by 0.100 on average (0.100-0.100)" in text
    assert "about as much as the fine-tuned ones" in text
    assert "edge of the registered grid" in text and "for 1 of 2 runs" in text
    alone = wise.reading({"two": results["two"]})
    assert "the probe falls by 0.050 and" in alone and "less than the fine-tuned ones" in alone
    assert "edge of the registered grid" not in alone
    assert "below both ends in 0 of 1 runs, so the interpolation passes through no worse models" in alone
    assert "not joined by a path" in wise.reading({"one": results["one"]})


def test_a_probe_whose_folds_hold_one_class_is_refused_not_given_the_first_c(wise) -> None:
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(60, 8)), np.zeros(60, int)
    y[[0, 1, 2]] = 1
    with pytest.raises(ValueError, match="not finite: a fold holds one class only"), pytest.warns(UserWarning):
        wise.fit_probe(x, y, np.repeat(np.arange(30), 2).astype(str))


def test_patients_are_scored_by_the_mean_of_their_images_within_each_split(wise) -> None:
    table = pd.DataFrame({
        "image": ["a1", "a2", "b1", "c1"],
        "patient_id": ["A", "A", "B", "C"],
        "label": ["malignant", "malignant", "benign", "benign"],
        "split": ["val", "val", "val", "external_test"],
    })  # fmt: skip
    got = wise.per_patient(table, np.array([0.2, 0.6, 0.3, 0.9]))
    assert got.values.tolist() == [["val", "A", 1, 0.4], ["val", "B", 0, 0.3], ["external_test", "C", 0, 0.9]]
    with pytest.raises(Exception, match="label"):  # a patient whose images disagree on the label is refused
        wise.per_patient(table.assign(label=["malignant", "benign", "benign", "benign"]), np.full(4, 0.5))
