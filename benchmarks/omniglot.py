"""Few-shot Omniglot on the minimal splits, offline: accuracy after a fixed CPU budget, and MAML speed.

Meta-training uses ``images_background_small1`` (5 alphabets, 136 characters; rotations as extra
classes); testing uses the alphabets of ``images_background_small2`` that are not in small1
(Japanese (katakana), Sanskrit, Tagalog: 106 characters never seen in training). For each method,
training stops after ``--budget`` minutes of wall time (this process, ``--threads`` torch threads);
then 5-way 1-shot, 5-way 5-shot and 20-way 1-shot accuracy over ``--tasks`` test tasks (15 queries
per class) with normal 95% intervals.

* SOBA, BOME: the hyper-representation bilevel task (``configs/omniglot_soba.yaml``,
  ``configs/omniglot_bome.yaml``): backbone ``x``, class-head table ``y``; new tasks fit a ridge head.
* DSBO: the same task, 4 agents on a ring, each on its own alphabets, vectorized simulation
  (``configs/omniglot_dsbo_ring4.yaml``); the agents' average backbone is tested.
* MAML: second-order MAML (1 inner step, zero-initialised head: any number of ways), vmapped over the
  meta-batch; ProtoNet: prototypical networks (reference).

Speed: meta-iterations per second of our MAML (``torch.func`` + ``vmap`` over tasks) and of
learn2learn's ``MAML`` (clone/adapt per task) on the same ``ConvNet`` (learned 5-way head), the same
meta-batches (5-way 1-shot, ``--speed-batch`` tasks, 15 queries) and the same Adam step, after checking
that both give the same meta-gradient.

    .venv/bin/python benchmarks/omniglot.py [--budget 4] [--tasks 600] [--methods soba bome dsbo maml protonet]
                                            [--width 32] [--threads 2] [--save DIR] [--quick]
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
from bilevel_ray.meta import evaluate
from bilevel_ray.meta.learners import meta_loss_and_grad
from bilevel_ray.meta.train import meta_train
from bilevel_ray.tasks.vision.backbone import ConvNet, init_backbone
from bilevel_ray.tasks.vision.episodes import ClassPool, EpisodeSampler
from bilevel_ray.tasks.vision.omniglot import load_omniglot

SETTINGS = ((5, 1), (5, 5), (20, 1))
CONFIGS = {"soba": "configs/omniglot_soba.yaml", "bome": "configs/omniglot_bome.yaml",
           "dsbo": "configs/omniglot_dsbo_ring4.yaml"}
LABELS = {"soba": "SOBA (hyper-repr.)", "bome": "BOME (hyper-repr.)", "dsbo": "DSBO, 4 agents, ring",
          "maml": "MAML (2nd order)", "protonet": "ProtoNet"}


def train_bilevel(name: str, width: int, budget_s: float) -> tuple[Any, int]:
    cfg = load_config(CONFIGS[name], [f"task.width={width}", "task.test_split=null"])
    backend = make_backend(cfg.task, cfg.algorithm, cfg.decentralized, seed=cfg.run.seed)
    start, steps = time.perf_counter(), 0
    try:
        while time.perf_counter() - start < budget_s:
            backend.step()
            steps += 1
        states = backend.states()
    finally:
        backend.close()
    return cfg.task.learner(average([s.x for s in states]), average([s.y for s in states])), steps


def train_episodic(kind: str, pool: ClassPool, width: int, budget_s: float) -> tuple[Any, int]:
    sampler = EpisodeSampler(pool, 5 if kind == "maml" else 20, 1, 5, meta_batch=16 if kind == "maml" else 8)
    learner = meta_train(kind, sampler, budget_s=budget_s, width=width, meta_lr=1e-3,
                         train_split="images_background_small1")
    return learner, learner.hyper["steps_trained"]


def maml_speed(pool: ClassPool, width: int, batch: int, iters: int) -> tuple[float, float, float]:
    """(ours it/s, learn2learn it/s, max |meta-gradient difference|) on identical meta-batches."""
    import learn2learn as l2l

    sampler = EpisodeSampler(pool, 5, 1, 15, meta_batch=batch)
    episodes = [sampler.episodes(np.random.default_rng([1, i])) for i in range(iters + 1)]
    net = ConvNet(init_backbone(width=width, seed=0), ways=5)
    torch.nn.init.normal_(net.head.weight, std=0.01)
    theta = {k: v.detach().clone().requires_grad_(True) for k, v in net.named_parameters()}
    hyper = {"steps": 1, "lr": 0.4}

    def ours_grads(ep):
        return meta_loss_and_grad("maml", {k: v.detach() for k, v in theta.items()}, hyper, ep)[1]

    def ours_step(ep, opt):
        for k, g in ours_grads(ep).items():
            theta[k].grad = g
        opt.step()

    maml = l2l.algorithms.MAML(net, lr=0.4, first_order=False)

    def l2l_grads(ep):
        maml.zero_grad()
        for b in range(ep.support.shape[0]):
            learner = maml.clone()
            learner.adapt(F.cross_entropy(learner(ep.support[b]), ep.support_labels[b]))
            (F.cross_entropy(learner(ep.query[b]), ep.query_labels[b]) / ep.support.shape[0]).backward()
        return {k: p.grad for k, p in maml.module.named_parameters()}

    def l2l_step(ep, opt):
        l2l_grads(ep)
        opt.step()

    # same meta-gradient at the same point (before any update)
    g_ours, g_l2l = ours_grads(episodes[0]), l2l_grads(episodes[0])
    diff = max(float((g_ours[k] - g_l2l[k]).abs().max()) for k in g_ours)

    rates = {}
    for name, step, params in (("ours", ours_step, list(theta.values())), ("l2l", l2l_step, list(maml.parameters()))):
        opt = torch.optim.Adam(params, lr=1e-3)
        step(episodes[0], opt)  # warm-up
        start = time.perf_counter()
        for ep in episodes[1:]:
            step(ep, opt)
        rates[name] = iters / (time.perf_counter() - start)
    return rates["ours"], rates["l2l"], diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=4.0, help="training minutes per method")
    parser.add_argument("--tasks", type=int, default=600, help="test tasks per setting")
    parser.add_argument("--methods", nargs="*", default=list(LABELS), choices=list(LABELS),
                        help="methods of the accuracy table (none: the speed test only)")
    parser.add_argument("--width", type=int, default=32, help="channels of the Conv-4 backbone")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--speed-batch", type=int, default=16, help="tasks per meta-batch in the speed test")
    parser.add_argument("--speed-iters", type=int, default=10)
    parser.add_argument("--save", metavar="DIR", help="save each trained learner as DIR/<method>.pt (for bilevel-ray eval)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 0.2 min, 50 tasks, 3 iterations")
    args = parser.parse_args()
    if args.quick:
        args.budget, args.tasks, args.speed_iters = 0.2, 50, 3
    torch.set_num_threads(args.threads)
    train = load_omniglot("images_background_small1")
    unseen = load_omniglot("images_background_small2").select(exclude=train.alphabets)
    pool = ClassPool(train.images, train.labels, rotations=4)
    test = ClassPool(unseen.images, unseen.labels)
    print(f"train: {len(train.classes)} characters of {', '.join(train.alphabets)} (x4 rotations); "
          f"test: {len(unseen.classes)} characters of {', '.join(unseen.alphabets)}")
    print(f"budget {args.budget:g} min per method, {args.tasks} test tasks per setting, Conv-4 width "
          f"{args.width}, {args.threads} threads\n")

    ours, theirs, diff = maml_speed(pool, args.width, args.speed_batch, args.speed_iters)
    print(f"MAML meta-iterations/s (5-way 1-shot, {args.speed_batch} tasks, 15 queries, 1 inner step, 2nd order):")
    print(f"  bilevel-ray (vmap) {ours:.3f}   learn2learn MAML {theirs:.3f}   ratio {ours / theirs:.2f}x   "
          f"(max |grad diff| {diff:.1e})\n")

    header = f"| method | train steps | {' | '.join(f'{w}-way {k}-shot' for w, k in SETTINGS)} |"
    rows = [header, "|" + "---|" * (2 + len(SETTINGS))]
    for name in args.methods:
        budget_s = 60 * args.budget
        if name in CONFIGS:
            learner, steps = train_bilevel(name, args.width, budget_s)
        else:
            learner, steps = train_episodic(name, pool, args.width, budget_s)
        if args.save:
            Path(args.save).mkdir(parents=True, exist_ok=True)
            learner.save(Path(args.save) / f"{name}.pt")
        cells = []
        for ways, shots in SETTINGS:
            mean, half, _ = evaluate(learner, EpisodeSampler(test, ways, shots, 15), tasks=args.tasks, seed=0)
            cells.append(f"{100 * mean:.1f} ± {100 * half:.1f}")
        rows.append(f"| {LABELS[name]} | {steps} | {' | '.join(cells)} |")
        print(rows[-1], flush=True)
    print("\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
