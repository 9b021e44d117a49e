"""``HandleIdentity``: who a ``ParameterServer`` handle is on the data plane — a part of the handle
(server/client.py), split out by concept.

* Each handle (and each copy of it unpickled in a worker) gets its own client identity and sequence numbers
  (``_new_identity``), its own connections to the shards (``ShardLinks``) and push plan; pickling drops them.
* ``as_worker``: the identity of worker ``w`` of this run, the same in every process that runs it, so a
  restarted worker resumes where the shards say and they drop what they already have.
* ``inject_faults`` (tests, server/faults.py) and ``route_data_plane`` (a proxy or tunnel) travel with the
  handle into its copies.
"""

from __future__ import annotations

import uuid

import numpy as np
import ray

from .faults import FaultPlan
from .push_plan import PushPlan
from .shard_links import ShardLinks
from .shared_regions import SHARED_FROM_BYTES


class HandleIdentity:
    """The identity part of ``ParameterServer`` (see the module docstring)."""

    def _new_identity(self, client_id: str | None = None) -> None:
        self.client_id = client_id or uuid.uuid4().hex
        self.seq = 0
        self._links = ShardLinks(self._shard_actors, self.client_id, credentials=self.credentials,
                                 window=self.max_in_flight, recovery_timeout=self.recovery_timeout,
                                 replay=bool(self.checkpoint_dir))
        self._links.faults, self._links.worker = self.faults, self.worker
        self._links.large = [sum(n * np.dtype(d).itemsize for d, n in sizes.items()) >= SHARED_FROM_BYTES
                             for sizes in self.layout.buffer_sizes]  # the shards that offer shared memory
        route, resend_after = self.data_route or (None, None)
        self._links.route = route
        if resend_after is not None:
            self._links.resend_after = resend_after
        # a push kept for replay must own its arrays; encoded ones (compression) always do
        own = bool(self.checkpoint_dir) and self.config["compression"] == "none"
        self._plan = PushPlan(self.layout, self.groups, self.tables, self.config["nan_policy"], own_payloads=own)
        links = self._links.links
        self._plan.shared_buffers = lambda shard: links[shard].regions  # packs large pushes into shared memory
        self.bytes_pulled = 0
        self._encoders = {}  # shard -> ThresholdEncoder (compression="threshold"): this identity's residuals

    def __getstate__(self):
        state = dict(self.__dict__)
        for key in ("client_id", "seq", "_links", "_plan", "bytes_pushed", "bytes_pulled", "_encoders", "_init_refs"):
            state.pop(key, None)
        state["_owner"] = False
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._new_identity()

    def as_worker(self, worker_id: int) -> int:
        """From now on push as worker ``worker_id`` of this run: one identity (``<run_id>.w<worker_id>``) in
        every process that runs that worker, so a restarted worker's pushes are told apart from new ones. Its
        sequence goes on from the smallest number of its pushes any shard applied, which is returned: the steps
        to resume after. A shard that applied more drops the pushes it has (exactly once per shard); in sync
        mode ``pull(..., at_seq=that number)`` reads the parameters those pushes were computed on."""
        if isinstance(worker_id, bool) or not isinstance(worker_id, int) or worker_id < 0:
            raise ValueError(f"worker_id must be an integer >= 0, got {worker_id!r}")
        if self.seq or self._links.pending or any(link.unacked for link in self._links.links):
            raise RuntimeError("as_worker must come before this handle's first push")
        self._links.close()
        self.worker = worker_id
        self._new_identity(f"{self.run_id}.w{worker_id}")
        shards = range(self.layout.num_shards)
        if self.checkpoint_dir and any(self._links.applied(shard) for shard in shards):
            # a restart: the pushes the dead process kept for replay died with it, so every shard first makes a
            # checkpoint cover what it applied (a later restart of it then needs none of them)
            for shard in shards:
                self._links.ask(shard, "checkpoint_now", self.client_id)
        self.seq = min(self._links.applied(shard) for shard in shards)
        return self.seq

    def catch_up(self) -> int:
        """Replay to the shards that restarted while this handle was idle and wait for their acknowledgements;
        how many it recovered (``ShardLinks.catch_up``). The driver asks each worker that finished its epoch
        while others still run (worker/epochs.py): an idle handle would not notice a restart by itself."""
        return self._links.catch_up()

    def inject_faults(self, plan: FaultPlan) -> None:
        """Tests: install ``plan`` (server/faults.py) in this handle, the handles made from it (workers) and
        the shards, so a process dies at a chosen point (once)."""
        if not isinstance(plan, FaultPlan):
            raise TypeError(f"plan must be a FaultPlan, got {type(plan).__name__}")
        self.faults = self._links.faults = plan
        ray.get([actor.inject_faults.remote(plan) for actor in self._shard_actors])

    def route_data_plane(self, route, resend_after: float | None = None) -> None:
        """Connect this handle's data plane through ``route(shard, endpoint) -> endpoint`` (a proxy: fault
        injection in tests, a tunnel); ``resend_after``: seconds of silence before unanswered messages to an
        alive shard are sent again (default 5). Call before this handle's first push or pull. The handle keeps
        both: its worker identity (``as_worker``) and the handles made from it (pickled: ``route`` must pickle
        then, e.g. a worker's handle) connect the same way."""
        self.data_route = (route, None if resend_after is None else float(resend_after))
        self._links.route = route
        if resend_after is not None:
            self._links.resend_after = float(resend_after)
