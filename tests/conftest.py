import ipaddress
import os

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")
# Test tensors are small: one intra-op thread avoids OpenMP spin-waiting when the shared machine is
# busy (two threads on a loaded 2-core box can be 100x slower).
torch.set_num_threads(1)

#: every Ray node of the test session binds here (a loopback address Ray does not rewrite)
RAY_NODE_IP = "127.0.0.2"


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
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
