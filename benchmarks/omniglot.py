"""Few-shot Omniglot on the minimal splits, offline: accuracy after a fixed CPU budget, and MAML speed.

Meta-training uses ``images_background_small1`` (5 alphabets, 136 characters; rotations as extra
classes); testing uses the alphabets of ``images_background_small2`` that are not in small1
(Japanese (katakana), Sanskrit, Tagalog: 106 characters never seen in training). For each method,
training stops after ``--budget`` minutes of wall time (this process, ``--threads`` torch threads);
then 5-way 1-shot, 5-way 5-shot and 20-way 1-shot accuracy over ``--tasks`` test tasks (15 queries
per class) with normal 95% intervals, as trained and with test-time support warps (each support drawing
plus ``--support-warps`` warped copies, :meth:`~bilevel_ray.meta.FewShotLearner.with_support_warps`).

Every method trains on randomly warped drawings (:class:`~bilevel_ray.meta.augment.RandomAffine`:
``task.augment`` in the configs, ``AUGMENT`` for the episodic baselines); test tasks are never warped.

* SOBA: the task's episodic prototype form (``configs/omniglot_soba.yaml``: backbone ``x``, one persistent
  centre per training class as ``y``, a step's lower and upper level on the same 60-way task, raw
  embeddings, Adam outer step), one process; new tasks are classified by their support prototypes.
* BOME: the hyper-representation bilevel task with linear class heads (``configs/omniglot_bome.yaml``:
  backbone ``x``, class-head table ``y``, every drawing scored against every training class,
  ``softmax: all``); new tasks fit a ridge head. (On the prototype form BOME's joint step moves the
  centres by the outer step size only, and it collapsed or trailed there: README, Results.)
* DSBO: the task's episodic prototype form (class centres as ``y``, a step's lower and upper level on the
  same 60-way task, raw embeddings, Adam outer step), 4 agents on a ring, each on its own alphabets,
  vectorized simulation (``configs/omniglot_dsbo_ring4.yaml``); the agents' average backbone is tested,
  classifying by its support prototypes.
* MAML: second-order MAML (1 inner step, zero-initialised head: any number of ways), the meta-batch's
  tasks as one grouped network, trained 5-way; ProtoNet: prototypical networks (reference), trained 60-way;
  both with Adam, learning rate 1e-3 decayed along a half cosine over the budget.
* Ridge heads (R2-D2): the hyper-representation with a per-task lower level, a ridge-regression head on
  the support embeddings solved in closed form (exact implicit hypergradient), trained 20-way, same Adam
  schedule.

Speed: meta-iterations per second of our MAML, in both batched forms (``grouped``: the tasks as groups
of one network, plain autograd; ``vmap``: ``torch.func`` + ``vmap`` over tasks), and of learn2learn's
``MAML`` (clone/adapt per task) on the same ``ConvNet`` (learned 5-way head), the same 5-way 1-shot
meta-batches and the same Adam step, after checking that all give the same meta-gradient; steps of the methods
alternate, so that a slow spell of a shared machine hits all alike. Settings: learn2learn's own
MAML Omniglot example (width 64, 32 tasks, 1 query per class), then this benchmark's MAML training
setting, then that with 15 queries per class; each setting runs ``--speed-repeats`` times and the
grouped / learn2learn ratio of every repeat is printed. The whole process runs under
:func:`bilevel_ray.runtime.prepare_process`: glibc's heap kept (``BILEVEL_RAY_ALLOCATOR=default`` to compare
without) and subnormal floats flushed to zero (``BILEVEL_RAY_DENORMALS=keep``).

    .venv/bin/python benchmarks/omniglot.py [--budget 4] [--tasks 600] [--methods soba bome dsbo maml protonet ridge]
                                            [--width 32] [--threads 2] [--speed-iters 10 (0: no speed test)]
                                            [--speed-repeats 3]
                                            [--support-warps 8 (0: none)] [--train-acc] [--save DIR] [--smoke]
                                            [--set KEY=VALUE ... (SOBA/BOME/DSBO config)] [--steps N]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bilevel_ray.config import load_config
from bilevel_ray.decentralized.backends import average, make_backend
from bilevel_ray.device import to_device
from bilevel_ray.meta import evaluate
from bilevel_ray.tasks.vision.l2l import import_learn2learn
from bilevel_ray.meta.learners import meta_loss_and_grad
from bilevel_ray.meta.train import meta_train
from bilevel_ray.runtime import prepare_process
from bilevel_ray.meta.augment import RandomAffine
from bilevel_ray.meta.backbone import ConvNet, init_backbone
from bilevel_ray.tasks.vision.episodes import ClassPool, EpisodeSampler
from bilevel_ray.tasks.vision.omniglot import load_omniglot

SETTINGS = ((5, 1), (5, 5), (20, 1))
#: (width, meta-batch, queries per class) of the speed test: learn2learn's own MAML Omniglot example
#: (64 channels, 32 tasks, 2×shots samples per class split into support and query), then the setting
#: the accuracy table trains MAML with here, then that with 15 queries per class
SPEED_SETTINGS = ((64, 32, 1), (32, 16, 5), (32, 16, 15))
#: the speed test's one setting in a smoke run (``--smoke``)
SMOKE_SPEED_SETTINGS = ((8, 2, 1),)
#: magnitude of the random affine warps of the episodic baselines' training drawings (:class:`RandomAffine`;
#: the hyper-representation configs set their own, ``task.augment``)
AUGMENT = 0.5
CONFIGS = {"soba": "configs/omniglot_soba.yaml", "bome": "configs/omniglot_bome.yaml",
           "dsbo": "configs/omniglot_dsbo_ring4.yaml"}
LABELS = {"soba": "SOBA (prototype form)", "bome": "BOME (class heads)", "dsbo": "DSBO, 4 agents, ring",
          "maml": "MAML (2nd order)", "protonet": "ProtoNet", "ridge": "ridge heads (R2-D2)"}


def bilevel_config(name: str, width: int, overrides: list[str]) -> Any:
    """``name``'s config at ``width``, training only, with ``overrides`` (``section.key=value``, as on the CLI)."""
    return load_config(CONFIGS[name], [f"task.width={width}", "task.test_split=null", *overrides])


def train_bilevel(cfg: Any, budget_s: float, max_steps: int = 0) -> tuple[Any, int]:
    """Train a bilevel config for ``budget_s`` seconds, or for exactly ``max_steps`` steps when that is positive."""
    backend = make_backend(cfg.task, cfg.algorithm, cfg.decentralized, seed=cfg.run.seed)
    start, steps = time.perf_counter(), 0
    try:
        while (steps < max_steps) if max_steps > 0 else (time.perf_counter() - start < budget_s):
            backend.step()
            steps += 1
        states = backend.states()
    finally:
        backend.close()
    return cfg.task.learner(average([s.x for s in states]), average([s.y for s in states])), steps


#: (ways, meta-batch) each episodic baseline trains on (1 shot, 5 queries per class): MAML 5-way;
#: ProtoNet 60-way, as Snell et al. train it (4-minute probes, one thread: 20-way with 8 tasks
#: 89.9 / 74.2 % 5-way / 20-way 1-shot, 60-way with 3 tasks 91.0 / 76.5 %); ridge heads 20-way (4-minute
#: probes at width 32, one thread, two probes at a time: 20-way with 8 tasks 82.4 / 55.9 %, 60-way with 3
#: tasks 80.0 / 51.8 %, where a one-hot ridge fit has more targets than its 33 features; ProtoNet 60-way
#: in the same kind of probe 86.3 / 65.9 %)
EPISODIC = {"maml": (5, 16), "protonet": (60, 3), "ridge": (20, 8)}
#: the episodic baselines' meta learning rate: 1e-3 decayed to zero along a half cosine over the budget
SCHEDULE = "cosine"


def train_episodic(kind: str, pool: ClassPool, width: int, budget_s: float) -> tuple[Any, int]:
    ways, batch = EPISODIC[kind]
    sampler = EpisodeSampler(pool, ways, 1, 5, meta_batch=batch, augment=RandomAffine(AUGMENT))
    learner = meta_train(kind, sampler, budget_s=budget_s, width=width, meta_lr=1e-3, schedule=SCHEDULE,
                         train_split="images_background_small1")
    return learner, learner.hyper["steps_trained"]


def maml_speed(pool: ClassPool, width: int, batch: int, queries: int, iters: int,
               device: torch.device | str = "cpu") -> dict[str, float]:
    """Meta-iterations per second of our MAML (grouped and vmapped batching) and of learn2learn's ``MAML``
    on identical 5-way 1-shot meta-batches on ``device``, after checking that all three give the same
    meta-gradient (``diff``: the largest absolute difference to learn2learn's)."""
    l2l = import_learn2learn()
    device = torch.device(device)
    sampler = EpisodeSampler(pool, 5, 1, queries, meta_batch=batch)
    episodes = to_device([sampler.episodes(np.random.default_rng([1, i])) for i in range(iters + 1)], device)
    net = ConvNet(init_backbone(width=width, seed=0), ways=5)
    torch.nn.init.normal_(net.head.weight, std=0.01)
    net = net.to(device)

    def ours(batching):  # each method trains its own copy of the same starting point
        hyper = {"steps": 1, "lr": 0.4, "batching": batching}
        theta = {k: v.detach().clone().requires_grad_(True) for k, v in net.named_parameters()}
        return lambda ep: meta_loss_and_grad("maml", {k: v.detach() for k, v in theta.items()}, hyper, ep)[1], theta

    maml = l2l.algorithms.MAML(net, lr=0.4, first_order=False)

    def l2l_grads(ep):
        maml.zero_grad()
        for b in range(ep.support.shape[0]):
            learner = maml.clone()
            learner.adapt(F.cross_entropy(learner(ep.support[b]), ep.support_labels[b]))
            (F.cross_entropy(learner(ep.query[b]), ep.query_labels[b]) / ep.support.shape[0]).backward()
        return {k: p.grad for k, p in maml.module.named_parameters()}

    methods = {"grouped": ours("grouped"), "vmap": ours("vmap"), "l2l": (l2l_grads, dict(maml.module.named_parameters()))}
    reference = {k: g.clone() for k, g in l2l_grads(episodes[0]).items()}  # same point: before any update
    out = {"diff": max(float((g - reference[k]).abs().max()) for name in ("grouped", "vmap")
                       for k, g in methods[name][0](episodes[0]).items())}
    steps = {}
    for name, (grads, params) in methods.items():
        opt = torch.optim.Adam(params.values(), lr=1e-3)

        def step(ep, grads=grads, params=params, opt=opt):
            for k, g in grads(ep).items():
                params[k].grad = g
            opt.step()

        step(episodes[0])  # warm-up
        steps[name], out[name] = step, 0.0
    for ep in episodes[1:]:  # interleaved, so that a slow spell of a shared machine hits all alike
        for name, step in steps.items():
            sync(device)
            start = time.perf_counter()
            step(ep)
            sync(device)
            out[name] += time.perf_counter() - start
    for name in steps:
        out[name] = iters / out[name]
    return out


def sync(device: torch.device) -> None:
    """Wait for ``device``'s queued work (CUDA kernels run asynchronously), so that timings are real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def speed_test(pool: ClassPool, iters: int, settings: tuple[tuple[int, int, int], ...] = SPEED_SETTINGS,
               repeats: int = 3) -> None:
    """Print the MAML speed table: :func:`maml_speed` ``repeats`` times in each (width, meta-batch,
    queries) of ``settings``, one row per repeat, then each setting's ratios to learn2learn."""
    print("MAML meta-iterations/s, 5-way 1-shot, 1 inner step, second order, same meta-batches and Adam step:")
    print("| Conv-4 width | tasks | queries/class | repeat | bilevel-ray grouped | bilevel-ray vmap | learn2learn MAML "
          "| grouped / l2l | vmap / l2l | max abs grad diff |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    ratios = {}
    for width, batch, queries in settings:
        for repeat in range(repeats):
            r = maml_speed(pool, width, batch, queries, iters)
            ratios.setdefault((width, batch, queries), []).append(r["grouped"] / r["l2l"])
            print(f"| {width} | {batch} | {queries} | {repeat + 1} | {r['grouped']:.2f} | {r['vmap']:.2f} | "
                  f"{r['l2l']:.2f} | {r['grouped'] / r['l2l']:.2f}x | {r['vmap'] / r['l2l']:.2f}x | {r['diff']:.1e} |",
                  flush=True)
    print()
    for (width, batch, queries), rs in ratios.items():
        print(f"grouped / learn2learn, width {width}, {batch} tasks, {queries} queries: "
              f"{' / '.join(f'{q:.2f}x' for q in rs)} (lowest {min(rs):.2f}x)")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=4.0, help="training minutes per method")
    parser.add_argument("--tasks", type=int, default=600, help="test tasks per setting")
    parser.add_argument("--methods", nargs="*", default=list(LABELS), choices=list(LABELS),
                        help="methods of the accuracy table (none: the speed test only)")
    parser.add_argument("--width", type=int, default=32, help="channels of the Conv-4 backbone")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--speed-iters", type=int, default=10, help="meta-iterations per method and setting "
                        "of the speed test (0: skip it)")
    parser.add_argument("--speed-repeats", type=int, default=3, help="runs of the speed test in each setting")
    parser.add_argument("--support-warps", type=int, default=8, metavar="N", help="also test each learner adapting "
                        "to N warped copies of each support drawing (magnitude 1; 0: skip)")
    parser.add_argument("--train-acc", action="store_true", help="also test each learner (as trained) on 5-way and "
                        "20-way 1-shot tasks of its own training characters (unrotated, unwarped): the generalization gap")
    parser.add_argument("--save", metavar="DIR", help="save each trained learner as DIR/<method>.pt (for bilevel-ray eval)")
    parser.add_argument("--smoke", action="store_true", help="smoke run (seconds): width 8, 2 steps of SOBA, BOME "
                        "and DSBO, 0.01 min of the others, 5 test tasks, 1 support warp, --train-acc, a 1-iteration "
                        "speed test at width 8")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for SOBA, "
                        "BOME and DSBO (e.g. algorithm.schedule=cosine algorithm.horizon=1100)")
    parser.add_argument("--steps", type=int, default=0, help="train SOBA, BOME and DSBO for exactly this many "
                        "steps instead of --budget minutes (0: the budget); the time taken is printed")
    args = parser.parse_args()
    flushed, tuned = prepare_process(args.threads)  # first: torch's intra-op threads start flushing subnormals
    if (args.set or args.steps) and not set(args.methods) & set(CONFIGS):
        parser.error(f"--set and --steps apply to {', '.join(CONFIGS)}; none of them is in --methods")
    if args.smoke:  # tiny sizes through every code path; a 0 of --speed-iters or --support-warps still skips
        args.width, args.budget, args.tasks, args.steps, args.train_acc = 8, 0.01, 5, 2, True
        args.speed_iters, args.support_warps = min(args.speed_iters, 1), min(args.support_warps, 1)
    configs = {}  # loaded before any training, so that a bad override fails now, not after an hour
    for name in [m for m in args.methods if m in CONFIGS]:
        try:
            configs[name] = bilevel_config(name, args.width, args.set)
        except ValueError as e:
            parser.error(f"--set: {e}")
    train = load_omniglot("images_background_small1")
    unseen = load_omniglot("images_background_small2").select(exclude=train.alphabets)
    pool = ClassPool(train.images, train.labels, rotations=4)
    test = ClassPool(unseen.images, unseen.labels)
    print(f"train: {len(train.classes)} characters of {', '.join(train.alphabets)} (x4 rotations); "
          f"test: {len(unseen.classes)} characters of {', '.join(unseen.alphabets)}")
    length = f"{args.steps} steps per bilevel method, " if args.steps else ""
    print(f"{length}budget {args.budget:g} min per method, {args.tasks} test tasks per setting, Conv-4 width "
          f"{args.width}, {args.threads} threads\n")

    print(f"allocator: {'heap kept (bilevel_ray.prepare_process)' if tuned else 'glibc default'}; subnormal floats: "
          f"{'flushed to zero (bilevel_ray.prepare_process)' if flushed else 'kept'}")
    if args.speed_iters > 0:
        speed_test(pool, args.speed_iters, SMOKE_SPEED_SETTINGS if args.smoke else SPEED_SETTINGS,
                   1 if args.smoke else args.speed_repeats)

    header = f"| method | train steps | {' | '.join(f'{w}-way {k}-shot' for w, k in SETTINGS)} |"
    rows = [header, "|" + "---|" * (2 + len(SETTINGS))]
    for name in args.methods:
        budget_s = 60 * args.budget
        if name in CONFIGS:
            start = time.perf_counter()
            learner, steps = train_bilevel(configs[name], budget_s, args.steps)
            print(f"{LABELS[name]}: {steps} steps in {(time.perf_counter() - start) / 60:.1f} min"
                  + (f" ({' '.join(args.set)})" if args.set else ""), flush=True)
        else:
            learner, steps = train_episodic(name, pool, args.width, budget_s)
        if args.save:
            Path(args.save).mkdir(parents=True, exist_ok=True)
            learner.save(Path(args.save) / f"{name}.pt")
        unseen_acc = {}  # the learner as trained, per setting (the --train-acc gap reuses it)
        variants = [(LABELS[name], learner)]
        if args.support_warps:
            variants.append((f"{LABELS[name]} + {args.support_warps} support warps",
                             learner.with_support_warps(args.support_warps)))
        for label, tested in variants:
            cells = []
            for ways, shots in SETTINGS:
                mean, half, _, constant = evaluate(tested, EpisodeSampler(test, ways, shots, 15), tasks=args.tasks,
                                                   seed=0)
                unseen_acc.setdefault((ways, shots), mean)
                cells.append(f"{100 * mean:.1f} ± {100 * half:.1f}"
                             + (f" (one label for every query on {constant:.0%} of tasks)" if constant else ""))
            rows.append(f"| {label} | {steps} | {' | '.join(cells)} |")
            print(rows[-1], flush=True)
        if args.train_acc:
            seen, gap = ClassPool(train.images, train.labels), []
            for ways in (5, 20):
                acc = evaluate(learner, EpisodeSampler(seen, ways, 1, 15), tasks=args.tasks, seed=0)[0]
                other = unseen_acc[(ways, 1)]
                gap.append(f"{ways}-way 1-shot {100 * acc:.1f} on training characters, {100 * other:.1f} "
                           f"on unseen alphabets (gap {100 * (acc - other):.1f})")
            print(f"{LABELS[name]}: " + "; ".join(gap), flush=True)
    print("\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
