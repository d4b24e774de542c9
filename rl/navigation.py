"""2-D point navigation to a random goal (MAML, Finn et al. 2017, section 5.3).

The agent starts at the origin; an action ``a`` (clipped to ``[-0.1, 0.1]²``) moves it to ``p + a``; the
reward is ``-‖p + a - goal‖``. Goals are uniform in ``[-0.5, 0.5]²``. An episode terminates once the agent
is within ``goal_tolerance`` = 0.01 of the goal in both coordinates (the MAML paper's protocol and MAML's
own environment; ``goal_tolerance=0`` never terminates) and is truncated at 100 steps by the
registration (``BilevelRay/Navigation2D-v0``).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from bilevel_ray.rl.core import EnvTask, validate_task

__all__ = ["Navigation2DEnv"]


class Navigation2DEnv(gym.Env):
    """Point robot on the plane; task ``{"goal_x", "goal_y"}``."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}
    #: task key -> allowed range
    TASK_SPEC = {"goal_x": (-1.0, 1.0), "goal_y": (-1.0, 1.0)}
    MAX_STEP = 0.1

    def __init__(self, goal_range: float = 0.5, render_mode: str | None = None, goal_tolerance: float = 0.01):
        if not (isinstance(goal_range, (int, float)) and 0 < goal_range <= 1):
            raise ValueError(f"env.goal_range: must be in (0, 1], got {goal_range!r}")
        if isinstance(goal_tolerance, bool) or not (isinstance(goal_tolerance, (int, float)) and 0 <= goal_tolerance < 1):
            raise ValueError(f"env.goal_tolerance: must be in [0, 1) (0: never terminate), got {goal_tolerance!r}")
        self.goal_tolerance = float(goal_tolerance)
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"env.render_mode: must be None or 'rgb_array', got {render_mode!r}")
        self.goal_range = float(goal_range)
        self.render_mode = render_mode
        self.observation_space = spaces.Box(-np.inf, np.inf, (2,), np.float32)
        self.action_space = spaces.Box(-self.MAX_STEP, self.MAX_STEP, (2,), np.float32)
        self._task: EnvTask = {"goal_x": 0.0, "goal_y": 0.0}
        self._pos = np.zeros(2)
        self._path: list[np.ndarray] = []

    def sample_tasks(self, n: int, *, seed: int) -> list[EnvTask]:
        """``n`` goals uniform in ``[-goal_range, goal_range]²``."""
        goals = np.random.default_rng(seed).uniform(-self.goal_range, self.goal_range, (n, 2))
        return [{"goal_x": float(gx), "goal_y": float(gy)} for gx, gy in goals]

    def set_task(self, task: EnvTask) -> None:
        """Move the goal to ``(task["goal_x"], task["goal_y"])``."""
        self._task = validate_task(task, self.TASK_SPEC, type(self).__name__)

    def get_task(self) -> EnvTask:
        """The current task."""
        return dict(self._task)

    @property
    def goal(self) -> np.ndarray:
        """The current goal as a 2-vector."""
        return np.array([self._task["goal_x"], self._task["goal_y"]])

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """Back to the origin: ``(observation, {})``."""
        super().reset(seed=seed)
        self._pos = np.zeros(2)
        self._path = [self._pos.copy()]
        return self._pos.astype(np.float32), {}

    def step(self, action):
        """Move by the clipped action; the reward is minus the distance to the goal; terminated within
        ``goal_tolerance`` of it in both coordinates."""
        action = np.clip(np.asarray(action, dtype=np.float64), -self.MAX_STEP, self.MAX_STEP)
        self._pos = self._pos + action
        self._path.append(self._pos.copy())
        diff = self._pos - self.goal
        dist = float(np.sqrt(diff[0] * diff[0] + diff[1] * diff[1]))
        reached = bool((np.abs(diff) < self.goal_tolerance).all())
        return self._pos.astype(np.float32), -dist, reached, False, {"distance": dist}

    def render(self) -> np.ndarray | None:
        """An RGB image (H, W, 3) of the path so far (blue), the start (black) and the goal (red)."""
        if self.render_mode != "rgb_array":
            return None
        size, extent = 128, 1.0
        img = np.full((size, size, 3), 255, np.uint8)

        def pixel(p: np.ndarray) -> tuple[int, int]:
            col = int(np.clip((p[0] + extent) / (2 * extent) * (size - 1), 0, size - 1))
            row = int(np.clip((extent - p[1]) / (2 * extent) * (size - 1), 0, size - 1))
            return row, col

        for p in self._path:
            r, c = pixel(p)
            img[max(r - 1, 0):r + 2, max(c - 1, 0):c + 2] = (40, 90, 220)
        for p, colour in ((np.zeros(2), (0, 0, 0)), (self.goal, (220, 30, 30))):
            r, c = pixel(p)
            img[max(r - 2, 0):r + 3, max(c - 2, 0):c + 3] = colour
        return img


class Navigation2DVectorEnv(gym.vector.VectorEnv):
    """``num_envs`` copies of :class:`Navigation2DEnv` stepped together in numpy (gymnasium's
    ``vector_entry_point`` of ``BilevelRay/Navigation2D-v0``): the same positions, rewards and
    truncation as the single environment, without a Python call per sub-environment and step.
    Each copy has its own task (:meth:`set_tasks`)."""

    metadata = {"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP}

    def __init__(self, num_envs: int, goal_range: float = 0.5, max_episode_steps: int | None = None,
                 goal_tolerance: float = 0.01):
        if not (isinstance(num_envs, int) and num_envs >= 1):
            raise ValueError(f"env.num_envs: must be an integer >= 1, got {num_envs!r}")
        self.single_env = Navigation2DEnv(goal_range, goal_tolerance=goal_tolerance)
        self.goal_tolerance = self.single_env.goal_tolerance
        self.num_envs = num_envs
        self.max_episode_steps = max_episode_steps
        self.single_observation_space = self.single_env.observation_space
        self.single_action_space = self.single_env.action_space
        self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, num_envs)
        self.action_space = gym.vector.utils.batch_space(self.single_action_space, num_envs)
        self._goals = np.zeros((num_envs, 2))
        self._pos = np.zeros((num_envs, 2))
        self._steps = np.zeros(num_envs, dtype=np.int64)

    def sample_tasks(self, n: int, *, seed: int) -> list[EnvTask]:
        return self.single_env.sample_tasks(n, seed=seed)

    def set_tasks(self, tasks: list[EnvTask]) -> None:
        """One task per sub-environment (validated as :meth:`Navigation2DEnv.set_task` does)."""
        if len(tasks) != self.num_envs:
            raise ValueError(f"env.tasks: need {self.num_envs} tasks, one per sub-environment, got {len(tasks)}")
        goals = []
        for task in tasks:
            clean = validate_task(task, Navigation2DEnv.TASK_SPEC, "Navigation2DVectorEnv")
            goals.append((clean["goal_x"], clean["goal_y"]))
        self._goals = np.asarray(goals, dtype=np.float64)

    def reset(self, *, seed: int | list[int] | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed if isinstance(seed, int) or seed is None else None)
        self._pos = np.zeros((self.num_envs, 2))
        self._steps[:] = 0
        return self._pos.astype(np.float32), {}

    def step(self, actions):
        actions = np.clip(np.asarray(actions, dtype=np.float64), -Navigation2DEnv.MAX_STEP, Navigation2DEnv.MAX_STEP)
        self._pos = self._pos + actions
        diff = self._pos - self._goals
        dist = np.sqrt(diff[:, 0] * diff[:, 0] + diff[:, 1] * diff[:, 1])
        terminated = (np.abs(diff) < self.goal_tolerance).all(1)
        self._steps += 1
        truncated = (np.zeros(self.num_envs, dtype=bool) if self.max_episode_steps is None
                     else self._steps >= self.max_episode_steps)
        obs = self._pos.astype(np.float32)
        done = terminated | truncated
        if done.any():  # same-step autoreset: the episode's last position is the observation returned
            self._pos[done] = 0.0
            self._steps[done] = 0
        return obs, -dist, terminated, truncated, {"distance": dist}
