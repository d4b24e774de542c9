import ipaddress
import os
import sys

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")
# Test tensors are small: one intra-op thread avoids OpenMP spin-waiting when the shared machine is
# busy (two threads on a loaded 2-core box can be 100x slower).
torch.set_num_threads(1)

#: every Ray node of the test session binds here (a loopback address Ray does not rewrite)
RAY_NODE_IP = "127.0.0.2"


#: holds the session's cluster once a test asked for it
_SESSION = {}


@pytest.fixture(autouse=True)
def _ray_only_on_the_session_cluster():
    """Fail a test that started Ray in this process without the ``ray_cluster`` fixture (a Ray started
    on its own binds to the machine's network address, and it would be this session's second cluster)."""
    yield
    if not _SESSION and "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
            pytest.fail("started Ray without the ray_cluster fixture (the session's loopback cluster)")


@pytest.fixture(scope="session")
def ray_cluster():
    """One real multi-node Ray cluster for the whole session, started by the first test that asks: a
    head and two worker nodes, all on loopback, token auth as Ray defaults; shut down at the end. Each
    worker node declares two GPUs (none need exist: Ray hands out shares and ``CUDA_VISIBLE_DEVICES``
    all the same, which is what the placement tests check; tasks asking for no GPU see none). Under
    pytest-xdist each worker process is its own session and starts its own cluster when it first needs
    one (``scripts/test.sh`` runs two workers; the Ray tests keep both cores busy, so running them all on
    one worker would leave the other idle)."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, connect=True, head_node_args={
        "num_cpus": 4, "node_ip_address": RAY_NODE_IP, "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=4, num_gpus=2, node_ip_address=RAY_NODE_IP)
    cluster.wait_for_nodes()
    for node in ray.nodes():
        assert ipaddress.ip_address(node["NodeManagerAddress"]).is_loopback, node["NodeManagerAddress"]
    _SESSION["cluster"] = cluster
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
