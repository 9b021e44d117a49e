"""``ShardActor``: the thin Ray actor around a shard — Ray is its control plane, ZeroMQ its data plane.

The constructor builds the ``ShardState`` from a ``ShardSpec`` and the server's ``ShardOptions``
(server/shard_spec.py), restores the last checkpoint after a restart, and starts the
shard's ``DataServer`` (server/data_server.py): one ZeroMQ socket on this node's address and one thread that
serves every push, pull, fused push+pull, row push and pull, and replay (``ShardService``), so the parameters
change on that thread only. Ray calls carry what is rare: ``endpoint`` (where the socket is, this process's
incarnation, and a client's last applied sequence number: what a client asks after a start or a restart),
``stats``, ``snapshot_blob`` (saves), ``table_rows`` (resharding saves), ``worker_clock``, ``ping``. They
take ``self.lock``, which the data-plane thread holds while it handles a message.

The update kernels run on the data-plane thread with a numba pool of ``kernel_threads`` (the shard's CPUs, at
least 1): a pool larger than the CPUs a shard gets makes every small update wait at a barrier.

Durability: with a ``checkpoint_dir`` the shard snapshots itself every ``checkpoint_every`` updates (the
snapshot is taken on the data-plane thread between two pushes; the file is written on a background thread
while pushes go on) and tells clients, in every acknowledgement, up to which sequence number a finished
checkpoint holds their pushes. When Ray restarts the actor (``max_restarts``) the constructor restores the
last snapshot, binds a new socket, and clients that learn the new endpoint through Ray replay what it lacks.

Metrics (``ray.util.metrics``, tagged by ``shard``), reported every ``METRICS_EVERY`` pushes or
``METRICS_SECONDS`` (whichever first) from counters the state keeps anyway: ``rayps_pushes_total``,
``rayps_bytes_pushed_total``, ``rayps_bytes_pulled_total``, ``rayps_apply_seconds`` (histogram of the mean
apply time of each reporting window), ``rayps_staleness`` (gauge, the largest number of updates applied since
the pushing worker last pulled), ``rayps_clock_gap`` (gauge, fastest minus slowest worker clock),
``rayps_checkpoints_total``, ``rayps_restarts`` (gauge), ``rayps_handshakes_failed_total`` (connections
refused for lacking the run's credentials) and ``rayps_malformed_rejected_total``; per row table (tags ``shard``
and ``table``): ``rayps_table_rows`` and ``rayps_table_bytes`` (gauges), ``rayps_table_admitted_total``,
``rayps_table_evicted_total`` and ``rayps_table_dropped_gradients_total``.

Row tables are checkpointed incrementally (server/checkpoints/table_chains.py): the shard remembers the chain
of each table in its ``checkpoint_dir`` and writes only the changes since its last checkpoint on top of it.
``export_deltas`` and ``table_stats`` answer the client's serving-delta and table-statistics calls.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
import warnings

import ray

from ..updaters.float_env import flush_denormals
from .checkpoints import format as ckpt
from .checkpoints import shard as shard_checkpoint
from .checkpoints import table_chains
from .data_server import DataServer
from .faults import NO_FAULTS
from .shard_service import ShardService
from .shared_regions import MAX_REGION_CLIENTS, SHARED_FROM_BYTES, ShardRegions, region_dir, sweep_orphans
from .shard_spec import ShardOptions, ShardSpec, build_state
from .shard_state import ShardState

METRICS_EVERY = 100  # pushes between two reports to Prometheus
CHECKPOINT_WAIT_SECONDS = 600.0  # checkpoint_now: the longest wait for a checkpoint write already in flight
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
        self.handshakes_failed = metrics.Counter("rayps_handshakes_failed_total", "Data-plane connections refused "
                                                 "for lacking the run's credentials", tag_keys=keys)
        self.malformed = metrics.Counter("rayps_malformed_rejected_total", "Data-plane messages rejected as "
                                         "malformed", tag_keys=keys)
        table_keys = ("shard", "table")
        self.table_rows = metrics.Gauge("rayps_table_rows", "Rows a row table stores on this shard",
                                        tag_keys=table_keys)
        self.table_bytes = metrics.Gauge("rayps_table_bytes", "Bytes a row table holds on this shard",
                                         tag_keys=table_keys)
        self.table_counters = {key: metrics.Counter(f"rayps_table_{key}_total", text, tag_keys=table_keys)
                               for key, text in (("admitted", "Rows given storage by the admission policy"),
                                                 ("evicted", "Rows evicted by the eviction policy"),
                                                 ("dropped_gradients", "Row gradients dropped (row not admitted)"))}
        self.table_reported: dict = {}
        self.reported = {"pushes": 0, "bytes_pushed": 0, "bytes_pulled": 0, "updates_applied": 0,
                         "apply_seconds": 0.0, "checkpoints": 0, "handshakes_failed": 0, "malformed_rejected": 0}
        self.next_count = METRICS_EVERY
        self.next_time = time.monotonic() + METRICS_SECONDS

    def due(self, pushes: int) -> bool:
        return pushes >= self.next_count or time.monotonic() >= self.next_time

    def report(self, state: ShardState, checkpoints: int, transport: dict) -> None:
        """Send what changed since the last report (call with the state's lock held)."""
        counters = state.counters
        now = {"pushes": counters["pushes"], "bytes_pushed": counters["bytes_pushed"],
               "bytes_pulled": counters["bytes_pulled"], "updates_applied": counters["updates_applied"],
               "apply_seconds": counters["apply_seconds"], "checkpoints": checkpoints,
               "handshakes_failed": transport["handshakes_failed"],
               "malformed_rejected": transport["malformed_rejected"]}
        delta = {key: now[key] - self.reported[key] for key in now}
        self.reported = now
        tags = self.tags
        for counter, key in ((self.pushes, "pushes"), (self.bytes_pushed, "bytes_pushed"),
                             (self.bytes_pulled, "bytes_pulled"), (self.checkpoints, "checkpoints"),
                             (self.handshakes_failed, "handshakes_failed"), (self.malformed, "malformed_rejected")):
            if delta[key]:
                counter.inc(delta[key], tags=tags)
        if delta["updates_applied"]:
            self.apply_seconds.observe(delta["apply_seconds"] / delta["updates_applied"], tags=tags)
        self.staleness.set(counters["max_staleness"], tags=tags)
        self.clock_gap.set(state.clock_gap(), tags=tags)
        for name, table in state.row_tables.items():
            table_tags = dict(tags, table=name)
            self.table_rows.set(table.n, tags=table_tags)
            self.table_bytes.set(table.used_bytes(), tags=table_tags)
            reported = self.table_reported.setdefault(name, dict.fromkeys(self.table_counters, 0))
            for key, counter in self.table_counters.items():
                if table.counters[key] > reported[key]:
                    counter.inc(table.counters[key] - reported[key], tags=table_tags)
                reported[key] = table.counters[key]
        self.next_count = now["pushes"] + METRICS_EVERY
        self.next_time = time.monotonic() + METRICS_SECONDS


@ray.remote(max_concurrency=4)  # control calls only; the data plane has its own thread
class ShardActor:
    """Remote wrapper; see ``ShardService`` for the protocol and the module docstring for threads."""

    def __init__(self, spec: ShardSpec, options: ShardOptions, *, credentials):
        """``spec``: this shard's part, ``options``: what every shard of the server shares (server/shard_spec.py);
        ``credentials``: the run's data-plane credentials."""
        shard_index = spec.shard_index
        self.state = build_state(spec, options)
        self.lock = threading.Lock()
        self.metrics = ShardMetrics(shard_index)
        self.checkpoint_dir = options.checkpoint_dir
        self.checkpoint_every = int(options.checkpoint_every or 0)
        self.kernel_threads = max(1, int(spec.kernel_threads))
        self.flush_denormals = bool(options.flush_denormals)
        self.restarts = 0
        self.table_chains: dict = {}  # table -> the chain of its incremental checkpoints in checkpoint_dir
        self.updates_at_checkpoint = 0
        self.checkpoint_writing = False
        self.checkpoint_wait = CHECKPOINT_WAIT_SECONDS
        self.checkpoints_written = 0
        self.generation = 0  # of the last checkpoint taken: each takes a larger one (unique blob names)
        self.incarnation = uuid.uuid4().hex  # new in every process: clients detect a restart by it
        self.faults = NO_FAULTS  # tests: where this process dies (server/faults.py)
        self.service = ShardService(self.state, self.incarnation, options.sync_timeout)
        with warnings.catch_warnings():  # Ray's property warns about its own internal use of a deprecated API
            warnings.simplefilter("ignore")
            reconstructed = ray.get_runtime_context().was_current_actor_reconstructed
        if reconstructed:
            self._restore_after_restart()
        elif self.checkpoint_dir:  # a first checkpoint, so a restart never falls back to the initial values
            _, self.table_chains = table_chains.write_shard(self.checkpoint_dir, shard_index, 0,
                                                            shard_checkpoint.snapshot(self.state), {})
        self.metrics.restarts.set(self.restarts, tags=self.metrics.tags)
        host = options.data_host or ray.util.get_node_ip_address()
        self.data = DataServer(self.service, credentials=credentials, host=host, ports=tuple(options.data_ports),
                               lock=self.lock, on_change=self._after_change, on_start=self._prepare_kernel_thread)
        self.data.thread.name = f"rayps-data-plane-{shard_index}"
        self.node_id = ray.get_runtime_context().get_node_id()
        self.data.start()

    def _restore_after_restart(self) -> None:
        if not self.checkpoint_dir:
            raise RuntimeError(f"shard {self.state.shard_index} restarted without a checkpoint_dir: its state is lost")
        pointer = ckpt.read_pointer(self.checkpoint_dir, self.state.shard_index)
        if pointer is None:
            raise RuntimeError(f"shard {self.state.shard_index} restarted but {self.checkpoint_dir} holds no "
                               f"checkpoint of it: its state is lost")
        blob = ckpt.read_shard(self.checkpoint_dir, pointer)
        blob, _ = table_chains.read_tables(self.checkpoint_dir, blob, f"shard {self.state.shard_index} checkpoint")
        recorded = shard_checkpoint.restore(self.state, blob, f"shard {self.state.shard_index} checkpoint")
        self.service.covered = dict(self.state.applied_seq)
        self.restarts = recorded + 1
        self.updates_at_checkpoint = self.state.counters["updates_applied"]
        self.generation = int(pointer.get("generation") or 0)
        log.warning("rayps shard %d restarted (%d restarts); restored %s", self.state.shard_index, self.restarts,
                    pointer["file"])

    def _prepare_kernel_thread(self) -> None:
        """First thing on the data-plane thread, before any kernel: flush-to-zero (updaters/float_env.py: the
        bit is per thread, and numba's pool, started from this thread, inherits it), and numba's pool size,
        which is per calling thread too (a shard gets ``kernel_threads`` CPUs; more threads than that make
        every small update wait at a barrier)."""
        if self.flush_denormals:
            flush_denormals(True)
        try:
            import numba  # noqa: PLC0415

            numba.set_num_threads(min(self.kernel_threads, numba.config.NUMBA_NUM_THREADS))
        except (ImportError, ValueError):  # no numba: the reference path; a pool smaller than asked: keep it
            pass

    def _after_change(self) -> None:
        """On the data-plane thread, lock held, after a message changed the state: checkpoint, report."""
        if self.checkpoint_every and not self.checkpoint_writing:
            self._maybe_checkpoint()
        if self.metrics.due(self.state.counters["pushes"]):
            self.metrics.report(self.state, self.checkpoints_written, self.data.counters)

    # -- checkpoints ---------------------------------------------------------------------------------------
    def _maybe_checkpoint(self) -> None:
        """On the data-plane thread, lock held: snapshot between two pushes, write it on a background thread."""
        if not self.checkpoint_dir or self.state.counters["updates_applied"] - self.updates_at_checkpoint < \
                self.checkpoint_every:
            return
        applied, snapshot, generation = self._take_checkpoint()
        threading.Thread(target=self._write_checkpoint, args=(applied, snapshot, generation),
                         name=f"rayps-checkpoint-{self.state.shard_index}", daemon=True).start()

    def _take_checkpoint(self):
        """Lock held, no checkpoint being written: ``(applied, snapshot, generation)`` of a new checkpoint (a
        consistent copy: every array is encoded to bytes here; the tables: their changes since the chain)."""
        applied = dict(self.state.applied_seq)
        self.updates_at_checkpoint = self.state.counters["updates_applied"]
        snapshot = shard_checkpoint.snapshot(self.state, self.restarts, table_chains.since_of(self.table_chains))
        self.generation = max(self.state.version, self.generation + 1)
        self.checkpoint_writing = True
        return applied, snapshot, self.generation

    def checkpoint_now(self, client_id=None) -> int:
        """Write a checkpoint now (after the one being written, if any) and return ``client_id``'s applied
        sequence number, which it covers. A restarted worker asks every shard this (``as_worker``): the pushes
        its dead process kept for replay are gone, so a later restart of this shard must not need them."""
        if not self.checkpoint_dir:
            with self.lock:
                return self.state.applied_seq.get(client_id, 0)
        deadline = time.monotonic() + self.checkpoint_wait
        while True:
            with self.lock:
                if not self.checkpoint_writing:
                    applied, snapshot, generation = self._take_checkpoint()
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"shard {self.state.shard_index}: a checkpoint write in flight did not finish "
                                   f"within {self.checkpoint_wait:g}s (checkpoint_dir {self.checkpoint_dir!r})")
            time.sleep(0.01)
        self._write_checkpoint(applied, snapshot, generation)
        if self.service.covered is not applied:
            raise RuntimeError(f"shard {self.state.shard_index}: the checkpoint for a restarted worker could not be "
                               f"written to {self.checkpoint_dir!r} (the shard's log says why)")
        return applied.get(client_id, 0)

    def _write_checkpoint(self, applied: dict, snapshot: dict, generation: int) -> None:
        try:
            _, self.table_chains = table_chains.write_shard(
                self.checkpoint_dir, self.state.shard_index, generation, snapshot, self.table_chains,
                lambda: self.faults.hit("shard.checkpoint_blob", shard=self.state.shard_index))
            self.service.covered = applied
            self.checkpoints_written += 1
        except Exception:  # noqa: BLE001 - a failed write must not stop training; the next one retries
            log.exception("rayps shard %d: checkpoint write failed", self.state.shard_index)
        finally:
            self.checkpoint_writing = False

    def snapshot_blob(self) -> bytes:
        """This shard's snapshot as msgpack bytes (for ``ParameterServer.save``)."""
        with self.lock:
            return ckpt.pack(shard_checkpoint.snapshot(self.state, self.restarts))

    def snapshot_record(self, since_by_shard=None) -> dict:
        """This shard's snapshot as a msgpack-able map; ``since_by_shard[shard][table] = (epoch, version)``: the
        checkpoint a table's record may be a delta of (``ParameterServer.save``, server/checkpoints/table_chains.py)."""
        since = since_by_shard[self.state.shard_index] if since_by_shard else None
        with self.lock:
            return shard_checkpoint.snapshot(self.state, self.restarts, since)

    # -- row tables ------------------------------------------------------------------------------------------
    def export_deltas(self, name, since_by_shard=None):
        """``(ids, values, evicted, (epoch, version))`` of table ``name`` on this shard since this shard's part of
        the token (None: every stored row); see ``RowTableShard.export_since``."""
        since = None if since_by_shard is None else since_by_shard[self.state.shard_index]
        with self.lock:
            return self._table(name).export_since(since)

    def table_stats(self, name) -> dict:
        with self.lock:
            return self._table(name).stats()

    def _table(self, name):
        table = self.state.row_tables.get(name)
        if table is None:
            raise ValueError(f"shard {self.state.shard_index}: {name!r} is not a row-sparse table")
        return table

    # -- control plane -------------------------------------------------------------------------------------
    def endpoint(self, client_id=None, node_id=None) -> list:
        """``[data-plane endpoint, incarnation, client_id's last applied sequence number]``: what a client asks
        after a start or a restart of this shard. A client that names this shard's node (``node_id``) gets the
        same-node ``ipc://`` endpoint where the shard has one, else the TCP one."""
        local = node_id is not None and node_id == self.node_id and self.data.local_endpoint is not None
        with self.lock:
            return [self.data.local_endpoint if local else self.data.endpoint, self.incarnation,
                    self.state.applied_seq.get(client_id, 0)]

    def shared_regions(self, client_id=None):
        """Shared memory for a client on this node (server/shared_regions.py): the regions' paths, token and
        layout, which the client maps and then unlinks; None where this shard's parameters are small (the
        socket is as fast), or shared memory is off (``RAYPS_DATA_SHM=0``) or unavailable. A client's earlier
        regions are dropped; beyond ``MAX_REGION_CLIENTS`` clients the oldest's are (it then uses its socket)."""
        directory = region_dir()
        if (directory is None or type(client_id) is not str
                or sum(buffer.nbytes for buffer in self.state.params.values()) < SHARED_FROM_BYTES):
            return None
        sweep_orphans(directory)
        try:
            regions = ShardRegions.create(directory, {dtype: buf.size for dtype, buf in self.state.params.items()})
        except OSError as error:
            log.warning("rayps shard %d: no shared memory for a client on this node (%s); it uses its socket",
                        self.state.shard_index, error)
            return None
        with self.lock:
            known = self.service.regions
            known.pop(client_id, None)
            known[client_id] = regions
            while len(known) > MAX_REGION_CLIENTS:
                del known[next(iter(known))]
        return regions.to_wire()

    def inject_faults(self, plan) -> None:
        """Tests: where this shard's process dies (server/faults.py); a restarted process starts without."""
        self.faults = plan

    def table_rows(self, name):
        """Every stored row of table ``name`` on this shard, and its updater state: ``(ids, values, state,
        iterations)`` (for resharding restores)."""
        with self.lock:
            return self.state.row_tables[name].touched()

    def worker_clock(self, worker_id) -> int:
        with self.lock:
            return self.state.clocks.get(worker_id, 0)

    def stats(self) -> dict:
        with self.lock:
            stats = self.state.stats()
            self.metrics.report(self.state, self.checkpoints_written, self.data.counters)
            stats.update(self.data.counters, waiting_reads=len(self.service.waiting),
                         uncovered={client: seq - self.service.covered.get(client, 0)  # a restart's replay
                                    for client, seq in self.state.applied_seq.items()})
        stats.update(restarts=self.restarts, checkpoints_written=self.checkpoints_written,
                     endpoint=self.data.endpoint)
        return stats

    def validate(self) -> bool:
        """Check this shard's invariants between two messages (``ShardState.validate``, its row tables too):
        raises ``InvariantError`` naming the first one broken, else True. For tests and debugging."""
        with self.lock:
            self.state.validate()
        return True

    def ping(self) -> str:
        return self.incarnation
