"""Minibatch order (FiniteSampler.order) and SABA's linear rate on the reference quadratic family."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bilevel_ray import algorithms
from bilevel_ray.decentralized.data import make_agents
from bilevel_ray.problem import FiniteSampler, StepRNG, rng_for
from bilevel_ray.tasks import make_task


def test_a_step_generator_draws_what_numpy_draws_for_the_same_key():
    ours = rng_for(3, 1, 17, 2)
    theirs = np.random.default_rng([3, 1, 17, 2])
    assert isinstance(ours, StepRNG) and isinstance(ours, np.random.Generator)
    assert np.array_equal(ours.integers(1000, size=20), theirs.integers(1000, size=20))
    assert np.array_equal(ours.standard_normal(5), theirs.standard_normal(5))


def test_epochs_visit_every_minibatch_once_per_pass_for_every_draw_of_a_step():
    data = (torch.arange(70.0)[:, None],)
    sampler = FiniteSampler(data, batch_size=10, shuffle_seed=None, order="epochs")
    n = sampler.num_batches
    assert n == 7
    for seed, rank in ((0, 0), (5, 3)):
        firsts, seconds = [], []
        for t in range(4 * n):
            rng = rng_for(seed, rank, t)
            firsts.append(sampler.sample(rng)[0])
            seconds.append(sampler.sample(rng)[0])  # a second draw in the same step walks its own passes
        for draws in (firsts, seconds):
            for epoch in range(4):
                assert sorted(draws[epoch * n:(epoch + 1) * n]) == list(range(n))
        assert firsts != seconds and firsts[:n] != firsts[n:2 * n]  # passes are shuffled anew
    # a step is a pure function of its key: replaying it draws the same minibatches
    replay = [sampler.sample(rng_for(5, 3, t))[0] for t in range(4 * n)]
    assert replay == firsts


def test_epoch_order_is_refused_with_a_plain_generator_and_a_bad_order_is_named():
    sampler = FiniteSampler((torch.zeros(40, 1),), batch_size=10, order="epochs")
    with pytest.raises(TypeError, match="order: 'epochs' needs the generator of bilevel_ray.problem.rng_for"):
        sampler.sample(np.random.default_rng(0))
    with pytest.raises(ValueError, match="order: must be one of random, epochs, got 'sorted'"):
        FiniteSampler((torch.zeros(4, 1),), order="sorted")


def test_agents_shards_keep_their_tasks_order():
    task = make_task("quadratic", dim_x=2, dim_y=3, n_inner=256, n_outer=128, batch_size=16, sampling="epochs")
    for agent in make_agents(task, 4, seed=0):
        assert agent.inner.order == agent.outer.order == "epochs"
    assert task.inner.to(torch.float32).order == "epochs"


@pytest.mark.parametrize("sampling", ["random", "epochs"])
def test_saba_converges_linearly_on_a_small_instance_of_the_reference_family(sampling):
    """P1's family (μ = 0.1, L = 1, L_c = 0.1, q_min = 0, x0 = −2, batch 64, the reference's steps of 0.1)
    at 2048 / 512 samples and d_y = 20, d_x = 5, float64: ‖∇h‖² falls by a constant factor per block of
    steps (a linear rate, as SABA's theory gives when h is PL), down to below 1e-9."""
    task = make_task("quadratic", n_inner=2048, n_outer=512, dim_y=20, dim_x=5, mu=0.1, L_yy=1.0, L_xx=1.0,
                     q_min=0.0, L_c=0.1, x0=-2.0, batch_size=64, dtype="float64", sampling=sampling, seed=0)
    algo = algorithms.make("saba", inner_lr=0.1, outer_lr=0.1)
    x, y = task.init()
    state = algo.init(task, x, y, seed=0)
    norms = []
    for t in range(1, 2401):
        state = algo.step(state, task)
        if t % 400 == 0:
            norms.append(task.metrics(state.x, state.y)["grad_norm_sq"])
    ratios = [b / a for a, b in zip(norms, norms[1:])]
    assert all(r < 1 / 3 for r in ratios), norms  # every 400 steps at least 3× smaller
    assert norms[-1] < 1e-9, norms
