"""Ray Tune sweeps of the outer loop over any ``bilevel-ray`` config (centralized or decentralized).

A config's ``tune`` section names the search space as ``section.field: "distribution(args)"`` and how to
search it::

    tune:
      param_space: {algorithm.outer_lr: "loguniform(1e-3, 1.0)", algorithm.inner_lr: "choice([0.1, 0.3])"}
      num_samples: 8
      scheduler: asha          # fifo | asha | pbt
      search: random           # random | grid | optuna (pip install 'bilevel-ray[optuna]')
      metric: rel_error
      mode: min

Every trial runs the config with its sampled values through the same backends as ``bilevel-ray run``
and calls ``ray.tune.report`` at every logged row (``run.eval_every``; 1 reports every outer step)
with a ``tune.Checkpoint`` of every agent's state (every ``run.checkpoint_every`` rounds when that is
set, and at the last row), so PBT exploits and retried trials continue from the round they left
(rows gain ``restored_step``: the round a trial was restored at, -1 if never).
A trial asks for a ``PlacementGroupFactory`` of one bundle for itself plus one per Ray agent, and the
agents are placed in that trial's bundles: trials never compete for agent CPUs or deadlock.
"""

from __future__ import annotations

import ast
import copy
import csv
import io
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Mapping

import yaml

from bilevel_ray.config import SECTIONS, ConfigError, from_dict
from bilevel_ray.files import write_text
from bilevel_ray.params import Params, hp

__all__ = ["TuneSettings", "Sweep", "parse_space", "validate", "make_tuner", "trial_resources", "summarize",
           "format_table", "SPACES"]

#: search-space forms of ``tune.param_space`` and the Tune domain each maps to
SPACES = {"uniform": 2, "loguniform": 2, "quniform": 3, "qloguniform": 3, "randint": 2, "lograndint": 2,
          "choice": 1, "grid": 1}
_RUN_SECTIONS = tuple(s for s in SECTIONS if s != "tune")
_FORM = re.compile(r"^\s*([A-Za-z_]\w*)\s*\((.*)\)\s*$", re.S)


@dataclass(frozen=True)
class TuneSettings(Params):
    """The ``tune`` section of a config."""

    section: ClassVar[str] = "tune"

    param_space: dict | None = hp(None, doc="section.field: distribution, e.g. algorithm.outer_lr: loguniform(1e-4, 1e-1)")
    num_samples: int = hp(8, low=1, strict=False, doc="trials (with grid entries: repeats of the grid)")
    metric: str = hp("outer_objective", doc="a column of the run's rows")
    mode: str = hp("min", choices=("min", "max"), doc="minimize or maximize the metric")
    scheduler: str = hp("fifo", choices=("fifo", "asha", "pbt"), doc="trial scheduler")
    search: str = hp("random", choices=("random", "grid", "optuna"), doc="search algorithm")
    max_concurrent_trials: int = hp(0, low=0, strict=False, doc="0: as many as the cluster fits")
    max_failures: int = hp(2, low=-1, strict=False, doc="retries of a failed trial from its checkpoint (-1: forever)")
    grace_period: int = hp(2, low=1, strict=False, doc="asha: reports before a trial can be stopped")
    reduction_factor: float = hp(2.0, low=1, doc="asha: keep 1 / reduction_factor at each rung")
    perturbation_interval: int = hp(2, low=1, strict=False, doc="pbt: reports between exploit/explore")
    synch: bool = hp(False, doc="pbt: exploit/explore only once every trial has reached the interval "
                                "(the exploits then do not depend on which trial ran first; the fastest wait)")
    seed: int = hp(0, low=0, strict=False, doc="seed of random and optuna search (trials use run.seed; "
                                                "PBT's perturbations draw from Python's global RNG)")
    name: str | None = hp(None, doc="experiment name (default: the config file's stem)")
    storage: str | None = hp(None, doc="folder holding experiments (default: runs/tune)")
    gpus_per_trial: float = hp(0.0, low=0, strict=False, doc="GPU share of a trial's own bundle (the trial's process computes on "
                                               "it with run.device auto or cuda); Ray agents' shares come from "
                                               "decentralized.gpus_per_agent")


@dataclass(frozen=True)
class Space:
    """One parsed ``param_space`` entry."""

    key: str
    form: str  # a SPACES key, or "constant"
    args: tuple

    def domain(self) -> Any:
        from ray import tune

        if self.form == "constant":
            return self.args[0]
        if self.form == "grid":
            return tune.grid_search(list(self.args[0]))
        if self.form == "choice":
            return tune.choice(list(self.args[0]))
        return getattr(tune, self.form)(*self.args)

    def example(self) -> Any:
        """A value of the space (for validating the config before any trial starts)."""
        if self.form == "constant":
            return self.args[0]
        if self.form in ("grid", "choice"):
            return list(self.args[0])[0]
        return self.args[0]


@dataclass(frozen=True)
class Sweep:
    """A validated sweep: settings, parsed search space, the run sections trials start from, and one
    trial's :class:`~bilevel_ray.config.RunConfig` (the spaces' first values)."""

    settings: TuneSettings
    spaces: list[Space]
    base: dict[str, Any]
    cfg: Any


def parse_space(raw: Any) -> list[Space]:
    """Parse ``tune.param_space`` (a mapping ``section.field → value or "form(args)"``)."""
    if not isinstance(raw, Mapping) or not raw:
        raise ConfigError("tune.param_space: must be a non-empty mapping of section.field: search space")
    allowed = ", ".join(f"{k}({', '.join('abq'[:n]) if n > 1 else '[values]'})" for k, n in SPACES.items())
    spaces = []
    for key, value in raw.items():
        where = f"tune.param_space.{key}"
        section, dot, field = str(key).partition(".")
        if not dot or section not in _RUN_SECTIONS or not field or "." in field:
            raise ConfigError(f"{where}: keys look like section.field with section one of "
                              f"{', '.join(_RUN_SECTIONS)}")
        match = _FORM.match(value) if isinstance(value, str) else None
        if match is None:
            spaces.append(Space(key, "constant", (value,)))
            continue
        form, body = match.groups()
        if form not in SPACES:
            raise ConfigError(f"{where}: unknown search space {form!r}; allowed: {allowed}")
        try:
            args = ast.literal_eval(f"({body},)") if body.strip() else ()
        except (ValueError, SyntaxError):
            raise ConfigError(f"{where}: cannot parse the arguments of {value!r}") from None
        if len(args) != SPACES[form]:
            raise ConfigError(f"{where}: {form} takes {SPACES[form]} argument(s), got {len(args)}")
        if form in ("choice", "grid"):
            if not isinstance(args[0], (list, tuple)) or not args[0]:
                raise ConfigError(f"{where}: {form} needs a non-empty list, got {args[0]!r}")
        else:
            if not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
                raise ConfigError(f"{where}: {form} needs numbers, got {value!r}")
            if not args[0] < args[1]:
                raise ConfigError(f"{where}: {form} needs low < high, got {value!r}")
            if form.startswith(("log", "qlog")) and args[0] <= 0:
                raise ConfigError(f"{where}: {form} needs low > 0, got {value!r}")
            if form in ("randint", "lograndint") and not all(isinstance(a, int) for a in args):
                raise ConfigError(f"{where}: {form} needs integers, got {value!r}")
        spaces.append(Space(key, form, tuple(args)))
    return spaces


def apply_params(base: Mapping[str, Mapping[str, Any]], params: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``base`` sections with ``section.field`` values set."""
    out = {name: dict(body or {}) for name, body in base.items()}
    for key, value in params.items():
        section, _, field = key.partition(".")
        out.setdefault(section, {})[field] = value
    return out


def trial_resources(decentralized: Any, gpus_per_trial: float = 0.0) -> Any:
    """One bundle for the trial itself (a CPU and ``gpus_per_trial`` of a GPU), plus one per agent when
    agents are Ray actors (a CPU and ``decentralized.gpus_per_agent``)."""
    from ray.tune import PlacementGroupFactory

    from bilevel_ray.decentralized.ray_backend import bundle

    bundles = [bundle(1.0, gpus_per_trial)]
    if decentralized.backend == "ray":
        bundles += [bundle(1.0, decentralized.gpus_per_agent)] * decentralized.agents
    strategy = "PACK" if len(bundles) == 1 else decentralized.placement
    return PlacementGroupFactory(bundles, strategy=strategy)


def _trial(config: dict[str, Any], base: dict[str, Any], metric: str, mode: str) -> None:
    """The Tune trainable: one run of ``base`` with this trial's values through the same
    :class:`~bilevel_ray.loop.OuterLoop` as ``bilevel-ray run`` (agent-failure replay and divergence stop
    included), each row reported with a checkpoint every ``run.checkpoint_every`` rounds (every row when
    that is 0) and at the last."""
    import ray
    from ray import tune

    from bilevel_ray import checkpoint
    from bilevel_ray.decentralized.backends import make_backend
    from bilevel_ray.loop import Diverged, OuterLoop
    from bilevel_ray.runner import restore_point, save_point

    cfg = from_dict(apply_params(base, config))
    pg = ray.util.get_current_placement_group()
    start = time.perf_counter()
    backend = make_backend(cfg.task, cfg.algorithm, cfg.decentralized, seed=cfg.run.seed,
                           placement_group=pg, first_bundle=1, device=cfg.run.device,
                           dtype=cfg.run.dtype)
    try:
        t, wall, restored = 0, time.perf_counter() - start, -1
        saved = tune.get_checkpoint()
        if saved is not None:
            with saved.as_directory() as folder:
                t, wall = restore_point(backend, checkpoint.load(Path(folder) / "checkpoint.pt"))
            restored = t
        agents_pg = getattr(backend, "pg", None)
        placements = backend.placements() if hasattr(backend, "placements") else []
        extra = {"restored_step": restored, "trial_bundles": len(pg.bundle_specs) if pg else 0,
                 "agents_in_trial_group": int(agents_pg is not None and pg is not None and agents_pg.id == pg.id),
                 # GPUs Ray gave the trial's process and its agents (shares of one GPU count once each)
                 "trial_gpus": len(ray.get_gpu_ids()), "agent_gpus": sum(len(p["gpu_ids"]) for p in placements)}
        steps, keep = cfg.run.steps, cfg.run.checkpoint_every

        def emit(t: int, wall: float, row: dict[str, Any] | None, states: list[Any] | None) -> None:
            row = {**row, **extra}
            if not math.isfinite(row.get(metric, math.nan)):  # the worst value: schedulers rank it last
                row[metric] = math.inf if mode == "min" else -math.inf
            if states is None:
                tune.report(row)
                return
            with tempfile.TemporaryDirectory() as folder:
                save_point(Path(folder) / "checkpoint.pt", t, wall, states)
                tune.report(row, checkpoint=tune.Checkpoint.from_directory(folder))

        loop = OuterLoop(backend, backend.task, steps=steps, eval_every=cfg.run.eval_every,
                         checkpoint_due=lambda t, logged: logged and (not keep or t % keep == 0 or t == steps),
                         start=t, wall=wall, logged=restored,
                         where=f"the trial's results ({tune.get_context().get_trial_dir()})")
        try:
            loop.run(emit)
        except Diverged:
            return  # reported with the worst metric value; the trial ends, the sweep goes on
    finally:
        backend.close()


def make_tuner(sweep: Sweep, *, path: Path, resume: bool = False, verbose: int = 1) -> Any:
    """A ``tune.Tuner`` for ``sweep`` writing to ``path``, or the one restored from ``path``."""
    from ray import tune
    from ray.tune.logger import TBXLoggerCallback
    from ray.tune.schedulers import ASHAScheduler, PopulationBasedTraining
    from ray.tune.search import BasicVariantGenerator

    settings, spaces, cfg = sweep.settings, sweep.spaces, sweep.cfg
    # checkpoints at every report are the point (PBT, retries); Tune's warning about them is noise
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    trainable = tune.with_resources(
        tune.with_parameters(_trial, base=sweep.base, metric=settings.metric, mode=settings.mode),
        trial_resources(cfg.decentralized, settings.gpus_per_trial))
    if resume:
        if not tune.Tuner.can_restore(str(path)):
            raise ConfigError(f"tune: nothing to resume in {path} (run the sweep without --resume first)")
        return tune.Tuner.restore(str(path), trainable=trainable, resume_errored=True)
    domains = {s.key: s.domain() for s in spaces}
    reports = cfg.run.steps // cfg.run.eval_every + 1 + (cfg.run.steps % cfg.run.eval_every != 0)
    scheduler = None
    if settings.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=reports,
                                  grace_period=min(settings.grace_period, reports),
                                  reduction_factor=settings.reduction_factor)
    elif settings.scheduler == "pbt":
        mutations = {s.key: domains[s.key] for s in spaces if s.form not in ("constant", "grid")}
        if not mutations:
            raise ConfigError("tune.scheduler: pbt needs at least one sampled (not grid or constant) entry")
        scheduler = PopulationBasedTraining(time_attr="training_iteration", hyperparam_mutations=mutations,
                                            perturbation_interval=settings.perturbation_interval,
                                            synch=settings.synch)
    if settings.search == "optuna":
        try:
            import optuna
            from ray.tune.search.optuna import OptunaSearch
        except ImportError:
            raise ConfigError("tune.search: optuna is not installed (pip install 'bilevel-ray[optuna]')") from None
        search_alg = OptunaSearch(sampler=optuna.samplers.TPESampler(seed=settings.seed))
    else:  # seeded: a sweep is reproducible (TuneConfig's concurrency limit does not reach a generator given here)
        search_alg = BasicVariantGenerator(random_state=settings.seed, max_concurrent=settings.max_concurrent_trials)
    return tune.Tuner(
        trainable, param_space=domains,
        tune_config=tune.TuneConfig(metric=settings.metric, mode=settings.mode, scheduler=scheduler,
                                    search_alg=search_alg, num_samples=settings.num_samples,
                                    max_concurrent_trials=settings.max_concurrent_trials or None,
                                    # a new trial (or a PBT exploit) takes over a finished trial's actor and
                                    # placement group when their resources match: no process start-up
                                    reuse_actors=True),
        run_config=tune.RunConfig(name=path.name, storage_path=str(path.parent), verbose=verbose,
                                  callbacks=[TBXLoggerCallback()],  # TensorBoard events in every trial's folder
                                  failure_config=tune.FailureConfig(max_failures=settings.max_failures),
                                  # PBT restores an exploiting trial from the checkpoint its donor had when
                                  # the exploit was decided, which the donor may have pruned by the time the
                                  # trial restarts (a failed restore, no exploit): under PBT keep them all
                                  checkpoint_config=tune.CheckpointConfig(
                                      num_to_keep=None if settings.scheduler == "pbt" else 2)))


def validate(raw: Any, *, num_samples: int | None = None) -> Sweep:
    """Check the ``tune`` section and that every trial's config builds (each grid or choice value),
    and that the metric is a column of the run, before any trial starts."""
    if not isinstance(raw, Mapping) or not isinstance(raw.get("tune"), Mapping):
        raise ConfigError("tune: the config needs a tune section with param_space (see README, Tuning)")
    body = dict(raw["tune"])
    if num_samples is not None:
        body["num_samples"] = num_samples
    try:
        settings = TuneSettings.create(**body)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    spaces = parse_space(settings.param_space)
    if settings.search == "grid":
        for s in spaces:
            if s.form not in ("grid", "choice", "constant"):
                raise ConfigError(f"tune.param_space.{s.key}: search: grid takes grid([...]) or choice([...]) "
                                  f"entries, got {s.form}")
        spaces = [Space(s.key, "grid", s.args) if s.form == "choice" else s for s in spaces]
    if settings.search == "optuna" and any(s.form == "grid" for s in spaces):
        raise ConfigError("tune.search: optuna cannot take grid([...]) entries; use choice([...])")
    base = {name: copy.deepcopy(dict(body or {})) for name, body in raw.items() if name != "tune"}
    first = {s.key: s.example() for s in spaces}
    for s in spaces:  # every other value a grid or choice can take must build too
        for value in (s.args[0][1:] if s.form in ("grid", "choice") else []):
            from_dict(apply_params(base, {**first, s.key: value}))
    cfg = from_dict(apply_params(base, first))
    columns = _columns(cfg)
    if settings.metric not in columns:
        raise ConfigError(f"tune.metric: {settings.metric!r} is not a column of this run; "
                          f"allowed: {', '.join(columns)}")
    return Sweep(settings, spaces, base, cfg)


def _columns(cfg: Any) -> list[str]:
    from bilevel_ray.runner import COUNTERS

    x, y = cfg.task.init(seed=cfg.run.seed)
    names = [*COUNTERS, *cfg.task.metrics(x, y)]
    if cfg.decentralized.agents > 1 or cfg.decentralized.backend == "ray":
        names += ["consensus_error", "bytes_per_round", "round_latency"]
    return names


def summarize(results: Any, sweep: Sweep, path: Path) -> list[dict[str, Any]]:
    """Write ``best_config.yaml``, ``trials.csv``, ``curves.png`` and ``params.png`` into ``path`` and
    return the trials sorted best first (one dict each: trial, status, params, final metric, step)."""
    settings, spaces, base = sweep.settings, sweep.spaces, sweep.base
    sign = 1 if settings.mode == "min" else -1
    trials = []
    for result in results:
        metrics = result.metrics or {}
        value = metrics.get(settings.metric, math.nan)
        trials.append({"trial": metrics.get("trial_id", Path(str(result.path)).name),
                       "status": "ERROR" if result.error else "done",
                       **{s.key: result.config.get(s.key) for s in spaces},
                       settings.metric: value, "step": metrics.get("step", 0),
                       "_history": result.metrics_dataframe})
    trials.sort(key=lambda r: (not math.isfinite(r[settings.metric]), sign * r[settings.metric]
                               if math.isfinite(r[settings.metric]) else 0))
    if not trials or not math.isfinite(trials[0][settings.metric]):
        raise RuntimeError(f"tune: no trial reported a finite {settings.metric}; see {path}")
    best = trials[0]
    params = {s.key: best[s.key] for s in spaces}
    best_cfg = from_dict(apply_params(base, params)).to_dict()
    best_cfg["run"]["out_dir"] = str(path / "best")
    write_text(path / "best_config.yaml", yaml.safe_dump(best_cfg, sort_keys=False))
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=["trial", "status", *(s.key for s in spaces), settings.metric, "step"],
                            extrasaction="ignore")
    writer.writeheader()
    writer.writerows(trials)
    write_text(path / "trials.csv", table.getvalue())
    _plots(trials, spaces, settings, path)
    return trials


def format_table(trials: list[dict[str, Any]], metric: str, keys: list[str], top: int = 5) -> str:
    """The best ``top`` trials as an aligned text table."""
    head = ["trial", *keys, metric, "step", "status"]
    rows = [[str(t["trial"]), *(_fmt(t[k]) for k in keys), _fmt(t[metric]), str(int(t["step"])), t["status"]]
            for t in trials[:top]]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _plots(trials: list[dict[str, Any]], spaces: list[Space], settings: TuneSettings, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from bilevel_ray.plotting import save_figure

    metric = settings.metric
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    positive, starts, highest = True, [], -math.inf
    for t in trials:
        df = t["_history"]
        if df is None or metric not in df or "step" not in df:
            continue
        values = df[metric].astype(float)
        finite = values[values.abs() < math.inf]
        positive &= bool((finite > 0).all())
        if len(finite):
            starts.append(abs(float(finite.iloc[0])))
            highest = max(highest, float(finite.max()))
        ax.plot(df["step"], values, marker=".", label=str(t["trial"]))
    if positive:
        ax.set_yscale("log")
    if starts and highest > 100 * max(starts) > 0:  # diverged trials leave the frame instead of flattening it
        ax.set_ylim(top=100 * max(starts))
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per trial")
    ax.grid(alpha=0.3)
    if len(trials) <= 12:
        ax.legend(fontsize=7)
    save_figure(fig, path / "curves.png")

    varied = [s for s in spaces if s.form != "constant"]
    fig = Figure(figsize=(4.2 * max(len(varied), 1), 3.4), layout="constrained")
    FigureCanvasAgg(fig)
    finals = [t[metric] for t in trials]
    for i, s in enumerate(varied):
        ax = fig.add_subplot(1, len(varied), i + 1)
        xs = [t[s.key] for t in trials]
        ok = [(x, y) for x, y in zip(xs, finals) if isinstance(y, float) and math.isfinite(y)]
        if ok and all(isinstance(x, (int, float)) for x, _ in ok):
            ax.scatter([x for x, _ in ok], [y for _, y in ok])
            if s.form.startswith(("log", "qlog")):
                ax.set_xscale("log")
        else:
            ax.scatter([str(x) for x, _ in ok], [y for _, y in ok])
        if ok and all(y > 0 for _, y in ok):
            ax.set_yscale("log")
        ax.set_xlabel(s.key)
        ax.set_ylabel(f"final {metric}")
        ax.grid(alpha=0.3)
    save_figure(fig, path / "params.png")


