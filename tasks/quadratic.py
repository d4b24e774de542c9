"""Stochastic quadratic bilevel problem with closed-form solution (the SOBA/SABA authors' benchmark).

Per sample ``ℓ_i(x, y) = ½ yᵀP_i y + ½ xᵀQ_i x + xᵀR_i y + a_iᵀy + b_iᵀx`` with rank-one
``P_i = p_i p_iᵀ``, ``Q_i = q_i q_iᵀ``, ``R_i = r_i s_iᵀ``; ``g`` averages ``n_inner`` samples and ``f``
``n_outer`` independent ones. The mean ``P`` has spectrum ≈ ``[mu, L_yy]`` (the inner condition number
is ``L_yy / mu``), ``Q`` ≈ ``[q_min, L_xx]`` and ``R`` singular values ``[mu, L_c]``. Factors are stored
instead of dense matrices, so a minibatch costs O(batch · dim) instead of O(batch · dim²).
``y*(x)``, ``∇h(x)`` and ``x*`` are exact (full-batch means).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from bilevel_ray.params import hp
from bilevel_ray.problem import ORDERS, FiniteSampler
from bilevel_ray.tasks import Task, register_task

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _orthogonal(rng: np.random.Generator, d: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def _reflection(rng: np.random.Generator, d: int) -> np.ndarray:
    """The Householder reflection taking ``e_1`` to (minus the sign of) a random Gaussian direction: the
    left singular vectors of one Gaussian column, as benchmark_bilevel's generator takes its bases (all
    columns but the first stay close to the coordinate axes)."""
    v = rng.standard_normal(d)
    w = v.copy()
    w[0] += np.copysign(np.linalg.norm(v), v[0])
    return np.eye(d) - 2.0 * np.outer(w, w) / (w @ w)


def _geom(lo: float, hi: float, k: int) -> np.ndarray:
    return np.geomspace(lo, hi, k) if k > 1 else np.array([hi])[:k]


def _family(rng: np.random.Generator, n: int, dx: int, dy: int, mu: float, l_yy: float, l_xx: float,
            q_min: float, l_c: float, basis: str = "haar") -> dict[str, np.ndarray]:
    s_p = _geom(np.sqrt(mu), np.sqrt(l_yy), dy)
    s_q = np.concatenate([[np.sqrt(q_min)], _geom(np.sqrt(mu), np.sqrt(l_xx), dx - 1)])
    eigenbasis = _orthogonal if basis == "haar" else _reflection
    up, uq = eigenbasis(rng, dy), eigenbasis(rng, dx)
    sp = (up * s_p) @ up.T
    sq = (uq * s_q) @ uq.T
    u, w = _orthogonal(rng, dx), _orthogonal(rng, dy)
    d = np.zeros((dx, dy))
    k = min(dx, dy)
    d[np.arange(k), np.arange(k)] = _geom(mu, l_c, k)
    wr = rng.standard_normal((n, dy))
    return {
        "p": rng.standard_normal((n, dy)) @ sp.T,
        "q": rng.standard_normal((n, dx)) @ sq.T,
        "r": wr @ (u @ d).T,
        "s": wr @ w,
        "a": rng.standard_normal((n, dy)),
        "b": rng.standard_normal((n, dx)),
    }


def _loss(x: torch.Tensor, y: torch.Tensor, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    p, q, r, s, a, b = batch
    return (0.5 * (p @ y) ** 2 + 0.5 * (q @ x) ** 2 + (r @ x) * (s @ y) + a @ y + b @ x).mean()


class _Means:
    """Mean matrices of one family: ``ℓ = ½yᵀPy + ½xᵀQx + xᵀRy + aᵀy + bᵀx``."""

    def __init__(self, data: tuple[torch.Tensor, ...]):
        p, q, r, s, a, b = data
        n = p.shape[0]
        self.P, self.Q, self.R = p.T @ p / n, q.T @ q / n, r.T @ s / n
        self.a, self.b = a.mean(0), b.mean(0)


@register_task("quadratic")
@dataclass(frozen=True)
class QuadraticTask(Task):
    """Stochastic quadratic bilevel problem with closed-form ``y*``, ``∇h`` and ``x*`` (see the module docstring)."""

    dim_x: int = hp(10, low=1, strict=False, doc="dimension of x")
    dim_y: int = hp(20, low=1, strict=False, doc="dimension of y")
    n_inner: int = hp(1024, low=1, strict=False, doc="samples in g")
    n_outer: int = hp(1024, low=1, strict=False, doc="samples in f")
    batch_size: int | None = hp(64, low=1, strict=False, doc="minibatch rows (null: full batch)")
    mu: float = hp(0.1, low=0, doc="smallest eigenvalue of ∇²_yy g (strong convexity)")
    L_yy: float = hp(1.0, low=0, doc="largest eigenvalue of ∇²_yy g")
    L_xx: float = hp(1.0, low=0, doc="largest eigenvalue of ∇²_xx")
    q_min: float = hp(0.1, low=0, strict=False, doc="smallest eigenvalue of ∇²_xx (0 in the reference P1/P2)")
    L_c: float = hp(0.1, low=0, doc="largest singular value of ∇²_xy")
    x0: float = hp(-2.0, doc="initial x (every coordinate)")
    basis: str = hp("haar", choices=("haar", "reference"), doc="eigenbases of P and Q: uniformly random "
                    "(haar) or, as benchmark_bilevel's generator takes them, the reflection of e_1 onto one "
                    "Gaussian direction (reference: close to the axes, the reference P1/P2 family)")
    sampling: str = hp("random", choices=ORDERS, doc="minibatch order: random (uniform, with replacement) or "
                       "epochs (shuffled passes, every minibatch once per pass)")
    dtype: str = hp("float64", choices=tuple(_DTYPES))
    seed: int = hp(0, low=0, strict=False, doc="seed of the data")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.L_yy < self.mu:
            raise ValueError(f"task.L_yy: must be >= task.mu ({self.mu}), got {self.L_yy}")
        rng = np.random.default_rng(self.seed)
        dt = _DTYPES[self.dtype]
        tensors = []
        for n in (self.n_inner, self.n_outer):
            fam = _family(rng, n, self.dim_x, self.dim_y, self.mu, self.L_yy, self.L_xx, self.q_min, self.L_c,
                          self.basis)
            tensors.append(tuple(torch.as_tensor(fam[k], dtype=dt) for k in "pqrsab"))
        object.__setattr__(self, "inner", FiniteSampler(tensors[0], self.batch_size, shuffle_seed=None,
                                                        order=self.sampling))
        object.__setattr__(self, "outer", FiniteSampler(tensors[1], self.batch_size, shuffle_seed=None,
                                                        order=self.sampling))
        object.__setattr__(self, "_g", _Means(tuple(t.double() for t in tensors[0])))
        object.__setattr__(self, "_f", _Means(tuple(t.double() for t in tensors[1])))

    # -- the problem ------------------------------------------------------------------------
    def f(self, x: torch.Tensor, y: torch.Tensor, batch: Any) -> torch.Tensor:
        """Upper objective: mean quadratic loss of the outer samples in ``batch``."""
        return _loss(x, y, batch)

    def g(self, x: torch.Tensor, y: torch.Tensor, batch: Any) -> torch.Tensor:
        """Lower objective: mean quadratic loss of the inner samples in ``batch``."""
        return _loss(x, y, batch)

    def init(self, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Every coordinate of ``x`` at ``x0``, ``y = 0``."""
        dt = _DTYPES[self.dtype]
        return torch.full((self.dim_x,), self.x0, dtype=dt), torch.zeros(self.dim_y, dtype=dt)

    # -- closed forms (float64) ---------------------------------------------------------------
    def y_star(self, x: torch.Tensor) -> torch.Tensor:
        """Exact lower-level solution ``y*(x) = −P⁻¹(Rᵀx + a)`` of the full-batch ``g``."""
        g = self._g
        return -torch.linalg.solve(g.P, g.R.T @ x.double() + g.a)

    def hypergradient(self, x: torch.Tensor) -> torch.Tensor:
        """Exact ``∇h(x) = ∇_x f − ∇²_xy g [∇²_yy g]^{-1} ∇_y f`` at ``y*(x)``."""
        g, f = self._g, self._f
        x = x.double()
        y = self.y_star(x)
        fy = f.P @ y + f.R.T @ x + f.a
        fx = f.Q @ x + f.R @ y + f.b
        return fx - g.R @ torch.linalg.solve(g.P, fy)

    def value(self, x: torch.Tensor) -> torch.Tensor:
        """Exact ``h(x) = f(x, y*(x))`` (full-batch means)."""
        x = x.double()
        y = self.y_star(x)
        f = self._f
        return 0.5 * y @ f.P @ y + 0.5 * x @ f.Q @ x + x @ f.R @ y + f.a @ y + f.b @ x

    def hessian_h(self) -> torch.Tensor:
        """The (constant) Hessian of ``h``."""
        g, f = self._g, self._f
        a = -torch.linalg.solve(g.P, g.R.T)
        return a.T @ f.P @ a + f.Q + f.R @ a + a.T @ f.R.T

    @property
    def x_star(self) -> torch.Tensor:
        """The unique minimizer of ``h``; ``ValueError`` if ``h`` is not strongly convex."""
        hess = self.hessian_h()
        if torch.linalg.eigvalsh(hess).min() <= 0:
            raise ValueError("task: h is not strongly convex for these parameters, x* is not unique")
        return -torch.linalg.solve(hess, self.hypergradient(torch.zeros(self.dim_x, dtype=torch.float64, device=hess.device)))

    def metrics(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """Full-batch ``f``, exact ``h(x)`` and ``‖∇h(x)‖²``, ``‖y − y*(x)‖`` and, where ``x*`` is unique, the
        relative error of ``x``."""
        hg = self.hypergradient(x)
        out = {
            "outer_objective": float(self.f(x, y, self.outer.full())),
            "value": float(self.value(x)),
            "grad_norm_sq": float(hg @ hg),
            "inner_error": float(torch.linalg.vector_norm(y.double() - self.y_star(x))),
        }
        try:
            xs = self._x_star_cached()
            out["rel_error"] = float(torch.linalg.vector_norm(x.double() - xs) / torch.linalg.vector_norm(xs))
        except ValueError:
            pass
        return out

    def _x_star_cached(self) -> torch.Tensor:
        if "_xs" not in self.__dict__:
            try:
                object.__setattr__(self, "_xs", self.x_star)
            except ValueError as e:
                object.__setattr__(self, "_xs", e)
        if isinstance(self._xs, ValueError):
            raise self._xs
        return self._xs
