"""bench/gpu_paper_cnns.py: the epochs fitted to the GPU budget, and the run folder packed without what cannot
travel back (cache, checkpoints, weights) and unpacked here without trusting the archive's paths."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest


@pytest.fixture
def gpu(bench, monkeypatch, tmp_path):
    gpu_paper_cnns = bench("gpu_paper_cnns")
    monkeypatch.setattr(gpu_paper_cnns, "REPO", tmp_path)
    return gpu_paper_cnns


def test_the_epochs_fit_the_budget_and_stay_in_bounds(gpu):
    # 1500 images at 1000, 500 and 1500 images/s: (3 + 2) + (6 + 2) + (2 + 2) = 17 s an epoch for the three.
    assert gpu.epochs_for(340, {"a": 1000, "b": 500, "c": 1500}, 1500) == 20
    assert gpu.epochs_for(10, {"a": 1.0}, 1500) == 8  # never fewer than the floor
    assert gpu.epochs_for(1e6, {"a": 1e6}, 10) == 80  # never more than the ceiling


def test_the_pack_leaves_out_the_cache_checkpoints_and_weights_and_collect_refuses_escapes(gpu, tmp_path):
    run = tmp_path / "device" / gpu.RUN_NAME
    for name in ("metrics.json", "models/resnet101/history.csv", "models/resnet101/model/metadata.json",
                 "models/resnet101/model/weights.safetensors", "models/resnet101/checkpoints/last.pt",
                 "cache/abc/0.npy", "report.html"):  # fmt: skip
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text("x")
    packed = tmp_path / "out" / gpu.RESULTS
    packed.parent.mkdir()
    gpu._pack(run, packed)
    with tarfile.open(packed) as tar:
        names = {Path(n).relative_to(gpu.RUN_NAME).as_posix() for n in tar.getnames() if n != gpu.RUN_NAME}
    assert {"metrics.json", "models/resnet101/history.csv", "models/resnet101/model/metadata.json",
            "report.html"} <= names  # fmt: skip
    assert not any(n.endswith((".safetensors", ".pt", ".npy")) for n in names)
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        info = tarfile.TarInfo("../outside.txt")
        tar.addfile(info)
    kept = tmp_path / "runs" / gpu.RUN_NAME
    kept.mkdir(parents=True)
    with pytest.raises(tarfile.OutsideDestinationError):
        gpu.collect(evil)
    assert not (tmp_path / "runs" / "outside.txt").exists() and kept.is_dir()  # the earlier collection stays
    assert gpu.collect(packed.parent) == kept and (kept / "metrics.json").is_file()  # the folder holding the pack
    (run / "metrics.json").unlink()
    gpu._pack(run, packed)
    with pytest.raises(SystemExit, match="no finished run"):
        gpu.collect(packed)
    assert kept.is_dir()
