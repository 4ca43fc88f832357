"""Which node can hold a labeler replica (pure: no cluster)."""

from __future__ import annotations

from serve_apps.schedulable import holds


def test_a_node_holds_a_replica_only_with_every_resource_it_asks():
    node = {"CPU": 4.0, "GPU": 1.0, "memory": 8e9, "accel_a": 1.0}
    assert holds(node, {"CPU": 4, "GPU": 1})
    assert holds(node, {"CPU": 1, "GPU": 0, "accel_a": 1})  # nothing asked of a resource with 0
    assert not holds(node, {"CPU": 4.5, "GPU": 1})
    assert not holds(node, {"CPU": 1, "GPU": 2})
    assert not holds(node, {"CPU": 1, "accel_b": 1}), "a resource the node lacks"
    assert holds({"CPU": 0.3333}, {"CPU": 1 / 3}), "Ray rounds quantities to 4 places"
    assert holds({}, {"CPU": 0, "GPU": 0}), "a replica asking nothing fits anywhere"
