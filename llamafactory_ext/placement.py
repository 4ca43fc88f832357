"""Whether a Ray cluster can ever hold a run's Ray Train workers.

Ray Train waits for its workers' placement group without a word, and for ever when no arrangement
of the cluster's nodes can hold it: ``lancetag train`` with a GPU config on a CPU cluster, or 4
CPUs per worker on 2-CPU nodes, would hang. :func:`require_placeable` refuses such a run before any
work with ``resources_unavailable``, naming what the run asks and what the nodes have.

Judged by the nodes' total resources, not what is free now: a run that fits waits for busy
resources, as Ray Train does. A cluster that autoscales is judged by the node types its autoscaler
may start as well (their counts capped at the workers asked for), read from the cluster config the
autoscaler keeps in Ray's GCS: where Ray Data reads whether a cluster autoscales.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from lance_io.reasons import ReasonError

Resources = Mapping[str, float]

_PRECISION = 1e-4  # Ray keeps resource quantities to 4 decimal places


def bundles_on(node: Resources, bundle: Resources) -> int:
    """Return how many ``bundle`` (one worker's resources) one node of ``node`` resources holds."""
    fits = [math.floor(node.get(name, 0.0) / amount + _PRECISION) for name, amount in bundle.items() if amount > 0]
    return min(fits, default=0)


def placeable(nodes: Sequence[Resources], bundle: Resources, workers: int, strategy: str) -> bool:
    """Return whether ``workers`` bundles can be placed on ``nodes`` under Ray's placement ``strategy``."""
    held = [bundles_on(node, bundle) for node in nodes]
    if strategy == "STRICT_PACK":  # every bundle on one node
        return max(held, default=0) >= workers
    if strategy == "STRICT_SPREAD":  # every bundle on its own node
        return sum(count >= 1 for count in held) >= workers
    return sum(held) >= workers  # PACK and SPREAD are preferences: any arrangement will do


def autoscaler_nodes(config: Any, workers: int) -> list[dict[str, float]]:
    """Return the nodes an autoscaler ``config`` (Ray's ``ClusterConfig``, or None) may start, each
    node type ``max_count`` times (unbounded: ``workers`` times)."""
    if config is None:
        return []
    nodes = []
    for group in config.node_group_configs:
        count = workers if group.max_count < 0 else min(group.max_count, workers)
        nodes += [{name: float(amount) for name, amount in group.resources.items()}] * count
    return nodes


def require_placeable(workers: int, bundle: Resources, strategy: str) -> None:
    """Raise ``resources_unavailable`` unless the connected Ray cluster, as it is or as its autoscaler
    may grow it, can hold ``workers`` workers of ``bundle`` resources placed by ``strategy``."""
    import ray
    from ray._private.state import state  # the autoscaler's config: no public API reads it

    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    if placeable(nodes, bundle, workers, strategy):
        return
    if placeable(autoscaler_nodes(state.get_cluster_config(), workers), bundle, workers, strategy):
        return
    asked = f"{workers} worker{'s' if workers != 1 else ''} of {_describe(bundle, bundle)} ({strategy})"
    raise ReasonError(
        "resources_unavailable",
        f"the run asks {asked}, and no arrangement of the cluster's nodes holds them "
        f"({_describe_nodes(nodes, bundle)}): lower workers, cpus_per_worker or gpus_per_worker "
        "(the config's lancetag: block, --workers, --gpus-per-worker), or add nodes",
    )


def _describe(resources: Resources, names: Iterable[str]) -> str:
    return ", ".join(f"{name} {resources.get(name, 0.0):g}" for name in names)


def _describe_nodes(nodes: Sequence[Resources], bundle: Resources) -> str:
    if not nodes:
        return "no node is alive"
    kinds = Counter(_describe(node, bundle) for node in nodes)
    return "; ".join(f"{count} node{'s' if count != 1 else ''} of {kind}" for kind, count in kinds.items())
