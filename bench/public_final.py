"""Real data, issue 10: every configuration, the pre-registered ensembles, the choice on validation, the final results.

One command regenerates the real-data part of docs/results.md, reusing every finished run (an interrupted one
resumes):

    nohup .venv/bin/python bench/public_final.py > public_final.log 2>&1 &          # everything
    .venv/bin/python bench/public_final.py --final-only                               # the final model's runs only

1. the single-model configurations (`bench/public_configs.py`: the base run, its seeds, the other levers, the
   paper's three CNNs; `--final-only` trains just the shipped configuration and its seeds),
2. the ensembles fixed in the protocol, built in `runs/public_final` (same split) with `alnus ensemble`, then
   predicted and evaluated there like any model (threshold frozen on the validation patients),
3. the choice: the highest validation AUC per patient over every configuration and ensemble (within 0.005 the one
   with fewer member forward passes); the external test is shown for all but never used to choose,
4. the final section: the chosen model's paper-style table with CIs, the spread over training seeds, the comparison
   with the radiologists' BI-RADS, the ROC figures with the BI-RADS operating points, the wall time,
5. AI + radiologist on the chosen model (`bench/ai_plus_radiologist.py`),
6. the chosen model shipped under models/ (`bench/ship_model.py`).

Rows of runs trained on another machine come from the records in docs/ (public_configurations.json,
public_ensembles.json). When the chosen single model's run folder is not here, it is rebuilt from the shipped package
(its run, settings, training patients and weights checked, and its predictions required to reproduce the recorded
row), so `--no-train --no-ship` regenerates the real-data sections in a few minutes without training anything.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import public_configs
from _docs import write_section  # bench/ is on sys.path when a script here runs
from public_study import REPO, _cpu, _figures, _markdown, _p_value, _results_section, public_manifest

FINAL_RUN = REPO / "runs" / "public_final"
MEMBER = "models/{model}/model"  # a trained model's package inside its run folder
# The ensembles' rows as measured (runs/ is not committed): on a machine without their members' run folders the choice
# uses these, as the configurations table uses docs/public_configurations.json.
ENSEMBLE_RECORD = Path("docs") / "public_ensembles.json"
SINGLE_LOCK = ".public_final.lock"  # under runs/: held by a running bench/public_final.py


@dataclass(frozen=True)
class Ensemble:
    name: str
    change: str
    configurations: tuple[str, ...]  # configuration names of public_configs; their runs' single models are members
    tta: tuple[str, ...] = ()

    def members(self) -> list[Path]:
        found = []
        for name in self.configurations:
            config = next(c for c in public_configs.CONFIGURATIONS if c.name == name)
            run = REPO / "runs" / config.run_name
            found += sorted(p.parent for p in (run / "models").glob("*/model/metadata.json"))
        return found

    def forward_passes(self) -> int:
        return len(self.configurations) * (1 + len(self.tta))


SINGLE_EFFICIENTNETS = ("base", "shift_aug", "lite2", "margin30", "seed1", "seed2")
# Fixed in docs/results.md ("Protocol", item 6) before any ensemble was scored.
ENSEMBLES = (
    Ensemble("base_tta", "base with horizontal-flip TTA", ("base",), ("hflip",)),
    Ensemble("seeds", "mean of the base configuration's 3 training seeds", ("base", "seed1", "seed2")),
    Ensemble("seeds_tta", "the 3 seeds with horizontal-flip TTA", ("base", "seed1", "seed2"), ("hflip",)),
    Ensemble("all_tta", "every finished single EfficientNet configuration, flip TTA", SINGLE_EFFICIENTNETS, ("hflip",)),
    # Fixed in the protocol's item 7 before any seed of aux_birads other than its first was scored.
    Ensemble("aux_seeds", "mean of aux_birads's 3 training seeds", ("aux_birads", "aux_seed1", "aux_seed2")),
    # Fixed in the protocol's item 11 while aux_lite2 trained, before it was scored.
    Ensemble(
        "aux_mix", "mean of aux_birads (Lite0, 224 px) and aux_lite2 (Lite2, 260 px)", ("aux_birads", "aux_lite2")
    ),
    Ensemble("aux_mix_tta", "aux_mix with horizontal-flip TTA", ("aux_birads", "aux_lite2"), ("hflip",)),
    # Fixed in the protocol's item 13 before aux_margin50 was trained: two scales of the lesion, fused late.
    Ensemble(
        "aux_scales",
        "mean of aux_birads (ROI margin 0.15) and aux_margin50 (margin 0.50): the lesion and its wide context",
        ("aux_birads", "aux_margin50"),
    ),
)
# Each configuration retrained with other seeds (protocol, item 5): the chosen one's spread is reported.
SEEDS = {"base": ("base", "seed1", "seed2"), "aux_birads": ("aux_birads", "aux_seed1", "aux_seed2")}
# What --final-only trains: the configuration the rule chose last (the shipped model) with its seeds, which are also
# the members of its seed ensemble; the other candidates' rows come from docs/public_configurations.json.
FINAL_MEMBERS = SEEDS["aux_birads"]


def _alnus(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "alnus", *args], check=True)


def _prepare_final_run() -> None:
    from alnus.config import load_config
    from alnus.runfolder import lock_run
    from alnus.study import prepare_run

    cfg = load_config(REPO / "configs" / "public.yaml", [f"name={FINAL_RUN.name}"])
    with lock_run(cfg.run_dir, command="bench/public_final.py (prepare)"):
        prepare_run(cfg)


def _trained_here(name: str) -> bool:
    """Whether the configuration's model was trained on this machine (a run folder rebuilt from a package is not)."""
    config = next(c for c in public_configs.CONFIGURATIONS if c.name == name)
    run = REPO / "runs" / config.run_name
    return public_configs.rebuilt_marker(run) is None and any((run / "models").glob("*/model/metadata.json"))


def _build_ensembles() -> list[str]:
    """Build (or rebuild when members changed) each ensemble whose members are all trained on this machine; return
    their names. An ensemble with a member recorded but trained elsewhere is not built (its record stands)."""
    built = []
    for ensemble in ENSEMBLES:
        recorded = [c for c in ensemble.configurations if public_configs.rows_of(c)]
        finished = [c for c in recorded if _trained_here(c)]
        if len(finished) < len(recorded) or (
            len(finished) < len(ensemble.configurations) and ensemble.name != "all_tta"
        ):
            missing = sorted(set(ensemble.configurations) - set(finished))
            print(f"{ensemble.name}: not built here (no run folder here for {', '.join(missing)})")
            continue
        members = Ensemble(ensemble.name, ensemble.change, tuple(finished), ensemble.tta).members()
        wanted = sorted(json.loads((m / "metadata.json").read_text())["weights_sha256"] for m in members)
        meta = FINAL_RUN / "models" / ensemble.name / "model" / "metadata.json"
        if meta.is_file():
            have = json.loads(meta.read_text(encoding="utf-8"))
            if sorted(m["weights_sha256"] for m in have.get("members", [])) == wanted and have.get("tta", []) == list(
                ensemble.tta
            ):
                built.append(ensemble.name)
                continue
        args = ["ensemble", str(FINAL_RUN), "--name", ensemble.name, "--force"]
        for member in members:
            args += ["--member", str(member)]
        if ensemble.tta:
            args += ["--tta", ",".join(ensemble.tta)]
        _alnus(*args)
        built.append(ensemble.name)
    return built


def _candidates(ensembles: list[str]) -> pd.DataFrame:
    """Every single configuration and every ensemble with its validation AUC, cost and external AUC: from the run
    folders on this machine, else as recorded where they were measured (the `measured` column says which)."""
    from alnus.evaluate import results_values_table

    rows = []
    here = f"{dt.date.today().isoformat()}, {_cpu()}, {len(os.sched_getaffinity(0))} cores"
    for config in public_configs.CONFIGURATIONS:
        if not public_configs.is_candidate(config.name):  # reported, not candidates (protocol, item 6; reruns)
            continue
        for row in public_configs.rows_of(config.name):
            rows.append({"name": config.name, "run": config.run_name, "model": row["model"], "passes": 1,
                         "val AUC": public_configs.auc_of(row["val AUC (selection)"]),
                         "internal_test AUC": public_configs.auc_of(row["internal AUC"]),
                         "external_test AUC": public_configs.auc_of(row["external AUC"]),
                         "measured": row.get("measured", "")})  # fmt: skip
    record = _read_ensemble_record()
    if ensembles:
        values = results_values_table(_metrics(FINAL_RUN), "patient")
        for name in ensembles:
            ensemble = next(e for e in ENSEMBLES if e.name == name)
            v = values[(values["model"] == name) & values["operating_point"].str.startswith("frozen")]
            at = {r.split: float(r.auc) for r in v.itertuples()}
            missing = [s for s in ("val", "internal_test", "external_test") if at.get(s) is None]
            if missing:
                # A record is what was measured: keep the earlier one rather than overwrite it with blanks.
                print(f"{name}: no {', '.join(missing)} AUC in {FINAL_RUN / 'metrics.json'}; its record is kept")
                continue
            record[name] = {"name": name, "model": name, "passes": ensemble.forward_passes(), "val AUC": at.get("val"),
                            "internal_test AUC": at.get("internal_test"),
                            "external_test AUC": at.get("external_test"), "measured": here}  # fmt: skip
        _write_ensemble_record(record)
    for ensemble in ENSEMBLES:
        if ensemble.name in record:
            rows.append({"run": FINAL_RUN.name, **record[ensemble.name]})
    return pd.DataFrame(rows)


def _read_ensemble_record() -> dict[str, dict[str, object]]:
    path = REPO / ENSEMBLE_RECORD
    return json.loads(path.read_text(encoding="utf-8"))["rows"] if path.is_file() else {}


def _write_ensemble_record(rows: dict[str, dict[str, object]]) -> None:
    from alnus._io import atomic_write_text

    about = "The pre-registered ensembles as measured in runs/public_final, written by bench/public_final.py."
    atomic_write_text(REPO / ENSEMBLE_RECORD, json.dumps({"about": about, "rows": rows}, indent=1) + "\n")


# The shipped package: where the chosen single model's run folder is rebuilt from when this machine lacks it.
SHIPPED = REPO / "models" / "breast-us-malignancy"


REPRODUCED = ("val AUC (selection)", "internal AUC", "external AUC", "external sens / spec")


def _shipped_sha(package: Path) -> str | None:
    """The weights the shipped package names, None when it has no readable metadata."""
    try:
        meta = json.loads((package / "metadata.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    return meta.get("weights_sha256") if isinstance(meta, dict) else None


def rebuild_from_package(chosen: pd.Series, package: Path = SHIPPED) -> Path | None:
    """Rebuild the chosen single model's run folder from its shipped package when this machine has no model of it.

    Checked first: the package was trained in that run (`run`), with the settings the configuration has now
    (`settings_hash`), on the training and validation patients of the split made here (`training_data_hash`), and
    its weights are the ones it names (also after copying). A model trained here is never replaced: only a run folder
    without a model, or one rebuilt before, is rebuilt. The copy's predictions of the run's splits are then evaluated
    and must reproduce the configuration's recorded row (at the table's rounding), else the copy is removed again.
    Returns the run folder, or None when the package is not the chosen model (the caller says what to train). The
    training history is not in a package: the record keeps it.
    """
    import shutil

    from alnus._io import atomic_write_text, file_sha256
    from alnus.config import load_config, stable_hash
    from alnus.ensemble import run_training_hash
    from alnus.runfolder import lock_run
    from alnus.study import prepare_run
    from alnus.train import model_settings

    config = next((c for c in public_configs.CONFIGURATIONS if c.name == chosen["name"]), None)
    meta_path = package / "metadata.json"
    if config is None or not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("run") != config.run_name or meta.get("backbone") != chosen["model"]:
        return None
    cfg = load_config(REPO / "configs" / "public.yaml", [f"name={config.run_name}", *config.overrides])
    target = cfg.run_dir / MEMBER.format(model=meta["backbone"])
    marker = cfg.run_dir / public_configs.REBUILT_FILE
    train_here = f"train it here instead (bench/public_configs.py --only {config.name})"
    local = cfg.run_dir / "models" / meta["backbone"]
    trained_here = [target, local / "history.csv", local / "checkpoints"]
    if public_configs.rebuilt_marker(cfg.run_dir) is None and any(p.exists() for p in trained_here):
        raise SystemExit(
            f"{local} holds a model trained on this machine but {cfg.run_dir} has no metrics.json: finish its study "
            f"(bench/public_configs.py --only {config.name} --rerun) rather than replacing it with {package}"
        )
    with lock_run(cfg.run_dir, command="bench/public_final.py (rebuild from the shipped package)"):
        prepare_run(cfg)
        checks = {
            "settings": (meta.get("settings_hash"), stable_hash(model_settings(cfg, cfg.run_dir, meta["backbone"]))),
            "training data": (meta.get("training_data_hash"), run_training_hash(cfg.run_dir)),
            "weights": (meta.get("weights_sha256"), file_sha256(package / "weights.safetensors")),
        }
        differ = [name for name, (recorded, here) in checks.items() if recorded != here]
        if differ:
            raise SystemExit(
                f"{package} is not {config.name}'s model as this machine would train it ({', '.join(differ)} "
                f"differ): {train_here}"
            )
        staging = target.with_name(target.name + ".rebuilding")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(package, staging)
        if file_sha256(staging / "weights.safetensors") != meta["weights_sha256"]:
            shutil.rmtree(staging)
            raise SystemExit(f"{package} changed while it was copied; run this again when nothing writes to it")
        relative = package.relative_to(REPO) if package.is_relative_to(REPO) else package
        record = {"package": str(relative), "weights_sha256": meta["weights_sha256"],
                  "date": dt.date.today().isoformat(), "cpu": _cpu()}  # fmt: skip
        # The marker first: from here on the configurations table keeps the recorded row for this run folder.
        atomic_write_text(marker, json.dumps(record, indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)  # an earlier rebuild (a model trained here was refused above)
        (cfg.run_dir / "metrics.json").unlink(missing_ok=True)
        staging.rename(target)
    for command in ("predict-run", "evaluate", "report"):
        try:
            _alnus(command, str(cfg.run_dir))
        except subprocess.CalledProcessError:
            raise SystemExit(
                f"`alnus {command} {cfg.run_dir}` failed (its message is above); the rebuild stays unchecked and is "
                "done again on the next run"
            ) from None
    measured = [[r[k] for k in REPRODUCED] for r in public_configs.measured_rows(config, rebuilt=True)]
    recorded = [[r[k] for k in REPRODUCED] for r in public_configs.rows_of(config.name)]
    if measured != recorded:
        shutil.rmtree(target)
        (cfg.run_dir / "metrics.json").unlink(missing_ok=True)
        marker.unlink(missing_ok=True)
        raise SystemExit(
            f"{package}, evaluated in {cfg.run_dir}, does not reproduce {config.name}'s recorded row ({measured} "
            f"against {recorded}); the copy was removed: {train_here}"
        )
    record["reproduces"] = dict(zip(REPRODUCED, measured[0], strict=True))
    atomic_write_text(marker, json.dumps(record, indent=2) + "\n")
    return cfg.run_dir


def _needs_rebuild(run: Path, chosen: pd.Series | None = None, package: Path = SHIPPED) -> bool:
    """Whether the chosen run folder must be (re)built from the shipped package: it has no evaluated model here, or it
    was rebuilt without reproducing its row, from other weights than the package's now, or for another recorded row."""
    marker = public_configs.rebuilt_marker(run)
    if not (run / "metrics.json").is_file():
        return True
    if marker is None:
        return False  # trained and evaluated here
    if "reproduces" not in marker:
        return True
    if _shipped_sha(package) != marker["weights_sha256"]:
        return True
    if chosen is not None:
        recorded = [[r[k] for k in REPRODUCED] for r in public_configs.rows_of(str(chosen["name"]))]
        if recorded != [[marker["reproduces"].get(k) for k in REPRODUCED]]:
            return True
    return False


def rebuilt_note(run: Path) -> str:
    """Says that the chosen run folder was rebuilt from the shipped package, when it was and reproduced its row."""
    record = public_configs.rebuilt_marker(run)
    if not record or "reproduces" not in record:
        return ""
    return (
        f"The chosen model's run folder ({run.relative_to(REPO) if run.is_relative_to(REPO) else run}) was not on this "
        f"machine: it was rebuilt on {record['date']} ({record['cpu']}) from the shipped package {record['package']} "
        f"(the same weights, sha256 {record['weights_sha256'][:12]}; its settings and training patients checked "
        "against the split made here), whose predictions of the three splits reproduce the configurations table's "
        "row at its rounding; its training time is the one recorded when it trained."
    )


def run_dir_of(chosen: pd.Series) -> Path:
    return FINAL_RUN if chosen["run"] == FINAL_RUN.name else REPO / "runs" / str(chosen["run"])


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text(encoding="utf-8"))


def choose(candidates: pd.DataFrame, tie: float = 0.005) -> pd.Series:
    """The protocol's rule: the highest validation AUC; among those within `tie` of it, the fewest forward passes
    (then the higher validation AUC)."""
    best = candidates["val AUC"].max()
    close = candidates[candidates["val AUC"] >= best - tie]
    return close.sort_values(["passes", "val AUC"], ascending=[True, False]).iloc[0]


def _seed_spread(configuration: str = "base") -> str:
    """External AUC of a configuration over its training seeds (`SEEDS`: mean and range), and the sensitivity and
    specificity each seed reaches at its own validation-frozen threshold."""
    aucs, points = [], []
    for name in SEEDS.get(configuration, (configuration,)):
        for row in public_configs.rows_of(name):
            aucs.append(public_configs.auc_of(row["external AUC"]))
            points.append(str(row["external sens / spec"]))
    if len(aucs) < 2:
        return "fewer than two seeds finished"
    return (f"{len(aucs)} seeds: external AUC mean {sum(aucs) / len(aucs):.3f}, range {min(aucs):.3f}-{max(aucs):.3f} "
            f"({', '.join(f'{a:.3f}' for a in aucs)}); external sensitivity / specificity (%) at each seed's frozen "
            f"threshold: {'; '.join(points)} (the operating point moves more between seeds than the AUC)")  # fmt: skip


def _threshold_note(package: Path) -> str:
    """Says when the package's threshold was frozen more than once, and why that matters."""
    history = json.loads((package / "metadata.json").read_text(encoding="utf-8")).get("threshold_history", [])
    if len(history) < 2:
        return ""
    steps = " -> ".join(f"{h['new_value']:.4f} ({h['date'][:10]})" for h in history)
    return (
        f"The threshold was frozen {len(history)} times ({steps}; `threshold_history` in metadata.json), each "
        "time on the validation patients only. The first freeze used the validation predictions of training, "
        "made in bf16; they differ from fp32 predictions by up to about 0.2 on this model, so the study was "
        "predicted again in fp32 (the reference every export reproduces) and the threshold re-frozen on those. "
        "The external test had been scored before the re-freeze; epoch selection still used bf16 validation AUCs."
    )


def _goals(metrics: dict, model: str) -> list[str]:
    """The issue's goals for the chosen model, each with the measured value and whether it is met."""
    splits = metrics["models"][model]["splits"]
    external, internal = splits["external_test"]["patient"], splits["internal_test"]["patient"]
    auc_ext, auc_int = external["auc"]["estimate"], internal["auc"]["estimate"]
    sens, spec = external["sensitivity"]["estimate"], external["specificity"]["estimate"]
    readers = metrics.get("readers", {}).get("external_test", {}).get(model, {})
    reader = next((r for r in readers.get("performance", []) if r.get("kind") == "reader"), {})
    panel = {row["metric"]: row for row in readers.get("panel", [])}
    spec_p = panel.get("specificity", {}).get("p")
    spec_reader = reader.get("specificity")
    met = {True: "met", False: "**not met**"}
    return [
        "### Goals of issue 10 (external BrEaST patients, the chosen model)",
        f"- AUC >= 0.93 (the radiologists' BI-RADS AUC): {auc_ext:.3f}, {met[auc_ext >= 0.93]}.",
        f"- At the validation-frozen threshold, sensitivity >= 90% with specificity clearly above the radiologists' "
        f"{100 * spec_reader:.1f}%: sensitivity {100 * sens:.1f}%, specificity {100 * spec:.1f}% (McNemar P "
        f"{_p_value(spec_p)}), {met[sens >= 0.9 and spec > spec_reader and spec_p is not None and spec_p < 0.05]}."
        if spec_reader is not None
        else "- Specificity against the radiologists: no reader comparison in this run.",
        f"- Against the radiologists' BI-RADS on the same patients: AUC {auc_ext:.3f} vs "
        f"{reader.get('auc', float('nan')):.3f} (DeLong P {_p_value(panel.get('auc', {}).get('p'))}).",
        f"- Internal-to-external AUC drop <= 0.05: {auc_int:.3f} - {auc_ext:.3f} = {auc_int - auc_ext:.3f}"
        f"{_drop_interval(internal['auc'], external['auc'])}, {met[auc_int - auc_ext <= 0.05]}.",
    ]


def _drop_interval(internal: dict, external: dict) -> str:
    """The 95% CI of the internal minus the external AUC: the two tests are different patients, so their DeLong
    variances add ("" when either has no standard error recorded)."""
    from statistics import NormalDist

    se = [auc.get("se") for auc in (internal, external)]
    if not all(isinstance(v, int | float) and v == v for v in se):
        return ""
    drop, half = internal["estimate"] - external["estimate"], NormalDist().inv_cdf(0.975) * math.hypot(*se)
    return f" (95% CI {drop - half:.3f} to {drop + half:.3f}; independent patients, DeLong variances added)"


def _seeded(chosen: pd.Series) -> str:
    """The configuration whose seeds describe the chosen model's training variance: the chosen configuration, the one
    a chosen seed or seed ensemble was trained from, else (an ensemble of several configurations) the base's."""
    name = str(chosen["name"])
    ensemble = next((e for e in ENSEMBLES if e.name == name), None)
    for configuration, seeds in SEEDS.items():
        if name in seeds or (ensemble is not None and set(ensemble.configurations) == set(seeds)):
            return configuration
    return "base"


# Exploratory subgroups of the chosen model (alnus.subgroups): how BrEaST verified each diagnosis (biopsy, or follow-up
# of lesions the radiologists had called benign-looking) and BUS-BRA's scanner.
SUBGROUPS = (("external_test", "Verification"), ("internal_test", "Device"))


def _verification_note(run: Path) -> str:
    """The radiologists' BI-RADS categories of the external patients per verification method, from splits.csv."""
    from alnus.runfolder import read_splits

    rows = read_splits(run).query("split == 'external_test'")
    if "Verification" not in rows.columns:
        return ""
    found = rows.groupby("Verification")["reader_birads"].agg(lambda v: ", ".join(sorted(set(v) - {""})))
    parts = "; ".join(f"{how}: {cats}" for how, cats in found.items())
    return (f"The BI-RADS categories the radiologists gave per BrEaST verification method ({parts}) show that only "
            "lesions read as benign-looking were verified by follow-up instead of biopsy: they hold no malignant "
            "case, and the biopsied patients are the comparison without that verification bias.")  # fmt: skip


def _subgroups(run: Path, model: str) -> list[str]:
    from alnus.subgroups import SubgroupError, reader_table, subgroup_results, subgroup_table

    out = [
        "### Subgroups (exploratory; `alnus subgroups RUN --by COLUMN`)",
        "",
        "The chosen model at its frozen threshold and the radiologists' BI-RADS within each group, per patient; the P "
        "value is DeLong's for the model against BI-RADS on the group's patients, not adjusted for the number of "
        f"groups. {_verification_note(run)}",
        "",
    ]
    for split, by in SUBGROUPS:
        try:
            found = subgroup_results(run, by, model=model, splits=[split])
        except SubgroupError as exc:
            out += [f"{split} by {by}: not available ({exc})", ""]
            continue
        out += [f"{split} by `{by}`, the model:", "", _markdown(subgroup_table(found).drop(columns="split")), ""]
        readers = reader_table(found)
        if readers is not None:
            out += [f"{split} by `{by}`, the radiologists (the patients each reading covers):", "",
                    _markdown(readers.drop(columns="split")), ""]  # fmt: skip
    return out


def _timing_record(chosen: pd.Series) -> dict:
    """bench/final_timing.py's record (docs/final_timing.json) when it timed the chosen configuration's seeds."""
    path = REPO / "docs" / "final_timing.json"
    record = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    seeds = SEEDS.get(_seeded(chosen), (_seeded(chosen),))
    return record if [s.get("configuration") for s in record.get("seeds", [])] == list(seeds) else {}


def _adaptation_record(chosen: pd.Series) -> dict:
    """bench/site_adaptation.py's record (docs/site_adaptation.json) when it adapted the chosen configuration's
    seeds."""
    path = REPO / "docs" / "site_adaptation.json"
    record = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    return record if record.get("seeds") == list(SEEDS.get(_seeded(chosen), (_seeded(chosen),))) else {}


def _shipped_record(name: str) -> dict:
    """A bench record measured on the shipped model (docs/<name>.json: bench/site_cv.py's for protocol item 28,
    bench/sens95.py's for item 30), or {} when it is missing or was measured on other weights."""
    path = REPO / "docs" / f"{name}.json"
    record = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    meta = SHIPPED / "metadata.json"
    shipped = json.loads(meta.read_text(encoding="utf-8")).get("weights_sha256") if meta.is_file() else None
    return record if shipped is not None and record.get("package_weights_sha256") == shipped else {}


def cv_check_note(chosen: str) -> str:
    """What cross-validation inside the development patients says of the choice (bench/cv_check.py's records:
    protocol item 25, each fold's epoch chosen on its own patients; item 31, its last epoch kept), or "" when no
    record compares `chosen` with its reference. The verdict follows item 31 where it exists (read as registered)."""
    parts, verdict = [], None
    for selection, how in (("val_auc", "each fold's epoch chosen on its scored patients"),
                           ("last", "the last epoch kept, nothing chosen on them")):  # fmt: skip
        path = REPO / "docs" / f"cv_check_{selection}.json"
        record = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        other = next((m for m in record.get("models", []) if m["model"] == chosen and "difference" in m), None)
        if other is None:
            continue
        parts.append(
            f"{chosen} minus {record['reference']} {other['difference']:+.3f} (P {_p_value(other['p'])}; {how}; "
            f"{len(record['fold_numbers'])} of {record['folds']} folds)"
        )
        verdict = other["difference"] > 0 and other["p"] < 0.05
    if not parts:
        return ""
    reading = (
        "the folds confirm the choice"
        if verdict
        else "the folds do not separate the two: the choice stands as registered but rests on one validation split"
    )
    return (
        "Cross-validation inside the BUS-BRA development patients (3 patient-level folds, the mean of the within-fold "
        f"paired AUC differences; diagnostics, protocol items 25 and 31): {'; '.join(parts)}; {reading}."
    )


def speed_note(chosen: pd.Series) -> str:
    """Issue 10's speed bound: the timed from-scratch run of bench/final_timing.py where it exists for the chosen
    configuration, and the training time of its seeds from the runs' histories."""
    seeded = _seeded(chosen)
    seeds = SEEDS.get(seeded, (seeded,))
    seeds_minutes = sum(public_configs.training_seconds(name) for name in seeds) / 60
    note = (
        f"Issue 10's speed bound (item 7: the final configuration with all its seeds in at most 180 min on 2 cores): "
        f"training {seeded}'s {len(seeds)} seeds ({', '.join(seeds)}, what `--final-only` trains) took "
        f"{seeds_minutes:.0f} min of epochs in all, summed from the runs' histories, as recorded where they ran "
        "(other jobs shared the cores for some of them)."
    )
    record = _timing_record(chosen)
    if record:
        within = "within" if record["wall_minutes"] <= record["limit_minutes"] else "over"
        note += (
            f" Timed from scratch as one command (`{record['command']}`, {record['date']}, {record['cpu']}): "
            f"{record['wall_minutes']:.0f} min wall for all {len(seeds)} seeds trained, predicted, evaluated and "
            f"reported, {within} the bound (the final-timing section below)."
        )
    else:
        note += " Not yet timed from scratch as one command: `python bench/final_timing.py` does that."
    return note


def final_section(
    candidates: pd.DataFrame, chosen: pd.Series, seconds: float, final_minutes: str, speed: str = ""
) -> str:
    metrics = _metrics(run_dir_of(chosen))
    rebuilt = rebuilt_note(run_dir_of(chosen))
    shown = candidates.assign(**{
        c: [f"{v:.3f}" if pd.notna(v) else "" for v in candidates[c]]
        for c in ("val AUC", "internal_test AUC", "external_test AUC")
    }).rename(columns={"passes": "forward passes"})  # fmt: skip
    out = [
        "## Real data: the chosen model (issue 10)",
        "",
        f"Command: `python bench/public_final.py`. Date {dt.date.today().isoformat()}; hardware {_cpu()}, "
        f"{len(os.sched_getaffinity(0))} cores, no GPU; {seconds / 60:.0f} min of this command's wall time until this "
        "section was written (finished runs are reused; the AI + radiologist section and shipping the model "
        f"follow). The chosen model's own runs took {final_minutes}, as measured while they ran (other jobs shared "
        "the two cores for some of them).",
        *(["", speed] if speed else []),
        *(["", rebuilt] if rebuilt else []),
        "",
        "### Every candidate, and the choice (validation AUC per patient; the tests are shown, never used)",
        _markdown(
            shown[["name", "model", "forward passes", "val AUC", "internal_test AUC", "external_test AUC", "measured"]]
        ),  # fmt: skip
        "",
        f"**Chosen: `{chosen['name']}`** (model `{chosen['model']}` in runs/{chosen['run']}): the highest validation "
        "AUC, or within 0.005 of it with fewer forward passes.",
        "",
        f"Training variance of the chosen configuration ({_seeded(chosen)}): {_seed_spread(_seeded(chosen))}. The CIs "
        "below cover case sampling only.",
        "",
    ]
    out += _goals(metrics, str(chosen["model"])) + [""]
    note = _threshold_note(run_dir_of(chosen) / MEMBER.format(model=chosen["model"]))
    out += [note, ""] if note else []
    chosen_only = {**metrics, "models": {chosen["model"]: metrics["models"][chosen["model"]]},
                   "readers": {s: {m: f for m, f in by.items() if m == chosen["model"]}
                               for s, by in metrics.get("readers", {}).items()}}  # fmt: skip
    out += _results_section(chosen_only)
    run_dir = run_dir_of(chosen)
    out += _subgroups(run_dir, str(chosen["model"]))
    out += _figures(run_dir, prefix="final", models=[chosen["model"]], flow=False)
    return "\n".join(out)


def _change_of(name: str) -> str:
    """What a candidate is: its configuration's or ensemble's description."""
    found = [c.change for c in public_configs.CONFIGURATIONS if c.name == name] + [
        e.change for e in ENSEMBLES if e.name == name
    ]
    return found[0] if found else name


def glance_section(
    candidates: pd.DataFrame,
    chosen: pd.Series,
    metrics: dict,
    combined: dict | None,
    ordered: dict | None = None,
    *,
    not_fitted: str = "",
    firth: dict | None = None,
    firth_not_fitted: str = "",
) -> str:
    """The first section of docs/results.md: the chosen model against the radiologists on the external hospital,
    the goals, and where each number comes from, in a few lines. `combined`, `firth`, `ordered`: the external
    comparisons of protocol items 8, 32 and 18 (`compare_with_reader`'s); `not_fitted`, `firth_not_fitted`: why item
    8 or 32 has no fit, when it has none; it still counts among the combinations tried."""
    model = str(chosen["model"])
    splits = metrics["models"][model]["splits"]
    ext, internal = splits["external_test"]["patient"], splits["internal_test"]["patient"]
    readers = metrics.get("readers", {}).get("external_test", {}).get(model, {})
    reader = next((r for r in readers.get("performance", []) if r.get("kind") == "reader"), None)
    panel = {row["metric"]: row for row in readers.get("panel", [])}
    auc = ext["auc"]
    out = [
        "## At a glance (real data, issue 10)",
        "",
        f"Written by `python bench/public_final.py` on {dt.date.today().isoformat()} from the sections below. "
        "Development data BUS-BRA; external test BrEaST-Lesions-USG (another hospital, never used to choose); the "
        "label is benign vs malignant, a stand-in for ALN status (no public dataset has ALN labels).",
        "",
        f"- **Chosen model: `{chosen['name']}`** ({_change_of(str(chosen['name']))}), the highest BUS-BRA validation "
        f"AUC among {len(candidates)} candidates (every EfficientNet configuration and ensemble tried, all in the "
        "tables below; the paper's CNNs are reported, not candidates). Its validation AUC is therefore optimistic "
        "(the best of many on the same patients); the tests, never used to choose, are what to read.",
        f"- External AUC {auc['estimate']:.3f} ({auc['ci_low']:.3f}-{auc['ci_high']:.3f}) on {ext['n_patients']} "
        f"patients; internal {internal['auc']['estimate']:.3f}.",
    ]
    if reader is not None:
        out += [
            f"- The radiologists' BI-RADS on the same external patients: AUC {reader['auc']:.3f} "
            f"({reader['auc_ci_low']:.3f}-{reader['auc_ci_high']:.3f}); difference DeLong P "
            f"{_p_value(panel.get('auc', {}).get('p'))}. At the threshold frozen on validation the model calls "
            f"{100 * ext['sensitivity']['estimate']:.1f}% of malignant patients positive at "
            f"{100 * ext['specificity']['estimate']:.1f}% specificity; the radiologists (BI-RADS >= 4a) "
            f"{100 * reader['sensitivity']:.1f}% at {100 * reader['specificity']:.1f}%."
        ]
    out += [f"- Over the chosen configuration's training seeds ({_seeded(chosen)}): {_seed_spread(_seeded(chosen))}."]
    goals = [line for line in _goals(metrics, model)[1:] if line.endswith(("met.", "**not met**."))]
    met = [not line.endswith("**not met**.") for line in goals]
    tried = [c for c in (combined, firth, ordered) if c is not None]
    # A combination tried without a fit was tried all the same.
    attempted = len(tried) + bool(not_fitted) + bool(firth_not_fitted)
    if tried:
        # Any combination may meet the goal; with k tried, each is held to P < 0.05 / k (Bonferroni).
        alpha = 0.05 / attempted
        above = any(c["auc_difference"]["estimate"] > 0 and c["auc_difference"]["p"] is not None
                    and c["auc_difference"]["p"] < alpha for c in tried)  # fmt: skip
        met.append(above)
    if combined is not None:
        c, r, d = combined["auc_combined"], combined["auc_reader"], combined["auc_difference"]
        out += [
            f"- Radiologist + AI (BI-RADS and the model's logit, combined on the validation patients by maximum "
            f"likelihood, protocol item 8): external AUC {c['estimate']:.3f} vs {r['estimate']:.3f} for the "
            f"radiologist alone (DeLong P {_p_value(d['p'])})."
        ]
    if not_fitted:
        reason = not_fitted.split(" (")[0].split(":")[0]  # its first clause
        out += [f"- Radiologist + AI by logistic regression (protocol item 8): not fitted, as {reason} (the AI + "
                "radiologist section says why; the numbers shown for it until 2026-12-05 are withdrawn)."]  # fmt: skip
    if firth is not None:
        c, r, d = firth["auc_combined"], firth["auc_reader"], firth["auc_difference"]
        sens, spec = firth["sensitivity"], firth["specificity"]
        out += [
            f"- Radiologist + AI by Firth-penalised logistic regression (protocol item 32, fitted on the validation "
            f"patients; registered after item 8's withdrawn result was seen): external AUC {c['estimate']:.3f} vs "
            f"{r['estimate']:.3f} (DeLong P {_p_value(d['p'])}); at the threshold matching the radiologists' "
            f"validation sensitivity, sensitivity {100 * sens['combined']:.1f}% vs {100 * sens['reader']:.1f}% "
            f"(McNemar P {_p_value(sens['p'])}) and specificity {100 * spec['combined']:.1f}% vs "
            f"{100 * spec['reader']:.1f}% (McNemar P {_p_value(spec['p'])})."
        ]
    if firth_not_fitted:
        reason = firth_not_fitted.split(" (")[0].split(":")[0]  # its first clause
        out += [f"- Radiologist + AI by Firth-penalised logistic regression (protocol item 32): not fitted, as "
                f"{reason} (the AI + radiologist section says why)."]  # fmt: skip
    if ordered is not None:
        c, r, d = ordered["auc_combined"], ordered["auc_reader"], ordered["auc_difference"]
        spec = ordered["specificity"]
        out += [
            f"- The model as the radiologist's tie-breaker inside a BI-RADS category (nothing fitted): external AUC "
            f"{c['estimate']:.3f} vs {r['estimate']:.3f} (DeLong P {_p_value(d['p'])}); where it rules out in the "
            f"least suspicious positive category (threshold frozen on validation), specificity "
            f"{100 * spec['combined']:.1f}% vs {100 * spec['reader']:.1f}% (McNemar P {_p_value(spec['p'])}) at "
            f"sensitivity {100 * ordered['sensitivity']['combined']:.1f}% vs "
            f"{100 * ordered['sensitivity']['reader']:.1f}%."
        ]
    if tried:
        limit = "P < 0.05" if attempted == 1 else f"P < {alpha:.3f} each, Bonferroni over {attempted} combinations"
        out += [f"- The AI + radiologist goal (AUC above the radiologist alone, {limit}) is "
                f"{'met' if met[-1] else '**not met**'}."]  # fmt: skip
    paper = [public_configs.auc_of(r["external AUC"]) for r in public_configs.rows_of("paper_cnns_192")]
    paper = [a for a in paper if a is not None]
    if paper:
        out += [
            f"- The paper's three CNNs, trained offline from random initialisation (192 px, 6 epochs): external AUC "
            f"{min(paper):.3f}-{max(paper):.3f}."
        ]
    timing = _timing_record(chosen)
    if timing:
        out += [
            f"- The final configuration's {len(timing['seeds'])} seeds, trained from scratch, predicted and evaluated "
            f"by one command: {timing['wall_minutes']:.0f} min on {timing['cores']} CPU cores (bound: "
            f"{timing['limit_minutes']} min)."
        ]
    adaptation = _adaptation_record(chosen)
    if adaptation:
        lines = [
            f"{title} mean {d['mean']:+.3f} (range {d['min']:+.3f} to {d['max']:+.3f})"
            for title, d in (("external", adaptation["difference"]["external_test"]),
                             ("validation", adaptation["difference"]["val"]))
        ]  # fmt: skip
        out += [
            f"- Unlabelled site adaptation (BatchNorm statistics, cross-adapted by patient halves; reported, not a "
            f"candidate): the AUC change over the {len(adaptation['seeds'])} seeds, {'; '.join(lines)}."
        ]
    confirmed = cv_check_note(str(chosen["name"]))
    if confirmed:
        out += [f"- {confirmed}"]
    site = _shipped_record("site_cv")
    if site:
        means = {row["model"]: row["fold_auc_mean"] for row in site["models"]}
        out += [
            f"- Learning from BrEaST's own labelled patients ({site['folds']}-fold cross-validation inside BrEaST; a "
            f"diagnostic that uses the external labels, not a candidate): mean fold AUC {means['transfer']:.3f} for "
            f"the shipped model, {means['head_refit']:.3f} with its head refitted, {means['transfer_tuned']:.3f} "
            f"fine-tuned, {means['site_only']:.3f} trained on BrEaST alone; the radiologists "
            f"{site['radiologists']['fold_auc_mean']:.3f} on the same folds."
        ]
        path = REPO / "docs" / "busbra_small.json"
        small = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        if small.get("site_only_mean") == means["site_only"] and small.get("cases_harder") is not None:
            verdict = (
                "BrEaST's cases are harder for this backbone, not only elsewhere"
                if small["cases_harder"]
                else "the small training set, not the cases, explains the BrEaST-only model's AUC"
            )
            out[-1] += (
                f" Trained on as few BUS-BRA patients ({small['train_patients']} + {small['val_patients']}, "
                f"{len(small['draws'])} draws), the same settings score {small['internal_mean']:.3f} on BUS-BRA's "
                f"internal test and {small['external_mean']:.3f} on BrEaST: {verdict} (items 28-29, read as "
                "registered)."
            )
    sens = _shipped_record("sens95")
    if sens:
        ext, rad = sens["rules"]["sens95"]["external_test"], sens["radiologists"]["specificity"]
        out += [
            f"- An operating point aimed at the goal's sensitivity (protocol item 30, registered after the Youden "
            f"results were seen; the package keeps Youden): frozen on validation for {100 * sens['target']:.0f}% "
            f"sensitivity, external sensitivity {100 * ext['sensitivity']['estimate']:.1f}% and specificity "
            f"{100 * ext['specificity']['estimate']:.1f}% vs the radiologists' {100 * rad['estimate']:.1f}% (McNemar "
            f"P {_p_value(ext['specificity_vs_radiologists']['p'])}): the second goal is "
            + ("met this way." if sens["goal_met"] else "**not met** this way either.")
        ]
    where = f"{len(goals)} in the chosen model's goals section below"
    where += ", the AI + radiologist goal above" if tried else ""
    out += [f"- Issue 10's goals: {sum(met)} of {len(met)} met ({where})."]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--final-only", action="store_true", help="train only the shipped configuration and its seeds")
    parser.add_argument(
        "--no-train",
        action="store_true",
        help="train nothing: use the configurations finished so far (the table says which are not)",
    )
    parser.add_argument("--no-ship", action="store_true", help="do not write the chosen model under models/")
    args = parser.parse_args(argv)
    if not (args.data / "BUS-BRA").is_dir():
        print(f"real data not found at {args.data}; pass --data", file=sys.stderr)
        return 2
    from filelock import FileLock, Timeout

    # One at a time: a rebuild lets go of the run folder's lock between copying the package and checking its
    # predictions (the `alnus` commands it runs take that lock themselves), so a second instance must not start.
    path = REPO / "runs" / SINGLE_LOCK
    lock = FileLock(str(path), timeout=0)
    try:
        path.parent.mkdir(exist_ok=True)
        lock.acquire()
    except Timeout:
        print(f"another bench/public_final.py is running (it holds {path}): wait for it to finish, then run this "
              "again", file=sys.stderr)  # fmt: skip
        return 2
    except OSError as exc:
        print(f"cannot take the lock {path} ({exc.strerror or exc}): runs/ must be a folder and the lock a plain "
              "file; remove whatever is in its place and run this again", file=sys.stderr)  # fmt: skip
        return 2
    try:
        return _run(args)
    finally:
        lock.release()


def _run(args: argparse.Namespace) -> int:
    """main() with its arguments parsed and the single-instance lock held."""
    started = time.perf_counter()
    public_manifest(args.data)
    only = ",".join(FINAL_MEMBERS) if args.final_only else ""
    public_configs.main(
        ["--data", str(args.data)] + (["--table"] if args.no_train else ["--only", only] if only else [])
    )
    ensembles = []
    if any(_trained_here(name) for e in ENSEMBLES for name in e.configurations):
        _prepare_final_run()
        ensembles = _build_ensembles()
    ensemble_started = time.perf_counter()
    if ensembles:
        _alnus("predict-run", str(FINAL_RUN), *[a for name in ensembles for a in ("--model", name)])
        _alnus("evaluate", str(FINAL_RUN))
        _alnus("report", str(FINAL_RUN))
    ensemble_seconds = time.perf_counter() - ensemble_started
    candidates = _candidates(ensembles)
    chosen = choose(candidates.dropna(subset=["val AUC"]))
    if chosen["run"] != FINAL_RUN.name and _needs_rebuild(run_dir_of(chosen), chosen):
        rebuild_from_package(chosen)
    if not (run_dir_of(chosen) / "metrics.json").is_file() or (
        chosen["run"] != FINAL_RUN.name and _needs_rebuild(run_dir_of(chosen), chosen)
    ):
        print(f"the rule chose {chosen['name']} (measured {chosen['measured']}), whose run folder "
              f"{run_dir_of(chosen)} is not on this machine: train it here (bench/public_configs.py --only "
              f"{chosen['name']}), then run this again", file=sys.stderr)  # fmt: skip
        return 2
    ensemble = next((e for e in ENSEMBLES if e.name == chosen["name"]), None)
    names = ensemble.configurations if ensemble is not None else (str(chosen["name"]),)
    trained = sum(public_configs.training_seconds(name) for name in names)
    final_minutes = f"{trained / 60:.0f} min of training ({', '.join(names)})"
    if ensemble is not None:
        final_minutes += f" and {ensemble_seconds / 60:.0f} min to build, predict and evaluate the ensembles"
    speed = speed_note(chosen)
    section = final_section(candidates, chosen, time.perf_counter() - started, final_minutes, speed)
    write_section(REPO / "docs" / "results.md", "public-final", section, title="# Results")
    print(section)
    import ai_plus_radiologist

    run = run_dir_of(chosen)
    ai_plus_radiologist.main(["--run", str(run), "--model", str(chosen["model"])])
    patients = ai_plus_radiologist.patients_of(run, str(chosen["model"]))
    from alnus.combine import CombineError

    try:
        combined, not_fitted = ai_plus_radiologist.compare(patients, "ml")[3]["external_test"], ""
    except CombineError as exc:  # protocol item 8 has no fit on these validation patients: said in the glance
        combined, not_fitted = None, str(exc)
    try:
        firth, firth_not_fitted = ai_plus_radiologist.compare(patients, "firth")[3]["external_test"], ""
    except CombineError as exc:
        firth, firth_not_fitted = None, str(exc)
    ordered = ai_plus_radiologist.tie_break(patients, "4a")[1]["external_test"]
    glance = glance_section(candidates, chosen, _metrics(run), combined, ordered, not_fitted=not_fitted,
                            firth=firth, firth_not_fitted=firth_not_fitted)  # fmt: skip
    write_section(REPO / "docs" / "results.md", "at-a-glance", glance, title="# Results")
    print(glance)
    if not args.no_ship:
        import ship_model

        package = run / MEMBER.format(model=chosen["model"])
        metrics = _metrics(run)
        note = "\n".join(
            [
                "## External results in short (docs/results.md has the tables)",
                "",
                *_goals(metrics, str(chosen["model"]))[1:],
                f"- Training seeds of the chosen configuration ({_seeded(chosen)}): {_seed_spread(_seeded(chosen))}.",
                *(["", _threshold_note(package)] if _threshold_note(package) else []),
            ]
        )
        ship_model.main([str(package), "--card-note", note])
    return 0


if __name__ == "__main__":
    sys.exit(main())
