"""benchmarks/meta_rl.py in its smoke settings: a diverging method keeps its last finite checkpoint, is
reported as diverged at its step, and the benchmark goes on to write its table, JSON and plot; gains are
paired over the evaluation's tasks, and ``--eval-only`` evaluates a saved learner again into the same
record."""

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
    # the gains are paired differences over the same tasks: their means are differences of the means
    row = data["nav"]["dsbo_sim"]
    assert math.isclose(row["gain"], row["after1"] - row["initial_after1"], rel_tol=1e-9, abs_tol=1e-9)
    assert math.isclose(row["adapt_gain"], row["after1"] - row["before"], rel_tol=1e-9, abs_tol=1e-9)
    assert row["gain_ci95"] > 0 and "gain over the untrained policy" in table

    # --eval-only: the saved learner, evaluated again on the same seeds, gives the same figures and keeps
    # the run's own (steps, minutes, command)
    args.eval_only = True
    again = bench.evaluate(bench.trained("nav", "dsbo_sim", args), args)
    assert again["after1"] == row["after1"] and again["gain"] == row["gain"]
    data = json.loads(bench.write_results([again], "benchmarks/meta_rl.py --eval-only (test)",
                                          tmp_path / "results").read_text())
    merged = data["nav"]["dsbo_sim"]
    assert merged["steps"] == 2 and merged["command"] == "benchmarks/meta_rl.py (test)"
    assert merged["eval_command"] == "benchmarks/meta_rl.py --eval-only (test)"
