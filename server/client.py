"""``ParameterServer``: the client handle — the public API of rayps.

    ps = ParameterServer(params, updater=Adam(...), num_shards=2, consistency="async")
    ps.push(grads, worker_id=0)      # returns at once; one message per shard, straight to the shards
    ps.flush()                       # every push this handle issued is applied (errors raised here)
    ps.pull(names=None)              # caller-owned arrays; sees this handle's earlier pushes
    ps.save(path); ParameterServer.restore(path, num_shards=None)
    ps.stats(); ps.shutdown()

The handle is serializable: a worker actor that receives it gets its own client identity (a fresh
``client_id`` and sequence counter) and talks to the shard actors directly, never through the driver.

With ``checkpoint_dir``, shards checkpoint every ``checkpoint_every`` updates and Ray restarts a dead shard,
which restores its checkpoint; the handle keeps each push until a checkpoint holds it and replays what a
restarted shard lacks, so no update is lost or applied twice.
"""

from __future__ import annotations

import collections
import os
import time
import uuid
from typing import Mapping, Sequence

import numpy as np
import ray

from ..updaters.groups import as_groups, assign_groups
from . import checkpoint as ckpt
from . import persistence
from .layout import ParameterLayout
from .remote_errors import unwrap
from .replay import ReplayBuffer
from .row_tables import RowTable, check_rows, route, split_sparse
from . import transport
from .shard_actor import ShardActor, ShardRestarted
from .shard_state import TICK
from .validation import check_gradients, check_initial_params, check_server_config

DEFAULT_MAX_IN_FLIGHT = 4  # pushes per shard not yet acknowledged before push() waits
ACTOR_LOST = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)


def ensure_ray(address: str | None = None) -> None:
    """Connect to ``address`` (or ``RAY_ADDRESS``) if given, else start an embedded Ray sized to the machine."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, logging_level="WARNING")
    else:  # "local": always a new embedded instance, never a cluster that happens to run on this machine
        ray.init(address="local", logging_level="WARNING", include_dashboard=False)


def _nbytes(payload) -> int:
    return int(sum(a.nbytes for a in payload.values())) if payload else 0


class ParameterServer:
    """Sharded parameters plus DL4J updater state on Ray actors. See the module docstring."""

    def __init__(self, params: Mapping[str, np.ndarray], updater=None, num_shards: int = 1,
                 consistency: str = "async", staleness: int = 0, num_workers: int = 1, *,
                 nan_policy: str = "reject", address: str | None = None, cpus_per_shard: float = 0.0,
                 checkpoint_dir: str | os.PathLike | None = None, checkpoint_every: int = 100,
                 sync_timeout: float | None = None, max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
                 pull_timeout: float | None = 300.0, recovery_timeout: float = 120.0,
                 placement=None, sparse=None, compression: str = "none", _named_state=None, _named_rows=None):
        from ..updaters import Adam  # noqa: PLC0415

        check_server_config(num_shards, consistency, staleness, num_workers, nan_policy)
        if checkpoint_dir is not None and (isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int)
                                           or checkpoint_every < 1):
            raise ValueError(f"checkpoint_every must be an integer >= 1 (updates per shard), got {checkpoint_every!r}")
        params, self.tables, table_arrays = split_sparse(params, sparse)
        self.table_arrays = set(table_arrays)
        if params or not self.tables:
            params = check_initial_params(params)
        self.groups = as_groups(Adam() if updater is None else updater)
        group_of = assign_groups(self.groups, list(params) + list(self.tables))
        shapes = {n: tuple(a.shape) for n, a in params.items()}
        dtypes = {n: str(a.dtype) for n, a in params.items()}
        self.layout = ParameterLayout.build(shapes, dtypes, num_shards, {n: group_of[n] for n in params})
        row_specs = [{"name": name, "num_rows": int(t.num_rows), "dim": int(t.dim), "dtype": str(np.dtype(t.dtype)),
                      "group": group_of[name], "initial": table_arrays.get(name, t.initial), "num_shards": num_shards}
                     for name, t in self.tables.items()]
        self.config = {"num_shards": num_shards, "consistency": consistency, "staleness": staleness,
                       "num_workers": num_workers, "nan_policy": nan_policy,
                       "compression": transport.check_mode(compression)}  # push encoding: server/transport.py
        self.checkpoint_dir = None if checkpoint_dir is None else os.path.abspath(checkpoint_dir)
        self.max_in_flight = int(max_in_flight)
        self.pull_timeout = pull_timeout
        self.recovery_timeout = recovery_timeout
        ensure_ray(address)
        if self.checkpoint_dir:
            ckpt.write_manifest(self.checkpoint_dir, persistence.manifest_for(self))
        options = {"num_cpus": cpus_per_shard, "max_concurrency": 1000,
                   "max_restarts": -1 if self.checkpoint_dir else 0}
        self._shard_actors = []
        for shard in range(num_shards):
            shard_options = dict(options, **(placement.options_for(shard) if placement is not None else {}))
            states = None if _named_state is None else persistence.piece_states(self.layout, shard, _named_state)
            self._shard_actors.append(ShardActor.options(**shard_options).remote(
                shard, self.layout.shard_pieces[shard], self.groups, self.layout.pack(shard, params)[0],
                consistency, staleness, num_workers, nan_policy, self.checkpoint_dir, checkpoint_every, states,
                sync_timeout, row_specs, _named_rows))
        self._owner = True
        self._new_identity()
        try:  # constructor errors surface here
            self._incarnations = ray.get([actor.ping.remote() for actor in self._shard_actors])
        except Exception as error:  # noqa: BLE001
            self.shutdown()
            raise unwrap(error) from None

    # -- identity and pickling ---------------------------------------------------------------------------
    def _new_identity(self) -> None:
        self.client_id = uuid.uuid4().hex
        self.seq = 0
        self._in_flight = [collections.deque() for _ in self._shard_actors]
        self._replay = [ReplayBuffer() for _ in self._shard_actors] if self.checkpoint_dir else None
        self.bytes_pushed = 0
        self.bytes_pulled = 0
        self.replayed = 0
        self.recoveries = 0
        self._incarnations = [None] * len(self._shard_actors)  # learnt from the first acknowledgement
        self._normalizes = any(g.gradient_normalization != "None" for g in self.groups)
        self._encoders = {}  # shard -> ThresholdEncoder (compression="threshold"): this identity's residuals

    def __getstate__(self):
        state = dict(self.__dict__)
        for key in ("client_id", "seq", "_in_flight", "_replay", "bytes_pushed", "bytes_pulled", "replayed",
                    "recoveries", "_incarnations", "_encoders"):
            state.pop(key, None)
        state["_owner"] = False
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._new_identity()

    @property
    def shard_actors(self) -> list:
        return list(self._shard_actors)

    @property
    def names(self) -> tuple[str, ...]:
        return self.layout.names

    # -- push --------------------------------------------------------------------------------------------
    def _messages(self, grads: Mapping[str, np.ndarray], rows=None) -> list:
        """Per shard: (shard, payload, present, factors, rows) — one flat array per dtype per shard, and the
        rows of each row-sparse table that the shard owns.

        Every check runs before anything is sent, so a bad push changes no shard. A non-finite gradient
        raises (nan_policy "reject") or becomes a payload of ``None`` that only ticks the clocks ("skip").
        """
        if isinstance(grads, Mapping):
            sparse = [n for n in grads if n in self.tables]
            if sparse:
                raise ValueError(f"grads[{sparse[0]!r}]: {sparse[0]!r} is a row-sparse table: use "
                                 f"push_rows({sparse[0]!r}, ids, grads) or push(..., rows=...)")
        if rows:
            if isinstance(grads, Mapping) and not grads:
                grads = {}
            else:
                grads = check_gradients(grads, self.layout.shapes, self.layout.dtypes)
        else:
            grads = check_gradients(grads, self.layout.shapes, self.layout.dtypes)
        shard_rows, nonfinite_rows = self._route_rows(rows)
        factors = self._normalization_factors(grads) if self._normalizes else None
        messages = []
        nonfinite = None
        for shard in range(self.layout.num_shards):
            payload, present = self.layout.pack(shard, grads)
            if nonfinite is None and not all(np.isfinite(a).all() for a in payload.values()):
                nonfinite = next(n for n, g in grads.items() if not np.isfinite(g).all())
            shard_factors = None
            if factors:
                shard_factors = {p.name: factors[p.name] for p in self.layout.shard_pieces[shard]
                                 if p.name in factors}
            messages.append((shard, payload, present, shard_factors, shard_rows[shard]))
        nonfinite = nonfinite or nonfinite_rows
        if nonfinite is not None:
            if self.config["nan_policy"] == "reject":
                raise ValueError(f"grads[{nonfinite!r}] contains NaN or Inf (nan_policy='reject'; "
                                 f"use nan_policy='skip' to drop such pushes)")
            messages = [(shard, None, None, None, None) for shard in range(self.layout.num_shards)]
        return transport.encode_messages(messages, self.config["compression"], self._encoders)

    def _route_rows(self, rows) -> tuple[list, str | None]:
        """Per shard: {table: (ids, grads)} of the rows it owns; and the first table with non-finite grads."""
        per_shard = [None] * self.layout.num_shards
        if not rows:
            return per_shard, None
        if not isinstance(rows, Mapping):
            raise TypeError(f"rows must map a table name to (ids, grads), got {type(rows).__name__}")
        per_shard = [{} for _ in range(self.layout.num_shards)]
        nonfinite = None
        for name, part in rows.items():
            if name not in self.tables:
                kind = "dense: use push()" if name in self.layout.shapes else "not a parameter"
                raise ValueError(f"push_rows: {name!r} is {kind}")
            if not isinstance(part, tuple) or len(part) != 2:
                raise TypeError(f"rows[{name!r}] must be a tuple (ids, grads)")
            ids, grads = check_rows(name, self.tables[name], *part)
            if nonfinite is None and not np.isfinite(grads).all():
                nonfinite = name
            grads = grads.astype(self.tables[name].dtype, copy=False)
            for shard, positions in enumerate(route(ids, self.layout.num_shards)):
                per_shard[shard][name] = (ids[positions], grads[positions])
        return per_shard, nonfinite

    def _normalization_factors(self, grads) -> dict[str, tuple[float, float]]:
        group_of = assign_groups(self.groups, self.layout.names)
        factors = {}
        for index, group in enumerate(self.groups):
            members = {n: g for n, g in grads.items() if group_of[n] == index}
            if members and group.gradient_normalization != "None":
                factors.update(group.normalization_factors(members))
        return factors

    def push(self, grads: Mapping[str, np.ndarray], worker_id: int = 0, epoch: int = 0, rows=None) -> None:
        """Send ``grads`` (and ``rows``: table -> (ids, row grads)) to the shards and return at once; errors
        surface on ``flush()``/``pull()``. One push is one clock tick of ``worker_id``."""
        messages = self._messages(grads, rows)  # validates everything before anything is sent
        self.seq += 1
        for shard, payload, present, factors, shard_rows in messages:
            self._wait_for_room(shard)
            message = (worker_id, payload, present, factors, epoch, shard_rows)
            if self._replay is not None:
                self._replay[shard].add(self.seq, message)
            ref = self._shard_actors[shard].push.remote(self.client_id, self.seq, *message)
            self._in_flight[shard].append((self.seq, ref))
            self.bytes_pushed += transport.message_nbytes(payload, shard_rows)

    def tick(self, worker_id: int = 0, epoch: int = 0) -> None:
        """Advance ``worker_id``'s clock on every shard without a gradient (a step with nothing to push);
        keeps SSP and BSP accounting aligned."""
        self.seq += 1
        for shard in range(self.layout.num_shards):
            self._wait_for_room(shard)
            message = (worker_id, {}, TICK, None, epoch, None)
            if self._replay is not None:
                self._replay[shard].add(self.seq, message)
            self._in_flight[shard].append((self.seq, self._shard_actors[shard].push.remote(
                self.client_id, self.seq, *message)))

    def _wait_for_room(self, shard: int) -> None:
        queue = self._in_flight[shard]
        if len(queue) >= self.max_in_flight:
            oldest = [queue.popleft() for _ in range(len(queue) - self.max_in_flight + 1)]
            self._settle(shard, oldest)

    def _settle(self, shard: int, entries, depth: int = 0) -> None:
        """Wait for the acknowledgements of ``entries`` (seq, ref) sent to ``shard``; recover a restarted
        shard; raise the first push error as its original exception type."""
        first_error, lost = None, False
        for _seq, ref in entries:
            try:
                ack = ray.get(ref)
            except ACTOR_LOST:
                lost = True
                continue
            except Exception as error:  # noqa: BLE001 - unwrapped and re-raised below
                first_error = first_error or unwrap(error)
                continue
            lost = self._note_ack(shard, ack) or lost
        if lost:
            self._recover(shard, depth)
        if first_error is not None:
            raise first_error

    def _note_ack(self, shard: int, ack) -> bool:
        """Trim the replay buffer; True when the ack comes from a new incarnation of the shard (a restart)."""
        if not ack:
            return False
        known = self._incarnations[shard]
        if known is None:
            self._incarnations[shard] = ack["incarnation"]
        elif known != ack["incarnation"]:
            return True
        if self._replay is not None:
            self._replay[shard].trim(ack["covered"])
        return False

    def _recover(self, shard: int, depth: int = 0) -> None:
        """Wait for a restarted shard, then resend every push its checkpoint lacks."""
        if self._replay is None:
            raise RuntimeError(f"shard {shard} was lost and the server has no checkpoint_dir, so its state is "
                               f"gone; start ParameterServer with checkpoint_dir=... to survive shard failures")
        if depth > 8:
            raise RuntimeError(f"shard {shard} keeps failing during recovery")
        actor = self._shard_actors[shard]
        deadline = time.monotonic() + self.recovery_timeout
        while True:
            try:
                applied, incarnation = ray.get(actor.recovery_info.remote(self.client_id), timeout=10)
                break
            except (*ACTOR_LOST, ray.exceptions.GetTimeoutError) as error:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"shard {shard} did not come back within {self.recovery_timeout}s") from error
                time.sleep(0.2)
        self._incarnations[shard] = incarnation
        self.recoveries += 1
        resent = [(seq, actor.push.remote(self.client_id, seq, *message, True))
                  for seq, message in self._replay[shard].after(applied)]
        self._in_flight[shard] = collections.deque(e for e in self._in_flight[shard] if e[0] <= applied)
        self._settle(shard, resent, depth + 1)

    def flush(self) -> None:
        """Block until every push issued by this handle is applied; raise the first error among them."""
        first_error = None
        for shard, queue in enumerate(self._in_flight):
            entries = list(queue)
            queue.clear()
            try:
                self._settle(shard, entries)
            except (ValueError, TypeError) as error:
                first_error = first_error or error
        if first_error is not None:
            raise first_error

    # -- pull --------------------------------------------------------------------------------------------
    def pull(self, names: Sequence[str] | None = None, worker_id: int | None = None) -> dict[str, np.ndarray]:
        """Fresh arrays in the original shapes and dtypes. Sees every earlier push of this handle; with
        ``worker_id`` in ssp/sync mode it waits as the consistency model requires."""
        wanted = list(self.layout.names) if names is None else [names] if isinstance(names, str) else list(names)
        unknown = [n for n in wanted if n not in self.layout.shapes and n not in self.tables]
        if unknown:
            raise ValueError(f"pull: unknown parameter name(s) {unknown}")
        self.flush()  # surfaces push errors and replays to restarted shards before reading
        tables = {n: self._whole_table(n) for n in wanted if n in self.tables}
        wanted = [n for n in wanted if n not in tables]
        if names is not None and not wanted:
            return tables
        whole = names is None
        shards = range(self.layout.num_shards) if whole or worker_id is not None else self.layout.shards_of(wanted)
        wanted_set = set(wanted)
        out = {n: np.empty(self.layout.shapes[n], dtype=self.layout.dtypes[n]) for n in wanted}
        requests = {}
        for shard in shards:
            pieces = None if whole else [p.index for p in self.layout.shard_pieces[shard] if p.name in wanted_set]
            requests[shard] = (self._pull_ref(shard, worker_id, pieces), pieces)
        for shard, (ref, pieces) in requests.items():
            buffers = self._get_pulled(shard, ref, worker_id, pieces)
            self.bytes_pulled += _nbytes(buffers)
            self.layout.unpack_into(shard, buffers, out, pieces)
        out.update(tables)
        return out

    # -- row-sparse tables -------------------------------------------------------------------------------
    def push_rows(self, name: str, ids, grads, worker_id: int = 0, epoch: int = 0) -> None:
        """Push gradients for rows ``ids`` of table ``name`` (duplicate ids are summed before the update)."""
        self.push({}, worker_id=worker_id, epoch=epoch, rows={name: (ids, grads)})

    def pull_rows(self, name: str, ids) -> np.ndarray:
        """Rows ``ids`` of table ``name``, in the order asked; sees this handle's earlier pushes."""
        if name not in self.tables:
            kind = "dense: use pull()" if name in self.layout.shapes else "not a parameter"
            raise ValueError(f"pull_rows: {name!r} is {kind}")
        ids, _ = check_rows(name, self.tables[name], ids)
        self.flush()
        table = self.tables[name]
        out = np.empty((len(ids), table.dim), dtype=table.dtype)
        for shard, positions in enumerate(route(ids, self.layout.num_shards)):
            if len(positions):
                out[positions] = self._ask_fresh(shard, "pull_rows", name, ids[positions])
        self.bytes_pulled += int(out.nbytes)
        return out

    def _ask_fresh(self, shard: int, method: str, *args):
        """A read that must see this handle's pushes: waits for them, recovers a restarted shard."""
        return self._get_recovering(shard, lambda: getattr(self._shard_actors[shard], method).remote(
            self.client_id, self.seq, *args, self.pull_timeout, self._incarnations[shard]), method)

    def _get_recovering(self, shard: int, make_ref, what: str, attempts: int = 8):
        """``ray.get(make_ref())``; after a lost or restarted shard, recover it (replay) and ask again."""
        ref = make_ref()
        for _ in range(attempts):
            try:
                return ray.get(ref)
            except ACTOR_LOST:
                pass
            except Exception as error:  # noqa: BLE001
                error = unwrap(error)
                if not isinstance(error, ShardRestarted):
                    raise error from None
            self._recover(shard)
            ref = make_ref()
        raise RuntimeError(f"shard {shard} kept restarting during {what}()")

    def _whole_table(self, name: str) -> np.ndarray:
        table = self.tables[name]
        out = np.empty(table.shape, dtype=table.dtype)
        for ids, rows in self._ask_all("materialize", name):
            out[ids] = rows
        self.bytes_pulled += int(out.nbytes)
        return out

    def _pull_ref(self, shard, worker_id, pieces):
        return self._shard_actors[shard].pull.remote(self.client_id, self.seq, worker_id, pieces, self.pull_timeout,
                                                     self._incarnations[shard])

    def _get_pulled(self, shard, ref, worker_id, pieces):
        first = [ref]  # the pull already in flight is used once, then re-asked after each recovery
        return self._get_recovering(
            shard, lambda: first.pop() if first else self._pull_ref(shard, worker_id, pieces), "pull")

    def push_pull(self, grads: Mapping[str, np.ndarray], worker_id: int = 0, epoch: int = 0, rows=None) -> dict:
        """A push and the pull after it, fused into one call per shard (the worker loop's step)."""
        messages = self._messages(grads, rows)
        self.flush()
        self.seq += 1
        refs = []
        for shard, payload, present, factors, shard_rows in messages:
            message = (worker_id, payload, present, factors, epoch, shard_rows)
            if self._replay is not None:
                self._replay[shard].add(self.seq, message)
            refs.append(self._shard_actors[shard].push_pull.remote(self.client_id, self.seq, *message,
                                                                   self.pull_timeout, self._incarnations[shard]))
            self.bytes_pushed += transport.message_nbytes(payload, shard_rows)
        out = {n: np.empty(self.layout.shapes[n], dtype=self.layout.dtypes[n]) for n in self.layout.names}
        errors = []
        for shard, ref in enumerate(refs):
            try:
                buffers, error, ack = ray.get(ref)
                restarted = self._note_ack(shard, ack)
            except ACTOR_LOST:
                restarted = True
            except Exception as exc:  # noqa: BLE001
                exc = unwrap(exc)
                if not isinstance(exc, ShardRestarted):
                    raise exc from None
                restarted = True
            if restarted:  # replay what the restarted shard lacks (this push included), then read
                self._recover(shard)
                buffers, error = self._get_pulled(shard, self._pull_ref(shard, worker_id, None), worker_id, None), None
            if error:
                errors.append(error)
            self.bytes_pulled += _nbytes(buffers)
            self.layout.unpack_into(shard, buffers, out)
        if errors:
            raise ValueError("; ".join(errors))
        return out

    def worker_clock(self, worker_id: int) -> int:
        """How many pushes ``worker_id`` has made (as shard 0 counts them): where a restarted worker resumes."""
        return self._ask(0, "worker_clock", worker_id)

    def _ask(self, shard: int, method: str, *args):
        """A read-only call to one shard, repeated (after the shard's recovery) if the shard restarts."""
        for _ in range(8):
            try:
                return ray.get(getattr(self._shard_actors[shard], method).remote(*args))
            except ACTOR_LOST:
                if self._replay is None:
                    raise
                self._recover(shard)
        raise RuntimeError(f"shard {shard} kept restarting during {method}()")

    def _ask_all(self, method: str, *args) -> list:
        refs = [getattr(actor, method).remote(*args) for actor in self._shard_actors]
        out = []
        for shard, ref in enumerate(refs):
            try:
                out.append(ray.get(ref))
            except ACTOR_LOST:
                if self._replay is None:
                    raise
                out.append(self._ask(shard, method, *args))
        return out

    # -- checkpoints -------------------------------------------------------------------------------------
    def save(self, path) -> None:
        """Write a checkpoint directory: every shard's params, updater state, counters and clocks, plus a
        manifest with names, shapes, dtypes, the updater/group config and a sha256 per blob."""
        persistence.save(self, path)

    @classmethod
    def restore(cls, path, num_shards: int | None = None, **overrides) -> "ParameterServer":
        """A new server from a checkpoint directory (``save``'s, or a ``checkpoint_dir``), into any shard
        count; ``overrides`` replace constructor arguments (e.g. ``consistency``, ``num_workers``)."""
        loaded = persistence.load(path)
        config = dict(loaded["config"])
        allowed = {"consistency", "staleness", "num_workers", "nan_policy", "compression"}
        config = {k: v for k, v in config.items() if k in allowed}
        config.update(overrides)
        params = dict(loaded["params"], **loaded["tables"])
        return cls(params, updater=list(loaded["groups"]), num_shards=num_shards or loaded["num_shards"],
                   sparse=list(loaded["tables"]) or None, _named_state=loaded["named_state"],
                   _named_rows=loaded["table_rows"] or None, **config)

    # -- housekeeping ------------------------------------------------------------------------------------
    def stats(self) -> dict:
        """Per-shard counters plus totals: updates applied, bytes, staleness, restarts, replays."""
        shards = self._ask_all("stats")
        total = {key: sum(s[key] for s in shards) for key in ("bytes_pushed", "bytes_pulled", "duplicates_dropped",
                                                               "restarts", "checkpoints_written",
                                                               "late_pushes_dropped", "replays_received")}
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
            "replay_buffered": sum(len(r) for r in self._replay) if self._replay else 0,
            "layout": self.layout.describe(),
            **total,
            **self.config,
        }

    def shutdown(self) -> None:
        """Kill the shard actors (only the handle that created them does this)."""
        if not self._owner:
            return
        for actor in self._shard_actors:
            ray.kill(actor, no_restart=True)
        self._shard_actors = []
        self._owner = False
