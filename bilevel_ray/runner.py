"""Single-process runner: steps an algorithm on a task and logs metrics to CSV, JSON and a PNG.

Output folder: ``config.yaml`` (the resolved config, written first), ``metrics.csv`` (one line per
logged row, flushed at once), ``metrics.json`` (all rows, written atomically at the end, also when the
run fails) and ``curves.png``.
"""

from __future__ import annotations

import csv
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from bilevel_ray import checkpoint, tree
from bilevel_ray.files import write_text
from bilevel_ray.config import RunConfig
from bilevel_ray.decentralized.backends import AgentFailure, average, consensus_error, make_backend
from bilevel_ray.plotting import plot_curves

__all__ = ["run", "Diverged", "read_rows", "metrics_row", "save_point", "restore_point", "COUNTERS"]

#: agent failures tolerated in one run before it gives up
MAX_FAILURES = 10
#: bookkeeping columns that precede the task's metrics in every row
COUNTERS = ("step", "wall_time", "oracle_calls", "grad_f", "grad_g", "hvp", "jvp")


class Diverged(FloatingPointError):
    """A run stopped on non-finite values at ``step``; its rows so far and last finite checkpoint are kept."""

    def __init__(self, message: str, *, step: int):
        super().__init__(message)
        self.step = step


def run(cfg: RunConfig, *, out_dir: Path | None = None, progress: bool | None = None,
        resume: bool = False) -> list[dict[str, Any]]:
    """Run ``cfg.run.steps`` outer steps and return the logged rows.

    A row is logged at step 0, every ``eval_every`` steps and at the last step: ``step``,
    ``wall_time`` (cumulative seconds in ``task.init``, ``algorithm.init`` and ``algorithm.step``;
    metrics excluded), the cumulative oracle calls (summed over agents) and everything
    ``task.metrics(x, y)`` returns. With several agents, ``x`` and ``y`` are the agents' averages and
    the row adds the consensus error ``mean_i ‖x_i − x̄‖²``, the bytes gossiped in the last round and its
    latency in seconds.
    A metric that becomes non-finite (or ``outer_objective`` non-finite at step 0; a metric undefined
    from the start, such as a mean over an empty set, is kept), or an upper iterate that is not finite
    when a checkpoint is due, or a step that fails on non-finite values stops the run with
    :class:`Diverged` (a ``FloatingPointError`` that names the step) once the rows so far are written;
    the last checkpoint is then the last finite one.

    With ``run.checkpoint_every = k > 0`` every agent's state is saved to ``checkpoint.pt`` every
    ``k`` rounds. An agent that dies mid-run is restarted by Ray and the whole network restarts from
    the last checkpoint (rounds are replayed exactly: every minibatch is a function of
    ``(seed, rank, step)``, so no row is lost or written twice). ``resume=True`` continues a killed run
    from its folder's checkpoint. A task with ``learner(x, y)`` (the few-shot tasks) gets its final model
    (agents averaged) saved as ``learner.pt``, for ``bilevel-ray eval`` and :func:`bilevel_ray.meta.load`.
    """
    from tqdm.auto import tqdm

    out = Path(out_dir) if out_dir is not None else cfg.out_dir
    show = cfg.run.progress if progress is None else progress
    resolved = cfg.to_dict()
    resolved["run"]["out_dir"] = str(out)
    rows: list[dict[str, Any]] = []
    payload = None
    if resume:
        payload = _resume_point(out, resolved)
        rows = read_rows(out / "metrics.csv", upto=payload["round"])
    else:
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "config.yaml", yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True))

    task, algo, steps, every = cfg.task, cfg.algorithm, cfg.run.steps, cfg.run.eval_every
    keep = cfg.run.checkpoint_every
    title = f"{algo.name} on {task.name}"
    backend = None
    bar = tqdm(total=steps, desc=title, disable=not (show and sys.stderr.isatty()), dynamic_ncols=True)
    try:
        with open(out / "metrics.csv", "w", newline="", encoding="utf-8") as fh:
            writer: csv.DictWriter | None = None
            if rows:
                writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
                fh.flush()
            start = time.perf_counter()
            backend = make_backend(task, algo, cfg.decentralized, seed=cfg.run.seed)
            t, wall = 0, 0.0
            if payload is not None:
                t, wall = restore_point(backend, payload)
            _sync()
            wall += time.perf_counter() - start
            snapshot = (t, backend.states())
            bar.update(t)
            logged = rows[-1]["step"] if rows else -1
            saved, failures = t, 0
            while True:
                try:
                    if t > logged and (t % every == 0 or t == steps):
                        row = metrics_row(t, wall, backend, task)
                        if writer is None:
                            writer = csv.DictWriter(fh, fieldnames=list(row))
                            writer.writeheader()
                        elif list(row) != writer.fieldnames:
                            raise ValueError(f"task.metrics: returned keys {list(row)[len(COUNTERS):]} at step "
                                             f"{t}, expected {writer.fieldnames[len(COUNTERS):]}")
                        rows.append(row)
                        writer.writerow(row)
                        fh.flush()
                        logged = t
                        bar.set_postfix(outer=f"{row['outer_objective']:.4g}", refresh=False)
                        _check_finite(rows, out)
                    if keep and t % keep == 0 and t > saved:  # after the step's metrics: only finite rows get one
                        states = backend.states()
                        _check_iterates(states, t, out)  # a diverged iterate never replaces the last checkpoint
                        save_point(out / "checkpoint.pt", t, wall, states)
                        snapshot, saved = (t, states), t
                    if t >= steps:
                        break
                    start = time.perf_counter()
                    try:
                        backend.step()
                    except FloatingPointError as e:  # e.g. a policy whose rollouts are no longer finite
                        raise Diverged(f"run: step {t + 1} met non-finite values ({e}); the last finite checkpoint "
                                       f"and the rows so far are in {out}", step=t + 1) from e
                    finally:
                        _sync()
                        wall += time.perf_counter() - start
                    t += 1
                    bar.update()
                except AgentFailure:
                    # replay from the last checkpoint (wall time keeps counting the lost work)
                    failures += 1
                    if failures > MAX_FAILURES:
                        raise
                    t = snapshot[0]
                    _restore(backend, snapshot[1])
                    bar.reset(total=steps)
                    bar.update(t)
            if hasattr(task, "learner"):  # tasks with a deployable model (few-shot learners) export it
                states = backend.states()
                task.learner(average([s.x for s in states]), average([s.y for s in states])).save(out / "learner.pt")
    finally:
        bar.close()
        if backend is not None:
            backend.close()
        if rows:
            write_text(out / "metrics.json", json.dumps([_json_safe(r) for r in rows], indent=1) + "\n")
            plot_curves(rows, out / "curves.png", title, metrics=[k for k in rows[0] if k not in (*COUNTERS, "round_latency")])
    return rows


def save_point(path: Path, t: int, wall: float, states: list[Any]) -> None:
    """Save every agent's state after round ``t`` (atomically)."""
    checkpoint.save(path, {"round": t, "wall": wall, "states": states})


def restore_point(backend: Any, payload: dict[str, Any]) -> tuple[int, float]:
    """Load a :func:`save_point` payload into ``backend``; returns its round and wall time."""
    template = backend.states()
    backend.load_states([checkpoint.from_plain(p, s) for p, s in zip(payload["states"], template)])
    return payload["round"], payload["wall"]


def _restore(backend: Any, states: list[Any]) -> None:
    """Load ``states`` into every agent, retrying while agents keep failing."""
    for _ in range(MAX_FAILURES):
        try:
            backend.load_states(states)
            return
        except AgentFailure:
            continue
    raise AgentFailure(f"agents kept failing while restoring the last checkpoint ({MAX_FAILURES} tries)")


def _check_finite(rows: list[dict[str, Any]], out: Path) -> None:
    row = rows[-1]
    prev = rows[-2] if len(rows) > 1 else None
    bad = [k for k, v in row.items() if not math.isfinite(v)
           and (math.isfinite(prev[k]) if prev else k == "outer_objective")]
    if bad:
        values = ", ".join(f"{k}={row[k]}" for k in bad)
        raise Diverged(f"run: non-finite metrics at step {row['step']} ({values}); the rows so far are in {out}",
                       step=row["step"])


def _check_iterates(states: list[Any], t: int, out: Path) -> None:
    bad = [i for i, s in enumerate(states) if not bool(torch.isfinite(tree.flatten(s.x)).all())]
    if bad:
        raise Diverged(f"run: the upper iterate x of agent {bad[0]} is not finite after step {t}; the last finite "
                       f"checkpoint and the rows so far are in {out}", step=t)


def _resume_point(out: Path, resolved: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint to resume from, after checking it belongs to this very config."""
    path = out / "checkpoint.pt"
    if not path.exists():
        raise ValueError(f"run.resume: no checkpoint in {out} (set run.checkpoint_every to write one)")
    saved = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))
    for section, body in resolved.items():
        for key, value in body.items():
            if key not in ("progress", "steps") and saved.get(section, {}).get(key) != value:
                raise ValueError(f"{section}.{key}: differs from the checkpointed run in {out} "
                                 f"({saved.get(section, {}).get(key)!r} there, {value!r} here)")
    return checkpoint.load(path)


def read_rows(path: Path, upto: int) -> list[dict[str, Any]]:
    """Rows of an earlier run up to step ``upto`` (later ones are recomputed, never duplicated)."""
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        rows = [{k: (int(v) if k in COUNTERS and k != "wall_time" else float(v)) for k, v in r.items()}
                for r in csv.DictReader(fh)]
    return [r for r in rows if r["step"] <= upto]


def metrics_row(step: int, wall: float, backend: Any, task: Any, states: list[Any] | None = None
                ) -> dict[str, Any]:
    """The row logged at ``step`` (``states``: the backend's, when the caller already fetched them)."""
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


def _sync() -> None:
    """Wait for queued GPU work, so that step timings are real."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _json_safe(row: dict[str, Any]) -> dict[str, Any]:
    """Non-finite floats become ``null`` (strict JSON has no NaN)."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}


