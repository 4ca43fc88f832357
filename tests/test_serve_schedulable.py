"""How many labeler replicas a node holds (pure: no cluster)."""

from __future__ import annotations

import math

from serve_apps.schedulable import replicas_held


def test_a_node_holds_a_replica_only_with_every_resource_it_asks():
    node = {"CPU": 4.0, "GPU": 1.0, "memory": 8e9, "accel_a": 1.0}
    assert replicas_held(node, {"CPU": 4, "GPU": 1}) == 1
    assert replicas_held(node, {"CPU": 1, "GPU": 0, "accel_a": 1}) == 1  # nothing asked of a resource with 0
    assert replicas_held(node, {"CPU": 4.5, "GPU": 1}) == 0
    assert replicas_held(node, {"CPU": 1, "GPU": 2}) == 0
    assert replicas_held(node, {"CPU": 1, "accel_b": 1}) == 0, "a resource the node lacks"
    assert replicas_held({"CPU": 0.3333}, {"CPU": 1 / 3}) == 1, "Ray rounds quantities to 4 places"
    assert replicas_held({}, {"CPU": 0, "GPU": 0}) == math.inf, "a replica asking nothing fits anywhere"


def test_the_scarcest_resource_sets_how_many_replicas_a_node_holds():
    node = {"CPU": 8.0, "GPU": 2.0}
    assert replicas_held(node, {"CPU": 1}) == 8
    assert replicas_held(node, {"CPU": 1, "GPU": 1}) == 2, "GPUs run out first"
    assert replicas_held(node, {"CPU": 3, "GPU": 0.5}) == 2, "CPUs run out first"
    assert replicas_held({"CPU": 1.0}, {"CPU": 0.1}) == 10
    assert replicas_held({"CPU": 4.0}, {"CPU": 1.5}) == 2
