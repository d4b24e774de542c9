"""The platform on a CUDA machine, in one script: oracles, MAML against learn2learn, DSBO time to accuracy,
gossip with agents sharing one GPU.

1. **Oracles** (``benchmarks/oracles.py`` on the device): HVP / gradient and SOBA step / gradient on the
   MLP hyper-representation, weight-decay and Omniglot Conv-4 problems.
2. **MAML vs learn2learn** (``benchmarks/omniglot.py``'s ``maml_speed`` on the device): second-order
   meta-iterations per second on identical Omniglot 5-way 1-shot meta-batches, three repeats, ratios.
3. **DSBO, 4 agents on a ring, Omniglot** (``configs/omniglot_dsbo_ring4.yaml``): the simulation with all
   agents' stacked states on the device, then the same on 4 Ray agents sharing the GPU (a quarter
   each); 5-way 1-shot accuracy on unseen alphabets every ``--eval-every`` rounds, and the minutes to
   reach ``--target``.
4. **Gossip**: round time of 4 Ray agents on a ring sharing the GPU (``gpus_per_agent`` 0.25), 1e6
   float32 parameters each, against the same on the CPU.

Without a CUDA device it stops with one line (exit status 2); ``--device cpu`` runs the same code on the
CPU, and ``--smoke`` runs it on the CPU at tiny sizes in seconds (what CI runs). docs/performance.md
holds the last table with the card it ran on.

    .venv/bin/python benchmarks/gpu.py [--device cuda] [--rounds 1200] [--target 0.9] [--smoke]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bilevel_ray.device import resolve_device  # noqa: E402


def _benchmark(name: str) -> ModuleType:
    """Another script of benchmarks/ as a module."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def oracle_table(device: str, smoke: bool) -> None:
    """Section 1: the oracle table on ``device`` (printed by ``benchmarks/oracles.py``'s ``run_problem``)."""
    oracles = _benchmark("oracles")
    args = argparse.Namespace(repeats=1 if smoke else 5, min_block=0.005 if smoke else 0.2, batch=16 if smoke else 256,
                              profile=False, device=device)
    for mode in ("repr",) if smoke else ("repr", "wd", "conv"):
        r = oracles.run_problem(mode, args)
        print(f"[{mode}] hvp / grad {r['hvp']:.2f}, SOBA step / grad {r['soba_step']:.2f}", flush=True)


def maml_vs_learn2learn(device: str, smoke: bool) -> None:
    """Section 2: our second-order MAML over learn2learn's, three repeats."""
    omniglot = _benchmark("omniglot")
    from bilevel_ray.tasks.vision.episodes import ClassPool
    from bilevel_ray.tasks.vision.omniglot import load_omniglot

    data = load_omniglot("images_background_small1")
    pool = ClassPool(data.images, data.labels)
    width, batch, queries, iters = (8, 2, 1, 2) if smoke else (64, 32, 15, 20)
    ratios = []
    for repeat in range(3):
        r = omniglot.maml_speed(pool, width, batch, queries, iters, device=device)
        ratios.append(r["grouped"] / r["l2l"])
        print(f"MAML repeat {repeat + 1}: ours {r['grouped']:.2f} it/s, learn2learn {r['l2l']:.2f} it/s, "
              f"ratio {ratios[-1]:.2f} (gradients agree to {r['diff']:.1e})", flush=True)
    print(f"MAML / learn2learn on {device}: {', '.join(f'{q:.2f}' for q in ratios)}", flush=True)


def dsbo_time_to_accuracy(device: str, smoke: bool, rounds: int, eval_every: int, target: float) -> None:
    """Section 3: DSBO's 4 agents on the device (simulation, then Ray agents sharing the GPU)."""
    from bilevel_ray.config import load_config
    from bilevel_ray.decentralized.backends import average, make_backend
    from bilevel_ray.device import to_device
    from bilevel_ray.meta import evaluate
    from bilevel_ray.tasks.vision.episodes import ClassPool, EpisodeSampler
    from bilevel_ray.tasks.vision.omniglot import load_omniglot

    share = 0.25 if device != "cpu" else 0.0
    tasks = 20 if smoke else 200
    for backend_name in ("sim", "ray"):
        overrides = ["task.test_split=null", f"decentralized.backend={backend_name}",
                     f"decentralized.gpus_per_agent={share if backend_name == 'ray' else 0}",
                     f"algorithm.horizon={rounds}"]
        if smoke:
            overrides += ["task.width=8", "task.meta_batch=2"]
        cfg = load_config(ROOT / "configs" / "omniglot_dsbo_ring4.yaml", overrides)
        test = load_omniglot("images_background_small2").select(exclude=load_omniglot(cfg.task.train_split).alphabets)
        sampler = EpisodeSampler(ClassPool(test.images, test.labels), 5, 1, 5)
        agents_device = device if backend_name == "sim" or device == "cpu" else "cuda"  # a Ray agent's share is cuda:0
        backend = make_backend(cfg.task, cfg.algorithm, cfg.decentralized, seed=0, device=agents_device)
        reached, wall, curve = None, 0.0, []
        try:
            for t in range(1, rounds + 1):
                start = time.perf_counter()
                backend.step()
                if device != "cpu":
                    torch.cuda.synchronize()
                wall += time.perf_counter() - start
                if t % eval_every == 0 or t == rounds:
                    states = to_device(backend.states(), "cpu")
                    learner = cfg.task.learner(average([s.x for s in states]), average([s.y for s in states]))
                    acc = evaluate(learner, sampler, tasks=tasks, seed=0)[0]
                    curve.append((t, wall / 60, acc))
                    if reached is None and acc >= target:
                        reached = wall / 60
        finally:
            backend.close()
        trail = ", ".join(f"{t}: {acc:.3f}" for t, _, acc in curve)
        when = f"{reached:.1f} min" if reached is not None else f"not within {rounds} rounds"
        print(f"DSBO 4 agents, {backend_name} on {device}: {target:.0%} 5-way 1-shot after {when}; "
              f"{wall / max(rounds, 1):.3f} s per round; accuracy by round {trail}", flush=True)


def gossip_rounds(device: str, smoke: bool) -> None:
    """Section 4: a gossip round of 4 Ray agents sharing the GPU against the same agents on the CPU."""
    import ray

    from bilevel_ray.decentralized.backends import connect_ray

    gossip = _benchmark("gossip")
    ray.cloudpickle.register_pickle_by_value(gossip)  # its classes travel to the actors by value
    d, rounds = (1000, 3) if smoke else (1_000_000, 50)
    per_round = {}
    owned = connect_ray(None, 4)
    for where in dict.fromkeys(("cpu", "cuda" if device != "cpu" else "cpu")):  # an actor sees its share as cuda:0
        ring = gossip.RayGossip(4, "auto", gpus=0.25 if where != "cpu" else 0.0, device=where)
        try:
            ring.set(d, torch.float32, rounds)
            ring.run()
            per_round[where] = statistics.median(ring.run()[0] for _ in range(1 if smoke else 5))
        finally:
            ring.close()
    if owned:
        ray.shutdown()
    cells = ", ".join(f"{where} {1e3 * s:.2f} ms" for where, s in per_round.items())
    print(f"gossip round, 4 Ray agents on a ring, {d:,} float32 each: {cells}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (the same code on the CPU)")
    parser.add_argument("--rounds", type=int, default=1200, help="DSBO rounds per backend")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--target", type=float, default=0.9, help="5-way 1-shot accuracy to time DSBO to")
    parser.add_argument("--sections", nargs="*", default=["oracles", "maml", "dsbo", "gossip"],
                        choices=["oracles", "maml", "dsbo", "gossip"])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (seconds)")
    args = parser.parse_args()
    if args.smoke:
        args.device, args.rounds, args.eval_every = "cpu", 2, 1
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        print(f"gpu.py: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    torch.manual_seed(0)
    np.random.seed(0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {device} ({name}), torch {torch.__version__}", flush=True)
    spec = str(device) if device.type == "cuda" else "cpu"
    sections = {"oracles": lambda: oracle_table(spec, args.smoke),
                "maml": lambda: maml_vs_learn2learn(spec, args.smoke),
                "dsbo": lambda: dsbo_time_to_accuracy(spec, args.smoke, args.rounds, args.eval_every, args.target),
                "gossip": lambda: gossip_rounds(spec, args.smoke)}
    for section in args.sections:
        sections[section]()


if __name__ == "__main__":
    main()
