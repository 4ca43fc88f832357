"""A run whose Ray Train workers no arrangement of the cluster's nodes can hold is refused at once.

Ray Train would wait for their placement group for ever, without a word.
"""

from __future__ import annotations

import pytest

from llamafactory_ext.placement import autoscaler_nodes, bundles_on, placeable

CPU_NODE = {"CPU": 2.0, "memory": 8e9}
GPU_NODE = {"CPU": 8.0, "GPU": 2.0}


def test_a_node_holds_as_many_bundles_as_its_scarcest_resource_allows():
    assert bundles_on(GPU_NODE, {"CPU": 4.0, "GPU": 1.0}) == 2
    assert bundles_on(GPU_NODE, {"CPU": 3.0, "GPU": 0.5}) == 2  # the CPUs run out first
    assert bundles_on(CPU_NODE, {"CPU": 1.0, "GPU": 1.0}) == 0  # a resource the node lacks
    assert bundles_on({"CPU": 0.3}, {"CPU": 0.1}) == 3  # 0.3 / 0.1 is 2.9999... in floating point


@pytest.mark.parametrize(
    ("strategy", "workers", "fits"),
    [
        ("PACK", 3, True),  # two on the GPU node, one on the other
        ("SPREAD", 3, True),
        ("PACK", 4, False),
        ("STRICT_PACK", 2, True),
        ("STRICT_PACK", 3, False),  # no one node holds three
        ("STRICT_SPREAD", 2, True),
        ("STRICT_SPREAD", 3, False),  # two nodes for three workers on nodes of their own
    ],
)
def test_placement_follows_ray_strategies(strategy, workers, fits):
    nodes = [GPU_NODE, {"CPU": 4.0, "GPU": 1.0}, CPU_NODE]
    assert placeable(nodes, {"CPU": 2.0, "GPU": 1.0}, workers, strategy) is fits


def test_an_autoscaling_cluster_is_judged_by_the_nodes_it_may_start():
    from ray.core.generated import autoscaler_pb2

    config = autoscaler_pb2.ClusterConfig()
    group = config.node_group_configs.add()
    group.resources.update({"CPU": 8, "GPU": 1})
    group.max_count = -1  # unbounded
    small = config.node_group_configs.add()
    small.resources.update({"CPU": 2})
    small.max_count = 1

    nodes = autoscaler_nodes(config, workers=3)
    assert nodes.count({"CPU": 8.0, "GPU": 1.0}) == 3 and nodes.count({"CPU": 2.0}) == 1
    assert placeable(nodes, {"CPU": 4.0, "GPU": 1.0}, 3, "STRICT_SPREAD")
    assert not placeable(nodes, {"CPU": 4.0, "GPU": 2.0}, 1, "PACK")  # no node type has two GPUs
    assert autoscaler_nodes(None, workers=3) == []  # no autoscaler: the nodes up now are the cluster
