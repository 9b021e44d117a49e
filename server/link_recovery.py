"""``LinkRecovery``: the part of ``ShardLinks`` (server/shard_links.py) that deals with silence and restarts,
and its control calls through Ray.

When nothing arrives for ``LOOK_FIRST`` seconds (``resend_after`` if shorter) while something is outstanding,
the client asks Ray where each such shard is. Same incarnation: the shard is alive; once the silence reaches
``resend_after`` (a shard may be busy, e.g. compiling a kernel, so not at once) the messages are taken as lost (a
cut connection, a dropped frame): resend what is outstanding (the shard drops pushes it already has and replaces
a read that waits). New incarnation: the shard restarted from its checkpoint: connect to its new endpoint and
replay every push after the applied sequence number it reports (``replayed``), then resend the reads.
Unreachable: wait up to ``recovery_timeout``. Dead for good (no checkpoint directory, so no restart): raise.

A shard that restarted while the client was idle (nothing outstanding, so no silence to notice) is recovered
by ``catch_up``, which the driver asks of the workers that finished their epoch (worker/epochs.py).
"""

from __future__ import annotations

import time

import ray

from .protocol import PullRequest, PushMessage
from .replay import InFlight

ACTOR_LOST = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)
RECOVERY_DEPTH = 8  # restarts of one shard in a row, with no acknowledgement in between, before giving up


class ShardLost(RuntimeError):
    """A shard is gone and cannot come back (no checkpoint directory), or did not come back in time."""


class LinkRecovery:
    """A mixin of ``ShardLinks``: it works on the links' fields (``links``, ``pending``, ``actors``, ...)."""

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
        with self.lock:
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
        self.links[shard].held = []  # resent here with the rest, one by one
        self.links[shard].held_bytes = 0
        for seq in sorted(self.links[shard].unacked):
            self._send(shard, self.links[shard].unacked[seq])
        for rid, entry in list(self.pending.items()):
            if entry.shard == shard and not entry.done:
                self._send(shard, self._read_of(entry))

    @staticmethod
    def _read_of(entry):
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
        link.unacked = InFlight()
        link.held, link.held_bytes = [], 0  # replayed below with the rest
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
