"""Every script of benchmarks/ runs end to end in its smoke mode (``--smoke``: tiny sizes, seconds), so that
none rots; a new benchmark is covered by being there. Each runs in a subprocess (a Ray it starts is its own,
on loopback, never this session's)."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = sorted((ROOT / "benchmarks").glob("*.py"))
#: seconds a smoke run may take (they take seconds; generous for a loaded shared machine)
TIMEOUT = 300


def _env() -> dict[str, str]:
    """This process's environment without ``RAY_ADDRESS`` (a script must start its own loopback Ray), with
    Ray's usage reporting off and a headless matplotlib."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_USAGE_STATS_ENABLED="0", MPLBACKEND="Agg")
    return env


def _run(args: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert proc.returncode == 0, (f"{' '.join(args)} exited with {proc.returncode}\n--- stderr:\n{proc.stderr}"
                                  f"\n--- stdout (end):\n{proc.stdout[-3000:]}")
    return proc


@functools.lru_cache(maxsize=None)
def _help(script: Path) -> str:
    return _run([str(script), "--help"]).stdout


def test_there_are_benchmarks():
    assert len(BENCHMARKS) >= 7, BENCHMARKS


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda p: p.stem)
def test_help_offers_smoke(script):
    assert "--smoke" in _help(script)


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda p: p.stem)
def test_smoke_run(script, tmp_path):
    args = [str(script), "--smoke"]
    if "--out" in _help(script):
        args += ["--out", str(tmp_path)]
    proc = _run(args)
    assert proc.stdout.strip(), f"{script.name} --smoke printed nothing"
