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


def pytest_collection_modifyitems(items):
    """Tests on the session's Ray cluster form one xdist group: under ``-n N --dist loadgroup`` (what
    ``scripts/test.sh`` runs) one worker starts the cluster and runs them all while the others run the
    rest, so a run still starts one cluster."""
    for item in items:
        if "ray_cluster" in item.fixturenames or item.get_closest_marker("uses_ray"):
            item.add_marker(pytest.mark.xdist_group("ray"))


@pytest.fixture(autouse=True)
def _ray_only_on_the_session_cluster():
    """Fail a test that started Ray in this process without the ``ray_cluster`` fixture (a Ray started
    on its own binds to the machine's network address, and under xdist it would be a second cluster)."""
    yield
    if not _SESSION and "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
            pytest.fail("started Ray without the ray_cluster fixture (the session's loopback cluster)")


@pytest.fixture(scope="session")
def ray_cluster():
    """One real multi-node Ray cluster for the whole session: a head and two worker nodes, all on
    loopback, token auth as Ray defaults; shut down at the end."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, connect=True, head_node_args={
        "num_cpus": 4, "node_ip_address": RAY_NODE_IP, "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=4, node_ip_address=RAY_NODE_IP)
    cluster.wait_for_nodes()
    for node in ray.nodes():
        assert ipaddress.ip_address(node["NodeManagerAddress"]).is_loopback, node["NodeManagerAddress"]
    _SESSION["cluster"] = cluster
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
