"""The training engine on tiny phantom data: outputs, package, resume after kill -9, DDP with 2 processes, the
learning-rate schedule, model selection at the study's level and safe, verified checkpoints."""

from __future__ import annotations

import dataclasses
import os
import random
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

from alnus._hardware import choose_precision
from alnus.config import ConfigError, TrainConfig, load_config
from alnus.data.dataset import ImageCache, PreprocessSpec, UltrasoundDataset
from alnus.data.manifest import ManifestError
from alnus.data.phantom import make_phantom
from alnus.data.roi import RoiPolicy
from alnus.models import create_model
from alnus.models.package import load_package
from alnus.stats import auc
from alnus.study import StudyError, prepare_run, run_training
from alnus.train import (
    CheckpointError,
    DistInfo,
    Engine,
    TrainError,
    TrainState,
    WeightedDistributedSampler,
    build_optimizer,
    gather_predictions,
    group_lr,
    load_checkpoint,
    save_checkpoint,
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


def test_bf16_training_chooses_its_epoch_on_fp32_validation(phantom, tmp_path):
    """Review finding: epochs were chosen on bf16 validation probabilities, which differ from the package's fp32
    ones (and can rank cases differently); the recorded val AUC then was not the package's."""
    cfg = load_config(_config(tmp_path, phantom, "bf16", train={"precision": "bf16", "epochs": 2}))
    [result] = run_training(cfg, console=_quiet())
    model, meta = load_package(result.package_dir)
    y, probs = _val_probs(cfg.run_dir, model, 32)  # fp32, as alnus predict runs
    saved = pd.read_csv(result.model_dir / "val_predictions_best.csv")
    np.testing.assert_allclose(saved["prob"], probs, atol=1e-6)  # bf16 outputs differ by ~1e-3
    assert auc(y, probs) == pytest.approx(meta["val_auc"], abs=1e-9)


def test_the_precision_it_trained_in_is_recorded_and_kept_on_resume(phantom, tmp_path):
    """Attack review: `auto` resolves by hardware and backbone, and config.yaml only says "auto"; a run must say
    what it trained in, and a resume must not switch precision halfway."""
    cfg = load_config(_config(tmp_path, phantom, "prec", train={"epochs": 1}))
    [result] = run_training(cfg, console=_quiet())
    _, meta = load_package(result.package_dir)
    assert meta["precision"] == {"name": "fp32", "reason": "fp32: requested"}
    last = result.model_dir / "checkpoints" / "last.pt"
    payload = load_checkpoint(last)
    assert payload["precision"] == "fp32"
    payload = {k: v for k, v in payload.items() if k not in ("format", "version", "kind", "sha256")}
    save_checkpoint("last", {**payload, "precision": "bf16"}, last)
    with pytest.raises(TrainError, match="it trained in bf16, and this run would go on in fp32.*ALNUS_PRECISION=bf16"):
        run_training(cfg, resume=True, console=_quiet())


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
    # The shards interleave one shared draw of 3 x 34 = 102 (every rank draws it from the same seed and epoch),
    # so together they are exactly that draw, and each rank trains on a different third of it.
    generator = torch.Generator().manual_seed(3 + 2)
    shared = torch.multinomial(torch.as_tensor(weights), 102, replacement=True, generator=generator).tolist()
    assert [i for round_ in zip(*parts, strict=True) for i in round_] == shared
    assert 0.3 < (np.array(shared) < 10).mean() < 0.7


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
    # Eight epochs leave a wide window for the kill: on a loaded machine this loop may notice the second checkpoint
    # several epochs late (with five, a busy CI machine once let the run finish first).
    epochs = {"epochs": 8}
    config = _config(tmp_path, phantom, "killed", train=epochs)
    last = tmp_path / "runs" / "killed" / "models" / "tiny_cnn" / "checkpoints" / "last.pt"
    proc = subprocess.Popen(_alnus("train", str(config)), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if last.is_file() and load_checkpoint(last)["epoch"] >= 1:
                break
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)  # after the second epoch's checkpoint, before the last
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    interrupted_at = load_checkpoint(last)["epoch"]
    assert 1 <= interrupted_at < 7, f"the run was not interrupted mid-way (last epoch {interrupted_at})"
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
def test_ddp_two_processes_switch_from_head_to_full_training(phantom, tmp_path):
    """issue 7.18: the phase switch re-wraps the model in DDP; with 2 processes the body then trains on both."""
    torch.manual_seed(5)
    start = create_model("tiny_cnn")
    torch.save(start.state_dict(), tmp_path / "start.pt")
    train = {"weights": f"file:{tmp_path / 'start.pt'}", "epochs": 2, "head_epochs": 1}
    config = _config(tmp_path, phantom, "ddp-head", train=train)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "alnus"]
    done = subprocess.run([*cmd, "train", str(config)], env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 process(es)" in done.stdout
    model_dir = tmp_path / "runs" / "ddp-head" / "models" / "tiny_cnn"
    last = load_checkpoint(model_dir / "checkpoints" / "last.pt")
    assert [row["phase"] for row in last["history"]] == ["head", "full"]
    trained = create_model("tiny_cnn")
    trained.load_state_dict(last["model"])
    head = {id(p) for p in trained.head_parameters()}
    body_changed = [
        not torch.equal(before, after)
        for before, after in zip(start.parameters(), trained.parameters(), strict=True)
        if id(after) not in head
    ]
    assert all(body_changed), "the full phase did not train every body parameter"
    _, meta = load_package(model_dir / "model")
    y, probs = _val_probs(tmp_path / "runs" / "ddp-head", load_package(model_dir / "model")[0], 32)
    assert auc(y, probs) == pytest.approx(meta["val_auc"], abs=1e-6)


@pytest.mark.slow
def test_demo_config_reaches_auc_0_9(tmp_path):
    """The demo's model learns the phantom's signal (its speed is `make demo`'s business, measured there)."""
    manifest = make_phantom(tmp_path / "demo" / "data", seed=0)  # what `alnus demo` writes
    cfg = load_config(REPO / "configs" / "demo.yaml", [f"data.manifest={manifest}", f"runs_dir={tmp_path / 'runs'}"])
    [result] = run_training(cfg, console=_quiet())
    reached = [row for row in result.history if row["val_auc"] >= 0.9]
    assert reached, f"val AUC never reached 0.9: {[round(r['val_auc'], 3) for r in result.history]}"


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
    with pytest.raises(TrainError, match="diverged in epoch 1.*lower train.lr") as info:
        run_training(cfg, console=_quiet())
    assert "set train.precision to fp32" not in str(info.value)  # it trained in fp32 already


def _step_lrs(train: TrainConfig, steps_per_epoch: int, head_epochs: int) -> list[tuple[float, float]]:
    """(head, body) learning rate of every optimiser step of a whole training."""
    optimizer, scheduler = build_optimizer(
        create_model("tiny_cnn"), train, steps_per_epoch=steps_per_epoch, head_epochs=head_epochs
    )
    lrs = []
    for _ in range(steps_per_epoch * train.epochs):
        lrs.append((group_lr(optimizer, "head"), group_lr(optimizer, "body")))
        optimizer.step()  # no gradients: nothing changes but the schedule's step count
        scheduler.step()
    return lrs


def test_lr_warms_up_again_when_the_body_unfreezes_and_the_body_learns_at_its_factor():
    """issue 7.4: the body does not unfreeze at the peak learning rate, and it learns at body_lr_factor x lr."""
    train = TrainConfig(epochs=4, lr=1e-3, warmup_epochs=1, head_epochs=1, body_warmup_epochs=1, body_lr_factor=0.1)
    lrs = _step_lrs(train, steps_per_epoch=5, head_epochs=1)
    head = [h for h, _ in lrs]
    for h, b in lrs:
        assert b == pytest.approx(0.1 * h)
    assert head[4] == pytest.approx(1e-3)  # the first warm-up reached the peak by the end of the head epoch
    unfreeze = 5  # the first step of epoch 2, the first that trains the body
    assert head[unfreeze] < 0.25 * head[unfreeze - 1]  # starts low again ...
    ramp = head[unfreeze : unfreeze + 5]  # one epoch of 5 steps
    assert all(a < b for a, b in zip(ramp, ramp[1:], strict=False))
    assert head[unfreeze + 5] > 0.5e-3  # ... back up on the cosine after one epoch, which then decays
    assert head[-1] < head[unfreeze + 5]
    # The old schedule (no second warm-up, factor 1): the body unfroze at the peak, at the head's rate.
    old = _step_lrs(dataclasses.replace(train, body_warmup_epochs=0, body_lr_factor=1.0), 5, 1)
    assert old[unfreeze][1] == old[unfreeze][0] > 0.9e-3
    # Without head-only epochs there is nothing to unfreeze: one warm-up only.
    plain = _step_lrs(train, steps_per_epoch=5, head_epochs=0)
    assert [h for h, _ in plain] == pytest.approx([h for h, _ in old])


def test_package_and_model_folder_record_the_full_training_settings(phantom, tmp_path):
    """issue 7.5: the package holds the resolved settings; the model keeps its own config.yaml and env.json."""
    cfg = load_config(_config(tmp_path, phantom, "recorded", train={"epochs": 1}))
    [result] = run_training(cfg, console=_quiet())
    _, meta = load_package(result.package_dir)
    assert meta["training"]["train"] == dataclasses.asdict(cfg.train)
    assert meta["training"]["data"]["manifest"] == cfg.data.manifest
    assert meta["training"]["preprocess"] == dataclasses.asdict(cfg.preprocess)
    assert meta["tta"] == cfg.preprocess.tta == [] and meta["format_version"] == 2  # issue 10.3: no TTA asked for
    assert meta["training"]["evaluate"]["level"] == "patient" == meta["selection"]["level"]
    assert load_config(result.model_dir / "config.yaml") == cfg
    assert "torch" in yaml.safe_load((result.model_dir / "env.json").read_text())
    # The run's config.yaml follows the latest command; the model's copy stays what it was trained with.
    prepare_run(load_config(_config(tmp_path, phantom, "recorded", train={"epochs": 7})))
    assert load_config(result.model_dir / "config.yaml").train.epochs == 1


@pytest.fixture(scope="module")
def multi_image(tmp_path_factory) -> Path:
    """24 patients with two images each: patient-level and image-level val AUCs can disagree."""
    out = tmp_path_factory.mktemp("multi")
    return make_phantom(
        out,
        patients=24,
        external_patients=0,
        images_per_patient=(2, 2),
        image_size=(48, 56),
        dicom_fraction=0.0,
        readers=0,
        seed=3,
    )


def _designed_val_probs(table: pd.DataFrame, epoch: int) -> np.ndarray:
    """Epoch 1: a patient's images agree; positive patients alternate 0.8 / 0.6, negative ones 0.7 / 0.1 (image
    AUC = patient AUC, below 1). Epoch 2: a positive patient's images are 0.9 and 0.2, a negative's 0.5 and 0.5
    (image AUC 0.5, patient AUC 1)."""
    positive = (table["label"] == "positive").to_numpy()
    patients = table["patient_id"].astype(str).to_numpy()
    image = table.groupby("patient_id", sort=False).cumcount().to_numpy()
    # A patient's place among the patients of its class, in order of appearance.
    place = {p: k for cls in (True, False) for k, p in enumerate(dict.fromkeys(patients[positive == cls]))}
    probs = np.empty(len(table))
    for i, (patient, pos) in enumerate(zip(patients, positive, strict=True)):
        if epoch == 1:
            probs[i] = ((0.8, 0.6) if pos else (0.7, 0.1))[place[patient] % 2]
        else:
            probs[i] = (0.9, 0.2)[image[i]] if pos else 0.5
    return probs


@pytest.mark.parametrize(("level", "expected_best"), [("patient", 2), ("image", 1)])
def test_the_best_epoch_is_chosen_at_the_study_level(multi_image, tmp_path, monkeypatch, level, expected_best):
    """issue 7.6: with evaluate.level patient the best epoch is the one the patient-level val AUC prefers."""
    import alnus.train as train

    calls = []

    def designed(engine, loader, info):  # noqa: ANN001 - stands in for the model's val predictions
        table = loader.dataset.dataset.table
        calls.append(len(calls) + 1)
        probs = np.clip(_designed_val_probs(table, calls[-1]), 1e-6, 1 - 1e-6)
        return np.arange(len(table)), np.log(probs / (1 - probs)).astype(np.float32)

    monkeypatch.setattr(train, "predict_logits", designed)
    cfg = load_config(_config(tmp_path, multi_image, f"level-{level}", train={"epochs": 2}, evaluate={"level": level}))
    [result] = run_training(cfg, console=_quiet())
    saved = pd.read_csv(result.model_dir / "val_predictions_best.csv", dtype={"patient_id": str})
    val = saved.assign(y=saved["label"].eq("positive").astype(int))
    # The design holds on this split: image level prefers epoch 1, patient level epoch 2.
    by_epoch = {e: _designed_val_probs(val, e) for e in (1, 2)}
    image_auc = {e: auc(val["y"], p) for e, p in by_epoch.items()}
    patient_auc = {e: auc(*_per_patient(val, p)) for e, p in by_epoch.items()}
    assert image_auc[1] > image_auc[2] and patient_auc[2] > patient_auc[1]
    assert result.best_epoch == expected_best
    expected = patient_auc if level == "patient" else image_auc
    assert result.best_val_auc == pytest.approx(expected[expected_best])
    assert [row["val_auc"] for row in result.history] == pytest.approx([expected[1], expected[2]])


def _per_patient(table: pd.DataFrame, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    grouped = table.assign(prob=probs).groupby("patient_id")
    return grouped["y"].first().to_numpy(), grouped["prob"].mean().to_numpy()


@pytest.fixture
def one_epoch(phantom, tmp_path):
    """A finished one-epoch run: a real last.pt to tamper with, and a config to resume it."""
    cfg = load_config(_config(tmp_path, phantom, "tampered", train={"epochs": 1}))
    run_training(cfg, console=_quiet())
    last = cfg.run_dir / "models" / "tiny_cnn" / "checkpoints" / "last.pt"
    return cfg, last


class _RunsCode:
    """A pickle that, when loaded by an unrestricted unpickler, creates `marker` (any code could run instead)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (open, (str(self.marker), "w"))


def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(one_epoch, tmp_path):
    """issue 7.8: last.pt is loaded with weights_only; a crafted pickle is refused with a clear error, unrun."""
    cfg, last = one_epoch
    marker = tmp_path / "payload-ran"
    torch.save({"version": 1, "model": _RunsCode(marker)}, last)
    with pytest.raises(CheckpointError, match=r"last\.pt holds objects other than tensors.*could run code.*delete"):
        run_training(cfg, resume=True, console=_quiet())
    assert not marker.exists()
    # The same inside a well-formed checkpoint whose checksum matches: the contents are loaded safely too.
    save_checkpoint("last", {"model": _RunsCode(marker)}, last)
    with pytest.raises(CheckpointError, match="could run code"):
        load_checkpoint(last)
    assert not marker.exists()


def test_peek_last_reads_the_epoch_without_the_weights_and_never_raises(tmp_path):
    """The stop message's reader: the epochs a last.pt finished, or None for what is not a readable last.pt."""
    from alnus._checkpoint import peek_last

    last = tmp_path / "last.pt"
    save_checkpoint("last", {"model": {"w": torch.ones(3)}, "epoch": 2, "stopped_early": False}, last)
    assert peek_last(last) == (3, False)
    whole = last.read_bytes()
    best = tmp_path / "best.pt"
    save_checkpoint("best", {"model": {"w": torch.ones(3)}, "epoch": 2, "val_auc": 0.5}, best)
    marker = tmp_path / "payload-ran"
    torch.save({"format": "alnus-checkpoint", "kind": "last", "epoch": 1, "model": _RunsCode(marker)}, tmp_path / "x")
    os.mkfifo(tmp_path / "fifo")  # loading would wait on it for ever
    for path, content in [("empty", b""), ("text", b"not a checkpoint\n"), ("cut", whole[: len(whole) // 2])]:
        (tmp_path / path).write_bytes(content)
    for path in ("missing", "empty", "text", "cut", "best.pt", "x", "fifo", "."):
        assert peek_last(tmp_path / path) is None, path
    assert not marker.exists()


def test_a_flipped_byte_in_a_checkpoint_is_an_error_not_a_resume(one_epoch):
    """issue 7.10: a damaged last.pt is refused (checksum), with what to do."""
    cfg, last = one_epoch
    data = bytearray(last.read_bytes())
    data[len(data) // 2] ^= 0x01
    last.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"last\.pt.*damaged.*delete .*tiny_cnn \(this model.s folder\)"):
        run_training(cfg, resume=True, console=_quiet())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda p: p.pop("settings"), r"lacks its 'settings' value.*delete .*this model.s folder"),
        (lambda p: p.update(settings="abc"), r"'settings' is str 'abc', not dict.*delete .*this model.s folder"),
        (lambda p: p.update(epoch="3"), r"'epoch' is str '3', not int"),
        (
            lambda p: next(iter(p["model"].values())).fill_(float("nan")),
            r"weight .* non-finite values.*delete .*this model.s folder",
        ),
    ],
    ids=["no-settings", "settings-not-a-mapping", "epoch-not-a-number", "nan-weight"],
)
def test_a_checkpoint_missing_or_with_a_corrupted_value_names_the_file(one_epoch, change, message):
    """issue 7.13: a checkpoint without `settings` or with a corrupted value is a clear error naming the file, not
    a KeyError nor a 'training diverged, lower train.lr' after resuming."""
    cfg, last = one_epoch
    payload = load_checkpoint(last)
    kind = payload.pop("kind")
    change(payload)
    save_checkpoint(kind, payload, last)
    with pytest.raises(CheckpointError, match=message) as raised:
        run_training(cfg, resume=True, console=_quiet())
    assert str(last) in str(raised.value) and "diverged" not in str(raised.value)


def _engine(seed: int) -> Engine:
    torch.manual_seed(seed)
    model = create_model("tiny_cnn")
    train = TrainConfig(epochs=3, lr=1e-3)
    optimizer, scheduler = build_optimizer(model, train, steps_per_epoch=2, head_epochs=0)
    return Engine(
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=torch.amp.GradScaler("cpu", enabled=False),
        criterion=torch.nn.BCEWithLogitsLoss(),
        device=torch.device("cpu"),
        precision=choose_precision(torch.device("cpu"), "fp32"),
        channels_last=False,
        head_epochs=0,
        grad_accum=1,
    )


def test_train_state_saves_and_restores_itself(tmp_path):
    """issue 7.17: a TrainState saves itself with the engine and RNG states, and restores all of them."""
    engine = _engine(seed=1)
    loss = engine.model(torch.rand(4, 1, 32, 32)).sum()
    loss.backward()
    engine.optimizer.step()  # optimiser state (AdamW moments) to save
    engine.scheduler.step()
    state = TrainState()
    row = {"epoch": 1, "phase": "full", "train_loss": 0.7, "val_loss": 0.6, "val_auc": 0.8, "lr": 1e-3}
    assert state.record(row, patience=2, epochs=3)
    assert not state.record({**row, "epoch": 2, "val_auc": 0.7}, patience=2, epochs=3) and not state.stopped
    save_checkpoint("last", state.checkpoint(engine, {"backbone": "tiny_cnn"}), tmp_path / "last.pt")
    expected_draws = (torch.rand(3), np.random.random(3), random.random())

    other = _engine(seed=2)
    restored = TrainState.restore(load_checkpoint(tmp_path / "last.pt"), other, tmp_path / "last.pt")
    assert restored == state
    assert (restored.epochs_done, restored.best_epoch, restored.bad_epochs) == (2, 1, 1)
    for a, b in zip(engine.model.state_dict().values(), other.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert other.scheduler.last_epoch == engine.scheduler.last_epoch == 1
    assert torch.equal(
        other.optimizer.state_dict()["state"][0]["exp_avg"], engine.optimizer.state_dict()["state"][0]["exp_avg"]
    )
    # The RNGs continue where they were when the state was saved.
    assert torch.equal(torch.rand(3), expected_draws[0])
    assert np.array_equal(np.random.random(3), expected_draws[1]) and random.random() == expected_draws[2]


def test_selection_at_a_level_the_val_split_cannot_support_is_a_clear_error(phantom, tmp_path):
    """issue 7.6: study-level selection needs a study_id on every val image; the error says what to do."""
    df = pd.read_csv(phantom, dtype=str, keep_default_na=False).assign(study_id="")
    manifest = phantom.parent / "no_studies.csv"
    df.to_csv(manifest, index=False)
    cfg = load_config(_config(tmp_path, manifest, "studies", train={"epochs": 1}, evaluate={"level": "study"}))
    with pytest.raises(TrainError, match=r"splits\.csv: the val split cannot be scored per study.*no study_id"):
        run_training(cfg, console=_quiet())


@pytest.mark.parametrize(
    ("setting", "message"),
    [("body_lr_factor=0", "train.body_lr_factor: 0.0 must be positive"), ("body_warmup_epochs=-1", "at least 0")],
)
def test_body_schedule_settings_are_checked(phantom, tmp_path, setting, message):
    """issue 7.4: the new schedule settings are range-checked when the config is read."""
    with pytest.raises(ConfigError, match=message):
        load_config(_config(tmp_path, phantom, "checked"), [f"train.{setting}"])


def test_a_package_rewrite_cut_short_leaves_no_metadata_beside_the_new_hashes(phantom, tmp_path, monkeypatch):
    """An attack review: a training killed between writing its package's development images and its metadata.json
    left the earlier training's metadata beside the new hashes; predict then called the file another training's,
    whose advice (delete it) would switch the check off. The earlier metadata is removed first: the folder is then
    no package ("train again")."""
    import alnus.data.seen as seen
    from alnus.models.package import PackageError

    cfg = load_config(_config(tmp_path, phantom, "cut", train={"epochs": 1}))
    [result] = run_training(cfg, console=_quiet())
    assert (result.package_dir / "metadata.json").is_file() and (result.package_dir / seen.FILE).is_file()
    written = seen.write_development_images

    def killed(package, record):  # noqa: ANN001, ANN202
        written(package, record)
        raise KeyboardInterrupt

    monkeypatch.setattr(seen, "write_development_images", killed)
    with pytest.raises(KeyboardInterrupt):  # a finished run resumed writes its package again
        run_training(cfg, resume=True, console=_quiet())
    assert (result.package_dir / seen.FILE).is_file() and not (result.package_dir / "metadata.json").exists()
    with pytest.raises(PackageError, match="metadata.json"):
        load_package(result.package_dir)
