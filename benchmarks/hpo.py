"""Time to a target suboptimality of every registered algorithm on logistic-regression HPO.

Task: ``make_task("logreg_hpo", dataset=..., batch_size=64)`` (one log ℓ2 weight per feature; float64;
breast_cancer 569 × 30, or synthetic 4000 × 100 with ``n_samples=4000, n_features=100``). The target
is relative: ``h(x) − h* ≤ target · (h(x0) − h*)`` with ``h`` the exact value (``task.value``, a Newton
solve of the lower level) and ``h*`` from ``task.optimum()``. Default targets (``TARGETS``): 0.1 on
breast_cancer (90% of the initial gap closed), 0.05 on synthetic. Tighter ones are out of reach of
several methods here: on breast_cancer ``h*`` (≈ 0.005) lies where some features are almost
unregularized on nearly separable data; the lower level gets ill-conditioned on the way and the
constant-step methods stall or diverge first.

Each algorithm runs from ``task.init()`` (after an untimed warm-up) until the target,
``--budget-seconds`` or ``--max-steps`` outer steps. ``h`` is evaluated every ``--eval-every`` outer
steps; evaluation time is not counted: the wall and CPU (``time.process_time``) times cover ``init`` and
the steps only. The budget is in CPU seconds, so that other jobs on a shared machine change the wall
time but not which runs reach the target; steps and oracle calls (``state.calls.total``, init included;
one call = one oracle on one minibatch) are deterministic. One intra-op thread (these problems are far
too small for two).

Hyperparameters (``SETTINGS``) come from ``--tune``: for each algorithm a grid over its two step sizes
(``GRIDS``; the other hyperparameters fixed as in ``STRUCTURE``), ``--tune-budget`` CPU seconds per
point; the point reaching the target in the least CPU time wins; if none reaches it, the 3 with the
lowest final suboptimality are re-run with the full budget and the best of those wins.

    .venv/bin/python benchmarks/hpo.py [--dataset all|breast_cancer|synthetic] [--budget-seconds 12]
                                       [--target REL] [--algorithms soba saba ...] [--tune] [--smoke]
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from bilevel_ray import algorithms
from bilevel_ray.tasks import make_task

DATASETS: dict[str, dict[str, Any]] = {
    "breast_cancer": dict(dataset="breast_cancer", batch_size=64),
    "synthetic": dict(dataset="synthetic", n_samples=4000, n_features=100, batch_size=64),
}
#: default relative targets: the tightest that (almost) every tuned algorithm reaches in the budget
TARGETS = {"breast_cancer": 0.1, "synthetic": 0.05}

# Hyperparameters held fixed (not tuned). The Neumann / linear-system step follows the inner step
# (coupled in GRIDS below); MGBiO-family μ below the Hessian's smallest eigenvalue along the path.
STRUCTURE: dict[str, dict[str, Any]] = {
    "soba": dict(schedule="constant"),
    "saba": {},
    "bome": dict(inner_steps=10),
    "mgbio": dict(mu=1e-3),
    "msgbio": dict(mu=1e-3),
    "vr_msgbio": dict(mu=1e-3),
    "stocbio": dict(inner_steps=5, neumann_steps=20),
    "aid_cg": dict(inner_steps=5, cg_steps=10),
    "itd": dict(inner_steps=10),
    "dsbo": dict(inner_steps=5, linear_steps=10),
    "dsbo_gt": dict(inner_steps=5, linear_steps=10),
    "d_soba": {},
}
COUPLED = {"stocbio": "neumann_lr", "dsbo": "linear_lr", "dsbo_gt": "linear_lr", "d_soba": "linear_lr"}
OUTER_GRID = (3.0, 10.0, 30.0, 100.0)
INNER_GRID = (0.1, 0.3, 1.0)
GRIDS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    name: (OUTER_GRID, INNER_GRID) for name in STRUCTURE}
GRIDS["bome"] = ((0.1, 0.3, 1.0, 3.0), INNER_GRID)  # ξ moves y as well: smaller

# (outer_lr, inner_lr) per dataset: the output of `--tune` (default targets, --tune-budget 4,
# --budget-seconds 12, 1 thread; 2 cores shared with other jobs). outer_lr=100 tops the grid and wins
# for most; at 100 every algorithm but MGBiO diverges with some inner_lr (SOBA, SABA, D-SOBA with
# several), so larger steps were not tried. BOME stalls at an O(ξ) distance: ξ=10 (a first trial) did
# worse than ξ=3. Changed by hand on breast_cancer, where the tuned points reach the budget unreached
# and diverge a few hundred steps later on an idle machine (the tuning ran on a loaded one): ITD
# (10, 1) → (10, 0.3) and stocBiO (100, 0.3) → (30, 0.3), both stable for ≥ 4000 steps (ITD plateaus
# at ≈ 0.22 relative, stocBiO is at ≈ 0.17 after 40 s).
SETTINGS: dict[str, dict[str, tuple[float, float]]] = {
    "breast_cancer": {
        "aid_cg": (100.0, 1.0), "bome": (3.0, 1.0), "d_soba": (30.0, 1.0), "dsbo": (100.0, 1.0),
        "dsbo_gt": (100.0, 1.0), "itd": (10.0, 0.3), "mgbio": (100.0, 1.0), "msgbio": (100.0, 1.0),
        "saba": (10.0, 0.3), "soba": (30.0, 1.0), "stocbio": (30.0, 0.3), "vr_msgbio": (100.0, 1.0),
    },
    "synthetic": {
        "aid_cg": (100.0, 0.3), "bome": (3.0, 1.0), "d_soba": (100.0, 0.1), "dsbo": (100.0, 0.3),
        "dsbo_gt": (100.0, 0.3), "itd": (100.0, 0.3), "mgbio": (100.0, 1.0), "msgbio": (100.0, 0.3),
        "saba": (100.0, 0.3), "soba": (30.0, 0.3), "stocbio": (100.0, 0.3), "vr_msgbio": (100.0, 0.3),
    },
}


def tunable() -> list[str]:
    """Every registered algorithm with an outer step size (``outer_lr``; MAML-TRPO's trust-region step is
    meta-RL only)."""
    return [name for name in algorithms.available() if "outer_lr" in algorithms.get(name).field_docs()]


def hyper(name: str, outer_lr: float, inner_lr: float) -> dict[str, Any]:
    h = dict(STRUCTURE.get(name, {}), outer_lr=outer_lr, inner_lr=inner_lr)
    if name in COUPLED:
        h[COUPLED[name]] = inner_lr
    return h


@dataclass
class Result:
    reached: bool
    wall: float
    cpu: float
    steps: int
    calls: int
    subopt: float
    status: str


def run(task: Any, name: str, h: dict[str, Any], *, hstar: float, target: float, budget: float,
        max_steps: int, eval_every: int) -> Result:
    """Run ``name`` until ``h(x) − h* ≤ target`` (absolute), the time budget or ``max_steps``, after an
    untimed warm-up (a throwaway init and 3 steps: the first torch.func calls take seconds)."""
    x0, y0 = task.init(seed=0)
    algo = algorithms.make(name, **h)
    warm = algo.init(task, x0, y0, seed=1)
    for _ in range(3):
        warm = algo.step(warm, task)
    t0, c0 = time.perf_counter(), time.process_time()
    state = algo.init(task, x0, y0, seed=0)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    subopt = float(task.value(state.x)) - hstar
    while subopt > target and cpu < budget and state.t < max_steps:
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(eval_every):
            state = algo.step(state, task)
        wall, cpu = wall + time.perf_counter() - t0, cpu + time.process_time() - c0
        finite = bool(torch.isfinite(state.x).all())
        subopt = float(task.value(state.x)) - hstar if finite else math.nan
        if not math.isfinite(subopt):
            return Result(False, wall, cpu, state.t, state.calls.total, math.nan, "diverged")
    reached = subopt <= target
    status = "yes" if reached else ("budget" if cpu >= budget else "max steps")
    return Result(reached, wall, cpu, state.t, state.calls.total, subopt, status)


def tune(task: Any, name: str, args: argparse.Namespace, hstar: float, target: float) -> tuple[float, float]:
    """The grid point reaching ``target`` in the least CPU time within ``--tune-budget``; if none does,
    the 3 lowest final suboptimalities are re-run with the full ``--budget-seconds`` (a short run
    favours steps that diverge later) and the best of those wins."""
    def score(olr: float, ilr: float, budget: float) -> tuple[float, float]:
        r = run(task, name, hyper(name, olr, ilr), hstar=hstar, target=target, budget=budget,
                max_steps=args.max_steps, eval_every=args.eval_every)
        print(f"    tune {name:10} outer_lr={olr:<6g} inner_lr={ilr:<5g} budget {budget:<5g} {r.status:9} "
              f"{r.cpu:7.2f} cpu s, subopt {r.subopt:.3e}", flush=True)
        return r.cpu if r.reached else math.inf, r.subopt if math.isfinite(r.subopt) else math.inf

    grid = GRIDS.get(name, (OUTER_GRID, INNER_GRID))
    scores = {p: score(*p, args.tune_budget) for p in itertools.product(*grid)}
    if min(scores.values())[0] == math.inf:
        finalists = sorted(scores, key=lambda p: scores[p][1])[:3]
        scores = {p: score(*p, args.budget_seconds) for p in finalists}
    return min(scores, key=lambda p: scores[p])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="all", choices=["all", *DATASETS])
    parser.add_argument("--budget-seconds", type=float, default=12.0,
                        help="per algorithm: CPU seconds of init + steps")
    parser.add_argument("--target", type=float, default=None,
                        help="relative to h(x0) − h*; default per dataset, see TARGETS")
    parser.add_argument("--max-steps", type=int, default=100_000)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--algorithms", nargs="+", default=None,
                        help="default: every registered algorithm with an outer_lr")
    parser.add_argument("--tune", action="store_true", help="grid-search the step sizes first")
    parser.add_argument("--tune-budget", type=float, default=4.0, help="CPU seconds per grid point")
    parser.add_argument("--smoke", action="store_true", help="smoke run (seconds): 10 steps per run (evaluated "
                        "every 5), budgets of 0.2 CPU seconds")
    args = parser.parse_args()
    if args.smoke:
        args.max_steps, args.eval_every, args.budget_seconds, args.tune_budget = 10, 5, 0.2, 0.2
    warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", FutureWarning)
    torch.set_num_threads(1)
    names = args.algorithms or tunable()
    datasets = list(DATASETS) if args.dataset == "all" else [args.dataset]
    for ds in datasets:
        task = make_task("logreg_hpo", **DATASETS[ds])
        hstar = task.optimum()
        gap0 = float(task.value(task.init(seed=0)[0])) - hstar
        rel_target = args.target if args.target is not None else TARGETS[ds]
        target = rel_target * gap0
        print(f"\n{ds}: dim x = dim y = {task.dim}, {task.inner.num_batches} inner / {task.outer.num_batches} "
              f"outer minibatches of 64, h* = {hstar:.6f}, h(x0) − h* = {gap0:.4f}, target h − h* ≤ "
              f"{rel_target:g}·{gap0:.4f} = {target:.3e}; budget {args.budget_seconds:g} s, eval every "
              f"{args.eval_every} steps (not timed), 1 thread")
        chosen = {}
        for name in names:
            chosen[name] = (tune(task, name, args, hstar, target) if args.tune
                            else SETTINGS[ds].get(name, (10.0, 0.3)))
        if args.tune:
            print(f"    tuned {ds!r}: {{{', '.join(f'{n!r}: {v}' for n, v in chosen.items())}}}")
        print(f"{'algorithm':11}{'hyperparameters':68}{'wall s':>8}{'cpu s':>8}{'calls':>8}{'steps':>7}"
              f"{'reached':>10}{'h − h*':>11}{'rel':>7}")
        for name in names:
            h = hyper(name, *chosen[name])
            r = run(task, name, h, hstar=hstar, target=target, budget=args.budget_seconds,
                    max_steps=args.max_steps, eval_every=args.eval_every)
            hs = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in h.items())
            print(f"{name:11}{hs:68}{r.wall:8.2f}{r.cpu:8.2f}{r.calls:8d}{r.steps:7d}{r.status:>10}"
                  f"{r.subopt:11.3e}{r.subopt / gap0:7.3f}", flush=True)


if __name__ == "__main__":
    main()
