"""What must hold of a shard's state between two messages: ``ShardState.validate()`` and
``RowTableShard.validate()`` (Dask's ``validate_state`` is the model). Plain checks over the state's fields,
O(state size); the tests run them after every scenario, the shard never does on its own.

Each broken invariant raises ``InvariantError`` (an ``AssertionError``) whose ``invariant`` names it:

* ``params buffers``: one buffer per dtype of the pieces, 1-D, C-contiguous, writeable, of that dtype and of
  the layout's size (the end of the last piece of that dtype); ``full_sizes`` says the same sizes.
* ``ranges``: each (dtype, group) range holds exactly that group's pieces of that dtype, back to back from
  ``start`` to ``stop``, and every piece is in one range; ``piece_slices`` lists each name's pieces.
* ``state slots``: one updater-state array per range, ``(slots, stop - start)`` with ``slots`` the rule's
  state keys, each slot contiguous, of ``state_dtype_for`` the params' dtype; a kernel choice per range.
* ``iterations``: int64, one per piece, >= 0; the pieces of one parameter on this shard share one count (a
  push carries whole parameters, and a checkpoint refuses pieces that disagree).
* ``exactly-once``: ``applied_seq`` >= 0 per client; a waiting push of a client has a seq above that client's
  ``applied_seq + 1`` (the next one is never left waiting: it would have been applied).
* ``clocks``: every worker clock >= 0; ``pulled_version`` within ``[0, version]``.
* ``sync``: outside sync mode there is no sync step and ``sync_clock == 0``. In sync mode every waiting step's
  clock is >= ``sync_clock``; a worker of the step of clock c has a clock above c; the step at ``sync_clock``
  has fewer than ``num_workers`` workers (else it would have been applied); its sums have the buffers' shapes.
  Every applied step had its workers' pushes: ``sync_clock`` is at most the ``num_workers``-th largest worker
  clock, or, once a step was forced (dead-worker policy), at most the largest.
* ``counters``: every counter >= 0; ``version`` (updates applied) equals ``counters["updates_applied"]``.
* ``row tables``: keyed by their names, each with its own invariants (below).

A row table (``RowTableShard``): ``row arrays`` (values ``(capacity, dim)`` of the table's dtype, state
``(slots, capacity, dim)`` of its state dtype, the int64 columns of length ``capacity``, ``0 <= n <=
capacity``), ``row cap`` (under an eviction cap: ``n`` and ``capacity`` at most the cap), ``row ids``
(unique, in ``[0, num_rows)``, owned by this shard), ``row index`` (it maps exactly the stored ids to their
slots, its load at most one half), ``row columns`` (iterations and counts >= 0, the change version in
``[0, version]``, the access stamps at most the policy's clock; under TTL no stored row idle longer than
``max_idle_steps``), ``row clocks`` (``0 <= horizon <= version``, ``ops`` and counters >= 0, the eviction log's
count equal to the ids it holds).
"""

from __future__ import annotations

import numpy as np

from ..updaters.base import state_dtype_for
from .row_index import row_owner
from .row_policies import TTLEviction


class InvariantError(AssertionError):
    """A broken invariant of a shard's state: ``invariant`` names it, the message says what was found."""

    def __init__(self, where: str, invariant: str, found: str):
        self.invariant = invariant
        super().__init__(f"{where}: invariant {invariant!r} broken: {found}")


def _require(condition, where: str, invariant: str, found) -> None:
    if not condition:
        raise InvariantError(where, invariant, found() if callable(found) else found)


def _nonnegative_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 0


# -- ShardState --------------------------------------------------------------------------------------------
def check_shard_state(state) -> None:
    """Raise ``InvariantError`` at the first broken invariant of ``state`` (a ``ShardState``)."""
    where = f"shard {state.shard_index}"
    _check_buffers(state, where)
    _check_ranges(state, where)
    _check_slots(state, where)
    _check_iterations(state, where)
    _check_exactly_once(state, where)
    _check_clocks(state, where)
    _check_sync(state, where)
    _check_counters(state, where)
    _require(all(name == table.name for name, table in state.row_tables.items()), where, "row tables",
             lambda: f"tables keyed {sorted(state.row_tables)} hold {[t.name for t in state.row_tables.values()]}")
    for table in state.row_tables.values():
        table.validate()


def _check_buffers(state, where: str) -> None:
    sizes: dict[str, int] = {}
    for piece in state.pieces:
        sizes[piece.dtype] = max(sizes.get(piece.dtype, 0), piece.offset + piece.size)
    name = "params buffers"
    _require(set(state.params) == set(sizes), where, name,
             lambda: f"buffers for dtypes {sorted(state.params)}, the pieces have {sorted(sizes)}")
    for dtype, buffer in state.params.items():
        _require(isinstance(buffer, np.ndarray) and buffer.dtype == np.dtype(dtype) and buffer.ndim == 1, where,
                 name, lambda: f"the {dtype} buffer is {getattr(buffer, 'dtype', type(buffer).__name__)} with shape "
                               f"{getattr(buffer, 'shape', None)}, expected a 1-D {dtype} array")
        _require(buffer.flags.c_contiguous and buffer.flags.writeable, where, name,
                 f"the {dtype} buffer is not contiguous and writeable")
        _require(buffer.size == sizes[dtype] == state.full_sizes.get(dtype), where, name,
                 lambda: f"the {dtype} buffer has {buffer.size} elements, full_sizes says "
                         f"{state.full_sizes.get(dtype)}, the layout {sizes[dtype]}")


def _check_ranges(state, where: str) -> None:
    name = "ranges"
    _require(all(piece.index == i for i, piece in enumerate(state.pieces)), where, name,
             "a piece's index is not its position in the piece list")
    seen = np.zeros(len(state.pieces), dtype=np.int64)
    for (dtype, group), r in state.ranges.items():
        indices = np.asarray(r.piece_indices)
        seen[indices] += 1
        members = [state.pieces[int(i)] for i in indices]
        _require((r.dtype, r.group) == (dtype, group) and
                 all((p.dtype, p.group) == (dtype, group) for p in members), where, name,
                 f"range ({dtype}, {group}) holds a piece of another dtype or group")
        offset = r.start
        for piece in members:
            _require(piece.offset == offset, where, name,
                     f"range ({dtype}, {group}): piece {piece.name!r} starts at {piece.offset}, expected {offset}")
            offset += piece.size
        _require(offset == r.stop, where, name, f"range ({dtype}, {group}) ends at {r.stop}, its pieces at {offset}")
        at = np.arange(len(state.pieces))[r.pieces_at]
        _require(np.array_equal(at, indices), where, name, f"range ({dtype}, {group}): pieces_at != piece_indices")
    _require((seen == 1).all(), where, name, lambda: f"pieces {np.flatnonzero(seen != 1).tolist()} are not in "
                                                     f"exactly one range")
    by_name: dict[str, list[int]] = {}
    for piece in state.pieces:
        by_name.setdefault(piece.name, []).append(piece.index)
    _require(by_name == state.piece_slices, where, name, "piece_slices does not list each name's pieces")


def _check_slots(state, where: str) -> None:
    name = "state slots"
    _require(set(state.state) == set(state.ranges) == set(state.kernels), where, name,
             lambda: f"state for {sorted(state.state)}, kernels for {sorted(state.kernels)}, ranges "
                     f"{sorted(state.ranges)}")
    for key, r in state.ranges.items():
        slots = state.state[key]
        updater = state.groups[r.group].updater
        expected = (len(updater.state_keys), r.stop - r.start)
        _require(isinstance(slots, np.ndarray) and tuple(slots.shape) == expected, where, name,
                 lambda: f"range {key}: state shape {getattr(slots, 'shape', None)}, expected {expected} "
                         f"({type(updater).__name__} keeps {list(updater.state_keys)})")
        _require(slots.dtype == state_dtype_for(r.dtype), where, name,
                 lambda: f"range {key}: state dtype {slots.dtype}, expected {state_dtype_for(r.dtype)}")
        _require(all(slots[k].flags.c_contiguous for k in range(slots.shape[0])), where, name,
                 f"range {key}: a state slot is not contiguous")


def _check_iterations(state, where: str) -> None:
    name = "iterations"
    its = state.iterations
    _require(isinstance(its, np.ndarray) and its.dtype == np.int64 and its.shape == (len(state.pieces),), where,
             name, lambda: f"iterations {getattr(its, 'dtype', None)}{getattr(its, 'shape', None)}, expected "
                           f"int64 ({len(state.pieces)},)")
    _require(not len(its) or its.min() >= 0, where, name, lambda: f"negative counts {its[its < 0].tolist()}")
    for piece_name, indices in state.piece_slices.items():
        counts = set(its[indices].tolist())
        _require(len(counts) == 1, where, name,
                 f"the pieces of {piece_name!r} have different iteration counts {sorted(counts)}")


def _check_exactly_once(state, where: str) -> None:
    name = "exactly-once"
    for client, applied in state.applied_seq.items():
        _require(_nonnegative_int(applied), where, name, f"applied_seq[{client!r}] is {applied!r}")
    for client, queue in state.pending.items():
        applied = state.applied_seq.get(client, 0)
        early = [seq for seq in queue if not seq > applied + 1]
        _require(not early, where, name, f"client {client!r} has pushes {sorted(early)} waiting at or below "
                                         f"applied_seq + 1 = {applied + 1}")


def _check_clocks(state, where: str) -> None:
    name = "clocks"
    for worker, clock in state.clocks.items():
        _require(_nonnegative_int(clock), where, name, f"worker {worker}'s clock is {clock!r}")
    for worker, version in state.pulled_version.items():
        _require(_nonnegative_int(version) and version <= state.version, where, name,
                 f"worker {worker} pulled version {version!r}, the shard is at {state.version}")


def _check_sync(state, where: str) -> None:
    name = "sync"
    if state.consistency != "sync":
        _require(not state.sync_steps and state.sync_clock == 0, where, name,
                 f"{state.consistency} mode holds sync steps {sorted(state.sync_steps)} / sync_clock "
                 f"{state.sync_clock}")
        return
    _require(_nonnegative_int(state.sync_clock), where, name, f"sync_clock is {state.sync_clock!r}")
    for clock, step in state.sync_steps.items():
        _require(_nonnegative_int(clock) and clock >= state.sync_clock, where, name,
                 f"a step of clock {clock} waits, but steps up to {state.sync_clock - 1} were applied")
        behind = [w for w in step.workers if state.clocks.get(w, 0) <= clock]
        _require(not behind, where, name, f"workers {sorted(behind)} are in the step of clock {clock} but "
                                          f"their clocks are not past it")
        _require(set(step.sums) == set(state.params) and
                 all(step.sums[d].shape == state.params[d].shape for d in step.sums), where, name,
                 f"the step of clock {clock} sums arrays that are not the buffers' shapes")
        _require(step.present.dtype == bool and step.present.shape == (len(state.pieces),), where, name,
                 f"the step of clock {clock} has a present mask of shape {step.present.shape}")
    waiting = state.sync_steps.get(state.sync_clock)
    _require(waiting is None or len(waiting.workers) < state.num_workers, where, name,
             lambda: f"the step of clock {state.sync_clock} has all {len(waiting.workers)} workers but was not "
                     f"applied")
    clocks = sorted(state.clocks.values(), reverse=True)
    forced = state.counters["sync_steps_forced"] > 0
    rank = 1 if forced else state.num_workers
    bound = clocks[rank - 1] if len(clocks) >= rank else 0
    _require(state.sync_clock <= bound, where, name,
             f"sync_clock {state.sync_clock} is past {bound}, the clock of the fastest worker"
             f"{'' if rank == 1 else f' but {rank - 1}'} ({'a step was forced' if forced else 'no step was forced'})")


def _check_counters(state, where: str) -> None:
    name = "counters"
    negative = {k: v for k, v in state.counters.items() if not v >= 0}
    _require(not negative, where, name, f"negative counters {negative}")
    _require(_nonnegative_int(state.version) and state.version == state.counters["updates_applied"], where, name,
             f"version {state.version!r} but {state.counters['updates_applied']!r} updates applied")


# -- RowTableShard ---------------------------------------------------------------------------------------
def check_row_table(table, ids, values, state, columns: dict, evicted_log, evicted_logged: int) -> None:
    """Raise ``InvariantError`` at the first broken invariant of ``table`` (a ``RowTableShard``), given its
    storage: the ``ids`` column, ``values``, ``state``, the other int64 ``columns`` by name, the eviction log
    (``(version, ids)`` entries) and the count of ids it holds."""
    where = f"table {table.name!r} shard {table.shard_index}"
    n, capacity = table.n, len(ids)
    name = "row arrays"
    _require(_nonnegative_int(n) and n <= capacity, where, name, f"n = {n!r} rows stored, capacity {capacity}")
    _require(values.shape == (capacity, table.dim) and values.dtype == table.dtype, where, name,
             f"values {values.dtype}{values.shape}, expected {table.dtype}{(capacity, table.dim)}")
    _require(state.shape == (table.slots, capacity, table.dim) and state.dtype == table.state_dtype, where, name,
             f"state {state.dtype}{state.shape}, expected {table.state_dtype}{(table.slots, capacity, table.dim)}")
    for column_name, column in dict(columns, ids=ids).items():
        _require(column.dtype == np.int64 and column.shape == (capacity,), where, name,
                 f"column {column_name} is {column.dtype}{column.shape}, expected int64 ({capacity},)")
    if table.cap is not None:
        _require(n <= table.cap and capacity <= table.cap, where, "row cap",
                 f"{n} rows stored, arrays for {capacity}, the cap is {table.cap}")
    stored = ids[:n]
    name = "row ids"
    uniq, repeats = np.unique(stored, return_counts=True)
    _require(len(uniq) == n, where, name, lambda: f"stored ids repeat: {uniq[repeats > 1][:5].tolist()}")
    _require(not n or (stored.min() >= 0 and stored.max() < table.num_rows), where, name,
             f"stored ids outside [0, {table.num_rows})")
    foreign = stored[row_owner(stored, table.num_shards) != table.shard_index] if n else stored[:0]
    _require(not len(foreign), where, name, lambda: f"stored ids {foreign[:5].tolist()} belong to other shards")
    _check_row_index(table.index, stored, where)
    _check_row_columns(table, columns, n, where)
    name = "row clocks"
    _require(_nonnegative_int(table.version) and _nonnegative_int(table.ops) and
             0 <= table.horizon <= table.version, where, name,
             f"version {table.version!r}, ops {table.ops!r}, horizon {table.horizon!r}")
    negative = {k: v for k, v in table.counters.items() if not v >= 0}
    _require(not negative, where, name, f"negative counters {negative}")
    logged = sum(len(entry_ids) for _, entry_ids in evicted_log)
    _require(logged == evicted_logged, where, name, f"the eviction log holds {logged} ids but counts {evicted_logged}")


def _check_row_index(index, stored: np.ndarray, where: str) -> None:
    name = "row index"
    n = len(stored)
    live = index.keys >= 0
    _require(index.size == n == int(live.sum()), where, name,
             lambda: f"the index counts {index.size} ids and holds {int(live.sum())}, {n} rows are stored")
    _require(index.deleted >= 0 and 2 * (index.size + index.deleted) <= len(index.keys), where, name,
             f"{index.size} ids and {index.deleted} tombstones in {len(index.keys)} cells (load above 1/2)")
    slots = index.lookup(stored)
    _require(np.array_equal(slots, np.arange(n)), where, name,
             lambda: f"stored ids {stored[slots != np.arange(n)][:5].tolist()} are not found at their slots")


def _check_row_columns(table, columns: dict, n: int, where: str) -> None:
    name = "row columns"
    its, changed, stamps, counts = (columns[k][:n] for k in ("iterations", "changed", "stamps", "counts"))
    _require(not n or (its.min() >= 0 and counts.min() >= 0), where, name, "negative iterations or access counts")
    _require(not n or (changed.min() >= 0 and changed.max() <= table.version), where, name,
             lambda: f"change versions in [{changed.min()}, {changed.max()}], the table is at version {table.version}")
    clock = table.version if isinstance(table.eviction, TTLEviction) else table.ops
    _require(not n or (stamps.min() >= 0 and stamps.max() <= clock), where, name,
             lambda: f"access stamps in [{stamps.min()}, {stamps.max()}], the access clock is at {clock}")
    if isinstance(table.eviction, TTLEviction) and n:
        max_idle, idle = table.eviction.max_idle_steps, table.version - stamps
        _require(idle.max() <= max_idle, where, name,
                 lambda: f"{int((idle > max_idle).sum())} stored rows idle for more than {max_idle} pushes")
