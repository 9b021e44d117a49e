"""Row-sparse tables: ``RowTableShard`` keeps the rows of ONE table ``(num_rows, dim)`` that one shard owns,
lazily — plain logic, no Ray (the actor wraps it as it wraps ``ShardState``).

* **Ownership** — ``row_index.row_owner``: rows are spread over the shards by a multiplicative hash.
* **Lazy rows** — only rows pushed so far are stored: an open-addressing index ``row id -> slot``
  (``RowIndex``) over growable contiguous arrays ``values (n, dim)``, ``state (slots, n, dim)`` (the dense
  updater's layout over the n stored rows) and ``iterations (n,)``. A row never pushed costs nothing; its
  value is ``initial(row_ids)`` recomputed on demand, so ``initial`` must be deterministic per row: zeros
  (``None``), a counter-based hash (``HashedUniformInit``: the same value on any shard count, in any order,
  never a table-sized allocation), or an explicit array (memory: the owned rows, values only; no state).
* **Per-row updates** — duplicate ids of one push are summed (in the given order, in the updater's compute
  dtype); then every touched row takes ONE step of the dense updater with its OWN iteration count (bias
  correction: Adam's ``alpha_t`` of a row pushed 3 times uses ``t = 3`` even if the table saw 1000 pushes).
  ``kernel="reference"`` groups rows by iteration count and calls ``updater.apply(kernel="reference")`` on a
  gathered copy per count (the contract path); ``kernel="auto"`` does one vectorized pass with per-row
  scalars (columns ``(k, 1)`` in the compute dtype, so the math is the same as the float scalars of the
  reference path). Cost is proportional to the rows touched, never to the table.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ..updaters.base import NO_ADJUSTMENTS, StepAdjustments, Updater, state_dtype_for
from ..updaters.groups import ParamGroup
from .checkpoint import CheckpointError, decode_array, decode_ints, encode_array, encode_ints
from .row_index import RowIndex, row_owner

TABLE_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
SNAPSHOT_FORMAT = "rayps-row-table"
SNAPSHOT_VERSION = 1
KERNELS = ("auto", "reference")
# -- the table shard ---------------------------------------------------------------------------------------
class RowTableShard:
    """The rows of table ``name`` (``num_rows x dim``, ``dtype``) owned by shard ``shard_index`` of ``num_shards``.

    ``updater``: an ``Updater`` or a ``ParamGroup`` (its L1/L2/WeightDecay apply per row; gradient
    normalization is refused: a per-layer norm over whichever rows a push touches has no DL4J meaning).
    ``initial``: ``None`` (zeros), a callable ``initial(row_ids) -> (len(row_ids), dim)`` (deterministic per
    row, e.g. ``HashedUniformInit``) or an array ``(num_rows, dim)`` (the owned rows are copied).
    Every method validates everything before it changes anything.
    """

    def __init__(self, name: str, num_rows: int, dim: int, dtype, shard_index: int, num_shards: int,
                 updater, initial=None):
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
        self.state_dtype = state_dtype_for(self.dtype)
        self.slots = len(self.updater.state_keys)
        self._initial, self._initial_rows_owned = self._check_initial(initial)
        self._reset_storage(0)
        self.counters = {"pushes": 0, "rows_pushed": 0, "unique_rows_pushed": 0, "rows_pulled": 0,
                         "bytes_pushed": 0, "bytes_pulled": 0}

    # -- storage -------------------------------------------------------------------------------------------
    def _reset_storage(self, capacity: int) -> None:
        self.index = RowIndex(2 * capacity + 1)
        self.n = 0
        self._ids = np.zeros(capacity, dtype=np.int64)
        self._values = np.zeros((capacity, self.dim), dtype=self.dtype)
        self._state = np.zeros((self.slots, capacity, self.dim), dtype=self.state_dtype)
        self._iterations = np.zeros(capacity, dtype=np.int64)

    def _append(self, ids: np.ndarray, values: np.ndarray, state=None, iterations=None) -> np.ndarray:
        """Store new rows (ids unique and absent); returns their slots."""
        start, stop = self.n, self.n + len(ids)
        if stop > len(self._ids):
            capacity = max(stop, 2 * len(self._ids), 64)
            grown = (np.zeros(capacity, np.int64), np.zeros((capacity, self.dim), self.dtype),
                     np.zeros((self.slots, capacity, self.dim), self.state_dtype), np.zeros(capacity, np.int64))
            grown[0][:start], grown[1][:start] = self._ids[:start], self._values[:start]
            grown[2][:, :start], grown[3][:start] = self._state[:, :start], self._iterations[:start]
            self._ids, self._values, self._state, self._iterations = grown
        self._ids[start:stop] = ids
        self._values[start:stop] = values
        if state is None:
            for slot, value in enumerate(self.updater.state_initial_values()):
                self._state[slot, start:stop] = value
        else:
            self._state[:, start:stop] = state
        self._iterations[start:stop] = 0 if iterations is None else iterations
        slots = np.arange(start, stop, dtype=np.int64)
        self.index.insert(ids, slots)
        self.n = stop
        return slots

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
        where = f"table {self.name!r}: {what}"
        ids = np.asarray(ids)
        if ids.ndim != 1:
            raise ValueError(f"{where} must be a 1-D array of row ids, got shape {ids.shape}")
        if ids.size == 0:
            return np.zeros(0, dtype=np.int64)
        if ids.dtype.kind not in "iu":
            kind = "booleans are not row ids" if ids.dtype.kind == "b" else "row ids are integers"
            raise ValueError(f"{where} must have an integer dtype, got {ids.dtype} ({kind})")
        if ids.min() < 0:
            raise ValueError(f"{where}: negative row ids {ids[ids < 0][:5].tolist()}; rows are 0..{self.num_rows - 1}")
        if ids.max() >= self.num_rows:
            bad = ids[ids >= self.num_rows][:5].tolist()
            raise ValueError(f"{where}: row ids {bad} out of range; the table has {self.num_rows} rows "
                             f"(0..{self.num_rows - 1})")
        ids = ids.astype(np.int64, copy=False)
        owners = row_owner(ids, self.num_shards)
        foreign = owners != self.shard_index
        if foreign.any():
            raise ValueError(f"{where}: row ids {ids[foreign][:5].tolist()} belong to shard(s) "
                             f"{sorted(set(owners[foreign][:5].tolist()))}, not shard {self.shard_index} "
                             f"(route ids with row_owner(ids, {self.num_shards}))")
        return ids

    def grads_problem(self, grads, ids: np.ndarray) -> tuple[str, bool] | None:
        """``(message, nonfinite)`` when ``grads`` cannot be pushed for ``ids``, else None (a shard's check)."""
        try:
            self._check_grads(grads, ids)
        except ValueError as error:
            return str(error), "non-finite" in str(error)
        return None

    def _check_grads(self, grads, ids: np.ndarray) -> np.ndarray:
        where = f"table {self.name!r}: grads"
        if not isinstance(grads, np.ndarray):
            raise ValueError(f"{where} must be a NumPy float array, got {type(grads).__name__}")
        if grads.dtype.kind != "f":
            raise ValueError(f"{where} must have a float dtype, got {grads.dtype}")
        if grads.ndim != 2 or grads.shape[1] != self.dim:
            raise ValueError(f"{where} has shape {grads.shape}, expected ({len(ids)}, {self.dim}): one row of "
                             f"dim {self.dim} per id")
        if grads.shape[0] != len(ids):
            raise ValueError(f"{where} has {grads.shape[0]} rows but {len(ids)} ids were given (one row per id)")
        finite = np.isfinite(grads).all(axis=1)
        if not finite.all():
            raise ValueError(f"{where}: non-finite value (NaN or Inf) in the rows of ids {ids[~finite][:5].tolist()}")
        return grads

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
        """One update of the rows in ``ids`` with ``grads`` (duplicates summed). Returns the rows updated."""
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
            initial = self._initial_rows(uniq[new])  # may raise: nothing is stored yet
            slots[new] = self._append(uniq[new], initial)
        if len(uniq):
            its = self._iterations[slots]
            if kernel == "reference":
                self._apply_by_count(slots, summed, its, int(epoch))
            else:
                self._apply_vectorized(slots, summed, its, int(epoch))
            self._iterations[slots] += 1
        self.counters["pushes"] += 1
        self.counters["rows_pushed"] += len(ids)
        self.counters["unique_rows_pushed"] += len(uniq)
        self.counters["bytes_pushed"] += int(grads.nbytes + ids.nbytes)
        return len(uniq)

    def _adjustments(self, iteration: int, epoch: int) -> StepAdjustments:
        return NO_ADJUSTMENTS if self.group is None else self.group.adjustments(iteration, epoch)

    def _apply_by_count(self, slots, grads, its, epoch) -> None:
        """The contract path: ``updater.apply(kernel="reference")`` once per distinct iteration count."""
        for count in np.unique(its):
            sel = its == count
            rows = slots[sel]
            params, state = self._values[rows], self._state[:, rows]  # contiguous gathered copies
            self.updater.apply(params, np.ascontiguousarray(grads[sel]), state, int(count), epoch,
                               adjustments=self._adjustments(int(count), epoch), kernel="reference")
            self._values[rows], self._state[:, rows] = params, state

    def _apply_vectorized(self, slots, grads, its, epoch) -> None:
        """One pass over the touched rows with per-row scalars (``reference_step`` with scalar columns)."""
        counts, inverse = np.unique(its, return_inverse=True)
        compute = self.state_dtype

        def column(values):  # one value per distinct count -> a float if all equal, else a (k, 1) column
            if all(v == values[0] for v in values):
                return values[0]
            return np.asarray(values, dtype=compute)[inverse][:, None]

        rules = [self.updater.rule_scalars(int(c), epoch) for c in counts]
        scalars = tuple(column([r[i] for r in rules]) for i in range(len(rules[0])))
        adjust = [self._adjustments(int(c), epoch) for c in counts]
        l1, l2, decay = (column([getattr(a, f) for a in adjust]) for f in ("l1", "l2", "weight_decay"))
        w = self._values[slots].astype(compute, copy=False)
        g = grads.astype(compute)
        state = self._state[:, slots]
        if _nonzero(l1):
            g += l1 * np.sign(w)
        if _nonzero(l2):
            g += l2 * w
        update = self.updater.reference_update(g, state, scalars)
        if _nonzero(decay):
            update = update + decay * w
        w -= update
        self._values[slots] = w.astype(self.dtype, copy=False)
        self._state[:, slots] = state

    def pull_rows(self, ids) -> np.ndarray:
        """The rows of ``ids`` in the order asked, ``(len(ids), dim)``: stored rows, else their initial values."""
        ids = self.check_ids(ids, "pull_rows ids")
        out = self._read(ids)
        self.counters["rows_pulled"] += len(ids)
        self.counters["bytes_pulled"] += int(out.nbytes)
        return out

    def _read(self, ids: np.ndarray) -> np.ndarray:
        out = np.empty((len(ids), self.dim), dtype=self.dtype)
        slots = self.index.lookup(ids)
        stored = slots >= 0
        out[stored] = self._values[slots[stored]]
        if not stored.all():
            out[~stored] = self._initial_rows(ids[~stored])
        return out

    # -- whole-table views ---------------------------------------------------------------------------------
    def owned_rows(self) -> np.ndarray:
        """Every row id this shard owns, sorted (O(num_rows) work, in chunks: for whole-table pulls only)."""
        chunks, step = [], 1 << 22
        for start in range(0, self.num_rows, step):
            ids = np.arange(start, min(start + step, self.num_rows), dtype=np.int64)
            chunks.append(ids[row_owner(ids, self.num_shards) == self.shard_index])
        return np.concatenate(chunks)

    def materialize(self, row_ids=None) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, rows)``: the given ids (checked) or every owned row, with their current values."""
        ids = self.owned_rows() if row_ids is None else self.check_ids(row_ids, "materialize ids")
        return ids, self._read(ids)

    def touched(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Copies of the stored rows sorted by id: ``(ids, values, state (slots, n, dim), iterations)``."""
        order = np.argsort(self._ids[:self.n], kind="stable")
        return (self._ids[:self.n][order], self._values[:self.n][order], self._state[:, :self.n][:, order],
                self._iterations[:self.n][order])

    def row_iterations(self, ids) -> np.ndarray:
        """How many pushes each row has taken (0 for rows never pushed)."""
        slots = self.index.lookup(self.check_ids(ids))
        out = np.zeros(len(slots), dtype=np.int64)
        out[slots >= 0] = self._iterations[slots[slots >= 0]]
        return out

    def stats(self) -> dict:
        n = self.n
        allocated = (self._ids.nbytes + self._values.nbytes + self._state.nbytes + self._iterations.nbytes
                     + self.index.nbytes)
        return {"table": self.name, "shard": self.shard_index, "rows_touched": n,
                "value_bytes": n * self.dim * self.dtype.itemsize,
                "state_bytes": self.slots * n * self.dim * self.state_dtype.itemsize,
                "allocated_bytes": int(allocated),
                "iterations_max": int(self._iterations[:n].max()) if n else 0, **self.counters}

    # -- snapshots -----------------------------------------------------------------------------------------
    def snapshot(self) -> dict:
        """A msgpack-able record of the stored rows (sorted by id) and the counters."""
        ids, values, state, iterations = self.touched()
        return {"format": SNAPSHOT_FORMAT, "version": SNAPSHOT_VERSION, "name": self.name,
                "num_rows": self.num_rows, "dim": self.dim, "dtype": str(self.dtype), "shard": self.shard_index,
                "num_shards": self.num_shards, "updater": self.updater.to_config(),
                "ids": encode_ints(ids), "values": encode_array(values), "state": encode_array(state),
                "iterations": encode_ints(iterations), "counters": dict(self.counters)}

    def restore(self, blob, what: str = "row table snapshot") -> None:
        """Load a snapshot of THIS table shard (same name, shape, dtype, shard and shard count)."""
        if not isinstance(blob, dict) or blob.get("format") != SNAPSHOT_FORMAT:
            raise CheckpointError(f"{what}: not a {SNAPSHOT_FORMAT!r} record")
        if blob.get("version") != SNAPSHOT_VERSION:
            raise CheckpointError(f"{what}: version {blob.get('version')!r} is not supported "
                                  f"(expected {SNAPSHOT_VERSION})")
        expected = {"name": self.name, "num_rows": self.num_rows, "dim": self.dim, "dtype": str(self.dtype),
                    "shard": self.shard_index, "num_shards": self.num_shards}
        for key, value in expected.items():
            if blob.get(key) != value:
                raise CheckpointError(f"{what}: {key} is {blob.get(key)!r}, this table shard has {value!r}")
        rows = (decode_ints(blob.get("ids"), f"{what} ids"), decode_array(blob.get("values"), f"{what} values"),
                decode_array(blob.get("state"), f"{what} state"),
                decode_ints(blob.get("iterations"), f"{what} iterations"))
        self.load_rows(*rows, what=what, strict=True)
        for key, value in (blob.get("counters") or {}).items():
            if key in self.counters and isinstance(value, int) and not isinstance(value, bool):
                self.counters[key] = value

    def load_rows(self, ids, values, state, iterations, what: str = "rows", strict: bool = False) -> None:
        """Replace the stored rows by the given ones (every check first). ``strict=False`` keeps only the rows
        this shard owns (restoring under another shard count); ``strict=True`` refuses foreign rows."""
        k = len(ids) if isinstance(ids, np.ndarray) and ids.ndim == 1 else -1
        if k < 0 or ids.dtype.kind not in "iu":
            raise CheckpointError(f"{what}: ids must be a 1-D integer array")
        checks = ((values, (k, self.dim), self.dtype, "values"),
                  (state, (self.slots, k, self.dim), self.state_dtype, "updater state"))
        for array, shape, dtype, field in checks:
            if not isinstance(array, np.ndarray) or array.shape != shape or array.dtype != dtype:
                got = f"{array.dtype}{list(array.shape)}" if isinstance(array, np.ndarray) else type(array).__name__
                raise CheckpointError(f"{what}: {field} {got}, expected {dtype}{list(shape)}")
            if not np.isfinite(array).all():
                raise CheckpointError(f"{what}: {field} contain NaN or Inf")
        if not isinstance(iterations, np.ndarray) or iterations.shape != (k,) or iterations.dtype.kind not in "iu" \
                or (k and iterations.min() < 0):
            raise CheckpointError(f"{what}: iterations must be {k} integers >= 0")
        if k and (ids.min() < 0 or ids.max() >= self.num_rows):
            raise CheckpointError(f"{what}: row ids outside [0, {self.num_rows})")
        if len(np.unique(ids)) != k:
            raise CheckpointError(f"{what}: duplicate row ids")
        mine = row_owner(ids, self.num_shards) == self.shard_index
        if strict and not mine.all():
            raise CheckpointError(f"{what}: rows {ids[~mine][:5].tolist()} do not belong to shard {self.shard_index}")
        self._reset_storage(int(mine.sum()))
        if mine.any():
            self._append(ids[mine].astype(np.int64), values[mine], state[:, mine], iterations[mine])


def _nonzero(value) -> bool:
    return isinstance(value, np.ndarray) or value != 0


InitialRows = Callable[[np.ndarray], np.ndarray]
__all__ = ["InitialRows", "RowTableShard", "TABLE_DTYPES"]
