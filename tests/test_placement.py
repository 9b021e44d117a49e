"""Placement of shards and workers (server/placement.py) and the too-small-cluster errors of ``rayps train``.

The strategy choice and the capacity checks are pure functions over a node list (``ray.nodes()`` entries), tested
here on made-up clusters; the placement group itself runs on the session's one-node Ray. Several nodes and node
loss: tests/test_multinode.py.
"""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from rayps.deploy.cli import UsageError, main
from rayps.server.placement import (MIN_BUNDLE_CPUS, PlacementError, capacity_problems, choose_strategy,
                                    eligible_nodes, shard_bundle)


def node(cpus=0.0, gpus=0.0, alive=True, name="n"):
    resources = {"memory": 1e9, f"node:{name}": 1.0}
    if cpus:
        resources["CPU"] = float(cpus)
    if gpus:
        resources["GPU"] = float(gpus)
    return {"NodeID": name, "Alive": alive, "Resources": resources}


HEAD = node(cpus=0, name="head")  # the deploy manifests start the head with --num-cpus 0


# -- bundles and strategy ------------------------------------------------------------------------------------------


def test_a_bundle_is_never_empty_and_carries_gpus_only_when_asked():
    assert shard_bundle(0, 0) == {"CPU": MIN_BUNDLE_CPUS}
    assert shard_bundle(2, 0) == {"CPU": 2.0}
    assert shard_bundle(0, 0.5) == {"CPU": MIN_BUNDLE_CPUS, "GPU": 0.5}


def test_auto_is_strict_spread_when_enough_nodes_can_hold_a_shard():
    nodes = [HEAD] + [node(cpus=1, name=f"w{i}") for i in range(3)]
    assert choose_strategy("auto", 3, nodes, shard_bundle(1, 0)) == "STRICT_SPREAD"
    assert choose_strategy("auto", 2, nodes, shard_bundle(1, 0)) == "STRICT_SPREAD"


def test_auto_counts_neither_a_zero_cpu_head_nor_dead_nodes():
    nodes = [HEAD, node(cpus=4, name="w0"), node(cpus=4, name="w1"), node(cpus=4, alive=False, name="gone")]
    bundle = shard_bundle(0, 0)  # even a 0-CPU shard reserves MIN_BUNDLE_CPUS, which the head does not have
    assert [n["NodeID"] for n in eligible_nodes(nodes, bundle)] == ["w0", "w1"]
    assert choose_strategy("auto", 3, nodes, bundle) == "SPREAD"
    assert choose_strategy("auto", 2, nodes, bundle) == "STRICT_SPREAD"


def test_auto_counts_only_gpu_nodes_for_gpu_shards():
    nodes = [node(cpus=8, name="c0"), node(cpus=8, name="c1"), node(cpus=4, gpus=1, name="g0")]
    assert choose_strategy("auto", 2, nodes, shard_bundle(1, 0)) == "STRICT_SPREAD"
    assert choose_strategy("auto", 2, nodes, shard_bundle(1, 1)) == "SPREAD"


def test_an_explicit_strategy_is_kept_and_strict_spread_needs_the_nodes():
    nodes = [node(cpus=2, name=f"w{i}") for i in range(4)]
    assert choose_strategy("spread", 2, nodes, shard_bundle(1, 0)) == "SPREAD"
    assert choose_strategy("strict_spread", 4, nodes, shard_bundle(1, 0)) == "STRICT_SPREAD"
    with pytest.raises(PlacementError, match=r"'strict_spread' needs 5 nodes .*\(1 CPU\), the cluster has 4"):
        choose_strategy("strict_spread", 5, nodes, shard_bundle(1, 0))
    with pytest.raises(ValueError, match="strategy must be one of"):
        choose_strategy("pack", 2, nodes, shard_bundle(1, 0))


# -- capacity: what a too-small cluster lacks -----------------------------------------------------------------------


def test_a_cluster_with_enough_cpus_and_gpus_has_no_problem():
    nodes = [HEAD, node(cpus=4, gpus=1, name="g0"), node(cpus=4, gpus=1, name="g1")]
    assert capacity_problems(nodes, 2, 1, 1, 4, 1, 0) == []
    assert capacity_problems([node(cpus=2)], 2, 0, 0, 4, 0, 0) == []  # 0-CPU actors: only the bundle minimum


def test_too_few_cpus_in_total_names_the_cpus_missing():
    (problem,) = capacity_problems([HEAD, node(cpus=2)], 2, 1, 0, 4, 1, 0)
    assert problem == ("the Ray cluster has 2 CPUs but 2 shards x 1 + 4 workers x 1 need 6 (4 CPUs missing); "
                       "lower --cpus-per-shard/--cpus-per-worker or add nodes")


def test_too_few_gpus_names_the_gpus_missing():
    (problem,) = capacity_problems([node(cpus=16, gpus=1)], 2, 1, 1, 2, 1, 0.5)
    assert problem == ("the Ray cluster has 1 GPUs but 2 shards x 1 + 2 workers x 0.5 need 3 (2 GPUs missing); "
                       "lower --gpus-per-shard/--gpus-per-worker or add GPU nodes")
    total, per_node = capacity_problems([node(cpus=16)], 1, 1, 0, 1, 1, 1)
    assert "has 0 GPUs" in total and "1 GPUs missing" in total
    assert per_node == ("no node of the Ray cluster can hold one worker (1 CPU, 1 GPU, from --cpus-per-worker/"
                        "--gpus-per-worker); its largest node has 16 CPU, 0 GPU")


def test_a_shard_larger_than_every_node_is_named_with_the_largest_node():
    (problem,) = capacity_problems([node(cpus=2, name="a"), node(cpus=2, name="b")], 1, 3, 0)
    assert problem == ("no node of the Ray cluster can hold one shard (3 CPU, from --cpus-per-shard/"
                       "--gpus-per-shard); its largest node has 2 CPU")


def test_shards_that_fit_in_total_but_not_node_by_node_are_named():
    nodes = [node(cpus=1.5, name="a"), node(cpus=1.5, name="b")]  # 3 CPUs, but each node holds one 1-CPU shard
    (problem,) = capacity_problems(nodes, 3, 1, 0)
    assert problem.startswith("the Ray cluster's nodes can hold only 2 of 3 shards (1 CPU each")


def test_a_worker_larger_than_every_node_is_named():
    nodes = [node(cpus=4, name="c"), node(cpus=2, gpus=1, name="g")]
    (problem,) = capacity_problems(nodes, 1, 0, 0, 1, 3, 1)
    assert problem.startswith("no node of the Ray cluster can hold one worker (3 CPU, 1 GPU, from "
                              "--cpus-per-worker/--gpus-per-worker); its largest node has")


# -- rayps train: cpus_per_process ---------------------------------------------------------------------------------


class FakeRay:
    def __init__(self, nodes):
        self._nodes = nodes

    def nodes(self):
        return self._nodes

    def cluster_resources(self):
        total = {}
        for entry in self._nodes:
            if entry["Alive"]:
                for key, value in entry["Resources"].items():
                    total[key] = total.get(key, 0.0) + value
        return total


def _args(**overrides):
    values = dict(shards=2, workers=4, cpus_per_shard=None, cpus_per_worker=None, gpus_per_shard=0.0,
                  gpus_per_worker=0.0)
    values.update(overrides)
    return argparse.Namespace(**values)


def test_resources_share_the_cluster_cpus_and_check_gpus():
    from rayps.deploy.cluster import cpus_per_process

    per_shard, per_worker = cpus_per_process(_args(), FakeRay([HEAD, node(cpus=3, name="w0")]))
    assert per_shard == per_worker == pytest.approx(0.5)
    assert cpus_per_process(_args(gpus_per_shard=1), FakeRay([node(cpus=8, gpus=2)])) == (1.0, 1.0)
    with pytest.raises(UsageError, match=r"has 0 GPUs but 2 shards x 1 \+ 4 workers x 0 need 2 \(2 GPUs missing\)"):
        cpus_per_process(_args(gpus_per_shard=1), FakeRay([node(cpus=8)]))
    with pytest.raises(UsageError, match=r"has 2 CPUs but 2 shards x 2 \+ 4 workers x 0.25 need 5 \(3 CPUs missing"):
        cpus_per_process(_args(cpus_per_shard=2, cpus_per_worker=0.25), FakeRay([node(cpus=2)]))


def _one_error_line(capsys):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rayps train: error: "), err
    return lines[0]


@pytest.mark.parametrize("argv,needles", [
    (["--gpus-per-shard", "1"], ["0 GPUs", "GPUs missing", "--gpus-per-shard"]),
    (["--gpus-per-worker", "0.5", "--workers", "2"], ["0 GPUs", "1 GPUs missing", "--gpus-per-worker"]),
    (["--shards", "1", "--cpus-per-shard", "3", "--cpus-per-worker", "0"],
     ["no node", "one shard (3 CPU", "largest node has 2 CPU"]),
    (["--cpus-per-worker", "1"], ["2 CPUs", "4 workers x 1", "CPUs missing"]),
])
def test_rayps_train_on_a_too_small_cluster_exits_2_with_one_line_naming_what_is_missing(ray_session, capsys,
                                                                                           argv, needles):
    assert main(["train", "--epochs", "1", "--quiet", *argv]) == 2
    line = _one_error_line(capsys)
    for needle in needles:
        assert needle in line, line


# -- the placement group on the session's Ray (one node, 2 CPUs) ----------------------------------------------------


def test_options_put_each_shard_in_its_bundle_and_leave_workers_outside(ray_session):
    from ray.util.placement_group import placement_group_table
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from rayps.server.placement import ShardPlacement

    placement = ShardPlacement(2, 0.25, 0, 0.5, 0, num_workers=1)
    try:
        assert placement.strategy == "SPREAD"  # one node: STRICT_SPREAD could not place 2 shards
        assert placement_group_table(placement.placement_group)["state"] == "CREATED"
        for shard in (0, 1):
            options = placement.options_for(shard)
            assert set(options) == {"num_cpus", "num_gpus", "scheduling_strategy"}
            assert (options["num_cpus"], options["num_gpus"]) == (0.25, 0.0)
            strategy = options["scheduling_strategy"]
            assert isinstance(strategy, PlacementGroupSchedulingStrategy)
            assert strategy.placement_group is placement.placement_group
            assert strategy.placement_group_bundle_index == shard
        assert placement.worker_options(0) == {"num_gpus": 0.0, "scheduling_strategy": "DEFAULT"}
        assert placement.cpus_per_worker == 0.5
        with pytest.raises(ValueError, match=r"shard must be an integer in \[0, 2\), got 2"):
            placement.options_for(2)
    finally:
        placement.remove()
    placement.remove()  # twice is fine


def test_a_parameter_server_runs_in_the_placement_group_even_with_zero_cpu_shards(ray_session):
    import ray

    from rayps.server.placement import ShardPlacement
    from rayps.server import ParameterServer
    from rayps.updaters import Sgd

    placement = ShardPlacement(2, 0, 0, 0, 0)
    assert placement.bundle == {"CPU": MIN_BUNDLE_CPUS}
    params = {"a": np.zeros(8, np.float32), "b": np.zeros(8, np.float32)}
    ps = ParameterServer(params, updater=Sgd(learning_rate=1.0), num_shards=2, placement=placement)
    try:
        ps.push({"a": np.ones(8, np.float32), "b": np.ones(8, np.float32)})
        pulled = ps.pull()
        np.testing.assert_array_equal(pulled["a"], -np.ones(8, np.float32))
        table = ray.util.placement_group_table(placement.placement_group)
        for actor in ps.shard_actors:  # each shard actor lives on the node of a bundle of this group
            info = ray._private.state.actors(actor._actor_id.hex())
            assert info["Address"]["NodeID"] in table["bundles_to_node_id"].values()
    finally:
        ps.shutdown()
        placement.remove()


def test_a_shard_larger_than_the_cluster_fails_at_once(ray_session):
    from rayps.server.placement import ShardPlacement

    with pytest.raises(PlacementError, match=r"no node of the Ray cluster can hold one shard \(3 CPU"):
        ShardPlacement(1, 3, 0, 0, 0)
    with pytest.raises(PlacementError, match=r"has 0 GPUs but 1 shards x 1 .*1 GPUs missing"):
        ShardPlacement(1, 0, 1, 0, 0)


def test_shards_that_other_actors_crowd_out_time_out_with_what_is_free(ray_session):
    from ray.util.placement_group import placement_group, remove_placement_group

    from rayps.server.placement import ShardPlacement

    blocker = placement_group([{"CPU": 1.5}])  # holds 1.5 of the session's 2 CPUs
    assert blocker.wait(60)
    try:
        with pytest.raises(PlacementError) as error:
            ShardPlacement(1, 1, 0, 0, 0, timeout_s=2)
        message = str(error.value)
        assert message.startswith("could not place 1 shards (1 CPU each, STRICT_SPREAD) within 2s: 1 CPU needed, ")
        assert "free" in message and "\n" not in message
    finally:
        remove_placement_group(blocker)
    retry = ShardPlacement(1, 1, 0, 0, 0, timeout_s=60)  # the failed group left nothing behind
    retry.remove()


def test_constructor_arguments_are_checked_by_name():
    from rayps.server.placement import ShardPlacement

    with pytest.raises(ValueError, match="num_shards must be an integer >= 1, got 0"):
        ShardPlacement(0)
    with pytest.raises(ValueError, match="gpus_per_shard must be a finite number >= 0, got -1"):
        ShardPlacement(1, 0, -1)
    with pytest.raises(ValueError, match="strategy must be one of"):
        ShardPlacement(1, strategy="STRICT_PACK")


def test_train_accepts_worker_options_that_carry_num_cpus(ray_session):
    from rayps.server import ParameterServer
    from rayps.worker.data import Dataset
    from rayps.worker.training import train

    class CpuCarryingPlacement:
        def worker_options(self, worker_id):
            return {"num_cpus": 0, "num_gpus": 0, "scheduling_strategy": "DEFAULT"}

    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 2)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    data = Dataset(x, y, x, y, 2, "tiny")

    def grad_fn(params, batch):
        return 0.0, {"w": np.zeros_like(params["w"])}

    ps = ParameterServer({"w": np.zeros(2, np.float32)}, num_shards=1)
    try:
        train(ps, grad_fn, data, num_workers=1, epochs=1, batch_size=4, placement=CpuCarryingPlacement())
    finally:
        ps.shutdown()
