"""Inner loop shared by the double-loop baselines (stocBiO, AID-CG, ITD)."""

from __future__ import annotations

import numpy as np

from bilevel_ray import oracles, tree
from bilevel_ray.algorithms.base import Mix
from bilevel_ray.problem import BilevelProblem
from bilevel_ray.tree import PyTree


def inner_sgd(problem: BilevelProblem, x: PyTree, y: PyTree, lr: float, steps: int,
              rng: np.random.Generator, mix: Mix) -> PyTree:
    """``steps`` warm-started steps ``y ← mix(y) − lr ∇_y g_i(x, y)``, a fresh minibatch each."""
    for _ in range(steps):
        _, bi = problem.inner.sample(rng)
        y = tree.axpy(-lr, oracles.grad_y(problem.g, x, y, bi), mix(y))
    return tree.detach(y)
