"""Real data, issue 10 (protocol item 24): does the auxiliary BI-RADS head carry across sites better than the label?

A network trained with `train.aux_reader` has, after the label's output, K - 1 outputs that grade the image as the
development site's radiologists did ("above level k"); packaging cuts them. For each finished run with that head, this
loads the best checkpoint with its full head, predicts the validation, internal and external images in fp32, and
compares three scores per patient (mean of a patient's images): `label` (the packaged model's probability), `grade`
(the sum of the K - 1 sigmoids over K - 1: the expected grade on 0..1) and `mean` (their mean; nothing fitted). It is a
diagnostic, not a candidate, and writes the `birads-head` section of docs/results.md.

    .venv/bin/python bench/birads_head.py [--runs aux_birads_rerun aux_288 aux_shift aux_shape]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from _docs import write_section  # bench/ is on sys.path when a script here runs
from public_study import REPO, _cpu

RUNS = ("aux_birads_rerun", "aux_288", "aux_shift", "aux_shape")
SPLITS = ("val", "internal_test", "external_test")
SCORES = ("label", "grade", "mean")
MODEL = "efficientnet_lite0"


def scores_from_outputs(outputs: np.ndarray, steps: int) -> dict[str, np.ndarray]:
    """The three scores of each image from the network's outputs: the label's logit, then `steps` "above level k"
    logits (any further outputs, the shape target's, are ignored)."""
    if outputs.ndim != 2 or outputs.shape[1] < 1 + steps or steps < 1:
        raise ValueError(f"expected outputs of shape (N, >= {1 + steps}) with at least one grade step")
    label = 1 / (1 + np.exp(-outputs[:, 0]))
    grade = (1 / (1 + np.exp(-outputs[:, 1 : 1 + steps]))).sum(axis=1) / steps
    return {"label": label, "grade": grade, "mean": (label + grade) / 2}


def per_patient(table: pd.DataFrame, scores: dict[str, np.ndarray], positive: str) -> pd.DataFrame:
    """One row per (split, patient): its label (0/1) and the mean of each score over its images."""
    frame = pd.DataFrame(scores).assign(
        split=table["split"].to_numpy(),
        patient=table["patient_id"].astype(str).to_numpy(),
        y=(table["label"].astype(str) == positive).to_numpy(int),
    )
    return (
        frame.groupby(["split", "patient"], sort=False).agg({"y": "max", **dict.fromkeys(SCORES, "mean")}).reset_index()
    )


def outputs_of(run: Path) -> tuple[pd.DataFrame, np.ndarray, int]:
    """The run's val and test rows, the best checkpoint's full outputs on their images (fp32), and its grade steps."""
    from alnus.data.dataset import ImageCache, PreprocessSpec, UltrasoundDataset
    from alnus.models import create_model
    from alnus.models.package import read_metadata
    from alnus.reader_target import reader_target
    from alnus.runfolder import read_splits
    from alnus.train import load_checkpoint

    splits = read_splits(run)
    folder = run / "models" / MODEL
    meta = read_metadata(folder / "model")
    steps = reader_target(splits[splits["split"] == "train"], meta["training"]["train"]["aux_reader"], 1.0, "").outputs
    state = load_checkpoint(folder / "checkpoints" / "best.pt")["model"]
    heads = state["backbone.classifier.weight"].shape[0]
    model = create_model(MODEL, num_classes=heads)
    model.load_state_dict(state)
    model.eval()
    table = splits[splits["split"].isin(SPLITS)].reset_index(drop=True)
    spec = PreprocessSpec.from_dict(meta["preprocess"])
    dataset = UltrasoundDataset(
        table, run, spec, cache=ImageCache(run / "cache"), positive_label=meta["positive_label"]
    )
    dataset.warm()
    outputs = []
    with torch.no_grad():
        for start in range(0, len(dataset), 32):
            batch = torch.stack([dataset[i][0] for i in range(start, min(start + 32, len(dataset)))])
            outputs.append(model(batch).float().numpy())
    return table, np.concatenate(outputs), steps


def compare(patients: pd.DataFrame) -> list[dict[str, object]]:
    """Per split and score: the AUC with its DeLong CI and, against `label`, the paired difference and its P."""
    from alnus import stats

    rows = []
    for split in SPLITS:
        part = patients[patients["split"] == split]
        y = part["y"].to_numpy()
        for score in SCORES:
            auc = stats.auc_ci(y, part[score].to_numpy())
            row = {"split": split, "score": score, "n": len(part), "AUC": auc.estimate, "low": auc.ci_low,
                   "high": auc.ci_high, "diff": np.nan, "p": np.nan}  # fmt: skip
            if score != "label":
                test = stats.delong_test(y, part[score].to_numpy(), part["label"].to_numpy())
                row |= {"diff": test.estimate, "p": test.p}
            rows.append(row)
    return rows


def section(results: dict[str, list[dict[str, object]]], seconds: float, command: str) -> str:
    lines = [
        "## Real data: the auxiliary BI-RADS head at prediction time (protocol item 24, diagnostic)",
        "",
        f"Command: `{command}`, {dt.date.today().isoformat()}, {_cpu()}, {os.cpu_count()} cores, {seconds:.0f} s. "
        "Per patient (mean of a patient's images), AUC with DeLong 95% CI; `label` is the packaged model's "
        "probability, `grade` the expected BI-RADS grade from the auxiliary head (0..1), `mean` their mean; "
        "the difference and P are paired DeLong against `label` on the same patients. Validation decides; the tests "
        "are shown. Not a candidate: a package cannot carry the head yet.",
        "",
        "| run | score | val AUC | internal AUC | external AUC | external minus label (P) |",
        "|---|---|---|---|---|---|",
    ]
    for run, rows in results.items():
        by = {(r["split"], r["score"]): r for r in rows}
        for score in SCORES:
            cells = [f"{by[(s, score)]['AUC']:.3f} ({by[(s, score)]['low']:.3f}-{by[(s, score)]['high']:.3f})"
                     for s in SPLITS]  # fmt: skip
            ext = by[("external_test", score)]
            versus = "" if score == "label" else f"{ext['diff']:+.3f} ({ext['p']:.3g})"
            lines.append(f"| {run} | {score} | {' | '.join(cells)} | {versus} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", default=list(RUNS), help="configuration names (runs/public_<name>)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    results = {}
    for name in args.runs:
        run = REPO / "runs" / f"public_{name}"
        if not (run / "models" / MODEL / "checkpoints" / "best.pt").is_file():
            print(f"{run} has no trained {MODEL}: left out", file=sys.stderr)
            continue
        table, outputs, steps = outputs_of(run)
        patients = per_patient(table, scores_from_outputs(outputs, steps), "malignant")
        results[name] = compare(patients)
        print(f"{name}: done", file=sys.stderr)
    if not results:
        print("no run with an auxiliary BI-RADS head found under runs/", file=sys.stderr)
        return 2
    text = section(results, time.perf_counter() - started, "python bench/birads_head.py")
    write_section(REPO / "docs" / "results.md", "birads-head", text, title="# Results")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
