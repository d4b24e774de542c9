"""Command line: ``bilevel-ray run CONFIG.yaml [section.key=value ...] [--out DIR] [--no-progress]
[--resume]``, ``bilevel-ray tune CONFIG.yaml [--num-samples N] [--resume] [--out DIR]`` and
``bilevel-ray list``.

Exit codes: 0 success, 1 the run failed (diverged, cannot write its output, interrupted: 130), 2 bad
usage or configuration (``bilevel-ray: error: <one line>`` on stderr, no traceback). Heavy modules
(torch) are imported inside the commands, so ``--help`` and argument errors are fast.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path
from typing import Sequence

__all__ = ["main"]

PROG = "bilevel-ray"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line on ``argv`` (default ``sys.argv[1:]``) and return the exit code."""
    parser = _parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra and (args.command != "run" or any(a.startswith("-") for a in extra)):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as e:  # argparse reports usage errors (code 2) and --help (code 0) this way
        return int(e.code or 0)
    try:
        if args.command == "list":
            return _list()
        from bilevel_ray.runtime import prepare_process

        prepare_process()
        if args.command == "eval":
            return _eval(args)
        address = [f"decentralized.address={args.address}"] if args.address else []
        if args.command == "tune":
            return _tune(args.config, args.num_samples, args.resume, args.out, address)
        return _run(args.config, [*args.overrides, *extra, *address], args.out,
                    False if args.no_progress else None, args.resume)
    except BrokenPipeError:  # e.g. `bilevel-ray list | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Stochastic bilevel optimization runs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{run,tune,eval,list}")
    run = sub.add_parser("run", help="run one configuration", description=(
        "Run CONFIG.yaml (sections task, algorithm, run); overrides look like algorithm.outer_lr=0.1."))
    run.add_argument("config", help="YAML config file")
    run.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE", help="values parsed as YAML")
    run.add_argument("--out", metavar="DIR", help="output folder (default: run.out_dir or runs/<config stem>)")
    run.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    run.add_argument("--resume", action="store_true",
                     help="continue a killed run from the checkpoint in its output folder")
    run.add_argument("--address", metavar="ADDR", help="Ray cluster to run agents on (decentralized.address), "
                                                       "e.g. ray://HEAD:10001 or auto")
    tune = sub.add_parser("tune", help="sweep a configuration with Ray Tune", description=(
        "Sweep CONFIG.yaml's tune.param_space with Ray Tune (see README, Tuning)."))
    tune.add_argument("config", help="YAML config file with a tune section")
    tune.add_argument("--num-samples", type=int, metavar="N", help="trials (overrides tune.num_samples)")
    tune.add_argument("--resume", action="store_true", help="continue an interrupted sweep (finished trials are kept)")
    tune.add_argument("--out", metavar="DIR", help="experiment folder (default: tune.storage/tune.name, "
                                                   "i.e. runs/tune/<config stem>)")
    tune.add_argument("--address", metavar="ADDR", help="Ray cluster to sweep on (decentralized.address)")
    ev = sub.add_parser("eval", help="adapt a saved learner or meta-policy to new tasks", description=(
        "Adapt a saved few-shot learner (a run's learner.pt) to TASKS random N-way K-shot Omniglot tasks "
        "and report the mean query accuracy with its 95%% interval; or adapt a saved meta-policy (a meta_rl "
        "run's learner.pt) to TASKS new tasks of its environment and report the mean return before and after "
        "adaptation with 95%% intervals."))
    ev.add_argument("checkpoint", help="learner checkpoint (learner.pt)")
    ev.add_argument("--split", default="images_background_small2", help="Omniglot split to test on")
    ev.add_argument("--root", help="folder holding the Omniglot zips (default: search, see README)")
    ev.add_argument("--all-alphabets", action="store_true",
                    help="keep the alphabets the learner was trained on (default: unseen alphabets only)")
    ev.add_argument("--ways", type=int, nargs="+", default=[5], metavar="N", help="few-shot: classes per task; "
                    "several values give one line each (e.g. --ways 5 20)")
    ev.add_argument("--shots", type=int, default=1)
    ev.add_argument("--queries", type=int, default=15, help="query images per class")
    ev.add_argument("--tasks", type=int, help="tasks to adapt to (default: 600 few-shot, 100 meta-RL)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--support-warps", type=int, metavar="N", help="few-shot: adapt to each support drawing plus "
                    "N randomly warped copies (default: the learner's setting, none unless it was saved with some)")
    ev.add_argument("--warp-magnitude", type=float, default=1.0, help="few-shot: magnitude of those warps, in [0, 2]")
    ev.add_argument("--episodes", type=int, default=10, help="meta-RL: episodes per task and adaptation step")
    ev.add_argument("--adapt-steps", type=int, help="meta-RL: adaptation steps (default: the run's task.adapt_steps)")
    ev.add_argument("--video", metavar="GIF", help="meta-RL: write an animated GIF of adapted episodes "
                                                   "(environments with rgb_array rendering, e.g. 2-D navigation)")
    sub.add_parser("list", help="list algorithms and tasks with their parameters")
    return parser


def _error(message: str, code: int) -> int:
    print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr)
    return code


def _eval(args: argparse.Namespace) -> int:
    import torch

    from bilevel_ray.rl.metapolicy import is_meta_policy

    path = Path(args.checkpoint)
    if not path.is_file():
        return _error(f"checkpoint: {path} does not exist", 2)
    try:
        payload = torch.load(path, weights_only=True, map_location="cpu")
    except Exception:  # not a weights-only file: the few-shot loader reports what it is not
        payload = None
    if is_meta_policy(payload):
        return _eval_rl(args, payload)
    args.tasks = 600 if args.tasks is None else args.tasks
    return _eval_fewshot(args)


def _eval_rl(args: argparse.Namespace, payload: dict) -> int:
    from bilevel_ray.meta.fewshot import mean_ci95
    from bilevel_ray.rl.metapolicy import from_payload

    try:
        policy = from_payload(payload)
        tasks = 100 if args.tasks is None else args.tasks
        returns = policy.evaluate(tasks=tasks, episodes=args.episodes, adapt_steps=args.adapt_steps, seed=args.seed)
        if args.video:
            from bilevel_ray.rl.video import write_adaptation_gif

            write_adaptation_gif(policy, args.video, seed=args.seed)
    except (ValueError, FileNotFoundError) as e:
        return _error(str(e), 2)
    print(f"{policy.env}: {tasks} new tasks, {args.episodes} episodes each, adaptation steps of {policy.adapt_lr:g} "
          f"(95% intervals over tasks)")
    print(f"{'adaptation steps':>16}  {'mean return':>16}  {'gain over 0 steps':>17}")
    for k in range(returns.shape[0]):
        mean, half = mean_ci95(returns[k].numpy())
        gain = "" if k == 0 else "{:>8.2f} ± {:<6.2f}".format(*mean_ci95((returns[k] - returns[0]).numpy()))
        print(f"{k:>16}  {mean:>8.2f} ± {half:<6.2f}  {gain}".rstrip())
    if args.video:
        print(f"video: {args.video}")
    return 0


def _eval_fewshot(args: argparse.Namespace) -> int:
    from bilevel_ray.meta import evaluate, load
    from bilevel_ray.tasks.vision.episodes import ClassPool, EpisodeSampler
    from bilevel_ray.tasks.vision.omniglot import load_omniglot

    try:
        learner = load(args.checkpoint)
        if args.support_warps is not None:
            learner = learner.with_support_warps(args.support_warps, args.warp_magnitude)
        data = load_omniglot(args.split, root=args.root, size=learner.size)
        trained_on = learner.hyper.get("train_split")
        if trained_on and not args.all_alphabets:
            data = data.select(exclude=load_omniglot(trained_on, root=args.root, size=learner.size).alphabets)
        pool = ClassPool(data.images, data.labels)
        which = "all alphabets" if args.all_alphabets or not trained_on else f"alphabets not in {trained_on}"
        copies = learner.hyper.get("support_warps", 0)
        warps = f", support + {copies} warped copies" if copies else ""
        for ways in args.ways:
            sampler = EpisodeSampler(pool, ways, args.shots, args.queries)
            mean, half, _, constant = evaluate(learner, sampler, tasks=args.tasks, seed=args.seed)
            print(f"{learner.kind}{warps}: {ways}-way {args.shots}-shot accuracy on {args.split} ({which}, "
                  f"{len(data.classes)} characters), {args.tasks} tasks: {mean:.4f} ± {half:.4f} (95% interval)")
            if constant:
                print(f"warning: on {round(constant * args.tasks)} of {args.tasks} tasks the learner gave every query "
                      "the same label" + (" (collapsed)" if constant == 1 else ""))
    except (ValueError, FileNotFoundError) as e:
        return _error(str(e).replace("task.", "--").replace("support_warp_magnitude", "--warp-magnitude")
                      .replace("support_warps", "--support-warps"), 2)
    return 0


def _run(config: str, overrides: list[str], out: str | None, progress: bool | None, resume: bool) -> int:
    from bilevel_ray.config import load_config
    from bilevel_ray.runner import COUNTERS, run

    # raised inside torch's forward-mode AD on first use; not actionable for the user
    warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)
    try:
        cfg = load_config(config, overrides)
        out_dir = Path(out) if out is not None else cfg.out_dir
        rows = run(cfg, out_dir=out_dir, progress=progress, resume=resume)
    except ValueError as e:
        return _error(str(e), 2)
    except FloatingPointError as e:
        return _error(str(e), 1)
    except FileNotFoundError as e:
        return _error(str(e), 2)
    except OSError as e:
        return _error(f"cannot write output: {e}", 1)
    except KeyboardInterrupt:
        return _error("interrupted; the rows logged so far are kept", 130)
    last = rows[-1]
    print(f"{cfg.algorithm.name} on {cfg.task.name}: {last['step']} steps, {last['oracle_calls']} oracle calls, "
          f"{last['wall_time']:.2f} s")
    for key, value in last.items():
        if key not in COUNTERS:
            print(f"  {key:<20} {value:.6g}")
    for name in ("metrics.csv", "metrics.json", "curves.png", "config.yaml", "learner.pt"):
        if name != "learner.pt" or hasattr(cfg.task, "learner"):
            print(f"  {out_dir / name}")
    return 0


def _tune(config: str, num_samples: int | None, resume: bool, out: str | None, overrides: list[str]) -> int:
    from bilevel_ray.config import apply_overrides, read_sections
    from bilevel_ray.decentralized.backends import connect_ray

    warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)
    if num_samples is not None and num_samples < 1:
        return _error(f"--num-samples: must be >= 1, got {num_samples}", 2)
    try:
        from bilevel_ray import tune

        raw = read_sections(config)
        if overrides and isinstance(raw, dict):
            raw = {**raw, **apply_overrides({k: v for k, v in raw.items() if k != "tune"}, overrides)}
        sweep = tune.validate(raw, num_samples=num_samples)
        settings = sweep.settings
        path = Path(out) if out else Path(settings.storage or "runs/tune") / (settings.name or Path(config).stem)
        path = path.resolve()
        cpus = len(tune.trial_resources(sweep.cfg.decentralized).bundles)
        owned = connect_ray(sweep.cfg.decentralized.address, max(os.cpu_count() or 1, cpus))
        try:
            results = tune.make_tuner(sweep, path=path, resume=resume).fit()
            trials = tune.summarize(results, sweep, path)
        finally:
            if owned:
                import ray

                ray.shutdown()
    except ValueError as e:
        return _error(str(e), 2)
    except RuntimeError as e:
        return _error(str(e), 1)
    except KeyboardInterrupt:
        return _error(f"interrupted; resume with: {PROG} tune {config} --resume", 130)
    print(f"\nbest trials ({settings.metric}, {settings.mode}) of {len(trials)}:")
    print(tune.format_table(trials, settings.metric, [s.key for s in sweep.spaces]))
    for name in ("best_config.yaml", "trials.csv", "curves.png", "params.png"):
        print(f"  {path / name}")
    print(f"  run the best config: {PROG} run {path / 'best_config.yaml'}")
    return 0


def _list() -> int:
    from bilevel_ray import algorithms
    from bilevel_ray.tasks import available_tasks, get_task

    print("algorithms:")
    for name in algorithms.available():
        _print_fields(name, algorithms.get(name).field_docs())
    print("tasks:")
    for name in available_tasks():
        _print_fields(name, get_task(name).field_docs())
    return 0


def _print_fields(name: str, fields: dict[str, tuple[object, str]]) -> None:
    print(f"  {name}")
    for key, (default, doc) in fields.items():
        print(f"    {key:<16} {default!r:<16} {doc}".rstrip())


if __name__ == "__main__":
    sys.exit(main())
