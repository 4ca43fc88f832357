"""Whether a Ray cluster can ever start a labeler's replicas.

Ray Serve waits for a replica no node can hold, and only logs every 30 s that it "has taken more
than 30s to be scheduled": ``lancetag serve --gpus 1`` on a cluster without a GPU, a replica of
more CPUs than any node has, or ``--replicas 4`` where the nodes hold two, would wait for ever.
:func:`require_schedulable` refuses it before deploying with ``resources_unavailable``, naming what
a replica asks and what the nodes have.

Judged by the nodes' total resources, not what is free now: a replica that fits waits for busy
resources, as Serve does. A cluster with an autoscaler is left to it, since it may start a node
that fits (its cluster config in Ray's GCS, where Ray Data reads whether a cluster autoscales).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from lance_io.reasons import ReasonError

Resources = Mapping[str, float]

_PRECISION = 1e-4  # Ray keeps resource quantities to 4 decimal places


def replicas_held(node: Resources, ask: Resources) -> float:
    """Return how many replicas asking ``ask`` a node of ``node`` total resources holds at once
    (``math.inf`` when a replica asks nothing)."""
    asked = [(node.get(name, 0.0), amount) for name, amount in ask.items() if amount > 0]
    return min((math.floor((have + _PRECISION) / amount) for have, amount in asked), default=math.inf)


def require_schedulable(ask: Resources, replicas: int = 1) -> None:
    """Raise ``resources_unavailable`` unless the connected Ray cluster's nodes can hold ``replicas``
    replicas, each asking ``ask`` (``CPU``, ``GPU`` and custom resources), or the cluster has an autoscaler.

    Replicas alike pack node by node, so the nodes hold the sum of what each holds alone."""
    import ray
    from ray._private.state import state  # the autoscaler's config: no public API reads it

    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    held = sum(replicas_held(node, ask) for node in nodes)
    if held >= replicas:
        return
    try:
        if state.get_cluster_config() is not None:  # an autoscaler may start a node that holds it
            return
    except Exception:  # a connection that cannot read it (Ray Client): leave the wait to Serve, as before
        return
    asked = {name: amount for name, amount in ask.items() if amount > 0}
    if held > 0:
        raise ReasonError(
            "resources_unavailable",
            f"{replicas} labeler replicas ask {_listed(asked)} each, and the nodes of the cluster ({len(nodes)}) hold "
            f"{held:g} of them at once: ask fewer (`lancetag serve --replicas`; LabelerConfig's num_replicas, "
            "autoscaling.min_replicas) or less each, or add nodes",
        )
    most = {name: max((node.get(name, 0.0) for node in nodes), default=0.0) for name in asked}
    raise ReasonError(
        "resources_unavailable",
        f"a labeler replica asks {_listed(asked)}, and no node of the cluster holds it (the most a node of "
        f"its {len(nodes)} has: {_listed(most)}): ask less (`lancetag serve --gpus`, `--resource`; LabelerConfig's "
        "num_cpus, num_gpus, resources) or add a node that has it",
    )


def _listed(resources: Resources) -> str:
    return ", ".join(f"{name} {amount:g}" for name, amount in resources.items())
