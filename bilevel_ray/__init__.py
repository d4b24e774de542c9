"""bilevel-ray: stochastic bilevel optimization for meta-learning, from one process to a Ray cluster.

Public names load lazily so that ``import bilevel_ray`` (and the CLI's ``--help``) stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "BilevelProblem": "bilevel_ray.problem",
    "FiniteSampler": "bilevel_ray.problem",
    "Sampler": "bilevel_ray.problem",
    "check_problem": "bilevel_ray.problem",
    "flush_denormals": "bilevel_ray.denormals",
    "algorithms": "bilevel_ray.algorithms",
    "oracles": "bilevel_ray.oracles",
    "tasks": "bilevel_ray.tasks",
    "tree": "bilevel_ray.tree",
    "keep_heap": "bilevel_ray.allocator",
    "prepare_process": "bilevel_ray.runtime",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'bilevel_ray' has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name])
    value = module if module.__name__.endswith("." + name) else getattr(module, name)
    globals()[name] = value
    return value
