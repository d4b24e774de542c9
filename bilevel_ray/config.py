"""Run configuration: a YAML file with sections ``task``, ``algorithm`` and ``run``, plus dotted overrides.

Everything is validated up front, before any work: the task and the algorithm are built through their
registries so their own validation runs. Every problem is a :class:`ConfigError` whose one-line message
starts with the path of the field, e.g. ``algorithm.outer_lr: must be > 0, got -0.1``.

.. code-block:: yaml

    task: {name: quadratic, dim_x: 10}
    algorithm: {name: soba, outer_lr: 0.1}
    run: {steps: 1000, eval_every: 50}
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Mapping

import yaml

from bilevel_ray.params import Params, hp

if TYPE_CHECKING:  # the registries import torch; config stays light until a config is built
    from bilevel_ray.algorithms import Hyperparams
    from bilevel_ray.tasks import Task

__all__ = ["ConfigError", "RunSettings", "DecentralizedSettings", "RunConfig", "load_config", "read_sections",
           "from_dict", "apply_overrides"]

SECTIONS = ("task", "algorithm", "run", "decentralized", "tune")  # tune: read by bilevel_ray.tune only


class _Loader(yaml.SafeLoader):
    """Safe YAML that also reads ``1e-3`` as a float (YAML 1.2; PyYAML's 1.1 rules need ``1.0e-3``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


class ConfigError(ValueError):
    """A bad configuration; the message is one line naming the offending field."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


@dataclass(frozen=True)
class RunSettings(Params):
    """The ``run`` section."""

    section: ClassVar[str] = "run"

    steps: int = hp(1000, low=0, doc="outer iterations")
    seed: int = hp(0, low=0, strict=False, doc="seed of the initial point and of every minibatch draw")
    eval_every: int = hp(10, low=0, doc="log metrics every this many steps (and at steps 0 and the last)")
    out_dir: str | None = hp(None, doc="output folder (null: runs/<config stem>)")
    progress: bool = hp(True, doc="show a progress bar (on a terminal only)")
    checkpoint_every: int = hp(0, low=0, strict=False, doc="save every agent's state every this many rounds "
                                                           "(0: never); failed agents restart from it")
    device: str = hp("auto", doc="where data, states and episodes live: auto (a CUDA device if there is one), "
                                 "cpu, cuda or cuda:N; Ray agents use the GPU share decentralized.gpus_per_agent gives them")

    dtype: str = hp("float32", choices=("float32", "bfloat16"),
                    doc="bfloat16: the model's forward and backward in the first-order oracles under bfloat16 "
                        "autocast (float32 tasks); HVPs, cross products, iterates and metrics stay in the task's dtype")

    def __post_init__(self) -> None:
        from bilevel_ray.device import check_device

        super().__post_init__()
        check_device(self.device)


_TOPOLOGIES = ("ring", "torus", "complete", "star", "exponential", "erdos_renyi", "one_peer_exponential")


@dataclass(frozen=True)
class DecentralizedSettings(Params):
    """The optional ``decentralized`` section: agents, who talks to whom, and where they run."""

    section: ClassVar[str] = "decentralized"

    agents: int = hp(1, low=1, strict=False, doc="number of agents (1: a single process)")
    topology: str = hp("ring", choices=_TOPOLOGIES, doc="communication graph")
    mixing: str = hp("metropolis", choices=("metropolis", "uniform", "lazy_metropolis"), doc="weights W")
    edge_prob: float = hp(0.5, low=0, high=1, strict=False, doc="erdos_renyi only: edge probability")
    split: str = hp("iid", choices=("iid", "dirichlet"), doc="how the task's data is shared out")
    alpha: float = hp(0.5, low=0, doc="dirichlet only: concentration (small: label-skewed)")
    backend: str = hp("sim", choices=("sim", "ray"), doc="vectorized simulation or one Ray actor per agent")
    address: str | None = hp(None, doc="ray only: cluster address (null: start a loopback cluster)")
    placement: str = hp("SPREAD", choices=("SPREAD", "PACK", "STRICT_SPREAD", "STRICT_PACK"), doc="ray only: placement strategy")
    transport: str = hp("auto", choices=("auto", "object_store"),
                        doc="ray only: auto = shared memory between agents on one node, object store across nodes")
    gpus_per_agent: float = hp(0.0, low=0, strict=False, doc="ray only: the GPU share each agent asks Ray for (0.25: four agents "
                                                "share a GPU); the agent computes on it")


@dataclass(frozen=True)
class RunConfig:
    """A validated run: the built task and algorithm, the run settings and the resolved output folder."""

    task: Task
    algorithm: Hyperparams
    run: RunSettings
    out_dir: Path
    decentralized: DecentralizedSettings = DecentralizedSettings()

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The resolved configuration, every default filled in (it loads back to the same run)."""
        return {
            "task": {"name": self.task.name, **self.task.to_dict()},
            "algorithm": {"name": self.algorithm.name, **self.algorithm.to_dict()},
            "run": {**self.run.to_dict(), "out_dir": str(self.out_dir)},
            "decentralized": self.decentralized.to_dict(),
        }


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> RunConfig:
    """Read ``path``, apply ``section.key=value`` overrides and validate everything."""
    return from_dict(read_sections(path), overrides, default_out=Path("runs") / Path(path).stem)


def read_sections(path: str | Path) -> Any:
    """The parsed YAML of a config file (not validated yet)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config: file not found: {path}")
    if not path.is_file():
        raise ConfigError(f"config: not a file: {path}")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"config: invalid YAML in {path}{where}: {e.problem or e}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"config: cannot read {path}: {e}") from None
    return {} if raw is None else raw


def from_dict(raw: Any, overrides: Iterable[str] = (), *, default_out: Path = Path("runs/run")) -> RunConfig:
    """Validate a parsed config (a mapping of sections) after applying ``overrides``."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config: must be a mapping with sections {', '.join(SECTIONS)}, "
                          f"got {type(raw).__name__}")
    sections: dict[str, dict[str, Any]] = {}
    for name, body in raw.items():
        if name not in SECTIONS:
            raise ConfigError(f"{name}: unknown section; allowed: {', '.join(SECTIONS)}")
        if body is not None and not isinstance(body, Mapping):
            raise ConfigError(f"{name}: must be a mapping, got {body!r}")
        for key in body or {}:
            if not isinstance(key, str):
                raise ConfigError(f"{name}.{key}: field names must be strings")
        sections[name] = dict(body or {})
    sections = apply_overrides(sections, overrides)
    return _build(sections, default_out)


def apply_overrides(sections: Mapping[str, Mapping[str, Any]], overrides: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Return a copy of ``sections`` with each ``section.key=value`` applied (value parsed as YAML)."""
    out = {name: dict(body) for name, body in sections.items()}
    for item in overrides:
        lhs, eq, value = item.partition("=")
        section, dot, key = lhs.strip().partition(".")
        if not eq or not dot or not section or not key or "." in key:
            raise ConfigError(f"override: expected SECTION.KEY=VALUE, got {item!r}")
        if section not in SECTIONS:
            raise ConfigError(f"{section}: unknown section in override {item!r}; allowed: {', '.join(SECTIONS)}")
        try:
            parsed = yaml.load(value, Loader=_Loader)
        except yaml.YAMLError:
            raise ConfigError(f"{section}.{key}: cannot parse override value {value!r}") from None
        out.setdefault(section, {})[key] = parsed
    return out


def _build(sections: dict[str, dict[str, Any]], default_out: Path) -> RunConfig:
    from bilevel_ray import algorithms
    from bilevel_ray.tasks import available_tasks, make_task

    task_params = dict(sections.get("task", {}))
    algo_params = dict(sections.get("algorithm", {}))
    task_name = _name(task_params, "task", available_tasks)
    algo_name = _name(algo_params, "algorithm", algorithms.available)
    try:
        run = RunSettings.create(**sections.get("run", {}))
        decentralized = DecentralizedSettings.create(**sections.get("decentralized", {}))
        algorithm = algorithms.make(algo_name, **algo_params)
        task = make_task(task_name, **task_params)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    out_dir = Path(run.out_dir) if run.out_dir is not None else default_out
    if decentralized.split == "dirichlet" and getattr(task, "label_column", None) is None:
        raise ConfigError(f"decentralized.split: 'dirichlet' needs a task with class labels ({task.name} has "
                          f"none); use iid")
    if decentralized.backend == "sim" and decentralized.agents > 1:
        from bilevel_ray.decentralized.sim import refusal

        why = refusal(algorithm)
        if why:
            raise ConfigError(why)
    return RunConfig(task=task, algorithm=algorithm, run=run, out_dir=out_dir, decentralized=decentralized)


def _name(params: dict[str, Any], section: str, available: Callable[[], list[str]]) -> str:
    name = params.pop("name", None)
    if name is None:
        raise ConfigError(f"{section}.name: required; available: {', '.join(available())}")
    if not isinstance(name, str):
        raise ConfigError(f"{section}.name: must be a string, got {name!r}")
    return name
