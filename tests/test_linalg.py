import torch

from bilevel_ray import linalg


def spd_and_indefinite(n=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    evals = torch.linspace(-1.0, 3.0, n, dtype=torch.float64)
    return q, evals, torch.randn(n, generator=gen, dtype=torch.float64)


def test_cg_solves_spd_system():
    q, evals, b = spd_and_indefinite()
    h = q @ torch.diag(evals.abs() + 0.5) @ q.T
    x = linalg.cg(lambda u: h @ u, b, torch.zeros_like(b), iters=50, tol=1e-14)
    assert torch.allclose(h @ x, b, atol=1e-10)


def test_projected_solve_dense_clamps_eigenvalues():
    q, evals, b = spd_and_indefinite()
    h = q @ torch.diag(evals) @ q.T
    mu = 0.1
    ref = q @ torch.diag(1 / evals.clamp_min(mu)) @ q.T @ b
    assert torch.allclose(linalg.projected_solve_dense(h, b, mu), ref, atol=1e-12)


def test_lanczos_matches_dense_at_full_krylov_dim_and_converges():
    q, evals, b = spd_and_indefinite(n=30)
    h = q @ torch.diag(evals) @ q.T
    ref = linalg.projected_solve_dense(h, b, 0.2)
    full = linalg.projected_solve_lanczos(lambda u: h @ u, b, 0.2, k=30)
    assert torch.linalg.vector_norm(full - ref) / torch.linalg.vector_norm(ref) < 1e-8
    errs = [float(torch.linalg.vector_norm(linalg.projected_solve_lanczos(lambda u: h @ u, b, 0.2, k) - ref))
            for k in (5, 15, 30)]
    assert errs[2] < errs[0]


def test_row_wise_cg_runs_one_independent_cg_per_row():
    """Stacked systems (agents of the simulation): row i equals a 1-D CG on system i, including a row
    that stops early (zero right-hand side) and one that meets non-positive curvature."""
    g = torch.Generator().manual_seed(3)
    mats = []
    for _ in range(3):
        a = torch.randn(6, 6, dtype=torch.float64, generator=g)
        mats.append(a @ a.T + 0.5 * torch.eye(6, dtype=torch.float64))
    mats[2] = -mats[2]  # negative definite: CG stops at once, x stays x0
    b = torch.randn(3, 6, dtype=torch.float64, generator=g)
    b[1] = 0
    x0 = torch.randn(3, 6, dtype=torch.float64, generator=g) * torch.tensor([[1.0], [0.0], [1.0]], dtype=torch.float64)
    op = lambda u: torch.stack([m @ r for m, r in zip(mats, u)])  # noqa: E731 - block-diagonal operator
    got = linalg.cg(op, b, x0, iters=4)
    for i, m in enumerate(mats):
        want = linalg.cg(lambda u: m @ u, b[i], x0[i], iters=4)
        assert torch.allclose(got[i], want, rtol=0, atol=1e-12), i
    assert torch.equal(got[2], x0[2]) and torch.equal(got[1], torch.zeros(6, dtype=torch.float64))
