"""``ShardActor``: the thin Ray actor around ``ShardState`` — forwards messages, waits, and exports metrics.

An async actor, so a pull that must wait (read-your-writes, SSP or BSP gating) parks on a condition while
pushes keep arriving. Arrays in a push arrive as read-only zero-copy views of Ray's object store; the shard
reads them in the update kernel and never copies them.

Metrics (``ray.util.metrics``, tagged by ``shard``): ``rayps_pushes_total``, ``rayps_bytes_pushed_total``,
``rayps_bytes_pulled_total``, ``rayps_apply_seconds`` (histogram), ``rayps_staleness`` (gauge, updates applied
since the pushing worker last pulled), ``rayps_clock_gap`` (gauge, fastest minus slowest worker clock).
"""

from __future__ import annotations

import asyncio
import time

import ray

from .shard_state import ShardState

APPLY_SECONDS_BOUNDARIES = [1e-5, 1e-4, 1e-3, 5e-3, 1e-2, 5e-2, 0.1, 0.5, 1.0, 5.0]


class ShardMetrics:
    """Prometheus-exported counters of one shard (no-ops where Ray's metrics agent is absent)."""

    def __init__(self, shard_index: int):
        from ray.util import metrics  # noqa: PLC0415

        self.tags = {"shard": str(shard_index)}
        self.pushes = metrics.Counter("rayps_pushes_total", "Pushes received by a shard", tag_keys=("shard",))
        self.bytes_pushed = metrics.Counter("rayps_bytes_pushed_total", "Gradient bytes received",
                                            tag_keys=("shard",))
        self.bytes_pulled = metrics.Counter("rayps_bytes_pulled_total", "Parameter bytes sent", tag_keys=("shard",))
        self.apply_seconds = metrics.Histogram("rayps_apply_seconds", "Seconds to apply one push",
                                               boundaries=APPLY_SECONDS_BOUNDARIES, tag_keys=("shard",))
        self.staleness = metrics.Gauge("rayps_staleness", "Largest staleness seen (updates)", tag_keys=("shard",))
        self.clock_gap = metrics.Gauge("rayps_clock_gap", "Fastest minus slowest worker clock", tag_keys=("shard",))

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

    def __init__(self, shard_index, pieces, groups, buffers, consistency, staleness, num_workers, nan_policy):
        self.state = ShardState(shard_index, pieces, groups, buffers, consistency, staleness, num_workers,
                                nan_policy)
        self.metrics = ShardMetrics(shard_index)
        self.changed = None  # asyncio.Condition, created on the actor's event loop

    def _condition(self) -> asyncio.Condition:
        if self.changed is None:
            self.changed = asyncio.Condition()
        return self.changed

    async def _notify(self) -> None:
        condition = self._condition()
        async with condition:
            condition.notify_all()

    async def push(self, client_id, seq, worker_id, payload, present=None, factors=None, epoch=0):
        started = time.perf_counter()
        errors = self.state.push(client_id, seq, worker_id, payload, present, factors, epoch)
        nbytes = int(sum(a.nbytes for a in payload.values())) if payload else 0
        self.metrics.record_push(nbytes, time.perf_counter() - started, self.state)
        await self._notify()
        if errors:
            raise ValueError("; ".join(errors))

    async def pull(self, client_id=None, after_seq=0, worker_id=None, piece_indices=None, timeout=None):
        condition = self._condition()
        async with condition:
            try:
                await asyncio.wait_for(
                    condition.wait_for(lambda: self.state.pull_ready(client_id, after_seq, worker_id)), timeout)
            except asyncio.TimeoutError:
                raise TimeoutError(
                    f"shard {self.state.shard_index}: pull by worker {worker_id} waited {timeout}s; clocks "
                    f"{self.state.clocks}, sync step {self.state.sync_clock}, consistency "
                    f"{self.state.consistency!r} (is a worker dead or num_workers too large?)") from None
        out = self.state.read(piece_indices, worker_id)
        self.metrics.record_pull(int(sum(a.nbytes for a in out.values())))
        return out

    async def push_pull(self, client_id, seq, worker_id, payload, present=None, factors=None, epoch=0,
                        timeout=None):
        """A push, then the pull that follows it, in one call (one round trip per shard per step)."""
        error = None
        try:
            await self.push(client_id, seq, worker_id, payload, present, factors, epoch)
        except ValueError as exc:
            error = str(exc)
        params = await self.pull(client_id, seq, worker_id, None, timeout)
        return params, error

    def stats(self) -> dict:
        return self.state.stats()

    def ping(self) -> int:
        return self.state.shard_index
