"""Errors tell the truth: a bug raised inside an agent's step stops the run at once, as itself, with the
rows so far kept; only a dead actor is replayed (tests/test_fault_tolerance.py, tests/test_tune.py)."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
import traceback

import pytest

from bilevel_ray.algorithms.base import identity_mix
from bilevel_ray.algorithms.dsbo import DSOBA
from bilevel_ray.config import from_dict
from bilevel_ray.runner import run

CONFIG = {
    "task": {"name": "logreg_hpo", "dataset": "synthetic", "n_samples": 400, "n_features": 6, "batch_size": 16},
    "algorithm": {"name": "d_soba", "outer_lr": 0.5, "inner_lr": 0.3, "linear_lr": 0.3},
    "run": {"steps": 30, "eval_every": 2, "checkpoint_every": 5, "progress": False},
    "decentralized": {"agents": 3, "topology": "ring", "backend": "sim"},
}


@dataclasses.dataclass(frozen=True)
class BuggyDSOBA(DSOBA):
    """D-SOBA whose agent 1 hits a bug (a missing attribute) at round 7."""

    def step(self, state, problem, mix=identity_mix):
        if state.t == 7 and state.rank in (1, (0, 1, 2)):  # a Ray agent's rank, the simulation's stack
            return state.no_such_field
        return super().step(state, problem, mix)


def buggy_config(tmp_path, backend):
    cfg = from_dict({**CONFIG, "decentralized": {**CONFIG["decentralized"], "backend": backend},
                     "run": {**CONFIG["run"], "out_dir": str(tmp_path / backend)}})
    return dataclasses.replace(cfg, algorithm=BuggyDSOBA(**cfg.algorithm.to_dict()))


@pytest.mark.parametrize("backend", ["sim", "ray"])
def test_a_bug_inside_an_agent_stops_the_run_with_its_own_traceback(tmp_path, ray_cluster, backend):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # agents rebuild BuggyDSOBA from its code
    cfg = buggy_config(tmp_path, backend)
    start = time.perf_counter()
    with pytest.raises(AttributeError, match="no_such_field") as info:
        run(cfg, progress=False)
    assert time.perf_counter() - start < 120  # at once: no replay, no restart loop
    text = "".join(traceback.format_exception(info.value))
    assert "AgentFailure" not in text and "was restarted" not in text
    if backend == "ray":  # the agent's own frame is in the message
        assert "in step" in str(info.value) and "state.no_such_field" in str(info.value)
    rows = json.loads((tmp_path / backend / "metrics.json").read_text())
    assert [r["step"] for r in rows] == [0, 2, 4, 6]  # every row before the bug kept, none after
