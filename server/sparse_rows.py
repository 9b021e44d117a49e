"""Row-sparse tables: ``RowTableShard`` keeps the rows of ONE table ``(num_rows, dim)`` that one shard owns,
lazily — plain logic, no Ray (the actor wraps it as it wraps ``ShardState``).

* **Ownership** — ``row_index.row_owner``: rows are spread over the shards by a multiplicative hash.
* **Lazy rows** — only rows pushed (and admitted) so far are stored: an open-addressing index ``row id ->
  slot`` (``RowIndex``) over growable contiguous arrays ``values (n, dim)``, ``state (slots, n, dim)`` (the dense
  updater's layout over the n stored rows), ``iterations (n,)`` and four int64 bookkeeping columns (the table
  version that last changed the row, its last access, its access count, its id). A row never stored costs
  nothing; its value is ``initial(row_ids)`` recomputed on demand, so ``initial`` must be deterministic per row:
  zeros (``None``), a counter-based hash (``HashedUniformInit``: the same value on any shard count, in any
  order, never a table-sized allocation), or an explicit array (memory: the owned rows, values only; no state).
* **Per-row updates** — duplicate ids of one push are summed (in the given order, in the updater's compute
  dtype); then every touched row takes ONE step of the dense updater with its OWN iteration count (bias
  correction: Adam's ``alpha_t`` of a row pushed 3 times uses ``t = 3`` even if the table saw 1000 pushes):
  server/row_updates.py, a reference path and a vectorized one. Cost is proportional to the rows touched.
* **Admission and eviction** (server/row_policies.py) — a push stores a new row only once the admission
  policy admits its id (else the row's gradient is dropped and counted); under a cap the rows the eviction
  policy picks are dropped first, their slots reused (the last stored rows move into the holes, so the stored
  rows stay ``[0, n)`` and memory stays within the cap: the arrays never grow past it).
* **Changes** — every push is one table version; a row remembers the version that last changed it, and the
  evicted ids are logged with theirs (at most ``log_limit`` ids; older entries are dropped and the horizon
  moves). ``export_since`` (a serving delta) and incremental checkpoints (server/checkpoints/row_records.py)
  read both; those methods live in server/row_changes.py (``RowTableChanges``, a mixin of ``RowTableShard``).
  ``epoch`` (random, new at construction and at every restore) tells apart states a token could mix up.
"""

from __future__ import annotations

import uuid
from typing import Callable

import numpy as np

from ..updaters.base import Updater, state_dtype_for
from ..updaters.groups import ParamGroup
from . import row_policies as policies
from . import row_checks, row_updates, shard_invariants
from .checkpoints.format import CheckpointError
from .row_changes import COLUMNS, RowTableChanges
from .row_index import RowIndex, row_owner

TABLE_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
KERNELS = ("auto", "reference")


# -- the table shard ---------------------------------------------------------------------------------------
class RowTableShard(RowTableChanges):
    """The rows of table ``name`` (``num_rows x dim``, ``dtype``) owned by shard ``shard_index`` of ``num_shards``.

    ``updater``: an ``Updater`` or a ``ParamGroup`` (its L1/L2/WeightDecay apply per row; gradient
    normalization is refused: a per-layer norm over whichever rows a push touches has no DL4J meaning).
    ``initial``: ``None`` (zeros), a callable ``initial(row_ids) -> (len(row_ids), dim)`` (deterministic per
    row, e.g. ``HashedUniformInit``) or an array ``(num_rows, dim)`` (the owned rows are copied).
    ``admission``/``eviction``: None or a policy of server/row_policies.py.
    Every method validates everything before it changes anything.
    """

    def __init__(self, name: str, num_rows: int, dim: int, dtype, shard_index: int, num_shards: int,
                 updater, initial=None, admission=None, eviction=None):
        self.name = name
        for field, value, low in (("num_rows", num_rows, 1), ("dim", dim, 1), ("num_shards", num_shards, 1),
                                  ("shard_index", shard_index, 0)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"table {name!r}: {field} must be an integer >= {low}, got {value!r}")
        if not shard_index < num_shards:
            raise ValueError(f"table {name!r}: shard_index {shard_index} is not in [0, {num_shards})")
        self.num_rows, self.dim = int(num_rows), int(dim)
        self.shard_index, self.num_shards = int(shard_index), int(num_shards)
        self.dtype = np.dtype(dtype)
        if self.dtype not in TABLE_DTYPES:
            raise ValueError(f"table {name!r}: dtype must be float16, float32 or float64, got {self.dtype}")
        self.group = updater if isinstance(updater, ParamGroup) else None
        self.updater = updater.updater if isinstance(updater, ParamGroup) else updater
        if not isinstance(self.updater, Updater):
            raise TypeError(f"table {name!r}: updater must be an Updater or a ParamGroup, got {type(updater).__name__}")
        if self.group is not None and self.group.gradient_normalization != "None":
            raise ValueError(f"table {name!r}: gradient normalization {self.group.gradient_normalization!r} is not "
                             f"supported on a row-sparse table (use 'None')")
        policies.check_policy(f"table {name!r}", "admission", admission, policies.ADMISSIONS)
        policies.check_policy(f"table {name!r}", "eviction", eviction, policies.EVICTIONS)
        self.admission, self.eviction = admission, eviction
        self.cap = policies.shard_cap(eviction, self.num_shards, f"table {name!r}")
        self.sketch = policies.CountMinSketch(admission) if isinstance(admission, policies.CountAdmission) else None
        self.log_limit = policies.eviction_log_limit(self.cap)
        self.state_dtype = state_dtype_for(self.dtype)
        self.slots = len(self.updater.state_keys)
        self._initial, self._initial_rows_owned = self._check_initial(initial)
        self._reset_storage(0)
        self.version = 0  # pushes applied to this table shard (the TTL clock)
        self.ops = 0  # pushes and pulls (the LRU/LFU clock)
        self.new_epoch()
        self.counters = {"pushes": 0, "rows_pushed": 0, "unique_rows_pushed": 0, "rows_pulled": 0,
                         "bytes_pushed": 0, "bytes_pulled": 0, "admitted": 0, "evicted": 0, "dropped_gradients": 0}

    def new_epoch(self) -> None:
        """A new identity for tokens and checkpoint chains; tombstones before now are forgotten."""
        self.epoch = uuid.uuid4().hex[:12]
        self.horizon = self.version  # deltas since a version below this one cannot be told
        self._evicted_log: list[tuple[int, np.ndarray]] = []
        self._evicted_logged = 0

    # -- storage -------------------------------------------------------------------------------------------
    def _reset_storage(self, capacity: int) -> None:
        """Arrays for ``capacity`` rows; under a cap, for the cap at once: ``np.zeros`` pages become resident
        only when rows are written, and the arrays never need a grow-and-copy (which would hold old and new)."""
        if self.cap is not None:
            capacity = max(capacity, self.cap)
        self.index = RowIndex(2 * capacity + 1)
        self.n = 0
        self._ids = np.zeros(capacity, dtype=np.int64)
        self._values = np.zeros((capacity, self.dim), dtype=self.dtype)
        self._state = np.zeros((self.slots, capacity, self.dim), dtype=self.state_dtype)
        self._iterations = np.zeros(capacity, dtype=np.int64)
        self._changed = np.zeros(capacity, dtype=np.int64)
        self._stamps = np.zeros(capacity, dtype=np.int64)
        self._counts = np.zeros(capacity, dtype=np.int64)

    def _columns(self) -> tuple:
        return (self._ids, self._iterations, self._changed, self._stamps, self._counts)

    def _append(self, ids: np.ndarray, values: np.ndarray, state=None, columns=None) -> np.ndarray:
        """Store new rows (ids unique and absent); returns their slots. ``columns``: iterations, changed, stamps
        and counts (default 0, this version, now, 0)."""
        start, stop = self.n, self.n + len(ids)
        if stop > len(self._ids):
            capacity = max(stop, 2 * len(self._ids), 64)
            if self.cap is not None:
                capacity = max(stop, min(capacity, self.cap))  # never past the cap
            old = (self._values, self._state) + self._columns()
            self._values = np.zeros((capacity, self.dim), self.dtype)
            self._state = np.zeros((self.slots, capacity, self.dim), self.state_dtype)
            self._values[:start], self._state[:, :start] = old[0][:start], old[1][:, :start]
            for attr, column in zip(("_ids", "_iterations", "_changed", "_stamps", "_counts"), old[2:]):
                grown = np.zeros(capacity, np.int64)
                grown[:start] = column[:start]
                setattr(self, attr, grown)
        self._ids[start:stop] = ids
        self._values[start:stop] = values
        if state is None:
            for slot, value in enumerate(self.updater.state_initial_values()):
                self._state[slot, start:stop] = value
        else:
            self._state[:, start:stop] = state
        if columns is None:
            columns = (0, self.version, self._clock(), 0)
        for column, value in zip(self._columns()[1:], columns):
            column[start:stop] = value
        slots = np.arange(start, stop, dtype=np.int64)
        self.index.insert(ids, slots)
        self.n = stop
        return slots

    def _evict(self, slots: np.ndarray, version: int) -> None:
        """Drop the rows in ``slots`` (unique): log their ids, move the last stored rows into the holes."""
        if not len(slots):
            return
        ids = self._ids[slots].copy()
        self.index.delete(ids)
        keep = self.n - len(slots)
        gone = np.zeros(self.n - keep, dtype=bool)
        gone[slots[slots >= keep] - keep] = True
        movers = keep + np.flatnonzero(~gone)
        holes = np.sort(slots[slots < keep])
        if len(holes):
            self._values[holes] = self._values[movers]
            self._state[:, holes] = self._state[:, movers]
            for column in self._columns():
                column[holes] = column[movers]
            self.index.update(self._ids[holes], holes)
        self.n = keep
        self.counters["evicted"] += len(ids)
        self._log_evicted(np.sort(ids), version)

    def _log_evicted(self, ids: np.ndarray, version: int) -> None:
        self._evicted_log.append((version, ids))
        self._evicted_logged += len(ids)
        while self._evicted_logged > self.log_limit and len(self._evicted_log) > 1:
            dropped_version, dropped = self._evicted_log.pop(0)
            self._evicted_logged -= len(dropped)
            self.horizon = max(self.horizon, dropped_version)

    def _clock(self) -> int:
        """The access clock of this table's eviction policy: pushes for TTL, pushes and pulls otherwise."""
        return self.version if isinstance(self.eviction, policies.TTLEviction) else self.ops

    # -- validation ----------------------------------------------------------------------------------------
    def _check_initial(self, initial):
        if initial is None or callable(initial):
            return initial, None
        if not isinstance(initial, np.ndarray) or initial.dtype.kind != "f":
            raise ValueError(f"table {self.name!r}: initial must be None, a callable initial(row_ids) or a float "
                             f"array, got {type(initial).__name__}")
        if initial.shape != (self.num_rows, self.dim):
            raise ValueError(f"table {self.name!r}: initial array has shape {initial.shape}, expected "
                             f"{(self.num_rows, self.dim)}")
        owned = self.owned_rows()
        rows = np.asarray(initial[owned], dtype=self.dtype)
        if not np.isfinite(rows).all():
            raise ValueError(f"table {self.name!r}: initial array contains NaN or Inf")
        return None, (owned, rows)

    def check_ids(self, ids, what: str = "ids") -> np.ndarray:
        """``ids`` as int64 after every check (1-D, integer dtype, in range, owned by this shard)."""
        return row_checks.check_row_ids(self, ids, what)

    def grads_problem(self, grads, ids: np.ndarray) -> tuple[str, bool] | None:
        """``(message, nonfinite)`` when ``grads`` cannot be pushed for ``ids``, else None (a shard's check)."""
        try:
            self._check_grads(grads, ids)
        except ValueError as error:
            return str(error), "non-finite" in str(error)
        return None

    def _check_grads(self, grads, ids: np.ndarray) -> np.ndarray:
        return row_checks.check_row_grads(self, grads, ids)

    def _initial_rows(self, ids: np.ndarray) -> np.ndarray:
        if self._initial_rows_owned is not None:
            owned, rows = self._initial_rows_owned
            return rows[np.searchsorted(owned, ids)]
        if self._initial is None:
            return np.zeros((len(ids), self.dim), dtype=self.dtype)
        rows = np.asarray(self._initial(ids))
        if rows.shape != (len(ids), self.dim) or rows.dtype.kind != "f":
            raise ValueError(f"table {self.name!r}: initial(row_ids) returned {rows.dtype}{rows.shape}, expected "
                             f"a float array of shape {(len(ids), self.dim)}")
        rows = rows.astype(self.dtype)
        if not np.isfinite(rows).all():
            raise ValueError(f"table {self.name!r}: initial(row_ids) returned NaN or Inf")
        return rows

    # -- messages ------------------------------------------------------------------------------------------
    def push_rows(self, ids, grads, epoch: int = 0, kernel: str = "auto") -> int:
        """One update of the rows in ``ids`` with ``grads`` (duplicates summed). Returns the rows updated (rows
        not admitted, or beyond a cap within this one push, are dropped and counted)."""
        if kernel not in KERNELS:
            raise ValueError(f"table {self.name!r}: kernel must be one of {KERNELS}, got {kernel!r}")
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"table {self.name!r}: epoch must be an integer >= 0, got {epoch!r}")
        ids = self.check_ids(ids, "push_rows ids")
        grads = self._check_grads(grads, ids)
        uniq, inverse = np.unique(ids, return_inverse=True)
        summed = np.zeros((len(uniq), self.dim), dtype=self.state_dtype)
        np.add.at(summed, inverse, grads.astype(self.state_dtype, copy=False))
        summed = summed.astype(self.dtype, copy=False)  # what a dense push of this dtype would carry
        slots = self.index.lookup(uniq)
        new = slots < 0
        if new.any():
            slots = self._store_new(uniq, slots, new)
        version, self.version, self.ops = self.version + 1, self.version + 1, self.ops + 1
        kept = slots >= 0
        slots, summed = slots[kept], summed[kept]
        if len(slots):
            its = self._iterations[slots]
            apply = row_updates.apply_by_count if kernel == "reference" else row_updates.apply_vectorized
            apply(self.updater, self.group, self._values, self._state, slots, summed, its, int(epoch))
            self._iterations[slots] += 1
            self._changed[slots] = version
            self._stamps[slots] = self._clock()
            self._counts[slots] += 1
        if isinstance(self.eviction, policies.TTLEviction) and self.n:
            idle = self._stamps[:self.n] < version - self.eviction.max_idle_steps  # idle > max_idle_steps
            self._evict(np.flatnonzero(idle), version)
        self.counters["pushes"] += 1
        self.counters["rows_pushed"] += len(ids)
        self.counters["unique_rows_pushed"] += len(uniq)
        self.counters["dropped_gradients"] += int(len(uniq) - len(slots))
        self.counters["bytes_pushed"] += int(grads.nbytes + ids.nbytes)
        return len(slots)

    def _store_new(self, uniq: np.ndarray, slots: np.ndarray, new: np.ndarray) -> np.ndarray:
        """Admit, make room under the cap, store; returns every row's slot (-1: dropped). The initial values are
        computed (and may raise) before anything changes."""
        version = self.version + 1  # the version of the push being applied
        candidates = uniq[new]
        sketch_plan = None
        if isinstance(self.admission, policies.CountAdmission):
            sketch_plan = self.sketch.plan(candidates)
            admitted = sketch_plan[2] >= self.admission.min_count
        elif isinstance(self.admission, policies.ProbabilityAdmission):
            admitted = self.admission.admits(candidates)
        else:
            admitted = np.ones(len(candidates), dtype=bool)
        store = candidates[admitted]
        victims = np.zeros(0, dtype=np.int64)
        if self.cap is not None and self.n + len(store) > self.cap:
            updated = slots[~new]  # the rows this push updates are not evicted for it
            need = self.n + len(store) - self.cap
            k = min(max(need, policies.eviction_batch(self.cap)), self.n - len(updated))
            victims = policies.smallest_except(self._eviction_keys(self.n), k, updated)
            store = store[:max(0, self.cap - (self.n - len(victims)))]  # the smallest ids, if any must go
        initial = self._initial_rows(store) if len(store) else None  # may raise: nothing changed yet
        if sketch_plan is not None:
            self.sketch.commit(sketch_plan, version)
        if len(victims):
            self._evict(victims, version)
            slots = self.index.lookup(uniq)  # rows moved into the holes
        if len(store):
            slots[np.searchsorted(uniq, store)] = self._append(store, initial, columns=(0, version, 0, 0))
            self.counters["admitted"] += len(store)
        return slots

    def _eviction_keys(self, n: int) -> list[np.ndarray]:
        """The eviction order of the stored rows ``[0, n)``, primary key first (see row_policies): views of the
        columns, no copies."""
        if isinstance(self.eviction, policies.LFUEviction):
            return [self._counts[:n], self._stamps[:n], self._ids[:n]]
        return [self._stamps[:n], self._ids[:n]]

    def pull_rows(self, ids) -> np.ndarray:
        """The rows of ``ids`` in the order asked, ``(len(ids), dim)``: stored rows, else their initial values.
        A pull is an access of the stored rows it reads (their recency and frequency for eviction)."""
        ids = self.check_ids(ids, "pull_rows ids")
        out, slots = self._read(ids)
        if len(ids):
            self.ops += 1
            slots = slots[slots >= 0]
            self._stamps[slots] = self._clock()
            self._counts[slots] += 1  # once per pull, even for an id asked twice
        self.counters["rows_pulled"] += len(ids)
        self.counters["bytes_pulled"] += int(out.nbytes)
        return out

    def _read(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = np.empty((len(ids), self.dim), dtype=self.dtype)
        slots = self.index.lookup(ids)
        stored = slots >= 0
        out[stored] = self._values[slots[stored]]
        if not stored.all():
            out[~stored] = self._initial_rows(ids[~stored])
        return out, slots

    # -- whole-table views ---------------------------------------------------------------------------------
    def owned_rows(self) -> np.ndarray:
        """Every row id this shard owns, sorted (O(num_rows) work, in chunks: for whole-table pulls only)."""
        chunks, step = [], 1 << 22
        for start in range(0, self.num_rows, step):
            ids = np.arange(start, min(start + step, self.num_rows), dtype=np.int64)
            chunks.append(ids[row_owner(ids, self.num_shards) == self.shard_index])
        return np.concatenate(chunks)

    def materialize(self, row_ids=None) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, rows)``: the given ids (checked) or every owned row, with their current values (not an access)."""
        ids = self.owned_rows() if row_ids is None else self.check_ids(row_ids, "materialize ids")
        return ids, self._read(ids)[0]

    def touched(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Copies of the stored rows sorted by id: ``(ids, values, state (slots, n, dim), iterations)``."""
        order = np.argsort(self._ids[:self.n], kind="stable")
        return (self._ids[:self.n][order], self._values[:self.n][order], self._state[:, :self.n][:, order],
                self._iterations[:self.n][order])

    def row_iterations(self, ids) -> np.ndarray:
        """How many pushes each row has taken since it was stored (0 for rows not stored)."""
        slots = self.index.lookup(self.check_ids(ids))
        out = np.zeros(len(slots), dtype=np.int64)
        out[slots >= 0] = self._iterations[slots[slots >= 0]]
        return out

    def allocated_bytes(self) -> int:
        """Bytes of every array this table shard holds: rows, bookkeeping, index, sketch, eviction log (under a
        cap the row arrays are allocated for the cap; their pages become resident as rows are stored)."""
        arrays = (self._values, self._state) + self._columns()
        return int(sum(a.nbytes for a in arrays) + self._fixed_bytes())

    def used_bytes(self) -> int:
        """Bytes of the stored rows (values, updater state, bookkeeping) plus the index, sketch and log."""
        per_row = self.dim * self.dtype.itemsize + self.slots * self.dim * self.state_dtype.itemsize + 8 * 5
        return int(self.n * per_row + self._fixed_bytes())

    def _fixed_bytes(self) -> int:
        return self.index.nbytes + (self.sketch.nbytes if self.sketch else 0) + 8 * self._evicted_logged

    def stats(self) -> dict:
        n = self.n
        return {"table": self.name, "shard": self.shard_index, "rows_touched": n, "rows": n,
                "value_bytes": n * self.dim * self.dtype.itemsize,
                "state_bytes": self.slots * n * self.dim * self.state_dtype.itemsize,
                "allocated_bytes": self.allocated_bytes(), "bytes": self.used_bytes(),
                "cap": self.cap, "version": self.version,
                "iterations_max": int(self._iterations[:n].max()) if n else 0, **self.counters}

    def validate(self) -> None:
        """Check every invariant of this table shard (server/shard_invariants.py); raise ``InvariantError``
        naming the first one broken. O(stored rows): for tests and debugging."""
        shard_invariants.check_row_table(self, ids=self._ids, values=self._values, state=self._state,
                                         columns=dict(zip(COLUMNS[1:], self._columns()[1:])),
                                         evicted_log=self._evicted_log, evicted_logged=self._evicted_logged)


InitialRows = Callable[[np.ndarray], np.ndarray]
__all__ = ["CheckpointError", "InitialRows", "RowTableShard", "TABLE_DTYPES"]
