"""``ReplayBuffer``: a client's pushes to one shard that no finished checkpoint holds yet; ``InFlight``: those
not acknowledged yet, with their bytes (the window's second bound).

When a shard restarts from its last checkpoint, the client resends every push after the shard's
``applied_seq`` for it; the shard drops any it already has. The buffer is trimmed on every acknowledgement
to the shard's ``covered`` sequence number, so it holds at most one checkpoint interval (plus what is in
flight).
"""

from __future__ import annotations

import collections

from .transport import message_nbytes


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


class InFlight(dict):
    """seq -> the unacknowledged push, in the order they were sent (so in seq order), and ``nbytes``: the bytes
    they carry together (``transport.message_nbytes``, counted once per push)."""

    def __init__(self):
        super().__init__()
        self.nbytes = 0
        self._sizes: dict[int, int] = {}

    def __setitem__(self, seq: int, message) -> None:
        size = message_nbytes(message.payload, message.rows)
        self.nbytes += size - self._sizes.get(seq, 0)
        self._sizes[seq] = size
        super().__setitem__(seq, message)

    def size_of(self, seq: int) -> int:
        """The bytes of push ``seq`` (in flight)."""
        return self._sizes[seq]

    def __delitem__(self, seq: int) -> None:
        super().__delitem__(seq)
        self.nbytes -= self._sizes.pop(seq)

    def pop(self, seq: int, default=None):
        if seq not in self:
            return default
        message = self[seq]
        del self[seq]
        return message
