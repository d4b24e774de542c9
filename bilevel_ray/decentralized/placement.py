"""How every backend starts an agent: the problem on its device, wrapped for ``run.dtype``, and the
algorithm's initial state at the problem's own initial iterate."""

from __future__ import annotations

from typing import Any

import torch

from bilevel_ray.device import to_device
from bilevel_ray.precision import mixed_precision
from bilevel_ray.problem import bind_at

__all__ = ["start"]


def start(algo: Any, problem: Any, *, seed: int, rank: int | tuple[int, ...], device: torch.device,
          dtype: str) -> tuple[Any, Any]:
    """``(view, state)``: ``view`` is ``problem`` (already on ``device``) as the steps see it (under
    :func:`~bilevel_ray.precision.mixed_precision` for ``dtype``), ``state`` is ``algo.init`` at
    ``problem.init(seed=seed)`` moved to ``device``."""
    view = mixed_precision(problem, dtype, device)
    x, y = to_device(view.init(seed=seed), device)
    return view, algo.init(bind_at(view, x, y, rank=rank), x, y, seed=seed, rank=rank)
