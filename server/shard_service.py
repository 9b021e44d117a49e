"""``ShardService``: one shard's side of the data-plane protocol — typed messages in, typed replies out.

Plain logic over ``ShardState`` (no sockets, no Ray, no threads), so tests drive it message by message. The
shard's data-plane thread (server/data_server.py) decodes a message, calls ``handle(peer, message, now)``
and sends the replies it returns; ``expire(now)`` runs when the socket has been quiet until
``next_deadline()``. Only that thread calls these, so the parameters change on one thread.

* A push (``PushMessage``) is applied through ``ShardState.push`` (exactly-once by ``(client_id, seq)``; a
  batch through ``ShardState.push_batch``, as if each of its pushes had come alone) and always acknowledged
  (``Ack``: the seq (a batch's last), the client's last applied seq, the last one a checkpoint covers, and
  this process's incarnation), with the problems of the pushes it applied (``errors``). A push addressed to
  another incarnation (the client knew an earlier process) is rejected ``restarted`` without being applied:
  the client recovers and replays it.
* A read (``PullRequest``, ``RowsRequest``, or the ``pull`` of a fused push) is answered at once when it is
  ready (read-your-writes after ``after_seq``, then SSP/BSP gating), else it waits here, keyed by
  ``(peer, client, rid)`` (a resent request replaces the one waiting), until a change makes it ready or its
  ``timeout`` passes (``Rejection`` ``timeout``). A fused push whose pull must wait is acknowledged at once
  with ``waiting=True``; the parameters follow under the same request id.
* A restarted worker (sync mode) reads the parameters of the step its next push is computed on, which a shard
  that already applied that push keeps in ``ShardState.history`` (see ``_read_at``): on its first read, which
  says so (``at_seq``), and on every read while it recomputes pushes this shard already has (its ``after_seq``
  is behind what the shard applied for it). Each push reports the client's low water (what every shard's
  checkpoint holds), which bounds the steps a shard keeps (server/sync_steps.py).
* Sync mode's dead-worker policy: when reads wait and nothing changed for ``sync_timeout`` seconds, the
  waiting step is applied with the workers that pushed (``ShardState.force_sync_step``).

A whole-parameter read returns the LIVE buffers (no copy): the data-plane thread sends them without copying
and waits until ZeroMQ has handed them to the kernel before it applies the next push. A client on this node
with shared memory (``regions``, server/shared_regions.py) names a down slot instead: the parameters are copied
there and the reply names them (``Reply.region``). A push read from the client's up slot that must wait for an
earlier one is copied out of the slot first (the client reuses a slot once the push is acknowledged).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .protocol import Ack, PullRequest, PushMessage, Rejection, Reply, RowsRequest
from .shard_state import ShardState

MAX_PENDING = 1024  # early pushes one client may have waiting for a gap before it is told "overloaded"


def is_plain_ack(reply) -> bool:
    """A push's acknowledgement and nothing else (no problems, no read, not a fused pull waiting)."""
    return (isinstance(reply, Reply) and reply.ack is not None and not reply.errors and reply.params is None
            and reply.ids is None and reply.rows is None and not reply.waiting)


def coalesce_acks(replies: list) -> list:
    """``replies`` (``(peer, reply)`` in order) less the plain acknowledgements a later one to the same peer
    covers: acknowledgements are cumulative (the client takes ``ack.applied`` as every push up to it applied),
    so of a run of pushes a shard handled together one ``Ack`` answers all those at or below the last one's
    ``applied``; an acknowledgement of a push still waiting for a gap (its seq above that) is kept, and so is
    every other reply, in order."""
    last: dict = {}
    for position, (peer, reply) in enumerate(replies):
        if is_plain_ack(reply):
            last[peer] = position
    if not last:
        return replies
    out = []
    for position, (peer, reply) in enumerate(replies):
        final = last.get(peer)
        if (final is not None and position < final and is_plain_ack(reply)
                and reply.ack.seq <= replies[final][1].ack.applied
                and reply.ack.incarnation == replies[final][1].ack.incarnation):
            continue
        out.append((peer, reply))
    return out


@dataclass
class WaitingRead:
    peer: bytes
    request: PullRequest | RowsRequest
    deadline: float | None
    ack: Ack | None = None
    errors: list | None = None


class ShardService:
    def __init__(self, state: ShardState, incarnation: str, sync_timeout: float | None = None):
        self.state = state
        self.incarnation = incarnation
        self.sync_timeout = sync_timeout
        self.covered: dict[str, int] = {}  # client -> last seq a finished checkpoint holds (set by the actor)
        self.waiting: dict[tuple, WaitingRead] = {}
        self.regions: dict = {}  # client -> ShardRegions: shared memory with a client on this node (the actor's)
        self.last_change = 0.0
        self.changed = False  # set by a call that changed the state (the actor then checkpoints, reports)

    # -- messages --------------------------------------------------------------------------------------------
    def handle(self, peer: bytes, message, now: float) -> list[tuple[bytes, object]]:
        """The replies to ``message`` from ``peer`` (and to reads it made ready)."""
        self.changed = False
        if isinstance(message, PushMessage):
            out = self._push(peer, message, now)
        elif isinstance(message, (PullRequest, RowsRequest)):
            out = self._read_request(peer, message, now)
        else:
            out = [(peer, Rejection(message.rid, "malformed", "kind", f"a shard takes push, pull and rows "
                                                                      f"messages, not {message.kind!r}"))]
        if self.changed:
            self.last_change = now
            out += self._answer_ready()
        return out

    def _restarted(self, message) -> Rejection | None:
        if message.incarnation is not None and message.incarnation != self.incarnation:
            return Rejection(message.rid, "restarted", "incarnation",
                             f"shard {self.state.shard_index} restarted since this client last heard from it")
        return None

    def _push(self, peer, message: PushMessage, now: float) -> list:
        state = self.state
        rejected = self._restarted(message)
        if (rejected is None and state.pending_count(message.client_id) >= MAX_PENDING
                and message.seq > state.applied_seq.get(message.client_id, 0) + 1):  # the gap's filler is taken
            rejected = Rejection(message.rid, "overloaded", "seq", f"more than {MAX_PENDING} pushes of this client "
                                                                    f"wait for an earlier one")
        if rejected is not None:
            return [(peer, rejected)]
        if message.shared and type(message.payload) is dict and message.seq > state.applied_seq.get(
                message.client_id, 0) + 1:  # it waits for an earlier push: out of the client's slot first
            message.payload = {dtype: np.array(array) for dtype, array in message.payload.items()}
        if message.replayed:
            state.counters["replays_received"] += 1
        state.report_low_water(message.client_id, message.worker_id, message.low_water)
        if message.count == 1:
            outcome = state.push(message.client_id, message.seq, message.worker_id, message.payload,
                                 message.present, message.factors, message.epoch, message.rows)
        else:  # a batch: as if each of its pushes had come alone (server/push_batches.py)
            outcome = state.push_batch(message.client_id, message.seq, message.worker_id, message.payload,
                                       message.count, message.epoch)
        self.changed = outcome.received > 0
        ack = self.ack(message.client_id, message.seq + message.count - 1)
        if not message.pull:
            return [(peer, Reply(message.rid, ack, outcome.errors))]
        read = PullRequest(message.rid, message.client_id, message.seq, message.pull_worker, None,
                           message.incarnation, message.timeout, slot=message.slot, token=message.token)
        return self._read(peer, read, now, ack, outcome.errors)

    def ack(self, client_id: str, seq: int) -> Ack:
        return Ack(seq, self.state.applied_seq.get(client_id, 0), self.covered.get(client_id, 0), self.incarnation)

    def _read_request(self, peer, request, now: float) -> list:
        rejected = self._restarted(request)
        if rejected is not None:
            return [(peer, rejected)]
        return self._read(peer, request, now, None, [])

    def _read(self, peer, request, now: float, ack, errors) -> list:
        problem = self._check_read(request)
        if problem is not None:
            return [(peer, problem)]
        reply = self._try_read(request, ack, errors)
        if reply is not None:
            self.waiting.pop((peer, request.client_id, request.rid), None)
            return [(peer, reply)]
        deadline = None if request.timeout is None else now + request.timeout
        self.waiting[(peer, request.client_id, request.rid)] = WaitingRead(peer, request, deadline, ack, errors)
        return [(peer, Reply(request.rid, ack, errors, waiting=True))] if ack is not None else []

    def _check_read(self, request) -> Rejection | None:
        state = self.state
        if isinstance(request, PullRequest):
            if request.pieces is not None and any(i >= len(state.pieces) for i in request.pieces):
                return Rejection(request.rid, "malformed", "pieces", f"piece indices below {len(state.pieces)}")
        elif request.table not in state.row_tables:
            return Rejection(request.rid, "malformed", "table",
                             f"shard {state.shard_index}: {request.table!r} is not a row-sparse table")
        return None

    def _try_read(self, request, ack, errors) -> Reply | Rejection | None:
        """The read's reply if it may be answered now, else None."""
        state = self.state
        worker = request.worker_id if isinstance(request, PullRequest) else None
        if worker is not None and state.consistency == "sync" and (
                request.at_seq is not None or state.applied_seq.get(request.client_id, 0) > request.after_seq):
            return self._read_at(request, ack, errors)
        if not state.pull_ready(request.client_id, request.after_seq, worker):
            return None
        if isinstance(request, PullRequest):
            params = state.read(request.pieces, worker, copy=False)  # whole: the live buffers; pieces: packed
            regions = self.regions.get(request.client_id) if request.slot is not None else None
            if regions is not None and request.pieces is None and request.token == regions.token:
                shared = regions.write_params(request.slot, request.rid, params)
                if shared is not None:
                    return Reply(request.rid, ack, errors or [], params=shared, region=regions.down)
            return Reply(request.rid, ack, errors or [], params=params)
        try:
            if request.ids is None:
                ids, rows = state.row_tables[request.table].materialize()
                state.counters["bytes_pulled"] += int(rows.nbytes)
                return Reply(request.rid, ack, errors or [], ids=ids, rows=rows)
            return Reply(request.rid, ack, errors or [], rows=state.read_rows(request.table, request.ids))
        except (TypeError, ValueError) as error:
            return Rejection(request.rid, "malformed", "ids", str(error))

    def _read_at(self, request: PullRequest, ack, errors) -> Reply | Rejection | None:
        """A restarted worker's read in sync mode: the parameters of the step its push ``at_seq + 1`` (or, while
        it recomputes pushes this shard already applied, ``after_seq + 1``) is computed on
        (``ShardState.step_of``), once this shard reached that step: the live parameters or a step kept in
        ``ShardState.history``; a step no longer kept gets the live parameters, counted in
        ``resume_reads_inexact`` (the recomputed gradient is then exactly-once but not bit-identical)."""
        state = self.state
        if state.applied_seq.get(request.client_id, 0) < request.after_seq:
            return None
        at_seq = request.after_seq if request.at_seq is None else request.at_seq
        step = state.step_of(request.client_id, request.worker_id, at_seq)
        if state.sync_clock < step:
            return None
        params = state.read_at(step, request.pieces, copy=False)
        if params is None:  # dropped, or from before this shard's restart: the live ones
            state.counters["resume_reads_inexact"] += 1
            params = state.read(request.pieces, None, copy=False)
        state.pulled_version[request.worker_id] = state.version
        return Reply(request.rid, ack, errors or [], params=params)

    def _answer_ready(self) -> list:
        out = []
        for key, read in list(self.waiting.items()):
            reply = self._try_read(read.request, read.ack, read.errors)
            if reply is not None:
                del self.waiting[key]
                out.append((read.peer, reply))
        return out

    # -- time ------------------------------------------------------------------------------------------------
    def next_deadline(self) -> float | None:
        """When ``expire`` has something to do (None: nothing waits)."""
        if not self.waiting:
            return None
        deadlines = [r.deadline for r in self.waiting.values() if r.deadline is not None]
        if self._forcing():
            deadlines.append(self.last_change + self.sync_timeout)
        return min(deadlines) if deadlines else None

    def _forcing(self) -> bool:
        return self.state.consistency == "sync" and bool(self.sync_timeout) and bool(self.waiting)

    def expire(self, now: float) -> list:
        """Reads whose timeout passed get a ``timeout`` rejection; in sync mode a step stuck for
        ``sync_timeout`` is forced and the reads it unblocks are answered."""
        self.changed = False
        out = []
        if self._forcing() and now - self.last_change >= self.sync_timeout:
            if self.state.force_sync_step():
                self.changed = True
                self.last_change = now
                out += self._answer_ready()
            else:
                self.last_change = now  # nothing to force (no worker pushed this step): wait another period
        state = self.state
        for key, read in list(self.waiting.items()):
            if read.deadline is not None and now >= read.deadline:
                del self.waiting[key]
                worker = getattr(read.request, "worker_id", None)
                out.append((read.peer, Rejection(
                    read.request.rid, "timeout", "timeout",
                    f"shard {state.shard_index}: pull by worker {worker} waited {read.request.timeout}s; clocks "
                    f"{state.clocks}, sync step {state.sync_clock}, consistency {state.consistency!r} "
                    f"(is a worker dead or num_workers too large?)")))
        return out
