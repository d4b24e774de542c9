"""MuJoCo locomotion meta-environments (MAML, Finn et al. 2017, section 5.3), on gymnasium's v5 models.

- ``HalfCheetahVelEnv``: task ``{"velocity"}`` uniform in ``[0, 2]``; reward ``-|v_x - velocity| - c‖a‖²``.
- ``HalfCheetahDirEnv``: task ``{"direction"}`` in ``{-1, +1}``; reward ``direction · v_x - c‖a‖²``.
- ``AntDirEnv``: task ``{"direction"}`` in ``{-1, +1}``; reward ``direction · v_x + healthy - c‖a‖² -
  contact cost`` (gymnasium's Ant-v5 terms, its termination when unhealthy).

``v_x`` is the forward velocity gymnasium reports (``info["x_velocity"]``) and the control cost is its
``info["reward_ctrl"]`` (weight ``ctrl_cost_weight``, 0.05 for the cheetah as in MAML-RL). Importing this
module imports MuJoCo; the registry imports it only when such an environment is made.
"""

from __future__ import annotations

import warnings

import mujoco
import numpy as np
from gymnasium.envs.mujoco.ant_v5 import AntEnv
from gymnasium.envs.mujoco.half_cheetah_v5 import HalfCheetahEnv

from bilevel_ray.rl.core import EnvTask, validate_task

__all__ = ["HalfCheetahVelEnv", "HalfCheetahDirEnv", "AntDirEnv"]

#: MuJoCo warnings about gymnasium's model files, which a user cannot act on (printed once per environment)
_MODEL_FILE_WARNINGS = ("compiler attribute 'settotalmass' is deprecated",)


def _mujoco_warning(message: str) -> None:
    """MuJoCo's warning handler while this module is loaded: drops :data:`_MODEL_FILE_WARNINGS`, raises
    every other warning as a Python ``RuntimeWarning``."""
    if not message.startswith(_MODEL_FILE_WARNINGS):
        warnings.warn(f"MuJoCo: {message}", RuntimeWarning, stacklevel=2)


if mujoco.get_mju_user_warning() is None:  # leave a handler the user installed alone
    mujoco.set_mju_user_warning(_mujoco_warning)


class _Directional:
    """Task ``{"direction": ±1}`` (forward or backward along x), drawn with equal probability."""

    TASK_SPEC = {"direction": (-1.0, 1.0)}

    def sample_tasks(self, n: int, *, seed: int) -> list[EnvTask]:
        signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=n)
        return [{"direction": float(s)} for s in signs]

    def set_task(self, task: EnvTask) -> None:
        task = validate_task(task, self.TASK_SPEC, type(self).__name__)
        if task["direction"] not in (-1.0, 1.0):
            raise ValueError(f"{type(self).__name__}.set_task: task['direction'] must be -1 or 1, "
                             f"got {task['direction']!r}")
        self._task = task

    def get_task(self) -> EnvTask:
        return dict(self._task)


class HalfCheetahVelEnv(HalfCheetahEnv):
    """HalfCheetah running at a target forward velocity."""

    TASK_SPEC = {"velocity": (-3.0, 3.0)}

    def __init__(self, ctrl_cost_weight: float = 0.05, low: float = 0.0, high: float = 2.0, **kwargs):
        if not (-3.0 <= low < high <= 3.0):
            raise ValueError(f"env.low, env.high: need -3 <= low < high <= 3, got {low!r}, {high!r}")
        super().__init__(ctrl_cost_weight=ctrl_cost_weight, **kwargs)
        self.low, self.high = float(low), float(high)
        self._task: EnvTask = {"velocity": (self.low + self.high) / 2}

    def sample_tasks(self, n: int, *, seed: int) -> list[EnvTask]:
        """``n`` target velocities uniform in ``[low, high]``."""
        vel = np.random.default_rng(seed).uniform(self.low, self.high, n)
        return [{"velocity": float(v)} for v in vel]

    def set_task(self, task: EnvTask) -> None:
        """Follow target velocity ``task["velocity"]``."""
        self._task = validate_task(task, self.TASK_SPEC, type(self).__name__)

    def get_task(self) -> EnvTask:
        """The current task."""
        return dict(self._task)

    def step(self, action):
        """HalfCheetah's step, rewarded ``-|v_x - velocity|`` minus the control cost."""
        obs, _, terminated, truncated, info = super().step(action)
        reward = -abs(info["x_velocity"] - self._task["velocity"]) + float(info["reward_ctrl"])
        return obs, reward, terminated, truncated, info


class HalfCheetahDirEnv(_Directional, HalfCheetahEnv):
    """HalfCheetah running forward or backward."""

    def __init__(self, ctrl_cost_weight: float = 0.05, **kwargs):
        super().__init__(ctrl_cost_weight=ctrl_cost_weight, **kwargs)
        self._task = {"direction": 1.0}

    def step(self, action):
        """HalfCheetah's step, rewarded ``direction · v_x`` minus the control cost."""
        obs, _, terminated, truncated, info = super().step(action)
        reward = self._task["direction"] * info["x_velocity"] + float(info["reward_ctrl"])
        return obs, reward, terminated, truncated, info


class AntDirEnv(_Directional, AntEnv):
    """Ant walking forward or backward along x."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._task = {"direction": 1.0}

    def step(self, action):
        """Ant's step, rewarded ``direction · v_x`` plus the healthy reward minus control and contact costs."""
        obs, _, terminated, truncated, info = super().step(action)
        reward = (self._task["direction"] * info["x_velocity"] + float(info["reward_survive"])
                  + float(info["reward_ctrl"]) + float(info["reward_contact"]))
        return obs, reward, terminated, truncated, info
