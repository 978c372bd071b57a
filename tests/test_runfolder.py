"""The run folder: one place for its paths, its split, and its single writer."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest

from alnus.runfolder import (
    RunFolder,
    RunFolderError,
    RunLockedError,
    lock_run,
    prediction_mismatch,
    read_splits,
    run_models,
)


def test_paths_live_under_the_run_folder(tmp_path: Path) -> None:
    run = RunFolder(tmp_path / "r")
    model = run.model("tiny_cnn")
    assert model.last_checkpoint == tmp_path / "r" / "models" / "tiny_cnn" / "checkpoints" / "last.pt"
    assert model.metadata == tmp_path / "r" / "models" / "tiny_cnn" / "model" / "metadata.json"
    assert model.predictions_csv("val") == tmp_path / "r" / "models" / "tiny_cnn" / "predictions" / "val.csv"
    assert model.backbone == "tiny_cnn" and run.name == "r"


def test_read_splits_names_the_missing_file_and_columns(tmp_path: Path) -> None:
    with pytest.raises(RunFolderError, match=r"splits\.csv not found.*alnus train CONFIG"):
        read_splits(tmp_path)
    pd.DataFrame({"image": ["a.png"], "patient_id": ["p"], "label": ["x"]}).to_csv(tmp_path / "splits.csv")
    with pytest.raises(RunFolderError, match="lacks column"):
        read_splits(tmp_path)


def test_run_models_lists_packages_and_refuses_unknown_ones(tmp_path: Path) -> None:
    (tmp_path / "models" / "a" / "model").mkdir(parents=True)
    (tmp_path / "models" / "a" / "model" / "metadata.json").write_text("{}")
    (tmp_path / "models" / "b" / "checkpoints").mkdir(parents=True)  # training never finished: no package
    assert run_models(tmp_path) == ["a"]
    with pytest.raises(RunFolderError, match=r"no model package for b \(found: a\)"):
        run_models(tmp_path, ["b"])


def _hold_lock(run_dir: str, ready: mp.Event, release: mp.Event) -> None:  # type: ignore[valid-type]
    with lock_run(run_dir, command="holder"):
        ready.set()
        release.wait(30)


def test_a_prediction_row_repeated_is_named_not_taken_for_a_changed_split() -> None:
    """Attack review: a row appended twice, or copied over another, read as 'the split changed after predicting'."""
    rows = pd.DataFrame({"image": ["a.png", "b.png", "c.png"], "patient_id": ["P1", "P2", "P3"]})
    rows["label"] = ["benign", "malignant", "benign"]
    table = rows.assign(y=[0, 1, 0])
    assert prediction_mismatch(rows, table, "malignant") == ""
    appended = pd.concat([table, table.iloc[[1]]], ignore_index=True)
    assert prediction_mismatch(rows, appended, "malignant") == "image b.png appears 2 times in the table (rows 3 and 5)"
    copied = table.copy()
    copied.iloc[2] = table.iloc[0]
    assert prediction_mismatch(rows, copied, "malignant") == "image a.png appears 2 times in the table (rows 2 and 4)"
    both = pd.concat([appended, copied], ignore_index=True)
    assert prediction_mismatch(rows, both, "malignant").startswith("image a.png appears 3 times in the table (rows 2, ")
    assert prediction_mismatch(rows, both, "malignant").endswith(", and 1 other image(s) appear more than once")


def test_a_second_writer_is_refused_at_once_naming_the_first(tmp_path: Path) -> None:
    """Issue 7.9: two writers on one run folder; the second gets a clear error, not a mixed report."""
    ctx = mp.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(tmp_path), ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        with pytest.raises(RunLockedError, match=rf"in use by pid {holder.pid} .*`holder`"), lock_run(tmp_path):
            pass
    finally:
        release.set()
        holder.join(30)
    with lock_run(tmp_path):  # free again once the first writer is done
        assert json.loads((tmp_path / ".lock.json").read_text())["pid"] == os.getpid()
    assert not (tmp_path / ".lock.json").exists()


def test_a_lock_left_by_a_killed_writer_is_taken_over_and_explained(tmp_path: Path) -> None:
    """Issue 7.9: kill -9 leaves the holder's note behind; the next writer says so and proceeds."""
    code = textwrap.dedent(
        f"""
        import sys, time
        from alnus._io import atomic_path
        from alnus.runfolder import lock_run
        with lock_run({str(tmp_path)!r}, command="victim"):
            with atomic_path({str(tmp_path / "models" / "m" / "checkpoints" / "last.pt")!r}) as tmp:
                tmp.write_bytes(b"half")
                print("locked", flush=True)
                time.sleep(60)
        """
    )
    victim = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert victim.stdout is not None and victim.stdout.readline().strip() == "locked"
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(30)
    finally:
        if victim.poll() is None:
            victim.kill()
    assert (tmp_path / ".lock.json").is_file()  # the note of the dead holder is still there
    # A new user's review: the half-written checkpoint a kill left stayed beside the resumed run's.
    (tmp_path / "keep.tmp").write_text("a user's file, not one of ours")
    (tmp_path / ".notes.txt").write_text("nor this")
    # A second attack review: a user's file named like a temporary was deleted too. One changed before the killed
    # writer started is not its own.
    draft = tmp_path / "tables" / ".results.draft_v2.tmp"
    draft.parent.mkdir()
    draft.write_text("a user's draft")
    os.utime(draft, (time.time() - 3600, time.time() - 3600))
    assert len(list((tmp_path / "models").rglob(".last.pt.*.tmp"))) == 1
    probe = subprocess.run(
        [sys.executable, "-c", f"from alnus.runfolder import lock_run\nwith lock_run({str(tmp_path)!r}): pass"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert probe.returncode == 0, probe.stderr
    assert f"last locked by pid {victim.pid}" in probe.stderr and "taking over" in probe.stderr
    assert "removed 1 half-written file(s) it left" in probe.stderr and draft.exists()
    assert (
        not list(tmp_path.rglob(".last.pt.*"))
        and (tmp_path / "keep.tmp").exists()
        and (tmp_path / ".notes.txt").exists()
    )


def test_a_planted_lock_note_symlink_is_replaced_not_written_through(tmp_path: Path) -> None:
    """A run folder from elsewhere with `.lock.json` -> a user's file: taking the lock must not overwrite it."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock.json").symlink_to(victim)
    with lock_run(run, command="honest"):
        assert not (run / ".lock.json").is_symlink()
    assert victim.read_text() == "precious"
