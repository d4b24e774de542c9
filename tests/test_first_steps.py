"""Each algorithm's first steps against updates computed by hand with the quadratic's matrices.

On the quadratic ``ℓ = ½yᵀPy + ½xᵀQx + xᵀRy + aᵀy + bᵀx``: ``∇_y = Py + Rᵀx + a``,
``∇_x = Qx + Ry + b``, ``∇²_yy = P``, ``∇²_xy·v = Rv``.
"""

import copy

import pytest
import torch

from bilevel_ray import algorithms as A
from bilevel_ray.tasks import make_task


@pytest.fixture(scope="module")
def task():
    return make_task("quadratic", dim_x=2, dim_y=3, n_inner=8, n_outer=8, batch_size=None, seed=1)


def grads(m, x, y):
    return m.Q @ x + m.R @ y + m.b, m.P @ y + m.R.T @ x + m.a


def start(task, algo):
    x, y = task.init()
    return x, y, algo.init(task, x, y, seed=0)


def assert_close(a, b):
    assert torch.allclose(a, b, rtol=1e-10, atol=1e-12), (a, b)


def test_soba_two_steps(task):
    G, Fm = task._g, task._f
    algo = A.make("soba", inner_lr=0.3, outer_lr=0.2, schedule="sqrt")
    x, y, s = start(task, algo)
    v = torch.zeros_like(y)
    for t in range(2):
        rho, gam = 0.3 / (t + 1) ** 0.5, 0.2 / (t + 1) ** 0.5
        fx, fy = grads(Fm, x, y)
        gy = grads(G, x, y)[1]
        x, y, v = x - gam * (G.R @ v + fx), y - rho * gy, v - rho * (G.P @ v + fy)
        s = algo.step(s, task)
        assert_close(s.x, x), assert_close(s.y, y), assert_close(s.v, v)
    assert s.calls == A.Calls(2, 2, 2, 2)


def test_saba_first_steps_use_the_full_gradient_then_saga(task):
    """With two minibatches, step 1 moves along the full-batch direction (memory filled at x0); step 2
    along φ_k(new) − φ_k(x0) + mean(x0)."""
    two = make_task("quadratic", dim_x=2, dim_y=3, n_inner=8, n_outer=8, batch_size=4, seed=1)
    algo = A.make("saba", inner_lr=0.3, outer_lr=0.2)
    soba = A.make("soba", inner_lr=0.3, outer_lr=0.2, schedule="constant")
    x0, y0 = two.init()
    s = algo.step(algo.init(two, x0, y0, seed=0), two)
    full = make_task("quadratic", dim_x=2, dim_y=3, n_inner=8, n_outer=8, batch_size=None, seed=1)
    ref = soba.step(soba.init(full, x0, y0), full)
    assert_close(s.x, ref.x), assert_close(s.y, ref.y), assert_close(s.v, ref.v)
    assert s.calls.grad_f == 2 + 1 and s.calls.hvp == 2 + 1


def test_bome_first_step(task):
    G, Fm = task._g, task._f
    algo = A.make("bome", outer_lr=0.1, inner_lr=0.5, inner_steps=3, eta=0.5)
    x, y, s = start(task, algo)
    theta = y.clone()
    for _ in range(3):
        theta = theta - 0.5 * grads(G, x, theta)[1]
    gx, gy = grads(G, x, y)
    qx, qy = gx - grads(G, x, theta)[0], gy
    fx, fy = grads(Fm, x, y)
    nq = qx @ qx + qy @ qy
    lam = max(float(0.5 * nq - (fx @ qx + fy @ qy)), 0.0) / nq
    s = algo.step(s, task)
    assert_close(s.x, x - 0.1 * (fx + lam * qx)), assert_close(s.y, y - 0.1 * (fy + lam * qy))


def hypergrad(task, x, y):
    """Surrogate hypergradient at (x, y); P is positive definite so P_μ is the identity for small μ."""
    fx, fy = grads(task._f, x, y)
    return fx - task._g.R @ torch.linalg.solve(task._g.P, fy)


@pytest.mark.parametrize("solver", ["dense", "lanczos"])
def test_mgbio_first_steps(task, solver):
    algo = A.make("mgbio", inner_lr=0.5, outer_lr=0.3, eta=0.8, beta=0.4, mu=1e-4, solver=solver, krylov_dim=3)
    x, y, s = start(task, algo)
    w = None
    for _ in range(2):
        y = y - 0.5 * grads(task._g, x, y)[1]
        hg = hypergrad(task, x, y)
        w = hg if w is None else 0.4 * hg + 0.6 * w
        x = x - 0.8 * 0.3 * w
        s = algo.step(s, task)
        assert_close(s.x, x), assert_close(s.y, y)


def test_msgbio_and_vr_msgbio_first_step(task):
    for name, extra in (("msgbio", {"beta": 0.4}), ("vr_msgbio", {"c": 2.0})):
        algo = A.make(name, inner_lr=0.5, outer_lr=0.3, eta=0.8, m=4.0, mu=1e-4, **extra)
        x0, y0, s = start(task, algo)
        u0, w0 = grads(task._g, x0, y0)[1], hypergrad(task, x0, y0)
        assert_close(s.u, u0), assert_close(s.w, w0)
        y1, x1 = y0 - 0.8 * 0.5 * u0, x0 - 0.8 * 0.3 * w0
        u_new, w_new = grads(task._g, x1, y1)[1], hypergrad(task, x1, y1)
        if name == "msgbio":
            u1, w1 = 0.4 * u_new + 0.6 * u0, 0.4 * w_new + 0.6 * w0
        else:  # same sample at both points; full batch makes the correction exact
            keep = 1 - min(2.0 * 0.8 ** 2, 1.0)
            u1, w1 = u_new + keep * (u0 - u0), w_new + keep * (w0 - w0)
        s = algo.step(s, task)
        assert_close(s.x, x1), assert_close(s.y, y1), assert_close(s.u, u1), assert_close(s.w, w1)


def test_stocbio_first_step(task):
    G, Fm = task._g, task._f
    algo = A.make("stocbio", outer_lr=0.2, inner_lr=0.5, inner_steps=4, neumann_steps=5, neumann_lr=0.3)
    x, y, s = start(task, algo)
    for _ in range(4):
        y = y - 0.5 * grads(G, x, y)[1]
    fx, fy = grads(Fm, x, y)
    eye = torch.eye(3, dtype=torch.float64)
    v = 0.3 * sum(torch.linalg.matrix_power(eye - 0.3 * G.P, q) @ fy for q in range(5))
    s = algo.step(s, task)
    assert_close(s.y, y), assert_close(s.x, x - 0.2 * (fx - G.R @ v))


def test_aid_cg_first_step_is_exact_with_dim_y_cg_steps(task):
    G, Fm = task._g, task._f
    algo = A.make("aid_cg", outer_lr=0.2, inner_lr=0.5, inner_steps=4, cg_steps=3)
    x, y, s = start(task, algo)
    for _ in range(4):
        y = y - 0.5 * grads(G, x, y)[1]
    fx, fy = grads(Fm, x, y)
    v = torch.linalg.solve(G.P, fy)
    s = algo.step(s, task)
    assert_close(s.v, v), assert_close(s.x, x - 0.2 * (fx - G.R @ v))


def test_itd_first_step_differentiates_the_unroll(task):
    G, Fm = task._g, task._f
    algo = A.make("itd", outer_lr=0.2, inner_lr=0.5, inner_steps=4)
    x, y, s = start(task, algo)
    eye = torch.eye(3, dtype=torch.float64)
    dydx = torch.zeros(3, 2, dtype=torch.float64)
    for _ in range(4):  # y ← (I − αP)y − α(Rᵀx + a), so dy/dx ← (I − αP)dy/dx − αRᵀ
        y = y - 0.5 * grads(G, x, y)[1]
        dydx = (eye - 0.5 * G.P) @ dydx - 0.5 * G.R.T
    fx, fy = grads(Fm, x, y)
    s = algo.step(s, task)
    assert_close(s.y, y), assert_close(s.x, x - 0.2 * (fx + dydx.T @ fy))


@pytest.mark.parametrize("name", ["dsbo", "dsbo_gt"])
def test_dsbo_two_steps(task, name):
    """With one agent (identity mix) tracking changes nothing: s = r."""
    G, Fm = task._g, task._f
    algo = A.make(name, outer_lr=0.2, inner_lr=0.5, linear_lr=0.4, inner_steps=2, linear_steps=3, tau=0.5)
    x, y, s = start(task, algo)
    z, r = torch.zeros_like(y), torch.zeros_like(x)
    for _ in range(2):
        for _ in range(2):
            y = y - 0.5 * grads(G, x, y)[1]
        fx, fy = grads(Fm, x, y)
        for _ in range(3):
            z = z - 0.4 * (G.P @ z - fy)
        r = 0.5 * r + 0.5 * (fx - G.R @ z)
        x = x - 0.2 * r
        s = algo.step(s, task)
        assert_close(s.y, y), assert_close(s.z, z), assert_close(s.r, r), assert_close(s.x, x)
        assert_close(s.s, r)


def test_step_is_pure(task):
    """Stepping twice from the same state gives the same result and leaves the state unchanged."""
    for name in A.available():
        if name in ("saba", "maml_trpo"):  # SABA donates its tables; MAML-TRPO needs a meta_rl task
            continue
        algo = A.make(name)
        x, y, s = start(task, algo)
        before = copy.deepcopy(s)
        a, b = algo.step(s, task), algo.step(s, task)
        assert torch.equal(a.x, b.x) and torch.equal(s.x, before.x) and torch.equal(s.y, before.y)
