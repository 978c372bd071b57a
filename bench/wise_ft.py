"""Real data, issue 10 (protocol item 26): robust fine-tuning by weight interpolation (WiSE-FT).

`probe` is the ImageNet EfficientNet-Lite0 as loaded, with a linear head fitted on its pooled features of the BUS-BRA
training images (class-balanced L2 logistic regression on standardised features, C by 5-fold patient-grouped
cross-validation inside the training patients; the standardisation folded into the head). `wise_ft(a)` interpolates
every weight and BatchNorm statistic between the probe (a = 0) and a fine-tuned package (a = 1); nothing is retrained.
Each run's own package and preprocessing are used; its validation, internal and external images are predicted for
each a and scored per patient (mean of a patient's images). Writes the `wise-ft` section of docs/results.md.

    .venv/bin/python bench/wise_ft.py [--runs aux_birads aux_birads_rerun aux_288 aux_shift aux_shape]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from _docs import write_section  # bench/ is on sys.path when a script here runs
from public_study import REPO, _cpu

RUNS = ("aux_birads", "aux_birads_rerun", "aux_288", "aux_shift", "aux_shape")
CHOSEN = "aux_birads"
ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
SPLITS = ("val", "internal_test", "external_test")
C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
MODEL = "efficientnet_lite0"
POSITIVE = "malignant"
BATCH = 32


def interpolate(probe: Mapping[str, torch.Tensor], tuned: Mapping[str, torch.Tensor], a: float) -> dict:
    """(1 - a) x probe + a x tuned for every floating-point tensor (weights and BatchNorm statistics); integer
    tensors (BatchNorm's batch counters) are the tuned network's. The two must have the same keys and shapes."""
    if probe.keys() != tuned.keys():
        raise ValueError(f"the two networks differ in their tensors: {sorted(set(probe) ^ set(tuned))[:5]}")
    out = {}
    for key, value in tuned.items():
        other = probe[key]
        if other.shape != value.shape:
            raise ValueError(f"{key}: shape {tuple(other.shape)} vs {tuple(value.shape)}")
        if value.is_floating_point():
            out[key] = (1 - a) * other.float() + a * value.float()
        else:
            out[key] = value.clone()
    return out


def fold_standardisation(coef: np.ndarray, intercept: float, mean: np.ndarray, scale: np.ndarray) -> tuple:
    """A linear head on standardised features, (x - mean) / scale, as one on the raw features: (w', b')."""
    weight = coef / scale
    return weight, float(intercept - (weight * mean).sum())


def fit_probe(
    features: np.ndarray, y: np.ndarray, groups: np.ndarray, seed: int = 0, grid: tuple[float, ...] = C_GRID
) -> dict:
    """The class-balanced L2 logistic regression on standardised features, C chosen from `grid` by 5-fold
    patient-grouped cross-validation (mean AUC over the folds, per image); refitted on all the given images."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold

    mean, scale = features.mean(0), features.std(0)
    scale = np.where(scale > 0, scale, 1.0)
    z = (features - mean) / scale
    folds = list(StratifiedGroupKFold(n_splits=5, shuffle=True, random_state=seed).split(z, y, groups))
    cv_auc = {}
    for c in grid:
        aucs = []
        for train, test in folds:
            fit = LogisticRegression(C=c, class_weight="balanced", max_iter=5000).fit(z[train], y[train])
            aucs.append(roc_auc_score(y[test], fit.decision_function(z[test])))
        cv_auc[c] = float(np.mean(aucs))
        if not np.isfinite(cv_auc[c]):
            raise ValueError(f"the probe's cross-validation AUC at C {c:g} is not finite: a fold holds one class only")
    best = max(grid, key=lambda c: (cv_auc[c], -c))  # the smaller C (stronger penalty) on a tie
    fit = LogisticRegression(C=best, class_weight="balanced", max_iter=5000).fit(z, y)
    weight, bias = fold_standardisation(fit.coef_[0], float(fit.intercept_[0]), mean, scale)
    return {"C": best, "cv_auc": cv_auc, "weight": weight, "bias": bias}


def _dataset(run: Path, table: pd.DataFrame, meta: dict):
    from alnus.data.dataset import ImageCache, PreprocessSpec, UltrasoundDataset

    spec = PreprocessSpec.from_dict(meta["preprocess"])
    positive = meta["positive_label"]
    dataset = UltrasoundDataset(table, run, spec, cache=ImageCache(run / "cache"), positive_label=positive)
    dataset.warm()
    return dataset


def _batches(dataset):
    for start in range(0, len(dataset), BATCH):
        yield torch.stack([dataset[i][0] for i in range(start, min(start + BATCH, len(dataset)))])


def pooled_features(model: torch.nn.Module, dataset) -> np.ndarray:
    """What the network's classifier receives (the pooled features), for every image of the dataset."""
    seen: list[np.ndarray] = []
    hook = model.classifier().register_forward_pre_hook(lambda _m, args: seen.append(args[0].float().numpy()))
    try:
        with torch.no_grad():
            for batch in _batches(dataset):
                model(batch)
    finally:
        hook.remove()
    return np.concatenate(seen)


def probabilities(model: torch.nn.Module, dataset) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([torch.sigmoid(model(batch).float()).numpy() for batch in _batches(dataset)])


def per_patient(table: pd.DataFrame, prob: np.ndarray) -> pd.DataFrame:
    """One row per (split, patient): its label y (0/1) and prob, the mean of its images' probabilities, as
    `alnus evaluate` combines them (`aggregate_predictions`, which also refuses a patient with mixed labels)."""
    from alnus.evaluate import aggregate_predictions

    images = table.assign(prob=prob, y=(table["label"].astype(str) == POSITIVE).to_numpy(int))
    return pd.concat(
        [
            aggregate_predictions(part, "patient", "mean").assign(split=split)
            for split, part in images.groupby("split", sort=False)
        ],
        ignore_index=True,
    )[["split", "patient_id", "y", "prob"]]


def study_run(name: str) -> dict:
    """One run: the probe fitted on its training images, and each a's per-patient AUCs with the DeLong test against
    a = 1 on the same patients."""
    from alnus import stats
    from alnus.models import create_model
    from alnus.models.package import load_package
    from alnus.runfolder import read_splits

    run = REPO / "runs" / f"public_{name}"
    tuned, meta = load_package(run / "models" / MODEL / "model")
    splits = read_splits(run)
    train = splits[splits["split"] == "train"].reset_index(drop=True)
    scored = splits[splits["split"].isin(SPLITS)].reset_index(drop=True)
    pretrained = create_model(MODEL, weights="imagenet").eval()
    features = pooled_features(pretrained, _dataset(run, train, meta))
    y = (train["label"].astype(str) == POSITIVE).to_numpy(int)
    probe = fit_probe(features, y, train["patient_id"].astype(str).to_numpy())
    head = pretrained.classifier()
    with torch.no_grad():
        head.weight.copy_(torch.as_tensor(probe["weight"], dtype=torch.float32).view_as(head.weight))
        head.bias.fill_(probe["bias"])
    dataset = _dataset(run, scored, meta)
    probe_state = {k: v.detach().clone() for k, v in pretrained.state_dict().items()}
    tuned_state = {k: v.detach().clone() for k, v in tuned.state_dict().items()}
    patients = {}
    for a in ALPHAS:
        tuned.load_state_dict(interpolate(probe_state, tuned_state, a))
        patients[a] = per_patient(scored, probabilities(tuned.eval(), dataset))
        print(f"{name}: a = {a} done", file=sys.stderr, flush=True)
    rows = []
    for split in SPLITS:
        ref = patients[1.0][patients[1.0]["split"] == split]
        for a in ALPHAS:
            part = patients[a][patients[a]["split"] == split]
            assert (part["patient_id"].to_numpy() == ref["patient_id"].to_numpy()).all()
            auc = stats.auc_ci(part["y"].to_numpy(), part["prob"].to_numpy())
            row = {"split": split, "a": a, "n": len(part), "positive": int(part["y"].sum()), "auc": auc.estimate,
                   "low": auc.ci_low, "high": auc.ci_high, "diff": None, "p": None}  # fmt: skip
            if a != 1.0:
                test = stats.delong_test(part["y"].to_numpy(), part["prob"].to_numpy(), ref["prob"].to_numpy())
                row |= {"diff": test.estimate, "p": test.p}
            rows.append(row)
    return {"C": probe["C"], "cv_auc": {str(c): v for c, v in probe["cv_auc"].items()}, "rows": rows,
            "size": meta["preprocess"].get("size"), "train_images": len(train)}  # fmt: skip


def _cell(row: dict) -> str:
    return f"{row['auc']:.3f} ({row['low']:.3f}-{row['high']:.3f})"


def verdict(chosen: dict, candidates: pd.DataFrame) -> tuple[str, float]:
    """Protocol item 26's rule for the chosen model: the a in 0.25-0.75 with the highest validation AUC; then `probe`
    and `wise_ft` at that a join the candidates (one forward pass each, their validation AUC rounded as a candidate
    row's is) and the rule of item 4 (`public_final.choose`: highest validation AUC, within 0.005 the fewest forward
    passes) says which it points to now."""
    from public_final import choose

    val = {r["a"]: r["auc"] for r in chosen["rows"] if r["split"] == "val"}
    a_star = max((0.25, 0.5, 0.75), key=lambda a: (val[a], a))  # the larger a (nearer the registered model) on a tie
    before = choose(candidates)
    new = pd.DataFrame([
        {"name": "probe", "passes": 1, "val AUC": round(val[0.0], 3)},
        {"name": f"wise_ft (a = {a_star})", "passes": 1, "val AUC": round(val[a_star], 3)},
    ])  # fmt: skip
    after = choose(pd.concat([candidates, new], ignore_index=True))
    lines = [f"For the chosen model ({CHOSEN}) the rule's a among 0.25-0.75 is **{a_star}** (validation AUC "
             f"{val[a_star]:.3f}); `probe` has validation AUC {val[0.0]:.3f}. The rule's choice so far is "
             f"{before['name']} (validation AUC {before['val AUC']:.3f}, {int(before['passes'])} forward "
             "pass(es))."]  # fmt: skip
    if after["name"] in set(new["name"]):
        lines.append(f"**With them, the rule points to {after['name']}** (protocol item 26: it is shipped in a later "
                     "session after its seeds; the shipped model stays until then).")  # fmt: skip
    else:
        lines.append("With them the rule still points there, so the rule's choice and the shipped model stay.")
    return " ".join(lines), a_star


def section(results: dict, seconds: float, command: str, candidates: pd.DataFrame) -> str:
    lines = [
        "## Real data: robust fine-tuning by weight interpolation (protocol item 26)",
        "",
        f"Command: `{command}`, {dt.date.today().isoformat()}, {_cpu()}, {os.cpu_count()} cores, {seconds / 60:.1f} "
        "min. a = 0 is `probe` (the ImageNet EfficientNet-Lite0 as loaded with a linear head fitted on the BUS-BRA "
        "training images' pooled features), a = 1 the run's fine-tuned package; in between, every weight and "
        "BatchNorm statistic is interpolated, nothing retrained. Per patient (mean of a patient's images), AUC with "
        "DeLong 95% CI; the last column is the paired DeLong difference against a = 1 on the external patients.",
        "",
        "| run | a | val AUC (selection) | internal AUC | external AUC | external minus a = 1 (P) |",
        "|---|---|---|---|---|---|",
    ]
    for name, result in results.items():
        by = {(r["split"], r["a"]): r for r in result["rows"]}
        for a in ALPHAS:
            ext = by[("external_test", a)]
            versus = "" if a == 1.0 else f"{ext['diff']:+.3f} ({ext['p']:.2g})"
            lines.append(f"| {name} | {a:g} | {' | '.join(_cell(by[(s, a)]) for s in SPLITS)} | {versus} |")
    lines += ["", "The probes: " + "; ".join(
        f"{name}, C {result['C']:g} (grouped-CV AUC per image {result['cv_auc'][str(result['C'])]:.3f}, "
        f"{result['train_images']} training images)" for name, result in results.items()) + "."]  # fmt: skip
    ext_half = [next(r for r in res["rows"] if r["split"] == "external_test" and r["a"] == 0.5)["diff"]
                for res in results.values()]  # fmt: skip
    moves = ", ".join(f"{d:+.3f}" for d in ext_half)
    lines += ["", f"At a = 0.5 (the paper's default, no selection) the external AUC moves by {moves} against a = 1 "
              f"over the runs (mean {np.mean(ext_half):+.3f})."]  # fmt: skip
    lines += ["", reading(results)]
    if CHOSEN in results:
        text, _ = verdict(results[CHOSEN], candidates)
        lines += ["", text]
    return "\n".join(lines)


def reading(results: dict) -> str:
    """What the table says, computed: whether the interpolation dips below both ends on validation, how far the
    probe and the fine-tuned networks fall from the internal to the external test, and whether C hit the grid's edge."""
    auc = {(name, r["split"], r["a"]): r["auc"] for name, res in results.items() for r in res["rows"]}
    names = list(results)
    dips = [n for n in names if auc[(n, "val", 0.5)] < min(auc[(n, "val", 0.0)], auc[(n, "val", 1.0)])]
    drop = {a: [auc[(n, "internal_test", a)] - auc[(n, "external_test", a)] for n in names] for a in (0.0, 1.0)}
    path = (
        "so the pretrained and the fine-tuned weights are not joined by a path of good models here and the "
        "interpolation finds no robust middle"
        if len(dips) == len(names)
        else "so in some runs at least a path of models joins the two ends without a dip"
        if dips
        else "so the interpolation passes through no worse models on validation than its ends"
    )
    text = (
        f"Reading: at a = 0.5 the validation AUC is below both ends in {len(dips)} of {len(names)} runs, {path}. "
        f"From the internal to the external test the probe falls by {_spread(drop[0.0])} and "
        f"the fine-tuned networks by {_spread(drop[1.0])}: features never tuned to the development site lose "
        f"{_as_much(np.mean(drop[0.0]), np.mean(drop[1.0]))} at the external site."
    )
    edges = [n for n in names if results[n]["C"] in (min(C_GRID), max(C_GRID))]
    if edges:
        text += (f" C came out at the edge of the registered grid ({', '.join(f'{c:g}' for c in C_GRID)}) for "
                 f"{len(edges)} of {len(names)} runs: a probe fitted over a wider grid might do better; the grid was "
                 "fixed before the runs and was not widened.")  # fmt: skip
    return text


def _spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} on average ({min(values):.3f}-{max(values):.3f})"


def _as_much(probe: float, tuned: float, close: float = 0.03) -> str:
    """How the probe's mean internal-to-external drop compares with the fine-tuned networks' (within `close`: alike)."""
    if abs(probe - tuned) < close:
        return "about as much as the fine-tuned ones"
    return "less than the fine-tuned ones" if probe < tuned else "more than the fine-tuned ones"


def rule_candidates() -> pd.DataFrame:
    """The candidates public_final.py weighs (name, forward passes, validation AUC), as recorded."""
    import public_final

    return public_final._candidates([])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", default=list(RUNS), help="configuration names (runs/public_<name>)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    started = time.perf_counter()
    results = {}
    for name in args.runs:
        if not (REPO / "runs" / f"public_{name}" / "models" / MODEL / "model" / "metadata.json").is_file():
            print(f"runs/public_{name} has no packaged {MODEL}: left out", file=sys.stderr)
            continue
        results[name] = study_run(name)
    if not results:
        print("none of the runs is on this machine", file=sys.stderr)
        return 2
    from alnus._io import atomic_write_text

    candidates = rule_candidates()
    seconds = time.perf_counter() - started
    record = {"command": "python bench/wise_ft.py", "date": dt.date.today().isoformat(), "cpu": _cpu(),
              "seconds": seconds, "runs": results}  # fmt: skip
    atomic_write_text(REPO / "docs" / "wise_ft.json", json.dumps(record, indent=1) + "\n")
    text = section(results, seconds, "python bench/wise_ft.py", candidates)
    write_section(REPO / "docs" / "results.md", "wise-ft", text, title="# Results")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
