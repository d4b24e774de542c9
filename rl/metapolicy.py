"""A saved meta-policy: what a meta-RL run deploys, and its evaluation on new tasks.

``bilevel-ray eval learner.pt`` adapts the meta-policy to new tasks of its environment (``adapt_steps``
policy-gradient steps of size ``adapt_lr`` from ``x``, fresh episodes each step, as MAML's test-time
adaptation) and reports the mean return before and after each step with 95% intervals over the tasks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bilevel_ray.files import atomic_write

__all__ = ["FORMAT", "MetaPolicy", "load_meta_policy", "is_meta_policy", "from_payload"]

FORMAT = "bilevel-ray-metapolicy/1"


@dataclass(frozen=True)
class MetaPolicy:
    """Meta-policy parameters and how to adapt them (see the module docstring)."""

    env: str
    horizon: int
    hidden: tuple[int, ...]
    params: dict[str, torch.Tensor]
    adapt_lr: float
    adapt_steps: int = 1
    gamma: float = 0.99
    gae_lambda: float = 1.0
    normalize_actions: bool = True

    @property
    def sampler(self):
        """This process's rollout sampler for ``env``, ``horizon`` and ``hidden``."""
        from bilevel_ray.rl.problem import rollout_sampler

        return rollout_sampler(self.env, self.horizon, tuple(self.hidden), 0, self.normalize_actions)

    def save(self, path: str | Path) -> None:
        """Write the checkpoint atomically."""
        payload = {"format": FORMAT, "env": self.env, "horizon": int(self.horizon), "hidden": list(self.hidden),
                   "params": {k: v.detach().cpu() for k, v in self.params.items()}, "adapt_lr": float(self.adapt_lr),
                   "adapt_steps": int(self.adapt_steps), "gamma": float(self.gamma), "gae_lambda": float(self.gae_lambda),
                   "normalize_actions": bool(self.normalize_actions)}
        atomic_write(Path(path), lambda tmp: torch.save(payload, tmp))

    def new_tasks(self, n: int, *, seed: int) -> list[dict[str, float]]:
        """``n`` tasks of the environment, drawn with a seed derived from ``seed``."""
        return self.sampler.sample_tasks(n, seed=int(np.random.default_rng([seed, 104729]).integers(2**31)))

    def adapt(self, tasks: list[dict[str, float]], *, episodes: int = 10, adapt_steps: int | None = None,
              seed: int = 0) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
        """Per-task mean returns ``(steps + 1, len(tasks))`` before and after each adaptation step, and
        the adapted policies."""
        from bilevel_ray.rl.problem import adapt_policies

        steps = self.adapt_steps if adapt_steps is None else adapt_steps
        if not (isinstance(steps, int) and steps >= 0):
            raise ValueError(f"adapt_steps: must be an integer >= 0, got {steps!r}")
        return adapt_policies(self.sampler, self.params, tasks, steps=steps, lr=self.adapt_lr, episodes=episodes,
                              gamma=self.gamma, lam=self.gae_lambda, seed=(seed, 3))

    def evaluate(self, *, tasks: int = 100, episodes: int = 10, adapt_steps: int | None = None, seed: int = 0
                 ) -> torch.Tensor:
        """Per-task mean returns ``(steps + 1, tasks)`` on ``tasks`` new tasks, before and after each
        adaptation step."""
        for name, val, low in (("tasks", tasks, 2), ("episodes", episodes, 1)):
            if isinstance(val, bool) or not (isinstance(val, int) and val >= low):
                raise ValueError(f"{name}: must be an integer >= {low}, got {val!r}")
        return self.adapt(self.new_tasks(tasks, seed=seed), episodes=episodes, adapt_steps=adapt_steps, seed=seed)[0]


def is_meta_policy(payload: Any) -> bool:
    """Whether ``payload`` is a loaded meta-policy checkpoint (its ``format`` is ``FORMAT``)."""
    return isinstance(payload, dict) and payload.get("format") == FORMAT


def load_meta_policy(path: str | Path) -> MetaPolicy:
    """Load a meta-policy saved by :meth:`MetaPolicy.save` (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: {path} does not exist")
    payload = torch.load(path, weights_only=True, map_location="cpu")
    if not is_meta_policy(payload):
        raise ValueError(f"checkpoint: {path} is not a meta-policy (format {FORMAT})")
    return from_payload(payload)


def from_payload(payload: dict[str, Any]) -> MetaPolicy:
    """The meta-policy of an already loaded checkpoint (see :func:`is_meta_policy`)."""
    fields = {k: payload[k] for k in ("env", "horizon", "params", "adapt_steps", "gamma", "gae_lambda")}
    # checkpoints written before the maml form stored the proximal weight λ; their step was 1/λ
    lr = payload["adapt_lr"] if "adapt_lr" in payload else 1.0 / payload["reg"]
    # and policies that acted in the environment's own units
    normalize = bool(payload.get("normalize_actions", False))
    return MetaPolicy(hidden=tuple(payload["hidden"]), adapt_lr=float(lr), normalize_actions=normalize, **fields)
