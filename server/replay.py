"""``ReplayBuffer``: a client's pushes to one shard that no finished checkpoint holds yet.

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
