"""Bilevel problems and task families, installed as ``bilevel_ray.tasks``.

A task is a frozen, validated parameter dataclass (:class:`Task`) that *is* a
:class:`~bilevel_ray.problem.BilevelProblem`: construction builds its data (never downloading), and
``metrics(x, y)`` reports what the runner logs. Register your own with :func:`register_task`.
"""

from __future__ import annotations

from typing import ClassVar

from bilevel_ray.params import Params, Registry

__all__ = ["Task", "register_task", "make_task", "available_tasks", "get_task"]

# name -> "module:Class" for the built-in tasks, imported on first use so the core stays light
_BUILTIN = {
    "quadratic": "bilevel_ray.tasks.quadratic:QuadraticTask",
    "logreg_hpo": "bilevel_ray.tasks.logreg:LogRegHPOTask",
    "hypercleaning": "bilevel_ray.tasks.hypercleaning:HyperCleaningTask",
    "nonconvex_pl": "bilevel_ray.tasks.pl:NonconvexPLTask",
    "omniglot": "bilevel_ray.tasks.vision.hyperrep:OmniglotTask",
    "meta_rl": "bilevel_ray.rl.problem:MetaRLTask",
}


class Task(Params):
    """Base of every registered task. Subclasses are frozen dataclasses whose fields are validated,
    build ``inner``/``outer`` samplers in ``__post_init__``, and implement ``f``, ``g``, ``init`` and
    ``metrics``."""

    section: ClassVar[str] = "task"
    name: ClassVar[str] = ""
    #: column of the samplers' data tuples holding class labels (label-skewed splits), if any
    label_column: ClassVar[int | None] = None

    def metrics(self, x, y) -> dict[str, float]:  # pragma: no cover - interface
        """Full-batch metrics of the current iterate (at least ``outer_objective``)."""
        raise NotImplementedError


REGISTRY = Registry("task", "task", lazy=_BUILTIN)
register_task = REGISTRY.register
available_tasks = REGISTRY.available
get_task = REGISTRY.get


def make_task(name: str, **params) -> Task:
    """Build a registered task from config keys (one-line error on a bad or unknown key)."""
    return get_task(name).create(**params)
