"""``SyncSteps``: the sync-mode (BSP) part of ``ShardState`` — pushes of one clock summed into a ``SyncStep``
until every worker contributed, then applied as one step of their mean; the dead-worker policy
(``force_sync_step``); and the parameters of earlier steps (``read_at``) a restarted worker reads.

Why earlier steps: a restarted worker recomputes the pushes some shard lacks, and under BSP push ``s + 1`` must
be computed on the parameters of the step it was first computed on (``step_of``), which the shards that
already applied it have left behind. A push some shard lacks is one its finished checkpoint does not hold, so
each client reports with every push its *low water*: the fewest of its pushes every shard's finished checkpoint
holds (``ShardLinks.low_water``). With checkpoints (``keep_for_recovery``) a shard keeps the parameters of
every step from ``min over clients of step_of(client, worker, low water)`` on; without, only the step before
the last (a worker that died after sending to some shards lacks at most one push). At most ``history_bytes``
of them either way, but always the step before the last (oldest dropped first; a read that reaches further
back gets the live parameters and is counted in ``resume_reads_inexact``).

A mixin of ``ShardState`` (server/shard_state.py), split out by concept: it works on the state's own fields
(``sync_steps``, ``sync_clock``, ``params``, ``history``, ``low_water``) and applies a step with ``_apply``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

HISTORY_BYTES = 512 << 20  # the most a shard keeps of earlier steps' parameters (``ShardState.history_bytes``)


@dataclass
class SyncStep:
    """Sum of the pushes of one clock in sync mode, until every worker contributed."""

    sums: dict
    present: np.ndarray  # bool per piece
    workers: set = field(default_factory=set)
    epoch: int = 0
    rows: dict = field(default_factory=dict)  # row-sparse table -> list of (ids, grads) pushed for this step


class SyncSteps:
    """Sync mode of ``ShardState`` (see the module docstring)."""

    def _accumulate(self, clock, worker_id, payload, present_idx, epoch, rows=None) -> None:
        if clock < self.sync_clock:  # its step was completed without it (dead-worker policy): too late
            self.counters["late_pushes_dropped"] += 1
            return
        step = self.sync_steps.get(clock)
        if step is None:
            step = SyncStep({d: np.zeros_like(b) for d, b in self.params.items()},
                            np.zeros(len(self.pieces), dtype=bool))
            self.sync_steps[clock] = step
        step.workers.add(worker_id)
        step.epoch = max(step.epoch, epoch)
        if payload is not None:
            self._scatter_add(step, payload, present_idx)
        for name, part in (rows or {}).items():
            step.rows.setdefault(name, []).append(part)
        self._apply_complete_sync_steps()

    def _scatter_add(self, step: SyncStep, payload, present_idx) -> None:
        if len(present_idx) == len(self.pieces):
            for dtype, array in payload.items():
                step.sums[dtype] += array
        else:
            cursor: dict[str, int] = {}
            for i in present_idx:
                piece = self.pieces[int(i)]
                start = cursor.get(piece.dtype, 0)
                step.sums[piece.dtype][piece.offset:piece.offset + piece.size] += payload[piece.dtype][start:start + piece.size]
                cursor[piece.dtype] = start + piece.size
        step.present[present_idx] = True

    def _apply_complete_sync_steps(self) -> None:
        while self.sync_clock in self.sync_steps and len(self.sync_steps[self.sync_clock].workers) >= self.num_workers:
            self._apply_sync_step(self.sync_steps.pop(self.sync_clock), self.num_workers)

    def _apply_sync_step(self, step: SyncStep, divisor: int) -> None:
        self._keep_step(self._keep_from(self.sync_clock))
        present_idx = np.flatnonzero(step.present)
        for array in step.sums.values():
            array /= divisor
        rows = {name: (np.concatenate([ids for ids, _ in parts]), np.concatenate([g for _, g in parts]) / divisor)
                for name, parts in step.rows.items()}
        if len(present_idx) == len(self.pieces):
            self._apply(step.sums, present_idx, None, step.epoch, rows)
        else:
            self._apply(self._gather(step.sums, present_idx), present_idx, None, step.epoch, rows)
        self.sync_clock += 1

    def force_sync_step(self) -> bool:
        """Dead-worker policy of sync mode, called after the pull timeout: apply the waiting step with the mean
        of the workers that did push; a missing worker's push for that step, should it come, is dropped."""
        step = self.sync_steps.pop(self.sync_clock, None)
        if step is None or not step.workers:
            if step is not None:
                self.sync_steps[self.sync_clock] = step
            return False
        self.counters["sync_steps_forced"] += 1
        self._apply_sync_step(step, len(step.workers))
        self._apply_complete_sync_steps()
        return True

    def _gather(self, buffers, present_idx) -> dict:
        parts: dict[str, list] = {}
        for i in present_idx:
            piece = self.pieces[int(i)]
            parts.setdefault(piece.dtype, []).append(buffers[piece.dtype][piece.offset:piece.offset + piece.size])
        return {dtype: np.concatenate(chunks) for dtype, chunks in parts.items()}

    # -- earlier steps --------------------------------------------------------------------------------------
    def report_low_water(self, client_id: str, worker_id: int, low_water: int) -> None:
        """``client_id`` (worker ``worker_id``) says every shard's finished checkpoint holds its first
        ``low_water`` pushes; it only grows (a restarted process starts from 0 until it hears the shards)."""
        known = self.low_water.get(client_id)
        if known is None or low_water > known[1]:
            self.low_water[client_id] = (worker_id, low_water)

    def _keep_from(self, live: int) -> int:
        """The first step whose parameters this shard keeps while ``live`` steps are applied (see the module
        docstring)."""
        first = live
        if self.keep_for_recovery:
            for client_id, (worker_id, low_water) in self.low_water.items():
                first = min(first, self.step_of(client_id, worker_id, low_water))
        return max(first, 0)

    def _keep_step(self, first: int) -> None:
        """Before a step is applied: keep the live parameters as step ``sync_clock``, drop the steps before
        ``first`` and the oldest beyond ``history_bytes`` (its buffers are reused)."""
        spare = None
        for old in [s for s in self.history if s < first]:
            spare = self.history.pop(old)
        size = sum(buf.nbytes for buf in self.params.values())
        while self.history and (len(self.history) + 1) * size > self.history_bytes:
            spare = self.history.pop(next(iter(self.history)))
        snapshot = spare or {dtype: np.empty_like(buf) for dtype, buf in self.params.items()}
        for dtype, buf in self.params.items():
            np.copyto(snapshot[dtype], buf)
        self.history[self.sync_clock] = snapshot

    # -- the update ----------------------------------------------------------------------------------------
    def step_of(self, client_id: str, worker_id: int, at_seq: int) -> int:
        """Sync mode: the step whose parameters ``client_id``'s push ``at_seq + 1`` (as worker ``worker_id``)
        is computed on: this shard's clock of the worker, less the pushes of ``client_id`` after ``at_seq``
        that it already applied."""
        return self.clocks.get(worker_id, 0) - (self.applied_seq.get(client_id, 0) - at_seq)

    def read_at(self, step: int, piece_indices: Sequence[int] | None = None, copy: bool = True) -> dict | None:
        """Sync mode: the dense parameters as they were after ``step`` steps (``sync_clock == step``): the live
        ones or those kept in ``history``; None if this shard no longer has them (dropped, or from before its
        restart)."""
        if step == self.sync_clock:
            return self.read(piece_indices, None, copy)
        kept = self.history.get(step)
        if kept is None:
            return None
        if piece_indices is None:
            out = {dtype: buf.copy() for dtype, buf in kept.items()}
        else:
            parts: dict[str, list] = {}
            for i in piece_indices:
                piece = self.pieces[int(i)]
                parts.setdefault(piece.dtype, []).append(kept[piece.dtype][piece.offset:piece.offset + piece.size])
            out = {dtype: np.concatenate(chunks) for dtype, chunks in parts.items()}
        self.counters["bytes_pulled"] += int(sum(a.nbytes for a in out.values()))
        return out
