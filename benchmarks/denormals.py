"""Steps per second of a long SOBA run with subnormal floats kept and flushed to zero, in one process.

SOBA's config (``configs/omniglot_soba.yaml``: the episodic prototype form of few-shot Omniglot, class
centres as the lower level, raw embeddings, 60-way 1-shot, 5 queries, one task a step; Adam on the
outer step, held constant) at width 64, one thread. Two copies of the same run (same config and seed) advance in
alternating blocks of ``--block`` steps, one with the CPU's flush-to-zero modes set
(:func:`bilevel_ray.flush_denormals`), one without (the mode is the main thread's, and one thread does
all the work), so that a slow spell of a shared machine hits both alike. Subnormals appear only after
a few thousand steps (README, Results: at 2500 steps), so the default is long:

    .venv/bin/python benchmarks/denormals.py [--steps 4000] [--block 250] [--width 64] [--smoke]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from omniglot import bilevel_config  # noqa: E402

from bilevel_ray.allocator import keep_heap  # noqa: E402
from bilevel_ray.decentralized.backends import make_backend  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4000, help="steps of each run")
    parser.add_argument("--block", type=int, default=250, help="steps between switches and printed rates")
    parser.add_argument("--width", type=int, default=64, help="channels of the Conv-4 backbone")
    parser.add_argument("--smoke", action="store_true",
                        help="smoke run (seconds): width 8, 2 blocks of 3 steps (too few for subnormals to appear)")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.block, args.width = 6, 3, 8
    torch.set_num_threads(1)
    keep_heap()
    if not torch.set_flush_denormal(True):
        if not args.smoke:
            sys.exit("this CPU has no flush-to-zero mode: nothing to compare")
        print("this CPU has no flush-to-zero mode: both smoke runs keep subnormals")
    cfg = bilevel_config("soba", args.width, [])
    runs = {mode: make_backend(cfg.task, cfg.algorithm, cfg.decentralized, seed=cfg.run.seed)
            for mode in ("flushed", "kept")}
    print(f"SOBA, episodic prototype task, width {args.width}, 1 thread; steps/s per block of {args.block}")
    print("| steps | flushed | kept | flushed / kept |")
    print("|---|---|---|---|")
    try:
        for done in range(args.block, args.steps + 1, args.block):
            rate = {}
            for mode, backend in runs.items():
                torch.set_flush_denormal(mode == "flushed")
                start = time.perf_counter()
                for _ in range(args.block):
                    backend.step()
                rate[mode] = args.block / (time.perf_counter() - start)
            print(f"| {done} | {rate['flushed']:.2f} | {rate['kept']:.2f} | {rate['flushed'] / rate['kept']:.2f}x |",
                  flush=True)
    finally:
        for backend in runs.values():
            backend.close()


if __name__ == "__main__":
    main()
