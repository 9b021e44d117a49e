"""``Linger``: the thread that sends a handle's held pushes once they have waited ``LINGER`` seconds.

``ShardLinks`` (server/shard_links.py) holds small pushes for a busy shard and sends them together. The handle
has no thread of its own, so a push held when its caller stops calling (the last push of an actor method, a
driver that goes on to other work, a BSP worker whose step the others wait for) would stay held. This thread
bounds the wait: armed when a link holds its first push, it sleeps ``LINGER`` seconds and then, holding the
links' lock (ZeroMQ sockets are used by one thread at a time), sends every batch that has waited that long.
It sleeps on an event while nothing is held, so an idle handle costs no wake-ups.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref

log = logging.getLogger(__name__)


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
        self.armed.set()

    def close(self) -> None:
        self.closed = True
        self.armed.set()

    def _run(self) -> None:
        wait = self.seconds
        while True:
            self.armed.wait()
            if self.closed:
                return
            time.sleep(wait)
            links = self.links()
            if links is None:
                return
            with links.lock:
                if self.closed:
                    return
                try:
                    links.send_held(older_than=self.seconds)
                except Exception:  # noqa: BLE001 - the pushes stay in the window: the next call resends them
                    log.exception("rayps: sending held pushes failed; they are resent by the handle's next call")
                oldest = links.oldest_held()
                if oldest is None:  # cleared under the lock: a push held meanwhile arms it again after this
                    self.armed.clear()
                    wait = self.seconds
                else:  # a batch begun since: until it is due
                    wait = max(0.0, oldest + self.seconds - time.monotonic())
            del links  # not kept while asleep
