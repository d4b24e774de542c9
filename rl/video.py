"""Animated GIFs of a meta-policy before and after adapting to new tasks (``rgb_array`` environments)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from bilevel_ray.files import atomic_write

__all__ = ["episode_frames", "write_adaptation_gif"]


def episode_frames(env_id: str, task: dict, sampler: Any, params: dict, *, horizon: int, seed: int,
                   every: int = 2) -> list[np.ndarray]:
    """Frames of one episode of the policy's mean actions (every ``every`` steps, and the last), mapped to
    the environment's actions as ``sampler`` maps them."""
    from bilevel_ray.rl.core import make_env

    env = make_env(env_id, task=task, render_mode="rgb_array")
    try:
        obs, _ = env.reset(seed=seed)
        frames, policy = [], sampler.policy
        for t in range(horizon):
            o = torch.as_tensor(np.asarray(obs), dtype=next(iter(params.values())).dtype)
            noise = torch.zeros(policy.noise_shape, dtype=o.dtype) + (0.5 if not policy.noise_shape else 0.0)
            action = sampler.env_actions(policy.sample(params, o, noise)[0].detach().numpy())
            obs, _, terminated, truncated, _ = env.step(action if action.ndim else int(action))
            if t % every == 0 or terminated or truncated or t == horizon - 1:
                frames.append(np.asarray(env.render()))
            if terminated or truncated:
                break
        return frames
    finally:
        env.close()


def write_adaptation_gif(meta_policy: Any, path: str | Path, *, tasks: int = 4, seed: int = 0) -> None:
    """For ``tasks`` new tasks: the meta-policy's episode (left) beside the adapted policy's (right)."""
    from PIL import Image

    new = meta_policy.new_tasks(tasks, seed=seed)
    _, adapted = meta_policy.adapt(new, seed=seed)
    sampler = meta_policy.sampler
    frames = []
    for k, task in enumerate(new):
        try:
            before = episode_frames(meta_policy.env, task, sampler, meta_policy.params, horizon=meta_policy.horizon, seed=seed)
        except Exception as err:  # rendering needs an rgb_array renderer (MuJoCo: MUJOCO_GL=egl)
            raise ValueError(f"--video: {meta_policy.env} cannot render rgb_array here ({err})") from None
        after = episode_frames(meta_policy.env, task, sampler, adapted[k], horizon=meta_policy.horizon, seed=seed)
        for i in range(max(len(before), len(after))):
            left, right = before[min(i, len(before) - 1)], after[min(i, len(after) - 1)]
            gap = np.full((left.shape[0], 4, 3), 128, np.uint8)
            frames.append(Image.fromarray(np.concatenate([left, gap, right], 1)))
    atomic_write(Path(path), lambda tmp: frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:],
                                                         duration=50, loop=0))
