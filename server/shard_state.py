"""``ShardState``: one shard's parameters, updater state, counters and clocks — plain logic, no Ray.

Memory: ONE contiguous parameter buffer per dtype, and ONE updater-state array per (dtype, param group)
range, shaped ``(slots, range_size)`` (DL4J's ``[m | v]`` view over the block). A full push therefore applies
one fused kernel per (dtype, group); only partial pushes, or ranges whose pieces diverged (different iteration
counts or normalization factors), fall back to one kernel call per run of equal pieces.

Protocol (every message carries these; the actor just forwards them):

* ``client_id, seq``: exactly-once. A client's pushes are applied in ``seq`` order; an early one waits in
  ``pending``; one at or below ``applied_seq[client]`` is a duplicate and is dropped (counted).
* ``worker_id``: the worker's clock ticks once per push (SSP/sync bookkeeping and staleness).
* consistency ``async``: apply on arrival. ``ssp``: same, and ``pull_ready`` holds a worker more than
  ``staleness`` clocks ahead of the slowest. ``sync``: pushes of clock c are summed; when ``num_workers`` pushes
  arrived the mean is applied as one step, and a worker may pull once every step before its clock is applied.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from ..updaters.base import reference_step
from ..updaters.groups import ParamGroup
from . import transport
from .layout import Piece
from .payload_checks import check_payload, check_rows
from .push_batches import BatchedPushes
from .shard_invariants import check_shard_state
from .sync_steps import HISTORY_BYTES, SyncStep, SyncSteps
from .validation import CONSISTENCY_MODES, NAN_POLICIES

DEFAULT_FACTORS = (1.0, math.inf)
TICK = "tick"  # ``present`` of a clock-only message (a worker step with nothing to push)


@dataclass(frozen=True)
class Problem:
    """Why a push is not applied: ``message`` names the parameter or field; ``nonfinite``: a NaN/Inf gradient
    (which ``nan_policy="skip"`` turns into a clock tick)."""

    message: str
    nonfinite: bool = False


@dataclass
class PushOutcome:
    """What ``ShardState.push`` did: ``duplicate`` (already applied or waiting: dropped), ``held`` (early: it
    waits in ``pending`` for the pushes before it), ``received`` (pushes taken now: this one and the early
    ones it released), and the problems of those that were rejected (their clocks moved, nothing applied)."""

    duplicate: bool = False
    held: bool = False
    received: int = 0
    errors: list = field(default_factory=list)


@dataclass
class Range:
    """The pieces of one param group inside one dtype buffer: ``buffer[start:stop]`` (contiguous by layout)."""

    dtype: str
    group: int
    start: int
    stop: int
    piece_indices: np.ndarray  # indices into the shard's piece list
    pieces_at: slice | np.ndarray  # the same, as a slice when they are consecutive (a view: no gather)


class ShardState(SyncSteps, BatchedPushes):
    """See the module docstring. ``buffers``: dtype -> flat initial parameters (copied)."""

    outcome = PushOutcome
    default_factors = DEFAULT_FACTORS

    def __init__(self, shard_index: int, pieces: Sequence[Piece], groups: Sequence[ParamGroup],
                 buffers: Mapping[str, np.ndarray], consistency: str = "async", staleness: int = 0,
                 num_workers: int = 1, nan_policy: str = "reject", row_tables: Mapping | None = None):
        if consistency not in CONSISTENCY_MODES:
            raise ValueError(f"consistency must be one of {CONSISTENCY_MODES}, got {consistency!r}")
        if nan_policy not in NAN_POLICIES:
            raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
        self.shard_index = shard_index
        self.pieces = tuple(pieces)
        self.groups = tuple(groups)
        self.consistency = consistency
        self.staleness = int(staleness)
        self.num_workers = int(num_workers)
        self.nan_policy = nan_policy
        self.params = {dtype: np.array(buf, copy=True, order="C").reshape(-1) for dtype, buf in buffers.items()}
        self.row_tables = dict(row_tables or {})  # name -> RowTableShard (row-sparse parameters)
        self.ranges = self._ranges()
        self.state = {key: self.groups[r.group].updater.init(self.params[r.dtype][r.start:r.stop])
                      for key, r in self.ranges.items()}
        # the kernel of each range, chosen once (fused when the arrays allow it; None: the reference path).
        # Every slice of a range (a partial push) is as contiguous per slot as the range itself.
        self.kernels = {key: self.groups[r.group].updater.select_kernel(
            self.params[r.dtype][r.start:r.stop], self.params[r.dtype][r.start:r.stop], self.state[key])
            for key, r in self.ranges.items()}
        self.full_sizes = {dtype: int(buf.size) for dtype, buf in self.params.items()}
        self.iterations = np.zeros(len(self.pieces), dtype=np.int64)
        self.every_piece = np.arange(len(self.pieces))  # ``present_idx`` of a full push
        self.every_piece.flags.writeable = False
        self.piece_slices = {}
        for piece in self.pieces:
            self.piece_slices.setdefault(piece.name, []).append(piece.index)
        # clocks and exactly-once bookkeeping
        self.clocks: dict[int, int] = {}
        self.applied_seq: dict[str, int] = {}
        self.pending: dict[str, dict[int, tuple]] = {}
        self.sync_steps: dict[int, SyncStep] = {}
        self.sync_clock = 0  # steps applied in sync mode
        self.version = 0  # updates applied to this shard
        self.pulled_version: dict[int, int] = {}
        # sync mode: the dense parameters of earlier steps (``read_at``: a restarted worker recomputes a
        # gradient this shard already applied on the step's own parameters; see server/sync_steps.py)
        self.history: dict[int, dict[str, np.ndarray]] = {}  # step -> parameters after that many steps
        self.low_water: dict[str, tuple[int, int]] = {}  # client -> (worker, pushes every shard's checkpoint holds)
        self.keep_for_recovery = False  # keep the steps back to the low water (set where shards have checkpoints)
        self.history_bytes = HISTORY_BYTES
        self.counters = {"pushes": 0, "updates_applied": 0, "bytes_pushed": 0, "bytes_pulled": 0,
                         "duplicates_dropped": 0, "nonfinite_skipped": 0, "nonfinite_rejected": 0,
                         "max_staleness": 0, "max_clock_gap": 0, "apply_seconds": 0.0,
                         "sync_steps_forced": 0, "late_pushes_dropped": 0, "replays_received": 0,
                         "resume_reads_inexact": 0, "pushes_batched": 0}

    def _ranges(self) -> dict[tuple[str, int], Range]:
        members: dict[tuple[str, int], list[Piece]] = {}
        for piece in self.pieces:
            members.setdefault((piece.dtype, piece.group), []).append(piece)
        ranges = {}
        for key, pieces in members.items():
            start, stop = pieces[0].offset, pieces[-1].offset + pieces[-1].size
            if stop - start != sum(p.size for p in pieces):
                raise ValueError(f"shard {self.shard_index}: group {key[1]} is not contiguous in the {key[0]} buffer")
            indices = np.array([p.index for p in pieces], dtype=np.int64)
            consecutive = bool(np.all(np.diff(indices) == 1))
            ranges[key] = Range(key[0], key[1], start, stop, indices,
                                slice(int(indices[0]), int(indices[-1]) + 1) if consecutive else indices)
        return ranges

    # -- messages ------------------------------------------------------------------------------------------
    def push(self, client_id: str, seq: int, worker_id: int, payload: Mapping[str, np.ndarray],
             present: Sequence[int] | None = None, factors: Mapping[str, tuple] | None = None,
             epoch: int = 0, rows: Mapping[str, tuple] | None = None) -> PushOutcome:
        """Receive one push (dense ``payload`` and/or ``rows``: table -> (ids, grads)); see ``PushOutcome``."""
        applied = self.applied_seq.get(client_id, 0)
        if seq <= applied or seq in self.pending.get(client_id, {}):
            self.counters["duplicates_dropped"] += 1
            return PushOutcome(duplicate=True)
        self.pending.setdefault(client_id, {})[seq] = (worker_id, payload, present, factors, epoch, rows)
        outcome = PushOutcome()
        queue = self.pending[client_id]
        while applied + 1 in queue:
            applied += 1
            message = queue.pop(applied)
            self.applied_seq[client_id] = applied
            outcome.received += 1
            problem = self._receive(*message)
            if problem is not None:
                outcome.errors.append(problem.message)
        outcome.held = outcome.received == 0
        return outcome

    def _receive(self, worker_id, payload, present, factors, epoch, rows=None) -> Problem | None:
        self.counters["pushes"] += 1
        if payload is None:  # the client dropped a non-finite push (nan_policy="skip"): only the clock moves
            self.counters["nonfinite_skipped"] += 1
            self.clocks[worker_id] = self.clocks.get(worker_id, 0) + 1
            if self.consistency == "sync":
                self._accumulate(self.clocks[worker_id] - 1, worker_id, None, np.arange(0), epoch)
            return None
        if isinstance(present, str) and present == TICK:  # a step with no gradient: only the clock moves
            clock = self.clocks.get(worker_id, 0)
            self.clocks[worker_id] = clock + 1
            if self.consistency == "sync":
                self._accumulate(clock, worker_id, None, np.arange(0), epoch)
            return None
        payload, rows, nbytes, undecodable = transport.decode_push(  # compressed pushes: server/transport.py
            payload, rows, self.pieces, present, self.row_tables, f"shard {self.shard_index}")
        clock = self._count_push(worker_id, nbytes)
        present_idx = self.every_piece if present is None else np.asarray(present, dtype=np.int64)
        problem = (Problem(undecodable) if undecodable else None) or self._check_payload(payload, present_idx) \
            or self._check_rows(rows)
        if problem is not None:
            if problem.nonfinite and self.nan_policy == "skip":
                self.counters["nonfinite_skipped"] += 1
                problem = None
            elif problem.nonfinite:
                self.counters["nonfinite_rejected"] += 1
            payload, rows = None, None  # rejected or skipped: nothing is applied, but the clock and seq move on
        if self.consistency == "sync":
            self._accumulate(clock, worker_id, payload, present_idx, epoch, rows)
        elif payload is not None:
            self._apply(payload, present_idx, factors, epoch, rows)
        return problem

    def _count_push(self, worker_id: int, nbytes: int) -> int:
        """A push's bytes, clock tick, staleness and clock gap; the worker's clock before it."""
        counters = self.counters
        counters["bytes_pushed"] += nbytes
        clock = self.clocks.get(worker_id, 0)
        self.clocks[worker_id] = clock + 1
        counters["max_staleness"] = max(counters["max_staleness"], self.version - self.pulled_version.get(worker_id, 0))
        counters["max_clock_gap"] = max(counters["max_clock_gap"], self.clock_gap())
        return clock

    def _check_rows(self, rows) -> Problem | None:
        return _problem(check_rows(self.shard_index, self.row_tables, rows))

    def _check_payload(self, payload, present_idx) -> Problem | None:
        return _problem(check_payload(self.shard_index, self.pieces, self.full_sizes, payload, present_idx))

    def _apply(self, payload, present_idx, factors, epoch, rows=None) -> None:
        started = time.perf_counter()
        if rows:
            for name, (ids, grads) in rows.items():  # checked already: cost proportional to the rows touched
                if len(ids):
                    self.row_tables[name].push_rows(ids, grads, epoch)
        if len(present_idx) == 0:
            self._count_update(started)
            return
        full = len(present_idx) == len(self.pieces)
        if full and not factors:
            for r in self.ranges.values():
                its = self.iterations[r.pieces_at]
                if np.minimum.reduce(its) == np.maximum.reduce(its):
                    self._kernel(r.dtype, r.group, r.start, r.stop, (payload[r.dtype][r.start:r.stop],),
                                 int(its[0]), epoch, DEFAULT_FACTORS)
                    self.iterations[r.pieces_at] += 1
                else:
                    self._apply_runs(payload, r.piece_indices.tolist(), None, epoch, offsets_match=True)
        else:
            self._apply_runs(payload, [int(i) for i in present_idx], factors, epoch, offsets_match=full)
        self._count_update(started)

    def _count_update(self, started: float) -> None:
        self.version += 1
        self.counters["updates_applied"] += 1
        self.counters["apply_seconds"] += time.perf_counter() - started

    def _apply_runs(self, payload, piece_indices, factors, epoch, offsets_match: bool) -> None:
        """Apply pieces in runs that are adjacent in the buffer and share (group, iteration, factors)."""
        cursor: dict[str, int] = {}
        run = None  # [dtype, group, start, stop, payload_start, iteration, factors, pieces]
        for index in piece_indices:
            piece = self.pieces[index]
            source = piece.offset if offsets_match else cursor.get(piece.dtype, 0)
            cursor[piece.dtype] = source + piece.size
            key_factors = (factors or {}).get(piece.name, DEFAULT_FACTORS)
            iteration = int(self.iterations[index])
            if (run is not None and run[0] == piece.dtype and run[1] == piece.group and run[3] == piece.offset
                    and run[5] == iteration and run[6] == key_factors and run[4] + (run[3] - run[2]) == source):
                run[3] += piece.size
                run[7].append(index)
            else:
                self._flush_run(payload, run, epoch)
                run = [piece.dtype, piece.group, piece.offset, piece.offset + piece.size, source, iteration,
                       key_factors, [index]]
        self._flush_run(payload, run, epoch)

    def _flush_run(self, payload, run, epoch) -> None:
        if run is None:
            return
        dtype, group, start, stop, source, iteration, key_factors, indices = run
        self._kernel(dtype, group, start, stop, (payload[dtype][source:source + (stop - start)],), iteration, epoch,
                     key_factors)
        self.iterations[indices] += 1

    def _kernel(self, dtype, group_index, start, stop, steps, iteration, epoch, key_factors) -> None:
        """Kernel calls on ``buffer[start:stop]`` of one range, one per gradient of ``steps`` (successive
        iterations from ``iteration``: a batch of pushes). Shapes and dtypes were checked with the payload and
        the arrays are the shard's own, so ``Updater.apply``'s per-call checks are skipped."""
        key = (dtype, group_index)
        group = self.groups[group_index]
        r = self.ranges[key]
        state = self.state[key]
        if start != r.start or stop != r.stop:
            state = state[:, start - r.start:stop - r.start]  # each slot stays contiguous: no copy
        params = self.params[dtype][start:stop]
        kernel = self.kernels[key]
        in_turn = getattr(kernel, "steps", None)  # the CPU kernels' several steps in one call
        if in_turn is not None and len(steps) > 1:  # a batch: the kernel's views built once for all its steps
            settings = [(group.updater.rule_scalars(i, epoch), group.adjustments(i, epoch, *key_factors))
                        for i in range(iteration, iteration + len(steps))]
            in_turn(params, steps, state, settings)
            return
        for grads in steps:
            adjustments = group.adjustments(iteration, epoch, *key_factors)
            scalars = group.updater.rule_scalars(iteration, epoch)
            if kernel is None:
                reference_step(group.updater, params, grads, state, scalars, adjustments)
            else:
                kernel(params, grads, state, scalars, adjustments)
            iteration += 1

    # -- reads ---------------------------------------------------------------------------------------------
    def clock_gap(self) -> int:
        if not self.clocks:
            return 0
        known = [self.clocks.get(w, 0) for w in range(self.num_workers)] or [0]
        return max(self.clocks.values()) - min(known)

    def pull_ready(self, client_id: str | None, after_seq: int, worker_id: int | None) -> bool:
        """May this pull be answered now? (read-your-writes, then SSP/sync gating)."""
        if client_id is not None and self.applied_seq.get(client_id, 0) < after_seq:
            return False
        if worker_id is None or self.consistency == "async":
            return True
        clock = self.clocks.get(worker_id, 0)
        if self.consistency == "sync":
            return self.sync_clock >= clock
        slowest = min(self.clocks.get(w, 0) for w in range(self.num_workers))
        return clock - slowest <= self.staleness

    def read(self, piece_indices: Sequence[int] | None = None, worker_id: int | None = None,
             copy: bool = True) -> dict:
        """The parameters: whole buffers, or the given pieces packed in order (always a new array).

        Whole buffers are copies, unless ``copy=False``: then they are the LIVE buffers, which the next push
        changes in place. The shard actor hands those to Ray, whose serialization is then the only copy."""
        if worker_id is not None:
            self.pulled_version[worker_id] = self.version
        if piece_indices is None:
            out = {dtype: buf.copy() for dtype, buf in self.params.items()} if copy else dict(self.params)
        else:
            parts: dict[str, list] = {}
            for i in piece_indices:
                piece = self.pieces[int(i)]
                parts.setdefault(piece.dtype, []).append(self.params[piece.dtype][piece.offset:piece.offset + piece.size])
            out = {dtype: np.concatenate(chunks) for dtype, chunks in parts.items()}
        self.counters["bytes_pulled"] += int(sum(a.nbytes for a in out.values()))
        return out

    def read_rows(self, name: str, ids) -> np.ndarray:
        table = self.row_tables.get(name)
        if table is None:
            raise ValueError(f"shard {self.shard_index}: {name!r} is not a row-sparse table")
        rows = table.pull_rows(ids)
        self.counters["bytes_pulled"] += int(rows.nbytes)
        return rows

    def validate(self) -> None:
        """Check every invariant of this state (server/shard_invariants.py); raise ``InvariantError`` naming
        the first one broken. O(state size): for tests and debugging, not called by the shard itself."""
        check_shard_state(self)

    def pending_count(self, client_id: str) -> int:
        """Early pushes of ``client_id`` waiting for the ones before them."""
        return len(self.pending.get(client_id, ()))

    def stats(self) -> dict:
        stats = dict(self.counters)
        stats["row_tables"] = {name: table.stats() for name, table in self.row_tables.items()}
        stats.update(shard=self.shard_index, clocks=dict(self.clocks), version=self.version,
                     sync_clock=self.sync_clock, pending=sum(len(q) for q in self.pending.values()),
                     iterations_min=int(self.iterations.min()) if len(self.iterations) else 0,
                     iterations_max=int(self.iterations.max()) if len(self.iterations) else 0)
        return stats


def _problem(found) -> Problem | None:
    """``payload_checks``' ``(message, nonfinite)`` as a ``Problem``."""
    return None if found is None else Problem(*found)
