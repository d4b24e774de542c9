"""Rollout workers as Ray actors: the same ``sample`` as :class:`~bilevel_ray.rl.rollouts.RolloutSampler`,
with a request's tasks shared out among ``workers`` CPU actors that each step their own vector env.

Episode ``j`` draws its reset seed and action noise from ``(seed, j)`` whichever worker runs it, so the
episodes (and returns) equal the in-process ones for the same seeds.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from bilevel_ray.device import to_device
from bilevel_ray.rl.core import EnvTask
from bilevel_ray.rl.policies import PolicyParams
from bilevel_ray.rl.rollouts import Episodes, RolloutSampler, concat_episodes

__all__ = ["RolloutWorker", "RayRolloutSampler"]


class RolloutWorker:
    """The body of one rollout actor (a thin shell around an in-process sampler)."""

    def __init__(self, env_id: str, horizon: int | None, hidden: tuple[int, ...], env_kwargs: dict[str, Any],
                 normalize_actions: bool = True):
        torch.set_num_threads(1)
        self.sampler = RolloutSampler(env_id, horizon=horizon, hidden=hidden, env_kwargs=env_kwargs,
                                      normalize_actions=normalize_actions)

    def sample(self, params: PolicyParams | Sequence[PolicyParams], tasks: Sequence[EnvTask], episodes_per_task: int,
               seed: int | tuple[int, ...], first_episode: int) -> Episodes:
        """This worker's share of a request, episodes numbered from ``first_episode``."""
        return self.sampler.sample(params, tasks, episodes_per_task, seed=seed, first_episode=first_episode)


class RayRolloutSampler:
    """Drop-in for :class:`RolloutSampler` that runs on ``workers`` Ray actors (``num_cpus`` each).

    Connects to a loopback-only local Ray cluster if none is initialized.
    """

    def __init__(self, env_id: str, *, workers: int, horizon: int | None = None, hidden: tuple[int, ...] = (100, 100),
                 env_kwargs: dict[str, Any] | None = None, num_cpus: float = 1, normalize_actions: bool = True):
        import ray

        from bilevel_ray.decentralized.backends import connect_ray

        if not (isinstance(workers, int) and workers >= 1):
            raise ValueError(f"task.rollout_workers: must be an integer >= 1, got {workers!r}")
        self.local = RolloutSampler(env_id, horizon=horizon, hidden=hidden, env_kwargs=env_kwargs,
                                    normalize_actions=normalize_actions)
        self.policy, self.horizon = self.local.policy, self.local.horizon
        self.normalize_actions, self.env_actions = self.local.normalize_actions, self.local.env_actions
        self.observation_space, self.action_space = self.local.observation_space, self.local.action_space
        connect_ray(None, workers)
        actor = ray.remote(num_cpus=num_cpus)(RolloutWorker)
        self.workers = [actor.remote(env_id, self.horizon, tuple(hidden), dict(env_kwargs or {}),
                                     self.normalize_actions) for _ in range(workers)]

    def sample_tasks(self, n: int, *, seed: int) -> list[EnvTask]:
        """``n`` tasks of the environment (drawn in this process)."""
        return self.local.sample_tasks(n, seed=seed)

    def sample(self, params: PolicyParams | Sequence[PolicyParams], tasks: Sequence[EnvTask], episodes_per_task: int, *,
               seed: int | tuple[int, ...], first_episode: int = 0) -> Episodes:
        """:meth:`RolloutSampler.sample`, the tasks shared out among the workers."""
        import ray

        per_task = not isinstance(params, dict)
        device = next(iter((params[0] if per_task else params).values())).device
        params = to_device(params, "cpu")  # workers run on the CPU
        chunks = [c for c in np.array_split(np.arange(len(tasks)), len(self.workers)) if len(c)]
        refs = []
        for worker, chunk in zip(self.workers, chunks):
            a, b = int(chunk[0]), int(chunk[-1]) + 1
            refs.append(worker.sample.remote(list(params[a:b]) if per_task else params, list(tasks[a:b]),
                                             episodes_per_task, seed, first_episode + a * episodes_per_task))
        parts = ray.get(refs)
        joined = concat_episodes(parts)
        offsets = torch.cat([p.task + int(c[0]) for p, c in zip(parts, chunks)])
        return to_device(joined._replace(task=offsets), device)

    def close(self) -> None:
        """Kill the worker actors and close the local sampler."""
        import ray

        for w in self.workers:
            ray.kill(w)
        self.workers = []
        self.local.close()
