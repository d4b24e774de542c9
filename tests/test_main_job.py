"""The main job (scripts/main.sh, configs/main.yaml): DSBO on 4 Ray agents, few-shot Omniglot from the
shipped data, then the 5-way and 20-way test table; here shortened to a few rounds on the session's
loopback cluster."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from bilevel_ray.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_the_shipped_omniglot_splits_and_their_licence_are_in_the_repo():
    from bilevel_ray.tasks.vision.omniglot import find_omniglot, load_omniglot

    folder = REPO / "data" / "omniglot"
    assert "MIT License" in (folder / "LICENSE").read_text()
    for split, characters in (("images_background_small1", 136), ("images_background_small2", 156)):
        assert find_omniglot(split, folder) == folder / f"{split}.zip"
        data = load_omniglot(split, root=folder)
        assert len(data.classes) == characters and len(data.alphabets) == 5
        assert data.images.shape == (20 * characters, 28, 28)


def test_main_job_runs_on_ray_agents_and_reports_5_and_20_way_accuracy(tmp_path, ray_cluster, capsys):
    cfg = yaml.safe_load((REPO / "configs" / "main.yaml").read_text())
    assert cfg["decentralized"] == {**cfg["decentralized"], "backend": "ray", "agents": 4, "topology": "ring"}
    assert cfg["algorithm"]["name"] == "dsbo"
    out = tmp_path / "main"
    assert main(["run", str(REPO / "configs" / "main.yaml"), "--out", str(out), "--no-progress", "run.steps=4",
                 "run.eval_every=2", "algorithm.horizon=4", "task.eval_tasks=10", "task.width=8"]) == 0
    rows = json.loads((out / "metrics.json").read_text())
    assert [r["step"] for r in rows] == [0, 2, 4] and rows[-1]["bytes_per_round"] > 0
    assert 0 < rows[-1]["test_acc"] <= 1
    assert (out / "learner.pt").is_file() and (out / "curves.png").is_file()
    assert list(out.glob("events.out.tfevents.*"))
    capsys.readouterr()
    assert main(["eval", str(out / "learner.pt"), "--ways", "5", "20", "--tasks", "20"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(": ")[1].split(" accuracy")[0] for line in lines] == ["5-way 1-shot", "20-way 1-shot"]
    assert all("alphabets not in images_background_small1" in line and "±" in line for line in lines)


def test_learn2learn_imports_without_gyms_notice():
    code = "from bilevel_ray.tasks.vision.l2l import import_learn2learn; print(import_learn2learn().__version__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "0.2.0"
    assert "Gym has been unmaintained" not in done.stderr and done.stderr == "", done.stderr
