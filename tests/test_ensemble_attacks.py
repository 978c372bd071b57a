"""Crafted and hostile inputs for ensembles and TTA (issue 10.3 QA): model folder names, crafted ensemble metadata
that the build would never write, and odd run folders. Each test is a problem that was found and fixed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from alnus.data.tta import TtaError
from alnus.ensemble import EnsembleError, build_ensemble
from alnus.models.package import PackageError, ensemble_digest, read_metadata
from alnus.predict import Predictor
from alnus.runfolder import RunFolder
from tests.test_ensemble import make_run, pkg


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run with the ensemble `ens` of tiny_cnn and tiny_box (two different networks)."""
    run = make_run(tmp_path_factory.mktemp("attacks"))
    build_ensemble(run, "ens", [pkg(run, "tiny_cnn"), pkg(run, "tiny_box")])
    return run


def _crafted(run: Path, tmp_path: Path) -> tuple[Path, dict]:
    folder = tmp_path / "crafted"
    shutil.copytree(pkg(run, "ens"), folder)
    return folder, json.loads((folder / "metadata.json").read_text())


def _save(folder: Path, meta: dict) -> None:
    meta["weights_sha256"] = ensemble_digest([m["weights_sha256"] for m in meta["members"]])
    (folder / "metadata.json").write_text(json.dumps(meta))


def _edit_member(folder: Path, i: int, **changes: object) -> None:
    path = folder / "members" / str(i) / "metadata.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


# ------------------------------------------------------------------------------------------------- names
@pytest.mark.parametrize("name", ["ens\n", "ens\r", "ens\n\n"])
def test_a_name_with_a_trailing_line_break_is_refused(run: Path, name: str) -> None:
    """`$` in a regular expression also matches before a final newline: "ens\\n" passed as a plain name and made a
    model folder whose name holds a line break (in CSV cells, tables, the report and every later command line)."""
    with pytest.raises(EnsembleError, match="is not a model folder name"):
        build_ensemble(run, name, [pkg(run, "tiny_cnn")])
    assert not (run / "models" / name).exists()


def test_a_model_folder_that_is_a_file_is_refused_with_a_message(run: Path) -> None:
    """`models/NAME` a regular file: a FileExistsError traceback instead of a message."""
    target = run / "models" / "afile"
    target.write_text("not a folder")
    try:
        with pytest.raises(EnsembleError, match=r"models/afile is not a folder.*choose another --name"):
            build_ensemble(run, "afile", [pkg(run, "tiny_cnn")], force=True)
        assert target.read_text() == "not a folder"
    finally:
        target.unlink()


def test_a_damaged_earlier_ensemble_is_named_as_unreadable_not_as_a_trained_model(run: Path) -> None:
    """An earlier package whose metadata.json cannot be read was reported as "a trained model", even with --force."""
    build_ensemble(run, "broken", [pkg(run, "tiny_cnn")], tta=["hflip"])
    metadata = RunFolder(run).model("broken").metadata
    metadata.write_text("{")
    with pytest.raises(EnsembleError, match=r"broken/model/metadata\.json cannot be read .*not valid JSON.*delete"):
        build_ensemble(run, "broken", [pkg(run, "tiny_cnn")], force=True)
    assert metadata.read_text() == "{"  # nothing replaced: it may be a trained model's package


def test_a_tta_given_as_one_string_is_refused_as_not_a_list(run: Path) -> None:
    """`build_ensemble(..., tta="hflip")` checked the letters 'h', 'f', ... as view names."""
    with pytest.raises(TtaError, match="is not a list of view names"):
        build_ensemble(run, "letters", [pkg(run, "tiny_cnn")], tta="hflip")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------- crafted packages
def test_a_crafted_ensemble_with_a_member_twice_is_refused(run: Path, tmp_path: Path) -> None:
    """The build refuses a member given twice (it only weighs it twice), but a package listing one network twice,
    with its digest recomputed, loaded and averaged that network with double weight."""
    folder, meta = _crafted(run, tmp_path)
    shutil.rmtree(folder / "members" / "2")
    shutil.copytree(folder / "members" / "1", folder / "members" / "2")
    meta["members"][1] = {**meta["members"][0], "folder": "members/2"}
    _save(folder, meta)
    with pytest.raises(PackageError, match=r"members\[2\] has the same weights as members\[1\]") as info:
        Predictor(folder, device="cpu")
    assert str(folder / "metadata.json") in str(info.value) and "build it again" in str(info.value)


def test_a_crafted_ensemble_with_a_member_trained_on_other_data_is_refused(run: Path, tmp_path: Path) -> None:
    """A member whose training-data hash differs from the ensemble's (the run's, checked at build) loaded as long as
    the member's record and its own metadata agreed: the ensemble's hash claimed this run's training patients."""
    folder, meta = _crafted(run, tmp_path)
    _edit_member(folder, 2, training_data_hash="f" * 64)
    meta["members"][1]["training_data_hash"] = "f" * 64
    _save(folder, meta)
    with pytest.raises(
        PackageError, match=r"members\[2\]\.training_data_hash = ffffffffffff\.\.\..*ensemble's"
    ) as info:
        Predictor(folder, device="cpu")
    assert str(folder / "metadata.json") in str(info.value)


def test_a_crafted_ensemble_without_its_training_data_hash_is_refused(run: Path, tmp_path: Path) -> None:
    folder, meta = _crafted(run, tmp_path)
    for value in (None, 3, ""):
        meta["training_data_hash"] = value
        _save(folder, meta)
        with pytest.raises(PackageError, match="training_data_hash .* is not the hash of the training data"):
            read_metadata(folder)
    del meta["training_data_hash"]
    _save(folder, meta)
    with pytest.raises(PackageError, match="lacks training_data_hash"):
        read_metadata(folder)


def test_a_member_inside_the_folder_a_killed_build_left_is_copied_before_that_folder_is_removed(
    tmp_path: Path,
) -> None:
    """A build killed (kill -9) while swapping leaves the earlier ensemble as `models/NAME/.model.old.<pid>`. Building
    again from its members removed that folder first (as a stale temporary folder), then failed reading them."""
    run = make_run(tmp_path)
    first = build_ensemble(run, "ens", [pkg(run, "tiny_cnn"), pkg(run, "tiny_box")]).package
    stale = first.parent / ".model.old.99999"
    shutil.copytree(first, stale)
    again = build_ensemble(run, "ens", [stale / "members" / "1", stale / "members" / "2"], force=True)
    assert read_metadata(again.package)["weights_sha256"] == read_metadata(first)["weights_sha256"]
    assert [p.name for p in first.parent.iterdir()] == ["model"]  # the leftover is gone once the build is done
