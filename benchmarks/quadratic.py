"""SOBA and SABA on the reference stochastic quadratic problems P1 and P2 (shared/BENCHMARK_PROBLEMS.md).

Prints, for each problem and algorithm: seconds per 1000 steps (median of ``--repeats`` blocks, after a
warm-up block; metric evaluation excluded) and the exact ``‖∇h(x)‖²`` reached after the reference
number of steps (SOBA 8192, SABA 4096), next to the reference JAX timings quoted in that file for this
machine type. One intra-op thread (state of the art on 2 shared cores for these sizes). Then SABA's
accuracy on ``--draws`` draws of P1's family (``task.seed`` 0, 1, …): ‖∇h‖² after 4096 steps with the
reference's settings (steps 0.1, zero memory) and with this benchmark's (steps 0.15, zero memory).

    .venv/bin/python benchmarks/quadratic.py [--repeats 3] [--problems P1 P2] [--draws 3] [--smoke]
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
              sampling="epochs")
# SOBA: step sizes from a small grid on P1 (ρ, γ ∈ {0.02 … 1}) for the final ‖∇h‖². SABA: the reference's zero
# memory; steps of 0.15 from a grid of ρ = γ ∈ {0.1, 0.12, 0.15, 0.2} (and 0.15/0.1) on three draws of P1, where
# they end 2-60x lower after 4096 steps than the reference's 0.1 and below 0.12's and 0.2's
SETTINGS = {
    "soba": (dict(inner_lr=0.5, outer_lr=0.5, schedule="sqrt"), 8192),
    "saba": (dict(inner_lr=0.15, outer_lr=0.15, memory="zero"), 4096),
}
#: SABA as benchmark_bilevel runs it (step_size 0.1, outer_ratio 1, memory initialised at zero)
REFERENCE_SABA = dict(inner_lr=0.1, outer_lr=0.1, memory="zero")
REFERENCE = {  # JAX, jit-compiled, same machine type (seconds per 1000 steps; ‖∇h‖² reached on P1)
    ("P1", "soba"): (0.9, "1.9e-3"), ("P1", "saba"): (1.15, "2.3e-10"),
    ("P2", "soba"): (2.3, "-"), ("P2", "saba"): (3.0, "-"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed blocks of 1000 steps after the warm-up block")
    parser.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS))
    parser.add_argument("--draws", type=int, default=3, help="draws of P1's family for SABA's accuracy (0: none)")
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
    steps, draws = (60, min(args.draws, 1)) if args.smoke else (4096, args.draws)
    if draws and "P1" in args.problems:
        print(f"\nSABA on draws of P1's family, ‖∇h‖² after {steps} steps (the reference's draw: 11.55 → 2.3e-10):")
        print(f"{'draw':6}{'start':>10}{'reference settings':>20}{'this benchmark':>16}")
        for draw in range(draws):
            task = make_task("quadratic", **PROBLEMS["P1"], **COMMON, seed=draw)
            ends = [saba_end(task, hyper, steps) for hyper in (REFERENCE_SABA, SETTINGS["saba"][0])]
            x, y = task.init()
            print(f"{draw:<6}{task.metrics(x, y)['grad_norm_sq']:10.2e}{ends[0]:20.2e}{ends[1]:16.2e}")


def saba_end(task, hyper: dict, steps: int) -> float:
    """‖∇h‖² after ``steps`` SABA steps with ``hyper`` from the task's starting point."""
    algo = algorithms.make("saba", **hyper)
    x, y = task.init()
    state = algo.init(task, x, y, seed=0)
    for _ in range(steps):
        state = algo.step(state, task)
    return task.metrics(state.x, state.y)["grad_norm_sq"]


if __name__ == "__main__":
    main()
