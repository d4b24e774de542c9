"""Oracles against dense autograd Hessians/Jacobians in float64 (relative error ≤ 1e-8), on both of
their paths: plain autograd (the default outside transforms) and torch.func."""

import contextlib

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


@pytest.fixture(params=["autograd", "torch.func"])
def path(request):
    with oracles.torch_func_only() if request.param == "torch.func" else contextlib.nullcontext():
        yield request.param


def close(a, b):
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)) <= 1e-8


def test_gradients(point, path):
    x, y, _, batch = point
    for fn in (f, g):
        gx_ref, gy_ref, _, _ = dense(fn, x, y, batch)
        gx, gy = oracles.grad_xy(fn, x, y, batch)
        assert close(tree.flatten(gx), gx_ref) and close(tree.flatten(gy), gy_ref)
        assert close(tree.flatten(oracles.grad_x(fn, x, y, batch)), gx_ref)
        assert close(tree.flatten(oracles.grad_y(fn, x, y, batch)), gy_ref)
        (gx2, gy2), val = oracles.value_and_grad_xy(fn, x, y, batch)
        assert close(tree.flatten(gx2), gx_ref) and torch.allclose(val, fn(x, y, batch))


def test_second_order_products(point, path):
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


def test_oracles_inside_transforms_and_under_outer_autograd(point):
    """Inside a torch.func transform, or with inputs that carry an autograd graph, the oracles take the
    torch.func path: a vmapped oracle equals the oracle per item, and outer autograd differentiates
    through ``∇_y g`` to give the cross product."""
    x, y, v, batch = point
    xs = {k: torch.stack([t, 2 * t]) for k, t in x.items()}
    mapped = torch.func.vmap(lambda x_: oracles.hvp(g, x_, y, v, batch))(xs)
    for i in range(2):
        one = oracles.hvp(g, {k: t[i] for k, t in xs.items()}, y, v, batch)
        assert close(tree.flatten({k: t[i] for k, t in mapped.items()}), tree.flatten(one))
    tracked = {k: t.clone().requires_grad_(True) for k, t in x.items()}
    gy = oracles.grad_y(g, tracked, y, batch)
    assert all(t.requires_grad for t in gy.values())
    outer = torch.autograd.grad(tree.vdot(gy, v), list(tracked.values()))
    assert close(torch.cat([t.flatten() for t in outer]), tree.flatten(oracles.cross(g, x, y, v, batch)))
