"""ITD: iterative differentiation through ``T`` unrolled inner steps (Maclaurin et al. 2015; Franceschi
et al. 2017; the "unrolled" hypergradient of MAML).

``y_T(x)`` is ``T`` steps ``y ← y − α∇_y g_i(x, y)`` from the (detached) current ``y``, a fresh minibatch
each; the hypergradient is the exact gradient of ``f_j(x, y_T(x))`` by reverse mode through the unroll;
``x ← x − β·hypergradient`` and ``y ← y_T`` (warm start) or ``y_0`` (cold start).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from torch.func import grad

from bilevel_ray import oracles, tree
from bilevel_ray.params import hp
from bilevel_ray.algorithms.base import Calls, Hyperparams, Mix, identity_mix, register
from bilevel_ray.problem import BilevelProblem, rng_for
from bilevel_ray.tree import PyTree


class ITDState(NamedTuple):
    """State of ITD: ``y`` is the last unroll's end, ``y0`` the initial ``y`` (for cold starts)."""

    x: PyTree
    y: PyTree
    y0: PyTree
    t: int
    seed: int
    rank: int
    calls: Calls


@register("itd")
@dataclass(frozen=True)
class ITD(Hyperparams):
    """ITD (Maclaurin et al. 2015; Franceschi et al. 2017): exact hypergradient through ``T`` unrolled steps."""

    outer_lr: float = hp(0.01, low=0, doc="β, step of x")
    inner_lr: float = hp(0.1, low=0, doc="α, step of the unrolled inner loop")
    inner_steps: int = hp(10, low=1, strict=False, doc="T, unrolled steps")
    warm_start: bool = hp(True, doc="start each unroll from the last y_T (else from y_0)")

    def init(self, problem: BilevelProblem, x: PyTree, y: PyTree, *, seed: int = 0, rank: int = 0) -> ITDState:
        """Initial state at ``(x, y)``, keeping ``y`` as ``y0``."""
        y = tree.detach(y)
        return ITDState(tree.detach(x), y, y, 0, seed, rank, Calls())

    def step(self, s: ITDState, problem: BilevelProblem, mix: Mix = identity_mix) -> ITDState:
        """One ITD step (see the module docstring)."""
        rng = rng_for(s.seed, s.rank, s.t)
        batches = [problem.inner.sample(rng)[1] for _ in range(self.inner_steps)]
        _, bo = problem.outer.sample(rng)
        start = mix(s.y if self.warm_start else s.y0)

        def outer_loss(x: PyTree):
            y = start
            for bi in batches:
                y = tree.axpy(-self.inner_lr, oracles.grad_y(problem.g, x, y, bi), y)
            return problem.f(x, y, bo), y

        hg, y = grad(outer_loss, has_aux=True)(s.x)
        x = tree.axpy(-self.outer_lr, hg, mix(s.x))
        calls = s.calls.add(grad_f=1, grad_g=self.inner_steps, hvp=self.inner_steps, jvp=self.inner_steps)
        return ITDState(tree.detach(x), tree.detach(y), s.y0, s.t + 1, s.seed, s.rank, calls)
