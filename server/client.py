"""``ParameterServer``: the client handle — the public API of rayps.

    ps = ParameterServer(params, updater=Adam(...), num_shards=2, consistency="async")
    ps.push(grads, worker_id=0)      # returns at once; one message per shard, straight to the shards
    ps.flush()                       # every push this handle issued is applied (errors raised here)
    ps.pull(names=None)              # caller-owned arrays; sees this handle's earlier pushes
    ps.stats(); ps.shutdown()

The handle is serializable: a worker actor that receives it gets its own client identity (a fresh
``client_id`` and sequence counter) and talks to the shard actors directly, never through the driver.
"""

from __future__ import annotations

import collections
import os
import uuid
from typing import Mapping, Sequence

import numpy as np
import ray

from ..updaters.groups import as_groups, assign_groups
from .layout import ParameterLayout
from .remote_errors import unwrap
from .shard_actor import ShardActor
from .validation import check_gradients, check_initial_params, check_server_config

DEFAULT_MAX_IN_FLIGHT = 4  # pushes per shard not yet acknowledged before push() waits


def ensure_ray(address: str | None = None) -> None:
    """Connect to ``address`` (or ``RAY_ADDRESS``) if given, else start an embedded Ray sized to the machine."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, logging_level="WARNING", log_to_driver=True)
    else:
        ray.init(logging_level="WARNING", include_dashboard=False)


def _nbytes(payload) -> int:
    return int(sum(a.nbytes for a in payload.values())) if payload else 0


class ParameterServer:
    """Sharded parameters plus DL4J updater state on Ray actors. See the module docstring."""

    def __init__(self, params: Mapping[str, np.ndarray], updater=None, num_shards: int = 1,
                 consistency: str = "async", staleness: int = 0, num_workers: int = 1, *,
                 nan_policy: str = "reject", address: str | None = None, cpus_per_shard: float = 0.0,
                 max_in_flight: int = DEFAULT_MAX_IN_FLIGHT, pull_timeout: float | None = 300.0):
        from ..updaters import Adam  # noqa: PLC0415

        check_server_config(num_shards, consistency, staleness, num_workers, nan_policy)
        params = check_initial_params(params)
        self.groups = as_groups(Adam() if updater is None else updater)
        group_of = assign_groups(self.groups, list(params))
        shapes = {n: tuple(a.shape) for n, a in params.items()}
        dtypes = {n: str(a.dtype) for n, a in params.items()}
        self.layout = ParameterLayout.build(shapes, dtypes, num_shards, group_of)
        self.config = {"num_shards": num_shards, "consistency": consistency, "staleness": staleness,
                       "num_workers": num_workers, "nan_policy": nan_policy}
        self.max_in_flight = int(max_in_flight)
        self.pull_timeout = pull_timeout
        ensure_ray(address)
        self._shard_actors = [
            ShardActor.options(num_cpus=cpus_per_shard, max_concurrency=1000).remote(
                shard, self.layout.shard_pieces[shard], self.groups, self.layout.pack(shard, params)[0],
                consistency, staleness, num_workers, nan_policy)
            for shard in range(num_shards)]
        self._owner = True
        self._new_identity()
        ray.get([actor.ping.remote() for actor in self._shard_actors])  # constructor errors surface here

    # -- identity and pickling ---------------------------------------------------------------------------
    def _new_identity(self) -> None:
        self.client_id = uuid.uuid4().hex
        self.seq = 0
        self._in_flight = [collections.deque() for _ in self._shard_actors]
        self.bytes_pushed = 0
        self.bytes_pulled = 0
        self._normalizes = any(g.gradient_normalization != "None" for g in self.groups)

    def __getstate__(self):
        state = dict(self.__dict__)
        for key in ("client_id", "seq", "_in_flight", "bytes_pushed", "bytes_pulled"):
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
    def _messages(self, grads: Mapping[str, np.ndarray]) -> list:
        """Per shard: (shard, payload, present, factors) — one flat array per dtype per shard.

        Every check runs before anything is sent, so a bad push changes no shard. A non-finite gradient
        raises (nan_policy "reject") or becomes a payload of ``None`` that only ticks the clocks ("skip").
        """
        grads = check_gradients(grads, self.layout.shapes, self.layout.dtypes)
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
            messages.append((shard, payload, present, shard_factors))
        if nonfinite is not None:
            if self.config["nan_policy"] == "reject":
                raise ValueError(f"grads[{nonfinite!r}] contains NaN or Inf (nan_policy='reject'; "
                                 f"use nan_policy='skip' to drop such pushes)")
            messages = [(shard, None, None, None) for shard in range(self.layout.num_shards)]
        return messages

    def _normalization_factors(self, grads) -> dict[str, tuple[float, float]]:
        group_of = assign_groups(self.groups, self.layout.names)
        factors = {}
        for index, group in enumerate(self.groups):
            members = {n: g for n, g in grads.items() if group_of[n] == index}
            if members and group.gradient_normalization != "None":
                factors.update(group.normalization_factors(members))
        return factors

    def push(self, grads: Mapping[str, np.ndarray], worker_id: int = 0, epoch: int = 0) -> None:
        """Send ``grads`` to the shards and return at once; errors surface on ``flush()``/``pull()``."""
        messages = self._messages(grads)  # validates everything before anything is sent
        self.seq += 1
        for shard, payload, present, factors in messages:
            self._wait_for_room(shard)
            ref = self._shard_actors[shard].push.remote(self.client_id, self.seq, worker_id, payload, present,
                                                         factors, epoch)
            self._in_flight[shard].append(ref)
            self.bytes_pushed += _nbytes(payload)

    def _wait_for_room(self, shard: int) -> None:
        queue = self._in_flight[shard]
        while len(queue) >= self.max_in_flight:
            self._settle([queue.popleft()])

    @staticmethod
    def _settle(refs) -> None:
        """Wait for acknowledgements; raise the first remote error as its original exception type."""
        first_error = None
        for ref in refs:
            try:
                ray.get(ref)
            except Exception as error:  # noqa: BLE001 - unwrapped and re-raised below
                first_error = first_error or unwrap(error)
        if first_error is not None:
            raise first_error

    def flush(self) -> None:
        """Block until every push issued by this handle is applied; raise the first error among them."""
        refs = [ref for queue in self._in_flight for ref in queue]
        for queue in self._in_flight:
            queue.clear()
        self._settle(refs)

    # -- pull --------------------------------------------------------------------------------------------
    def pull(self, names: Sequence[str] | None = None, worker_id: int | None = None) -> dict[str, np.ndarray]:
        """Fresh arrays in the original shapes and dtypes. Sees every earlier push of this handle; with
        ``worker_id`` in ssp/sync mode it waits as the consistency model requires."""
        if names is None:
            wanted = list(self.layout.names)
        else:
            if isinstance(names, str):
                names = [names]
            wanted = list(names)
            unknown = [n for n in wanted if n not in self.layout.shapes]
            if unknown:
                raise ValueError(f"pull: unknown parameter name(s) {unknown}")
        shards = range(self.layout.num_shards) if names is None or worker_id is not None else \
            self.layout.shards_of(wanted)
        wanted_set = set(wanted)
        refs = {}
        for shard in shards:
            pieces = None if names is None else \
                [p.index for p in self.layout.shard_pieces[shard] if p.name in wanted_set]
            refs[shard] = (self._shard_actors[shard].pull.remote(self.client_id, self.seq, worker_id, pieces,
                                                                  self.pull_timeout), pieces)
        out = {n: np.empty(self.layout.shapes[n], dtype=self.layout.dtypes[n]) for n in wanted}
        for shard, (ref, pieces) in refs.items():
            try:
                buffers = ray.get(ref)
            except Exception as error:  # noqa: BLE001
                raise unwrap(error) from None
            self.bytes_pulled += int(sum(a.nbytes for a in buffers.values()))
            self.layout.unpack_into(shard, buffers, out, pieces)
        self.flush()  # every earlier push is acknowledged by now: surface its error, if any
        return out

    def push_pull(self, grads: Mapping[str, np.ndarray], worker_id: int = 0, epoch: int = 0) -> dict:
        """A push and the pull after it, fused into one call per shard (the worker loop's step)."""
        messages = self._messages(grads)
        self.flush()
        self.seq += 1
        refs = []
        for shard, payload, present, factors in messages:
            refs.append(self._shard_actors[shard].push_pull.remote(
                self.client_id, self.seq, worker_id, payload, present, factors, epoch, self.pull_timeout))
            self.bytes_pushed += _nbytes(payload)
        out = {n: np.empty(self.layout.shapes[n], dtype=self.layout.dtypes[n]) for n in self.layout.names}
        errors = []
        for shard, ref in enumerate(refs):
            try:
                buffers, error = ray.get(ref)
            except Exception as exc:  # noqa: BLE001
                raise unwrap(exc) from None
            if error:
                errors.append(error)
            self.bytes_pulled += int(sum(a.nbytes for a in buffers.values()))
            self.layout.unpack_into(shard, buffers, out)
        if errors:
            raise ValueError("; ".join(errors))
        return out

    # -- housekeeping ------------------------------------------------------------------------------------
    def stats(self) -> dict:
        """Per-shard counters plus totals: updates applied, bytes, the largest staleness seen."""
        shards = ray.get([actor.stats.remote() for actor in self._shard_actors])
        return {
            "shards": shards,
            "num_shards": len(shards),
            "updates_applied": min(s["updates_applied"] for s in shards),
            "pushes": max(s["pushes"] for s in shards),
            "bytes_pushed": sum(s["bytes_pushed"] for s in shards),
            "bytes_pulled": sum(s["bytes_pulled"] for s in shards),
            "max_staleness": max(s["max_staleness"] for s in shards),
            "max_clock_gap": max(s["max_clock_gap"] for s in shards),
            "duplicates_dropped": sum(s["duplicates_dropped"] for s in shards),
            "nonfinite_skipped": max(s["nonfinite_skipped"] for s in shards),
            "nonfinite_rejected": max(s["nonfinite_rejected"] for s in shards),
            "layout": self.layout.describe(),
            **self.config,
        }

    def shutdown(self) -> None:
        """Kill the shard actors (only the handle that created them does this)."""
        if not self._owner:
            return
        for actor in self._shard_actors:
            ray.kill(actor)
        self._shard_actors = []
        self._owner = False
