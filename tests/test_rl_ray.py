"""Meta-RL on the session's loopback Ray cluster: rollout actors, and agents running the proximal form."""

from __future__ import annotations

import pytest
import torch

from bilevel_ray.config import from_dict
from bilevel_ray.rl.ray_rollouts import RayRolloutSampler
from bilevel_ray.rl.rollouts import RolloutSampler
from bilevel_ray.runner import run

pytestmark = pytest.mark.filterwarnings("ignore:.*settotalmass.*")


@pytest.mark.parametrize("env_id", ["BilevelRay/Navigation2D-v0", "BilevelRay/HalfCheetahVel-v0"])
def test_ray_rollout_workers_give_the_in_process_episodes(ray_cluster, env_id):
    local = RolloutSampler(env_id, horizon=25, hidden=(8,))
    remote = RayRolloutSampler(env_id, workers=3, horizon=25, hidden=(8,))
    try:
        params = local.policy.init(seed=1)
        tasks = local.sample_tasks(5, seed=2)
        a = local.sample(params, tasks, 2, seed=9)
        b = remote.sample(params, tasks, 2, seed=9)
        for name in a._fields:
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert torch.equal(a.returns, b.returns)
        # one policy per task (adapted policies) goes to the worker that runs that task
        per_task = [local.policy.init(seed=10 + k) for k in range(5)]
        c, d = local.sample(per_task, tasks, 2, seed=3), remote.sample(per_task, tasks, 2, seed=3)
        assert all(torch.equal(getattr(c, n), getattr(d, n)) for n in c._fields)
        assert not torch.equal(c.actions, a.actions)
    finally:
        remote.close()


def _cfg(backend: str, tmp_path, algo: dict) -> dict:
    return {"task": {"name": "meta_rl", "train_tasks": 8, "meta_batch": 2, "episodes": 4, "horizon": 20, "width": 16,
                     "depth": 1, "eval_tasks": 4, "eval_episodes": 4},
            "algorithm": algo,
            "decentralized": {"agents": 2, "topology": "ring", "backend": backend},
            "run": {"steps": 3, "eval_every": 3, "seed": 0, "progress": False, "out_dir": str(tmp_path / backend)}}


@pytest.mark.parametrize("algo", [{"name": "dsbo", "inner_steps": 1, "linear_steps": 1, "inner_lr": 0.05,
                                   "linear_lr": 0.05, "outer_lr": 0.5},
                                  {"name": "d_soba", "inner_lr": 0.05, "outer_lr": 0.5}])
def test_decentralized_meta_rl_runs_the_same_on_ray_agents_and_the_simulation(ray_cluster, tmp_path, algo):
    """Each agent samples its own tasks' rollouts in its actor; every draw is a function of
    (seed, rank, step), so Ray agents and the one-process simulation log the same rows, and the Ray
    agents' environment steps add up in the driver's task as the simulated agents' do."""
    sim_cfg, ray_cfg = from_dict(_cfg("sim", tmp_path, algo)), from_dict(_cfg("ray", tmp_path, algo))
    sim = run(sim_cfg, progress=False)
    ray_rows = run(ray_cfg, progress=False)
    assert sim_cfg.task.counts["env_steps"] == ray_cfg.task.counts["env_steps"] > 0
    assert [r["step"] for r in sim] == [0, 3]
    for a, b in zip(sim, ray_rows):
        for key in ("pre_return", "post_return", "lower_return"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-5), key
    assert sim[-1]["consensus_error"] > 0
