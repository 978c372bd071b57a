"""`alnus` as a user meets it: user errors and failed writes end with a message and exit code 2, never a traceback."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import pytest

from alnus import cli


def _run_main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["alnus", *args])
    with pytest.raises(SystemExit) as info:
        cli.main()
    return int(info.value.code or 0), capsys.readouterr().err


def _phantom(tmp_path: Path) -> Path:
    from alnus.data.phantom import make_phantom

    return make_phantom(tmp_path / "data", patients=8, external_patients=0, image_size=(48, 48), seed=1)


@pytest.mark.parametrize(
    ("code", "advice"),
    [
        (errno.EACCES, "choose a folder you can write to"),
        (errno.EROFS, "read-only"),
        (errno.ENOSPC, "the disk is full"),
    ],
)
def test_a_failed_write_names_the_file_and_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], code: int, advice: str
) -> None:
    """Issue 7.13: read-only output folder, full disk: exit 2 with the file and advice (root ignores chmod here,
    so the failing write is simulated at `os.replace`, where every atomic write ends)."""
    manifest = _phantom(tmp_path)
    out = tmp_path / "split-out"

    def refuse(src: object, dst: object) -> None:
        raise OSError(code, os.strerror(code), str(dst))

    monkeypatch.setattr(os, "replace", refuse)
    status, err = _run_main(monkeypatch, capsys, "data", "split", str(manifest), "--out", str(out))
    assert status == 2
    assert "Traceback" not in err and str(out) in err.replace("\n", "") and advice in err.replace("\n", " ")


def test_a_message_with_brackets_is_printed_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 7.12: an error naming a file `[/]x.yaml` prints that name (rich markup would crash or eat it)."""
    status, err = _run_main(monkeypatch, capsys, "study", str(tmp_path / "[/]x [bold].yaml"))
    assert status == 2
    assert "[/]x [bold].yaml" in err.replace("\n", "") and "Traceback" not in err


@pytest.mark.parametrize("command", ["predict-run", "evaluate"])
def test_a_run_stage_on_a_busy_run_folder_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    """Issue 7.9: `alnus predict-run|evaluate RUN` while another command writes the run: exit 2, naming the holder."""
    from alnus.runfolder import lock_run

    with lock_run(tmp_path, command="alnus study (busy)"):
        status, err = _run_main(monkeypatch, capsys, command, str(tmp_path))
    assert status == 2 and "alnus study (busy)" in err and "Traceback" not in err
    status, err = _run_main(monkeypatch, capsys, command, str(tmp_path / "missing"))
    assert status == 2 and "run folder" in err and "not found" in err


def test_control_characters_in_user_text_never_reach_the_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Attack review: a file name with ESC sequences (clear screen, window title) was printed raw."""
    from alnus._text import escape

    assert escape("x\x1b[2J[bold]y\x07") == "x\\x1b[2J\\[bold]y\\x07"
    status, err = _run_main(monkeypatch, capsys, "study", str(tmp_path / "evil\x1b[2J\x1b]0;PWNED\x07.yaml"))
    assert status == 2 and "\x1b" not in err and "\x07" not in err and "\\x1b" in err.replace("\n", "")


def test_piped_output_is_wide_unless_columns_says_otherwise() -> None:
    """New-user review: output to a file ignored COLUMNS (always 160 wide)."""
    import subprocess
    import sys

    def width(env: dict[str, str]) -> int:
        code = "from alnus.cli import console, err_console; print(console.width, err_console.width)"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
        first, second = out.stdout.split()
        assert first == second
        return int(first)

    import os

    base = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    assert width(base) == 160
    assert width({**base, "COLUMNS": "100"}) == 100
    assert width({**base, "COLUMNS": "wide"}) == 160


def test_piped_help_shows_whole_option_names() -> None:
    """New-user review: `alnus data split --help | less` cut --internal-test-frac to fit 80 columns."""
    import os
    import subprocess
    import sys

    base = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "TERMINAL_WIDTH")}
    command = [sys.executable, "-m", "alnus", "data", "split", "--help"]
    wide = subprocess.run(command, capture_output=True, text=True, check=True, env=base).stdout
    assert "--internal-test-frac" in wide and "--no-drop-invalid" in wide and "…" not in wide
    narrow = subprocess.run(command, capture_output=True, text=True, check=True, env={**base, "COLUMNS": "80"}).stdout
    assert max(len(line) for line in narrow.splitlines()) <= 80  # a width the user set is kept


def _stop_config(tmp_path: Path) -> Path:
    """A 3-epoch study of a small phantom, for the tests that stop it: its config file."""
    import yaml

    from alnus.data.phantom import make_phantom

    manifest = make_phantom(tmp_path / "data", patients=24, external_patients=0, image_size=(48, 48), seed=1)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "name": "stop", "runs_dir": str(tmp_path / "runs"), "models": ["tiny_cnn"],
        "data": {"manifest": str(manifest), "labels": ["negative", "positive"]},
        "preprocess": {"size": 32, "roi": "box"},
        "train": {"weights": "none", "epochs": 3, "batch_size": 8, "precision": "fp32"},
    }))  # fmt: skip
    return config


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT"])
def test_a_stop_while_a_checkpoint_is_written_leaves_no_half_file_or_lock_and_says_how_to_go_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], signum: str
) -> None:
    """A new user's review: a SIGTERM (a scheduler's stop, `kill`) left a 0-byte checkpoints/.last.pt.*.tmp that the
    resumed run kept, and Ctrl-C ended without a word. The stop arrives here while the first checkpoint is written."""
    import signal

    import torch

    import alnus._checkpoint

    config = _stop_config(tmp_path)
    real_save = torch.save

    def stopped_while_saving(obj: object, path: object) -> None:
        real_save(obj, path)
        os.kill(os.getpid(), getattr(signal, signum))  # delivered at once, before the file is renamed into place

    monkeypatch.setattr(alnus._checkpoint.torch, "save", stopped_while_saving)
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    # Ctrl-C as a terminal delivers it to Python: KeyboardInterrupt (a test run earlier in this worker, or the worker
    # itself, may have left another handler in place; the suite once finished the study with status 0 that way).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        status, err = _run_main(monkeypatch, capsys, "study", str(config))
    finally:
        signal.signal(signal.SIGTERM, before[0])
        signal.signal(signal.SIGINT, before[1])
    said = " ".join(err.split())
    assert status == (143 if signum == "SIGTERM" else 130), said
    assert ("stopped (SIGTERM)" if signum == "SIGTERM" else "interrupted (Ctrl-C)") in said
    assert "run the same command again to go on" in said and "Traceback" not in said
    assert "kept in" not in said  # the first epoch's checkpoint was not in place yet: no epoch to name
    run = tmp_path / "runs" / "stop"
    assert not [p for p in run.rglob("*.tmp")]  # the half-written checkpoint is gone
    monkeypatch.setattr(alnus._checkpoint.torch, "save", real_save)
    status, err = _run_main(monkeypatch, capsys, "study", str(config))
    assert status == 0 and "taking over" not in err  # the lock was released, not left for the next run to break


@pytest.mark.parametrize(
    ("command", "run", "options"), [("study", "stop", []), ("train", "stop", []), ("cv", "stop_cv0", ["--folds", "2"])]
)
def test_a_stop_after_an_epoch_names_the_epoch_each_model_keeps(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    command: str,
    run: str,
    options: list[str],
) -> None:
    """A stopped training says where it will go on: the epoch its last.pt holds, and the file; the same command (with
    --resume for `alnus train` and `alnus cv`) then goes on."""
    import signal

    import alnus.train

    config = _stop_config(tmp_path)
    real_print_epoch = alnus.train._print_epoch

    def stopped_after_the_epoch(*args: object, **kwargs: object) -> None:
        real_print_epoch(*args, **kwargs)  # after its checkpoint is in place
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(alnus.train, "_print_epoch", stopped_after_the_epoch)
    before = signal.getsignal(signal.SIGTERM)
    try:
        status, err = _run_main(monkeypatch, capsys, command, str(config), *options)
    finally:
        signal.signal(signal.SIGTERM, before)
    said = " ".join(err.split())
    last = tmp_path / "runs" / run / "models" / "tiny_cnn" / "checkpoints" / "last.pt"
    assert status == 143 and "stopped (SIGTERM)" in said and "Traceback" not in said, said
    assert f"tiny_cnn: epoch 1 of 3 kept in {last}" in said
    monkeypatch.setattr(alnus.train, "_print_epoch", real_print_epoch)
    again = [*options, *(["--resume"] if command in ("train", "cv") else [])]
    status, err = _run_main(monkeypatch, capsys, command, str(config), *again)
    assert status == 0, err


@pytest.mark.parametrize("content", [b"", b"not a checkpoint\n", "cut", "raises"])
def test_a_stop_with_an_unreadable_checkpoint_says_how_to_go_on_and_nothing_more(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], content: bytes | str
) -> None:
    """The epoch line is a detail: a damaged last.pt, or configs that cannot be built, leave only the stop line."""
    import signal
    from types import SimpleNamespace

    import torch

    from alnus._checkpoint import save_checkpoint

    cfg = SimpleNamespace(run_dir=tmp_path / "run", models=["tiny_cnn"], train=SimpleNamespace(epochs=3))
    last = tmp_path / "run" / "models" / "tiny_cnn" / "checkpoints" / "last.pt"
    last.parent.mkdir(parents=True)
    save_checkpoint("last", {"model": {"w": torch.ones(2)}, "epoch": 0, "stopped_early": False}, last)

    def no_config() -> list:
        raise ValueError("cannot build the configs")

    trains = [lambda: [cfg]]

    def stopped() -> None:
        cli._trains(trains[0])
        raise SystemExit(cli.EXIT_TERMINATED)

    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)  # main() silences it after a stop
    monkeypatch.setattr(cli, "app", stopped)
    before = signal.getsignal(signal.SIGTERM)
    try:
        status, err = _run_main(monkeypatch, capsys)
        assert f"tiny_cnn: epoch 1 of 3 kept in {last}" in " ".join(err.split())  # the file as written is named
        if content == "raises":
            trains[0] = no_config
        elif content == "cut":
            last.write_bytes(last.read_bytes()[:100])
        else:
            last.write_bytes(content)
        status, err = _run_main(monkeypatch, capsys)
    finally:
        signal.signal(signal.SIGTERM, before)
    said = " ".join(err.split())
    assert status == 143 and "run the same command again to go on" in said
    assert "kept in" not in said and "Traceback" not in said and "cannot build" not in said


def test_after_a_stop_what_is_torn_down_on_the_way_out_prints_no_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An attack review: SIGTERM to a training's process group (Slurm, systemd) also stopped its data loader's workers,
    and the loader's teardown printed about 20 lines of 'Exception ignored in ... DataLoader worker is killed'."""
    import gc

    def stopped() -> None:
        raise SystemExit(cli.EXIT_TERMINATED)

    class Loader:
        def __del__(self) -> None:
            raise RuntimeError("DataLoader worker (pid 1) is killed by signal: Terminated.")

    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)  # restored after the test
    monkeypatch.setattr(cli, "app", stopped)
    import signal

    before = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit):
            cli.main()
    finally:
        signal.signal(signal.SIGTERM, before)
    loader = Loader()
    del loader
    gc.collect()
    err = capsys.readouterr().err
    assert "stopped (SIGTERM)" in err and "Exception ignored" not in err and "killed by signal" not in err


@pytest.mark.parametrize("command", ["study", "train", "cv"])
def test_a_mistake_in_the_config_is_said_before_torch_is_imported(command: str, tmp_path: Path) -> None:
    """A new user's review: a typo in a config took 7-10 s to be reported, the time of importing torch and timm
    before the config was read. Now it is read first (a backbone name still needs the registry)."""
    import subprocess

    config = tmp_path / "study.yaml"
    config.write_text("data:\n  manifest: manifest.csv\n  val_frac: 2\n", encoding="utf-8")
    code = ("import sys\nfrom alnus.cli import main\nsys.argv = ['alnus', sys.argv[1], sys.argv[2]]\ntry:\n    main()\n"
            "except SystemExit as exc:\n    print('exit', exc.code, 'torch' in sys.modules, flush=True)\n")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code, command, str(config)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "COLUMNS": "200"})  # fmt: skip
    assert "data.val_frac: 2.0 must be at least 0 and below 1" in done.stderr, done.stderr
    assert done.stdout.split() == ["exit", "2", "False"], done.stdout


def test_an_unknown_backbone_is_said_before_torch_is_imported(tmp_path: Path) -> None:
    """The last review: a mistyped backbone name took about 9 s to be refused, the time of importing timm."""
    import subprocess

    config = tmp_path / "study.yaml"
    config.write_text("data:\n  manifest: manifest.csv\nmodels: [efficientnet_lite0, resnet_101]\n", encoding="utf-8")
    code = ("import sys\nfrom alnus.cli import main\nsys.argv = ['alnus', 'study', sys.argv[1]]\ntry:\n    main()\n"
            "except SystemExit as exc:\n    print('exit', exc.code, 'torch' in sys.modules, flush=True)\n")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code, str(config)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "300"})  # fmt: skip
    assert "unknown backbone 'resnet_101'; choose one of:" in done.stderr and "resnet101" in done.stderr, done.stderr
    assert done.stdout.split() == ["exit", "2", "False"], done.stdout


def test_a_run_folder_or_package_that_does_not_exist_is_said_before_torch_is_imported(tmp_path: Path) -> None:
    """A new user's review: a mistyped run folder or package took 12-15 s to be reported, the time of importing
    torch, timm and torchvision first."""
    import subprocess

    missing = tmp_path / "nothere"
    commands = [["evaluate", missing], ["report", missing], ["explain", missing], ["predict-run", missing],
                ["ensemble", missing, "--name", "e", "--member", "a"], ["predict", missing, "x.png"],
                ["score", missing, "--manifest", "x.csv"]]  # fmt: skip
    code = (
        "import sys\nfrom alnus.cli import main\nfor argv in sys.argv[1:]:\n"
        "    sys.argv = ['alnus', *argv.split('|')]\n"
        "    try:\n        main()\n    except SystemExit as exc:\n        print('exit', exc.code, flush=True)\n"
        "print('torch', 'torch' in sys.modules)\n"
    )
    argv = ["|".join(map(str, c)) for c in commands]
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "300"})  # fmt: skip
    assert done.stdout.split() == ["exit", "2"] * len(commands) + ["torch", "False"], (done.stdout, done.stderr)
    assert done.stderr.count(f"run folder {missing} not found") == 5
    assert done.stderr.count(f"model package {missing} not found") == 2
