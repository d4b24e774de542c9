"""Device placement (``run.device``, ``decentralized.gpus_per_agent``, ``tune.gpus_per_trial``).

Every CI machine runs the whole device path on the CPU with ``run.device: cpu`` asked for explicitly;
Ray's GPU placement is checked by declaring GPUs to the test cluster (Ray hands out shares and
``CUDA_VISIBLE_DEVICES`` whether or not the hardware is there). Tests that need a real GPU carry the
``cuda`` marker and are skipped without one.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pytest
import torch

from bilevel_ray.config import from_dict
from bilevel_ray.device import check_device, resolve_device, to_device
from bilevel_ray.runner import run

cuda = pytest.mark.cuda
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@dataclass(frozen=True)
class _Holder:
    data: tuple
    counts: Counter
    name: str = "h"

    def __post_init__(self):
        object.__setattr__(self, "derived", {"w": self.data[0] * 2})


def test_device_names_are_checked_and_a_missing_gpu_is_one_line():
    for ok in ("auto", "cpu", "cuda", "cuda:1"):
        assert check_device(ok) == ok
    for bad in ("gpu", "cuda:x", "CUDA", 0):
        with pytest.raises(ValueError, match=r"run.device: must be auto, cpu, cuda or cuda:N, got"):
            check_device(bad)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"^run.device: cuda:1 asked for, but this process sees no CUDA device"):
            resolve_device("cuda:1")


def test_to_device_moves_tensors_through_containers_and_dataclasses_and_keeps_the_rest():
    holder = _Holder((torch.ones(3), [torch.zeros(2)]), Counter(env_steps=5))
    assert to_device(holder, "cpu") is holder  # nothing to move: the very same object
    moved = to_device(holder, "meta")  # a device every build has, where tensors have no data
    assert moved is not holder and moved.counts is holder.counts and moved.name == "h"
    assert moved.data[0].device.type == "meta" and moved.data[1][0].device.type == "meta"
    assert moved.derived["w"].device.type == "meta"  # attributes __post_init__ set move too
    assert holder.data[0].device.type == "cpu"  # the original is left as it was
    shared = torch.ones(2)
    pair = to_device((shared, {"again": shared}), "meta")
    assert pair[0] is pair[1]["again"]  # one tensor held twice is moved once


def _quadratic(device: str, backend: str = "sim", agents: int = 1, tmp_path=None) -> dict:
    return {"task": {"name": "quadratic", "dim_x": 3, "dim_y": 4, "n_inner": 32, "n_outer": 32, "batch_size": 8},
            "algorithm": {"name": "soba", "inner_lr": 0.1, "outer_lr": 0.05},
            "decentralized": {"agents": agents, "topology": "ring", "backend": backend},
            "run": {"steps": 4, "eval_every": 2, "seed": 0, "progress": False, "device": device,
                    "checkpoint_every": 2, **({"out_dir": str(tmp_path)} if tmp_path else {})}}


@pytest.mark.parametrize("agents", [1, 3])
def test_the_device_path_runs_on_the_cpu_asked_for_explicitly(agents, tmp_path):
    """``run.device: cpu``: the backend's task data, states and minibatches are on that device, and the
    run logs what the default (auto) does on a machine without a GPU."""
    from bilevel_ray.decentralized.backends import make_backend
    from bilevel_ray.problem import bind, rng_for

    cfg = from_dict(_quadratic("cpu", agents=agents, tmp_path=tmp_path / "a"))
    backend = make_backend(cfg.task, cfg.algorithm, cfg.decentralized, seed=0, device=cfg.run.device)
    try:
        for state in backend.states():
            assert all(t.device == torch.device("cpu") for t in torch.utils._pytree.tree_leaves((state.x, state.y)))
        problem = backend.task if agents == 1 else backend.problem
        _, batch = bind(problem, backend.state).inner.sample(rng_for(0, 0 if agents == 1 else tuple(range(agents)), 0))
        assert all(t.device == torch.device("cpu") for t in torch.utils._pytree.tree_leaves(batch))
    finally:
        backend.close()
    rows = run(cfg, progress=False)
    if not torch.cuda.is_available():
        auto = run(from_dict({**_quadratic("auto", agents=agents, tmp_path=tmp_path / "b")}), progress=False)
        assert [{k: v for k, v in r.items() if k not in ("wall_time", "round_latency")} for r in rows] == \
               [{k: v for k, v in r.items() if k not in ("wall_time", "round_latency")} for r in auto]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_asking_for_a_missing_gpu_is_one_line_exit_2_before_any_work(tmp_path, capsys):
    import yaml

    from bilevel_ray.cli import main

    path = tmp_path / "q.yaml"
    path.write_text(yaml.safe_dump(_quadratic("cuda")))
    out = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["bilevel-ray: error: run.device: cuda asked for, but this process sees no CUDA device "
                   "(torch.cuda.is_available() is False); use auto or cpu"]
    assert not out.exists()


@cuda
@needs_gpu
@pytest.mark.parametrize("agents", [1, 3])
def test_a_run_on_the_gpu_logs_what_the_cpu_run_logs(agents, tmp_path):
    gpu = run(from_dict(_quadratic("cuda", agents=agents, tmp_path=tmp_path / "gpu")), progress=False)
    cpu = run(from_dict(_quadratic("cpu", agents=agents, tmp_path=tmp_path / "cpu")), progress=False)
    for a, b in zip(gpu, cpu):
        assert a["outer_objective"] == pytest.approx(b["outer_objective"], rel=1e-4, abs=1e-6)


def test_ray_agents_get_their_gpu_share_and_compute_on_the_device_asked_for(ray_cluster):
    """Each agent asks Ray for ``gpus_per_agent`` of a GPU and receives it (GPU ids and the
    ``CUDA_VISIBLE_DEVICES`` Ray sets); with ``run.device: cpu`` it computes on the CPU and follows the
    simulation. Asking for more GPU than the cluster has, or for CUDA without a share, is one line."""
    from bilevel_ray.decentralized.backends import check_gpu_request, make_backend

    cfg = from_dict({**_quadratic("cpu", backend="ray", agents=3),
                     "decentralized": {"agents": 3, "topology": "ring", "backend": "ray", "gpus_per_agent": 0.5}})
    sim_cfg = from_dict(_quadratic("cpu", agents=3))
    backend = make_backend(cfg.task, cfg.algorithm, cfg.decentralized, seed=0, device="cpu")
    sim = make_backend(sim_cfg.task, sim_cfg.algorithm, sim_cfg.decentralized, seed=0, device="cpu")
    try:
        placements = backend.placements()
        for p in placements:
            assert p["device"] == "cpu" and len(p["gpu_ids"]) == 1
            assert p["cuda_visible_devices"] == p["gpu_ids"][0]
        for _ in range(3):
            backend.step()
            sim.step()
        for a, b in zip(backend.states(), sim.states()):
            assert torch.allclose(a.x, b.x, atol=1e-6) and a.x.device == torch.device("cpu")
    finally:
        backend.close()
    greedy = from_dict({**_quadratic("cpu", backend="ray", agents=3),
                        "decentralized": {"agents": 3, "backend": "ray", "gpus_per_agent": 10}})
    with pytest.raises(ValueError, match=r"^decentralized.gpus_per_agent: 3 agents x 10.0 GPU need 30 GPUs, the Ray "
                                         r"cluster has 4$"):
        check_gpu_request("cpu", greedy.decentralized)
    with pytest.raises(ValueError, match=r"^run.device: cuda on Ray agents needs decentralized.gpus_per_agent > 0"):
        check_gpu_request("cuda", cfg.decentralized.__class__(agents=3, backend="ray"))


def test_bfloat16_mixed_precision_keeps_second_order_products_and_the_hypergradient_close():
    """``run.dtype: bfloat16``: the first-order oracles run the model under bfloat16 autocast (their
    values move, within bfloat16's precision), HVPs and cross products are those of the task in float32
    bit for bit, and the hypergradient ∇_x f − ∇²_xy g·[∇²_yy g]⁻¹∇_y f stays within 2% of float32's."""
    from bilevel_ray import oracles
    from bilevel_ray.linalg import cg
    from bilevel_ray.precision import MixedPrecision, mixed_precision
    from bilevel_ray.tasks import make_task
    from bilevel_ray import tree

    task = make_task("logreg_hpo", dataset="synthetic", n_samples=400, n_features=24, batch_size=None, dtype="float32")
    assert mixed_precision(task, "float32", "cpu") is task
    mixed = mixed_precision(task, "bfloat16", "cpu")
    assert isinstance(mixed, MixedPrecision) and mixed.inner is task.inner
    x, y = task.init(seed=0)
    y = y + 0.3 * torch.randn(y.shape, generator=torch.Generator().manual_seed(0))
    bi, bo = task.inner.full(), task.outer.full()

    def hypergradient(problem):
        fx, fy = oracles.grad_xy(problem.f, x, y, bo)
        v = cg(lambda u: oracles.hvp(problem.g, x, y, u, bi), fy, torch.zeros_like(fy), 50)
        return fx - oracles.cross(problem.g, x, y, v, bi), fy

    v = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    assert torch.equal(oracles.hvp(mixed.g, x, y, v, bi), oracles.hvp(task.g, x, y, v, bi))
    assert torch.equal(oracles.fused(mixed.g, x, y, v, bi)[2], oracles.fused(task.g, x, y, v, bi)[2])
    (h32, fy32), (h16, fy16) = hypergradient(task), hypergradient(mixed)
    assert not torch.equal(fy16, fy32)  # bfloat16 really ran
    assert h16.dtype == h32.dtype == torch.float32
    assert float(tree.norm(h16 - h32)) <= 0.02 * float(tree.norm(h32)), (h16, h32)


def test_a_bfloat16_run_follows_the_float32_run_closely(tmp_path):
    f32 = _quadratic("cpu", agents=3, tmp_path=tmp_path / "f32")
    f32["task"]["dtype"] = "float32"
    full = run(from_dict(f32), progress=False)
    cfg = _quadratic("cpu", agents=3, tmp_path=tmp_path / "bf16")
    cfg["task"]["dtype"] = "float32"
    cfg["run"]["dtype"] = "bfloat16"
    half = run(from_dict(cfg), progress=False)  # autocast acts on float32 tasks (float64 ones stay as they are)
    assert [r["step"] for r in half] == [r["step"] for r in full]
    assert half[-1]["outer_objective"] != full[-1]["outer_objective"]
    assert half[-1]["outer_objective"] == pytest.approx(full[-1]["outer_objective"], rel=0.05)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_the_gpu_benchmark_refuses_in_one_line_without_a_gpu():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "benchmarks/gpu.py", "--sections", "oracles"], cwd=root,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == ["gpu.py: run.device: cuda asked for, but this process sees no CUDA "
                                                "device (torch.cuda.is_available() is False); use auto or cpu"]
