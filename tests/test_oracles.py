"""Oracles against dense autograd Hessians/Jacobians in float64 (relative error ≤ 1e-8)."""

import pytest
import torch

from bilevel_ray import oracles, tree


def g(x, y, batch):
    a, b = batch
    h = torch.tanh(a @ y["w"] + y["b"]) * torch.exp(x["s"])
    return (h ** 2).mean() + (x["m"] @ y["w"].T).sum() * b.mean() + 0.5 * torch.exp(x["s"]).sum() * (y["b"] ** 2).sum()


def f(x, y, batch):
    a, _ = batch
    return torch.sin(a @ y["w"]).sum() + (x["m"] ** 2).sum() * (y["b"] ** 3).sum() + (x["s"] * y["b"]).prod()


@pytest.fixture
def point():
    gen = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    x = {"s": rnd(3), "m": rnd(2, 3)}
    y = {"w": rnd(4, 3), "b": rnd(3)}
    v = {"w": rnd(4, 3), "b": rnd(3)}
    batch = (rnd(5, 4), rnd(5))
    return x, y, v, batch


def dense(fn, x, y, batch):
    """Full gradient and Hessian of fn over the flat vector (x, y)."""
    nx = tree.numel(x)

    def flat_fn(u):
        return fn(tree.unflatten_like(u[:nx], x), tree.unflatten_like(u[nx:], y), batch)

    u = torch.cat([tree.flatten(x), tree.flatten(y)])
    grad = torch.autograd.functional.jacobian(flat_fn, u)
    hess = torch.autograd.functional.hessian(flat_fn, u)
    return grad[:nx], grad[nx:], hess[:nx, nx:], hess[nx:, nx:]


def close(a, b):
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)) <= 1e-8


def test_gradients(point):
    x, y, _, batch = point
    for fn in (f, g):
        gx_ref, gy_ref, _, _ = dense(fn, x, y, batch)
        gx, gy = oracles.grad_xy(fn, x, y, batch)
        assert close(tree.flatten(gx), gx_ref) and close(tree.flatten(gy), gy_ref)
        assert close(tree.flatten(oracles.grad_x(fn, x, y, batch)), gx_ref)
        assert close(tree.flatten(oracles.grad_y(fn, x, y, batch)), gy_ref)
        (gx2, gy2), val = oracles.value_and_grad_xy(fn, x, y, batch)
        assert close(tree.flatten(gx2), gx_ref) and torch.allclose(val, fn(x, y, batch))


def test_second_order_products(point):
    x, y, v, batch = point
    _, gy_ref, hxy, hyy = dense(g, x, y, batch)
    vf = tree.flatten(v)
    hv_ref, jv_ref = hyy @ vf, hxy @ vf
    assert close(tree.flatten(oracles.hvp(g, x, y, v, batch)), hv_ref)
    assert close(tree.flatten(oracles.cross(g, x, y, v, batch)), jv_ref)
    for fused in (oracles.fused_fwd, oracles.fused_rev, oracles.fused):
        gy, jv, hv = fused(g, x, y, v, batch)
        assert close(tree.flatten(gy), gy_ref)
        assert close(tree.flatten(jv), jv_ref)
        assert close(tree.flatten(hv), hv_ref)
        # shapes follow the pytrees of x and y
        assert jv["m"].shape == x["m"].shape and hv["w"].shape == y["w"].shape


def test_dense_hessian(point):
    x, y, _, batch = point
    *_, hyy = dense(g, x, y, batch)
    assert close(oracles.hessian_yy(g, x, y, batch), hyy)
