"""bench/thread_contention.py: batch-1 timings at 1 thread and at one per core, idle and beside other jobs, written
as a section of the performance page; the other jobs are stopped afterwards."""

from __future__ import annotations

import subprocess
import sys

import torch

from alnus.data.dataset import PreprocessSpec
from alnus.data.roi import RoiPolicy
from alnus.models import create_model
from alnus.models.package import save_package


def test_the_section_has_a_row_per_job_and_thread_count_and_stops_the_jobs(bench, tmp_path, monkeypatch):
    thread_contention = bench("thread_contention")
    package = tmp_path / "model"
    torch.manual_seed(0)
    meta = {"preprocess": PreprocessSpec(size=32, roi=RoiPolicy("whole")).to_dict(), "label_names": ["a", "b"],
            "positive_label": "b"}  # fmt: skip
    save_package(package, create_model("tiny_cnn"), meta)
    started: list[subprocess.Popen] = []
    real_popen = subprocess.Popen

    def popen(*args, **kwargs):  # noqa: ANN002, ANN003
        started.append(real_popen(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(thread_contention.subprocess, "Popen", popen)
    monkeypatch.setattr(thread_contention, "OTHER_JOBS", {"none": (), "a loop": ("while True: pass",)})
    monkeypatch.setattr(thread_contention.time, "sleep", lambda _s: None)
    out = tmp_path / "performance.md"
    assert thread_contention.main(["--package", str(package), "--repeats", "1", "--out", str(out)]) == 0
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith(("| none |", "| a loop |"))]
    cores = len({1, torch.get_num_threads()})
    assert len(rows) == 2 * cores and "<!-- thread-contention:start -->" in text
    assert all(float(cell) > 0 for row in rows for cell in row.strip("|").split("|")[2:])
    jobs = [job for job in started if job.args[:2] == [sys.executable, "-c"]]
    assert len(jobs) == 1 and jobs[0].poll() is not None  # the other job was stopped
