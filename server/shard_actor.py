"""``ShardActor``: the thin Ray actor around ``ShardState`` — forwards messages, waits, checkpoints, exports
metrics.

Threads, not asyncio (an async actor costs ~1.5x a plain one per call, docs/profile.md section 3). Two Ray
concurrency groups:

* the default group, ONE thread: every call that changes the state or reads it without waiting (``push``,
  ``push_pull``, a ``pull`` or ``pull_rows`` that is ready, ``stats``, ``snapshot_blob``, ``recovery_info``,
  the dead-worker ``force_sync_step``, ...). They run one at a time in the order each client sent them, so
  the parameters change only on this thread. A ready pull returns the LIVE parameter buffers: Ray serializes
  a return value on the executing thread before that group's next task starts (tests/test_shard_actor.py
  holds Ray to this), so its copy into the reply is the only one.
* the ``wait`` group (``WAIT_THREADS`` threads): a pull that is not ready (read-your-writes after out-of-order
  delivery, SSP or BSP gating) returns ``None`` from the default group; the client then calls ``wait_pull``
  (``wait_pull_rows``), which blocks on a ``threading.Condition`` that every push notifies and reads under
  the same lock, with a copy (the push thread runs again as soon as the lock is released).

Every access to the state takes ``self.lock`` (uncontended on the default thread: tens of nanoseconds).
Sync mode's dead-worker policy: a ``wait_pull`` that waited ``sync_timeout`` asks the actor itself
(``force_sync_step``, default group) to apply the stuck step with the workers that pushed, so even that
change happens on the push thread and never under a live buffer that Ray is serializing.

Messages are packed: a push is ONE argument, the list ``[client_id, seq, worker_id, payload, present, factors,
epoch, rows, replayed]`` (``PUSH_FIELDS``; ``push_pull`` appends the incarnation the client knows); a pull is
``[client_id, after_seq, worker_id, piece_indices, incarnation]``. Lists, not tuples: Ray packs a list with
msgpack and pickles a tuple (4x the cost for a small request). A pull's reply is the flat parameter array when
the shard holds one dtype, else a dict dtype -> array, and small arrays travel as raw bytes both ways
(server/wire.py). Arrays in a push arrive as read-only zero-copy views of Ray's object store or of the
received bytes; the shard reads them in the update kernel and never copies them. Every push is acknowledged
with ``[applied, covered, incarnation]``: the client's last applied sequence number, the last one a finished
checkpoint holds (the client drops what no restart will need) and this process's identity (a change means a
restart); without a ``checkpoint_dir`` there is nothing to replay or restart and the acknowledgement is None.

The update kernels run on the push thread with a numba pool of ``kernel_threads`` (the shard's CPUs, at
least 1): a pool larger than the CPUs a shard gets makes every small update wait at a barrier.

Durability: with a ``checkpoint_dir`` the shard snapshots itself every ``checkpoint_every`` updates (the
snapshot is taken on the push thread between two pushes; the file is written on a background thread while
pushes go on). When Ray restarts the actor (``max_restarts``) the constructor restores the last snapshot, and
clients replay what it lacks.

Metrics (``ray.util.metrics``, tagged by ``shard``), reported every ``METRICS_EVERY`` pushes or
``METRICS_SECONDS`` (whichever first) from counters the state keeps anyway: ``rayps_pushes_total``,
``rayps_bytes_pushed_total``, ``rayps_bytes_pulled_total``, ``rayps_apply_seconds`` (histogram of the mean
apply time of each reporting window), ``rayps_staleness`` (gauge, the largest number of updates applied since
the pushing worker last pulled), ``rayps_clock_gap`` (gauge, fastest minus slowest worker clock),
``rayps_checkpoints_total``, ``rayps_restarts`` (gauge).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
import warnings

import ray

from . import checkpoint as ckpt
from . import shard_snapshot
from .shard_state import ShardState
from .sparse_rows import RowTableShard
from .wire import payload_from_wire, reply


class ShardRestarted(Exception):
    """A pull addressed to an earlier incarnation of this shard: the caller must recover (replay) first."""


PUSH_FIELDS = ("client_id", "seq", "worker_id", "payload", "present", "factors", "epoch", "rows", "replayed")
WAIT_THREADS = 64  # pulls that may block at once on one shard (one per waiting worker)
METRICS_EVERY = 100  # pushes between two reports to Prometheus
METRICS_SECONDS = 1.0  # ... or seconds, whichever comes first
APPLY_SECONDS_BOUNDARIES = [1e-5, 1e-4, 1e-3, 5e-3, 1e-2, 5e-2, 0.1, 0.5, 1.0, 5.0]
log = logging.getLogger(__name__)


class ShardMetrics:
    """Prometheus-exported counters of one shard (no-ops where Ray's metrics agent is absent), reported in
    batches: ``due()`` is one comparison per push; ``report`` sends the deltas of the state's own counters."""

    def __init__(self, shard_index: int):
        from ray.util import metrics  # noqa: PLC0415

        self.tags = {"shard": str(shard_index)}
        keys = ("shard",)
        self.pushes = metrics.Counter("rayps_pushes_total", "Pushes received by a shard", tag_keys=keys)
        self.bytes_pushed = metrics.Counter("rayps_bytes_pushed_total", "Gradient bytes received", tag_keys=keys)
        self.bytes_pulled = metrics.Counter("rayps_bytes_pulled_total", "Parameter bytes sent", tag_keys=keys)
        self.apply_seconds = metrics.Histogram("rayps_apply_seconds", "Mean seconds to apply one push, per "
                                               "reporting window", boundaries=APPLY_SECONDS_BOUNDARIES, tag_keys=keys)
        self.staleness = metrics.Gauge("rayps_staleness", "Largest staleness seen (updates)", tag_keys=keys)
        self.clock_gap = metrics.Gauge("rayps_clock_gap", "Fastest minus slowest worker clock", tag_keys=keys)
        self.checkpoints = metrics.Counter("rayps_checkpoints_total", "Checkpoints written", tag_keys=keys)
        self.restarts = metrics.Gauge("rayps_restarts", "Times this shard was restarted", tag_keys=keys)
        self.reported = {"pushes": 0, "bytes_pushed": 0, "bytes_pulled": 0, "updates_applied": 0,
                         "apply_seconds": 0.0, "checkpoints": 0}
        self.next_count = METRICS_EVERY
        self.next_time = time.monotonic() + METRICS_SECONDS

    def due(self, pushes: int) -> bool:
        return pushes >= self.next_count or time.monotonic() >= self.next_time

    def report(self, state: ShardState, checkpoints: int) -> None:
        """Send what changed since the last report (call with the state's lock held)."""
        counters = state.counters
        now = {"pushes": counters["pushes"], "bytes_pushed": counters["bytes_pushed"],
               "bytes_pulled": counters["bytes_pulled"], "updates_applied": counters["updates_applied"],
               "apply_seconds": counters["apply_seconds"], "checkpoints": checkpoints}
        delta = {key: now[key] - self.reported[key] for key in now}
        self.reported = now
        tags = self.tags
        for counter, key in ((self.pushes, "pushes"), (self.bytes_pushed, "bytes_pushed"),
                             (self.bytes_pulled, "bytes_pulled"), (self.checkpoints, "checkpoints")):
            if delta[key]:
                counter.inc(delta[key], tags=tags)
        if delta["updates_applied"]:
            self.apply_seconds.observe(delta["apply_seconds"] / delta["updates_applied"], tags=tags)
        self.staleness.set(counters["max_staleness"], tags=tags)
        self.clock_gap.set(state.clock_gap(), tags=tags)
        self.next_count = now["pushes"] + METRICS_EVERY
        self.next_time = time.monotonic() + METRICS_SECONDS


@ray.remote(max_concurrency=1, concurrency_groups={"wait": WAIT_THREADS})
class ShardActor:
    """Remote wrapper; see ``ShardState`` for the protocol of each call and the module docstring for threads."""

    def __init__(self, shard_index, pieces, groups, buffers, consistency, staleness, num_workers, nan_policy,
                 checkpoint_dir=None, checkpoint_every=0, piece_states=None, sync_timeout=None, row_tables=None,
                 row_states=None, kernel_threads=1):
        tables = {spec["name"]: RowTableShard(spec["name"], spec["num_rows"], spec["dim"], spec["dtype"], shard_index,
                                              spec["num_shards"], groups[spec["group"]], spec["initial"])
                  for spec in row_tables or []}
        for name, rows in (row_states or {}).items():  # restored under another shard count: keep the owned rows
            tables[name].load_rows(*rows, what=f"table {name!r}")
        self.state = ShardState(shard_index, pieces, groups, buffers, consistency, staleness, num_workers,
                                nan_policy, tables)
        if piece_states is not None:
            shard_snapshot.load_pieces(self.state, [(None, slots, it) for slots, it in piece_states])
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)  # notified after every push
        self.metrics = ShardMetrics(shard_index)
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_every = int(checkpoint_every or 0)
        self.sync_timeout = sync_timeout
        self.kernel_threads = max(1, int(kernel_threads))
        self.kernel_thread = None  # the thread whose numba pool size was set (numba's setting is per thread)
        self.restarts = 0
        self.covered_seq: dict[str, int] = {}
        self.updates_at_checkpoint = 0
        self.checkpoint_writing = False
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

    def _restore_after_restart(self) -> None:
        if not self.checkpoint_dir:
            raise RuntimeError(f"shard {self.state.shard_index} restarted without a checkpoint_dir: its state is lost")
        pointer = ckpt.read_pointer(self.checkpoint_dir, self.state.shard_index)
        if pointer is None:
            raise RuntimeError(f"shard {self.state.shard_index} restarted but {self.checkpoint_dir} holds no "
                               f"checkpoint of it: its state is lost")
        blob = ckpt.read_shard(self.checkpoint_dir, pointer)
        recorded = shard_snapshot.restore(self.state, blob, f"shard {self.state.shard_index} checkpoint")
        self.covered_seq = dict(self.state.applied_seq)
        self.restarts = recorded + 1
        self.updates_at_checkpoint = self.state.counters["updates_applied"]
        log.warning("rayps shard %d restarted (%d restarts); restored %s", self.state.shard_index, self.restarts,
                    pointer["file"])

    def _ack(self, client_id) -> tuple | None:
        """``[applied, covered, incarnation]``; None without a checkpoint_dir: no replay buffer to trim and no
        restart to detect (such a shard is not restarted), so nothing to say (and a cheaper reply)."""
        if not self.checkpoint_dir:
            return None
        return [self.state.applied_seq.get(client_id, 0), self.covered_seq.get(client_id, 0), self.incarnation]

    def _restarted(self) -> ShardRestarted:
        return ShardRestarted(f"shard {self.state.shard_index} restarted since this client last heard from it")

    def _check_incarnation(self, incarnation) -> None:
        """A read must not answer a client that knew an earlier process (its pushes may be lost): ShardRestarted
        makes it recover (replay) and ask again. ``None``: the client has no acknowledgement yet."""
        if incarnation is not None and incarnation != self.incarnation:
            raise self._restarted()

    def _pin_kernel_threads(self) -> None:
        """numba's pool size is per calling thread: set it on the push thread (a shard gets ``kernel_threads``
        CPUs; more threads than that make every small update wait at a barrier, docs/profile.md section 1)."""
        thread = threading.get_ident()
        if self.kernel_thread != thread:
            self.kernel_thread = thread
            try:
                import numba  # noqa: PLC0415

                numba.set_num_threads(min(self.kernel_threads, numba.config.NUMBA_NUM_THREADS))
            except (ImportError, ValueError):  # no numba: the reference path; a pool smaller than asked: keep it
                pass

    # -- pushes (default group) ----------------------------------------------------------------------------
    def _push(self, message) -> tuple[str, list[str]]:
        client_id, seq, worker_id, payload, present, factors, epoch, rows, replayed = message[:9]
        if self.kernel_thread != threading.get_ident():
            self._pin_kernel_threads()
        with self.lock:
            if replayed:
                self.state.counters["replays_received"] += 1
            errors = self.state.push(client_id, seq, worker_id, payload_from_wire(payload), present, factors, epoch,
                                     rows)
            self.changed.notify_all()
            if self.checkpoint_every and not self.checkpoint_writing:
                self._maybe_checkpoint()
            if self.metrics.due(self.state.counters["pushes"]):
                self.metrics.report(self.state, self.checkpoints_written)
        return client_id, errors

    def push(self, message) -> tuple | None:
        """Apply one push (``PUSH_FIELDS``); the acknowledgement, or ValueError naming what was rejected."""
        client_id, errors = self._push(message)
        if errors:
            raise ValueError("; ".join(errors))
        return self._ack(client_id)

    def push_pull(self, message):
        """A push, then the pull that follows it, in one call: ``message`` is a push (``PUSH_FIELDS``) followed
        by the incarnation the client knows (or None). The reply is the pull's (``reply``) when the push had no
        error and there is no acknowledgement to give, else ``[pull reply, error, ack]``. A pull reply of None:
        not ready (SSP/BSP gating), the client asks ``wait_pull``."""
        incarnation = message[9]
        if incarnation is not None and incarnation != self.incarnation:
            # earlier pushes of this client may be lost with the old process: keep this one, let it replay
            self._push(message)
            raise self._restarted()
        client_id, errors = self._push(message)
        buffers = self._read_if_ready(client_id, message[1], message[2], None)
        ack = self._ack(client_id)
        if errors or ack is not None:
            return [buffers, "; ".join(errors) or None, ack]
        return buffers

    # -- checkpoints ---------------------------------------------------------------------------------------
    def _maybe_checkpoint(self) -> None:
        """On the push thread, lock held: snapshot between two pushes, write it on a background thread."""
        if not self.checkpoint_dir or self.state.counters["updates_applied"] - self.updates_at_checkpoint < \
                self.checkpoint_every:
            return
        applied = dict(self.state.applied_seq)
        self.updates_at_checkpoint = self.state.counters["updates_applied"]
        blob = ckpt.pack(shard_snapshot.snapshot(self.state, self.restarts))  # a consistent copy
        self.checkpoint_writing = True
        threading.Thread(target=self._write_checkpoint, args=(applied, blob, self.state.version),
                         name=f"rayps-checkpoint-{self.state.shard_index}", daemon=True).start()

    def _write_checkpoint(self, applied: dict, blob: bytes, generation: int) -> None:
        try:
            ckpt.write_shard(self.checkpoint_dir, self.state.shard_index, generation, blob)
            self.covered_seq = applied
            self.checkpoints_written += 1
        except Exception:  # noqa: BLE001 - a failed write must not stop training; the next one retries
            log.exception("rayps shard %d: checkpoint write failed", self.state.shard_index)
        finally:
            self.checkpoint_writing = False

    def snapshot_blob(self) -> bytes:
        """This shard's snapshot as msgpack bytes (for ``ParameterServer.save``)."""
        with self.lock:
            return ckpt.pack(shard_snapshot.snapshot(self.state, self.restarts))

    # -- pulls ---------------------------------------------------------------------------------------------
    def _read_if_ready(self, client_id, after_seq, worker_id, piece_indices):
        """On the push thread: the parameters (live buffers for a whole pull) as a ``reply``, or None if the
        pull must wait."""
        with self.lock:
            if not self.state.pull_ready(client_id, after_seq, worker_id):
                return None
            return reply(self.state.read(piece_indices, worker_id, copy=False))  # whole: live; pieces: packed

    def pull(self, request):
        """``request = [client_id, after_seq, worker_id, piece_indices, incarnation]``: the parameters as a
        ``reply`` (whole buffers, or the pieces packed in order) if this pull may be answered now, else None
        (then the client asks ``wait_pull``)."""
        client_id, after_seq, worker_id, piece_indices, incarnation = request
        self._check_incarnation(incarnation)
        return self._read_if_ready(client_id, after_seq, worker_id, piece_indices)

    @ray.method(concurrency_group="wait")
    def wait_pull(self, request, timeout=None):
        """``pull`` that blocks until the pull may be answered (or ``timeout`` seconds: TimeoutError); a copy."""
        client_id, after_seq, worker_id, piece_indices, incarnation = request
        return self._read_when_ready(client_id, after_seq, worker_id, incarnation, timeout,
                                     lambda: reply(self.state.read(piece_indices, worker_id)))

    def _read_when_ready(self, client_id, after_seq, worker_id, incarnation, timeout, read):
        """The blocking reads: ``read()`` (lock held) once this client's pushes up to ``after_seq`` are applied
        and the consistency model lets ``worker_id`` read."""
        self._check_incarnation(incarnation)
        with self.changed:
            self._wait(lambda: self.state.pull_ready(client_id, after_seq, worker_id), timeout, worker_id)
            return read()

    def _wait(self, ready, timeout, worker_id) -> None:
        """Lock held: wait on ``changed`` until ``ready()``; in sync mode, past ``sync_timeout`` without any
        push, ask the push thread to force the stuck step (dead-worker policy)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        state = self.state
        force = state.consistency == "sync" and bool(self.sync_timeout)
        while not ready():
            wait = self.sync_timeout if force else None
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"shard {state.shard_index}: pull by worker {worker_id} waited {timeout}s; clocks "
                        f"{state.clocks}, sync step {state.sync_clock}, consistency {state.consistency!r} "
                        f"(is a worker dead or num_workers too large?)")
                wait = remaining if wait is None else min(wait, remaining)
            if not self.changed.wait(wait) and force and (deadline is None or time.monotonic() < deadline):
                ray.get_runtime_context().current_actor.force_sync_step.remote(state.sync_clock)

    def force_sync_step(self, sync_clock: int) -> bool:
        """Dead-worker policy (sync mode), on the push thread: apply step ``sync_clock`` with the mean of the
        workers that pushed for it, if it is still the one waiting."""
        with self.lock:
            if self.state.sync_clock != sync_clock or not self.state.force_sync_step():
                return False
            self.changed.notify_all()
            return True

    def pull_rows(self, request):
        """``request = [client_id, after_seq, name, ids, incarnation]``: rows ``ids`` of table ``name`` (all owned
        here) after this client's pushes up to ``after_seq``, or None if they are not applied yet."""
        client_id, after_seq, name, ids, incarnation = request
        self._check_incarnation(incarnation)
        with self.lock:
            if not self.state.pull_ready(client_id, after_seq, None):
                return None
            return self.state.read_rows(name, ids)

    @ray.method(concurrency_group="wait")
    def wait_pull_rows(self, request, timeout=None):
        """``pull_rows`` that blocks until this client's pushes up to ``after_seq`` are applied."""
        client_id, after_seq, name, ids, incarnation = request
        return self._read_when_ready(client_id, after_seq, None, incarnation, timeout,
                                     lambda: self.state.read_rows(name, ids))

    def table_rows(self, name):
        """Every stored row of table ``name`` on this shard, and its updater state: ``(ids, values, state,
        iterations)`` (for pulling a whole table and for resharding restores)."""
        with self.lock:
            return self.state.row_tables[name].touched()

    def materialize(self, name):
        """``(ids, rows)``: every row of table ``name`` this shard owns (initial values where never pushed)."""
        with self.lock:
            return self.state.row_tables[name].materialize()

    # -- introspection -------------------------------------------------------------------------------------
    def recovery_info(self, client_id) -> tuple[int, str]:
        """(the client's last applied sequence number, this incarnation) for a recovering client."""
        with self.lock:
            return self.state.applied_seq.get(client_id, 0), self.incarnation

    def worker_clock(self, worker_id) -> int:
        with self.lock:
            return self.state.clocks.get(worker_id, 0)

    def stats(self) -> dict:
        with self.lock:
            stats = self.state.stats()
            self.metrics.report(self.state, self.checkpoints_written)
        stats.update(restarts=self.restarts, checkpoints_written=self.checkpoints_written)
        return stats

    def ping(self) -> str:
        return self.incarnation
