"""Vectorized rollouts through gymnasium's vector environments.

:class:`RolloutSampler` runs ``episodes_per_task`` episodes for each of a list of tasks in lockstep in
one vector environment (one sub-environment per episode: the environment's native vectorized version
where it registers one, else a ``SyncVectorEnv``) and returns time-major tensors. Episode ``j``
(counted over the whole request, ``first_episode`` on) takes its reset seed and its action noise from
``(seed, j)`` alone, so splitting a request across processes (Ray rollout workers) gives the same
episodes as running it in one.

With ``normalize_actions`` (the default) a Gaussian policy acts in units of the action box: its action
``a`` moves the environment by ``center + half_width · a`` (then clipped to the box), so that a policy of
standard deviation 1 explores the whole box without saturating it, whatever the box's size (rllab's
``normalize`` wrapper, which MAML's own code used). ``Episodes.actions`` stay in the policy's units.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor

from bilevel_ray.rl.core import EnvTask, make_env
from bilevel_ray.rl.policies import PolicyParams, Policy, make_policy

__all__ = ["Episodes", "RolloutSampler", "concat_episodes"]


class Episodes(NamedTuple):
    """A batch of ``E`` episodes, time-major; steps after an episode ended have ``mask == 0``.

    ``task`` (E,) is the index of each episode's task in the request; ``log_probs`` are the sampling
    policy's log-probabilities of the actions taken (the behaviour policy of importance weights).
    """

    obs: Tensor        # (T, E, obs_dim)
    actions: Tensor    # (T, E, act_dim) or (T, E) for discrete actions
    rewards: Tensor    # (T, E)
    mask: Tensor       # (T, E)
    log_probs: Tensor  # (T, E)
    task: Tensor       # (E,) long

    @property
    def returns(self) -> Tensor:
        """Undiscounted return of each episode, (E,)."""
        return (self.rewards * self.mask).sum(0)

    @property
    def steps(self) -> int:
        """Environment steps taken."""
        return int(self.mask.sum().item())

    def select(self, columns: Tensor | Sequence[int]) -> "Episodes":
        """The episodes at ``columns``."""
        idx = torch.as_tensor(columns, dtype=torch.long)
        return Episodes(*(getattr(self, f)[:, idx] for f in _TIME_MAJOR), self.task[idx])

    def of_task(self, k: int) -> "Episodes":
        """The episodes of task ``k``."""
        return self.select(torch.nonzero(self.task == k).flatten())


_TIME_MAJOR = ("obs", "actions", "rewards", "mask", "log_probs")


def concat_episodes(parts: Sequence[Episodes]) -> Episodes:
    """Join episode batches along the episode axis (padding shorter horizons with masked steps)."""
    horizon = max(p.obs.shape[0] for p in parts)

    def pad(t: Tensor) -> Tensor:
        extra = horizon - t.shape[0]
        return t if extra == 0 else torch.cat([t, t.new_zeros((extra, *t.shape[1:]))])

    return Episodes(*(torch.cat([pad(getattr(p, f)) for p in parts], 1) for f in _TIME_MAJOR),
                    torch.cat([p.task for p in parts]))


class RolloutSampler:
    """Samples episodes of a meta-environment under a policy, in one process.

    ``horizon`` defaults to the environment's ``max_episode_steps``; vector environments are built once
    per batch size and reused (the ``KEEP`` most recent sizes: training, metrics and evaluation requests
    alternate).
    """

    KEEP = 4

    def __init__(self, env_id: str, *, horizon: int | None = None, env_kwargs: dict[str, Any] | None = None,
                 policy: Policy | None = None, hidden: tuple[int, ...] = (100, 100), normalize_actions: bool = True):
        self.env_id = env_id
        self.env_kwargs = dict(env_kwargs or {})
        probe = make_env(env_id, **self.env_kwargs)
        limit = probe.spec.max_episode_steps if probe.spec is not None else None
        self.horizon = int(horizon or limit or 0)
        if self.horizon <= 0:
            raise ValueError(f"rl.horizon: must be a positive integer (the environment sets no time limit), got {horizon!r}")
        self.observation_space, self.action_space = probe.observation_space, probe.action_space
        self.policy = policy if policy is not None else make_policy(probe.observation_space, probe.action_space, hidden)
        self.normalize_actions = bool(normalize_actions)
        self._scale = self._center = None
        space = self.action_space
        if self.normalize_actions and isinstance(space, gym.spaces.Box):
            if not (np.isfinite(space.low).all() and np.isfinite(space.high).all()):
                raise ValueError(f"task.normalize_actions: {env_id}'s action box is unbounded ({space}); set it to false")
            low, high = space.low.astype(np.float64), space.high.astype(np.float64)
            if not (np.array_equal(low, -np.ones_like(low)) and np.array_equal(high, np.ones_like(high))):
                self._scale, self._center = (high - low) / 2, (high + low) / 2
        self._task_sampler = probe
        self._vecs: dict[int, gym.vector.VectorEnv] = {}

    def sample_tasks(self, n: int, *, seed: int) -> list[EnvTask]:
        """``n`` tasks of the environment; the same seed gives the same tasks."""
        return self._task_sampler.unwrapped.sample_tasks(n, seed=seed)

    def env_actions(self, actions: np.ndarray) -> np.ndarray:
        """The environment's actions for the policy's ``actions`` (box units when normalizing), clipped to
        the action box; discrete actions unchanged."""
        space = self.action_space
        if not isinstance(space, gym.spaces.Box):
            return actions
        if self._scale is not None:
            actions = self._center + self._scale * actions
        return np.clip(actions, space.low, space.high).astype(space.dtype)

    def _vector_env(self, n: int) -> gym.vector.VectorEnv:
        vec = self._vecs.pop(n, None)
        if vec is None:
            kwargs = self.env_kwargs
            spec = gym.spec(self.env_id)
            if spec.vector_entry_point is not None:  # natively vectorized (one numpy step for all copies)
                vec = gym.make_vec(self.env_id, num_envs=n, vectorization_mode="vector_entry_point", **kwargs)
            else:
                vec = gym.vector.SyncVectorEnv([lambda: make_env(self.env_id, **kwargs) for _ in range(n)], copy=False)
            if len(self._vecs) >= self.KEEP:
                self._vecs.pop(next(iter(self._vecs))).close()
        self._vecs[n] = vec  # most recent last
        return vec

    @torch.no_grad()
    def sample(self, params: PolicyParams | Sequence[PolicyParams], tasks: Sequence[EnvTask], episodes_per_task: int, *,
               seed: int | tuple[int, ...], first_episode: int = 0) -> Episodes:
        """``episodes_per_task`` episodes of each task (task-major order) under the policy ``params``, or
        under ``params[k]`` for task ``k`` when given one policy per task (adapted policies)."""
        if not (isinstance(episodes_per_task, int) and episodes_per_task > 0):
            raise ValueError(f"rl.episodes_per_task: must be a positive integer, got {episodes_per_task!r}")
        if len(tasks) == 0:
            raise ValueError("rl.tasks: need at least one task")
        per_task = not isinstance(params, dict)
        if per_task and len(params) != len(tasks):
            raise ValueError(f"rl.params: one policy per task needed, got {len(params)} for {len(tasks)} tasks")
        n = len(tasks) * episodes_per_task
        first = next(iter((params[0] if per_task else params).values()))
        dtype, device = first.dtype, first.device  # episodes live where the policy does
        vec = self._vector_env(n)
        if hasattr(vec, "set_tasks"):
            vec.set_tasks([tasks[i // episodes_per_task] for i in range(n)])
        else:
            for i, env in enumerate(vec.envs):
                env.unwrapped.set_task(tasks[i // episodes_per_task])
        key = [int(seed)] if isinstance(seed, (int, np.integer)) else [int(s) for s in seed]
        rngs = [np.random.default_rng([*key, first_episode + i]) for i in range(n)]
        reset_seeds = [int(r.integers(2**31)) for r in rngs]
        noise = torch.as_tensor(np.stack([
            r.standard_normal((self.horizon, *self.policy.noise_shape)) if self.policy.noise_shape
            else r.random(self.horizon) for r in rngs], 1), dtype=dtype, device=device)
        obs_np, _ = vec.reset(seed=reset_seeds)
        obs, actions, rewards, mask, logp = [], [], [], [], []
        alive = np.ones(n, dtype=bool)
        # All tasks' policies run as one batched pass, (tasks, episodes per task, ·), also where the tasks
        # share one policy: a task's episodes then go through the same batched kernel whichever other tasks
        # are in the request (Ray workers split a request by task).
        k = len(tasks)
        stacked = ({name: torch.stack([p[name] for p in params]) for name in params[0]} if per_task
                   else {name: v.unsqueeze(0).expand(k, *v.shape) for name, v in params.items()})
        for t in range(self.horizon):
            o = torch.tensor(obs_np, dtype=dtype, device=device)  # a copy: the vector env reuses its buffer
            a, lp = self.policy.sample_stacked(stacked, o.reshape(k, episodes_per_task, -1),
                                               noise[t].reshape(k, episodes_per_task, *noise.shape[2:]))
            a, lp = a.reshape(n, *a.shape[2:]), lp.reshape(n)
            logp.append(lp)
            a_np = self.env_actions(a.cpu().numpy())
            obs.append(o)
            actions.append(a)
            mask.append(torch.as_tensor(alive, dtype=dtype, device=device))
            obs_np, r, terminated, truncated, _ = vec.step(a_np)
            rewards.append(torch.as_tensor(np.where(alive, r, 0.0), dtype=dtype, device=device))
            alive = alive & ~(terminated | truncated)
            if not alive.any():
                break
        task = torch.arange(len(tasks), device=device).repeat_interleave(episodes_per_task)
        return Episodes(torch.stack(obs), torch.stack(actions), torch.stack(rewards), torch.stack(mask),
                        torch.stack(logp), task)

    def close(self) -> None:
        """Close every cached vector environment and the probe environment."""
        for vec in self._vecs.values():
            vec.close()
        self._vecs.clear()
        self._task_sampler.close()
