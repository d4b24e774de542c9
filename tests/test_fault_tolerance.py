"""Checkpoints, a killed agent restarted by Ray mid-run, and a killed driver resumed with --resume."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from bilevel_ray.cli import main

CONFIG = {
    "task": {"name": "logreg_hpo", "dataset": "synthetic", "n_samples": 400, "n_features": 6, "batch_size": 16},
    "algorithm": {"name": "d_soba", "outer_lr": 0.5, "inner_lr": 0.3, "linear_lr": 0.3},
    "run": {"steps": 30, "eval_every": 2, "checkpoint_every": 5},
    "decentralized": {"agents": 3, "topology": "ring", "backend": "sim"},
}


def write(tmp_path, name="cfg", **decentralized):
    path = tmp_path / f"{name}.yaml"
    cfg = {**CONFIG, "decentralized": {**CONFIG["decentralized"], **decentralized}}
    path.write_text(yaml.safe_dump(cfg))
    return path


def rows_of(out):
    return json.loads((Path(out) / "metrics.json").read_text())


def assert_same_run(a, b, steps=30, every=2):
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(0, steps + 1, every))
    for ra, rb in zip(a, b):
        for key in ("outer_objective", "value", "consensus_error", "oracle_calls"):
            assert abs(ra[key] - rb[key]) <= 1e-9 * max(1.0, abs(rb[key])), (ra["step"], key)


@pytest.mark.parametrize("placement", ["STRICT_SPREAD", "STRICT_PACK"])  # object store / shared memory
def test_killed_agent_is_restarted_and_the_run_is_unchanged(tmp_path, ray_cluster, placement):
    import ray

    # the uninterrupted reference: the simulation (equal to the Ray backend, see test_decentralized_ray)
    assert main(["run", str(write(tmp_path, "clean")), "--out", str(tmp_path / "clean"), "--no-progress"]) == 0
    path = write(tmp_path, backend="ray", placement=placement)
    killed = []

    def killer():  # kill agent 1 once the run has logged a few rows (mid-run)
        csv = tmp_path / "faulty" / "metrics.csv"
        deadline = time.time() + 120
        while time.time() < deadline:
            if csv.exists() and len(csv.read_text().splitlines()) >= 6:
                for actor in ray.util.list_named_actors(all_namespaces=True):
                    if actor["name"].endswith("-agent-1"):
                        handle = ray.get_actor(actor["name"], namespace=actor["namespace"])
                        ray.kill(handle, no_restart=False)
                        killed.append(actor["name"])
                        return
            time.sleep(0.05)

    thread = threading.Thread(target=killer)
    thread.start()
    assert main(["run", str(path), "--out", str(tmp_path / "faulty"), "--no-progress"]) == 0
    thread.join()
    assert killed, "the agent was not killed mid-run"
    # restarted from the round-5k checkpoint and replayed: same rows, none lost or duplicated
    assert_same_run(rows_of(tmp_path / "faulty"), rows_of(tmp_path / "clean"))


def test_killed_driver_resumes_from_its_checkpoint(tmp_path):
    path = write(tmp_path, name="resume")
    longer = ["run.steps=600", "run.eval_every=20"]
    assert main(["run", str(path), *longer, "--out", str(tmp_path / "clean"), "--no-progress"]) == 0
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "bilevel_ray.cli", "run", str(path), *longer, "--out", str(out), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "metrics.json").exists(), "the driver finished before it was killed"
    assert main(["run", str(path), *longer, "--out", str(out), "--no-progress", "--resume"]) == 0
    assert_same_run(rows_of(out), rows_of(tmp_path / "clean"), steps=600, every=20)
    from test_cli import scalars  # the tests folder is on sys.path under pytest

    # TensorBoard: the killed run's events after its checkpoint are dropped, none is written twice
    assert [s for s, _ in scalars(out)["outer_objective"]] == list(range(0, 601, 20))


def test_resume_refuses_a_different_config_or_a_missing_checkpoint(tmp_path, capsys):
    path = write(tmp_path)
    assert main(["run", str(path), "--out", str(tmp_path / "o"), "--no-progress", "--resume"]) == 2
    assert "run.resume: no checkpoint in" in capsys.readouterr().err
    assert main(["run", str(path), "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    assert main(["run", str(path), "algorithm.outer_lr=0.25", "--out", str(tmp_path / "o"), "--resume"]) == 2
    assert "algorithm.outer_lr: differs from the checkpointed run" in capsys.readouterr().err


def test_checkpoints_load_with_weights_only(tmp_path):
    from bilevel_ray import checkpoint

    path = write(tmp_path)
    assert main(["run", str(path), "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    payload = checkpoint.load(tmp_path / "o" / "checkpoint.pt")  # torch.load(weights_only=True)
    assert payload["round"] == 30 and len(payload["states"]) == 3
