"""bench/final_timing.py: the from-scratch timing of the final configuration refuses to reuse a folder, measures the
CPU other processes used, and writes what it measured."""

from __future__ import annotations

import sys

import pytest


@pytest.fixture
def final_timing(bench):
    yield bench("final_timing")
    for name in ("public_final", "public_configs"):  # imported by final_timing itself
        sys.modules.pop(name, None)


def test_a_timing_never_reuses_a_folder(final_timing, tmp_path, capsys):
    data = tmp_path / "data"
    (data / "BUS-BRA").mkdir(parents=True)
    runs = tmp_path / "runs"
    runs.mkdir()
    assert final_timing.main(["--data", str(data), "--runs-dir", str(runs)]) == 2
    assert "starts from scratch" in capsys.readouterr().err
    assert final_timing.main(["--data", str(tmp_path / "nowhere"), "--runs-dir", str(tmp_path / "new")]) == 2
    assert "real data not found" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_cpu_counters_move_with_work(final_timing):
    busy, own = final_timing.machine_busy_seconds(), final_timing.own_cpu_seconds()
    total = 0
    for i in range(3_000_000):
        total += i * i
    assert total > 0
    assert final_timing.own_cpu_seconds() > own
    assert final_timing.machine_busy_seconds() > busy  # this process's work is part of the machine's


def test_the_section_states_the_bound_and_the_other_processes(final_timing):
    seeds = [
        {"configuration": name, "precision": "fp32 + channels_last", "minutes": minutes,
         "auc": {"val": 0.95, "internal_test": 0.96, "external_test": external}}
        for name, minutes, external in (
            ("aux_birads", 50.2, 0.85), ("aux_seed1", 49.0, 0.83), ("aux_seed2", 51.0, 0.86)
        )
    ]  # fmt: skip
    record = {"command": "python bench/final_timing.py", "date": "2026-12-03", "cpu": "Xeon", "cores": 2,
              "wall_minutes": 190.0, "own_cpu_minutes": 300.0, "other_processes_cpu_minutes": 41.0,
              "limit_minutes": 180, "seeds": seeds}  # fmt: skip
    text = final_timing.section(record)
    assert "Wall time 190 min for 3 seeds, over the 180 min bound" in text
    assert "other processes on the machine used 41 CPU-minutes" in text
    assert "mean 0.847, range 0.830-0.860" in text
    assert "| aux_seed1 | fp32 + channels_last | 49 |" in text
