"""``bilevel-ray run``: drives the :class:`~bilevel_ray.loop.OuterLoop` and logs its rows to CSV, JSON and a PNG.

Output folder: ``config.yaml`` (the resolved config, written first), ``metrics.csv`` (one line per
logged row, flushed at once), TensorBoard events of the same rows (``tensorboard --logdir`` the folder),
``metrics.json`` (all rows, written atomically at the end, also when the run fails) and ``curves.png``.
"""

from __future__ import annotations

import csv
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from bilevel_ray import checkpoint
from bilevel_ray.config import RunConfig
from bilevel_ray.decentralized.backends import average, driver_device, make_backend
from bilevel_ray.device import to_device
from bilevel_ray.files import write_text
from bilevel_ray.loop import COUNTERS, Diverged, OuterLoop, sync_device, every_k, metrics_row
from bilevel_ray.plotting import plot_curves

__all__ = ["run", "Diverged", "read_rows", "metrics_row", "save_point", "restore_point", "COUNTERS"]


def run(cfg: RunConfig, *, out_dir: Path | None = None, progress: bool | None = None,
        resume: bool = False) -> list[dict[str, Any]]:
    """Run ``cfg.run.steps`` outer steps and return the logged rows.

    A row (see :func:`~bilevel_ray.loop.metrics_row`) is logged at step 0, every ``eval_every`` steps
    and at the last step.
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
    from torch.utils.tensorboard import SummaryWriter
    from tqdm.auto import tqdm

    driver_device(cfg.run.device, cfg.decentralized)  # a device this machine lacks fails before any work
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

    task, algo = cfg.task, cfg.algorithm
    title = f"{algo.name} on {task.name}"
    backend = None
    bar = tqdm(total=cfg.run.steps, desc=title, disable=not (show and sys.stderr.isatty()), dynamic_ncols=True)
    # TensorBoard events next to metrics.csv; a resumed run drops the events after its checkpoint
    events = SummaryWriter(log_dir=str(out), purge_step=payload["round"] + 1 if payload is not None else None)
    try:
        with open(out / "metrics.csv", "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0])) if rows else None
            if writer is not None:
                writer.writeheader()
                writer.writerows(rows)
                fh.flush()

            def emit(t: int, wall: float, row: dict[str, Any] | None, states: list[Any] | None) -> None:
                nonlocal writer
                if row is not None:
                    if writer is None:
                        writer = csv.DictWriter(fh, fieldnames=list(row))
                        writer.writeheader()
                    rows.append(row)
                    writer.writerow(row)
                    fh.flush()
                    for key, value in row.items():
                        if key != "step":
                            events.add_scalar(key, value, global_step=t)
                    events.flush()
                    bar.set_postfix(outer=f"{row['outer_objective']:.4g}", refresh=False)
                if states is not None:
                    save_point(out / "checkpoint.pt", t, wall, states)

            def progress(t: int) -> None:
                bar.update(t - bar.n)  # rate-limited redraw; a replay moves the bar back

            start = time.perf_counter()
            backend = make_backend(task, algo, cfg.decentralized, seed=cfg.run.seed, device=cfg.run.device,
                                   dtype=cfg.run.dtype)
            task = backend.task  # on the run's device (the same object where that is the CPU)
            t, wall = restore_point(backend, payload) if payload is not None else (0, 0.0)
            sync_device()
            wall += time.perf_counter() - start
            OuterLoop(backend, task, steps=cfg.run.steps, eval_every=cfg.run.eval_every,
                      checkpoint_due=every_k(cfg.run.checkpoint_every), start=t, wall=wall,
                      last_row=rows[-1] if rows else None, where=str(out), progress=progress).run(emit)
            if hasattr(task, "learner"):  # tasks with a deployable model (few-shot learners) export it
                states = to_device(backend.states(), "cpu")  # a learner loads on any machine
                task.learner(average([s.x for s in states]), average([s.y for s in states])).save(out / "learner.pt")
    finally:
        bar.close()
        events.close()
        if backend is not None:
            backend.close()
        if rows:
            write_text(out / "metrics.json", json.dumps([_json_safe(r) for r in rows], indent=1) + "\n")
            plot_curves(rows, out / "curves.png", title, metrics=[k for k in rows[0] if k not in (*COUNTERS, "round_latency")])
    return rows


def save_point(path: Path, t: int, wall: float, states: list[Any]) -> None:
    """Save every agent's state after round ``t`` (atomically, on the CPU: it loads on any device)."""
    checkpoint.save(path, {"round": t, "wall": wall, "states": to_device(states, "cpu")})


def restore_point(backend: Any, payload: dict[str, Any]) -> tuple[int, float]:
    """Load a :func:`save_point` payload into ``backend``; returns its round and wall time."""
    template = backend.states()
    backend.load_states([checkpoint.from_plain(p, s) for p, s in zip(payload["states"], template)])
    return payload["round"], payload["wall"]





def _resume_point(out: Path, resolved: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint to resume from, after checking it belongs to this very config."""
    path = out / "checkpoint.pt"
    if not path.exists():
        raise ValueError(f"run.resume: no checkpoint in {out} (set run.checkpoint_every to write one)")
    saved = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))
    for section, body in resolved.items():
        for key, value in body.items():
            # the length of the run and where it computes may change on resume
            if key not in ("progress", "steps", "device", "gpus_per_agent") and saved.get(section, {}).get(key) != value:
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




def _json_safe(row: dict[str, Any]) -> dict[str, Any]:
    """Non-finite floats become ``null`` (strict JSON has no NaN)."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}


