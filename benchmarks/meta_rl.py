"""Meta-RL benchmark on the MAML paper's protocol: MAML-TRPO against the bilevel methods.

Each method is one config of ``configs/rl/`` (the file ``bilevel-ray run`` takes, so every figure is
reproduced by that command too). The benchmark runs it through the same runner, then adapts the final
meta-policy (agents averaged) to ``--tasks`` fresh tasks with MAML's test-time adaptation (policy-gradient
steps of the config's ``adapt_lr``, fresh episodes each step) and reports the mean return before and
after 1, 2 and 3 steps with 95% intervals over the tasks, the meta-training wall time and environment
steps, and where a meta-step's time goes. The config's untrained meta-policy is adapted on the same tasks,
so that two gains come paired over tasks: after one step, over the untrained policy (``gain``) and over
the trained one before adapting (``adapt_gain``). A method that diverges keeps its last finite checkpoint, is
evaluated there and is reported as diverged at its step; the benchmark goes on with the others.

Results are merged into ``docs/results/meta_rl.json`` (one entry per environment and method) and drawn
with the table into ``docs/results/meta_rl.md`` and ``meta_rl.png``:

    .venv/bin/python benchmarks/meta_rl.py --envs nav --methods soba maml_trpo    # the 2-D navigation rows
    .venv/bin/python benchmarks/meta_rl.py --smoke      # smoke run: 2 meta-steps per method on tiny tasks, seconds
    .venv/bin/python benchmarks/meta_rl.py --speed-only # environment steps per second, in-process vs Ray
    .venv/bin/python benchmarks/meta_rl.py --profile 10 # where a meta-step's time goes, per method
    .venv/bin/python benchmarks/meta_rl.py --envs nav --methods soba --eval-only  # evaluate saved learners again
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("MPLBACKEND", "Agg")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

#: (environment, method) -> config; the method keys are those of docs/results/meta_rl.json
CONFIGS = {
    ("nav", "maml_trpo"): "configs/rl/navigation_maml_trpo.yaml",
    ("nav", "soba"): "configs/rl/navigation_soba.yaml",
    ("nav", "dsbo_sim"): "configs/rl/navigation_dsbo_ring4.yaml",
    ("nav", "dsbo_ray"): "configs/rl/navigation_dsbo_ring4_ray.yaml",
    ("nav", "bome"): "configs/rl/navigation_bome.yaml",
    ("cheetah_vel", "maml_trpo"): "configs/rl/halfcheetah_vel_maml_trpo.yaml",
    ("cheetah_vel", "soba"): "configs/rl/halfcheetah_vel_soba.yaml",
    ("cheetah_vel", "dsbo_sim"): "configs/rl/halfcheetah_vel_dsbo_ring4.yaml",
}
ENVS = sorted({e for e, _ in CONFIGS})
METHODS = sorted({m for _, m in CONFIGS}, key=lambda m: [k for _, k in CONFIGS].index(m))
RESULTS = ROOT / "docs" / "results"
#: config overrides of a smoke run (``--smoke``): tiny tasks and policies, 2 meta-steps
SMOKE = ["task.train_tasks=4", "task.meta_batch=4", "task.episodes=2", "task.horizon=10", "task.width=8",
         "task.eval_tasks=2", "task.eval_episodes=2", "run.steps=2", "run.eval_every=1"]


def config(env: str, method: str, args: argparse.Namespace, *extra: str) -> Any:
    """The config of ``(env, method)`` with the run's seed, the smoke overrides, ``extra`` and ``--set``."""
    from bilevel_ray.config import load_config

    return load_config(ROOT / CONFIGS[env, method],
                       [f"run.seed={args.seed}", *extra, *(SMOKE if args.smoke else []), *args.set])


def train(env: str, method: str, args: argparse.Namespace) -> dict:
    """Run one config; returns its result entry (without the evaluation)."""
    from bilevel_ray.decentralized.backends import average
    from bilevel_ray.runner import Diverged, run

    cfg = config(env, method, args, "run.progress=false")
    out = Path(args.out) / f"{env}_{method}"
    task = cfg.task
    task.timings.clear()
    task.counts.clear()
    initial = task.learner(*task.init(seed=args.seed))  # the untrained meta-policy every gain is measured from
    diverged = None
    try:
        rows = run(cfg, out_dir=out, progress=False)
        from bilevel_ray.rl.metapolicy import load_meta_policy

        policy = load_meta_policy(out / "learner.pt")
    except Diverged as e:  # evaluate the last finite checkpoint
        from bilevel_ray import checkpoint
        from bilevel_ray.runner import read_rows

        diverged = e.step
        rows = read_rows(out / "metrics.csv", upto=10**12)
        payload = checkpoint.load(out / "checkpoint.pt") if (out / "checkpoint.pt").exists() else None
        if payload is None:
            x, y = task.init(seed=args.seed)
        else:
            # a checkpointed state is a plain tuple whose first two fields are x and y (every algorithm's)
            x, y = average([s[0] for s in payload["states"]]), average([s[1] for s in payload["states"]])
        policy = task.learner(x, y)
        print(f"{env} {method}: diverged at step {e.step} ({e}); evaluating the last finite checkpoint", flush=True)
    last = rows[-1]
    split = {k: v / max(last["wall_time"], 1e-9) for k, v in task.timings.items()} if cfg.decentralized.backend != "ray" else {}
    return {"env": env, "method": method, "config": CONFIGS[env, method], "steps": int(last["step"]),
            "minutes": last["wall_time"] / 60, "env_steps": int(task.counts["env_steps"]),
            "diverged_at": diverged, "time_split": split,
            "curve": [[r["step"], r["wall_time"] / 60, r["pre_return"], r["post_return"]] for r in rows],
            "policy": policy, "initial_policy": initial}


def trained(env: str, method: str, args: argparse.Namespace) -> dict | None:
    """``--eval-only``: the learner a previous run of ``(env, method)`` saved under ``--out``, and its
    config's untrained meta-policy (None where no run saved one); the run's other figures stay as the
    results file has them."""
    from bilevel_ray.rl.metapolicy import load_meta_policy

    cfg = config(env, method, args)
    path = Path(args.out) / f"{env}_{method}" / "learner.pt"
    if not path.exists():
        print(f"{env} {method}: no learner at {path}, skipped (train it first, or set --out)", flush=True)
        return None
    return {"env": env, "method": method, "policy": load_meta_policy(path),
            "initial_policy": cfg.task.learner(*cfg.task.init(seed=args.seed))}


def evaluate(entry: dict, args: argparse.Namespace) -> dict:
    """Before/after 1..K adaptation steps on fresh tasks, mean and 95% half-width over tasks."""
    from bilevel_ray.meta.fewshot import mean_ci95

    n, episodes = (4, 2) if args.smoke else (args.tasks, args.episodes)
    returns, initial = (entry[p].evaluate(tasks=n, episodes=episodes, adapt_steps=args.adapt_steps,
                                          seed=args.seed + 1).numpy() for p in ("policy", "initial_policy"))
    for k in range(returns.shape[0]):
        key = "before" if k == 0 else f"after{k}"
        entry[key], entry[key + "_ci95"] = mean_ci95(returns[k])
        entry["initial_" + key], entry["initial_" + key + "_ci95"] = mean_ci95(initial[k])
    # paired over the same fresh tasks: after one adaptation step, the trained meta-policy against the
    # untrained one adapted alike (gain), and against itself before adapting (adapt_gain)
    entry["gain"], entry["gain_ci95"] = mean_ci95(returns[1] - initial[1])
    entry["adapt_gain"], entry["adapt_gain_ci95"] = mean_ci95(returns[1] - returns[0])
    entry["eval"] = {"tasks": n, "episodes": episodes, "adapt_lr": entry["policy"].adapt_lr}
    return entry


def write_results(entries: list[dict], command: str, folder: Path) -> Path:
    """Merge into ``folder``/meta_rl.json (keyed by env, method) and redraw the table and plot there."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "meta_rl.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    machine = f"{platform.machine()}, {os.cpu_count()} cores, CPU (torch {torch.__version__}, 1 thread per process)"
    for e in entries:
        record = {k: v for k, v in e.items() if k not in ("policy", "initial_policy", "env", "method")}
        if "steps" in record:  # a training run: its own command, machine and date
            record.update(command=command, machine=machine, date=time.strftime("%Y-%m-%d"))
        else:  # --eval-only: new evaluation figures for the run already recorded
            if e["method"] not in data.get(e["env"], {}):
                raise SystemExit(f"--eval-only: {folder / 'meta_rl.json'} has no run of {e['env']} {e['method']}")
            record = {**data[e["env"]][e["method"]], **record, "eval_command": command}
        data.setdefault(e["env"], {})[e["method"]] = record
    path.write_text(json.dumps(data, indent=1) + "\n")
    (folder / "meta_rl.md").write_text(table(data))
    plot(data, folder / "meta_rl.png")
    return path


def table(data: dict) -> str:
    lines = ["| env | method | before | after 1 step | after 2 | after 3 | gain over the untrained policy | "
             "gain from adapting | meta-steps | minutes | env steps | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for env, methods in sorted(data.items()):
        for method, r in methods.items():
            cells = [f"{r[k]:.1f} ± {r[k + '_ci95']:.1f}" for k in ("before", "after1", "after2", "after3") if k in r]
            cells += [f"{r[k]:+.1f} ± {r[k + '_ci95']:.1f}" if k in r else "–" for k in ("gain", "adapt_gain")]
            note = f"diverged at step {r['diverged_at']}" if r.get("diverged_at") else ""
            lines.append(f"| {env} | {method} | {' | '.join(cells)} | {r['steps']} | {r['minutes']:.1f} | "
                         f"{r['env_steps']:,} | {note} |")
    lines.append("")
    lines.append("Mean return on fresh tasks ± 95% interval over tasks; commands and machine in meta_rl.json. Gains "
                 "are paired over the same tasks, after one adaptation step: over the config's untrained "
                 "meta-policy adapted alike, and over the trained meta-policy before adapting.")
    return "\n".join(lines) + "\n"


def plot(data: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    envs = sorted(data)
    fig, axes = plt.subplots(len(envs), 2, figsize=(11, 3.8 * len(envs)), squeeze=False)
    for row, env in zip(axes, envs):
        for method, r in data[env].items():
            ks = [k for k in ("before", "after1", "after2", "after3") if k in r]
            line = row[0].errorbar(range(len(ks)), [r[k] for k in ks], yerr=[r[k + "_ci95"] for k in ks],
                                   marker="o", capsize=3, label=method)
            steps, _, pre, post = zip(*r["curve"])
            colour = line[0].get_color()
            row[1].plot(steps, post, color=colour, label=f"{method} after 1 step")
            row[1].plot(steps, pre, color=colour, ls="--", alpha=0.6, label=f"{method} before")
        row[0].set(title=f"{env}: fresh tasks", xlabel="adaptation steps", ylabel="mean return")
        row[1].set(title=f"{env}: held-out tasks during meta-training", xlabel="meta-iterations", ylabel="mean return")
        for ax in row:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def profile(env: str, method: str, args: argparse.Namespace) -> dict[str, float]:
    """Seconds per meta-step and where they go: rollouts, advantages (baseline fits), gossip (mixing,
    waiting for neighbours included) and the rest, the algorithm's step (surrogates, derivatives)."""
    from bilevel_ray.decentralized.backends import make_backend

    cfg = config(env, method, args)
    backend = make_backend(cfg.task, cfg.algorithm, cfg.decentralized, seed=args.seed)
    try:
        for _ in range(2):  # warm-up: vector environments, Ray actors
            backend.step()
        cfg.task.timings.clear()
        cfg.task.counts.clear()
        wall, gossip, phases = 0.0, 0.0, {}
        for _ in range(args.profile):
            start = time.perf_counter()
            backend.step()
            wall += time.perf_counter() - start
            gossip += backend.gossip_last_round
            for k, v in getattr(backend, "phases_last_round", {}).items():
                phases[k] = phases.get(k, 0.0) + v
        phases = phases or dict(cfg.task.timings)
    finally:
        backend.close()
    task = cfg.task
    out = {"seconds": wall / args.profile, "env_steps_per_s": task.counts["env_steps"] / wall}
    out.update({k: v / wall for k, v in phases.items()}, gossip=gossip / wall)
    out["algorithm"] = 1.0 - sum(v for k, v in out.items() if k not in ("seconds", "env_steps_per_s"))
    return out


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


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--envs", nargs="*", default=["nav"], choices=ENVS)
    parser.add_argument("--methods", nargs="*", default=["maml_trpo", "soba", "dsbo_sim", "dsbo_ray"], choices=METHODS)
    parser.add_argument("--tasks", type=int, default=40, help="fresh tasks of the final evaluation")
    parser.add_argument("--episodes", type=int, default=20, help="episodes per task and adaptation step")
    parser.add_argument("--adapt-steps", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides for every run (after --smoke's)")
    parser.add_argument("--out", help="run folders (metrics, checkpoints, learners; a smoke run's results too); "
                        "default runs/bench, a new temporary folder with --smoke")
    parser.add_argument("--workers", type=int, default=2, help="Ray rollout actors in the speed test")
    parser.add_argument("--smoke", action="store_true", help="smoke run (seconds): 2 meta-steps per method on tiny "
                        "tasks, small evaluation and speed test; results go under --out, not docs/results/")
    parser.add_argument("--speed-only", action="store_true")
    parser.add_argument("--eval-only", action="store_true", help="evaluate the learners earlier runs saved under "
                        "--out (and their untrained meta-policies) again, without training; updates their results")
    parser.add_argument("--profile", type=int, metavar="STEPS",
                        help="only time STEPS meta-steps of each method and print where they go")
    parser.add_argument("--gif", metavar="GIF", help="write one adapted navigation policy's GIF (first nav method)")
    args = parser.parse_args(argv)
    args.out = args.out or (tempfile.mkdtemp(prefix="meta_rl_smoke_") if args.smoke else "runs/bench")
    return args


def main() -> None:
    args = parse()
    torch.set_num_threads(1)
    command = "benchmarks/meta_rl.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    if args.profile:
        print(f"{'env':<12} {'method':<10} {'s/step':>7} {'env steps/s':>11}  rollouts  advantages  gossip  algorithm")
        for env in args.envs:
            for method in args.methods:
                if (env, method) in CONFIGS:
                    p = profile(env, method, args)
                    print(f"{env:<12} {method:<10} {p['seconds']:>7.2f} {p['env_steps_per_s']:>11,.0f}  "
                          f"{p.get('rollouts', 0):>8.0%}  {p.get('advantages', 0):>10.0%}  {p['gossip']:>6.0%}  "
                          f"{p['algorithm']:>9.0%}", flush=True)
        return
    if not args.speed_only:
        entries = []
        print(f"{'env':<12} {'method':<10} {'steps':>6} {'min':>6} {'before':>14} {'after 1':>14} {'after 2':>14} "
              f"{'after 3':>14}  time split", flush=True)
        for env in args.envs:
            for method in args.methods:
                if (env, method) not in CONFIGS:
                    print(f"{env} {method}: no config, skipped")
                    continue
                if args.eval_only:
                    saved = trained(env, method, args)
                    if saved is not None:
                        entry = evaluate(saved, args)
                        entries.append(entry)
                        print(f"{env:<12} {method:<10} gain {entry['gain']:+.1f} ± {entry['gain_ci95']:.1f}, from "
                              f"adapting {entry['adapt_gain']:+.1f} ± {entry['adapt_gain_ci95']:.1f}", flush=True)
                    continue
                entry = evaluate(train(env, method, args), args)
                entries.append(entry)
                cells = " ".join(f"{entry[k]:>7.1f} ± {entry[k + '_ci95']:<4.1f}"
                                 for k in ("before", "after1", "after2", "after3") if k in entry)
                split = ", ".join(f"{k} {v:.0%}" for k, v in entry["time_split"].items())
                flag = f"  DIVERGED at step {entry['diverged_at']}" if entry["diverged_at"] else ""
                print(f"{env:<12} {method:<10} {entry['steps']:>6} {entry['minutes']:>6.1f} {cells}  {split}{flag}",
                      flush=True)
                if args.gif and env == "nav":
                    from bilevel_ray.rl.video import write_adaptation_gif

                    write_adaptation_gif(entry["policy"], args.gif, seed=args.seed)
                    print(f"video: {args.gif}")
                    args.gif = None
        # a smoke run (--smoke) writes under --out, leaving the published figures alone
        folder = Path(args.out) / "results" if args.smoke else RESULTS
        print(f"results: {write_results(entries, command, folder)}")
    print(f"environment steps per second, one process vs {args.workers} Ray rollout actors (same request, same episodes):")
    for env_id, tasks, episodes, horizon in (("BilevelRay/Navigation2D-v0", 20, 20, 100),
                                             ("BilevelRay/HalfCheetahVel-v0", 8, 10, 200)):
        if args.smoke:
            tasks, episodes, horizon = 2, 2, 20
        one, ray_ = speed(env_id, args.workers, tasks, episodes, horizon)
        print(f"{env_id:<30} one process {one:>9.0f}  ray x{args.workers} {ray_:>9.0f}  ratio {ray_ / one:.2f}", flush=True)


if __name__ == "__main__":
    main()
