"""The proximal form of the meta-RL problem (task ``meta_rl``, ``form: proximal``): its implicit
hypergradient, agents' task shares, bad settings, and the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bilevel_ray import oracles, tree
from bilevel_ray.problem import bind_at
from bilevel_ray.tasks import make_task

SMALL = dict(train_tasks=2, meta_batch=2, episodes=3, horizon=6, width=3, depth=1, eval_tasks=2, eval_episodes=2,
             form="proximal")


def test_implicit_hypergradient_matches_finite_differences_of_the_solved_problem():
    """On fixed rollouts (float64), ∇_x f − ∇²_xy g [∇²_yy g]⁻¹ ∇_y f at the exact y*(x) (Newton on the
    dense Hessian) equals central differences of x ↦ f(x, y*(x))."""
    task = make_task("meta_rl", **SMALL, dtype="float64")
    x, y = task.init(seed=0)
    bound = bind_at(task, x, y)
    rng = np.random.default_rng(0)
    _, bi = bound.inner.sample(rng)
    _, bo = bound.outer.sample(rng)

    def solve(x_):
        y_ = y
        for _ in range(30):
            grad = tree.flatten(oracles.grad_y(task.g, x_, y_, bi))
            hess = oracles.hessian_yy(task.g, x_, y_, bi)
            y_ = tree.unflatten_like(tree.flatten(y_) - torch.linalg.solve(hess, grad), y_)
        assert tree.norm(oracles.grad_y(task.g, x_, y_, bi)) < 1e-10
        return y_

    ys = solve(x)
    hess = oracles.hessian_yy(task.g, x, ys, bi)
    assert torch.linalg.eigvalsh(hess).min() > 0  # strongly convex at the solution
    fx, fy = oracles.grad_xy(task.f, x, ys, bo)
    v = tree.unflatten_like(torch.linalg.solve(hess, tree.flatten(fy)), ys)
    hypergrad = tree.flatten(tree.sub(fx, oracles.cross(task.g, x, ys, v, bi)))
    u = torch.randn(hypergrad.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    h = 1e-5

    def value(sign):
        xs = tree.unflatten_like(tree.flatten(x) + sign * h * u, x)
        return task.f(xs, solve(xs), bo)

    fd = (value(1) - value(-1)) / (2 * h)
    assert float(hypergrad @ u) == pytest.approx(float(fd), rel=1e-5)
    assert abs(float(fd)) > 1e-4


def test_agents_own_disjoint_task_shares_and_the_proximal_term_covers_them():
    task = make_task("meta_rl", **{**SMALL, "train_tasks": 6, "meta_batch": 2})
    shares = task.shard(3, seed=0)
    owned = [set(inner.indices) for inner, _ in shares]
    assert set().union(*owned) == set(range(6)) and sum(map(len, owned)) == 6
    x, y = task.init(seed=0)
    bound = task.at(x, y, step=0, rank=1, inner=shares[1][0], outer=shares[1][1])
    _, batch = bound.inner.sample(np.random.default_rng(0))
    assert set(batch.indices) <= owned[1] and batch.among == tuple(sorted(owned[1]))
    # rows the agent does not own get no gradient from its g
    gy = oracles.grad_y(task.g, x, tree.tree_map(lambda t: t + 0.1, y), batch)
    rows = gy["layer0.weight"].flatten(1).norm(dim=1)
    assert all((rows[k] > 0) == (k in owned[1]) for k in range(6))
    with pytest.raises(ValueError, match="decentralized.agents: 7 agents need at least 7 task.train_tasks"):
        task.shard(7)


@pytest.mark.parametrize("field,value,match", [
    ("env", "Nope-v0", "env.id: unknown environment"),
    ("meta_batch", 0, "task.meta_batch: must be >= 1"),
    ("gamma", 1.5, "task.gamma: must be <= 1"),
    ("dtype", "float16", "task.dtype: must be one of"),
])
def test_bad_settings_are_refused_by_name(field, value, match):
    with pytest.raises(ValueError, match=match):
        make_task("meta_rl", **{**SMALL, field: value})


def test_objectives_refuse_unbound_batches():
    task = make_task("meta_rl", **SMALL)
    x, y = task.init(seed=0)
    _, idx = task.inner.sample(np.random.default_rng(0))
    with pytest.raises(TypeError, match="meta_rl: the proximal form's objectives need a RLBatch of rollouts; step on "
                                        "bilevel_ray.problem.bind"):
        task.f(x, y, idx)
    maml = make_task("meta_rl", **{**SMALL, "form": "maml"})
    with pytest.raises(TypeError, match="meta_rl: the maml form's objectives need a MetaBatch of rollouts"):
        maml.g(x, y, idx)


def test_cli_runs_meta_rl_and_evaluates_the_saved_meta_policy(tmp_path, capsys):
    import yaml

    from bilevel_ray.cli import main

    cfg = {"task": {"name": "meta_rl", **SMALL, "horizon": 20, "train_tasks": 4},
           "algorithm": {"name": "maml_trpo"}, "run": {"steps": 2, "eval_every": 1, "seed": 0}}
    path = tmp_path / "nav.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out), "--no-progress"]) == 0
    lines = (out / "metrics.csv").read_text().splitlines()
    assert lines[0].split(",")[-4:] == ["outer_objective", "pre_return", "post_return", "lower_return"]
    assert len(lines) == 4 and (out / "curves.png").is_file()
    capsys.readouterr()
    gif = tmp_path / "nav.gif"
    assert main(["eval", str(out / "learner.pt"), "--tasks", "3", "--episodes", "2", "--video", str(gif)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("BilevelRay/Navigation2D-v0: 3 new tasks, 2 episodes each, adaptation steps of 0.1 "
                        "(95% intervals over tasks)")
    assert lines[1].split() == ["adaptation", "steps", "mean", "return", "gain", "over", "0", "steps"]
    assert [line.split()[0] for line in lines[2:4]] == ["0", "1"] and len(lines[2].split()) == 4
    assert len(lines[3].split()) == 7  # step, mean ± half, gain ± half
    capsys.readouterr()
    assert main(["eval", str(out / "learner.pt"), "--tasks", "3", "--episodes", "2", "--adapt-steps", "3"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()[2:]] == ["0", "1", "2", "3"]
    from PIL import Image

    with Image.open(gif) as img:
        assert img.n_frames > 10 and img.size == (128 * 2 + 4, 128)
    assert main(["eval", str(out / "learner.pt"), "--tasks", "1"]) == 2
    assert "tasks: must be an integer >= 2, got 1" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "absent.pt")]) == 2
    assert "checkpoint: " in capsys.readouterr().err


def test_maml_trpo_refuses_the_stacked_simulation_by_name():
    from bilevel_ray.config import from_dict
    from bilevel_ray.decentralized.backends import make_backend

    cfg = from_dict({"task": {"name": "meta_rl", **SMALL, "train_tasks": 4}, "algorithm": {"name": "maml_trpo"},
                     "decentralized": {"agents": 2, "backend": "sim"}, "run": {"steps": 1}})
    with pytest.raises(ValueError, match="maml_trpo runs one agent per process; use decentralized.backend: ray"):
        make_backend(cfg.task, cfg.algorithm, cfg.decentralized, seed=0)


@pytest.mark.parametrize("algorithm", [{"name": "maml_trpo"}, {"name": "soba", "inner_lr": 1.0}])
def test_training_environment_steps_are_counted_by_the_task(algorithm):
    """Rollouts sampled for training (the bilevel problem's, and those MAML-TRPO collects itself) add up in
    ``task.counts["env_steps"]``; the metrics' evaluation rollouts do not."""
    from bilevel_ray.config import from_dict
    from bilevel_ray.problem import bind

    cfg = from_dict({"task": {"name": "meta_rl", **SMALL, "horizon": 20, "train_tasks": 4},
                     "algorithm": algorithm, "run": {"steps": 1, "seed": 0}})
    task, algo = cfg.task, cfg.algorithm
    x, y = task.init(seed=0)
    state = algo.init(bind_at(task, x, y), x, y, seed=0)
    task.metrics(state.x, state.y)
    assert task.counts["env_steps"] == 0
    for step in range(2):
        state = algo.step(state, bind(task, state))
        per_step = 2 * task.meta_batch * task.episodes * 20  # episodes of x and of the adapted policies
        assert step * per_step < task.counts["env_steps"] <= (step + 1) * per_step
