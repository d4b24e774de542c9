"""The surrogate hypergradient of the MGBiO family (Huang 2023), for a lower level that is only PL.

``∇̄f(x, y) = ∇_x f − ∇²_xy g · P_μ[∇²_yy g]^{-1} ∇_y f``, ``P_μ`` projecting the Hessian's eigenvalues
onto ``[μ, ∞)``: a dense eigendecomposition when ``dim y ≤ dense_max_dim``, otherwise the matrix-free
Lanczos approximation of :func:`bilevel_ray.linalg.projected_solve_lanczos` with ``krylov_dim`` steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from bilevel_ray import linalg, oracles, tree
from bilevel_ray.params import hp
from bilevel_ray.algorithms.base import Calls, Hyperparams, Mix
from bilevel_ray.problem import Batch, BilevelProblem, rng_for
from bilevel_ray.tree import PyTree


def surrogate_hypergradient(problem: BilevelProblem, x: PyTree, y: PyTree, bi: Batch, bo: Batch, *,
                            mu: float, solver: str, dense_max_dim: int, krylov_dim: int
                            ) -> tuple[PyTree, dict[str, int]]:
    """``(∇̄f(x, y), oracle calls)`` with ``g`` on ``bi`` and ``f`` on ``bo``."""
    fx, fy = oracles.grad_xy(problem.f, x, y, bo)
    b = tree.flatten(fy)
    dense = solver == "dense" or (solver == "auto" and b.numel() <= dense_max_dim)
    if dense:
        z = linalg.projected_solve_dense(oracles.hessian_yy(problem.g, x, y, bi), b, mu)
        hvps = b.numel()
    else:
        op = tree.as_flat_fn(lambda u: oracles.hvp(problem.g, x, y, u, bi), y)
        z = linalg.projected_solve_lanczos(op, b, mu, krylov_dim)
        hvps = min(krylov_dim, b.numel())
    jz = oracles.cross(problem.g, x, y, tree.unflatten_like(z, y), bi)
    return tree.sub(fx, jz), {"grad_f": 1, "hvp": hvps, "jvp": 1}


@dataclass(frozen=True)
class PLHyperparams(Hyperparams):
    """Hyperparameters shared by MGBiO, MSGBiO and VR-MSGBiO."""

    inner_lr: float = hp(0.1, low=0, doc="λ, step of y")
    outer_lr: float = hp(0.1, low=0, doc="γ, step of x")
    eta: float = hp(1.0, low=0, high=1, strict=False, doc="η_0, averaging weight of the outer step")
    mu: float = hp(0.01, low=0, doc="μ, eigenvalue floor of the Hessian projection")
    solver: str = hp("auto", choices=("auto", "dense", "lanczos"), doc="how P_μ[H]^{-1} is applied")
    dense_max_dim: int = hp(2000, low=1, strict=False, doc="auto: dense up to this dim y")
    krylov_dim: int = hp(30, low=1, strict=False, doc="Lanczos steps of the matrix-free solver")

    def hypergradient(self, problem: BilevelProblem, x: PyTree, y: PyTree, bi: Batch, bo: Batch):
        return surrogate_hypergradient(problem, x, y, bi, bo, mu=self.mu, solver=self.solver,
                                       dense_max_dim=self.dense_max_dim, krylov_dim=self.krylov_dim)


class MomentumState(NamedTuple):
    """State of MSGBiO and VR-MSGBiO: ``u`` estimates ``∇_y g``, ``w`` the hypergradient."""

    x: PyTree
    y: PyTree
    u: PyTree
    w: PyTree
    t: int
    seed: int
    rank: int
    calls: Calls


def init_momentum(algo: PLHyperparams, problem: BilevelProblem, x: PyTree, y: PyTree, seed: int,
                  rank: int) -> MomentumState:
    """Both estimators at ``(x_0, y_0)`` on one minibatch pair (stream 1 of step 0)."""
    x, y = tree.detach(x), tree.detach(y)
    rng = rng_for(seed, rank, 0, stream=1)
    _, bi = problem.inner.sample(rng)
    _, bo = problem.outer.sample(rng)
    w, calls = algo.hypergradient(problem, x, y, bi, bo)
    u = oracles.grad_y(problem.g, x, y, bi)
    return MomentumState(x, y, u, w, 0, seed, rank, Calls().add(grad_g=1, **calls))


def averaged_move(s: MomentumState, algo: PLHyperparams, eta_t: float, mix: Mix) -> tuple[PyTree, PyTree]:
    """``ỹ = y − λu``, ``x̃ = x − γw``; ``(y, x) ← (y, x) + η_t((ỹ, x̃) − (y, x))`` after gossip."""
    y = tree.axpy(-eta_t * algo.inner_lr, s.u, mix(s.y))
    x = tree.axpy(-eta_t * algo.outer_lr, s.w, mix(s.x))
    return tree.detach(x), tree.detach(y)
