"""Where shard and worker actors run: ``ShardPlacement``, a Ray placement group with one bundle per shard.

    placement = ShardPlacement(num_shards=2, cpus_per_shard=1, gpus_per_shard=0, cpus_per_worker=1,
                               gpus_per_worker=0)
    ps = ParameterServer(params, num_shards=2, placement=placement)   # placement.options_for(shard)
    train(ps, model, data, num_workers=4, cpus_per_worker=1, placement=placement)  # .worker_options(w)
    ...
    placement.remove()

Shards are spread over nodes so that their network and CPU load is spread too. The strategy:

* ``"auto"`` (the default): ``STRICT_SPREAD`` (every shard on its own node) when at least ``num_shards`` alive
  nodes can each hold one shard's bundle, else ``SPREAD`` (distinct nodes as far as they go, then shared).
  Nodes that cannot hold a bundle do not count: a head started with ``--num-cpus 0`` (as in ``deploy/``) holds
  no shard.
* ``"spread"`` / ``"strict_spread"``: that Ray strategy, whatever the node count (``strict_spread`` fails at
  once when too few nodes can hold a bundle).

Workers are not in the placement group: each is its own actor with its CPUs/GPUs and Ray's default scheduling.

A bundle needs a non-zero resource, so a shard with 0 CPUs (and no GPU) reserves ``MIN_BUNDLE_CPUS``.

Node loss (checked on ``ray.cluster_utils.Cluster``, Ray 2.60; ``tests/test_multinode.py``): when a node dies,
Ray reschedules the placement group's bundles that were on it (the group is ``RESCHEDULING`` meanwhile) and a
shard actor restarted by ``max_restarts`` waits for its bundle and starts wherever the bundle lands; it restores
its checkpoint from ``checkpoint_dir``, which must be storage every node reaches. The strategy holds during
rescheduling:

* ``STRICT_SPREAD``: the bundle goes only to a node that holds no other shard. With exactly ``num_shards``
  nodes, the shard comes back when a replacement node joins (an autoscaler or KubeRay starting a new pod does
  this); until then the clients wait up to ``ParameterServer(recovery_timeout=...)`` and then fail.
* ``SPREAD``: the bundle goes to any node with room, including one that already holds a shard.

So on a fixed-size cluster without a spare node, use ``strategy="spread"`` if a shard must survive a node loss.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

STRATEGIES = {"auto": None, "spread": "SPREAD", "strict_spread": "STRICT_SPREAD"}
MIN_BUNDLE_CPUS = 0.01  # a placement-group bundle must reserve something; this is what a 0-CPU shard reserves
DEFAULT_TIMEOUT_SECONDS = 60.0
_EPSILON = 1e-9


class PlacementError(RuntimeError):
    """The cluster cannot hold the requested shards or workers; the message names what is missing."""


# -- pure logic over a node list (``ray.nodes()`` entries: {"Alive": bool, "Resources": {"CPU": ..., ...}}) ----------


def shard_bundle(cpus_per_shard: float, gpus_per_shard: float) -> dict[str, float]:
    """The resources one shard reserves in the placement group (never empty)."""
    bundle = {"CPU": max(float(cpus_per_shard), MIN_BUNDLE_CPUS)}
    if gpus_per_shard > 0:
        bundle["GPU"] = float(gpus_per_shard)
    return bundle


def _alive(nodes: Sequence[Mapping]) -> list[Mapping]:
    return [node for node in nodes if node.get("Alive", node.get("alive", False))]


def _node_resources(node: Mapping) -> Mapping[str, float]:
    return node.get("Resources") or {}


def fits(node: Mapping, demand: Mapping[str, float]) -> int:
    """How many copies of ``demand`` the node's total resources hold (0 if it lacks one of them)."""
    have = _node_resources(node)
    counts = [math.floor(have.get(name, 0.0) / amount + _EPSILON) for name, amount in demand.items() if amount > 0]
    return min(counts) if counts else math.inf


def eligible_nodes(nodes: Sequence[Mapping], bundle: Mapping[str, float]) -> list[Mapping]:
    """The alive nodes that can hold at least one ``bundle``."""
    return [node for node in _alive(nodes) if fits(node, bundle) >= 1]


def choose_strategy(strategy: str, num_shards: int, nodes: Sequence[Mapping], bundle: Mapping[str, float]) -> str:
    """The Ray strategy for ``strategy`` ("auto", "spread", "strict_spread") on these nodes."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {sorted(STRATEGIES)}, got {strategy!r}")
    hosts = len(eligible_nodes(nodes, bundle))
    if strategy == "strict_spread" and hosts < num_shards:
        raise PlacementError(f"strategy 'strict_spread' needs {num_shards} nodes that can each hold a shard "
                             f"({_describe(bundle)}), the cluster has {hosts}; use 'spread' or add nodes")
    if strategy == "auto":
        return "STRICT_SPREAD" if hosts >= num_shards else "SPREAD"
    return STRATEGIES[strategy]


def _number(value: float) -> str:
    return f"{value:g}"


def _describe(demand: Mapping[str, float]) -> str:
    parts = [f"{_number(amount)} {name}" for name, amount in demand.items() if amount > 0]
    return ", ".join(parts) if parts else "no resources"


def _largest(nodes: Sequence[Mapping], names: Sequence[str]) -> str:
    alive = _alive(nodes)
    if not alive:
        return "the cluster has no alive node"
    best = max(alive, key=lambda node: tuple(_node_resources(node).get(name, 0.0) for name in names))
    return "its largest node has " + ", ".join(f"{_number(_node_resources(best).get(name, 0.0))} {name}"
                                               for name in names)


def capacity_problems(nodes: Sequence[Mapping], num_shards: int, cpus_per_shard: float, gpus_per_shard: float,
                      num_workers: int = 0, cpus_per_worker: float = 0.0, gpus_per_worker: float = 0.0) -> list[str]:
    """What the cluster (its nodes' TOTAL resources) lacks for the shards and workers; empty if it suffices.

    Checks the cluster's CPU and GPU totals, that some node can hold one shard and one worker, and that the nodes
    together can hold every shard bundle. Resources other runs hold are not counted here (``ShardPlacement``
    times out on those instead of waiting forever)."""
    alive = _alive(nodes)
    bundle = shard_bundle(cpus_per_shard, gpus_per_shard)
    problems = []
    for name, flag, per_shard, per_worker, hint in (
            ("CPU", "cpus", bundle["CPU"], cpus_per_worker, "add nodes"),
            ("GPU", "gpus", bundle.get("GPU", 0.0), gpus_per_worker, "add GPU nodes")):
        total = sum(_node_resources(node).get(name, 0.0) for node in alive)
        needed = per_shard * num_shards + per_worker * num_workers
        if needed > total + _EPSILON:
            problems.append(f"the Ray cluster has {_number(total)} {name}s but {num_shards} shards x "
                            f"{_number(per_shard)} + {num_workers} workers x {_number(per_worker)} need "
                            f"{_number(needed)} ({_number(needed - total)} {name}s missing); lower --{flag}-per-shard/"
                            f"--{flag}-per-worker or {hint}")
    short_in_total = bool(problems)
    names = [name for name in ("CPU", "GPU") if bundle.get(name, 0.0) > 0]
    capacity = sum(fits(node, bundle) for node in alive)
    if capacity == 0:
        problems.append(f"no node of the Ray cluster can hold one shard ({_describe(bundle)}, from --cpus-per-shard/"
                        f"--gpus-per-shard); {_largest(nodes, names)}")
    elif capacity < num_shards and not short_in_total:
        problems.append(f"the Ray cluster's nodes can hold only {capacity} of {num_shards} shards "
                        f"({_describe(bundle)} each, from --cpus-per-shard/--gpus-per-shard); lower them or add nodes")
    worker = {"CPU": float(cpus_per_worker), "GPU": float(gpus_per_worker)}
    if num_workers and any(amount > 0 for amount in worker.values()) and not any(fits(n, worker) for n in alive):
        problems.append(f"no node of the Ray cluster can hold one worker ({_describe(worker)}, from "
                        f"--cpus-per-worker/--gpus-per-worker); "
                        f"{_largest(nodes, [n for n, a in worker.items() if a > 0])}")
    return problems


# -- the placement group --------------------------------------------------------------------------------------------


class ShardPlacement:
    """One placement-group bundle per shard, spread over nodes; workers scheduled independently.

    Creating it reserves the bundles and waits up to ``timeout_s`` for them; a cluster that cannot hold them
    raises ``PlacementError`` naming what is missing. ``remove()`` releases them (the group also goes when
    the driver exits)."""

    def __init__(self, num_shards: int, cpus_per_shard: float = 0.0, gpus_per_shard: float = 0.0,
                 cpus_per_worker: float = 0.0, gpus_per_worker: float = 0.0, strategy: str = "auto", *,
                 num_workers: int = 0, timeout_s: float = DEFAULT_TIMEOUT_SECONDS):
        if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
            raise ValueError(f"num_shards must be an integer >= 1, got {num_shards!r}")
        for field, value in (("cpus_per_shard", cpus_per_shard), ("gpus_per_shard", gpus_per_shard),
                             ("cpus_per_worker", cpus_per_worker), ("gpus_per_worker", gpus_per_worker)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value)
                                                                                      and value >= 0):
                raise ValueError(f"{field} must be a finite number >= 0, got {value!r}")
        if not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
            raise ValueError(f"timeout_s must be a number > 0, got {timeout_s!r}")
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {sorted(STRATEGIES)}, got {strategy!r}")
        import ray  # noqa: PLC0415
        from ray.util.placement_group import placement_group  # noqa: PLC0415

        self.num_shards = num_shards
        self.cpus_per_shard, self.gpus_per_shard = float(cpus_per_shard), float(gpus_per_shard)
        self.cpus_per_worker, self.gpus_per_worker = float(cpus_per_worker), float(gpus_per_worker)
        self.bundle = shard_bundle(cpus_per_shard, gpus_per_shard)
        nodes = ray.nodes()
        problems = capacity_problems(nodes, num_shards, cpus_per_shard=cpus_per_shard, gpus_per_shard=gpus_per_shard,
                                     num_workers=num_workers, cpus_per_worker=cpus_per_worker,
                                     gpus_per_worker=gpus_per_worker)
        if problems:
            raise PlacementError("; ".join(problems))
        self.strategy = choose_strategy(strategy, num_shards, nodes, self.bundle)
        self.hosts = len(eligible_nodes(nodes, self.bundle))
        self.placement_group = placement_group([dict(self.bundle) for _ in range(num_shards)],
                                               strategy=self.strategy)
        if not self.placement_group.wait(timeout_s):
            message = self._not_placed(ray, timeout_s)
            self.remove()
            raise PlacementError(message)

    def _not_placed(self, ray, timeout_s: float) -> str:
        free = ray.available_resources()
        short = []
        for name, amount in self.bundle.items():
            needed = amount * self.num_shards
            if free.get(name, 0.0) + _EPSILON < needed:
                short.append(f"{_number(needed)} {name} needed, {_number(free.get(name, 0.0))} free")
        why = "; ".join(short) if short else (f"no {self.num_shards} distinct nodes with room free"
                                              if self.strategy == "STRICT_SPREAD" else "free resources are on "
                                              "too many nodes to hold a whole bundle")
        return (f"could not place {self.num_shards} shards ({_describe(self.bundle)} each, {self.strategy}) within "
                f"{_number(timeout_s)}s: {why} (other actors or jobs hold the rest); free resources or add nodes")

    def options_for(self, shard: int) -> dict:
        """Ray actor options for shard ``shard``: its resources, in its own bundle of the placement group."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy  # noqa: PLC0415

        if isinstance(shard, bool) or not isinstance(shard, int) or not 0 <= shard < self.num_shards:
            raise ValueError(f"shard must be an integer in [0, {self.num_shards}), got {shard!r}")
        return {"num_cpus": self.cpus_per_shard, "num_gpus": self.gpus_per_shard,
                "scheduling_strategy": PlacementGroupSchedulingStrategy(self.placement_group,
                                                                        placement_group_bundle_index=shard)}

    def worker_options(self, worker_id: int) -> dict:
        """Ray actor options for a worker: its GPUs, scheduled on its own (outside the placement group).

        Its CPUs (``self.cpus_per_worker``) go to ``train(cpus_per_worker=...)``, which sets ``num_cpus`` itself:
        ``worker/training.py`` passes these options next to its own ``num_cpus=`` keyword, so a ``num_cpus`` here
        would be a duplicate keyword (TypeError)."""
        return {"num_gpus": self.gpus_per_worker, "scheduling_strategy": "DEFAULT"}

    def describe(self) -> str:
        return (f"{self.num_shards} shards ({_describe(self.bundle)} each) placed {self.strategy}; "
                f"{self.hosts} nodes can hold a shard")

    def remove(self) -> None:
        """Release the bundles (kills any actor still in them). Safe to call twice."""
        group, self.placement_group = getattr(self, "placement_group", None), None
        if group is not None:
            from ray.util.placement_group import remove_placement_group  # noqa: PLC0415

            remove_placement_group(group)
