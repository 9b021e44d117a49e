"""``ShardLinks``: one client identity's data-plane connections to the shards, and exactly-once delivery over
them — the one client-side layer that sends, acknowledges, resends, replays and recovers.

One ZeroMQ DEALER socket per shard, connected to the endpoint the shard reports through Ray (``endpoint``:
address, incarnation, this client's last applied sequence number) and authenticated with the run's
credentials. Every message is a ``protocol`` type; every request carries a request id (``rid``) and the
shard incarnation this client knows.

* Pushes: at most ``window`` unacknowledged per shard (a full window blocks the sender until acknowledgements
  come back: back-pressure, no unbounded queue). An unacknowledged push is kept to be resent; with a
  checkpoint directory every push is also kept until a finished checkpoint covers it (``ReplayBuffer``).
* Reads (pull, rows, the pull of a fused push) wait here for their reply; a push's rejected parts (a NaN
  gradient, a bad row) come back in its acknowledgement and are raised by the next ``flush``/read.
* Silence: when nothing arrives for ``LOOK_FIRST`` seconds (``resend_after`` if shorter) while something is
  outstanding, the client asks Ray where each such shard is. Same incarnation: the shard is alive; once the silence
  reaches ``resend_after`` (a shard may be busy, e.g. compiling a kernel, so not at once) the messages are taken as
  lost (a cut connection, a dropped frame): resend what is outstanding (the shard drops pushes it already has and
  replaces a read that waits). New incarnation: the shard restarted from its checkpoint: connect to its new endpoint
  and replay every push after the applied sequence number it reports (``replayed``), then resend the reads.
  Unreachable: wait up to ``recovery_timeout``. Dead for good (no checkpoint directory, so no restart): raise.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field

import ray
import zmq

from .credentials import RunCredentials
from .faults import NO_FAULTS
from .protocol import Ack, PullRequest, PushMessage, Rejection, Reply, from_frames, to_frames
from .replay import ReplayBuffer

ACTOR_LOST = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)
LOOK_FIRST = 0.5  # seconds of silence before the first look at the shards (through Ray), then doubling ...
LOOK_MAX = 4.0  # ... up to this
RESEND_AFTER = 5.0  # seconds of silence before an alive shard is sent again what it has not answered
RECOVERY_DEPTH = 8  # restarts of one shard in a row, with no acknowledgement in between, before giving up


class ShardLost(RuntimeError):
    """A shard is gone and cannot come back (no checkpoint directory), or did not come back in time."""


@dataclass
class Pending:
    """A request waiting for its reply."""

    shard: int
    message: object
    reply: Reply | None = None
    error: BaseException | None = None
    acked: bool = False  # a fused push's push part was acknowledged: resend only its pull

    @property
    def done(self) -> bool:
        return self.reply is not None or self.error is not None


@dataclass
class Link:
    socket: zmq.Socket | None = None
    endpoint: str | None = None
    incarnation: str | None = None
    unacked: dict = field(default_factory=dict)  # seq -> PushMessage
    replay: ReplayBuffer | None = None
    restarts_in_a_row: int = 0
    covered: int = 0  # this client's pushes the shard's last finished checkpoint holds (from its acks)


class ShardLinks:
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
        self.recovery_causes = collections.Counter()
        self.route = None  # tests: route(shard, endpoint) -> the endpoint to connect to (e.g. a fault proxy)
        self.faults = NO_FAULTS  # tests: where this process dies (server/faults.py)
        self.worker = None  # the worker identity of the handle (for the fault points)
        self.resend_after = RESEND_AFTER
        self.context = zmq.Context.instance()
        self.node_id = ray.get_runtime_context().get_node_id()
        self.poller = zmq.Poller()
        self.sockets: dict = {}  # socket -> shard

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

    def connect(self, shard: int) -> None:
        """First contact with ``shard``: learn its endpoint and incarnation."""
        endpoint, incarnation, _applied = self._ask_actor(shard, lambda: self._discover(shard, 30))
        self.links[shard].incarnation = incarnation
        self._open(shard, endpoint)

    def applied(self, shard: int) -> int:
        """How many of this client's pushes ``shard`` has applied (asked through Ray)."""
        return int(self._ask_actor(shard, lambda: self._discover(shard, 30))[2])

    def close(self) -> None:
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
            link.socket.send_multipart(to_frames(message), copy=False, flags=zmq.NOBLOCK)
        except zmq.Again:  # the queue to this shard is full: the silence handling resends it
            pass

    def push(self, shard: int, message: PushMessage, wait_reply: bool = False) -> int:
        """Send a push (``message.seq`` set by the caller); waits while the shard's window is full. With
        ``wait_reply`` (a fused push+pull) it is also a request: its rid, for ``wait``."""
        link = self.links[shard]
        if len(link.unacked) >= self.window:
            self.pump(lambda: len(link.unacked) < self.window)
        message.rid = self._next_rid()
        message.low_water = self.low_water()
        link.unacked[message.seq] = message
        if link.replay is not None:
            link.replay.add(message.seq, message)
        if wait_reply:
            self.pending[message.rid] = Pending(shard, message)
        self._send(shard, message)
        return message.rid

    def request(self, shard: int, message) -> int:
        """Send a read; its rid, for ``wait``."""
        message.rid = self._next_rid()
        self.pending[message.rid] = Pending(shard, message)
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
        shard = self.sockets.get(socket)
        while shard is not None:
            try:
                frames = socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._dispatch(shard, from_frames(frames))
            if self.sockets.get(socket) is None:  # the link was reopened while dispatching (a recovery)
                return

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
        link.unacked.pop(ack.seq, None)
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
        elif entry is not None:
            entry.error = TimeoutError(rejection.message) if rejection.code == "timeout" else \
                ValueError(f"shard {shard} rejected the request: {rejection.message}")
        else:
            self.errors.append(f"shard {shard} rejected a push: {rejection.message}")

    # -- silence and recovery ----------------------------------------------------------------------------------
    def _outstanding(self, shard: int) -> bool:
        return bool(self.links[shard].unacked) or any(e.shard == shard and not e.done for e in self.pending.values())

    def _silence(self, seconds: float, resend: bool) -> None:
        for shard, link in enumerate(self.links):
            if not self._outstanding(shard):
                continue
            try:
                endpoint, incarnation, applied = self._discover(shard, 10)
            except ray.exceptions.ActorDiedError:  # dead for good (a restartable one is "unavailable")
                raise ShardLost(self._lost_text(shard)) from None
            except (*ACTOR_LOST, ray.exceptions.GetTimeoutError):
                found = None
            else:
                found = (endpoint, incarnation, applied)
            if found is None:
                if seconds > self.recovery_timeout:
                    raise ShardLost(f"shard {shard} did not come back within {self.recovery_timeout}s")
                continue
            if found[1] != link.incarnation:
                self._recover(shard, found, "silence")
            elif resend:
                self._resend(shard)

    def catch_up(self) -> int:
        """Replay to every shard that restarted while this client was idle, then wait for the acknowledgements;
        returns how many shards it recovered. A client notices a restart only while it sends or waits, so a
        worker done with its epoch would never replay the pushes a restarted shard lost, and in sync mode the
        other workers would wait for them forever. Asks (Ray) each shard some of whose pushes no checkpoint
        holds yet for its incarnation."""
        recovered = 0
        for shard, link in enumerate(self.links):
            if link.replay is None or not len(link.replay) or link.incarnation is None:
                continue
            found = self._ask_actor(shard, lambda shard=shard: self._discover(shard, 10))
            if found[1] != link.incarnation:
                self._recover(shard, found, "idle")
                recovered += 1
        self.flush()
        return recovered

    def _lost_text(self, shard: int) -> str:
        if not self.keeps_replay:
            return (f"shard {shard} was lost and the server has no checkpoint_dir, so its state is gone; start "
                    f"ParameterServer with checkpoint_dir=... to survive shard failures")
        return f"shard {shard} died and will not be restarted"

    def _resend(self, shard: int) -> None:
        for seq in sorted(self.links[shard].unacked):
            self._send(shard, self.links[shard].unacked[seq])
        for rid, entry in list(self.pending.items()):
            if entry.shard == shard and not entry.done:
                self._send(shard, self._read_of(entry))

    @staticmethod
    def _read_of(entry: Pending):
        """What to resend for a request: itself, or for a fused push whose push part was acknowledged, its pull."""
        message = entry.message
        if isinstance(message, PushMessage) and entry.acked:
            return PullRequest(message.rid, message.client_id, message.seq, message.pull_worker, None, None,
                               message.timeout)
        return message

    def _recover(self, shard: int, found, cause: str) -> None:
        """``shard`` restarted from its checkpoint: connect to its new endpoint and replay what it lacks.
        ``cause``: how the restart was noticed (``recovery_causes``): the new process ``rejected`` a message
        for the old one (it listens where the old one did), or Ray reported a new incarnation after ``silence``."""
        endpoint, incarnation, applied = found
        link = self.links[shard]
        if link.replay is None:
            raise ShardLost(self._lost_text(shard))
        link.restarts_in_a_row += 1
        if link.restarts_in_a_row > RECOVERY_DEPTH:
            raise ShardLost(f"shard {shard} kept restarting: {RECOVERY_DEPTH} restarts without an acknowledgement")
        link.incarnation = incarnation
        self.recoveries += 1
        self.recovery_causes[cause] += 1
        self._open(shard, endpoint)
        link.unacked = {}
        for count, (seq, message) in enumerate(link.replay.after(applied), 1):
            message.replayed = True
            link.unacked[seq] = message
            self._send(shard, message)
            self.faults.hit("client.replayed", worker=self.worker, shard=shard, count=count)
        for entry in self.pending.values():
            if entry.shard == shard and not entry.done:
                entry.acked = entry.acked or (isinstance(entry.message, PushMessage) and entry.message.seq <= applied)
                self._send(shard, self._read_of(entry))

    # -- control calls (Ray) -----------------------------------------------------------------------------------
    def _ask_actor(self, shard: int, call):
        """``call()`` (a Ray call to ``shard``'s actor), retried while the shard restarts."""
        deadline = time.monotonic() + self.recovery_timeout
        while True:
            try:
                return call()
            except ray.exceptions.ActorDiedError:
                raise ShardLost(self._lost_text(shard)) from None
            except (*ACTOR_LOST, ray.exceptions.GetTimeoutError):
                pass
            if time.monotonic() > deadline:
                raise ShardLost(f"shard {shard} did not come back within {self.recovery_timeout}s")
            time.sleep(0.2)

    def ask(self, shard: int, method: str, *args):
        """A control call to one shard (after pending pushes are acknowledged), retried across restarts."""
        return self._ask_actor(shard, lambda: ray.get(getattr(self.actors[shard], method).remote(*args)))

    def ask_all(self, method: str, *args) -> list:
        refs = [getattr(actor, method).remote(*args) for actor in self.actors]
        out = []
        for shard, ref in enumerate(refs):
            try:
                out.append(ray.get(ref))
            except (*ACTOR_LOST, ray.exceptions.GetTimeoutError):
                out.append(self.ask(shard, method, *args))
        return out

    @property
    def incarnations(self) -> list:
        return [link.incarnation for link in self.links]

    def buffered(self) -> int:
        return sum(len(link.replay) for link in self.links if link.replay is not None)

