"""``Linger``: the thread that sends a handle's held pushes once they have waited ``LINGER`` seconds.

``ShardLinks`` (server/shard_links.py) holds small pushes for a busy shard and sends them together. The handle
has no thread of its own, so a push held when its caller stops calling (the last push of an actor method, a
driver that goes on to other work, a BSP worker whose step the others wait for) would stay held. This thread
bounds the wait: armed when a link holds its first push, it sleeps ``LINGER`` seconds, looks at the held
batches and, only when one has waited that long, takes the links' lock (ZeroMQ sockets are used by one thread
at a time) and sends every such batch. A busy caller mostly sends its batches itself before they are due, so
the thread seldom takes the lock the caller's pushes hold (a lock taken from under a pushing thread hands the
CPU back and forth between them). It goes on waking every ``LINGER`` while pushes keep being held, and sleeps
on an event once ``IDLE_ROUNDS`` such wake-ups in a row found nothing held (cleared under the lock): an idle
handle costs no wake-ups, and arming an armed thread only reads a flag.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref

log = logging.getLogger(__name__)
IDLE_ROUNDS = 8  # wake-ups in a row with nothing held before the thread sleeps on its event


class Linger:
    def __init__(self, links, seconds: float):
        # ``ShardLinks``: its ``lock``, ``send_held(older_than=...)`` and ``oldest_held()``. Held weakly: a handle
        # dropped without ``shutdown`` is collected as before, and its finalizer ends this thread.
        self.links = weakref.ref(links)
        weakref.finalize(links, self.close)
        self.seconds = seconds
        self.armed = threading.Event()
        self.closed = False
        self.thread: threading.Thread | None = None

    def arm(self) -> None:
        """A link holds its first push (call with the links' lock held)."""
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name="rayps-push-linger", daemon=True)
            self.thread.start()
        if not self.armed.is_set():
            self.armed.set()

    def close(self) -> None:
        self.closed = True
        self.armed.set()

    def _run(self) -> None:
        wait = self.seconds
        idle = 0  # wake-ups in a row that found nothing held
        while True:
            self.armed.wait()
            if self.closed:
                return
            time.sleep(wait)
            links = self.links()
            if links is None:
                return
            oldest = links.oldest_held()  # looked at without the lock, which the caller's pushes hold
            now = time.monotonic()
            if oldest is not None and now - oldest < self.seconds:  # not due yet: asleep until it is (a busy
                wait, idle = oldest + self.seconds - now, 0  # caller mostly sends it before)
            elif oldest is None and idle + 1 < IDLE_ROUNDS:
                wait, idle = self.seconds, idle + 1
            else:  # a batch is due, or the event is to be cleared: both under the lock
                wait, idle = self._locked_round(links, idle)
            del links  # not kept while asleep

    def _locked_round(self, links, idle: int) -> tuple[float, int]:
        """Send what is due, under the links' lock; the next wait and idle count."""
        with links.lock:
            if self.closed:
                return self.seconds, 0
            try:
                links.send_held(older_than=self.seconds)
            except Exception:  # noqa: BLE001 - the pushes stay in the window: the next call resends them
                log.exception("rayps: sending held pushes failed; they are resent by the handle's next call")
            oldest = links.oldest_held()
            if oldest is not None:  # a batch begun since: until it is due
                return max(0.0, oldest + self.seconds - time.monotonic()), 0
            if idle + 1 >= IDLE_ROUNDS:  # cleared under the lock: a push held after this arms it again
                self.armed.clear()
                return self.seconds, 0
            return self.seconds, idle + 1
