"""Config loading: every bad value is one ConfigError line naming its field, before any work."""

from pathlib import Path

import pytest
import yaml

from bilevel_ray.config import ConfigError, RunConfig, apply_overrides, from_dict, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))
TINY = {
    "task": {"name": "quadratic", "dim_x": 2, "dim_y": 3, "n_inner": 32, "n_outer": 32, "batch_size": 8},
    "algorithm": {"name": "soba", "inner_lr": 0.5, "outer_lr": 0.1},
    "run": {"steps": 5, "eval_every": 2},
}


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def test_valid_config_builds_task_algorithm_and_defaults(config_file: Path) -> None:
    cfg = load_config(config_file)
    assert isinstance(cfg, RunConfig)
    assert (cfg.task.name, cfg.task.dim_y, cfg.algorithm.name, cfg.algorithm.outer_lr) == ("quadratic", 3, "soba", 0.1)
    assert (cfg.run.steps, cfg.run.eval_every, cfg.run.seed, cfg.run.progress) == (5, 2, 0, True)
    assert cfg.out_dir == Path("runs/tiny")


def test_overrides_are_parsed_as_yaml(config_file: Path) -> None:
    cfg = load_config(config_file, ["algorithm.outer_lr=0.25", "task.batch_size=null", "run.out_dir=elsewhere",
                                    "algorithm.schedule=constant", "run.progress=false", "algorithm.inner_lr=2e-1"])
    assert cfg.algorithm.outer_lr == 0.25 and isinstance(cfg.algorithm.outer_lr, float)
    assert cfg.algorithm.inner_lr == 0.2  # YAML 1.2 floats, although PyYAML alone reads "2e-1" as a string
    assert cfg.task.batch_size is None and cfg.algorithm.schedule == "constant" and cfg.run.progress is False
    assert cfg.out_dir == Path("elsewhere")


def test_resolved_config_loads_back_to_the_same_run(config_file: Path) -> None:
    cfg = load_config(config_file)
    again = from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict())))
    assert again.to_dict() == cfg.to_dict()
    assert again.task == cfg.task and again.algorithm == cfg.algorithm


def test_apply_overrides_does_not_modify_its_input() -> None:
    sections = {"run": {"steps": 3}}
    assert apply_overrides(sections, ["run.steps=4", "task.name=quadratic"]) == {
        "run": {"steps": 4}, "task": {"name": "quadratic"}}
    assert sections == {"run": {"steps": 3}}


@pytest.mark.parametrize("overrides, prefix", [
    (["algorithm.name=nope"], "algorithm.name: unknown algorithm 'nope'"),
    (["task.name=nope"], "task.name: unknown task 'nope'"),
    (["algorithm.outer_lr=-0.1"], "algorithm.outer_lr: must be > 0, got -0.1"),
    (["algorithm.inner_lr=fast"], "algorithm.inner_lr: must be of type float"),
    (["algorithm.schedule=linear"], "algorithm.schedule: must be one of"),
    (["algorithm.schedule=cosine"], "algorithm.horizon: schedule cosine needs a horizon >= 1"),
    (["run.steps=-3"], "run.steps: must be > 0, got -3"),
    (["run.steps=2.5"], "run.steps: must be of type int"),
    (["run.steps=true"], "run.steps: must be of type int"),
    (["run.eval_every=0"], "run.eval_every: must be > 0"),
    (["run.seed=-1"], "run.seed: must be >= 0"),
    (["run.progress=3"], "run.progress: must be of type bool"),
    (["task.dim_x=0"], "task.dim_x: must be >= 1, got 0"),
    (["task.foo=1"], "task.foo: unknown field for QuadraticTask"),
    (["algorithm.momentum=0.9"], "algorithm.momentum: unknown field for SOBA"),
    (["run.stepz=3"], "run.stepz: unknown field"),
    (["nope.key=1"], "nope: unknown section"),
    (["algorithm.outer_lr"], "override: expected SECTION.KEY=VALUE"),
    (["outer_lr=0.1"], "override: expected SECTION.KEY=VALUE"),
    (["algorithm.outer_lr.x=0.1"], "override: expected SECTION.KEY=VALUE"),
    (["task.dim_x=[1"], "task.dim_x: cannot parse override value"),
])
def test_bad_values_are_one_line_naming_the_field(config_file: Path, overrides: list[str], prefix: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(config_file, overrides)
    assert str(err.value).startswith(prefix) and "\n" not in str(err.value)


@pytest.mark.parametrize("text, prefix", [
    ("task: {name: quadratic\nrun: 1\n", "config: invalid YAML in"),
    ("- task\n", "config: must be a mapping"),
    ("tasks: {name: quadratic}\n", "tasks: unknown section"),
    ("task: 3\n", "task: must be a mapping"),
    ("task: {dim_x: 2}\nalgorithm: {name: soba}\n", "task.name: required"),
    ("task: {name: quadratic}\nalgorithm: {outer_lr: 0.1}\n", "algorithm.name: required"),
    ("task: {name: [quadratic]}\nalgorithm: {name: soba}\n", "task.name: must be a string"),
    ("task: {name: quadratic, 7: 1}\nalgorithm: {name: soba}\n", "task.7: field names must be strings"),
    ("", "task.name: required"),
])
def test_bad_files_are_one_line(tmp_path: Path, text: str, prefix: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(prefix) and "\n" not in str(err.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^config: file not found: .*absent\.yaml$"):
        load_config(tmp_path / "absent.yaml")


def test_shipped_configs_exist() -> None:
    assert {p.stem for p in CONFIGS} >= {"quadratic_soba", "logreg_breast_cancer", "logreg_synthetic",
                                         "hypercleaning_digits"}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_loads_and_validates(path: Path) -> None:
    try:
        cfg = load_config(path)
    except FileNotFoundError as e:  # a task reading data that is not on this machine (Omniglot)
        pytest.skip(str(e))
    assert cfg.out_dir == Path("runs") / path.stem and cfg.run.steps > 0
    if hasattr(cfg.task, "eval_episodes"):  # meta-RL: the metrics' held-out rollouts, on one task and episode
        cfg = load_config(path, ["task.eval_tasks=1", "task.eval_episodes=1"])
    assert "outer_objective" in cfg.task.metrics(*cfg.task.init(seed=cfg.run.seed))
