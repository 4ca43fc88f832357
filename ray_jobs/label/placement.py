"""Which node labeled which rows: what a run's summary and each label commit say about placement.

A labeling worker tags what it hands back with its node (``worker_node``); the driver keeps, for
the values waiting for a commit, the node each row's value came from, and counts what each
commit really wrote by node (:class:`NodeRows`). Each label version then carries
``lancetag.nodes`` (JSON: node id -> rows this commit wrote) and the run's summary ``nodes``
(node id -> rows, summed over the run's commits): on a cluster, a run that never used a node
shows it, and a node lost mid-run shows where its work went.
"""

from __future__ import annotations

import json
from collections import Counter

import pyarrow as pa

NODES_PROPERTY = "lancetag.nodes"


def worker_node() -> str:
    """Return the Ray node id (hex) of the calling process; "" outside Ray."""
    import ray

    if not ray.is_initialized():
        return ""
    return ray.get_runtime_context().get_node_id() or ""


class NodeRows:
    """The node of every value waiting for a commit, and the rows each node's values filled in commits."""

    def __init__(self) -> None:
        self.pending: dict[str, str] = {}  # row id -> node whose worker computed its waiting value
        self.written: Counter[str] = Counter()

    def add(self, node: str, values: pa.Table) -> None:
        """Remember that ``values`` (``id`` + label columns) came from a worker on ``node`` (first value per id wins, as in the commit)."""
        for row_id in values.column("id").to_pylist():
            self.pending.setdefault(row_id, node)

    def of(self, written: pa.Table) -> Counter[str]:
        """Return rows by node among ``written`` (the rows a commit wrote)."""
        return Counter(self.pending.get(row_id, "") for row_id in written.column("id").to_pylist())

    def properties(self, written: pa.Table) -> dict[str, str]:
        """Return the commit's ``lancetag.nodes`` property for the rows it writes."""
        return {NODES_PROPERTY: json.dumps(dict(self.of(written)), sort_keys=True)}

    def committed(self, written: pa.Table) -> None:
        """Count what a commit wrote by node and forget every waiting value (the commit took them all)."""
        self.written.update(self.of(written))
        self.pending.clear()
