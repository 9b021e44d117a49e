"""``BatchedPushes``: the part of ``ShardState`` (server/shard_state.py) that takes a batch of pushes at once.

A batch (``protocol.PushMessage.batch``) is ``count`` plain pushes of one client and worker, sequence numbers
``seq .. seq + count - 1``, whose payloads lie one after the other in each dtype's array. ``push_batch`` has the
outcome of ``ShardState.push`` of each in turn, bit for bit, counters and clocks included. In the common case
(the client's next pushes, in order, none waiting, every value finite, not sync mode) it checks the stacked
payload once and applies the steps range by range: each range's kernel runs ``count`` times in a row, with the
iteration of each step, which is what ``count`` pushes do, since ranges share no parameter or state. Any other
case goes push by push through ``ShardState.push``.
"""

from __future__ import annotations

import time

from . import transport
from .payload_checks import check_payload


def split_payload(payload: dict, count: int) -> list[dict]:
    """The ``count`` payloads stacked in ``payload`` (views)."""
    steps = {dtype: array.reshape(count, -1) for dtype, array in payload.items()}
    return [{dtype: rows[i] for dtype, rows in steps.items()} for i in range(count)]


class BatchedPushes:
    """A mixin of ``ShardState``: it works on the state's fields (``applied_seq``, ``ranges``, ``iterations``...)."""

    def push_batch(self, client_id: str, seq: int, worker_id: int, payload: dict, count: int, epoch: int = 0):
        """``count`` pushes ``seq ..`` whose payloads are stacked in ``payload``: one ``PushOutcome`` for all.
        Counted in ``pushes_batched`` on arrival (duplicates too)."""
        self.counters["pushes_batched"] += count
        if (self.consistency != "sync" and self.applied_seq.get(client_id, 0) == seq - 1
                and not self.pending.get(client_id) and self._batch_fits(payload, count)):
            self.applied_seq[client_id] = seq + count - 1
            self._take_batch(worker_id, payload, count, epoch)
            return self.outcome(received=count)
        outcome = self.outcome(duplicate=True)
        for i, part in enumerate(split_payload(payload, count)):
            one = self.push(client_id, seq + i, worker_id, part, None, None, epoch)
            outcome.duplicate = outcome.duplicate and one.duplicate
            outcome.received += one.received
            outcome.errors += one.errors
        outcome.held = outcome.received == 0 and not outcome.duplicate
        return outcome

    def _batch_fits(self, payload: dict, count: int) -> bool:
        """Every dtype's array holds ``count`` full payloads, and no value is NaN or Inf."""
        stacked = {dtype: size * count for dtype, size in self.full_sizes.items()}
        return check_payload(self.shard_index, self.pieces, stacked, payload, self.every_piece) is None

    def _count_batch(self, worker_id: int, count: int, each: int) -> None:
        """What ``count`` pushes of ``each`` bytes from ``worker_id`` count one after the other (``_count_push``
        each, the version growing by one per push), without a pass over the clocks per push: the staleness
        grows with the version, so the last push's is the largest; the clock gap after a push,
        ``max(top, c) - min(low, c)`` for the worker's clock ``c`` (``top``, ``low``: the other workers'), is
        convex in ``c``, so its largest value is after the first push or after the last."""
        counters = self.counters
        counters["bytes_pushed"] += each * count
        clock = self.clocks.get(worker_id, 0)
        counters["max_staleness"] = max(counters["max_staleness"],
                                        self.version + count - 1 - self.pulled_version.get(worker_id, 0))
        self.version += count
        self.clocks[worker_id] = clock + 1
        first = self.clock_gap()
        self.clocks[worker_id] = clock + count
        counters["max_clock_gap"] = max(counters["max_clock_gap"], first, self.clock_gap())

    def _take_batch(self, worker_id: int, payload: dict, count: int, epoch: int) -> None:
        started = time.perf_counter()
        counters = self.counters
        counters["pushes"] += count
        self._count_batch(worker_id, count, transport.message_nbytes(payload) // count)
        counters["updates_applied"] += count
        steps = {dtype: array.reshape(count, -1) for dtype, array in payload.items()}
        for r in self.ranges.values():
            its = self.iterations[r.pieces_at]
            if its.min() == its.max():
                self._kernel(r.dtype, r.group, r.start, r.stop, steps[r.dtype][:, r.start:r.stop], int(its[0]),
                             epoch, self.default_factors)
                self.iterations[r.pieces_at] += count
            else:  # pieces that diverged (an earlier partial push): run by run, step by step
                for step in steps[r.dtype]:
                    self._apply_runs({r.dtype: step}, r.piece_indices.tolist(), None, epoch, offsets_match=True)
        counters["apply_seconds"] += time.perf_counter() - started
