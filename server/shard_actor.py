"""``ShardActor``: the thin Ray actor around ``ShardState`` — forwards messages, waits, checkpoints, exports
metrics.

An async actor, so a pull that must wait (read-your-writes, SSP or BSP gating) parks on a condition while
pushes keep arriving. Arrays in a push arrive as read-only zero-copy views of Ray's object store; the shard
reads them in the update kernel and never copies them.

Durability: with a ``checkpoint_dir`` the shard snapshots itself every ``checkpoint_every`` updates (the
snapshot is taken between two pushes; the file is written on a thread while pushes go on). When Ray restarts
the actor (``max_restarts``) the constructor restores the last snapshot, and clients replay what it lacks.
Every push is acknowledged with ``{"applied": ..., "covered": ...}``: the client's last applied sequence
number and the last one a finished checkpoint holds, so the client can drop what no restart will need.

Metrics (``ray.util.metrics``, tagged by ``shard``): ``rayps_pushes_total``, ``rayps_bytes_pushed_total``,
``rayps_bytes_pulled_total``, ``rayps_apply_seconds`` (histogram), ``rayps_staleness`` (gauge, updates applied
since the pushing worker last pulled), ``rayps_clock_gap`` (gauge, fastest minus slowest worker clock),
``rayps_checkpoints_total``, ``rayps_restarts`` (gauge).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
import warnings

import ray

from . import checkpoint as ckpt
from . import shard_snapshot
from .shard_state import ShardState
from .sparse_rows import RowTableShard

class ShardRestarted(Exception):
    """A pull addressed to an earlier incarnation of this shard: the caller must recover (replay) first."""


APPLY_SECONDS_BOUNDARIES = [1e-5, 1e-4, 1e-3, 5e-3, 1e-2, 5e-2, 0.1, 0.5, 1.0, 5.0]
log = logging.getLogger(__name__)


class ShardMetrics:
    """Prometheus-exported counters of one shard (no-ops where Ray's metrics agent is absent)."""

    def __init__(self, shard_index: int):
        from ray.util import metrics  # noqa: PLC0415

        self.tags = {"shard": str(shard_index)}
        keys = ("shard",)
        self.pushes = metrics.Counter("rayps_pushes_total", "Pushes received by a shard", tag_keys=keys)
        self.bytes_pushed = metrics.Counter("rayps_bytes_pushed_total", "Gradient bytes received", tag_keys=keys)
        self.bytes_pulled = metrics.Counter("rayps_bytes_pulled_total", "Parameter bytes sent", tag_keys=keys)
        self.apply_seconds = metrics.Histogram("rayps_apply_seconds", "Seconds to apply one push",
                                               boundaries=APPLY_SECONDS_BOUNDARIES, tag_keys=keys)
        self.staleness = metrics.Gauge("rayps_staleness", "Largest staleness seen (updates)", tag_keys=keys)
        self.clock_gap = metrics.Gauge("rayps_clock_gap", "Fastest minus slowest worker clock", tag_keys=keys)
        self.checkpoints = metrics.Counter("rayps_checkpoints_total", "Checkpoints written", tag_keys=keys)
        self.restarts = metrics.Gauge("rayps_restarts", "Times this shard was restarted", tag_keys=keys)

    def record_push(self, nbytes: int, seconds: float, state: ShardState) -> None:
        self.pushes.inc(1, tags=self.tags)
        if nbytes:
            self.bytes_pushed.inc(nbytes, tags=self.tags)
        self.apply_seconds.observe(seconds, tags=self.tags)
        self.staleness.set(state.counters["max_staleness"], tags=self.tags)
        self.clock_gap.set(state.clock_gap(), tags=self.tags)

    def record_pull(self, nbytes: int) -> None:
        if nbytes:
            self.bytes_pulled.inc(nbytes, tags=self.tags)


@ray.remote
class ShardActor:
    """Remote wrapper; see ``ShardState`` for the protocol of each call."""

    def __init__(self, shard_index, pieces, groups, buffers, consistency, staleness, num_workers, nan_policy,
                 checkpoint_dir=None, checkpoint_every=0, piece_states=None, sync_timeout=None, row_tables=None,
                 row_states=None):
        tables = {spec["name"]: RowTableShard(spec["name"], spec["num_rows"], spec["dim"], spec["dtype"], shard_index,
                                              spec["num_shards"], groups[spec["group"]], spec["initial"])
                  for spec in row_tables or []}
        for name, rows in (row_states or {}).items():  # restored under another shard count: keep the owned rows
            tables[name].load_rows(*rows, what=f"table {name!r}")
        self.state = ShardState(shard_index, pieces, groups, buffers, consistency, staleness, num_workers,
                                nan_policy, tables)
        if piece_states is not None:
            shard_snapshot.load_pieces(self.state, [(None, slots, it) for slots, it in piece_states])
        self.metrics = ShardMetrics(shard_index)
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_every = int(checkpoint_every or 0)
        self.sync_timeout = sync_timeout
        self.restarts = 0
        self.covered_seq: dict[str, int] = {}
        self.updates_at_checkpoint = 0
        self.checkpoint_task = None
        self.checkpoints_written = 0
        self.incarnation = uuid.uuid4().hex  # new in every process: clients detect a restart by it
        with warnings.catch_warnings():  # Ray's property warns about its own internal use of a deprecated API
            warnings.simplefilter("ignore")
            reconstructed = ray.get_runtime_context().was_current_actor_reconstructed
        if reconstructed:
            self._restore_after_restart()
        elif self.checkpoint_dir:  # a first checkpoint, so a restart never falls back to the initial values
            ckpt.write_shard(self.checkpoint_dir, shard_index, 0, ckpt.pack(shard_snapshot.snapshot(self.state)))
        self.metrics.restarts.set(self.restarts, tags=self.metrics.tags)
        self.changed = None  # asyncio.Condition, created on the actor's event loop

    def _restore_after_restart(self) -> None:
        if not self.checkpoint_dir:
            raise RuntimeError(f"shard {self.state.shard_index} restarted without a checkpoint_dir: its state is lost")
        pointer = ckpt.read_pointer(self.checkpoint_dir, self.state.shard_index)
        recorded = 0
        if pointer is None:
            raise RuntimeError(f"shard {self.state.shard_index} restarted but {self.checkpoint_dir} holds no "
                               f"checkpoint of it: its state is lost")
        else:
            blob = ckpt.read_shard(self.checkpoint_dir, pointer)
            recorded = shard_snapshot.restore(self.state, blob, f"shard {self.state.shard_index} checkpoint")
            self.covered_seq = dict(self.state.applied_seq)
        self.restarts = recorded + 1
        self.updates_at_checkpoint = self.state.counters["updates_applied"]
        log.warning("rayps shard %d restarted (%d restarts); restored %s", self.state.shard_index, self.restarts,
                    pointer["file"])

    def _condition(self) -> asyncio.Condition:
        if self.changed is None:
            self.changed = asyncio.Condition()
        return self.changed

    async def _notify(self) -> None:
        condition = self._condition()
        async with condition:
            condition.notify_all()

    def _ack(self, client_id) -> dict:
        return {"applied": self.state.applied_seq.get(client_id, 0), "covered": self.covered_seq.get(client_id, 0),
                "incarnation": self.incarnation}

    async def push(self, client_id, seq, worker_id, payload, present=None, factors=None, epoch=0, rows=None,
                   replayed=False):
        started = time.perf_counter()
        if replayed:
            self.state.counters["replays_received"] += 1
        errors = self.state.push(client_id, seq, worker_id, payload, present, factors, epoch, rows)
        nbytes = int(sum(a.nbytes for a in payload.values())) if payload else 0
        self.metrics.record_push(nbytes, time.perf_counter() - started, self.state)
        self._maybe_checkpoint()
        await self._notify()
        if errors:
            raise ValueError("; ".join(errors))
        return self._ack(client_id)

    # -- checkpoints ---------------------------------------------------------------------------------------
    def _maybe_checkpoint(self) -> None:
        if not self.checkpoint_dir or self.checkpoint_every <= 0 or self.checkpoint_task is not None:
            return
        if self.state.counters["updates_applied"] - self.updates_at_checkpoint < self.checkpoint_every:
            return
        self.checkpoint_task = asyncio.get_event_loop().create_task(self._write_checkpoint())

    async def _write_checkpoint(self) -> None:
        try:
            applied = dict(self.state.applied_seq)
            self.updates_at_checkpoint = self.state.counters["updates_applied"]
            blob = ckpt.pack(shard_snapshot.snapshot(self.state, self.restarts))  # between pushes: consistent
            generation = self.state.version
            await asyncio.to_thread(ckpt.write_shard, self.checkpoint_dir, self.state.shard_index, generation, blob)
            self.covered_seq = applied
            self.checkpoints_written += 1
            self.metrics.checkpoints.inc(1, tags=self.metrics.tags)
        except Exception:  # noqa: BLE001 - a failed write must not stop training; the next one retries
            log.exception("rayps shard %d: checkpoint write failed", self.state.shard_index)
        finally:
            self.checkpoint_task = None

    def snapshot_blob(self) -> bytes:
        """This shard's snapshot as msgpack bytes (for ``ParameterServer.save``)."""
        return ckpt.pack(shard_snapshot.snapshot(self.state, self.restarts))

    # -- pulls ---------------------------------------------------------------------------------------------
    async def pull(self, client_id=None, after_seq=0, worker_id=None, piece_indices=None, timeout=None,
                   incarnation=None):
        if incarnation is not None and incarnation != self.incarnation:
            raise ShardRestarted(f"shard {self.state.shard_index} restarted since this client last heard from it")
        condition = self._condition()
        deadline = None if timeout is None else time.monotonic() + timeout
        async with condition:
            while not self.state.pull_ready(client_id, after_seq, worker_id):
                wait = self.sync_timeout if self.state.consistency == "sync" and self.sync_timeout else None
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError(
                            f"shard {self.state.shard_index}: pull by worker {worker_id} waited {timeout}s; clocks "
                            f"{self.state.clocks}, sync step {self.state.sync_clock}, consistency "
                            f"{self.state.consistency!r} (is a worker dead or num_workers too large?)")
                    wait = remaining if wait is None else min(wait, remaining)
                try:
                    await asyncio.wait_for(condition.wait(), wait)
                except asyncio.TimeoutError:
                    if self.state.consistency == "sync" and self.sync_timeout and \
                            self.state.force_sync_step():
                        condition.notify_all()
        out = self.state.read(piece_indices, worker_id)
        self.metrics.record_pull(int(sum(a.nbytes for a in out.values())))
        return out

    async def push_pull(self, client_id, seq, worker_id, payload, present=None, factors=None, epoch=0, rows=None,
                        timeout=None, incarnation=None):
        """A push, then the pull that follows it, in one call (one round trip per shard per step)."""
        if incarnation is not None and incarnation != self.incarnation:
            # earlier pushes of this client may be lost with the old process: keep this one, let it replay
            await self.push(client_id, seq, worker_id, payload, present, factors, epoch, rows)
            raise ShardRestarted(f"shard {self.state.shard_index} restarted since this client last heard from it")
        error, ack = None, None
        try:
            ack = await self.push(client_id, seq, worker_id, payload, present, factors, epoch, rows)
        except ValueError as exc:
            error = str(exc)
        params = await self.pull(client_id, seq, worker_id, None, timeout)
        return params, error, ack or self._ack(client_id)

    async def pull_rows(self, client_id, after_seq, name, ids, timeout=None, incarnation=None):
        """Rows ``ids`` of table ``name`` (all owned here), after this client's pushes up to ``after_seq``."""
        if incarnation is not None and incarnation != self.incarnation:
            raise ShardRestarted(f"shard {self.state.shard_index} restarted since this client last heard from it")
        await self._wait_until(lambda: self.state.pull_ready(client_id, after_seq, None), timeout)
        return self.state.read_rows(name, ids)

    def table_rows(self, name):
        """Every stored row of table ``name`` on this shard, and its updater state: ``(ids, values, state,
        iterations)`` (for pulling a whole table and for resharding restores)."""
        return self.state.row_tables[name].touched()

    def materialize(self, name):
        """``(ids, rows)``: every row of table ``name`` this shard owns (initial values where never pushed)."""
        return self.state.row_tables[name].materialize()

    async def _wait_until(self, ready, timeout) -> None:
        condition = self._condition()
        async with condition:
            await asyncio.wait_for(condition.wait_for(ready), timeout)

    # -- introspection -------------------------------------------------------------------------------------
    def recovery_info(self, client_id) -> tuple[int, str]:
        """(the client's last applied sequence number, this incarnation) for a recovering client."""
        return self.state.applied_seq.get(client_id, 0), self.incarnation

    def worker_clock(self, worker_id) -> int:
        return self.state.clocks.get(worker_id, 0)

    def stats(self) -> dict:
        stats = self.state.stats()
        stats.update(restarts=self.restarts, checkpoints_written=self.checkpoints_written)
        return stats

    def ping(self) -> str:
        return self.incarnation
