"""BOME: bilevel optimization made easy (Liu, Ye, Wright, Stone, Liu, NeurIPS 2022).

First order: from the current ``y``, ``T`` gradient steps on ``g(x, ·)`` give ``θ_T`` (a constant); the
value-function gap ``q(x, y) = g(x, y) − g(x, θ_T)`` is pushed down by a dynamic barrier
``λ = max(φ − <∇f, ∇q>, 0)/‖∇q‖²`` and ``(x, y) ← (x, y) − ξ(∇f + λ∇q)``. No HVP or JVP, so it works
when the lower level is not strongly convex. ``outer_opt: adam`` preconditions the joint direction
``(∇f + λ∇q)`` with Adam; ``schedule: cosine`` anneals ``ξ``; ``max_kl`` bounds ``x``'s step in a trust
region (:mod:`._adaptive`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from bilevel_ray import oracles, tree
from bilevel_ray.params import hp
from bilevel_ray.algorithms._adaptive import AdaptiveOuter, Moments
from bilevel_ray.algorithms.base import Calls, Mix, identity_mix, register
from bilevel_ray.problem import BilevelProblem, capability, rng_for
from bilevel_ray.tree import PyTree


class BOMEState(NamedTuple):
    """State of BOME: the joint iterate ``(x, y)`` and the outer step rule's moments."""

    x: PyTree
    y: PyTree
    t: int
    seed: int
    rank: int
    calls: Calls
    moments: Moments | tuple = ()  # the outer step rule's (Adam's) state, over (x, y)


@register("bome")
@dataclass(frozen=True)
class BOME(AdaptiveOuter):
    """BOME (Liu et al., NeurIPS 2022): first-order joint steps on ``(x, y)`` with a dynamic barrier."""

    outer_lr: float = hp(0.01, low=0, doc="ξ, joint step of (x, y)")
    inner_lr: float = hp(0.1, low=0, doc="α, step of the T inner steps")
    inner_steps: int = hp(10, low=1, strict=False, doc="T")
    eta: float = hp(0.5, low=0, doc="η, barrier control")
    phi: str = hp("grad_norm", choices=("grad_norm", "value"), doc="φ = η‖∇q‖² or φ = η q")

    def init(self, problem: BilevelProblem, x: PyTree, y: PyTree, *, seed: int = 0, rank: int = 0) -> BOMEState:
        """Initial state at ``(x, y)``; rejects ``max_kl`` on a problem without ``divergence``."""
        self.check_trust_region(problem)
        return BOMEState(tree.detach(x), tree.detach(y), 0, seed, rank, Calls(), self.init_moments((x, y)))

    def step(self, s: BOMEState, problem: BilevelProblem, mix: Mix = identity_mix) -> BOMEState:
        """One BOME step (see the module docstring)."""
        rng = rng_for(s.seed, s.rank, s.t)
        _, bi = problem.inner.sample(rng)
        _, bo = problem.outer.sample(rng)
        theta = s.y
        for _ in range(self.inner_steps):
            theta = tree.axpy(-self.inner_lr, oracles.grad_y(problem.g, s.x, theta, bi), theta)
        (gx, gy), g_val = oracles.value_and_grad_xy(problem.g, s.x, s.y, bi)
        gx_theta, g_theta = oracles.value_and_grad_xy(problem.g, s.x, theta, bi)
        qx, qy = tree.sub(gx, gx_theta[0]), gy
        fx, fy = oracles.grad_xy(problem.f, s.x, s.y, bo)
        nb = int(capability(problem, "stacked"))  # simulated agents: one barrier per agent
        q_sq = tree.sq_norm(qx, nb) + tree.sq_norm(qy, nb)
        phi = self.eta * (q_sq if self.phi == "grad_norm" else g_val - g_theta)
        inner = tree.vdot(fx, qx, nb) + tree.vdot(fy, qy, nb)
        lam = torch.clamp(phi - inner, min=0) / q_sq.clamp_min(torch.finfo(q_sq.dtype).tiny)
        (dx, dy), moments = self.precondition((tree.axpy(lam, qx, fx), tree.axpy(lam, qy, fy)), s.moments, s.t)
        xi = self.outer_step_size(s.t)
        x = self.outer_update(mix(s.x), dx, xi, problem, bi)
        y = tree.axpy(-xi, dy, mix(s.y))
        calls = s.calls.add(grad_f=1, grad_g=self.inner_steps + 2)
        return BOMEState(tree.detach(x), tree.detach(y), s.t + 1, s.seed, s.rank, calls, tree.detach(moments))
