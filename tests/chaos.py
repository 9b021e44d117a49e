"""The chaos soak's harness (tests/test_chaos_soak.py runs it short, benchmarks/chaos_soak.py long).

A BSP (``consistency="sync"``) run of ``rayps.worker.train`` (softmax on a digits subset, 2 workers, 2 shards,
a ``checkpoint_dir``) with, all at once:

* worker deaths: ``FaultPlan`` points (server/faults.py) at seeded pushes of seeded workers, after sending to one
  of the two shards (``client.sent``) or to both before the acknowledgement (``client.before_ack``), and, at the
  first shard kill, a seeded worker dying while it replays to the restarted shard (``client.replayed``: the
  pushes it kept for replay die with it and its restarted process recomputes them); Ray restarts the worker,
  which resumes as the same identity (``ParameterServer.as_worker``);
* shard deaths: a killer thread ``ray.kill``s a seeded shard (Ray restarts it from its last checkpoint, and the
  workers replay what it lacks) when the run reaches seeded steps;
* the data plane through ``FaultProxy`` (tests/fault_proxy.py): drops, duplicates, delays, reorders, cuts.

Nothing keeps the kinds apart: a shard may die right after a worker did, or while a restarted worker catches
up, and a worker dies in the middle of a replay. The one condition on a shard kill makes it count: the shard
holds pushes of every worker that its last finished checkpoint does not (``uncovered`` in its stats), so every
worker replays to it (and the replay death has a replay to die in).

The killer decides while the proxy is frozen (nothing reaches the shards, so their clocks are exact), kills,
thaws, points the proxy at the restarted shard's new endpoint, and waits until that shard holds every push it
held before it died. A shard kill whose step comes while its condition does not hold waits; it is skipped once
the run passes the next event's step. Every wait has a deadline."""

from __future__ import annotations

import os
import random
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from fault_proxy import FaultProxy  # tests/fault_proxy.py

GAP = 3  # pushes between two events of the schedule, at least, and before the run's end
POLL = 0.05  # seconds between two looks at the shards' counters


@dataclass(frozen=True)
class SoakConfig:
    seed: int = 0
    epochs: int = 7
    samples: int = 512  # of the digits training set
    batch_size: int = 16
    workers: int = 2
    shards: int = 2
    checkpoint_every: int = 4  # updates per shard between checkpoints
    worker_kills: int = 3
    shard_kills: int = 3
    replay_kills: int = 1  # 0 or 1: a worker dies while replaying to the first shard killed
    resend_after: float = 0.15  # seconds of silence before a client resends (the proxy drops messages)
    wait: float = 300.0  # seconds: the deadline of every wait, never an expectation of speed


@dataclass
class SoakReport:
    params: dict
    stats: dict
    result: dict
    wall_seconds: float
    shard_kills: int = 0
    shard_kills_skipped: int = 0
    worker_kills: dict = field(default_factory=dict)  # fault point -> deaths
    proxy_faults: dict = field(default_factory=dict)
    proxy_retargets: int = 0


def digits(config: SoakConfig):
    """``(data, model, steps)``: the digits subset, the softmax model, the pushes per worker of the run."""
    from rayps.worker import Dataset, build_model, epoch_batches, load_dataset

    full = load_dataset("digits")
    data = Dataset.from_arrays(full.x_train[:config.samples], full.y_train[:config.samples], full.x_test,
                               full.y_test)
    model = build_model("softmax", data.num_features, data.num_classes)
    per_epoch = {len(epoch_batches(data.num_train, config.workers, w, 0, config.seed, config.batch_size))
                 for w in range(config.workers)}
    assert len(per_epoch) == 1, per_epoch
    return data, model, per_epoch.pop() * config.epochs


@dataclass(frozen=True)
class Event:
    kind: str  # "shard" (the killer kills it) or "worker" (a Fault in the plan)
    step: int  # the shard kill's earliest step, or the worker's push that dies
    index: int  # shard or worker
    point: str = ""  # worker: the fault point
    sent: int | None = None  # worker, client.sent: after this many shards


def schedule(config: SoakConfig, steps: int) -> list[Event]:
    """The seeded events, in step order: the kinds shuffled, one per equal slot of the run, at a seeded offset
    in the first third of its slot (the run's first and last ``2 * GAP + 2`` steps are left alone); then the
    replay death (step 0: it comes with the first shard kill)."""
    rng = random.Random(config.seed)
    kinds = ["shard"] * config.shard_kills + ["worker"] * config.worker_kills
    rng.shuffle(kinds)
    lead = tail = 2 * GAP + 2
    slot = (steps - lead - tail) // max(1, len(kinds))
    assert slot >= 2 * GAP + 2, f"{steps} steps are too few for {len(kinds)} kills"
    events = []
    for i, kind in enumerate(kinds):
        step = lead + i * slot + rng.randrange(max(1, slot // 3))
        if kind == "shard":
            events.append(Event("shard", step, rng.randrange(config.shards)))
        else:
            point = rng.choice(["client.sent", "client.before_ack"])
            events.append(Event("worker", step, rng.randrange(config.workers), point,
                                rng.randrange(1, config.shards) if point == "client.sent" else None))
    if config.replay_kills and config.shard_kills:
        events.append(Event("worker", 0, rng.randrange(config.workers), "client.replayed"))
    return events


def fault_plan(events: list[Event], marker_dir: str):
    from rayps.server.faults import Fault, FaultPlan

    return FaultPlan([Fault(e.point, os.path.join(marker_dir, f"worker-{i}"), worker=e.index,
                            seq=None if e.point == "client.replayed" else e.step, sent=e.sent,
                            count=1 if e.point == "client.replayed" else None)
                      for i, e in enumerate(events) if e.kind == "worker"])


def _server(config: SoakConfig, model, checkpoint_dir):
    from rayps.server import ParameterServer
    from rayps.updaters import Adam

    return ParameterServer(model.init_params(config.seed), updater=Adam(learning_rate=0.01),
                           num_shards=config.shards, num_workers=config.workers, consistency="sync",
                           checkpoint_dir=str(checkpoint_dir), checkpoint_every=config.checkpoint_every,
                           recovery_timeout=config.wait, pull_timeout=config.wait, cpus_per_shard=0)


def _train(config: SoakConfig, ps, data, model, max_worker_restarts: int) -> dict:
    """``train`` on a thread, given up after ``config.wait`` seconds (a run that hangs fails, never blocks)."""
    from rayps.worker import train

    out = []

    def run():
        try:
            out.append((True, train(ps, model, data, num_workers=config.workers, epochs=config.epochs,
                                    batch_size=config.batch_size, seed=config.seed,
                                    max_worker_restarts=max_worker_restarts)))
        except BaseException as error:  # noqa: BLE001 - re-raised below
            out.append((False, error))

    thread = threading.Thread(target=run, name="soak-train", daemon=True)
    thread.start()
    thread.join(config.wait)
    assert out, f"the run did not end within {config.wait}s"
    if not out[0][0]:
        raise out[0][1]
    return out[0][1]


def clean_run(config: SoakConfig, data, model, workdir) -> SoakReport:
    """The same run without faults, kills or proxy."""
    ps = _server(config, model, os.path.join(workdir, "clean-checkpoints"))
    try:
        started = time.perf_counter()
        result = _train(config, ps, data, model, max_worker_restarts=0)
        return SoakReport(ps.pull(), ps.stats(), result, time.perf_counter() - started)
    finally:
        ps.shutdown()


def chaos_run(config: SoakConfig, data, model, steps: int, workdir) -> SoakReport:
    """The run with the schedule's kills and the proxy's faults."""
    import ray

    events = schedule(config, steps)
    markers = os.path.join(workdir, "markers")
    os.makedirs(markers, exist_ok=True)
    plan = fault_plan(events, markers)
    ps = _server(config, model, os.path.join(workdir, "chaos-checkpoints"))
    proxy = None
    try:
        endpoints = [ray.get(actor.endpoint.remote(None), timeout=config.wait)[0] for actor in ps.shard_actors]
        proxy = FaultProxy(ps.credentials, endpoints, config.seed)
        ps.route_data_plane(proxy.route, resend_after=config.resend_after)
        ps.inject_faults(plan)
        killer = Killer(config, ps, proxy, events, plan, steps)
        started = time.perf_counter()
        killer.start()
        try:
            result = _train(config, ps, data, model, max_worker_restarts=config.worker_kills + config.replay_kills + 1)
        finally:
            killer.stop()
        wall = time.perf_counter() - started
        assert killer.error is None, f"the killer failed: {killer.error!r}"
        fired = plan.fired()
        assert len(fired) == len(plan), f"worker deaths that never came: {set(plan) - set(fired)}"
        deaths = {}
        for fault in fired:
            deaths[fault.point] = deaths.get(fault.point, 0) + 1
        return SoakReport(ps.pull(), ps.stats(), result, wall, shard_kills=killer.kills,
                          shard_kills_skipped=killer.skipped, worker_kills=deaths, proxy_faults=dict(proxy.faults),
                          proxy_retargets=proxy.retargets)
    finally:
        ps.shutdown()
        if proxy is not None:
            proxy.close()


def identical(got: dict, expected: dict) -> bool:
    return list(got) == list(expected) and all(np.array_equal(got[n], expected[n]) for n in expected)


class Killer(threading.Thread):
    """Kills the schedule's shards, each once it holds pushes of every worker that its last finished
    checkpoint does not; see the module docstring."""

    def __init__(self, config: SoakConfig, ps, proxy, events, plan, steps: int):
        super().__init__(name="soak-killer", daemon=True)
        self.config, self.ps, self.proxy, self.events, self.steps = config, ps, proxy, events, steps
        self.actors = ps.shard_actors
        self.workers = [f"{ps.run_id}.w{w}" for w in range(config.workers)]  # their identities (as_worker)
        self.kills = self.skipped = 0
        self.error: BaseException | None = None
        self.stopping = threading.Event()

    def stop(self) -> None:
        self.stopping.set()
        self.join(self.config.wait)
        assert not self.is_alive(), "the killer did not stop"

    def run(self) -> None:
        try:
            shard_events = [e for e in self.events if e.kind == "shard"]
            for event in shard_events:
                limit = min([e.step for e in self.events if e.step > event.step] + [self.steps - GAP])
                if not self._kill_when_allowed(event, limit):
                    self.skipped += 1
                if self.stopping.is_set():
                    return
        except BaseException as error:  # noqa: BLE001 - reported by chaos_run
            self.error = error

    # -- looking ---------------------------------------------------------------------------------------------
    def _stats(self, shard: int) -> dict:
        import ray

        deadline = time.monotonic() + self.config.wait
        while True:
            try:
                return ray.get(self.actors[shard].stats.remote(), timeout=10)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                assert time.monotonic() < deadline, f"shard {shard} did not answer within {self.config.wait}s"
                time.sleep(POLL)

    def _look(self) -> list[dict]:
        return [self._stats(shard) for shard in range(self.config.shards)]

    @staticmethod
    def _clocks(stats: list[dict]) -> tuple[int, int]:
        """The slowest and the fastest clock of any worker on any shard."""
        values = [c for s in stats for c in s["clocks"].values()] or [0]
        return min(values), max(values)

    def _allowed(self, stats: dict) -> bool:
        """The shard holds pushes of every worker that its last finished checkpoint does not."""
        return all(stats["uncovered"].get(worker, 0) > 0 for worker in self.workers)

    def _still_stats(self) -> list[dict]:
        """The shards' stats once two looks agree (the proxy frozen: only what was already sent still lands)."""
        deadline = time.monotonic() + self.config.wait
        last = self._look()
        while True:
            time.sleep(POLL)
            now = self._look()
            if [s["clocks"] for s in now] == [s["clocks"] for s in last]:
                return now
            assert time.monotonic() < deadline, "the shards' clocks kept moving with the proxy frozen"
            last = now

    # -- killing ---------------------------------------------------------------------------------------------
    def _kill_when_allowed(self, event: Event, limit: int) -> bool:
        """Kill ``event``'s shard at or after its step once the rules allow, before the clocks pass ``limit``."""
        deadline = time.monotonic() + self.config.wait
        while not self.stopping.is_set():
            assert time.monotonic() < deadline, f"no chance to kill shard {event.index} within {self.config.wait}s"
            stats = self._look()
            slowest, fastest = self._clocks(stats)
            if fastest > limit:
                return False
            if slowest >= event.step and self._allowed(stats[event.index]):
                self.proxy.freeze()
                try:
                    stats = self._still_stats()
                    if self._clocks(stats)[1] > limit:
                        return False
                    if self._allowed(stats[event.index]):
                        incarnation = self._kill(event.index)
                        break
                finally:
                    self.proxy.thaw()
            time.sleep(POLL)
        else:
            return False
        self._wait_recovered(event.index, incarnation, stats[event.index]["clocks"])
        self.kills += 1
        return True

    def _kill(self, shard: int) -> str:
        import ray

        incarnation = ray.get(self.actors[shard].ping.remote(), timeout=self.config.wait)
        ray.kill(self.actors[shard], no_restart=False)
        return incarnation

    def _wait_recovered(self, shard: int, old_incarnation: str, clocks: dict) -> None:
        """Point the proxy at the restarted shard's endpoint; wait until it holds every push it held."""
        import ray

        deadline = time.monotonic() + self.config.wait
        while True:
            try:
                endpoint, incarnation, _ = ray.get(self.actors[shard].endpoint.remote(None), timeout=10)
                if incarnation != old_incarnation:
                    break
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                pass
            assert time.monotonic() < deadline, f"shard {shard} was not restarted within {self.config.wait}s"
            time.sleep(POLL)
        self.proxy.retarget(shard, endpoint)
        while True:
            stats = self._stats(shard)
            if stats["restarts"] >= 1 and all(stats["clocks"].get(w, 0) >= c for w, c in clocks.items()):
                return
            assert time.monotonic() < deadline, f"shard {shard} did not get its pushes back within " \
                                                f"{self.config.wait}s: {stats['clocks']} < {clocks}"
            time.sleep(POLL)
