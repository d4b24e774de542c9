"""AID-CG: approximate implicit differentiation with conjugate gradient (Pedregosa, ICML 2016;
Grazzi et al., ICML 2020).

``T`` warm-started SGD steps on ``y``; ``K`` CG steps on ``∇²_yy g_i·v = ∇_y f_j`` warm-started from the
previous ``v``; hypergradient ``∇_x f − ∇²_xy g·v``; ``x ← x − α·hypergradient``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from bilevel_ray import linalg, oracles, tree
from bilevel_ray.algorithms._inner import inner_sgd
from bilevel_ray.params import hp
from bilevel_ray.algorithms.base import Calls, Hyperparams, Mix, identity_mix, register
from bilevel_ray.problem import BilevelProblem, capability, rng_for
from bilevel_ray.tree import PyTree


class AIDState(NamedTuple):
    """State of AID-CG: ``v`` is the last CG solution, the warm start of the next."""

    x: PyTree
    y: PyTree
    v: PyTree
    t: int
    seed: int
    rank: int
    calls: Calls


@register("aid_cg")
@dataclass(frozen=True)
class AIDCG(Hyperparams):
    """AID-CG (Pedregosa 2016; Grazzi et al. 2020): inner SGD, CG on the linear system, one outer step."""

    outer_lr: float = hp(0.01, low=0, doc="α, step of x")
    inner_lr: float = hp(0.1, low=0, doc="step of the inner SGD")
    inner_steps: int = hp(10, low=1, strict=False, doc="T")
    cg_steps: int = hp(10, low=1, strict=False, doc="K, conjugate-gradient iterations")

    def init(self, problem: BilevelProblem, x: PyTree, y: PyTree, *, seed: int = 0, rank: int = 0) -> AIDState:
        """Initial state at ``(x, y)`` with ``v = 0``."""
        return AIDState(tree.detach(x), tree.detach(y), tree.zeros_like(y), 0, seed, rank, Calls())

    def step(self, s: AIDState, problem: BilevelProblem, mix: Mix = identity_mix) -> AIDState:
        """One AID-CG step (see the module docstring)."""
        rng = rng_for(s.seed, s.rank, s.t)
        y = inner_sgd(problem, s.x, s.y, self.inner_lr, self.inner_steps, rng, mix)
        _, bi = problem.inner.sample(rng)
        _, bo = problem.outer.sample(rng)
        fx, fy = oracles.grad_xy(problem.f, s.x, y, bo)
        nb = int(capability(problem, "stacked"))  # simulated agents: one CG per agent
        op = tree.as_flat_fn(lambda u: oracles.hvp(problem.g, s.x, y, u, bi), y, nb)
        v = tree.unflatten_like(linalg.cg(op, tree.flatten(fy, nb), tree.flatten(mix(s.v), nb), self.cg_steps), y, nb)
        hg = tree.sub(fx, oracles.cross(problem.g, s.x, y, v, bi))
        x = tree.axpy(-self.outer_lr, hg, mix(s.x))
        calls = s.calls.add(grad_f=1, grad_g=self.inner_steps, hvp=self.cg_steps + 1, jvp=1)
        return AIDState(tree.detach(x), y, tree.detach(v), s.t + 1, s.seed, s.rank, calls)
