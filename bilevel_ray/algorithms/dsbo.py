"""DSBO and MA-DSBO-GT: decentralized stochastic bilevel optimization (Chen, Huang, Ma,
Balasubramanian, ICML 2023), and D-SOBA, its single-loop case (Kong et al. 2024).

Agent ``i`` (its own ``f_i``, ``g_i``; ``mix`` = ``Σ_j w_ij (·)_j``), outer step ``k``:
``T`` lower steps ``y ← mix(y) − β∇_y g_i(x, y)``; ``N`` linear-system steps
``z ← mix(z) − γ(∇²_yy g_i·z − ∇_y f_i)``; local hypergradient ``u = ∇_x f_i − ∇²_xy g_i·z``; moving
average ``r ← (1 − τ)r + τu``; ``x ← mix(x) − α r``. With gradient tracking, ``s ← mix(s) + r_new − r_old``
and ``x`` moves along ``s``. Only HVPs and JVPs. With one agent (``mix`` the identity) DSBO is a
centralized double-loop method with warm starts.

``lower_level: local`` solves the personalized problem ``min_x (1/n)Σ f_i(x, y_i*(x))``,
``y_i*(x) = argmin g_i(x, ·)`` (e.g. Lu et al., ICASSP 2022): ``y`` and ``z`` stay with their agent
(no ``mix``); only ``x`` (and ``s``) are gossiped. It is the form for per-task lower levels such as
few-shot heads, whose coordinates mean different classes at each agent. ``outer_opt: adam``
preconditions the outer direction with Adam, per agent; ``schedule: cosine`` anneals ``α``;
``max_kl`` bounds the outer step in a trust region (:mod:`._adaptive`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from bilevel_ray import oracles, tree
from bilevel_ray.algorithms._adaptive import AdaptiveOuter, Moments
from bilevel_ray.algorithms.base import Calls, Mix, identity_mix, register
from bilevel_ray.params import hp
from bilevel_ray.problem import BilevelProblem, rng_for
from bilevel_ray.tree import PyTree


class DSBOState(NamedTuple):
    """State of DSBO: lower iterate ``y``, linear-system iterate ``z``, hypergradient average ``r``."""

    x: PyTree
    y: PyTree
    z: PyTree
    r: PyTree  # moving average of the local hypergradient
    s: PyTree  # gradient tracker of r (equal to r without tracking)
    t: int
    seed: int
    rank: int
    calls: Calls
    moments: Moments | tuple = ()  # the outer step rule's (Adam's) state


@register("dsbo")
@dataclass(frozen=True)
class DSBO(AdaptiveOuter):
    """DSBO (Chen et al., ICML 2023): decentralized double-loop steps with a moving-average hypergradient."""

    outer_lr: float = hp(0.01, low=0, doc="α, step of x")
    inner_lr: float = hp(0.1, low=0, doc="β, step of the T lower steps")
    linear_lr: float = hp(0.1, low=0, doc="γ, step of the N linear-system steps")
    inner_steps: int = hp(5, low=1, strict=False, doc="T")
    linear_steps: int = hp(5, low=1, strict=False, doc="N")
    tau: float = hp(0.5, low=0, high=1, strict=False, doc="τ, weight of the new hypergradient in r")
    lower_level: str = hp("shared", choices=("shared", "local"),
                          doc="shared: y* = argmin (1/n)Σg_i, y and z gossiped (the paper's); local: each "
                              "agent's own y_i* = argmin g_i, y and z not mixed")

    tracking = False

    def init(self, problem: BilevelProblem, x: PyTree, y: PyTree, *, seed: int = 0, rank: int = 0) -> DSBOState:
        """Initial state at ``(x, y)`` with ``z``, ``r`` and ``s`` zero."""
        self.check_trust_region(problem)
        x, y = tree.detach(x), tree.detach(y)
        zx = tree.zeros_like(x)
        return DSBOState(x, y, tree.zeros_like(y), zx, zx, 0, seed, rank, Calls(), self.init_moments(x))

    def step(self, s: DSBOState, problem: BilevelProblem, mix: Mix = identity_mix) -> DSBOState:
        """One outer step of agent ``s.rank`` (see the module docstring)."""
        rng = rng_for(s.seed, s.rank, s.t)
        x, y, z = s.x, s.y, s.z
        mix_yz = mix if self.lower_level == "shared" else identity_mix
        for _ in range(self.inner_steps):
            _, bi = problem.inner.sample(rng)
            y = tree.axpy(-self.inner_lr, oracles.grad_y(problem.g, x, y, bi), mix_yz(y))
        _, bo = problem.outer.sample(rng)
        fx, fy = oracles.grad_xy(problem.f, x, y, bo)
        for _ in range(self.linear_steps):
            _, bi = problem.inner.sample(rng)
            residual = tree.sub(oracles.hvp(problem.g, x, y, z, bi), fy)
            z = tree.axpy(-self.linear_lr, residual, mix_yz(z))
        _, bi = problem.inner.sample(rng)
        u = tree.sub(fx, oracles.cross(problem.g, x, y, z, bi))
        r = tree.lerp(s.r, u, self.tau)
        direction = tree.add(mix(s.s), tree.sub(r, s.r)) if self.tracking else r
        dx, moments = self.precondition(direction, s.moments, s.t)
        x = self.outer_update(mix(x), dx, self.outer_step_size(s.t), problem, bi)
        calls = s.calls.add(grad_f=1, grad_g=self.inner_steps, hvp=self.linear_steps, jvp=1)
        return DSBOState(*tree.detach((x, y, z, r, direction)), s.t + 1, s.seed, s.rank, calls,
                         tree.detach(moments))


@register("dsbo_gt")
@dataclass(frozen=True)
class DSBOGT(DSBO):
    """MA-DSBO-GT: DSBO whose outer direction tracks the network average of ``r``."""

    tracking = True


@register("d_soba")
@dataclass(frozen=True)
class DSOBA(DSBO):
    """D-SOBA: one lower step and one linear-system step per outer step."""

    inner_steps: int = hp(1, low=1, high=1, strict=False, doc="T (fixed to 1)")
    linear_steps: int = hp(1, low=1, high=1, strict=False, doc="N (fixed to 1)")
