"""The command line end to end: error reporting, a real short run and its files, ``list``."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bilevel_ray import algorithms
from bilevel_ray.cli import main
from bilevel_ray.config import load_config
from bilevel_ray.runner import COUNTERS
from bilevel_ray.tasks import available_tasks

TINY = {
    "task": {"name": "quadratic", "dim_x": 3, "dim_y": 4, "n_inner": 64, "n_outer": 64, "batch_size": 16},
    "algorithm": {"name": "soba", "inner_lr": 0.5, "outer_lr": 0.5},
    "run": {"steps": 7, "eval_every": 3, "progress": False},
}


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


@pytest.mark.parametrize("args, field", [
    (["algorithm.name=nope"], "algorithm.name: unknown algorithm 'nope'"),
    (["algorithm.outer_lr=-0.1"], "algorithm.outer_lr: must be > 0, got -0.1"),
    (["run.steps=many"], "run.steps: must be of type int"),
    (["task.bogus=1"], "task.bogus: unknown field"),
    (["run.steps"], "override: expected SECTION.KEY=VALUE"),
])
def test_config_errors_exit_2_with_one_line(config_file: Path, tmp_path: Path, capsys, args, field) -> None:
    assert main(["run", str(config_file), *args, "--out", str(tmp_path / "out")]) == 2
    assert _error_line(capsys).startswith(f"bilevel-ray: error: {field}")
    assert not (tmp_path / "out").exists()  # validated before any work


def test_missing_file_exits_2(tmp_path: Path, capsys) -> None:
    assert main(["run", str(tmp_path / "absent.yaml")]) == 2
    assert _error_line(capsys) == f"bilevel-ray: error: config: file not found: {tmp_path / 'absent.yaml'}"


def test_console_script_reports_error_without_traceback(config_file: Path) -> None:
    exe = Path(sys.executable).with_name("bilevel-ray")
    proc = subprocess.run([str(exe), "run", str(config_file), "algorithm.outer_lr=-0.1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "bilevel-ray: error: algorithm.outer_lr: must be > 0, got -0.1"
    assert "Traceback" not in proc.stderr


def test_usage_errors_exit_2(capsys) -> None:
    assert main([]) == 2
    assert main(["run"]) == 2
    assert main(["list", "extra=1"]) == 2
    assert main(["--help"]) == 0


def test_run_writes_csv_json_png_and_config(config_file: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert main(["run", str(config_file), "--out", str(out), "--no-progress", "algorithm.schedule=constant"]) == 0
    summary = capsys.readouterr().out
    assert "soba on quadratic: 7 steps" in summary and str(out / "metrics.csv") in summary

    rows = json.loads((out / "metrics.json").read_text())
    assert [r["step"] for r in rows] == [0, 3, 6, 7]
    assert list(rows[0])[:len(COUNTERS)] == list(COUNTERS)
    assert {"outer_objective", "grad_norm_sq", "rel_error"} <= set(rows[0])
    assert [r["oracle_calls"] for r in rows] == [4 * r["step"] for r in rows]
    assert all(r["oracle_calls"] == r["grad_f"] + r["grad_g"] + r["hvp"] + r["jvp"] for r in rows)
    walls = [r["wall_time"] for r in rows]
    assert walls == sorted(walls) and walls[0] >= 0

    with open(out / "metrics.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == list(rows[0])
        csv_rows = list(reader)
    assert [{k: float(v) for k, v in r.items()} for r in csv_rows] == rows

    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["algorithm"] == {"name": "soba", "inner_lr": 0.5, "outer_lr": 0.5, "schedule": "constant",
                                     "horizon": 0, "outer_opt": "sgd", "beta1": 0.9, "beta2": 0.999, "eps": 1e-8,
                                     "max_kl": 0.0, "trust_steps": 10}
    assert resolved["run"]["out_dir"] == str(out) and resolved["task"]["dim_x"] == 3
    assert load_config(out / "config.yaml").to_dict() == resolved


def scalars(folder: Path, prefix: str = "") -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the TensorBoard events in ``folder``: tag (without ``prefix``) -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag[len(prefix):]: [(e.step, e.value) for e in acc.Scalars(tag)]
            for tag in acc.Tags()["scalars"] if tag.startswith(prefix)}


def test_run_writes_tensorboard_events_of_its_rows(config_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["run", str(config_file), "--out", str(out), "--no-progress"]) == 0
    rows = json.loads((out / "metrics.json").read_text())
    events = scalars(out)
    assert set(events) == set(rows[0]) - {"step"}
    for key, series in events.items():
        assert [s for s, _ in series] == [r["step"] for r in rows]
        assert [v for _, v in series] == pytest.approx([r[key] for r in rows], rel=1e-6), key


def test_divergence_stops_after_writing_rows(config_file: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    code = main(["run", str(config_file), "--out", str(out), "algorithm.outer_lr=1e30", "algorithm.inner_lr=1e30",
                 "algorithm.schedule=constant", "run.steps=50", "run.eval_every=1"])
    assert code == 1
    assert _error_line(capsys).startswith("bilevel-ray: error: run: ")
    rows = json.loads((out / "metrics.json").read_text())
    assert rows[-1]["step"] < 50 and rows[-1]["outer_objective"] is None
    assert len((out / "metrics.csv").read_text().splitlines()) == len(rows) + 1
    assert (out / "curves.png").exists()


def test_list_names_every_algorithm_and_task(capsys) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    names = {line.strip() for line in out.splitlines() if line.startswith("  ") and not line.startswith("    ")}
    assert names == set(algorithms.available()) | set(available_tasks())
    assert "outer_lr" in out and "dim_x" in out


def test_importing_the_cli_does_not_import_torch() -> None:
    code = "import sys, bilevel_ray.cli; assert 'torch' not in sys.modules and 'yaml' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
