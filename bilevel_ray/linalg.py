"""Matrix-free linear algebra for hypergradients: conjugate gradient and eigenvalue-projected solves.

``P_μ[H]`` replaces every eigenvalue of the symmetric ``H`` below ``μ`` by ``μ`` (Huang 2023).
:func:`projected_solve_dense` forms ``H`` (small ``y`` only); :func:`projected_solve_lanczos` is the
matrix-free approximation: ``k`` Lanczos steps from ``b`` (full reorthogonalization) give
``H ≈ Q T Qᵀ`` on the Krylov space, and ``P_μ[H]^{-1} b ≈ ‖b‖ Q S diag(1/max(θ, μ)) Sᵀ e_1`` with
``T = S diag(θ) Sᵀ``. It is exact once ``k`` reaches the dimension of the Krylov space of ``(H, b)``
(at most ``dim y``); below that, eigenvalues of ``H`` are seen through their Ritz values.
"""

from __future__ import annotations

from typing import Callable

import torch

Op = Callable[[torch.Tensor], torch.Tensor]

__all__ = ["cg", "projected_solve_dense", "projected_solve_lanczos"]


def cg(op: Op, b: torch.Tensor, x0: torch.Tensor, iters: int, tol: float = 0.0) -> torch.Tensor:
    """``iters`` conjugate-gradient steps on ``op(x) = b`` from ``x0`` (``op`` symmetric PD).

    A 2-D ``b`` holds independent systems, one per row (agents of the vectorized simulation, with a
    block-diagonal ``op``): every row runs its own CG and stops on its own."""
    if b.ndim == 2:
        return _cg_rows(op, b, x0, iters, tol)
    x = x0
    r = b - op(x)
    p = r
    rs = torch.dot(r, r)
    for _ in range(iters):
        if rs.sqrt() <= tol:
            break
        ap = op(p)
        denom = torch.dot(p, ap)
        if denom <= 0:
            break
        alpha = rs / denom
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = torch.dot(r, r)
        p = r + (rs_new / rs) * p
        rs = rs_new
    return x


def _cg_rows(op: Op, b: torch.Tensor, x0: torch.Tensor, iters: int, tol: float) -> torch.Tensor:
    """Row-wise :func:`cg`: a row that would stop (small residual, or no positive curvature) freezes."""
    x = x0
    r = b - op(x)
    p = r
    rs = (r * r).sum(1)
    live = torch.ones_like(rs, dtype=torch.bool)
    for _ in range(iters):
        live = live & (rs.sqrt() > tol)
        if not live.any():
            break
        ap = op(p)
        denom = (p * ap).sum(1)
        live = live & (denom > 0)
        alpha = torch.where(live, rs / torch.where(live, denom, 1), 0).unsqueeze(1)
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = (r * r).sum(1)
        beta = torch.where(live, rs_new / torch.where(live, rs, 1), 0).unsqueeze(1)
        p = torch.where(live.unsqueeze(1), r + beta * p, p)
        rs = torch.where(live, rs_new, rs)
    return x


def projected_solve_dense(h: torch.Tensor, b: torch.Tensor, mu: float) -> torch.Tensor:
    """``P_μ[h]^{-1} b`` for a dense symmetric ``h``."""
    evals, evecs = torch.linalg.eigh((h + h.T) / 2)
    return evecs @ ((evecs.T @ b) / evals.clamp_min(mu))


def projected_solve_lanczos(op: Op, b: torch.Tensor, mu: float, k: int) -> torch.Tensor:
    """Matrix-free ``P_μ[H]^{-1} b`` from ``k`` Lanczos steps with ``op(u) = H u``."""
    beta0 = torch.linalg.vector_norm(b)
    if beta0 == 0:
        return torch.zeros_like(b)
    k = min(k, b.numel())
    q = [b / beta0]
    alphas, betas = [], []
    for j in range(k):
        w = op(q[j])
        a = torch.dot(q[j], w)
        alphas.append(a)
        basis = torch.stack(q)
        w = w - basis.T @ (basis @ w)  # full reorthogonalization (twice is enough)
        w = w - basis.T @ (basis @ w)
        bnorm = torch.linalg.vector_norm(w)
        if j == k - 1 or bnorm <= 1e-10 * beta0 * max(1.0, float(abs(a))):
            break
        betas.append(bnorm)
        q.append(w / bnorm)
    m = len(alphas)
    t = torch.diag(torch.stack(alphas))
    if m > 1:
        off = torch.stack(betas[: m - 1])
        t = t + torch.diag(off, 1) + torch.diag(off, -1)
    theta, s = torch.linalg.eigh(t)
    coef = s @ (s[0] / theta.clamp_min(mu))
    return beta0 * (torch.stack(q[:m]).T @ coef)
