"""``ShardLinks``: one client identity's data-plane connections to the shards, and exactly-once delivery over
them — the one client-side layer that sends, acknowledges, resends, replays and recovers.

One ZeroMQ DEALER socket per shard, connected to the endpoint the shard reports through Ray (``endpoint``:
address, incarnation, this client's last applied sequence number) and authenticated with the run's
credentials. Every message is a ``protocol`` type; every request carries a request id (``rid``) and the
shard incarnation this client knows.

* Small pushes travel in batches while the shard is busy (Nagle's rule, as TCP coalesces small segments): a
  plain push (``PushMessage.batchable``) to a shard that has sent pushes still unacknowledged waits in the
  link's ``held`` list; the held pushes go out as ONE message (``PushMessage.batch``) when they reach
  ``BATCH_PUSHES`` pushes or ``BATCH_BYTES``, when the first of them has waited ``LINGER`` seconds, when the
  shard has acknowledged every push sent (the link asks its socket at the 1st, 2nd, 4th, ... held push), or
  when this client sends that shard anything else or waits for anything. A push to an idle shard goes at once,
  alone. Held pushes count in the window and are kept for resending like any other (a resend or a replay sends
  them one by one); the shard applies a batch exactly as if each push had come alone. A held push leaves within
  ``LINGER`` seconds even if the caller makes no further call (``Linger``, server/push_linger.py: a thread
  that sleeps while nothing is held); the sockets are used under ``lock``, by one thread at a time.
* Pushes: at most ``window`` unacknowledged per shard, holding at most ``WINDOW_BYTES`` (a full window blocks
  the sender until acknowledgements bring it down to half: back-pressure, no unbounded queue; the pushes then
  go out in bursts, which the shard acknowledges with one cumulative ``Ack``). An unacknowledged push is kept to
  be resent; with a checkpoint directory every push is also kept until a finished checkpoint covers it
  (``ReplayBuffer``).
* Reads (pull, rows, the pull of a fused push) wait here for their reply; a push's rejected parts (a NaN
  gradient, a bad row) come back in its acknowledgement and are raised by the next ``flush``/read.
* Shared memory on the shard's node (server/shared_regions.py): a link connected over ``ipc://`` to a shard
  whose parameters are large asks it (through Ray) for two shared regions. A push whose payload ``PushPlan``
  packed into an up slot names the slot instead of carrying the bytes; a whole-parameter read names a free
  down slot, and its reply's arrays are views of that slot, kept in use while they live. A shard that no
  longer knows the regions rejects the message (field ``rg``): the link drops them and resends over the socket.
* Silence, restarts and control calls: ``LinkRecovery`` (server/link_recovery.py).
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field

import ray
import zmq

from .credentials import RunCredentials
from .faults import NO_FAULTS
from .link_recovery import LinkRecovery
from .push_linger import Linger
from .protocol import Ack, PushMessage, Rejection, Reply, from_frames, to_frames
from .replay import InFlight, ReplayBuffer
from .shared_memory_links import SharedMemoryLinks
from .shared_regions import LinkRegions
from .sockets import has_message, recv_frames, send_frames

BATCH_PUSHES = 32  # held pushes that go out as one message at once
BATCH_BYTES = 256 << 10  # ... or held array bytes; a push this large never waits
LINGER = 0.005  # seconds a held push may wait for more (then the next push, or the linger thread, sends it)
WINDOW_BYTES = 64 << 20  # the unacknowledged pushes' array bytes per shard before a push waits (one always goes)
LOOK_FIRST = 0.5  # seconds of silence before the first look at the shards (through Ray), then doubling ...
LOOK_MAX = 4.0  # ... up to this
NOBLOCK = int(zmq.NOBLOCK)  # a plain int: pyzmq's flags are enums, rebuilt on every use
RESEND_AFTER = 5.0  # seconds of silence before an alive shard is sent again what it has not answered


@dataclass
class Pending:
    """A request waiting for its reply."""

    shard: int
    message: object
    reply: Reply | None = None
    error: BaseException | None = None
    acked: bool = False  # a fused push's push part was acknowledged: resend only its pull
    slot: int | None = None  # the down slot its reply is written to (shared memory), if any

    @property
    def done(self) -> bool:
        return self.reply is not None or self.error is not None


@dataclass
class Link:
    socket: zmq.Socket | None = None
    endpoint: str | None = None
    incarnation: str | None = None
    unacked: InFlight = field(default_factory=InFlight)  # seq -> PushMessage, and their bytes
    replay: ReplayBuffer | None = None
    restarts_in_a_row: int = 0
    covered: int = 0  # this client's pushes the shard's last finished checkpoint holds (from its acks)
    held: list = field(default_factory=list)  # pushes waiting to go out in one batch (in ``unacked`` too)
    held_bytes: int = 0
    held_since: float = 0.0
    regions: LinkRegions | None = None  # shared memory with the shard (same node, large parameters)


class ShardLinks(LinkRecovery, SharedMemoryLinks):
    def __init__(self, actors, client_id: str, credentials: RunCredentials, window: int, recovery_timeout: float,
                 replay: bool):
        self.actors = actors
        self.client_id = client_id
        self.credentials = credentials
        self.window = max(1, int(window))
        self.recovery_timeout = recovery_timeout
        self.links = [Link(replay=ReplayBuffer() if replay else None) for _ in actors]
        self.keeps_replay = replay
        self.pending: dict[int, Pending] = {}
        self.errors: list[str] = []
        self.rid = 0
        self.recoveries = 0
        self.bytes_pushed = 0  # the pushes' bytes as sent (encoded), each push once
        self.recovery_causes = collections.Counter()
        self.route = None  # tests: route(shard, endpoint) -> the endpoint to connect to (e.g. a fault proxy)
        self.large = [True] * len(actors)  # per shard: large enough to ask for shared memory (set by the handle)
        self.faults = NO_FAULTS  # tests: where this process dies (server/faults.py)
        self.worker = None  # the worker identity of the handle (for the fault points)
        self.resend_after = RESEND_AFTER
        self.context = zmq.Context.instance()
        self.node_id = ray.get_runtime_context().get_node_id()
        self.poller = zmq.Poller()
        self.sockets: dict = {}  # socket -> shard
        self.lock = threading.RLock()  # the sockets: the caller's thread, or the linger thread, one at a time
        self.linger = Linger(self, LINGER)

    # -- connections -------------------------------------------------------------------------------------------
    def _discover(self, shard: int, timeout: float):
        """``[endpoint, incarnation, applied]`` from the shard's actor (Ray); the shard's same-node (ipc://)
        endpoint when this client runs on its node, unless a ``route`` (tests) wants the TCP one."""
        node = self.node_id if self.route is None else None
        return ray.get(self.actors[shard].endpoint.remote(self.client_id, node), timeout=timeout)

    def _open(self, shard: int, endpoint: str) -> None:
        link = self.links[shard]
        if link.socket is not None:
            self.poller.unregister(link.socket)
            del self.sockets[link.socket]
            link.socket.close(linger=0)
        socket = self.context.socket(zmq.DEALER)
        socket.linger = 0
        socket.sndhwm = socket.rcvhwm = 1000
        self.credentials.configure_client(socket)
        socket.connect(self.route(shard, endpoint) if self.route is not None else endpoint)
        link.socket, link.endpoint = socket, endpoint
        self.poller.register(socket, zmq.POLLIN)
        self.sockets[socket] = shard
        link.regions = self._map_regions(shard) if endpoint.startswith("ipc://") and self.large[shard] else None

    def connect(self, shard: int) -> None:
        """First contact with ``shard``: learn its endpoint and incarnation."""
        endpoint, incarnation, _applied = self._ask_actor(shard, lambda: self._discover(shard, 30))
        self.links[shard].incarnation = incarnation
        self._open(shard, endpoint)

    def applied(self, shard: int) -> int:
        """How many of this client's pushes ``shard`` has applied (asked through Ray)."""
        return int(self._ask_actor(shard, lambda: self._discover(shard, 30))[2])

    def close(self) -> None:
        with self.lock:
            self.linger.close()
            self.send_held()
            for link in self.links:
                if link.socket is not None:
                    link.socket.close(linger=0)
                    link.socket = None
            self.sockets.clear()
            self.poller = zmq.Poller()

    # -- sending -----------------------------------------------------------------------------------------------
    def _next_rid(self) -> int:
        self.rid += 1
        return self.rid

    def _send(self, shard: int, message) -> None:
        link = self.links[shard]
        if link.socket is None:
            self.connect(shard)
        message.incarnation = link.incarnation
        try:
            send_frames(link.socket, to_frames(message, None if link.regions is None else link.regions.up),
                        zmq.NOBLOCK)
        except zmq.Again:  # the queue to this shard is full: the silence handling resends it
            pass

    def push(self, shard: int, message: PushMessage, wait_reply: bool = False) -> int:
        """Send a push (``message.seq`` set by the caller), or hold it for a batch (module docstring); waits
        while the shard's window is full. With ``wait_reply`` (a fused push+pull) it is also a request: its rid,
        for ``wait``."""
        with self.lock:
            return self._push(shard, message, wait_reply)

    def _push(self, shard: int, message: PushMessage, wait_reply: bool) -> int:
        link = self.links[shard]
        if len(link.unacked) >= self.window or link.unacked.nbytes >= WINDOW_BYTES:  # full: until half empty
            self.pump(lambda: len(link.unacked) <= self.window // 2 and link.unacked.nbytes <= WINDOW_BYTES // 2)
        batchable = not wait_reply and message.batchable()
        held = len(link.held)
        if (batchable and held & (held - 1) == 0 and len(link.unacked) > held and link.socket is not None
                and has_message(link.socket)):
            self._drain(link.socket)  # acknowledgements that arrived (asked at 0, 1, 2, 4, ... held, while a
            # sent push is unacknowledged): is the shard still busy? (asking costs two system calls, as much as
            # the rest of a small push; with nothing sent unacknowledged it cannot be)
        message.rid = self._next_rid()
        message.low_water = self.low_water()
        link.unacked[message.seq] = message
        if link.replay is not None:
            link.replay.add(message.seq, message)
        if wait_reply:
            self.pending[message.rid] = Pending(shard, message, slot=self._down_slot(shard, message))
        nbytes = link.unacked.size_of(message.seq)
        self.bytes_pushed += nbytes
        if batchable and nbytes < BATCH_BYTES:
            self._hold(shard, link, message, nbytes)
        else:
            self._send_held(shard)
            self._send(shard, message)
        return message.rid

    def _hold(self, shard: int, link: Link, message: PushMessage, nbytes: int) -> None:
        """Add ``message`` to the link's held pushes; send them unless the shard is busy (pushes sent and not
        acknowledged) and the batch is neither full nor old."""
        held = link.held
        if held and (held[-1].worker_id != message.worker_id or held[-1].epoch != message.epoch
                     or held[-1].seq + 1 != message.seq or held[-1].payload.keys() != message.payload.keys()):
            self._send_held(shard)  # a batch holds consecutive pushes of one worker and epoch
            held = link.held
        busy = len(link.unacked) - len(held) > 1  # sent and unacknowledged, besides the held and this one
        if not held:
            link.held_since = time.monotonic()
            if busy:
                self.linger.arm()
        held.append(message)
        link.held_bytes += nbytes
        if (not busy or len(held) >= BATCH_PUSHES or link.held_bytes >= BATCH_BYTES
                or time.monotonic() - link.held_since >= LINGER):
            self._send_held(shard)

    def _send_held(self, shard: int) -> None:
        """Send the link's held pushes (one message: a batch, or the push alone)."""
        link = self.links[shard]
        held = link.held
        if not held:
            return
        link.held, link.held_bytes = [], 0
        self._send(shard, held[0] if len(held) == 1 else PushMessage.batch(held))

    def send_held(self, older_than: float = 0.0) -> None:
        """Send every link's held pushes (before this client waits for anything), or those whose first has
        waited ``older_than`` seconds (the linger thread)."""
        now = time.monotonic()
        for shard, link in enumerate(self.links):
            if link.held and now - link.held_since >= older_than:
                self._send_held(shard)

    def oldest_held(self) -> float | None:
        """When the oldest held batch began (``time.monotonic``), or None when nothing is held."""
        return min((link.held_since for link in self.links if link.held), default=None)

    def request(self, shard: int, message) -> int:
        """Send a read (after the pushes held for this shard); its rid, for ``wait``."""
        with self.lock:
            message.rid = self._next_rid()
            self.pending[message.rid] = Pending(shard, message, slot=self._down_slot(shard, message))
            self._send_held(shard)
            self._send(shard, message)
            return message.rid

    def wait(self, rids) -> dict[int, Reply]:
        """rid -> reply for ``rids``; raises the first error among them (TimeoutError, ValueError, ShardLost)."""
        entries = [self.pending[rid] for rid in rids]
        try:
            self.pump(lambda: all(entry.done for entry in entries))
        finally:
            for rid in rids:
                self.pending.pop(rid, None)
        for entry in entries:
            if entry.error is not None:
                raise entry.error
        return {rid: entry.reply for rid, entry in zip(rids, entries)}

    def flush(self) -> None:
        """Wait for every push's acknowledgement; raise the problems the shards reported."""
        self.pump(lambda: not any(link.unacked for link in self.links))
        self.raise_errors()

    def settle(self, seq: int) -> None:
        """Wait until every shard that was sent push ``seq`` acknowledged it (tests: server/faults.py)."""
        self.pump(lambda: not any(seq in link.unacked for link in self.links))

    def raise_errors(self) -> None:
        if self.errors:
            errors, self.errors = self.errors, []
            raise ValueError("; ".join(errors))

    # -- receiving ---------------------------------------------------------------------------------------------
    def pump(self, done) -> None:
        """Handle replies until ``done()``; on silence, look at the shards (see the module docstring)."""
        with self.lock:
            self._pump(done)

    def _pump(self, done) -> None:
        self.send_held()
        quiet = first = min(LOOK_FIRST, self.resend_after)  # a shorter resend_after looks sooner
        silent_since = resent_at = None
        while not done():
            ready = self.poller.poll(quiet * 1000)
            if ready:
                quiet, silent_since, resent_at = first, None, None
                for socket, _ in ready:
                    self._drain(socket)
                continue
            now = time.monotonic()
            silent_since = silent_since or now - quiet
            resend = now - (resent_at or silent_since) >= self.resend_after
            self._silence(now - silent_since, resend)
            if resend:
                resent_at = now
            quiet = min(quiet * 2, LOOK_MAX, self.resend_after)

    def _drain(self, socket) -> None:
        """Handle every message ``socket`` holds; called when it holds one (the poller or ``has_message`` said so,
        so the first is received without asking again: asking costs two system calls). Not blocking even so: a
        recovery while dispatching another socket's message may have drained this one since the poller said so."""
        shard = self.sockets.get(socket)
        if shard is None:
            return
        region_of = lambda header: self._reply_region(shard, header)  # noqa: E731 - for from_frames
        while True:
            try:
                frames = recv_frames(socket, NOBLOCK)
            except zmq.Again:
                return
            self._dispatch(shard, from_frames(frames, region_of))
            if self.sockets.get(socket) is None or not has_message(socket):  # reopened while dispatching (a
                return  # recovery), or nothing more

    def _dispatch(self, shard: int, message) -> None:
        link = self.links[shard]
        if isinstance(message, Rejection):
            self._rejected(shard, message)
            return
        if message.ack is not None:
            self._acknowledged(shard, link, message.ack)
        entry = self.pending.get(message.rid)
        if message.errors:
            self.errors.extend(message.errors)
        if entry is None or entry.shard != shard:
            return  # an answer to a request resent meanwhile, or already given up
        if message.waiting:
            entry.acked = True
        else:
            entry.reply = message

    def _acknowledged(self, shard: int, link: Link, ack: Ack) -> None:
        if link.incarnation is None:
            link.incarnation = ack.incarnation
        elif ack.incarnation != link.incarnation:
            return  # from a process this client no longer talks to
        unacked = link.unacked
        unacked.pop(ack.seq, None)
        while unacked and next(iter(unacked)) <= ack.applied:  # cumulative: every push up to ``applied`` is
            del unacked[next(iter(unacked))]  # applied (``unacked`` is in seq order)
        link.restarts_in_a_row = 0
        link.covered = max(link.covered, ack.covered)
        if link.replay is not None:
            link.replay.trim(ack.covered)

    def low_water(self) -> int:
        """This client's pushes that every shard's finished checkpoint holds: none of them is ever recomputed,
        so in sync mode no shard needs the parameters they were computed on (``ShardState.low_water``)."""
        return min(link.covered for link in self.links)

    def _rejected(self, shard: int, rejection: Rejection) -> None:
        entry = self.pending.get(rejection.rid)
        if rejection.code == "restarted":
            self._recover(shard, self._ask_actor(shard, lambda: self._discover(shard, 10)), "rejected")
        elif rejection.code == "overloaded":
            return  # the push is resent when the silence handling runs
        elif rejection.code == "malformed" and rejection.field == "rg":  # the shard no longer knows this link's
            if self.links[shard].regions is not None:  # shared memory: everything outstanding goes again, over
                self.drop_regions(shard)  # the socket (the rejections of the rest are then answered already)
        elif entry is not None:
            entry.error = TimeoutError(rejection.message) if rejection.code == "timeout" else \
                ValueError(f"shard {shard} rejected the request: {rejection.message}")
        else:
            self.errors.append(f"shard {shard} rejected a push: {rejection.message}")

    @property
    def incarnations(self) -> list:
        return [link.incarnation for link in self.links]

    def buffered(self) -> int:
        return sum(len(link.replay) for link in self.links if link.replay is not None)

