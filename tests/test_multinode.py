"""Several nodes on one machine (``ray.cluster_utils.Cluster``): shards on distinct nodes, and a shard whose node
is removed comes back on another node with its state.

The scenario needs a Ray of its own (a head and two more nodes, one CPU each), which cannot share the test
session's ``ray.init``; so the test runs this file as a script in a subprocess (with its own ``RAY_TMPDIR``) and
reads what it writes. The reference (the same pushes without the fault) runs on the session's Ray. The checkpoint
directory is a temporary directory: every simulated node shares this machine's file system, as every node of a
real cluster must share the checkpoint storage (docs/deploy.md, "Shared storage for checkpoints").

What Ray 2.60 does on node loss, seen here: the placement group goes to RESCHEDULING and puts the lost bundle on a
node that fits the strategy; under STRICT_SPREAD with three shards on three nodes that is a node holding no shard,
so the shard comes back when a replacement node joins (as an autoscaler or KubeRay would start one). The
restarted shard restores its last checkpoint and the client replays what came after: the final parameters equal
those of the same pushes without the fault, bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
from process_tools import processes_naming

PUSHES = 40
KILL_AFTER = 20  # pushes applied before the node goes
PUSHES_WHILE_DOWN = 3  # sent right after the node is removed (fewer than the client's in-flight bound)
SCENARIO_TIMEOUT_SECONDS = 420


def _params():
    rng = np.random.default_rng(0)
    # three tensors of equal size: one per shard under the byte-balanced layout
    return {name: rng.standard_normal((16, 4)).astype(np.float32) for name in ("a", "b", "c")}


def _grads(params):
    rng = np.random.default_rng(1)
    return [{n: rng.standard_normal(a.shape).astype(a.dtype) for n, a in params.items()} for _ in range(PUSHES)]


def _start_cluster(attempts=3):
    """A head and two nodes with one CPU each; retried because a loaded machine can time out a raylet's start."""
    from ray.cluster_utils import Cluster

    for attempt in range(attempts):
        cluster = Cluster()
        try:
            # a killed node is declared dead after 3 failed health checks 1 s apart (Ray's default: 5 x 3 s);
            # a check that merely runs slow still has Ray's full timeout, so a busy node is not declared dead
            cluster.add_node(num_cpus=1, include_dashboard=False,
                             _system_config={"health_check_period_ms": 1000, "health_check_failure_threshold": 3})
            for _ in range(2):
                cluster.add_node(wait=False, num_cpus=1)  # the two start side by side
            cluster.wait_for_nodes(timeout=120)
            return cluster
        except Exception:  # noqa: BLE001 - retried, then re-raised
            cluster.shutdown()
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def _actor_node(actor, timeout=120.0):
    """The node id of an actor, once it is ALIVE."""
    import ray

    deadline = time.monotonic() + timeout
    while True:
        info = ray._private.state.actors(actor._actor_id.hex())
        if info and info.get("State") == "ALIVE":
            return info["Address"]["NodeID"]
        if time.monotonic() > deadline:
            raise TimeoutError(f"actor {actor} not alive after {timeout}s: {info}")
        time.sleep(0.2)


def _wait_dead(node_id, timeout=120.0):
    import ray

    deadline = time.monotonic() + timeout
    while any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"node {node_id} still alive after {timeout}s")
        time.sleep(0.2)


def scenario(work_dir: str) -> None:
    """Run on a fresh 3-node Cluster; write what was seen to ``work_dir``/seen.json and the parameters pulled at
    the end to ``work_dir``/pulled.npz."""
    import ray
    from ray.util.placement_group import placement_group_table

    from rayps.server.placement import ShardPlacement
    from rayps.server import ParameterServer
    from rayps.updaters import Adam

    seen = {"seconds": {}}
    started = time.monotonic()

    def mark(what):
        seen["seconds"][what] = round(time.monotonic() - started, 1)

    cluster = _start_cluster()
    mark("cluster up")
    ps = placement = None
    try:
        cluster.connect()
        head = cluster.head_node.node_id
        params, grads = _params(), _grads(_params())
        placement = ShardPlacement(3, cpus_per_shard=1)
        seen["strategy"] = placement.strategy
        ps = ParameterServer(params, updater=Adam(learning_rate=0.01), num_shards=3, placement=placement,
                             checkpoint_dir=os.path.join(work_dir, "checkpoints"), checkpoint_every=5,
                             recovery_timeout=240)
        before = [_actor_node(actor) for actor in ps.shard_actors]
        seen["nodes_before"] = before
        seen["bundles_before"] = {str(k): v for k, v in
                                  placement_group_table(placement.placement_group)["bundles_to_node_id"].items()}
        mark("sharded server up")
        for g in grads[:KILL_AFTER]:
            ps.push(g)
        ps.flush()

        victim_shard = next(i for i, node_id in enumerate(before) if node_id != head)
        victim = next(n for n in cluster.worker_nodes if n.node_id == before[victim_shard])
        seen.update(victim_shard=victim_shard, victim_node=victim.node_id, head=head)
        cluster.remove_node(victim, allow_graceful=False)  # a crash: the node's processes are killed
        for g in grads[KILL_AFTER:KILL_AFTER + PUSHES_WHILE_DOWN]:
            ps.push(g)  # to a shard that is dying or dead: lost, then replayed
        _wait_dead(victim.node_id)
        mark("node dead")
        seen["group_state_while_down"] = placement_group_table(placement.placement_group)["state"]
        replacement = cluster.add_node(num_cpus=1)
        seen["replacement_node"] = replacement.node_id
        mark("replacement joined")
        for g in grads[KILL_AFTER + PUSHES_WHILE_DOWN:]:
            ps.push(g)
        got = ps.pull()
        mark("recovered and pulled")
        stats = ps.stats()
        seen["nodes_after"] = [_actor_node(actor) for actor in ps.shard_actors]
        seen["group_state_after"] = placement_group_table(placement.placement_group)["state"]
        seen["restarts_per_shard"] = [s["restarts"] for s in stats["shards"]]
        seen["updates_applied"] = stats["updates_applied"]
        seen["replayed"] = stats["replayed"]
        seen["recoveries"] = stats["recoveries"]
        np.savez(os.path.join(work_dir, "pulled.npz"), **got)
    finally:
        try:
            if ps is not None:
                ps.shutdown()
            if placement is not None:
                placement.remove()
            ray.shutdown()
        finally:
            cluster.shutdown()
    mark("total")
    with open(os.path.join(work_dir, "seen.json"), "w", encoding="utf-8") as handle:
        json.dump(seen, handle, indent=2)


# -- the test ------------------------------------------------------------------------------------------------------


def _clean_run():
    """The same pushes on the session's Ray, without placement, checkpoints or faults."""
    from rayps.server import ParameterServer
    from rayps.updaters import Adam

    params = _params()
    clean = ParameterServer(params, updater=Adam(learning_rate=0.01), num_shards=3)
    try:
        for g in _grads(params):
            clean.push(g)
        return clean.pull()
    finally:
        clean.shutdown()


def _run_scenario(work_dir):
    """Run ``scenario`` in a subprocess with a Ray temp dir of its own; returns (exit code, stderr).

    ``RAY_TMPDIR`` keeps the cluster's files, and above all its ``ray_current_cluster`` address file, out of
    /tmp/ray: a plain ``ray.init()`` elsewhere on the machine would otherwise connect to this cluster while it
    runs. Whatever the scenario leaves running (it was killed, say) is killed by the temp dir in its command line.
    """
    root = tempfile.mkdtemp(prefix="rpsmn-", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = root
    process = subprocess.Popen([sys.executable, __file__, str(work_dir)], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=SCENARIO_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        _, stderr = process.communicate()
        stderr = f"timed out after {SCENARIO_TIMEOUT_SECONDS}s\n{stderr}"
    finally:
        for pid in processes_naming(root):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(root, ignore_errors=True)
    return process.returncode, stderr


def test_shards_spread_over_three_nodes_and_a_lost_node_shard_comes_back_elsewhere_with_its_state(tmp_path,
                                                                                                  ray_session):
    returncode, stderr = _run_scenario(tmp_path)
    assert returncode == 0 and (tmp_path / "seen.json").exists(), stderr[-6000:]
    seen = json.loads((tmp_path / "seen.json").read_text())

    # placement: three nodes can each hold a 1-CPU shard, so every shard gets a node of its own
    assert seen["strategy"] == "STRICT_SPREAD"
    assert len(set(seen["nodes_before"])) == 3, seen
    assert sorted(seen["bundles_before"].values()) == sorted(seen["nodes_before"])

    # node loss: the shard of the removed node restarts on the replacement; the others stay where they were
    victim = seen["victim_shard"]
    assert seen["victim_node"] == seen["nodes_before"][victim] != seen["head"]
    assert seen["group_state_while_down"] == "RESCHEDULING"
    assert seen["nodes_after"][victim] == seen["replacement_node"], seen
    assert seen["victim_node"] not in seen["nodes_after"]
    assert [n for i, n in enumerate(seen["nodes_after"]) if i != victim] == \
           [n for i, n in enumerate(seen["nodes_before"]) if i != victim]
    assert len(set(seen["nodes_after"])) == 3
    assert seen["group_state_after"] == "CREATED"
    assert seen["restarts_per_shard"][victim] == 1
    assert sum(seen["restarts_per_shard"]) == 1

    # state: restored from the checkpoint plus the replayed pushes — none lost, none doubled
    assert seen["updates_applied"] == PUSHES
    assert seen["recoveries"] >= 1 and seen["replayed"] >= 1
    expected = _clean_run()
    with np.load(tmp_path / "pulled.npz") as pulled:
        assert sorted(pulled.files) == sorted(expected)
        for name, value in expected.items():
            np.testing.assert_array_equal(pulled[name], value, err_msg=name, strict=True)


if __name__ == "__main__":
    scenario(sys.argv[1])
