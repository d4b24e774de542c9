"""Classic control with randomized physics: each task rescales pole length, mass and gravity.

Every physical constant of a task is the default times a factor drawn log-uniformly in
``[1/scale, scale]`` (``scale=2`` by default), independently per constant — the usual domain
randomization used to meta-train adaptive controllers. Rewards are gymnasium's; only the dynamics move.

- ``RandomCartPoleEnv``: task ``{"pole_length", "pole_mass", "gravity"}`` (defaults 0.5, 0.1, 9.8);
- ``RandomPendulumEnv``: task ``{"length", "mass", "gravity"}`` (defaults 1.0, 1.0, 10.0).
"""

from __future__ import annotations

import numpy as np
from gymnasium.envs.classic_control import CartPoleEnv, PendulumEnv

from bilevel_ray.rl.core import EnvTask, validate_task

__all__ = ["RandomCartPoleEnv", "RandomPendulumEnv"]


def _check_scale(scale: float) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 1.0 <= scale <= 10.0:
        raise ValueError(f"env.scale: must be a number in [1, 10], got {scale!r}")
    return float(scale)


class _RandomPhysics:
    """Shared task logic: ``DEFAULTS`` (task key -> default value) scaled log-uniformly."""

    DEFAULTS: dict[str, float] = {}

    def __init__(self, scale: float = 2.0, render_mode: str | None = None):
        super().__init__(render_mode=render_mode)  # the gymnasium environment after this class in the MRO
        self.scale = _check_scale(scale)
        self.TASK_SPEC = {k: (v / 10.0, v * 10.0) for k, v in self.DEFAULTS.items()}
        self.set_task(dict(self.DEFAULTS))

    def sample_tasks(self, n: int, *, seed: int) -> list[EnvTask]:
        logs = np.random.default_rng(seed).uniform(-np.log(self.scale), np.log(self.scale), (n, len(self.DEFAULTS)))
        return [{k: float(v * np.exp(z)) for (k, v), z in zip(self.DEFAULTS.items(), row)} for row in logs]

    def set_task(self, task: EnvTask) -> None:
        self._task = validate_task(task, self.TASK_SPEC, type(self).__name__)
        self._apply(self._task)

    def get_task(self) -> EnvTask:
        return dict(self._task)

    def _apply(self, task: EnvTask) -> None:  # pragma: no cover - interface
        raise NotImplementedError


class RandomCartPoleEnv(_RandomPhysics, CartPoleEnv):
    """CartPole-v1 whose pole length, pole mass and gravity are the task."""

    DEFAULTS = {"pole_length": 0.5, "pole_mass": 0.1, "gravity": 9.8}

    def _apply(self, task: EnvTask) -> None:
        self.length, self.masspole, self.gravity = task["pole_length"], task["pole_mass"], task["gravity"]
        self.total_mass = self.masspole + self.masscart
        self.polemass_length = self.masspole * self.length


class RandomPendulumEnv(_RandomPhysics, PendulumEnv):
    """Pendulum-v1 whose length, mass and gravity are the task."""

    DEFAULTS = {"length": 1.0, "mass": 1.0, "gravity": 10.0}

    def _apply(self, task: EnvTask) -> None:
        self.l, self.m, self.g = task["length"], task["mass"], task["gravity"]
