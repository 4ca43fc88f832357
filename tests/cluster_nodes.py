"""The multi-node cluster harness for tests: a head and workers started with `ray start` on this machine.

The harness itself lives in :mod:`bench.nodes` (the node-loss benchmark starts the same
cluster, and bench/ imports nothing from tests/): ``ray_cluster_nodes`` starts it,
``Cluster.kill_node`` kill -9s a whole node, ``Cluster.add_node`` adds one.
"""

from bench.nodes import (
    Cluster,
    Node,
    free_port,
    job_output,
    labeler_config,
    ray_cluster_nodes,
    replica_pids,
    serve_deploy,
    submit,
    submit_label,
    submitted_result,
    wait_for,
    worker_node_running,
)

__all__ = [
    "Cluster",
    "Node",
    "free_port",
    "job_output",
    "labeler_config",
    "ray_cluster_nodes",
    "replica_pids",
    "serve_deploy",
    "submit",
    "submit_label",
    "submitted_result",
    "wait_for",
    "worker_node_running",
]
