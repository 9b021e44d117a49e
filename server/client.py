"""``ParameterServer``: the client handle — the public API of rayps.

    ps = ParameterServer(params, updater=Adam(...), num_shards=2, consistency="async")
    ps.push(grads, worker_id=0)      # returns at once; one message per shard (or a batch of them), straight there
    ps.flush()                       # every push this handle issued is applied (errors raised here)
    ps.pull(names=None)              # caller-owned arrays; sees this handle's earlier pushes
    ps.pull(copy=False)              # read-only arrays, views of the received buffers where possible
    ps.push_pull(grads, worker_id=0) # a push and the pull after it: one message per shard (the worker's step)
    ps.save(path); ParameterServer.restore(path, num_shards=None)
    ps.state_dict(); ParameterServer.from_state_dict(state)     # the same, in memory (server/checkpoints/)
    ps.stats(); ps.shutdown()
    ps.export_deltas("emb", since=None); ps.table_stats("emb")   # row tables: serving deltas, table figures

Ray is the control plane: it places and restarts the shard actors and tells clients where each shard's
data-plane socket is. Pushes, pulls and replays travel on that socket (ZeroMQ, server/protocol.py), straight
between the client and the shard, authenticated with the run's credentials, made here per run
(``encrypt=True``: CURVE encryption too; server/credentials.py).

The handle is serializable (through Ray only: it carries the run's credentials): a worker actor that receives
it gets its own client identity (a fresh ``client_id`` and sequence counter) and its own connections.

A push is checked whole before anything is sent (``PushPlan``: a bad or non-finite push reaches no shard) and
travels as ONE message per shard: a small header and the arrays as they are (views of the caller's where a
shard's part is one contiguous piece); small pushes made while a shard is busy with this handle's earlier ones
travel several to a message (a batch, server/shard_links.py), each applied as if it had come alone. ``push``
returns at once and keeps owned copies (the caller may reuse its arrays); ``push_pull`` blocks until the reply,
so it sends the caller's arrays without copying them.

With ``checkpoint_dir`` (a local path, a URI such as ``s3://bucket/run`` or ``gs://bucket/run``, or a
``(pyarrow.fs.FileSystem, path)`` pair: server/checkpoints/storage.py), shards checkpoint every
``checkpoint_every`` updates and Ray restarts a dead shard, which restores its checkpoint; the handle keeps
each push until a checkpoint holds it and replays what a restarted shard lacks, so no update is lost or applied
twice (``ShardLinks``). In sync mode each shard then also keeps the parameters of the steps a restarted worker
may recompute, at most ``history_bytes`` (server/sync_steps.py).

The shards' update kernels flush results below the normal float range to 0 (``flush_denormals``, default True:
a subnormal result costs ~100x a normal one on x86, and training makes them; updaters/float_env.py).
``flush_denormals=False`` keeps IEEE subnormals.

Where the data plane listens: ``data_host`` (else ``RAYPS_DATA_HOST``; else 127.0.0.1 when this handle started
an embedded local Ray, whose processes all run on this machine; else each shard's node address as Ray knows
it), at a port of ``data_ports`` (else ``RAYPS_DATA_PORTS``, default 47000-47999).
"""

from __future__ import annotations

import logging
import os
import uuid
from typing import Mapping, Sequence

import numpy as np
import ray

from ..updaters.groups import as_groups, assign_groups
from .checkpoints import format as ckpt
from .checkpoints import server_state
from .checkpoints import state_dict
from .checkpoints import storage
from . import transport
from .credentials import RunCredentials
from .data_server import parse_ports
from .faults import NO_FAULTS
from .handle_identity import HandleIdentity
from .layout import ParameterLayout
from .protocol import PullRequest, PushMessage
from .remote_errors import unwrap
from .row_table_calls import RowTableCalls
from .row_tables import split_sparse
from .shard_actor import ShardActor
from .shard_spec import InitialState, ShardOptions, ShardSpec
from .shard_state import TICK
from .sync_steps import HISTORY_BYTES
from .validation import check_initial_params, check_server_config

DEFAULT_MAX_IN_FLIGHT = 128  # pushes per shard not yet acknowledged before push() waits (and 64 MiB of them)
DEFAULT_DATA_PORTS = "47000-47999"
_embedded = {"started": False}  # did this process start the Ray it runs on (an embedded local one)?


def ensure_ray(address: str | None = None) -> None:
    """Connect to ``address`` (or ``RAY_ADDRESS``) if given, else start an embedded Ray sized to the machine."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, logging_level="WARNING")
    else:  # "local": always a new embedded instance, never a cluster that happens to run on this machine
        # its token authentication is on by default and needs nothing from the user: no warning about it
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        ray.init(address="local", logging_level="WARNING", include_dashboard=False)
        _embedded["started"] = True


def data_plane_host(data_host: str | None) -> str | None:
    """The address shards bind (None: each shard's node address); see the module docstring."""
    host = data_host or os.environ.get("RAYPS_DATA_HOST") or None
    if host is None and _embedded["started"]:
        host = "127.0.0.1"
    if host is not None and (not isinstance(host, str) or host in ("0.0.0.0", "*", "::")):
        raise ValueError(f"data_host must be one address of this node (not every interface), got {host!r}")
    return host


def _nbytes(payload) -> int:
    return int(sum(a.nbytes for a in payload.values())) if payload else 0


class ParameterServer(HandleIdentity, RowTableCalls):
    """Sharded parameters plus DL4J updater state on Ray actors. See the module docstring.

    ``initial_state`` (keyword only): an ``InitialState`` (server/shard_spec.py), the updater state and
    iteration count of every dense parameter and the stored rows of row tables to start from instead of fresh
    ones; ``restore`` makes one from a checkpoint."""

    def __init__(self, params: Mapping[str, np.ndarray], updater=None, num_shards: int = 1,
                 consistency: str = "async", staleness: int = 0, num_workers: int = 1, *,
                 nan_policy: str = "reject", address: str | None = None, cpus_per_shard: float = 0.0,
                 checkpoint_dir=None, checkpoint_every: int = 100,
                 sync_timeout: float | None = None, max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
                 pull_timeout: float | None = 300.0, recovery_timeout: float = 120.0,
                 placement=None, sparse=None, compression: str = "none", encrypt: bool = False,
                 data_host: str | None = None, data_ports=None, initial_state: InitialState | None = None,
                 history_bytes: int = HISTORY_BYTES, flush_denormals: bool = True):
        from ..updaters import Adam  # noqa: PLC0415

        check_server_config(num_shards=num_shards, consistency=consistency, staleness=staleness,
                            num_workers=num_workers, nan_policy=nan_policy)
        if checkpoint_dir is not None and (isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int)
                                           or checkpoint_every < 1):
            raise ValueError(f"checkpoint_every must be an integer >= 1 (updates per shard), got {checkpoint_every!r}")
        if isinstance(history_bytes, bool) or not isinstance(history_bytes, int) or history_bytes < 0:
            raise ValueError(f"history_bytes must be an integer >= 0 (bytes a shard keeps of earlier steps), "
                             f"got {history_bytes!r}")
        if not isinstance(flush_denormals, bool):
            raise ValueError(f"flush_denormals must be True or False, got {flush_denormals!r}")
        params, self.tables, table_arrays = split_sparse(params, sparse)
        self.table_arrays = set(table_arrays)
        if params or not self.tables:
            params = check_initial_params(params)
        self.groups = as_groups(Adam() if updater is None else updater)
        group_of = assign_groups(self.groups, list(params) + list(self.tables))
        shapes = {n: tuple(a.shape) for n, a in params.items()}
        dtypes = {n: str(a.dtype) for n, a in params.items()}
        self.layout = ParameterLayout.build(shapes, dtypes, num_shards, {n: group_of[n] for n in params})
        if initial_state is not None:
            initial_state.check(shapes, {n: len(self.groups[group_of[n]].updater.state_keys) for n in params},
                                self.tables)
        for name, t in self.tables.items():  # a cap needs at least one row per shard
            t.check_shards(name, num_shards)
        row_specs = [{"name": name, "num_rows": int(t.num_rows), "dim": int(t.dim), "dtype": str(np.dtype(t.dtype)),
                      "group": group_of[name], "initial": table_arrays.get(name, t.initial), "num_shards": num_shards,
                      "admission": t.admission, "eviction": t.eviction}
                     for name, t in self.tables.items()]
        self.config = {"num_shards": num_shards, "consistency": consistency, "staleness": staleness,
                       "num_workers": num_workers, "nan_policy": nan_policy,
                       "compression": transport.check_mode(compression),  # push encoding: server/transport.py
                       "flush_denormals": flush_denormals}
        # a local path, a URI (s3://, gs://, file://) or (pyarrow.fs.FileSystem, path): checkpoints/storage.py
        self.checkpoint_dir = None if checkpoint_dir is None else storage.directory(checkpoint_dir)
        if isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int) or max_in_flight < 1:
            raise ValueError(f"max_in_flight must be an integer >= 1 (pushes per shard), got {max_in_flight!r}")
        self.max_in_flight = int(max_in_flight)
        self.pull_timeout = pull_timeout
        self.recovery_timeout = recovery_timeout
        ports = parse_ports(data_ports if data_ports is not None else
                            os.environ.get("RAYPS_DATA_PORTS", DEFAULT_DATA_PORTS))
        self.credentials = RunCredentials.new(encrypt)
        ensure_ray(address)
        host = data_plane_host(data_host)
        if self.checkpoint_dir:
            ckpt.write_manifest(self.checkpoint_dir, server_state.manifest_for(self))
        # the parameters change on the shard's data-plane thread only (shard_actor.py), whatever Ray's threads
        actor_options = {"num_cpus": cpus_per_shard, "max_restarts": -1 if self.checkpoint_dir else 0}
        self._shard_actors = []
        updater_state = initial_state.updater_state if initial_state is not None else None
        # what the shards are built from (server/shard_spec.py) goes through refs this handle keeps: Ray re-runs
        # the constructor when it restarts a shard, and an argument it had put in the store itself may be gone
        self._init_refs = [ray.put(ShardOptions(
            groups=self.groups, consistency=consistency, staleness=staleness, num_workers=num_workers,
            nan_policy=nan_policy, sync_timeout=sync_timeout, checkpoint_dir=self.checkpoint_dir,
            checkpoint_every=checkpoint_every, row_tables=tuple(row_specs),
            row_states=(initial_state.table_rows or None) if initial_state is not None else None,
            data_host=host, data_ports=ports, history_bytes=history_bytes, flush_denormals=flush_denormals))]
        for shard in range(num_shards):
            shard_options = dict(actor_options, **(placement.options_for(shard) if placement is not None else {}))
            spec = ShardSpec(shard_index=shard, pieces=self.layout.shard_pieces[shard],
                             buffers=self.layout.pack(shard, params)[0],
                             piece_states=None if not updater_state else
                             server_state.piece_states(self.layout, shard, updater_state),
                             kernel_threads=max(1, int(shard_options.get("num_cpus") or 0)))  # the shard's CPUs
            self._init_refs.append(ray.put(spec))
            self._shard_actors.append(ShardActor.options(**shard_options).remote(
                self._init_refs[-1], self._init_refs[0], credentials=self.credentials))
        self._owner = True
        self.run_id = uuid.uuid4().hex  # names the workers' identities of this run (``as_worker``)
        self.worker = None  # the worker identity this handle pushes as (``as_worker``)
        self.faults = NO_FAULTS  # tests: where a process dies (``inject_faults``, server/faults.py)
        self.data_route = None  # (route, resend_after) of ``route_data_plane``
        self._new_identity()
        try:  # constructor errors surface here
            ray.get([actor.ping.remote() for actor in self._shard_actors])
        except Exception as error:  # noqa: BLE001
            self.shutdown()
            raise unwrap(error) from None

    @property
    def shard_actors(self) -> list:
        return list(self._shard_actors)

    @property
    def names(self) -> tuple[str, ...]:
        return self.layout.names

    @property
    def bytes_pushed(self) -> int:
        """Bytes this handle pushed, all shards, as sent (encoded: after ``compression``); resends not counted."""
        return self._links.bytes_pushed

    @property
    def recoveries(self) -> int:
        """Times this handle recovered a restarted shard (replayed to it)."""
        return self._links.recoveries

    # -- push --------------------------------------------------------------------------------------------
    def _messages(self, grads: Mapping[str, np.ndarray], rows=None, own: bool = False) -> list:
        """Per shard: (shard, payload, present, factors, rows), encoded for transport. Every check runs before
        anything is sent, so a bad push changes no shard (``PushPlan``). ``own``: arrays the caller may change
        while the message is still on its way are copied."""
        compression = self.config["compression"]
        messages = self._plan.messages(grads, rows, own=own and compression == "none")  # encoding copies anyway
        if compression == "none":
            return messages
        return transport.encode_messages(messages, self.config["compression"], self._encoders)

    def push(self, grads: Mapping[str, np.ndarray], worker_id: int = 0, epoch: int = 0, rows=None, *,
             copy: bool = True) -> None:
        """Send ``grads`` (and ``rows``: table -> (ids, row grads)) to the shards and return at once; errors
        surface on ``flush()``/``pull()``. One push is one clock tick of ``worker_id``. The caller may change
        its arrays once this returns (the push keeps its own copies while it is in flight), unless ``copy=False``:
        then the push is sent from the caller's arrays, which must stay unchanged until ``flush()`` returns (a
        push may be resent until it is acknowledged; with a ``checkpoint_dir`` pushes are always copied, since
        they are kept for replay)."""
        messages = self._messages(grads, rows, own=copy)  # validates everything before anything is sent
        self.seq = seq = self.seq + 1
        for sent, (shard, payload, present, factors, shard_rows) in enumerate(messages, 1):
            self._links.push(shard, PushMessage(0, self.client_id, seq, worker_id, epoch, payload, present, factors,
                                                shard_rows))
            self._fault_point("client.sent", seq, sent=sent)
        self._fault_point("client.before_ack", seq)

    def _fault_point(self, point: str, seq: int, **event) -> None:
        """Tests: die here if the installed ``FaultPlan`` says so (server/faults.py); nothing when none is."""
        if self.faults:
            self.faults.hit(point, lambda: self._links.settle(seq), worker=self.worker, seq=seq, **event)

    def tick(self, worker_id: int = 0, epoch: int = 0) -> None:
        """Advance ``worker_id``'s clock on every shard without a gradient (a step with nothing to push);
        keeps SSP and BSP accounting aligned."""
        self.seq = seq = self.seq + 1
        for shard in range(self.layout.num_shards):
            self._links.push(shard, PushMessage(0, self.client_id, seq, worker_id, epoch, {}, TICK))
            self._fault_point("client.sent", seq, sent=shard + 1)
        self._fault_point("client.before_ack", seq)

    def flush(self) -> None:
        """Block until every push issued by this handle is acknowledged; raise the first error among them."""
        self._links.flush()

    # -- pull --------------------------------------------------------------------------------------------
    def pull(self, names: Sequence[str] | None = None, worker_id: int | None = None, *,
             copy: bool = True, at_seq: int | None = None) -> dict[str, np.ndarray]:
        """The parameters in their original shapes and dtypes. Sees every earlier push of this handle; with
        ``worker_id`` in ssp/sync mode it waits as the consistency model requires.

        ``copy=True``: caller-owned writeable arrays. ``copy=False``: read-only arrays, views of the received
        buffers where a parameter is one piece (no copy at all), else freshly assembled. ``at_seq`` (sync mode,
        with ``worker_id``; see ``as_worker``): the parameters on which this handle's push ``at_seq + 1`` is
        computed, from every shard, also one that already applied that push."""
        if at_seq is not None and (isinstance(at_seq, bool) or not isinstance(at_seq, int) or at_seq < 0
                                   or worker_id is None):
            raise ValueError(f"at_seq must be an integer >= 0 and comes with a worker_id, got {at_seq!r}")
        wanted = list(self.layout.names) if names is None else [names] if isinstance(names, str) else list(names)
        unknown = [n for n in wanted if n not in self.layout.shapes and n not in self.tables]
        if unknown:
            raise ValueError(f"pull: unknown parameter name(s) {unknown}")
        table_names = [n for n in wanted if n in self.tables]
        wanted = [n for n in wanted if n not in self.tables]
        requests = {}
        if wanted or names is None:
            whole = names is None
            shards = range(self.layout.num_shards) if whole or worker_id is not None else self.layout.shards_of(wanted)
            wanted_set = set(wanted)
            for shard in shards:
                pieces = None if whole else [p.index for p in self.layout.shard_pieces[shard] if p.name in wanted_set]
                requests[shard] = pieces
        rids = {shard: self._links.request(shard, PullRequest(0, self.client_id, self.seq, worker_id, pieces,
                                                               timeout=self.pull_timeout, at_seq=at_seq))
                for shard, pieces in requests.items()}
        out = {n: self._whole_table(n) for n in table_names}
        if rids:
            replies = self._links.wait(list(rids.values()))
            received = {shard: replies[rid].params for shard, rid in rids.items()}
            self.bytes_pulled += sum(_nbytes(buffers) for buffers in received.values())
            out.update(self.layout.assemble(received, wanted, copy, requests))
        self.flush()  # surfaces the problems of this handle's pushes
        return out

    def push_pull(self, grads: Mapping[str, np.ndarray], worker_id: int = 0, epoch: int = 0, rows=None, *,
                  copy: bool = True) -> dict:
        """A push and the pull after it, fused into one message per shard (the worker loop's step). ``copy`` as
        in ``pull``. The push's arrays are sent as they are: this call returns once every shard answered."""
        messages = self._messages(grads, rows, own=False)
        self.seq = seq = self.seq + 1
        links = self._links
        rids = {}
        for sent, (shard, payload, present, factors, shard_rows) in enumerate(messages, 1):
            rids[shard] = links.push(shard, PushMessage(0, self.client_id, seq, worker_id, epoch, payload, present,
                                                        factors, shard_rows, pull_worker=worker_id, pull=True,
                                                        timeout=self.pull_timeout), wait_reply=True)
            self._fault_point("client.sent", seq, sent=sent)
        self._fault_point("client.before_ack", seq)
        replies = links.wait(list(rids.values()))
        received = {shard: replies[rid].params for shard, rid in rids.items()}
        self.bytes_pulled += sum(_nbytes(buffers) for buffers in received.values())
        links.raise_errors()
        return self.layout.assemble(received, self.layout.names, copy)

    def checkpoint_shards(self) -> None:
        """With a ``checkpoint_dir``: every shard writes a checkpoint now, holding every push it has applied (this
        handle's pushes are flushed first). ``train`` calls it at its end: the workers' handles, which keep
        their pushes for replay until a checkpoint holds them, end with the run, so a shard that restarts
        later must not need them. Without a ``checkpoint_dir``: nothing to do."""
        self.flush()
        if self.checkpoint_dir:
            self._ask_all("checkpoint_now", self.client_id)

    def worker_clock(self, worker_id: int) -> int:
        """How many pushes ``worker_id`` has made (as shard 0 counts them): where a restarted worker resumes."""
        return self._links.ask(0, "worker_clock", worker_id)

    def _ask_all(self, method: str, *args) -> list:
        return self._links.ask_all(method, *args)

    # -- checkpoints (server/checkpoints/) ---------------------------------------------------------------
    def save(self, path) -> None:
        """Write a checkpoint directory: every shard's params, updater state, counters and clocks, plus a
        manifest with names, shapes, dtypes, the updater/group config and a sha256 per blob. ``path``: a local
        path, a URI (``s3://``, ``gs://``, ``file://``) or ``(pyarrow.fs.FileSystem, path)``."""
        server_state.save(self, path)

    @classmethod
    def restore(cls, path, num_shards: int | None = None, **overrides) -> "ParameterServer":
        """A new server from a checkpoint directory (``save``'s, or a ``checkpoint_dir``), into any shard
        count; ``overrides`` replace constructor arguments (e.g. ``consistency``, ``num_workers``)."""
        return cls.from_state_dict(server_state.load(path), num_shards, **overrides)

    def state_dict(self) -> dict:
        """What ``save`` writes, as one in-memory map by name (server/checkpoints/state_dict.py): params,
        updater state per slot and iteration, row tables, the updater/group config and the server config.
        NumPy arrays and plain msgpack types (``state_dict.to_bytes``); never pickled."""
        return server_state.state_dict(self)

    @classmethod
    def from_state_dict(cls, state: dict, num_shards: int | None = None, **overrides) -> "ParameterServer":
        """A new server holding ``state`` (``state_dict``'s map), into any shard count; every field is checked
        first (errors name it). ``overrides`` replace constructor arguments as in ``restore``."""
        args = state_dict.server_args(state)
        args["num_shards"] = num_shards or args["num_shards"]
        args.update(overrides)
        return cls(args.pop("params"), **args)

    def shard_snapshots(self, since_by_shard=None) -> list:
        """Every shard's snapshot record (server/checkpoints/shard.py), msgpack-able; ``since_by_shard[shard]``:
        table -> ``(epoch, version)`` a table's record may be a delta of (None: whole tables)."""
        return self._links.ask_all("snapshot_record", since_by_shard)

    # -- housekeeping ------------------------------------------------------------------------------------
    def stats(self) -> dict:
        """Per-shard counters plus totals: updates applied, bytes, staleness, restarts, replays."""
        shards = self._ask_all("stats")
        total = {key: sum(s[key] for s in shards) for key in ("bytes_pushed", "bytes_pulled", "duplicates_dropped",
                                                               "restarts", "checkpoints_written",
                                                               "late_pushes_dropped", "replays_received",
                                                               "resume_reads_inexact", "pushes_batched",
                                                               "pushes_shared", "reads_shared")}
        return {
            "shards": shards,
            "num_shards": len(shards),
            "updates_applied": min(s["updates_applied"] for s in shards),
            "pushes": max(s["pushes"] for s in shards),
            "max_staleness": max(s["max_staleness"] for s in shards),
            "max_clock_gap": max(s["max_clock_gap"] for s in shards),
            "nonfinite_skipped": max(s["nonfinite_skipped"] for s in shards),
            "nonfinite_rejected": max(s["nonfinite_rejected"] for s in shards),
            "sync_steps_forced": max(s["sync_steps_forced"] for s in shards),
            "replayed": total["replays_received"],
            "recoveries": self.recoveries,
            "recovery_causes": dict(self._links.recovery_causes),
            "replay_buffered": self._links.buffered(),
            "layout": self.layout.describe(),
            **total,
            **self.config,
        }

    def shutdown(self) -> None:
        """Close this handle's connections; kill the shard actors (only the handle that created them)."""
        links = self.__dict__.get("_links")
        if links is not None:
            links.close()
        if not self._owner:
            return
        for actor in self._shard_actors:
            ray.kill(actor, no_restart=True)
        self._shard_actors = []
        self._init_refs = []
        self._owner = False
