"""benchmarks/meta_rl.py in its smoke settings: a diverging method keeps its last finite checkpoint, is
reported as diverged at its step, and the benchmark goes on to write its table, JSON and plot."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_meta_rl", ROOT / "benchmarks" / "meta_rl.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_diverging_method_is_reported_and_the_benchmark_goes_on(tmp_path):
    bench = _bench()
    smoke = [*bench.SMOKE, "run.checkpoint_every=1"]  # the benchmark's --smoke tasks, a checkpoint every step
    entries = []
    diverge = ["algorithm.max_kl=0", "algorithm.outer_opt=sgd", "algorithm.schedule=constant",
               "algorithm.outer_lr=1e30", "run.steps=6"]
    args = bench.parse(["--out", str(tmp_path / "runs"), "--tasks", "3", "--episodes", "2", "--adapt-steps", "2",
                        "--set", *smoke, *diverge])
    entry = bench.train("nav", "soba", args)
    assert isinstance(entry["diverged_at"], int) and 1 <= entry["diverged_at"] <= 6
    assert all(bool(torch.isfinite(v).all()) for v in entry["policy"].params.values())  # the last finite state
    entries.append(bench.evaluate(entry, args))
    args.set = [*smoke, "run.steps=2"]
    entries.append(bench.evaluate(bench.train("nav", "dsbo_sim", args), args))
    assert entries[1]["diverged_at"] is None and entries[1]["steps"] == 2
    path = bench.write_results(entries, "benchmarks/meta_rl.py (test)", tmp_path / "results")
    data = json.loads(path.read_text())
    for method in ("soba", "dsbo_sim"):
        row = data["nav"][method]
        for key in ("before", "after1", "after2", "before_ci95", "after2_ci95", "minutes", "env_steps", "command"):
            assert key in row, key
        assert math.isfinite(row["after1"]) and row["env_steps"] > 0
    assert data["nav"]["soba"]["diverged_at"] == entry["diverged_at"]
    table = (tmp_path / "results" / "meta_rl.md").read_text()
    assert f"diverged at step {entry['diverged_at']}" in table and "| nav | dsbo_sim |" in table
    assert (tmp_path / "results" / "meta_rl.png").stat().st_size > 10_000
