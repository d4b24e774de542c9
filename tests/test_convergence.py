"""Convergence on problems with known solutions.

Quadratic instance used throughout: dim_x=5, dim_y=10, 256 samples per level, inner spectrum
[0.5, 1], ``∇²h`` spectrum ≈ [0.54, 1.45]. Full-batch runs reach ‖x − x*‖/‖x*‖ ≤ 1e-2 in the stated
number of outer steps; SABA converges linearly on minibatches.
"""

import math

import pytest
import torch
from torch.utils._pytree import tree_flatten

from bilevel_ray import algorithms as A
from bilevel_ray.tasks import make_task

QUAD = dict(dim_x=5, dim_y=10, n_inner=256, n_outer=256, mu=0.5, q_min=0.5, L_c=0.2)

# algorithm -> (hyperparameters, outer steps)
SETTINGS = {
    "soba": (dict(inner_lr=1.0, outer_lr=1.0, schedule="constant"), 100),
    "saba": (dict(inner_lr=1.0, outer_lr=1.0), 100),
    # BOME's constant joint step leaves an O(ξ) neighbourhood: ξ = 0.02 gives ≈7e-3
    "bome": (dict(outer_lr=0.02, inner_lr=1.0, inner_steps=20), 1000),
    "mgbio": (dict(inner_lr=1.0, outer_lr=1.0), 100),
    "msgbio": (dict(inner_lr=1.0, outer_lr=1.0, beta=0.5), 100),
    "vr_msgbio": (dict(inner_lr=1.0, outer_lr=1.0), 100),
    "stocbio": (dict(outer_lr=1.0, inner_lr=1.0, inner_steps=5, neumann_steps=20, neumann_lr=0.8), 100),
    "aid_cg": (dict(outer_lr=1.0, inner_lr=1.0, inner_steps=5, cg_steps=10), 100),
    "itd": (dict(outer_lr=1.0, inner_lr=1.0, inner_steps=20), 100),
    "dsbo": (dict(outer_lr=1.0, inner_lr=1.0, linear_lr=1.0, inner_steps=5, linear_steps=10, tau=1.0), 100),
    "dsbo_gt": (dict(outer_lr=1.0, inner_lr=1.0, linear_lr=1.0, inner_steps=5, linear_steps=10, tau=1.0), 100),
    "d_soba": (dict(outer_lr=1.0, inner_lr=1.0, linear_lr=1.0, tau=1.0), 100),
}


def run(algo, task, steps, seed=0):
    x, y = task.init(seed=seed)
    s = algo.init(task, x, y, seed=seed)
    for _ in range(steps):
        s = algo.step(s, task)
    return s


def test_every_registered_algorithm_has_a_setting():
    # maml_trpo adapts policies by rollouts: it needs a meta_rl task (tests/test_rl_maml.py)
    assert set(SETTINGS) == set(A.available()) - {"maml_trpo"}


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_reaches_solution_of_quadratic(name):
    task = make_task("quadratic", batch_size=None, **QUAD)
    hyper, steps = SETTINGS[name]
    s = run(A.make(name, **hyper), task, steps)
    assert task.metrics(s.x, s.y)["rel_error"] <= 1e-2


def test_soba_stochastic_with_decreasing_steps():
    task = make_task("quadratic", batch_size=32, **QUAD)
    x0, _ = task.init()
    start = task.metrics(x0, task.init()[1])["rel_error"]
    s = run(A.make("soba", inner_lr=1.0, outer_lr=1.0, schedule="sqrt"), task, 1500)
    # rank-one samples make the noise large: 1500 steps take the error from ≈11.6 to ≈0.11
    assert task.metrics(s.x, s.y)["rel_error"] <= 0.15 < start / 50


def test_soba_cosine_schedule_anneals_the_outer_step():
    """``schedule="cosine"``: ρ stays at ρ0, γ_t follows a half cosine from γ0 to 0 over ``horizon`` steps
    and stays 0; on minibatches the annealed x ends far below the constant-step noise floor."""
    algo = A.make("soba", inner_lr=0.5, outer_lr=0.5, schedule="cosine", horizon=1500)
    assert [algo.step_sizes(t) for t in (0, 750, 1500, 3000)] == [(0.5, 0.5), (0.5, 0.25), (0.5, 0.0), (0.5, 0.0)]
    task = make_task("quadratic", batch_size=32, **QUAD)
    cosine = run(algo, task, 1500)
    constant = run(A.make("soba", inner_lr=0.5, outer_lr=0.5, schedule="constant"), task, 1500)
    # measured over seeds 0-2: cosine 0.10-0.16, constant 0.73-1.34
    assert task.metrics(cosine.x, cosine.y)["rel_error"] <= 0.25 < task.metrics(constant.x, constant.y)["rel_error"] / 2
    with pytest.raises(ValueError, match=r"^algorithm.horizon: schedule cosine needs a horizon >= 1"):
        A.make("soba", schedule="cosine")


@pytest.mark.parametrize("name", ["soba", "bome", "dsbo", "dsbo_gt", "d_soba"])
def test_adam_outer_step_is_torch_adam_on_the_papers_direction(name):
    """``outer_opt: adam``: each step moves x (BOME: x and y) as ``torch.optim.Adam`` does when fed the
    direction that the paper's rule (``outer_opt: sgd``, outer step 1) takes from the same state; every
    other field of the state moves as in the paper."""
    task = make_task("quadratic", batch_size=32, **QUAD)
    hyper = {k: v for k, v in SETTINGS[name][0].items() if k != "outer_lr"}
    adam = A.make(name, outer_lr=0.05, outer_opt="adam", beta1=0.8, beta2=0.99, eps=1e-6, **hyper)
    paper = A.make(name, outer_lr=1.0, **hyper)
    s = adam.init(task, *task.init(seed=0), seed=0)
    moved = ("x", "y") if name == "bome" else ("x",)
    ref = {k: getattr(s, k).clone().requires_grad_() for k in moved}
    opt = torch.optim.Adam(ref.values(), lr=0.05, betas=(0.8, 0.99), eps=1e-6)
    for _ in range(6):
        p = paper.step(s._replace(moments=()), task)
        for k, param in ref.items():
            param.grad = getattr(s, k) - getattr(p, k)
        opt.step()
        s = adam.step(s, task)
        for k, param in ref.items():
            assert torch.allclose(getattr(s, k), param.detach(), rtol=0, atol=1e-12)
        rest = [k for k in s._fields if k not in (*moved, "moments")]
        ours, papers = (tree_flatten([getattr(u, k) for k in rest])[0] for u in (s, p))
        assert all(torch.equal(a, b) if torch.is_tensor(a) else a == b for a, b in zip(ours, papers))
    with pytest.raises(ValueError, match=r"^algorithm\.beta1: must be < 1, got 1"):
        A.make(name, beta1=1.0)


@pytest.mark.parametrize("outer_opt", ["sgd", "adam"])
@pytest.mark.parametrize("name", ["soba", "bome", "dsbo", "dsbo_gt", "d_soba"])
def test_cosine_schedule_is_the_constant_step_at_the_annealed_rate(name, outer_opt):
    """``schedule: cosine``: step ``t`` from a given state equals the constant-schedule step with outer
    step ``outer_lr·(1+cos(π t/horizon))/2``; after ``horizon`` steps x (BOME: x and y) moves only by mixing."""
    task = make_task("quadratic", batch_size=32, **QUAD)
    hyper = {k: v for k, v in SETTINGS[name][0].items() if k not in ("outer_lr", "schedule")}
    cosine = A.make(name, outer_lr=0.4, schedule="cosine", horizon=8, outer_opt=outer_opt, **hyper)
    s = cosine.init(task, *task.init(seed=0), seed=0)
    for t in range(10):
        rate = 0.4 * 0.5 * (1 + math.cos(math.pi * min(t / 8, 1)))
        assert cosine.outer_step_size(t) == pytest.approx(rate, abs=1e-15)
        nxt = cosine.step(s, task)
        if t < 8:
            ref = A.make(name, outer_lr=rate, schedule="constant", outer_opt=outer_opt, **hyper).step(s, task)
            ours, refs = tree_flatten(nxt)[0], tree_flatten(ref)[0]
            assert all(torch.equal(a, b) if torch.is_tensor(a) else a == b for a, b in zip(ours, refs))
        else:  # a zero step is not a valid outer_lr, so no constant-schedule twin
            assert torch.equal(nxt.x, s.x) and (name != "bome" or torch.equal(nxt.y, s.y))
        s = nxt
    with pytest.raises(ValueError, match=r"^algorithm\.horizon: schedule cosine needs a horizon >= 1"):
        A.make(name, schedule="cosine")


def test_saba_converges_linearly_on_minibatches():
    """Constant steps, 8 minibatches per level: ‖∇h‖² falls by a constant factor per block of steps
    all the way to ≤ 1e-20 (SOBA with the same constant steps stalls at its noise floor)."""
    task = make_task("quadratic", batch_size=32, **QUAD)
    algo = A.make("saba", inner_lr=0.3, outer_lr=0.3)
    x, y = task.init()
    s = algo.init(task, x, y, seed=0)
    errs = []
    for _ in range(6):
        for _ in range(150):
            s = algo.step(s, task)
        errs.append(task.metrics(s.x, s.y)["grad_norm_sq"])
    ratios = [b / a for a, b in zip(errs, errs[1:]) if b > 1e-26]
    assert errs[-1] <= 1e-20
    assert ratios and max(ratios) < 0.1, errs
    soba = run(A.make("soba", inner_lr=0.3, outer_lr=0.3, schedule="constant"), task, 900)
    assert task.metrics(soba.x, soba.y)["grad_norm_sq"] > 1e3 * errs[-1]


def test_saba_converges_linearly_on_a_small_instance_of_the_reference_family():
    """P1's family (shared/BENCHMARK_PROBLEMS.md: μ = 0.1, L = 1, L_c = 0.1, x0 = −2, batch 64, minibatches in
    shuffled passes) at 1/32 of its inner size, float64, the reference's zero SAGA memory and the steps
    of benchmarks/quadratic.py: after the first 400 steps ‖∇h‖² falls ≥ 10× every 400 steps, from 4.8 to
    below 1e-8 in 1600 steps (measured 1.8e-9)."""
    task = make_task("quadratic", n_inner=1024, n_outer=256, dim_y=20, dim_x=5, mu=0.1, L_yy=1.0, L_xx=1.0,
                     q_min=0.0, L_c=0.1, x0=-2.0, batch_size=64, sampling="epochs", dtype="float64", seed=0)
    algo = A.make("saba", inner_lr=0.15, outer_lr=0.15, memory="zero")
    x, y = task.init()
    s = algo.init(task, x, y, seed=0)
    errs = [task.metrics(s.x, s.y)["grad_norm_sq"]]
    for _ in range(4):
        for _ in range(400):
            s = algo.step(s, task)
        errs.append(task.metrics(s.x, s.y)["grad_norm_sq"])
    assert errs[-1] <= 1e-8 < 1 < errs[0], errs
    assert all(b <= a / 10 for a, b in zip(errs[1:], errs[2:])), errs
    assert s.calls.grad_g == 1 + 1600  # the zero memory costs one call of each kind, for the shapes


@pytest.mark.parametrize("name", ["mgbio", "msgbio", "vr_msgbio"])
def test_mgbio_family_on_nonconvex_pl_lower_level(name):
    """y starts where ∇²_yy g has negative eigenvalues; the projected Hessian keeps the steps sane."""
    task = make_task("nonconvex_pl", dim=5, y_offset=1.3)
    x, y = task.init()
    u = (y - x)[0]
    assert 2 + 6 * math.cos(2 * u) < 0  # starts in the nonconvex region
    extra = {"beta": 0.5} if name != "vr_msgbio" else {}
    s = run(A.make(name, inner_lr=0.1, outer_lr=0.5, mu=1.0, **extra), task, 300)
    assert task.metrics(s.x, s.y)["rel_error"] <= 1e-4


def test_mgbio_lanczos_solver_matches_dense_on_pl_problem():
    task = make_task("nonconvex_pl", dim=6, y_offset=1.3)
    dense = run(A.make("mgbio", inner_lr=0.1, outer_lr=0.5, mu=1.0, solver="dense"), task, 20)
    krylov = run(A.make("mgbio", inner_lr=0.1, outer_lr=0.5, mu=1.0, solver="lanczos", krylov_dim=6), task, 20)
    assert torch.allclose(dense.x, krylov.x, atol=1e-8)
