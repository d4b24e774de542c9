"""`bilevel-ray run` with a `decentralized` section, on the simulation and on the Ray backend."""

import json

import pytest
import yaml

from bilevel_ray.cli import main

CONFIG = {
    "task": {"name": "quadratic", "dim_x": 3, "dim_y": 4, "n_inner": 128, "n_outer": 128, "batch_size": 16},
    "algorithm": {"name": "dsbo_gt", "outer_lr": 0.5, "inner_lr": 0.3, "linear_lr": 0.3, "inner_steps": 2,
                  "linear_steps": 2},
    "run": {"steps": 6, "eval_every": 3},
    "decentralized": {"agents": 4, "topology": "ring", "backend": "sim"},
}


def write(tmp_path, **sections):
    path = tmp_path / "dec.yaml"
    path.write_text(yaml.safe_dump({**CONFIG, **sections}))
    return path


def check_network_rows(out, agents: int) -> None:
    """DSBO-GT on a ring, 6 rounds logged every 3: gossip bytes, consensus error, oracle calls."""
    rows = json.loads((out / "metrics.json").read_text())
    assert [r["step"] for r in rows] == [0, 3, 6]
    last = rows[-1]
    # 2 directed edges per agent on a ring; y, z gossiped twice (dim 4), s and x once (dim 3), float64
    assert last["bytes_per_round"] == 2 * agents * (2 * 4 + 2 * 4 + 3 + 3) * 8
    assert last["consensus_error"] > 0 and last["round_latency"] > 0
    assert last["oracle_calls"] == agents * 6 * (1 + 2 + 2 + 1)  # agents × rounds × (∇f, T ∇g, N HVP, JVP)


def test_decentralized_run_logs_network_metrics(tmp_path):
    """On the simulation; the same run on Ray agents is the next test's."""
    path = write(tmp_path)
    assert main(["run", str(path), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    check_network_rows(tmp_path / "out", agents=4)
    assert yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())["decentralized"]["backend"] == "sim"


@pytest.mark.parametrize("override, message", [
    ("decentralized.agents=0", r"decentralized\.agents: must be >= 1, got 0"),
    ("decentralized.topology=hypercube", r"decentralized\.topology: must be one of ring, "),
    ("decentralized.backend=mpi", r"decentralized\.backend: must be one of sim, ray"),
    ("decentralized.split=dirichlet", r"decentralized\.split: 'dirichlet' needs a task with class labels"),
    ("algorithm.name=msgbio;algorithm.solver=lanczos", r"decentralized\.backend: the Lanczos solver needs"),
])
def test_bad_decentralized_settings_are_one_line(tmp_path, capsys, override, message):
    import re

    path = write(tmp_path, algorithm={"name": "dsbo"}) if "dirichlet" in override else write(
        tmp_path, algorithm={"name": "dsbo_gt"})
    assert main(["run", str(path), *override.split(";"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_run_connects_to_an_existing_cluster_by_address(tmp_path, ray_cluster):
    """Another process (the CLI) joins the session's multi-node loopback cluster with --address; its
    agents run there and log the network metrics the simulation logs, and the cluster stays up after
    the run (the run did not start it)."""
    import os
    import subprocess
    import sys

    import ray

    path = write(tmp_path, decentralized={**CONFIG["decentralized"], "backend": "ray", "agents": 3,
                                          "placement": "STRICT_SPREAD"})
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-m", "bilevel_ray.cli", "run", str(path), "--out", str(tmp_path / "out"),
                           "--no-progress", "--address", ray_cluster.address], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    check_network_rows(tmp_path / "out", agents=3)
    resolved = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())["decentralized"]
    assert resolved["backend"] == "ray" and resolved["address"] == ray_cluster.address
    assert len([n for n in ray.nodes() if n["Alive"]]) == 3  # STRICT_SPREAD: 3 agents needed all 3 nodes
