"""The outer loop that ``bilevel-ray run`` and every Ray Tune trial drive.

:class:`OuterLoop` steps a backend, logs a metrics row at step 0, every ``eval_every`` steps and at
the last step, takes checkpoints when its policy says so, replays from the last checkpoint when an agent
dies (:class:`~bilevel_ray.decentralized.backends.AgentFailure`) and stops on non-finite values with
:class:`Diverged`. Where rows and checkpoints go is the caller's: a CSV and ``checkpoint.pt`` for the
runner, ``ray.tune.report`` for a trial. Any other exception (a bug, a bad plug-in) propagates at once
with its own traceback; the rows emitted so far are already with the caller.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import torch

from bilevel_ray import tree
from bilevel_ray.decentralized.backends import AgentFailure, average, consensus_error

__all__ = ["OuterLoop", "Diverged", "metrics_row", "every_k", "sync_device", "COUNTERS", "MAX_FAILURES"]

#: agent failures tolerated in one run before it gives up
MAX_FAILURES = 10
#: bookkeeping columns that precede the task's metrics in every row
COUNTERS = ("step", "wall_time", "oracle_calls", "grad_f", "grad_g", "hvp", "jvp")

#: ``emit(t, wall, row, states)``: a logged row (or None) and the states to checkpoint (or None)
Emit = Callable[[int, float, "dict[str, Any] | None", "list[Any] | None"], None]


class Diverged(FloatingPointError):
    """A run stopped on non-finite values at ``step``; its rows so far and last finite checkpoint are kept."""

    def __init__(self, message: str, *, step: int):
        super().__init__(message)
        self.step = step


def every_k(k: int) -> Callable[[int, bool], bool]:
    """Checkpoint policy: every ``k`` rounds (never when ``k == 0``), logged or not."""
    return lambda t, logged: bool(k) and t % k == 0


class OuterLoop:
    """Steps ``backend`` from round ``start`` to ``steps``; see the module docstring.

    ``checkpoint_due(t, logged)`` says whether round ``t`` (``logged``: a row is logged at ``t``) gets a
    checkpoint; ``last_row`` is the last row an earlier (resumed) run logged and ``logged`` the last
    step with a row (default: ``last_row``'s, or none); ``where`` names the place
    the caller keeps rows and checkpoints, for error messages; ``progress(t)`` is called at every round.
    """

    def __init__(self, backend: Any, task: Any, *, steps: int, eval_every: int,
                 checkpoint_due: Callable[[int, bool], bool], start: int = 0, wall: float = 0.0,
                 last_row: dict[str, Any] | None = None, logged: int | None = None,
                 where: str = "the output folder",
                 progress: Callable[[int], None] | None = None, max_failures: int = MAX_FAILURES):
        self.backend, self.task, self.steps, self.every = backend, task, steps, eval_every
        self.checkpoint_due, self.where, self.progress = checkpoint_due, where, progress or (lambda t: None)
        self.max_failures = max_failures
        self.t, self.wall, self.last_row = start, wall, last_row
        self.logged = logged if logged is not None else last_row["step"] if last_row else -1
        self.failures = 0

    def run(self, emit: Emit) -> None:
        """Run to the last step, handing every row and checkpoint to ``emit`` (each round at most once)."""
        backend = self.backend
        saved = self.t
        snapshot = (self.t, backend.states())
        self.progress(self.t)
        while True:
            try:
                t = self.t
                row = states = None
                if t > self.logged and (t % self.every == 0 or t == self.steps):
                    states = backend.states()
                    row = metrics_row(t, self.wall, backend, self.task, states)
                    if self.last_row is not None and list(row) != list(self.last_row):
                        raise ValueError(f"task.metrics: returned keys {list(row)[len(COUNTERS):]} at step {t}, "
                                         f"expected {list(self.last_row)[len(COUNTERS):]}")
                bad = self._nonfinite(row) if row is not None else ""
                save = not bad and t > saved and self.checkpoint_due(t, row is not None)
                if save:
                    states = states if states is not None else backend.states()
                    broken = [i for i, s in enumerate(states) if not bool(torch.isfinite(tree.flatten(s.x)).all())]
                    if broken:
                        save = False
                        bad = (f"the upper iterate x of agent {broken[0]} is not finite after step {t}; the last "
                               f"finite checkpoint and the rows so far are in {self.where}")
                if row is not None or save:
                    emit(t, self.wall, row, states if save else None)
                if row is not None:
                    self.last_row, self.logged = row, t
                if bad:
                    raise Diverged(f"run: {bad}", step=t)
                if save:
                    snapshot, saved = (t, states), t
                if t >= self.steps:
                    return
                self._step()
                self.progress(self.t)
            except AgentFailure:
                # replay from the last checkpoint (wall time keeps counting the lost work)
                self.failures += 1
                if self.failures > self.max_failures:
                    raise
                self.t = snapshot[0]
                self._restore(snapshot[1])
                self.progress(self.t)

    def _step(self) -> None:
        start = time.perf_counter()
        try:
            self.backend.step()
        except FloatingPointError as e:  # e.g. a policy whose rollouts are no longer finite
            raise Diverged(f"run: step {self.t + 1} met non-finite values ({e}); the last finite checkpoint "
                           f"and the rows so far are in {self.where}", step=self.t + 1) from e
        finally:
            sync_device()
            self.wall += time.perf_counter() - start
        self.t += 1

    def _nonfinite(self, row: dict[str, Any]) -> str:
        """Why ``row`` ends the run ('' if it does not): a metric that turned non-finite, or a non-finite
        ``outer_objective`` at the first row (a metric undefined from the start, such as a mean over an
        empty set, is kept)."""
        prev = self.last_row
        bad = [k for k, v in row.items() if not math.isfinite(v)
               and (math.isfinite(prev[k]) if prev else k == "outer_objective")]
        if not bad:
            return ""
        values = ", ".join(f"{k}={row[k]}" for k in bad)
        return f"non-finite metrics at step {row['step']} ({values}); the rows so far are in {self.where}"

    def _restore(self, states: list[Any]) -> None:
        """Load ``states`` into every agent, retrying while agents keep failing."""
        for _ in range(self.max_failures):
            try:
                self.backend.load_states(states)
                return
            except AgentFailure:
                continue
        raise AgentFailure(f"agents kept failing while restoring the last checkpoint ({self.max_failures} tries)")


def metrics_row(step: int, wall: float, backend: Any, task: Any, states: list[Any] | None = None
                ) -> dict[str, Any]:
    """The row logged at ``step`` (``states``: the backend's, when the caller already fetched them).

    ``step``, ``wall_time`` (cumulative seconds in ``task.init``, ``algorithm.init`` and
    ``algorithm.step``; metrics excluded), the cumulative oracle calls (summed over agents) and everything
    ``task.metrics(x, y)`` returns. With several agents, ``x`` and ``y`` are the agents' averages and the
    row adds the consensus error ``mean_i ‖x_i − x̄‖²``, the bytes gossiped in the last round and its
    latency in seconds."""
    states = backend.states() if states is None else states
    calls = [sum(getattr(s.calls, k) for s in states) for k in COUNTERS[3:]]
    row: dict[str, Any] = {"step": step, "wall_time": wall, "oracle_calls": int(sum(calls)),
                           **dict(zip(COUNTERS[3:], map(int, calls)))}
    if len(states) == 1:
        metrics = task.metrics(states[0].x, states[0].y)
    else:
        xs = [s.x for s in states]
        metrics = task.metrics(average(xs), average([s.y for s in states]))
        row.update(consensus_error=consensus_error(xs), bytes_per_round=float(backend.bytes_last_round),
                   round_latency=float(backend.latency_last_round))
    for key, value in metrics.items():
        if key in row:
            raise ValueError(f"task.metrics: key {key!r} clashes with a runner column")
        row[key] = float(value)
    return row


def sync_device() -> None:
    """Wait for queued GPU work, so that step timings are real."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
