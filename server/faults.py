"""Deterministic fault injection, for tests: a process dies (``os._exit``, as a SIGKILL would leave it) at a named
point the first time a matching event happens there. Off unless a ``FaultPlan`` is installed
(``ParameterServer.inject_faults``), so production code only ever calls ``NO_FAULTS.hit``, which does nothing.

Points (the event's fields, each of which a ``Fault`` may pin; an unpinned field matches anything):

* ``client.sent``: a client sent its push ``seq`` to ``sent`` of its shards (1..n; die after k of n shards);
* ``client.before_ack``: a client sent push ``seq`` to every shard and saw no acknowledgement of it yet;
* ``client.replayed``: a client replayed ``count`` pushes to shard ``shard``, which had restarted;
* ``shard.checkpoint_blob``: shard ``shard`` wrote a checkpoint's blob, and not yet the pointer that
  publishes it.

``worker`` is the worker identity of the client (``ParameterServer.as_worker``; None for other handles). A fault
fires once per run: it first creates its ``marker`` file (exclusively), so the restarted process, which gets
the same plan, passes the point. The marker says, after the run, that the fault did fire.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

POINTS = ("client.sent", "client.before_ack", "client.replayed", "shard.checkpoint_blob")
EXIT_CODE = 77


@dataclass(frozen=True)
class Fault:
    point: str
    marker: str  # a file path; created when the fault fires (it fires only if the file does not exist yet)
    worker: int | None = None
    seq: int | None = None
    sent: int | None = None
    count: int | None = None
    shard: int | None = None

    def __post_init__(self):
        if self.point not in POINTS:
            raise ValueError(f"point must be one of {list(POINTS)}, got {self.point!r}")
        if not isinstance(self.marker, str) or not self.marker:
            raise ValueError(f"marker must be a file path, got {self.marker!r}")

    def matches(self, point: str, event: dict) -> bool:
        if point != self.point:
            return False
        for spec in fields(self):
            pinned = getattr(self, spec.name)
            if spec.name not in ("point", "marker") and pinned is not None and event.get(spec.name) != pinned:
                return False
        return True


class FaultPlan(tuple):
    """The faults of one test run (a tuple of ``Fault``)."""

    def __new__(cls, faults=()):
        faults = tuple(faults)
        for fault in faults:
            if not isinstance(fault, Fault):
                raise TypeError(f"a FaultPlan holds Fault objects, got {type(fault).__name__}")
        return super().__new__(cls, faults)

    def hit(self, point: str, settle=None, **event) -> None:
        """Die here if a fault of this plan matches and has not fired yet; ``settle()`` first (a client waits
        until what it sent has arrived, so the shards' side of the fault is what the test names)."""
        for fault in self:
            if fault.matches(point, event) and _claim(fault.marker):
                if settle is not None:
                    settle()
                os._exit(EXIT_CODE)

    def fired(self) -> list[Fault]:
        """The faults whose marker exists (they fired)."""
        return [fault for fault in self if os.path.exists(fault.marker)]


def _claim(marker: str) -> bool:
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        return True
    except FileExistsError:
        return False


NO_FAULTS = FaultPlan()
