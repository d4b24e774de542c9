"""stocBiO: double-loop stochastic bilevel with a Neumann-series inverse (Ji, Yang, Liang, ICML 2021).

``T`` warm-started SGD steps on ``y``; ``v = η Σ_{q<Q} (I − η∇²_yy g)^q ∇_y f``; hypergradient
``∇_x f − ∇²_xy g·v``; ``x ← x − α·hypergradient``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from bilevel_ray import oracles, tree
from bilevel_ray.algorithms._inner import inner_sgd
from bilevel_ray.params import hp
from bilevel_ray.algorithms.base import Calls, Hyperparams, Mix, identity_mix, register
from bilevel_ray.problem import BilevelProblem, rng_for
from bilevel_ray.tree import PyTree


class StocBiOState(NamedTuple):
    """State of stocBiO: ``y`` warm-starts the next inner loop."""

    x: PyTree
    y: PyTree
    t: int
    seed: int
    rank: int
    calls: Calls


@register("stocbio")
@dataclass(frozen=True)
class StocBiO(Hyperparams):
    """stocBiO (Ji, Yang, Liang, ICML 2021): inner SGD and a Neumann-series hypergradient."""

    outer_lr: float = hp(0.01, low=0, doc="α, step of x")
    inner_lr: float = hp(0.1, low=0, doc="step of the inner SGD")
    inner_steps: int = hp(10, low=1, strict=False, doc="T")
    neumann_steps: int = hp(10, low=1, strict=False, doc="Q, terms of the Neumann series")
    neumann_lr: float = hp(0.1, low=0, doc="η, scaling of the Neumann series (< 1/L)")

    def init(self, problem: BilevelProblem, x: PyTree, y: PyTree, *, seed: int = 0, rank: int = 0) -> StocBiOState:
        """Initial state at ``(x, y)``."""
        return StocBiOState(tree.detach(x), tree.detach(y), 0, seed, rank, Calls())

    def step(self, s: StocBiOState, problem: BilevelProblem, mix: Mix = identity_mix) -> StocBiOState:
        """One stocBiO step (see the module docstring)."""
        rng = rng_for(s.seed, s.rank, s.t)
        y = inner_sgd(problem, s.x, s.y, self.inner_lr, self.inner_steps, rng, mix)
        _, bi = problem.inner.sample(rng)
        _, bo = problem.outer.sample(rng)
        fx, fy = oracles.grad_xy(problem.f, s.x, y, bo)
        p = v = fy
        for _ in range(self.neumann_steps - 1):
            p = tree.axpy(-self.neumann_lr, oracles.hvp(problem.g, s.x, y, p, bi), p)
            v = tree.add(v, p)
        v = tree.scale(v, self.neumann_lr)
        hg = tree.sub(fx, oracles.cross(problem.g, s.x, y, v, bi))
        x = tree.axpy(-self.outer_lr, hg, mix(s.x))
        calls = s.calls.add(grad_f=1, grad_g=self.inner_steps, hvp=self.neumann_steps - 1, jvp=1)
        return StocBiOState(tree.detach(x), y, s.t + 1, s.seed, s.rank, calls)
