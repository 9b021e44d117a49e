"""``ShardLinks``: one client identity's side of exactly-once delivery to the shard actors.

It sends pushes (at most ``max_in_flight`` unacknowledged per shard), reads their acknowledgements
``[applied, covered, incarnation]``, keeps every push that no finished checkpoint holds yet (``ReplayBuffer``,
only with a ``checkpoint_dir``), and recovers a restarted shard: it learns the shard's new incarnation and
last applied sequence number (``recovery_info``), then resends the pushes after it (marked ``replayed``); the
shard drops any it already has. Reads that must see this client's pushes go through ``get_recovering``: a
lost or restarted shard is recovered, then asked again.
"""

from __future__ import annotations

import collections
import time

import ray

from .remote_errors import unwrap
from .replay import ReplayBuffer
from .shard_actor import ShardRestarted

ACTOR_LOST = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)
RECOVERY_DEPTH = 8  # nested recoveries (a shard that dies again while it is replayed to) before giving up


class ShardLinks:
    def __init__(self, actors, client_id: str, max_in_flight: int, recovery_timeout: float, replay: bool):
        self.actors = actors
        self.client_id = client_id
        self.max_in_flight = max_in_flight
        self.recovery_timeout = recovery_timeout
        self.in_flight = [collections.deque() for _ in actors]  # (seq, ref) of unacknowledged pushes
        self.replay = [ReplayBuffer() for _ in actors] if replay else None
        self.incarnations = [None] * len(actors)  # learnt from the first acknowledgement
        self.recoveries = 0

    def send(self, shard: int, seq: int, message: tuple) -> None:
        """Push ``message`` (``shard_actor.PUSH_FIELDS``) to ``shard``; waits while its window is full."""
        queue = self.in_flight[shard]
        if len(queue) >= self.max_in_flight:
            self.settle(shard, [queue.popleft() for _ in range(len(queue) - self.max_in_flight + 1)])
        if self.replay is not None:
            self.replay[shard].add(seq, message)
        queue.append((seq, self.actors[shard].push.remote(message)))

    def flush(self) -> None:
        """Wait for every push in flight; raise the first error among them (after recovering any shard)."""
        first_error = None
        for shard, queue in enumerate(self.in_flight):
            if not queue:
                continue
            entries = list(queue)
            queue.clear()
            try:
                self.settle(shard, entries)
            except (ValueError, TypeError) as error:
                first_error = first_error or error
        if first_error is not None:
            raise first_error

    def settle(self, shard: int, entries, depth: int = 0) -> None:
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
            lost = self.note_ack(shard, ack) or lost
        if lost:
            self.recover(shard, depth)
        if first_error is not None:
            raise first_error

    def note_ack(self, shard: int, ack) -> bool:
        """Trim the replay buffer; True when the ack comes from a new incarnation of the shard (a restart)."""
        if not ack:
            return False
        _applied, covered, incarnation = ack
        known = self.incarnations[shard]
        if known is None:
            self.incarnations[shard] = incarnation
        elif known != incarnation:
            return True
        if self.replay is not None:
            self.replay[shard].trim(covered)
        return False

    def recover(self, shard: int, depth: int = 0) -> None:
        """Wait for a restarted shard, then resend every push its checkpoint lacks."""
        if self.replay is None:
            raise RuntimeError(f"shard {shard} was lost and the server has no checkpoint_dir, so its state is "
                               f"gone; start ParameterServer with checkpoint_dir=... to survive shard failures")
        if depth > RECOVERY_DEPTH:
            raise RuntimeError(f"shard {shard} keeps failing during recovery")
        actor = self.actors[shard]
        deadline = time.monotonic() + self.recovery_timeout
        while True:
            try:
                applied, incarnation = ray.get(actor.recovery_info.remote(self.client_id), timeout=10)
                break
            except (*ACTOR_LOST, ray.exceptions.GetTimeoutError) as error:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"shard {shard} did not come back within {self.recovery_timeout}s") from error
                time.sleep(0.2)
        self.incarnations[shard] = incarnation
        self.recoveries += 1
        resent = [(seq, actor.push.remote(message[:-1] + [True]))  # the last field: replayed
                  for seq, message in self.replay[shard].after(applied)]
        self.in_flight[shard] = collections.deque(e for e in self.in_flight[shard] if e[0] <= applied)
        self.settle(shard, resent, depth + 1)

    def get_recovering(self, shard: int, ref, ask_again, what: str, attempts: int = RECOVERY_DEPTH):
        """``ray.get(ref)``; after a lost or restarted shard, recover it (replay) and ``ray.get(ask_again())``."""
        for _ in range(attempts):
            try:
                return ray.get(ref)
            except ACTOR_LOST:
                pass
            except Exception as error:  # noqa: BLE001
                error = unwrap(error)
                if not isinstance(error, ShardRestarted):
                    raise error from None
            self.recover(shard)
            ref = ask_again()
        raise RuntimeError(f"shard {shard} kept restarting during {what}()")

    def read(self, refs: dict, wait_ref, what: str) -> dict:
        """shard -> answer of the reads ``refs`` (shard -> ref of a call that answers at once, or None when the
        read must wait); those that must wait are asked again together with ``wait_ref(shard)`` (a call that
        blocks until it can answer), and so is a shard that was lost or restarted, once recovered."""
        answers, waiting = {}, {}
        for shard, ref in refs.items():
            answer = self.get_recovering(shard, ref, lambda s=shard: wait_ref(s), what)
            if answer is None:
                waiting[shard] = wait_ref(shard)
            else:
                answers[shard] = answer
        for shard, ref in waiting.items():
            answers[shard] = self.get_recovering(shard, ref, lambda s=shard: wait_ref(s), what)
        return answers

    def ask(self, shard: int, method: str, *args):
        """A read-only call to one shard, repeated (after the shard's recovery) if the shard restarts."""
        for _ in range(RECOVERY_DEPTH):
            try:
                return ray.get(getattr(self.actors[shard], method).remote(*args))
            except ACTOR_LOST:
                if self.replay is None:
                    raise
                self.recover(shard)
        raise RuntimeError(f"shard {shard} kept restarting during {method}()")

    def ask_all(self, method: str, *args) -> list:
        """``ask`` every shard, the calls sent together."""
        refs = [getattr(actor, method).remote(*args) for actor in self.actors]
        out = []
        for shard, ref in enumerate(refs):
            try:
                out.append(ray.get(ref))
            except ACTOR_LOST:
                if self.replay is None:
                    raise
                out.append(self.ask(shard, method, *args))
        return out

    def buffered(self) -> int:
        return sum(len(r) for r in self.replay) if self.replay else 0
