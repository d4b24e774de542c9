"""Cost of the oracles of ``bilevel_ray.oracles`` (and of one SOBA step) on MLP and conv bilevel problems.

Two problems on synthetic Gaussian data (10 classes from a random teacher), float32, batch 256:

* ``repr`` (hyper-representation): ``x`` = MLP backbone 128→256→256 (ReLU, 98,816 parameters),
  ``y`` = linear head 256→10 (2,570); ``g`` = cross-entropy on a train batch + ½·1e-3‖y‖²,
  ``f`` = cross-entropy on a validation batch.
* ``wd`` (weight decay): ``y`` = the whole MLP 128→256→256→10 (101,386 parameters), ``x`` = one log
  weight decay per layer (3); ``g`` = CE + ½ Σ_l exp(x_l)‖W_l‖², ``f`` = validation CE.

and ``conv``, the few-shot Omniglot task of ``configs/omniglot_dsbo_ring4.yaml`` (real drawings from
``../shared/data/omniglot``; ``x`` = Conv-4 backbone of width 32 with group norm, ``y`` = a class
centre per training class, ``g`` on one meta-batch of the config's tasks, 1 drawing per class,
``f`` on 5 per class; ``--batch`` does not apply).

For each problem, in one run, every operation is timed round-robin (so that the noise of a shared
machine hits all of them alike): after a warm-up, each repeat times a block of calls lasting ≥
``--min-block`` seconds; the table shows the median time per call and the median, over repeats, of
the time relative to ``grad_xy`` measured in the same repeat. Operations: ``grad_xy`` (∇_x g, ∇_y g),
``hvp`` (∇²_yy g·v), ``cross`` (∇²_xy g·v), ``fused_fwd``/``fused_rev`` (∇_y g and both products) and
one SOBA step (``algorithms.make("soba")``, always from the same state, with the library's
``oracles.fused``). Rows marked ``*`` are timed for comparison only: a forward pass without autograd;
the gradient, HVP and fused triple on the ``torch.func`` path (:func:`bilevel_ray.oracles.torch_func_only`)
instead of the library's default plain-autograd one (``torch.autograd.grad``, ``create_graph=True``
double backward); a SOBA step with the other fused variant, and one on the ``torch.func`` path (checked
equal to the library's step). The summary gives each ``torch.func`` time over the library's.

``--profile`` adds (about 2 minutes) a ``torch.profiler`` breakdown of the main oracles per problem:
wall time vs time inside ATen ops (the difference is Python and dispatch overhead), time, count and
FLOPs of the matrix products (the compute), and the number of ATen ops. Intra-op threads:
``--threads`` (default 2, the machine's cores), set once up front by
:func:`bilevel_ray.runtime.prepare_process`, which also flushes subnormals and keeps the heap.

    .venv/bin/python benchmarks/oracles.py [--repeats 7] [--threads 2] [--batch 256] [--problems repr wd conv] [--profile]
                                           [--smoke]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_leaves, tree_map

from bilevel_ray import algorithms, oracles
from bilevel_ray.device import resolve_device, to_device
from bilevel_ray.problem import FiniteSampler, check_problem
from bilevel_ray.runtime import prepare_process

Params = dict[str, torch.Tensor]
Batch = tuple[torch.Tensor, torch.Tensor]
SIZES = (128, 256, 256, 10)
#: goals of the MLP problems (on ``conv`` a SOBA step's f batch holds 5× the drawings of g's)
GOALS = {"hvp": 2.5, "soba_step": 4.5}


def mlp(p: Params, inp: torch.Tensor) -> torch.Tensor:
    """Logits of the MLP whose layer ``l`` is ``p[f"w{l}"], p[f"b{l}"]`` (ReLU between layers)."""
    n = len(SIZES) - 1
    h = inp
    for layer in range(n):
        h = F.linear(h, p[f"w{layer}"], p[f"b{layer}"])
        if layer < n - 1:
            h = torch.relu(h)
    return h


def init_mlp(seed: int) -> Params:
    gen = torch.Generator().manual_seed(seed)
    p: Params = {}
    for layer, (a, b) in enumerate(zip(SIZES[:-1], SIZES[1:])):
        p[f"w{layer}"] = torch.randn(b, a, generator=gen) / math.sqrt(a)
        p[f"b{layer}"] = torch.zeros(b)
    return p


def synthetic(n: int, seed: int) -> Batch:
    """Gaussian inputs labelled by a random two-layer teacher (10 classes)."""
    gen = torch.Generator().manual_seed(seed)
    inp = torch.randn(n, SIZES[0], generator=gen)
    teacher = torch.randn(SIZES[0], 64, generator=gen), torch.randn(64, SIZES[-1], generator=gen)
    return inp, (torch.tanh(inp @ teacher[0]) @ teacher[1]).argmax(1)


@dataclass(frozen=True)
class MLPBilevel:
    """An MLP bilevel problem satisfying ``bilevel_ray.BilevelProblem`` (``mode`` is ``repr`` or ``wd``)."""

    mode: str
    inner: FiniteSampler
    outer: FiniteSampler
    ridge: float = 1e-3

    @classmethod
    def create(cls, mode: str, batch_size: int, num_batches: int = 8) -> "MLPBilevel":
        n = batch_size * num_batches
        inner, outer = (FiniteSampler(synthetic(n, seed), batch_size, seed) for seed in (0, 1))
        return cls(mode, inner, outer)

    def _params(self, x: Params, y: Params) -> Params:
        return {**x, **y} if self.mode == "repr" else y

    def f(self, x: Params, y: Params, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(mlp(self._params(x, y), batch[0]), batch[1])

    def g(self, x: Params, y: Params, batch: Batch) -> torch.Tensor:
        loss = F.cross_entropy(mlp(self._params(x, y), batch[0]), batch[1])
        if self.mode == "repr":
            return loss + 0.5 * self.ridge * sum((t * t).sum() for t in y.values())
        decay = torch.exp(x["log_wd"])
        return loss + 0.5 * sum(decay[i] * (y[f"w{i}"] ** 2).sum() for i in range(len(SIZES) - 1))

    def init(self, *, seed: int = 0) -> tuple[Params, Params]:
        p = init_mlp(seed)
        last = len(SIZES) - 2
        if self.mode == "repr":
            head = {k: p.pop(k) for k in (f"w{last}", f"b{last}")}
            return p, head
        return {"log_wd": torch.full((last + 1,), math.log(1e-4))}, p


def func_only(op: Callable[[], Any]) -> Callable[[], Any]:
    """``op`` with every oracle on its ``torch.func`` path (:func:`bilevel_ray.oracles.torch_func_only`)."""
    def run() -> Any:
        with oracles.torch_func_only():
            return op()
    return run


# -- timing ------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    """Wait for the queued work of ``device`` (CUDA kernels run asynchronously), so that timings are real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(ops: dict[str, Callable[[], Any]], repeats: int, min_block: float,
          device: torch.device = torch.device("cpu")) -> dict[str, list[float]]:
    """Seconds per call of each op, one entry per repeat; ops are interleaved within each repeat."""
    calls = {}
    for name, op in ops.items():
        for _ in range(3):
            op()
        sync(device)
        t0 = time.perf_counter()
        op()
        sync(device)
        calls[name] = max(1, math.ceil(min_block / max(time.perf_counter() - t0, 1e-6)))
    times: dict[str, list[float]] = {name: [] for name in ops}
    for _ in range(repeats):
        for name, op in ops.items():
            sync(device)
            t0 = time.perf_counter()
            for _ in range(calls[name]):
                op()
            sync(device)
            times[name].append((time.perf_counter() - t0) / calls[name])
    return times


def conv_problem() -> tuple[Any, Any]:
    """The few-shot Omniglot task of the DSBO config (width 32) and an inner batch of it."""
    from bilevel_ray.config import load_config

    task = load_config("configs/omniglot_dsbo_ring4.yaml", ["task.test_split=null"]).task
    return task, task.inner.sample(np.random.default_rng(0))[1]


def run_problem(mode: str, args: argparse.Namespace) -> dict[str, float]:
    """Time every operation on problem ``mode`` on ``args.device`` (default the CPU); print the table and
    return each operation's median time relative to ``grad_xy``."""
    device = resolve_device(getattr(args, "device", "cpu"))
    if mode == "conv":
        problem, batch = conv_problem()
        batch_label = f"{problem.meta_batch} × {problem.ways}"
    else:
        problem = MLPBilevel.create(mode, args.batch)
        batch, batch_label = problem.inner.batch(0), str(args.batch)
    check_problem(problem)
    problem, batch = to_device((problem, batch), device)
    x, y = to_device(problem.init(seed=0), device)
    gen = torch.Generator().manual_seed(1)
    v = tree_map(lambda t: torch.randn(t.shape, generator=gen).to(device), y)
    g = problem.g
    # consistency of the two fused variants with the separate products, and of the torch.func path
    ref = (oracles.grad_y(g, x, y, batch), oracles.cross(g, x, y, v, batch), oracles.hvp(g, x, y, v, batch))
    func = func_only(lambda: (*oracles.fused_rev(g, x, y, v, batch), oracles.hvp(g, x, y, v, batch)))()
    for got, want in ((oracles.fused_fwd(g, x, y, v, batch), ref), (oracles.fused_rev(g, x, y, v, batch), ref),
                      (func, (*ref, ref[2]))):
        for a, b in zip(tree_leaves(got), tree_leaves(want)):  # float32: relative to each tensor's norm
            assert float((a - b).norm()) <= 1e-3 * float(b.norm()) + 1e-6, float((a - b).norm() / b.norm())

    soba = algorithms.make("soba", inner_lr=0.01, outer_lr=0.001, schedule="constant")
    state = soba.init(problem, x, y, seed=0)
    for _ in range(3):  # so that v is not zero
        state = soba.step(state, problem)
    lib_fused = oracles.fused
    lib_name = {oracles.fused_rev: "fused_rev", oracles.fused_fwd: "fused_fwd"}.get(lib_fused, "?")
    other_name, other = (("fused_fwd", oracles.fused_fwd) if lib_name == "fused_rev"
                         else ("fused_rev", oracles.fused_rev))

    def soba_with(**patch: Callable) -> Callable[[], Any]:
        """A SOBA step with some of ``oracles``' functions replaced (restored after the step)."""
        saved = {name: getattr(oracles, name) for name in patch}

        def op() -> Any:
            for name, fn in patch.items():
                setattr(oracles, name, fn)
            try:
                return soba.step(state, problem)
            finally:
                for name, fn in saved.items():
                    setattr(oracles, name, fn)
        return op

    # a step with torch.func oracles must equal the library's (autograd) step
    func_step = func_only(lambda: soba.step(state, problem))
    for a, b in zip(tree_leaves(func_step()[:3]), tree_leaves(soba.step(state, problem)[:3])):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)

    ops: dict[str, Callable[[], Any]] = {
        "grad_xy": lambda: oracles.grad_xy(g, x, y, batch),
        "hvp": lambda: oracles.hvp(g, x, y, v, batch),
        "cross": lambda: oracles.cross(g, x, y, v, batch),
        "fused_fwd": lambda: oracles.fused_fwd(g, x, y, v, batch),
        "fused_rev": lambda: oracles.fused_rev(g, x, y, v, batch),
        "soba_step": lambda: soba.step(state, problem),
        f"soba_step[{other_name}]*": soba_with(fused=other),
        "soba_step[torch.func]*": func_step,
        "forward no-grad*": lambda: _no_grad(g, x, y, batch),
        "torch.func grad_xy*": func_only(lambda: oracles.grad_xy(g, x, y, batch)),
        "torch.func hvp*": func_only(lambda: oracles.hvp(g, x, y, v, batch)),
        "torch.func fused_rev*": func_only(lambda: oracles.fused_rev(g, x, y, v, batch)),
    }
    times = bench(ops, args.repeats, args.min_block, device)
    base = times["grad_xy"]
    dims = sum(t.numel() for t in tree_leaves(x)), sum(t.numel() for t in tree_leaves(y))
    print(f"\n[{mode}] dim x = {dims[0]:,}, dim y = {dims[1]:,}, batch {batch_label}, "
          f"oracles.fused = {lib_name}, {args.repeats} repeats, {device}")
    print(f"{'operation':26}{'median ms':>10}{'min ms':>9}{'/ grad_xy':>11}{'goal':>7}")
    ratios = {}
    for name, ts in times.items():
        ratio = statistics.median(t / b for t, b in zip(ts, base))
        ratios[name] = ratio
        goal = GOALS.get(name) if mode != "conv" else None  # conv: f's batch is 5× g's, see the docstring
        mark = "" if goal is None else (f"≤{goal}" + (" ok" if ratio <= goal else " MISS"))
        print(f"{name:26}{1e3 * statistics.median(ts):10.3f}{1e3 * min(ts):9.3f}{ratio:11.2f}  {mark}")
    if args.profile:
        profile_ops(mode, {k: ops[k] for k in PROFILED})
    return ratios


PROFILED = ("grad_xy", "hvp", "cross", "fused_rev", "fused_fwd", "torch.func grad_xy*", "torch.func hvp*",
            "torch.func fused_rev*")
MATMUL = {"aten::mm", "aten::addmm", "aten::bmm"}  # the kernels (not the aten::linear/matmul wrappers)


def profile_ops(mode: str, ops: dict[str, Callable[[], Any]], calls: int = 10, rounds: int = 3) -> None:
    """Per call, under ``torch.profiler`` (the round with the least wall time of ``rounds``): wall time,
    time inside ATen ops (Σ self CPU), time, count and FLOPs of matrix products, count of ATen ops.
    Wall − ATen ≈ Python / torch.func dispatch overhead (plus the profiler's own)."""
    from torch.profiler import ProfilerActivity, profile

    print(f"\n[{mode}] torch.profiler, per call (best of {rounds} rounds of {calls} calls):")
    print(f"{'operation':26}{'wall ms':>9}{'aten ms':>9}{'matmul ms':>11}{'#matmul':>9}{'MFLOP':>8}"
          f"{'#aten ops':>11}")
    for name, op in ops.items():
        best: tuple[float, Any] | None = None
        for _ in range(rounds):
            op()
            with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
                t0 = time.perf_counter()
                for _ in range(calls):
                    op()
                wall = (time.perf_counter() - t0) / calls
            if best is None or wall < best[0]:
                best = wall, prof.key_averages()
        wall, events = best
        aten = [e for e in events if e.key.startswith("aten::")]
        mm = [e for e in aten if e.key in MATMUL]
        per = lambda es, attr: sum(getattr(e, attr) for e in es) / calls  # noqa: E731
        print(f"{name:26}{1e3 * wall:9.2f}{per(aten, 'self_cpu_time_total') / 1e3:9.2f}"
              f"{per(mm, 'self_cpu_time_total') / 1e3:11.2f}{per(mm, 'count'):9.1f}"
              f"{per(mm, 'flops') / 1e6:8.1f}{per(aten, 'count'):11.1f}")


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence the profiler backend's log lines, written straight to file descriptor 2."""
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _no_grad(g: Callable, x: Params, y: Params, batch: Batch) -> torch.Tensor:
    with torch.no_grad():
        return g(x, y, batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--min-block", type=float, default=0.2, help="seconds per timed block")
    parser.add_argument("--problems", nargs="+", default=["repr", "wd", "conv"], choices=["repr", "wd", "conv"])
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--device", default="cpu", help="where the problems live (cpu, cuda, cuda:N)")
    parser.add_argument("--smoke", action="store_true",
                        help="smoke run (seconds): MLP batch 16, 1 repeat of 5 ms blocks (times and ratios meaningless)")
    args = parser.parse_args()
    if args.smoke:
        args.batch, args.repeats, args.min_block = 16, 1, 0.005
    warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", FutureWarning)  # torch.func jvp
    prepare_process(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op thread(s), float32, {args.device}")
    results = {mode: run_problem(mode, args) for mode in args.problems}
    print("\nsummary (median over repeats of op time / grad_xy time in the same repeat)")
    print(f"{'problem':9}{'hvp':>7}{'soba':>7}{'fused_fwd':>11}{'fused_rev':>11}   torch.func / library: "
          f"{'grad':>6}{'hvp':>6}{'fused':>7}{'soba':>6}  faster fused")
    for mode, r in results.items():
        faster = "fused_rev" if r["fused_rev"] < r["fused_fwd"] else "fused_fwd"
        slow = [r[f"torch.func {op}*"] / r[op] for op in ("grad_xy", "hvp", "fused_rev")]
        slow.append(r["soba_step[torch.func]*"] / r["soba_step"])
        print(f"{mode:9}{r['hvp']:7.2f}{r['soba_step']:7.2f}{r['fused_fwd']:11.2f}{r['fused_rev']:11.2f}"
              f"{'':24}{slow[0]:6.2f}{slow[1]:6.2f}{slow[2]:7.2f}{slow[3]:6.2f}  {faster}")
    votes = ["fused_rev" if r["fused_rev"] < r["fused_fwd"] else "fused_fwd" for r in results.values()]
    print(f"goals: hvp/grad ≤ {GOALS['hvp']}, soba/grad ≤ {GOALS['soba_step']}; "
          f"faster fused on every problem: {votes[0] if len(set(votes)) == 1 else 'mixed: ' + ', '.join(votes)}")


if __name__ == "__main__":
    main()
