"""The training engine on tiny phantom data: outputs, package, resume after kill -9, DDP with 2 processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from rich.console import Console

from alnus.config import load_config
from alnus.data.dataset import ImageCache, PreprocessSpec, UltrasoundDataset
from alnus.data.manifest import ManifestError
from alnus.data.phantom import make_phantom
from alnus.data.roi import RoiPolicy
from alnus.models import create_model
from alnus.models.package import load_package
from alnus.stats import auc
from alnus.study import StudyError, prepare_run
from alnus.train import (
    DistInfo,
    TrainError,
    WeightedDistributedSampler,
    gather_predictions,
    load_checkpoint,
    run_training,
)

REPO = Path(__file__).resolve().parents[1]
# Small and fast: 32 px inputs, fp32 (exactly repeatable on the CPU), few epochs.
TINY = {
    "models": ["tiny_cnn"],
    "preprocess": {"size": 32, "roi": "box", "margin": 0.3},
    "train": {
        "weights": "none",
        "epochs": 3,
        "batch_size": 8,
        "lr": 3.0e-3,
        "warmup_epochs": 1,
        "head_epochs": 0,
        "precision": "fp32",
        "early_stopping_patience": None,
    },
}


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    """34 development patients with one 64x80 PNG each (one image each keeps the val count predictable)."""
    out = tmp_path_factory.mktemp("phantom")
    return make_phantom(
        out,
        patients=34,
        external_patients=0,
        overlap=0.1,
        images_per_patient=(1, 1),
        image_size=(64, 80),
        dicom_fraction=0.0,
        readers=0,
        seed=1,
    )


def _config(folder: Path, manifest: Path, name: str, **sections) -> Path:
    raw = {
        "name": name,
        "runs_dir": str(folder / "runs"),
        "data": {"manifest": str(manifest), "labels": ["negative", "positive"], "val_frac": 0.35},
        **{k: dict(v) if isinstance(v, dict) else v for k, v in TINY.items()},
    }
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _quiet() -> Console:
    return Console(file=open(os.devnull, "w"), force_terminal=False)  # noqa: SIM115 - lives for the test


@pytest.fixture(scope="module")
def trained(phantom, tmp_path_factory):
    """One short run shared by the output tests."""
    folder = tmp_path_factory.mktemp("short")
    cfg = load_config(_config(folder, phantom, "short"))
    [result] = run_training(cfg, console=_quiet())
    return cfg, result


def _val_probs(run_dir: Path, model: torch.nn.Module, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Single-process predictions for the val split, in splits.csv order."""
    splits = pd.read_csv(run_dir / "splits.csv", dtype=str, keep_default_na=False)
    val = splits[splits["split"] == "val"]
    spec = PreprocessSpec(size=size, roi=RoiPolicy("box", 0.3))
    ds = UltrasoundDataset(val, run_dir, spec, cache=ImageCache(run_dir / "cache"), positive_label="positive")
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    model.eval()
    with torch.no_grad():
        probs = torch.sigmoid(model(x)).numpy().astype(np.float64)
    return ds.targets, probs


def test_prepare_run_is_idempotent_and_guards_its_split(phantom, tmp_path):
    cfg = load_config(_config(tmp_path, phantom, "prep"))
    run_dir = prepare_run(cfg)
    for name in ("config.yaml", "env.json", "manifest.csv", "exclusions.csv", "splits.csv", "split_report.csv"):
        assert (run_dir / name).is_file(), name
    splits = pd.read_csv(run_dir / "splits.csv", dtype=str, keep_default_na=False)
    assert len(splits) == 34 and set(splits["split"]) == {"train", "val", "internal_test"}
    assert all(os.path.isabs(p) and os.path.isfile(p) for p in splits["image"])
    assert load_config(run_dir / "config.yaml") == cfg
    before = (run_dir / "splits.csv").stat().st_mtime_ns
    prepare_run(load_config(_config(tmp_path, phantom, "prep", train={"epochs": 5})))
    assert (run_dir / "splits.csv").stat().st_mtime_ns == before  # reused: only the data section matters
    with pytest.raises(StudyError, match="holds a split made from other data"):
        prepare_run(load_config(_config(tmp_path, phantom, "prep", data={"seed": 7})))


def test_prepare_run_invalid_rows(phantom, tmp_path):
    df = pd.read_csv(phantom, dtype=str, keep_default_na=False)
    df.loc[3, "image"] = "images/missing.png"
    bad = phantom.parent / "bad_manifest.csv"
    df.to_csv(bad, index=False)
    with pytest.raises(ManifestError, match="row 5, column 'image': image file not found"):
        prepare_run(load_config(_config(tmp_path, bad, "strict")))
    run_dir = prepare_run(load_config(_config(tmp_path, bad, "lenient", data={"drop_invalid": True})))
    exclusions = pd.read_csv(run_dir / "exclusions.csv")
    assert exclusions["row"].tolist() == [5]
    assert len(pd.read_csv(run_dir / "splits.csv")) == 33


def test_training_writes_checkpoints_logs_and_a_package(trained):
    cfg, result = trained
    model_dir = cfg.run_dir / "models" / "tiny_cnn"
    assert result.model_dir == model_dir and result.epochs_run == 3
    assert (model_dir / "checkpoints" / "last.pt").is_file() and (model_dir / "checkpoints" / "best.pt").is_file()
    assert list((model_dir / "tb").glob("events.out.tfevents.*"))
    history = pd.read_csv(model_dir / "history.csv")
    assert history["epoch"].tolist() == [1, 2, 3]
    assert history["val_auc"].max() == pytest.approx(result.best_val_auc)
    assert (history["lr"] > 0).all() and history["lr"].iloc[0] > history["lr"].iloc[-1]  # cosine decay

    model, meta = load_package(result.package_dir)
    assert meta["best_epoch"] == result.best_epoch and meta["val_auc"] == pytest.approx(result.best_val_auc)
    assert meta["input_size"] == 32 and meta["preprocess"]["roi"] == {"mode": "box", "margin": 0.3}
    assert meta["label_names"] == ["negative", "positive"] and len(meta["training_data_hash"]) == 64
    best = create_model("tiny_cnn")
    best.load_state_dict(load_checkpoint(model_dir / "checkpoints" / "best.pt")["model"])
    y, probs = _val_probs(cfg.run_dir, model, 32)
    _, best_probs = _val_probs(cfg.run_dir, best, 32)
    np.testing.assert_array_equal(probs, best_probs)
    # The engine's gathered val predictions are the package's predictions, on exactly the val images.
    saved = pd.read_csv(model_dir / "val_predictions_best.csv")
    assert saved["index"].tolist() == list(range(len(y)))
    np.testing.assert_allclose(saved["prob"], probs, atol=1e-6)
    assert auc(y, probs) == pytest.approx(result.best_val_auc, abs=1e-9)


def test_rerun_and_resume_are_checked(trained):
    cfg, result = trained
    saved = (cfg.run_dir / "config.yaml").read_text()
    with pytest.raises(TrainError, match="pass --resume"):
        run_training(cfg, console=_quiet())
    changed = load_config(cfg.run_dir / "config.yaml", ["train.lr=0.1"])
    with pytest.raises(TrainError, match=r"train\.lr: 0\.003 -> 0\.1"):
        run_training(changed, resume=True, console=_quiet())
    assert (cfg.run_dir / "config.yaml").read_text() == saved  # a refused run leaves the folder alone
    # A finished run resumes to the same result without training again.
    [again] = run_training(cfg, resume=True, console=_quiet())
    assert again.best_epoch == result.best_epoch and again.epochs_run == 3


def test_pretrained_weights_train_the_head_first(phantom, tmp_path):
    torch.manual_seed(5)
    start = create_model("tiny_cnn")
    torch.save(start.state_dict(), tmp_path / "start.pt")
    train = {"weights": f"file:{tmp_path / 'start.pt'}", "epochs": 1, "head_epochs": 1, "balance": "sampler"}
    [result] = run_training(load_config(_config(tmp_path, phantom, "head", train=train)), console=_quiet())
    assert [row["phase"] for row in result.history] == ["head"]
    trained = create_model("tiny_cnn")
    trained.load_state_dict(load_checkpoint(result.model_dir / "checkpoints" / "last.pt")["model"])
    head = {id(p) for p in trained.head_parameters()}
    for (name, before), after in zip(start.named_parameters(), trained.parameters(), strict=True):
        if id(after) in head:
            assert not torch.equal(before, after), f"head parameter {name} did not train"
        else:
            assert torch.equal(before, after), f"body parameter {name} changed while frozen"
    # Batch-norm running statistics are buffers, not parameters: frozen too.
    for (name, before), after in zip(start.named_buffers(), trained.buffers(), strict=True):
        assert torch.equal(before, after), f"body buffer {name} changed while frozen"


def test_weighted_sampler_balances_and_shards():
    weights = np.where(np.arange(100) < 10, 1 / 10, 1 / 90)  # 10 positives, 90 negatives
    whole = WeightedDistributedSampler(weights, seed=3)
    whole.set_epoch(2)
    drawn = np.array(list(whole))
    assert len(drawn) == 100 and 0.3 < (drawn < 10).mean() < 0.7
    assert list(whole) == list(drawn)  # same epoch, same draw
    whole.set_epoch(3)
    assert list(whole) != list(drawn)
    shards = [WeightedDistributedSampler(weights, num_replicas=3, rank=r, seed=3) for r in range(3)]
    for shard in shards:
        shard.set_epoch(2)
    parts = [list(s) for s in shards]
    assert [len(p) for p in parts] == [34, 34, 34]
    assert sorted(sum(parts, [])) != sorted(drawn)  # 102 draws, not a copy of the single-process 100


def test_gather_drops_padding_duplicates():
    # What DistributedSampler gives 2 ranks for 5 items: rank 0 [0, 2, 4], rank 1 [1, 3, 0] (0 repeated).
    idx = torch.tensor([0, 2, 4, 1, 3, 0])
    logits = torch.tensor([0.0, 2.0, 4.0, 1.0, 3.0, 0.0])
    order, values = gather_predictions(idx, logits, 5, DistInfo())
    assert order.tolist() == [0, 1, 2, 3, 4] and values.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    with pytest.raises(RuntimeError, match="cover 4 distinct items of 5"):
        gather_predictions(idx[:4], logits[:4], 5, DistInfo())


def _alnus(*args: str) -> list[str]:
    return [sys.executable, "-m", "alnus", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO / "src"), "COLUMNS": "200"}


@pytest.mark.slow
def test_resume_after_kill_equals_an_uninterrupted_run(phantom, tmp_path):
    epochs = {"epochs": 5}
    config = _config(tmp_path, phantom, "killed", train=epochs)
    last = tmp_path / "runs" / "killed" / "models" / "tiny_cnn" / "checkpoints" / "last.pt"
    proc = subprocess.Popen(_alnus("train", str(config)), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if last.is_file() and load_checkpoint(last)["epoch"] >= 1:
                break
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)  # during the third epoch: checkpoints of two are on disk
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    interrupted_at = load_checkpoint(last)["epoch"]
    assert 1 <= interrupted_at < 4, f"the run was not interrupted mid-way (last epoch {interrupted_at})"
    done = subprocess.run(_alnus("train", str(config), "--resume"), env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"resuming after epoch {interrupted_at + 1}" in done.stdout

    reference = load_config(_config(tmp_path, phantom, "reference", train=epochs))
    [ref] = run_training(reference, console=_quiet())
    resumed, straight = load_checkpoint(last), load_checkpoint(ref.model_dir / "checkpoints" / "last.pt")
    # fp32 on the CPU with the same data order, augmentations and RNG states: equal to float tolerance.
    diff = max((resumed["model"][k].double() - t.double()).abs().max().item() for k, t in straight["model"].items())
    print(f"resume: interrupted after epoch {interrupted_at + 1}; largest weight difference {diff:.3g}")
    assert diff <= 1e-6
    aucs = [row["val_auc"] for row in resumed["history"]]
    np.testing.assert_allclose(aucs, [row["val_auc"] for row in ref.history], atol=1e-6)
    assert resumed["best_epoch"] == ref.best_epoch


@pytest.mark.slow
def test_ddp_two_processes_gathers_exactly_the_val_set(phantom, tmp_path):
    config = _config(tmp_path, phantom, "ddp", train={"epochs": 2})
    run_dir = tmp_path / "runs" / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "alnus"]
    done = subprocess.run([*cmd, "train", str(config)], env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 process(es)" in done.stdout
    splits = pd.read_csv(run_dir / "splits.csv", dtype=str, keep_default_na=False)
    n_val = int((splits["split"] == "val").sum())
    assert n_val % 2 == 1, f"the test needs an odd val set to exercise the padding, got {n_val}"
    saved = pd.read_csv(run_dir / "models" / "tiny_cnn" / "val_predictions_best.csv")
    assert len(saved) == n_val and saved["index"].tolist() == list(range(n_val))

    model, meta = load_package(run_dir / "models" / "tiny_cnn" / "model")
    y, probs = _val_probs(run_dir, model, 32)
    np.testing.assert_array_equal(saved["y"], y)
    np.testing.assert_allclose(saved["prob"], probs, atol=1e-5)
    assert auc(y, probs) == pytest.approx(meta["val_auc"], abs=1e-6)


@pytest.mark.slow
def test_demo_config_reaches_auc_0_9_within_two_minutes(tmp_path):
    manifest = make_phantom(tmp_path / "demo" / "data", seed=0)  # what `alnus demo` writes
    cfg = load_config(REPO / "configs" / "demo.yaml", [f"data.manifest={manifest}", f"runs_dir={tmp_path / 'runs'}"])
    start = time.perf_counter()
    [result] = run_training(cfg, console=_quiet())
    seconds = time.perf_counter() - start
    reached = [row for row in result.history if row["val_auc"] >= 0.9]
    assert reached, f"val AUC never reached 0.9: {[round(r['val_auc'], 3) for r in result.history]}"
    to_reach = sum(row["seconds"] for row in result.history if row["epoch"] <= reached[0]["epoch"])
    print(
        f"demo: val AUC {reached[0]['val_auc']:.4f} >= 0.9 at epoch {reached[0]['epoch']} after {to_reach:.0f} s "
        f"of training; best {result.best_val_auc:.4f} (epoch {result.best_epoch}); {seconds:.0f} s in all"
    )
    assert to_reach < 120, f"val AUC 0.9 took {to_reach:.0f} s of training"


class _FakeMlflow:
    """Records the calls the engine makes, standing in for an installed `mlflow` (not a dependency)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def start_run(self, run_name: str) -> None:
        self.calls.append(("start_run", run_name))

    def log_params(self, params: dict) -> None:
        self.calls.append(("log_params", params))

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.calls.append(("log_metrics", (step, metrics)))

    def end_run(self) -> None:
        self.calls.append(("end_run", None))


def test_mlflow_gets_params_and_one_metrics_row_per_epoch(phantom, tmp_path, monkeypatch):
    fake = _FakeMlflow()
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    cfg = load_config(_config(tmp_path, phantom, "tracked", train={"epochs": 2, "mlflow": True}))
    run_training(cfg, console=_quiet())
    names = [name for name, _ in fake.calls]
    assert names[0] == "start_run" and names[-1] == "end_run"
    assert dict(fake.calls)["start_run"] == "tracked/tiny_cnn"
    params = dict(fake.calls)["log_params"]
    assert params["train.epochs"] == "2" and params["train.lr"] == str(cfg.train.lr)
    steps = [value[0] for name, value in fake.calls if name == "log_metrics"]
    assert steps == [1, 2]
    metrics = [value[1] for name, value in fake.calls if name == "log_metrics"]
    assert set(metrics[0]) == {"train_loss", "val_loss", "val_auc", "lr", "images_per_s"}


def test_mlflow_true_without_mlflow_installed_says_what_to_install(phantom, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` raises ImportError
    cfg = load_config(_config(tmp_path, phantom, "untracked", train={"epochs": 1, "mlflow": True}))
    with pytest.raises(TrainError, match="pip install mlflow"):
        run_training(cfg, console=_quiet())


def test_a_diverged_run_stops_with_what_to_change(phantom, tmp_path):
    cfg = load_config(_config(tmp_path, phantom, "diverged", train={"epochs": 1, "lr": 1.0e30}))
    with pytest.raises(TrainError, match="diverged in epoch 1.*lower train.lr"):
        run_training(cfg, console=_quiet())
