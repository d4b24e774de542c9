"""Meta-environments: a task protocol on top of ``gymnasium.Env``, registration, and a plug-in checker.

A meta-environment is a gymnasium environment whose reward or dynamics depend on a *task* (a goal, a
target velocity, a pole length). It adds three methods (MAML, Finn et al. 2017; MAML-RL's
``sample_tasks`` / ``reset_task``):

- ``sample_tasks(n, *, seed) -> list[EnvTask]``: ``n`` tasks, a pure function of ``seed``;
- ``set_task(task)``: the task every later episode follows (kept across ``reset``);
- ``get_task() -> EnvTask``: the current task.

A task is a ``dict[str, float]`` (JSON- and pickle-friendly). Environments are created through
gymnasium's registry (``gymnasium.make("BilevelRay/HalfCheetahVel-v0")``); third-party packages add
theirs through the ``bilevel_ray.meta_envs`` entry-point group (see :func:`load_plugins`).
"""

from __future__ import annotations

import copy
import inspect
import pickle
from typing import Any, Protocol, runtime_checkable

import gymnasium as gym
import numpy as np

__all__ = ["EnvTask", "MetaEnv", "NAMESPACE", "ENTRY_POINT_GROUP", "register_builtin", "load_plugins",
           "make_env", "meta_env_ids", "set_env_task", "get_env_task", "check_meta_env", "validate_task"]

EnvTask = dict[str, float]

#: gymnasium namespace of the built-in meta-environments
NAMESPACE = "BilevelRay"
#: entry-point group scanned by :func:`load_plugins`
ENTRY_POINT_GROUP = "bilevel_ray.meta_envs"

# id -> (entry point, max_episode_steps, kwargs); MuJoCo modules are imported only on make()
_BUILTIN: dict[str, tuple[str, int, dict[str, Any]]] = {
    "Navigation2D-v0": ("bilevel_ray.rl.navigation:Navigation2DEnv", 100, {}),
    "HalfCheetahVel-v0": ("bilevel_ray.rl.locomotion:HalfCheetahVelEnv", 200, {}),
    "HalfCheetahDir-v0": ("bilevel_ray.rl.locomotion:HalfCheetahDirEnv", 200, {}),
    "AntDir-v0": ("bilevel_ray.rl.locomotion:AntDirEnv", 200, {}),
    "CartPoleRandom-v0": ("bilevel_ray.rl.classic:RandomCartPoleEnv", 200, {}),
    "PendulumRandom-v0": ("bilevel_ray.rl.classic:RandomPendulumEnv", 200, {}),
}


#: natively vectorized versions (gymnasium's ``vector_entry_point``; they add ``set_tasks(list)``)
_VECTOR: dict[str, str] = {"Navigation2D-v0": "bilevel_ray.rl.navigation:Navigation2DVectorEnv"}


@runtime_checkable
class MetaEnv(Protocol):
    """What a meta-environment adds to ``gymnasium.Env``."""

    def sample_tasks(self, n: int, *, seed: int) -> list[EnvTask]:
        """``n`` tasks drawn from the task distribution; the same seed gives the same tasks."""

    def set_task(self, task: EnvTask) -> None:
        """Follow ``task`` from the next ``reset`` on (raises ``ValueError`` naming a bad key)."""

    def get_task(self) -> EnvTask:
        """The current task."""


def validate_task(task: Any, spec: dict[str, tuple[float, float]], env: str) -> EnvTask:
    """Check ``task`` has exactly the keys of ``spec`` with finite values in ``[low, high]``; return a
    clean copy of plain floats. One-line ``ValueError`` naming the bad key otherwise."""
    if not isinstance(task, dict):
        raise ValueError(f"{env}.set_task: task must be a dict with keys {sorted(spec)}, got {type(task).__name__}")
    if set(task) != set(spec):
        raise ValueError(f"{env}.set_task: task keys must be {sorted(spec)}, got {sorted(task)}")
    out = {}
    for key, (low, high) in spec.items():
        val = task[key]
        if isinstance(val, bool) or not isinstance(val, (int, float, np.floating, np.integer)):
            raise ValueError(f"{env}.set_task: task[{key!r}] must be a number, got {val!r}")
        val = float(val)
        if not (np.isfinite(val) and low <= val <= high):
            raise ValueError(f"{env}.set_task: task[{key!r}] must be in [{low}, {high}], got {val!r}")
        out[key] = val
    return out


def register_builtin() -> None:
    """Register the built-in meta-environments with gymnasium (idempotent)."""
    for name, (entry, steps, kwargs) in _BUILTIN.items():
        env_id = f"{NAMESPACE}/{name}"
        if env_id not in gym.registry:
            gym.register(id=env_id, entry_point=entry, max_episode_steps=steps, kwargs=dict(kwargs),
                         vector_entry_point=_VECTOR.get(name))


def load_plugins() -> list[str]:
    """Load the ``bilevel_ray.meta_envs`` entry points of installed packages; return the ids added.

    An entry point ``"Ns/Name-v0" = "pkg.module:EnvClass"`` registers that class under that id; an entry
    point naming a function calls it (it registers its environments itself).
    """
    from importlib.metadata import entry_points

    added = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in gym.registry:
            continue
        obj = ep.load()
        if isinstance(obj, type) and issubclass(obj, gym.Env):
            gym.register(id=ep.name, entry_point=obj)
            added.append(ep.name)
        elif callable(obj):
            before = set(gym.registry)
            obj()
            added.extend(sorted(set(gym.registry) - before))
        else:
            raise TypeError(f"entry point {ep.name!r} ({ep.value}): must name a gymnasium.Env subclass "
                            f"or a registering function")
    return added


def meta_env_ids() -> list[str]:
    """Ids of the built-in meta-environments."""
    register_builtin()
    return sorted(f"{NAMESPACE}/{name}" for name in _BUILTIN)


def make_env(env_id: str, *, task: EnvTask | None = None, **kwargs: Any) -> gym.Env:
    """``gymnasium.make`` after registering built-ins and plug-ins, optionally setting a task. An unknown
    id fails with one line listing the meta-environments available."""
    register_builtin()
    if env_id not in gym.registry:
        load_plugins()
    if env_id not in gym.registry:
        raise ValueError(f"env.id: unknown environment {env_id!r}; meta-environments: {', '.join(meta_env_ids())}")
    env = gym.make(env_id, **kwargs)
    if not isinstance(env.unwrapped, MetaEnv):
        raise TypeError(f"env.id: {env_id!r} is not a meta-environment (needs sample_tasks, set_task, get_task)")
    if task is not None:
        set_env_task(env, task)
    return env


def set_env_task(env: gym.Env, task: EnvTask) -> None:
    """Set the task of a (possibly wrapped) meta-environment."""
    env.unwrapped.set_task(task)


def get_env_task(env: gym.Env) -> EnvTask:
    """The task of a (possibly wrapped) meta-environment."""
    return env.unwrapped.get_task()


def _run(env: gym.Env, seed: int, actions: list) -> tuple[np.ndarray, np.ndarray]:
    obs, _ = env.reset(seed=seed)
    observations, rewards = [obs], []
    for a in actions:
        obs, r, terminated, truncated, _ = env.step(a)
        observations.append(obs)
        rewards.append(r)
        if terminated or truncated:
            break
    return np.asarray(observations, dtype=np.float64), np.asarray(rewards, dtype=np.float64)


def check_meta_env(env: gym.Env, *, seed: int = 0, steps: int = 20, skip_render_check: bool = True) -> None:
    """Check a meta-environment plug-in: gymnasium's ``check_env`` plus the task protocol.

    Raises ``TypeError`` / ``ValueError`` with one line naming the first defect: missing methods, a
    positional ``seed``, tasks that are not reproducible from the seed, not picklable, not kept by
    ``set_task``/``get_task`` or across ``reset``, episodes that are not reproducible, a task with no
    effect on rewards or observations, a bad task accepted. The environment's task is restored after.
    """
    from gymnasium.utils.env_checker import check_env

    base = env.unwrapped
    name = type(base).__name__
    for method in ("sample_tasks", "set_task", "get_task"):
        if not callable(getattr(base, method, None)):
            raise TypeError(f"{name}.{method}: missing; a meta-environment needs sample_tasks, set_task, get_task")
    param = inspect.signature(base.sample_tasks).parameters.get("seed")
    if param is None or param.kind is not inspect.Parameter.KEYWORD_ONLY:
        raise TypeError(f"{name}.sample_tasks: seed must be a keyword-only argument (n, *, seed)")
    original = base.get_task()
    try:
        _check_tasks(env, name, seed, steps)
    finally:
        base.set_task(original)
    check_env(base, skip_render_check=skip_render_check)
    base.set_task(original)


def _check_tasks(env: gym.Env, name: str, seed: int, steps: int) -> None:
    base = env.unwrapped
    tasks = base.sample_tasks(4, seed=seed)
    if not isinstance(tasks, list) or len(tasks) != 4:
        raise TypeError(f"{name}.sample_tasks: must return a list of n tasks, got {type(tasks).__name__}")
    if base.sample_tasks(4, seed=seed) != tasks:
        raise ValueError(f"{name}.sample_tasks: the same seed gave different tasks")
    if base.sample_tasks(4, seed=seed + 1) == tasks:
        raise ValueError(f"{name}.sample_tasks: different seeds gave the same tasks")
    for task in tasks:
        if pickle.loads(pickle.dumps(task)) != task:
            raise TypeError(f"{name}.sample_tasks: tasks must be picklable, got {task!r}")
    base.set_task(copy.deepcopy(tasks[0]))
    if base.get_task() != tasks[0]:
        raise ValueError(f"{name}.get_task: returned {base.get_task()!r} after set_task({tasks[0]!r})")
    env.reset(seed=seed)
    if base.get_task() != tasks[0]:
        raise ValueError(f"{name}.reset: changed the task")
    try:
        base.set_task({"not_a_task_key": 0.0})
    except (ValueError, TypeError):
        pass
    else:
        raise ValueError(f"{name}.set_task: accepted a task with an unknown key")
    if base.get_task() != tasks[0]:
        raise ValueError(f"{name}.set_task: a rejected task changed the current task")

    env.action_space.seed(seed)
    actions = [env.action_space.sample() for _ in range(steps)]
    obs_a, rew_a = _run(env, seed, actions)
    obs_b, rew_b = _run(env, seed, actions)
    if not (np.array_equal(obs_a, obs_b) and np.array_equal(rew_a, rew_b)):
        raise ValueError(f"{name}: the same task, seed and actions gave different episodes")
    effect = False
    for task in tasks[1:]:
        base.set_task(task)
        obs_c, rew_c = _run(env, seed, actions)
        n = min(len(rew_a), len(rew_c))
        effect |= len(rew_a) != len(rew_c) or not (np.allclose(rew_a[:n], rew_c[:n]) and np.allclose(obs_a[:n], obs_c[:n]))
    if not effect:
        raise ValueError(f"{name}: the task changes neither rewards nor observations")
