"""Meta-RL benchmark: 2-D navigation and HalfCheetah-Vel, MAML-TRPO vs BOME vs DSBO (4 agents, ring)
(and SOBA with ``--methods soba``).

Each method meta-trains for the same wall-clock budget on this machine's CPU (``--budget`` minutes per
method and environment), then its meta-policy (agents averaged) is adapted to ``--tasks`` new tasks with
the same adaptation for every method (one VPG step of size 1/reg = 0.1 on 10 fresh episodes per task): the
table gives the mean return before and after adaptation with 95% intervals over the tasks. Then it times
environment steps per second through Ray rollout actors against one process on the same request.

    .venv/bin/python benchmarks/meta_rl.py --plot docs/meta_rl.png   # 3 minutes per method and environment
    .venv/bin/python benchmarks/meta_rl.py --quick         # 20 s each, smaller evaluation (smoke run)
    .venv/bin/python benchmarks/meta_rl.py --speed-only    # only the rollout throughput
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

ENVS = {
    "nav": dict(env="BilevelRay/Navigation2D-v0", width=64, depth=2),
    "cheetah_vel": dict(env="BilevelRay/HalfCheetahVel-v0", width=64, depth=2, eval_tasks=10, eval_episodes=5),
}
METHODS = {
    "maml_trpo": (dict(train_tasks=100, meta_batch=10, episodes=10), dict(name="maml_trpo"), None),
    # BOME's one joint step must stay below 2/(λ_b·reg·train_tasks) (the x-coupling of the summed lower
    # level), hence fewer training tasks and a small step
    "bome": (dict(train_tasks=10, meta_batch=10, episodes=10),
             dict(name="bome", inner_lr=0.05, inner_steps=5, outer_lr=0.02), None),
    "soba": (dict(train_tasks=40, meta_batch=10, episodes=10),
             dict(name="soba", inner_lr=0.05, outer_lr=0.2, schedule="constant"), None),
    "dsbo_ring4": (dict(train_tasks=40, meta_batch=5, episodes=10),
                   dict(name="dsbo", outer_lr=0.5, inner_lr=0.05, linear_lr=0.05, inner_steps=1, linear_steps=1),
                   dict(agents=4, topology="ring", backend="sim")),
}


def train(env_name: str, method: str, budget_s: float, seed: int):
    from bilevel_ray.config import from_dict
    from bilevel_ray.decentralized.backends import average, make_backend

    task_kw, algo, dec = METHODS[method]
    raw = {"task": {"name": "meta_rl", **ENVS[env_name], **task_kw, "reg": 10.0, "seed": seed},
           "algorithm": algo, "run": {"steps": 10**9, "seed": seed, "progress": False}}
    if dec:
        raw["decentralized"] = dec
    cfg = from_dict(raw)
    backend = make_backend(cfg.task, cfg.algorithm, cfg.decentralized, seed=seed)
    trained, steps, curve = 0.0, 0, []

    def log() -> None:  # held-out metrics of the averaged iterate (not counted in the budget)
        states = backend.states()
        m = cfg.task.metrics(average([s.x for s in states]), average([s.y for s in states]))
        curve.append((trained / 60, m["pre_return"], m["post_return"]))

    try:
        log()
        for k in range(1, 6):
            start = time.perf_counter()
            while trained + time.perf_counter() - start < budget_s * k / 5:
                backend.step()
                steps += 1
            trained += time.perf_counter() - start
            log()
        states = backend.states()
    finally:
        backend.close()
    x = average([s.x for s in states])
    return cfg.task.learner(x, average([s.y for s in states])), steps, curve


def plot(curves: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    envs = sorted({e for e, _ in curves})
    fig, axes = plt.subplots(1, len(envs), figsize=(5.5 * len(envs), 3.8), squeeze=False)
    for ax, env in zip(axes[0], envs):
        for (e, method), pts in curves.items():
            if e != env:
                continue
            t, pre, post = zip(*pts)
            line, = ax.plot(t, post, marker="o", label=f"{method} after adaptation")
            ax.plot(t, pre, ls="--", color=line.get_color(), label=f"{method} before")
        ax.set(title=env, xlabel="meta-training time (min, CPU)", ylabel="mean return on held-out tasks")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def speed(env_id: str, workers: int, tasks: int, episodes: int, horizon: int, repeats: int = 3) -> tuple[float, float]:
    from bilevel_ray.rl.ray_rollouts import RayRolloutSampler
    from bilevel_ray.rl.rollouts import RolloutSampler

    local = RolloutSampler(env_id, horizon=horizon, hidden=(64, 64))
    remote = RayRolloutSampler(env_id, workers=workers, horizon=horizon, hidden=(64, 64))
    params = local.policy.init(seed=0)
    task_list = local.sample_tasks(tasks, seed=0)
    out = []
    for sampler in (local, remote):
        sampler.sample(params, task_list, episodes, seed=0)  # warm-up: builds the vector envs
        t0, n = time.perf_counter(), 0
        for r in range(repeats):
            n += sampler.sample(params, task_list, episodes, seed=r + 1).steps
        out.append(n / (time.perf_counter() - t0))
    remote.close()
    return out[0], out[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=3.0, help="minutes of meta-training per method and env")
    parser.add_argument("--tasks", type=int, default=40, help="new tasks of the final evaluation")
    parser.add_argument("--envs", nargs="*", default=list(ENVS), choices=list(ENVS))
    parser.add_argument("--methods", nargs="*", default=["maml_trpo", "bome", "dsbo_ring4"], choices=list(METHODS))
    parser.add_argument("--workers", type=int, default=2, help="Ray rollout actors in the speed test")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="20 s budgets, 8 evaluation tasks")
    parser.add_argument("--speed-only", action="store_true")
    parser.add_argument("--plot", metavar="PNG", help="write learning curves (held-out returns vs training time)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from bilevel_ray.meta.fewshot import mean_ci95

    budget = 20.0 if args.quick else args.budget * 60
    n_eval = 8 if args.quick else args.tasks
    if not args.speed_only:
        print(f"meta-training budget {budget / 60:.2f} min per method (CPU, 1 torch thread); evaluation on {n_eval} "
              f"new tasks, 10 episodes each, one adaptation step (VPG, step 0.1); mean return ± 95% interval")
        print(f"{'env':<12} {'method':<11} {'steps':>6} {'before':>16} {'after':>16} {'gain':>14}")
        curves = {}
        for env_name in args.envs:
            for method in args.methods:
                policy, steps, curves[env_name, method] = train(env_name, method, budget, args.seed)
                returns = policy.evaluate(tasks=n_eval, episodes=10, seed=args.seed + 1)
                pre, post = mean_ci95(returns[0].numpy()), mean_ci95(returns[-1].numpy())
                gain = mean_ci95((returns[-1] - returns[0]).numpy())
                print(f"{env_name:<12} {method:<11} {steps:>6} {pre[0]:>8.2f} ± {pre[1]:<5.2f} {post[0]:>8.2f} ± "
                      f"{post[1]:<5.2f} {gain[0]:>6.2f} ± {gain[1]:<5.2f}", flush=True)
        if args.plot:
            plot(curves, Path(args.plot))
            print(f"learning curves: {args.plot}")
    print(f"environment steps per second, one process vs {args.workers} Ray rollout actors (same request, same episodes):")
    for env_id, tasks, episodes, horizon in (("BilevelRay/Navigation2D-v0", 20, 20, 100),
                                             ("BilevelRay/HalfCheetahVel-v0", 8, 10, 200)):
        one, ray_ = speed(env_id, args.workers, tasks, episodes, horizon)
        print(f"{env_id:<30} one process {one:>9.0f}  ray x{args.workers} {ray_:>9.0f}  ratio {ray_ / one:.2f}", flush=True)


if __name__ == "__main__":
    main()
