"""Ray Tune sweeps (bilevel_ray.tune, `bilevel-ray tune`) on the session's real loopback cluster."""

import contextlib
import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from bilevel_ray.cli import main

BASE = {
    "task": {"name": "quadratic", "dim_x": 5, "dim_y": 10, "n_inner": 256, "n_outer": 256, "batch_size": 32,
             "dtype": "float64", "seed": 0},
    "algorithm": {"name": "soba", "schedule": "constant"},
    "run": {"steps": 60, "eval_every": 5, "seed": 0},
}
#: a decentralized run whose agents can be killed (the CLI fault-tolerance tests use the same)
FAULT_CONFIG = {
    "task": {"name": "logreg_hpo", "dataset": "synthetic", "n_samples": 400, "n_features": 6, "batch_size": 16},
    "algorithm": {"name": "d_soba", "outer_lr": 0.5, "inner_lr": 0.3, "linear_lr": 0.3},
    "run": {"progress": False},
    "decentralized": {"agents": 3, "topology": "ring"},
}
SPACE = {"algorithm.outer_lr": "loguniform(1e-3, 1.0)", "algorithm.inner_lr": "loguniform(1e-2, 1.0)"}


def write(tmp_path, name="sweep", tune=None, **sections):
    cfg = {**BASE, **sections, "tune": {"param_space": SPACE, "metric": "rel_error", "mode": "min", **(tune or {})}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def trials_of(folder):
    """Every trial's reported rows (Tune's own progress.csv files), complete lines only: a file Tune is
    writing may end in a partial line, its header included."""
    out = {}
    for progress in Path(folder).glob("*/progress.csv"):
        text = progress.read_text()
        lines = text[:text.rfind("\n") + 1].splitlines()
        rows = list(csv.DictReader(lines))
        out[progress.parent.name] = rows if lines and "step" in lines[0].split(",") else []
    return out


def test_asha_sweep_finds_a_trial_better_than_the_median(tmp_path, ray_cluster, capsys):
    path = write(tmp_path, tune={"num_samples": 6, "scheduler": "asha", "grace_period": 3})
    assert main(["tune", str(path), "--out", str(tmp_path / "asha")]) == 0
    out = capsys.readouterr().out
    assert "best trials (rel_error, min) of 6" in out
    with open(tmp_path / "asha" / "trials.csv", newline="") as fh:
        trials = list(csv.DictReader(fh))
    finals = [float(t["rel_error"]) for t in trials]
    assert len(finals) == 6 and finals[0] == min(finals)
    assert finals[0] < statistics.median(finals)
    assert any(int(t["step"]) < 60 for t in trials)  # ASHA stopped some trials early
    for name in ("curves.png", "params.png"):
        assert (tmp_path / "asha" / name).stat().st_size > 0
    from test_cli import scalars  # noqa: E402 - the tests folder is on sys.path under pytest

    for trial in (tmp_path / "asha").glob("*/progress.csv"):  # TensorBoard events from Tune's logger
        with open(trial, newline="") as fh:
            reported = [float(r["rel_error"]) for r in csv.DictReader(fh)]
        events = scalars(trial.parent, prefix="ray/tune/")
        assert [v for _, v in events["rel_error"]] == pytest.approx(reported, rel=1e-6)
    best = yaml.safe_load((tmp_path / "asha" / "best_config.yaml").read_text())
    assert best["algorithm"]["outer_lr"] == pytest.approx(float(trials[0]["algorithm.outer_lr"]))
    assert "tune" not in best
    # the best config is runnable and reproduces the best trial's final error
    assert main(["run", str(tmp_path / "asha" / "best_config.yaml"), "--out", str(tmp_path / "best"),
                 "--no-progress", "run.steps=" + trials[0]["step"]]) == 0
    rows = list(csv.DictReader(open(tmp_path / "best" / "metrics.csv", newline="")))
    assert float(rows[-1]["rel_error"]) == pytest.approx(finals[0], rel=1e-9)


def test_pbt_restores_trials_from_checkpoints_and_continues_their_step_counter(tmp_path, ray_cluster):
    """Synchronous PBT (the asynchronous kind exploits only trials that overlap in time, which a busy
    machine's trial start-up can prevent): the weakest trial always exploits a checkpoint."""
    path = write(tmp_path, tune={"num_samples": 4, "scheduler": "pbt", "perturbation_interval": 2, "synch": True})
    assert main(["tune", str(path), "--out", str(tmp_path / "pbt")]) == 0
    restored = [(int(r["restored_step"]), int(r["step"])) for rows in trials_of(tmp_path / "pbt").values()
                for r in rows if int(r["restored_step"]) > 0]
    assert restored, "PBT never exploited a checkpoint"
    # the first row after a restore continues from the checkpoint's round, it does not start over
    assert all(step > at for at, step in restored)
    assert any(step == at + 5 for at, step in restored)


def test_decentralized_sweep_places_agents_in_each_trials_placement_group(tmp_path, ray_cluster):
    """Agents go into their trial's placement group, with the GPU shares the config asks for (the session
    cluster declares GPUs; the run computes on the CPU it names)."""
    path = write(tmp_path, tune={"num_samples": 1, "search": "grid", "gpus_per_trial": 0.5},
                 algorithm={"name": "d_soba", "inner_lr": 0.3, "linear_lr": 0.3},
                 decentralized={"agents": 2, "backend": "ray", "placement": "PACK", "gpus_per_agent": 0.25},
                 run={"steps": 20, "eval_every": 5, "seed": 0, "device": "cpu"})
    cfg = yaml.safe_load(path.read_text())
    cfg["tune"]["param_space"] = {"algorithm.outer_lr": "grid([0.1, 0.5])"}
    path.write_text(yaml.safe_dump(cfg))
    assert main(["tune", str(path), "--out", str(tmp_path / "dec")]) == 0
    trials = trials_of(tmp_path / "dec")
    assert len(trials) == 2
    for rows in trials.values():
        assert [int(r["step"]) for r in rows] == [0, 5, 10, 15, 20]
        assert all(int(r["trial_bundles"]) == 3 for r in rows)  # the trial's own bundle + one per agent
        assert all(int(r["agents_in_trial_group"]) == 1 for r in rows)
        assert all(int(r["trial_gpus"]) == 1 and int(r["agent_gpus"]) == 2 for r in rows)  # a share each
        assert float(rows[-1]["consensus_error"]) >= 0


@contextlib.contextmanager
def agent_killed(folder, *, after_rows, restart):
    """While the body runs a sweep into ``folder``: once its trials have reported ``after_rows`` rows, kill
    agent 1's actor (Ray restarts it when ``restart``). Yields the steps at which it was killed."""
    import ray

    killed = []

    def killer():
        deadline = time.time() + 180
        while time.time() < deadline and not killed:
            rows = [r for rs in trials_of(folder).values() for r in rs]
            if len(rows) >= after_rows:
                for actor in ray.util.list_named_actors(all_namespaces=True):
                    if actor["name"].endswith("-agent-1"):
                        ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=not restart)
                        killed.append(int(rows[-1]["step"]))
                        break
            time.sleep(0.05)

    thread = threading.Thread(target=killer)
    thread.start()
    try:
        yield killed
    finally:
        thread.join()


def test_a_trial_whose_agent_dies_is_retried_from_its_checkpoint(tmp_path, ray_cluster):
    path = write(tmp_path, tune={"num_samples": 1, "max_failures": 2},
                 algorithm={"name": "d_soba", "outer_lr": 0.3, "inner_lr": 0.3, "linear_lr": 0.3},
                 decentralized={"agents": 2, "backend": "ray", "placement": "PACK"},
                 run={"steps": 150, "eval_every": 5, "seed": 0, "checkpoint_every": 10})
    with agent_killed(tmp_path / "fail", after_rows=5, restart=False) as killed:  # for good: no Ray restart
        assert main(["tune", str(path), "--out", str(tmp_path / "fail")]) == 0
    assert killed, "the agent was not killed mid-trial"
    (rows,) = trials_of(tmp_path / "fail").values()
    restored = {int(r["restored_step"]) for r in rows} - {-1}
    assert restored and all(at % 10 == 0 and 0 < at for at in restored)  # from a checkpoint, not from 0
    assert int(rows[-1]["step"]) == 150


def test_an_agent_killed_inside_a_tune_trial_is_replayed_and_changes_nothing(tmp_path, ray_cluster):
    """The trial drives the same loop as ``bilevel-ray run``: Ray restarts the agent, the trial replays
    from its last checkpoint and reports the rows of the unkilled run (Tune never retries the trial)."""
    base = {**FAULT_CONFIG, "run": {**FAULT_CONFIG["run"], "steps": 120, "eval_every": 10, "checkpoint_every": 10, "seed": 0},
            "decentralized": {**FAULT_CONFIG["decentralized"], "backend": "ray", "placement": "PACK"},
            "tune": {"param_space": {"algorithm.outer_lr": "grid([0.5])"}, "search": "grid", "num_samples": 1,
                     "max_failures": 0, "metric": "outer_objective"}}
    path = tmp_path / "kill.yaml"
    path.write_text(yaml.safe_dump(base))
    clean = {**base, "decentralized": {**base["decentralized"], "backend": "sim"}}
    clean.pop("tune")
    (tmp_path / "clean.yaml").write_text(yaml.safe_dump(clean))
    assert main(["run", str(tmp_path / "clean.yaml"), "--out", str(tmp_path / "clean"), "--no-progress"]) == 0
    reference = json.loads((tmp_path / "clean" / "metrics.json").read_text())

    with agent_killed(tmp_path / "tuned", after_rows=4, restart=True) as killed:  # Ray restarts it
        assert main(["tune", str(path), "--out", str(tmp_path / "tuned")]) == 0
    assert killed and killed[0] < 120, "the agent was not killed mid-trial"
    (rows,) = trials_of(tmp_path / "tuned").values()
    assert {int(r["restored_step"]) for r in rows} == {-1}  # replayed inside the trial, not retried by Tune
    assert [int(r["step"]) for r in rows] == [r["step"] for r in reference]  # none lost, none twice
    for got, want in zip(rows, reference):
        for key in ("outer_objective", "value", "consensus_error", "oracle_calls"):
            assert float(got[key]) == pytest.approx(want[key], rel=1e-9, abs=1e-9), (want["step"], key)


def test_interrupted_sweep_resumes_without_rerunning_finished_trials(tmp_path):
    """A sweep in its own process (own loopback cluster) gets SIGINT after two trials finished."""
    path = write(tmp_path, tune={"num_samples": 4, "max_concurrent_trials": 1},
                 run={"steps": 300, "eval_every": 10, "seed": 0})
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "bilevel_ray.cli", "tune", str(path), "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = open(tmp_path / "sweep.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    finished = {}
    try:
        deadline = time.time() + 240
        while time.time() < deadline and len(finished) < 2 and proc.poll() is None:
            finished = {name: (out / name / "progress.csv").read_bytes()
                        for name, rows in trials_of(out).items() if rows and rows[-1]["step"] == "300"}
            time.sleep(0.2)
        assert len(finished) >= 2, (tmp_path / "sweep.log").read_text()[-3000:]
        proc.send_signal(signal.SIGINT)
        proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    assert len(trials_of(out)) < 4 or any(rows[-1]["step"] != "300" for rows in trials_of(out).values())
    resumed = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    trials = trials_of(out)
    assert len(trials) == 4 and all(rows[-1]["step"] == "300" for rows in trials.values())
    for name, before in finished.items():  # finished trials were not run again
        assert (out / name / "progress.csv").read_bytes() == before


@pytest.mark.parametrize("space,message", [
    ({"algorithm.outer_lr": "logunifrom(1e-3, 1)"}, "tune.param_space.algorithm.outer_lr: unknown search space"),
    ({"algorithm.outer_lr": "loguniform(1, 1e-3)"}, "tune.param_space.algorithm.outer_lr: loguniform needs low < high"),
    ({"algorithm.outer_lr": "loguniform(0, 1)"}, "tune.param_space.algorithm.outer_lr: loguniform needs low > 0"),
    ({"algorithm.outer_lr": "uniform(0.1)"}, "tune.param_space.algorithm.outer_lr: uniform takes 2 argument(s)"),
    ({"algorithm.outer_lr": "choice([])"}, "tune.param_space.algorithm.outer_lr: choice needs a non-empty list"),
    ({"outer_lr": "uniform(0.1, 1)"}, "tune.param_space.outer_lr: keys look like section.field"),
    ({"algorithm.bogus": "uniform(0.1, 1)"}, "algorithm.bogus: unknown field"),
    ({"algorithm.outer_lr": "uniform(-1, 1)"}, "algorithm.outer_lr: must be > 0"),
])
def test_bad_search_space_entry_exits_with_one_line(tmp_path, capsys, space, message):
    path = write(tmp_path)
    cfg = yaml.safe_load(path.read_text())
    cfg["tune"]["param_space"] = space
    path.write_text(yaml.safe_dump(cfg))
    assert main(["tune", str(path), "--out", str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("bilevel-ray: error: ") and message in err, err
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("tune,message", [
    ({"metric": "accuracy"}, "tune.metric: 'accuracy' is not a column"),
    ({"scheduler": "hyperband"}, "tune.scheduler: must be one of fifo, asha, pbt"),
    ({"search": "grid"}, "search: grid takes grid([...]) or choice([...]) entries"),
    ({"num_samples": 0}, "tune.num_samples: must be >= 1"),
])
def test_bad_tune_settings_exit_with_one_line(tmp_path, capsys, tune, message):
    assert main(["tune", str(write(tmp_path, tune=tune)), "--out", str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err


def test_optuna_search(tmp_path, ray_cluster):
    pytest.importorskip("optuna")
    path = write(tmp_path, tune={"num_samples": 3, "search": "optuna"}, run={"steps": 20, "eval_every": 10, "seed": 0})
    assert main(["tune", str(path), "--out", str(tmp_path / "optuna")]) == 0
    assert len(trials_of(tmp_path / "optuna")) == 3
