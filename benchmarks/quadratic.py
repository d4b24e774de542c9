"""SOBA and SABA on the reference stochastic quadratic problems P1 and P2 (shared/BENCHMARK_PROBLEMS.md).

Prints, for each problem and algorithm: seconds per 1000 steps (median of ``--repeats`` blocks, after a
warm-up block; metric evaluation excluded) and the exact ``‖∇h(x)‖²`` reached after the reference
number of steps (SOBA 8192, SABA 4096), next to the reference JAX timings quoted in that file for this
machine type. One intra-op thread (state of the art on 2 shared cores for these sizes). Then SABA's
accuracy on ``--draws`` draws of P1's family (``task.seed`` 0, 1, …), each with ``--orders`` minibatch
orders (the algorithm's seed 0, 1, …): ‖∇h‖² after 4096 steps with the reference's settings (steps 0.1,
zero memory). The family is the reference generator's (``task.basis: reference``: the eigenbases of P
and Q reflect e_1 onto one Gaussian direction, as its generator takes them).

    .venv/bin/python benchmarks/quadratic.py [--repeats 3] [--problems P1 P2] [--draws 3] [--orders 3] [--smoke]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bilevel_ray import algorithms
from bilevel_ray.tasks import make_task

PROBLEMS = {
    "P1": dict(n_inner=32768, n_outer=1024, dim_y=100, dim_x=10),
    "P2": dict(n_inner=1024, n_outer=1024, dim_y=100, dim_x=100),
}
# minibatches in shuffled passes, as the reference's sampler draws them (SAGA's memory is then refreshed
# once per pass)
COMMON = dict(mu=0.1, L_yy=1.0, L_xx=1.0, q_min=0.0, L_c=0.1, x0=-2.0, batch_size=64, dtype="float32",
              sampling="epochs", basis="reference")
#: SABA as benchmark_bilevel runs it (step_size 0.1, outer_ratio 1, memory initialised at zero); on this
#: family steps of 0.15 end 1.7-5x higher after 4096 steps
REFERENCE_SABA = dict(inner_lr=0.1, outer_lr=0.1, memory="zero")
# SOBA: step sizes from a small grid on P1 (ρ, γ ∈ {0.02 … 1}) for the final ‖∇h‖²
SETTINGS = {
    "soba": (dict(inner_lr=0.5, outer_lr=0.5, schedule="sqrt"), 8192),
    "saba": (REFERENCE_SABA, 4096),
}
REFERENCE = {  # JAX, jit-compiled, same machine type (seconds per 1000 steps; ‖∇h‖² reached on P1)
    ("P1", "soba"): (0.9, "1.9e-3"), ("P1", "saba"): (1.15, "2.3e-10"),
    ("P2", "soba"): (2.3, "-"), ("P2", "saba"): (3.0, "-"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed blocks of 1000 steps after the warm-up block")
    parser.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS))
    parser.add_argument("--draws", type=int, default=3, help="draws of P1's family for SABA's accuracy (0: none)")
    parser.add_argument("--orders", type=int, default=3, help="minibatch orders (algorithm seeds) per draw")
    parser.add_argument("--smoke", action="store_true",
                        help="smoke run (seconds): 60 steps per algorithm in blocks of 20 (times scaled to 1000 steps)")
    args = parser.parse_args()
    block = 20 if args.smoke else 1000
    torch.set_num_threads(1)
    print(f"{'problem':8}{'algo':6}{'s/1000 steps':>14}{'JAX ref':>9}{'ratio':>7}{'steps':>7}"
          f"{'‖∇h‖² start':>13}{'‖∇h‖² end':>12}{'ref end':>10}")
    for pname in args.problems:
        task = make_task("quadratic", **PROBLEMS[pname], **COMMON)
        for name, (hyper, steps) in SETTINGS.items():
            steps = 3 * block if args.smoke else steps
            algo = algorithms.make(name, **hyper)
            x, y = task.init()
            state = algo.init(task, x, y, seed=0)
            start = task.metrics(state.x, state.y)["grad_norm_sq"]
            blocks, done = [], 0
            while done < steps:
                n = min(block, steps - done)
                t0 = time.perf_counter()
                for _ in range(n):
                    state = algo.step(state, task)
                if n == block:
                    blocks.append(time.perf_counter() - t0)
                done += n
            timed = blocks[1:1 + args.repeats] or blocks
            per_1000 = statistics.median(timed) * 1000 / block
            end = task.metrics(state.x, state.y)["grad_norm_sq"]
            ref_t, ref_end = REFERENCE[(pname, name)]
            print(f"{pname:8}{name:6}{per_1000:14.2f}{ref_t:9.2f}{per_1000 / ref_t:7.2f}{steps:7d}"
                  f"{start:13.3e}{end:12.3e}{ref_end:>10}")
    steps, draws, orders = (60, min(args.draws, 1), 1) if args.smoke else (4096, args.draws, args.orders)
    if draws and "P1" in args.problems:
        print(f"\nSABA (steps 0.1, zero memory) on draws of P1's family, ‖∇h‖² after {steps} steps per minibatch "
              f"order (the reference's draw: 11.55 → 2.3e-10):")
        print(f"{'draw':6}{'start':>10}" + "".join(f"{f'order {k}':>12}" for k in range(orders)))
        for draw in range(draws):
            task = make_task("quadratic", **PROBLEMS["P1"], **COMMON, seed=draw)
            x, y = task.init()
            ends = [saba_end(task, REFERENCE_SABA, steps, seed) for seed in range(orders)]
            print(f"{draw:<6}{task.metrics(x, y)['grad_norm_sq']:10.2e}" + "".join(f"{e:12.2e}" for e in ends),
                  flush=True)


def saba_end(task, hyper: dict, steps: int, seed: int) -> float:
    """‖∇h‖² after ``steps`` SABA steps with ``hyper`` (minibatch order from ``seed``) from the task's start."""
    algo = algorithms.make("saba", **hyper)
    x, y = task.init()
    state = algo.init(task, x, y, seed=seed)
    for _ in range(steps):
        state = algo.step(state, task)
    return task.metrics(state.x, state.y)["grad_norm_sq"]


if __name__ == "__main__":
    main()
