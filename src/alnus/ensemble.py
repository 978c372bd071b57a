"""Ensembles of a run's trained models, built as one more model of the run (`alnus ensemble RUN --name NAME ...`).

`build_ensemble(run, name, members, tta=...)` writes `runs/<name>/models/<NAME>/model/`, the package folder every
other stage reads (`alnus.runfolder.ModelFolder.package`), so `alnus predict-run`, `evaluate` (which freezes the
ensemble's own threshold on validation), `explain`, `report`, `predict` and `serve` treat it as any model. The
package holds no weights of its own: each member, a complete single-network package, is copied into `members/<i>/`
(weights, metadata and the exports that pass their checks), and its probability is the mean of the members' (each
preprocessing with its own spec; the TTA views apply to every member). The format and its checks on loading are in
`alnus.models.package`.

Honesty checks before anything is written: every member must have been trained on exactly this run's training
patients (its `training_data_hash` equals the hash of the run's train and val rows, computed as training computes it,
`alnus.train.training_data_hash`), since a member trained on other patients could have seen this run's validation or
test patients; members must agree on the labels; an ensemble is not a member; a member is not given twice; one member
needs TTA views (else the ensemble would be a plain copy of it). The package is built in a temporary folder beside its
place and renamed into it, under the run's writer lock, so a build that is stopped leaves no half package.

Building an ensemble again with the same identity (`identity`: the same members' weights in the same order, the same
TTA views, labels, training data and preprocessing; e.g. after exporting the members to ONNX) keeps its frozen
threshold, its history, its predictions and its heat maps: it predicts exactly as before. Any other replacement starts
fresh: no threshold, and the earlier ensemble's predictions and heat maps are removed, so that no stage shows them as
this model's.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alnus._io import NotAFileError, atomic_path, atomic_write_text, file_problem, file_sha256, open_regular
from alnus.data.seen import FILE as SEEN_FILE
from alnus.data.seen import read_development_images
from alnus.data.tta import check_views
from alnus.errors import AlnusError
from alnus.models.package import (
    ENSEMBLE,
    EXPORT_FILES,
    FORMAT,
    MAX_MEMBERS,
    MEMBERS_DIR,
    METADATA_FILE,
    WEIGHTS_FILE,
    ensemble_digest,
    ensemble_name,
    format_version_of,
    is_ensemble,
    load_members,
    load_package,
    read_metadata,
)
from alnus.runfolder import RunFolder, lock_run, read_splits

# A model folder name: letters, digits, '.', '_', '-', starting with a letter or digit (no path, no hidden folder).
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# The splits a model is trained (train) and selected (val) on: what `training_data_hash` covers.
TRAINING_SPLITS = ("train", "val")
# What a model folder holds once a backbone was trained in it: an ensemble never replaces any of these.
_TRAINED_MARKERS = ("checkpoints", "history.csv", "config.yaml")


class EnsembleError(AlnusError):
    """An ensemble that cannot be built as asked; the message names the member or folder and what to do."""


@dataclass
class BuiltEnsemble:
    """What `build_ensemble` wrote: the package folder, its metadata, and notes for the user."""

    package: Path
    metadata: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    # Built again with the identity of the earlier ensemble: its threshold, history, predictions and heat maps kept.
    kept: bool = False


@dataclass(frozen=True)
class _Candidate:
    """A member package as given, read and checked."""

    source: Path
    metadata: dict[str, Any]


def run_training_hash(run_dir: str | os.PathLike[str]) -> str:
    """The training-data hash of a run's split: its train and val rows and their images' contents, as training
    records it in each package (`alnus.train.training_data_hash`)."""
    from alnus.train import training_data_hash

    run_dir = Path(run_dir)
    splits = read_splits(run_dir)
    rows = splits[splits["split"].isin(TRAINING_SPLITS)].copy()
    if not (rows["split"] == "train").any():
        raise EnsembleError(f"{RunFolder(run_dir).splits} has no train rows; no model of this run was trained on it.")
    # Relative image paths resolve from the run folder, as the datasets read them.
    rows["image"] = [p if Path(p).is_absolute() else str(run_dir / p) for p in rows["image"]]
    try:
        return training_data_hash(rows)
    except NotAFileError as exc:
        raise EnsembleError(
            f"cannot hash the training images of {run_dir} ({exc}); the images must be where splits.csv says, as "
            "when the models were trained."
        ) from None


def build_ensemble(
    run_dir: str | os.PathLike[str],
    name: str,
    members: Sequence[str | os.PathLike[str]],
    *,
    tta: Sequence[str] | None = None,
    force: bool = False,
) -> BuiltEnsemble:
    """Write the ensemble of `members` (package folders) as `runs/<run>/models/<name>/model/`; return what was built.

    Args:
        name: the model's folder name in the run (not a registered backbone's name: `alnus train` writes there).
        members: package folders, e.g. `runs/<run>/models/efficientnet_lite0/model`; one member with `tta` is "the
            base model plus TTA".
        tta: test-time augmentation views (`alnus.data.tta.VIEWS`) applied to every member.
        force: replace an earlier ensemble of that name (a trained model's folder is never replaced).

    Raises:
        EnsembleError: a check fails (the message names the member and why); nothing is written then.
    """
    run = RunFolder(run_dir)
    if not run.splits.is_file():
        raise EnsembleError(f"{run.root} is not a prepared run folder (no splits.csv); pass runs/<name>.")
    _check_name(name)
    views = check_views(tta, "--tta")  # a bare string is refused there (not read letter by letter)
    if not members:
        raise EnsembleError("give at least one member package (--member runs/<name>/models/<backbone>/model).")
    if len(members) > MAX_MEMBERS:
        raise EnsembleError(f"{len(members)} members given; an ensemble holds at most {MAX_MEMBERS}.")
    with lock_run(run.root, command=f"alnus ensemble {name}"):
        earlier = _check_target(run, name, force)
        if len(members) == 1 and not views:
            raise EnsembleError(
                f"one member ({members[0]}) and no --tta: that ensemble would be a plain copy of the model, which is "
                "already in the run. Give two or more members, or one member with --tta VIEWS (e.g. --tta hflip) for "
                '"the base model plus TTA".'
            )
        expected = run_training_hash(run.root)
        candidates = [_candidate(Path(path), i, expected, run) for i, path in enumerate(members, start=1)]
        _check_agreement(candidates)
        notes = _notes(candidates, views)
        package, kept = _write(run, name, candidates, views, expected, earlier)
        if earlier is not None:
            notes.append(_replacement_note(run, name, earlier, read_metadata(package), kept))
    return BuiltEnsemble(package=package, metadata=read_metadata(package), notes=notes, kept=kept)


def identity(meta: dict[str, Any]) -> dict[str, Any]:
    """What makes two ensembles the same model (the same probabilities for every image): the members' weights in
    order (the ensemble's `weights_sha256`), the TTA views, the labels, the training data and each member's
    preprocessing. Exports, sources and dates are not part of it."""
    from alnus.data.dataset import PreprocessSpec

    return {
        "weights_sha256": meta["weights_sha256"],
        "tta": list(meta["tta"]),
        "label_names": list(meta["label_names"]),
        "positive_label": meta["positive_label"],
        "training_data_hash": meta["training_data_hash"],
        "preprocess": [PreprocessSpec.from_dict(m["preprocess"]) for m in meta["members"]],
    }


def _differences(earlier: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """How the identity of a new build differs from the earlier ensemble's, in words."""
    old_id, new_id = identity(earlier), identity(new)
    found = []
    old_members = [m["weights_sha256"] for m in earlier["members"]]
    new_members = [m["weights_sha256"] for m in new["members"]]
    if old_members != new_members:
        same_set = sorted(old_members) == sorted(new_members)
        found.append("the same members in another order" if same_set else "other members (weights)")
    if old_id["tta"] != new_id["tta"]:
        found.append(f"TTA views {new_id['tta'] or 'none'} instead of {old_id['tta'] or 'none'}")
    for key, what in (("label_names", "labels"), ("positive_label", "positive label"),
                      ("training_data_hash", "training data"), ("preprocess", "member preprocessing")):  # fmt: skip
        if old_id[key] != new_id[key] and not (key == "preprocess" and old_members != new_members):
            found.append(f"other {what}")
    return found


def _replacement_note(run: RunFolder, name: str, earlier: dict[str, Any], new: dict[str, Any], kept: bool) -> str:
    """What happened to the earlier ensemble's threshold, predictions and heat maps."""
    if kept:
        point = new["threshold"]
        threshold = (
            "it has no frozen threshold yet"
            if point is None
            else f"it keeps its frozen threshold {point['value']:.4g} and the threshold history"
        )
        return (
            f"{name} was built again with the same members (weights SHA-256) and TTA views, so it is the same model: "
            f"{threshold}; its predictions and heat maps stay."
        )
    point = earlier.get("threshold")
    lost = "" if point is None else f" (the earlier threshold {point['value']:.4g} is not carried over)"
    return (
        f"{name} replaces an earlier, different ensemble ({'; '.join(_differences(earlier, new))}): it starts fresh, "
        f"with no frozen threshold{lost}; the earlier ensemble's predictions and heat maps were removed. Predict and "
        f"evaluate it again (`alnus predict-run {run.root} --model {name}`, then `alnus evaluate {run.root}`)."
    )


def _check_name(name: str) -> None:
    from alnus.models import list_backbones

    # fullmatch: `$` would also match before a final line break ("ens\n" is no folder name).
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise EnsembleError(
            f"--name {name!r} is not a model folder name: use letters, digits, '.', '_' and '-' (up to 64, starting "
            "with a letter or digit), e.g. ens_lite0_hflip."
        )
    if name in list_backbones():
        raise EnsembleError(
            f"--name {name} is a backbone's name: `alnus train` writes that backbone into models/{name}, which would "
            f"mix it with the ensemble; choose another name, e.g. ens_{name}."
        )


def _check_target(run: RunFolder, name: str, force: bool) -> dict[str, Any] | None:
    """The model folder may be new, or hold an earlier ensemble (replaced only with `force`); never a trained model.

    Returns the earlier ensemble's metadata (None when there is none)."""
    folder = run.model(name)
    if folder.root.is_symlink():
        raise EnsembleError(f"{folder.root} is a symbolic link; remove it (an ensemble is written inside the run).")
    for path in (folder.root, folder.package):
        if path.exists() and not path.is_dir() and not path.is_symlink():
            raise EnsembleError(
                f"{path} is not a folder (an ensemble is the folder models/<NAME>/model); choose another --name, or "
                "remove that file if it is not needed."
            )
    trained = [m for m in _TRAINED_MARKERS if (folder.root / m).exists()]
    earlier = None
    if folder.metadata.is_file() and not trained:
        try:
            earlier = read_metadata(folder.package)
        except AlnusError as exc:
            raise EnsembleError(
                f"{folder.metadata} cannot be read ({exc}), so it is unknown whether {folder.package} holds an "
                "ensemble or a trained model, and it is not replaced (not even with --force); delete that folder "
                "yourself if it is a damaged ensemble, or choose another --name."
            ) from None
        if not is_ensemble(earlier):
            trained.append("a model package")
        elif not force:
            raise EnsembleError(
                f"{folder.package} already holds an ensemble ({earlier['backbone']}); pass --force to replace it (its "
                "threshold, predictions and heat maps are kept only when it is built from the same members and TTA)."
            )
    if trained:
        raise EnsembleError(
            f"{folder.root} holds a trained model ({', '.join(trained)}); an ensemble never replaces one, even with "
            "--force: choose another --name."
        )
    return earlier


def _candidate(source: Path, i: int, expected: str, run: RunFolder) -> _Candidate:
    """Member `i` read and checked: a single network's package, its weights intact, trained on this run's patients."""
    what = f"member {i} ({source})"
    try:
        meta = read_metadata(source)
    except AlnusError as exc:
        raise EnsembleError(f"{what}: {exc}") from None
    if is_ensemble(meta):
        raise EnsembleError(
            f"{what} is itself an ensemble ({meta['backbone']}); ensembles are not nested: give its members' own "
            "packages instead."
        )
    try:
        load_package(source)  # the weights match their SHA-256 and fit the backbone
    except AlnusError as exc:
        raise EnsembleError(f"{what}: {exc}") from None
    if meta.get("adaptation"):
        site = meta["adaptation"].get("site") or "another site"
        raise EnsembleError(
            f"{what} was adapted to {site} (`alnus adapt`): its BatchNorm statistics come from images that may be "
            f"this run's validation or test patients, so the ensemble's results here would not be honest. Build the "
            "ensemble from the unadapted packages, then adapt the ensemble package itself (`alnus adapt`)."
        )
    recorded = meta.get("training_data_hash")
    if not isinstance(recorded, str) or not recorded:
        raise EnsembleError(
            f"{what} records no training-data hash, so it cannot be shown to have been trained on the training "
            f"patients of {run.root}; use a package that `alnus train` wrote for this run."
        )
    if recorded != expected:
        raise EnsembleError(
            f"{what} was trained on other data than the train and val split of {run.root} (training-data hash "
            f"{recorded[:12]}..., this run's {expected[:12]}...): a member trained on other patients could have seen "
            "this run's validation or test patients, which would make the ensemble's results look better than they "
            f"are. Use packages trained on this run's training patients: trained in this run "
            f"({run.models_dir}/<backbone>/model), or in another run with the same split, e.g. another seed of the "
            "same config: `alnus train CONFIG --set name=X --set train.seed=1`."
        )
    return _Candidate(source=source, metadata=meta)


def _check_agreement(candidates: list[_Candidate]) -> None:
    """Members agree on the labels and the positive class, and none is given twice."""
    first = candidates[0].metadata
    seen: dict[str, int] = {}
    for i, candidate in enumerate(candidates, start=1):
        meta = candidate.metadata
        if list(meta["label_names"]) != list(first["label_names"]) or meta["positive_label"] != first["positive_label"]:
            raise EnsembleError(
                f"member {i} ({candidate.source}) has labels {meta['label_names']} (positive "
                f"{meta['positive_label']!r}), member 1 ({candidates[0].source}) {first['label_names']} (positive "
                f"{first['positive_label']!r}); an ensemble averages probabilities of one class, so its members must "
                "agree."
            )
        digest = meta["weights_sha256"]
        if digest in seen:
            raise EnsembleError(
                f"member {i} ({candidate.source}) has the same weights as member {seen[digest]}; give each network "
                "once (a repeated member only weighs it twice)."
            )
        seen[digest] = i


def _notes(candidates: list[_Candidate], views: list[str]) -> list[str]:
    notes = []
    for i, candidate in enumerate(candidates, start=1):
        own = list(candidate.metadata.get("tta") or [])
        if own and own != views:
            notes.append(
                f"member {i} ({candidate.metadata['backbone']}) has TTA views {own} of its own; inside the ensemble "
                f"the ensemble's views ({views or 'none'}) apply to every member."
            )
    return notes


def _source_text(source: Path, run: RunFolder) -> str:
    """Where a member came from: relative to the run folder when it lies inside it."""
    resolved = source.resolve()
    try:
        return str(resolved.relative_to(run.root.resolve()))
    except ValueError:
        return str(resolved)


def _copy_file(source: Path, target: Path) -> None:
    """Copy a regular file's bytes (a FIFO or device is refused), atomically, a MiB at a time."""
    with open_regular(source) as fh, atomic_path(target) as tmp, open(tmp, "wb") as out:
        shutil.copyfileobj(fh, out, 1 << 20)
        out.flush()
        os.fsync(out.fileno())


def _copy_member(candidate: _Candidate, target: Path) -> dict[str, Any]:
    """Copy a member's weights and metadata into `target` with the exports that pass their checks (current weights,
    passed, intact file); return the metadata written."""
    source, meta = candidate.source, dict(candidate.metadata)
    target.mkdir(parents=True)
    _copy_file(source / WEIGHTS_FILE, target / WEIGHTS_FILE)
    if file_sha256(target / WEIGHTS_FILE) != meta["weights_sha256"]:
        raise EnsembleError(f"{source / WEIGHTS_FILE} changed while it was copied; build the ensemble again.")
    kept = {}
    for kind, record in meta["exports"].items():
        path = source / EXPORT_FILES[kind]
        current = record["passed"] and record["weights_sha256"] == meta["weights_sha256"]
        if current and file_problem(path) is None and file_sha256(path) == record["sha256"]:
            _copy_file(path, target / EXPORT_FILES[kind])
            kept[kind] = record
    meta["exports"] = kept
    atomic_write_text(target / METADATA_FILE, json.dumps(meta, indent=2, default=str) + "\n")
    return meta


def _run_data_hash(run: RunFolder) -> str | None:
    """The run's data stamp (`data.json` hash): predict-run refuses the ensemble once the run was prepared again."""
    try:
        return json.loads(run.data_stamp.read_text(encoding="utf-8")).get("hash")
    except (OSError, ValueError, AttributeError):
        return None


def _metadata(
    run: RunFolder, name: str, candidates: list[_Candidate], copied: list[dict[str, Any]], views: list[str], digest: str
) -> dict[str, Any]:
    import alnus

    first = candidates[0].metadata
    members = [
        {
            "folder": f"{MEMBERS_DIR}/{i}",
            "backbone": meta["backbone"],
            "weights_sha256": meta["weights_sha256"],
            "training_data_hash": meta["training_data_hash"],
            "source": _source_text(candidate.source, run),
            "preprocess": meta["preprocess"],
        }
        for i, (candidate, meta) in enumerate(zip(candidates, copied, strict=True), start=1)
    ]
    meta: dict[str, Any] = {
        "format": FORMAT,
        "kind": ENSEMBLE,
        "name": name,
        "backbone": ensemble_name([m["backbone"] for m in members]),
        "combination": "mean of the members' probabilities (each member's mean over the TTA views)",
        "label_names": list(first["label_names"]),
        "positive_label": first["positive_label"],
        "tta": views,
        "threshold": None,
        "threshold_history": [],
        "reader_rule": None,
        "exports": {},
        "members": members,
        "weights_sha256": ensemble_digest([m["weights_sha256"] for m in members]),
        "training_data_hash": digest,
        "run": run.name,
        "run_data_hash": _run_data_hash(run),
        "versions": {"alnus": alnus.__version__},
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    meta["format_version"] = format_version_of(meta)
    return meta


def _write(
    run: RunFolder,
    name: str,
    candidates: list[_Candidate],
    views: list[str],
    digest: str,
    earlier: dict[str, Any] | None,
) -> tuple[Path, bool]:
    """Build the package in a temporary folder beside `models/<name>/model`, check it as a reader will, rename it
    into place (replacing an earlier ensemble); return it and whether the earlier ensemble's threshold was kept.

    An earlier ensemble with the same `identity` passes its frozen threshold and history on, and its predictions and
    heat maps stay; otherwise they are removed (before the new package takes its place, so that a build stopped
    half-way never leaves them beside a package they do not belong to)."""
    folder = run.model(name)
    root = run.output_folder(folder.root)  # refuses a symlink on the way (nothing is written through one)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.package.name}.", dir=root))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # as readable as the rest of the run (mkdtemp makes it private)
    try:
        copied = [
            _copy_member(candidate, tmp / MEMBERS_DIR / str(i)) for i, candidate in enumerate(candidates, start=1)
        ]
        meta = _metadata(run, name, candidates, copied, views, digest)
        # The images the members learned from (they share one training): prediction warns about those. A member's
        # file is read as prediction reads it, so that one it would refuse is refused here, and one it would use is
        # never left behind (a symbolic link was, silently: its members warned, the ensemble did not).
        seen = _development_images_of(candidates)
        if seen is not None:
            _copy_file(seen, tmp / SEEN_FILE)
        kept = False
        if earlier is not None and identity(earlier) == identity(meta):
            meta["threshold"], meta["threshold_history"] = earlier["threshold"], earlier["threshold_history"]
            kept = True
        # Metadata last: without it the folder is no package.
        atomic_write_text(tmp / METADATA_FILE, json.dumps(meta, indent=2, default=str) + "\n")
        load_members(tmp)  # every member checked and loaded, as `Predictor` will
        if not kept:
            _remove_outputs(run, name)
        old = root / f".{folder.package.name}.old.{os.getpid()}"
        if folder.package.is_symlink():
            folder.package.unlink()
        elif folder.package.exists():
            os.replace(folder.package, old)
        os.replace(tmp, folder.package)
        shutil.rmtree(old, ignore_errors=True)
        # Folders of an earlier build that was killed (kill -9) before it could clean up, removed once the members
        # are copied (one may have been given as a member: the old package of a build killed while swapping). The
        # run's lock is held here.
        for stale in root.glob(f".{folder.package.name}.*"):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder.package, kept


def _development_images_of(candidates: Sequence[_Candidate]) -> Path | None:
    """The first member's development-images file (`alnus.data.seen`), checked as `Predictor` checks it; None when
    no member has one (packages written before they were recorded)."""
    for candidate in candidates:
        path = candidate.source / SEEN_FILE
        if not path.exists() and not path.is_symlink():
            continue
        read_development_images(candidate.source, candidate.metadata.get("training_data_hash"))
        if path.is_symlink():  # never followed into the ensemble: a link could point at any file the user may read
            raise EnsembleError(
                f"{path} is a symbolic link; replace it with the file it points to (or delete it, to build the "
                "ensemble without the check of the images its members learned from) and build again"
            )
        return path
    return None


def _remove_outputs(run: RunFolder, name: str) -> None:
    """Remove what other stages wrote for an earlier model of this name: its predictions (the stamp first: without
    it no stage reads the tables) and its heat maps (`heatmaps/<name>/`, which the report would show)."""
    predictions = run.model(name).predictions
    if predictions.is_dir() and not predictions.is_symlink():
        run.model(name).predictions_stamp.unlink(missing_ok=True)
    # Nothing is removed through a symlinked heatmaps/ (explain refuses to write there, too).
    maps = [] if run.heatmaps.is_symlink() else [run.heatmaps / name]
    for path in (predictions, *maps):
        if path.is_symlink() or path.is_file():
            path.unlink()  # a link is removed, never followed
        elif path.is_dir():
            shutil.rmtree(path)
