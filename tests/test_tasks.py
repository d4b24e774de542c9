"""Tasks: closed forms against autograd and finite differences (float64), data handling."""

import numpy as np
import pytest
import torch

from bilevel_ray import oracles
from bilevel_ray.problem import FiniteSampler
from bilevel_ray.tasks import make_task


def implicit_hypergradient(task, x, y):
    """``∇_x f − ∇²_xy g [∇²_yy g]^{-1} ∇_y f`` from the generic oracles and a dense Hessian."""
    bi, bo = task.inner.full(), task.outer.full()
    fx, fy = oracles.grad_xy(task.f, x, y, bo)
    z = torch.linalg.solve(oracles.hessian_yy(task.g, x, y, bi), fy)
    return fx - oracles.cross(task.g, x, y, z, bi)


def test_quadratic_closed_forms_match_autograd():
    task = make_task("quadratic", dim_x=3, dim_y=5, n_inner=50, n_outer=40, batch_size=None)
    x = torch.randn(3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = task.y_star(x)
    assert torch.linalg.vector_norm(oracles.grad_y(task.g, x, y, task.inner.full())) < 1e-12
    assert torch.allclose(task.hypergradient(x), implicit_hypergradient(task, x, y), rtol=1e-10)
    assert torch.allclose(task.value(x), task.f(x, y, task.outer.full()), rtol=1e-12)
    # x* is where the exact hypergradient vanishes
    assert torch.linalg.vector_norm(task.hypergradient(task.x_star)) < 1e-10


def test_quadratic_conditioning_is_controlled():
    task = make_task("quadratic", dim_x=4, dim_y=30, n_inner=20000, n_outer=10, mu=0.01, L_yy=1.0)
    evals = torch.linalg.eigvalsh(task._g.P)
    assert 0.005 < float(evals[0]) < 0.02 and 0.8 < float(evals[-1]) < 1.25


@pytest.mark.parametrize("basis", ["haar", "reference"])
def test_quadratic_conditioning_holds_in_either_eigenbasis(basis):
    task = make_task("quadratic", dim_x=4, dim_y=30, n_inner=20000, n_outer=10, mu=0.01, L_yy=1.0, basis=basis)
    evals = torch.linalg.eigvalsh(task._g.P)
    assert 0.005 < float(evals[0]) < 0.02 and 0.8 < float(evals[-1]) < 1.25
    # the reference's basis: P's eigenvectors but the smallest one's sit close to the coordinate axes
    vecs = torch.linalg.eigh(task._g.P).eigenvectors[:, 1:]
    on_axis = float(vecs.abs().max(0).values.median())
    assert (on_axis > 0.8) if basis == "reference" else (on_axis < 0.7)


def test_the_reference_eigenbasis_reflects_e1_onto_a_gaussian_direction():
    from bilevel_ray.tasks.quadratic import _reflection

    u = _reflection(np.random.default_rng(3), 7)
    v = np.random.default_rng(3).standard_normal(7)
    np.testing.assert_allclose(u @ u.T, np.eye(7), atol=1e-12)
    np.testing.assert_allclose(abs(u[:, 0] @ v) / np.linalg.norm(v), 1.0, atol=1e-12)


def test_quadratic_without_unique_solution_reports_no_x_star():
    task = make_task("quadratic", dim_x=10, dim_y=20, n_inner=64, n_outer=64, q_min=0.0, L_c=2.0)
    assert torch.linalg.eigvalsh(task.hessian_h())[0] < 0
    with pytest.raises(ValueError, match="not strongly convex"):
        task.x_star
    x, y = task.init()
    metrics = task.metrics(x, y)
    assert "rel_error" not in metrics and np.isfinite(metrics["grad_norm_sq"])


@pytest.mark.parametrize("dataset", ["breast_cancer", "synthetic"])
def test_logreg_exact_hypergradient(dataset):
    task = make_task("logreg_hpo", dataset=dataset, n_samples=300, n_features=8, batch_size=None)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(task.dim, dtype=torch.float64, generator=gen) - 1.0
    y = task.y_star(x)
    assert torch.linalg.vector_norm(oracles.grad_y(task.g, x, y, task.inner.full())) < 1e-10
    hg = task.hypergradient(x)
    assert torch.allclose(hg, implicit_hypergradient(task, x, y), rtol=1e-8, atol=1e-14)
    eps, j = 1e-5, 2
    e = torch.zeros_like(x)
    e[j] = eps
    fd = (task.value(x + e) - task.value(x - e)) / (2 * eps)
    assert abs(float(fd - hg[j])) <= 1e-6 * max(1.0, abs(float(hg[j])))


def test_logreg_breast_cancer_is_the_real_dataset():
    task = make_task("logreg_hpo", dataset="breast_cancer")
    n = task.inner.size + task.outer.size + len(task.test[1])
    assert (n, task.dim) == (569, 30)
    assert torch.allclose(task.inner.data[0].mean(0), torch.zeros(30, dtype=torch.float64), atol=1e-10)


def test_hypercleaning_uses_real_digits_and_clean_validation():
    task = make_task("hypercleaning", noise_rate=0.3)
    n = task.inner.size + task.outer.size + len(task.test[1])
    assert n == 1797
    assert abs(float(task.corrupted.double().mean()) - 0.3) < 0.05
    # corrupted labels always differ from the truth: accuracy of the training labels is 1 - p
    x, y = task.init()
    assert x.shape == (task.n_train,) and y.shape == (65, 10)


def test_finite_sampler_partitions_and_samples_reproducibly():
    data = (torch.arange(10.0)[:, None], torch.arange(10))
    s = FiniteSampler(data, batch_size=3, shuffle_seed=0)
    assert s.num_batches == 3  # 3 + 3 + 4: the partial block joins the last one
    rows = torch.cat([s.batch(k)[1] for k in range(s.num_batches)])
    assert sorted(rows.tolist()) == list(range(10))
    draw = lambda: s.sample(np.random.default_rng(7))[0]  # noqa: E731
    assert draw() == draw()
    with pytest.raises(ValueError, match="batch_size"):
        FiniteSampler(data, batch_size=0)
    with pytest.raises(ValueError, match="share their first dimension"):
        FiniteSampler((torch.zeros(3), torch.zeros(4)))
