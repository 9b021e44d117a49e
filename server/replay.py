"""``ReplayBuffer``: a client's pushes to one shard that no finished checkpoint holds yet; ``InFlight``: those
not acknowledged yet, with their bytes (the window's second bound).

When a shard restarts from its last checkpoint, the client resends every push after the shard's
``applied_seq`` for it; the shard drops any it already has. The buffer is trimmed on every acknowledgement
to the shard's ``covered`` sequence number, so it holds at most one checkpoint interval (plus what is in
flight).
"""

from __future__ import annotations

import collections


class ReplayBuffer:
    def __init__(self):
        self.messages: collections.OrderedDict[int, tuple] = collections.OrderedDict()

    def add(self, seq: int, message: tuple) -> None:
        self.messages[seq] = message

    def trim(self, covered: int) -> None:
        while self.messages and next(iter(self.messages)) <= covered:
            self.messages.popitem(last=False)

    def after(self, applied: int) -> list[tuple[int, tuple]]:
        return [(seq, message) for seq, message in self.messages.items() if seq > applied]

    def __len__(self) -> int:
        return len(self.messages)


def message_bytes(message) -> int:
    """The array bytes a push carries: its dense payload (arrays, or an ``EncodedPayload``) and its rows."""
    payload = message.payload or {}
    total = payload.nbytes if hasattr(payload, "nbytes") else sum(getattr(a, "nbytes", 0) for a in payload.values())
    for pair in (message.rows or {}).values():
        total += sum(getattr(a, "nbytes", 0) for a in pair)
    return int(total)


class InFlight(dict):
    """seq -> the unacknowledged push, and ``nbytes``: the array bytes they hold together."""

    def __init__(self):
        super().__init__()
        self.nbytes = 0

    def __setitem__(self, seq: int, message) -> None:
        if seq in self:
            self.nbytes -= message_bytes(self[seq])
        super().__setitem__(seq, message)
        self.nbytes += message_bytes(message)

    def __delitem__(self, seq: int) -> None:
        self.nbytes -= message_bytes(self[seq])
        super().__delitem__(seq)

    def pop(self, seq: int, default=None):
        if seq not in self:
            return default
        message = self[seq]
        del self[seq]
        return message
