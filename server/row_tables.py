"""Row-sparse parameters on the server: how a user declares them and how the client routes rows to shards.

    ps = ParameterServer({"emb": RowTable(2_000_000, 16), "w": w}, sparse=["emb"], num_shards=4)
    ps.push_rows("emb", ids, grads)      # duplicates summed; cost proportional to the rows touched
    ps.pull_rows("emb", ids)             # (len(ids), 16)

    RowTable(10**9, 16, admission=CountAdmission(3), eviction=LRUEviction(1_000_000))   # a capped hashed space
    ps.export_deltas("emb", since=None) -> TableDelta(ids, values, evicted, token)     # a serving stream
    ps.table_stats("emb")                # rows, admitted, evicted, dropped_gradients, bytes (all shards)

Rows are spread over every shard by a multiplicative hash (``row_index.row_owner``), so one hot table uses
all shards. A table is given either as a ``RowTable`` spec (never materialized: rows start from ``initial``,
zeros by default, and cost memory only once pushed) or, for small tables, as a dense array of initial values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from ..updaters.base import state_dtype_for
from ..updaters.groups import ParamGroup
from . import row_policies
from .row_changes import COLUMNS
from .row_index import RowIndex, row_owner
from .sparse_rows import TABLE_DTYPES


@dataclass(frozen=True)
class RowTable:
    """A row-sparse table of ``num_rows x dim``; ``initial``: None (zeros), ``HashedUniformInit`` or any
    deterministic ``initial(row_ids) -> (k, dim)``; ``admission``: None, ``CountAdmission`` or
    ``ProbabilityAdmission``; ``eviction``: None, ``LRUEviction``, ``LFUEviction`` or ``TTLEviction``
    (server/row_policies.py has their semantics)."""

    num_rows: int
    dim: int
    dtype: str = "float32"
    initial: Any = None
    admission: Any = None
    eviction: Any = None

    def __post_init__(self):
        for field in ("num_rows", "dim"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"RowTable: {field} must be an integer >= 1, got {value!r}")
        if np.dtype(self.dtype) not in TABLE_DTYPES:
            raise ValueError(f"RowTable: dtype must be float16, float32 or float64, got {self.dtype!r}")
        if self.initial is not None and not callable(self.initial):
            raise TypeError("RowTable: initial must be None or a callable initial(row_ids)")
        row_policies.check_policy("RowTable", "admission", self.admission, row_policies.ADMISSIONS)
        row_policies.check_policy("RowTable", "eviction", self.eviction, row_policies.EVICTIONS)

    def check_shards(self, name: str, num_shards: int) -> None:
        """Can this table be split over ``num_shards`` (a cap needs at least one row per shard)?"""
        row_policies.shard_cap(self.eviction, num_shards, f"table {name!r}")

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.num_rows), int(self.dim))

    def shard_memory(self, num_shards: int, updater, op_rows: int) -> dict:
        """The documented bound on one table shard's memory under a cap (bytes; docs/sparse.md, "Memory under a
        cap"), while it takes pushes and pulls of at most ``op_rows`` ids each (on that shard). ``cap =
        max_rows // num_shards``, ``S`` the updater's state slots, ``b``/``s`` the table's and the state's
        itemsize, ``cells = RowIndex.cells_for(2 cap + 1)``:

        * ``rows``: ``cap x dim x (b + S s)`` (values and updater state; the criterion's "cap x row bytes");
        * ``bookkeeping``: ``cap x 40`` (id, iteration count, change version, last access, access count);
        * ``index``: ``16 x cells`` (``RowIndex``: 32 to 64 bytes a row of the cap, never grown under a cap);
        * ``eviction_log``: ``8 x max(4 cap, 65536)`` (the evicted ids a serving delta can still be told);
        * ``eviction_scratch`` (while a batch of victims is chosen): LRU ``9 x cap + 33 x op_rows`` (a copy of
          the access stamps for ``np.partition`` and a bool a row; the rows tied on the boundary stamp, at
          most those one operation touched); LFU ``33 x cap`` (the ties on the count may be every row);
        * ``push_scratch``: ``op_rows x (64 + (8 + S) x dim x s)`` (one push's gathered rows and temporaries).

        ``overhead`` is everything but ``rows``; ``bound = rows + overhead``. Not covered: a full checkpoint or
        export, which copies the rows it writes (sorted by id) while it runs. Refused without a cap."""
        cap = row_policies.shard_cap(self.eviction, num_shards, "RowTable.shard_memory")
        if cap is None:
            raise ValueError(f"RowTable.shard_memory: eviction must be LRUEviction or LFUEviction (a cap), got "
                             f"{type(self.eviction).__name__}")
        if isinstance(op_rows, bool) or not isinstance(op_rows, (int, np.integer)) or op_rows < 0:
            raise ValueError(f"RowTable.shard_memory: op_rows must be an integer >= 0, got {op_rows!r}")
        slots = len((updater.updater if isinstance(updater, ParamGroup) else updater).state_keys)
        value, state = np.dtype(self.dtype).itemsize, state_dtype_for(np.dtype(self.dtype)).itemsize
        lfu = isinstance(self.eviction, row_policies.LFUEviction)
        out = {"cap": cap, "rows": cap * self.dim * (value + slots * state),
               "bookkeeping": cap * 8 * len(COLUMNS),
               "index": 16 * RowIndex.cells_for(2 * cap + 1),
               "eviction_log": 8 * row_policies.eviction_log_limit(cap),
               "eviction_scratch": 33 * cap if lfu else 9 * cap + 33 * op_rows,
               "push_scratch": op_rows * (64 + (8 + slots) * self.dim * state)}
        out["overhead"] = sum(out[k] for k in ("bookkeeping", "index", "eviction_log", "eviction_scratch",
                                               "push_scratch"))
        out["bound"] = out["rows"] + out["overhead"]
        return out


def split_sparse(params: Mapping, sparse) -> tuple[dict, dict[str, RowTable], dict[str, np.ndarray]]:
    """``(dense params, tables, initial arrays of array-given tables)``; errors name the key."""
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a mapping of name -> float array, got {type(params).__name__}")
    sparse = [] if sparse is None else [sparse] if isinstance(sparse, str) else list(sparse)
    unknown = [name for name in sparse if name not in params]
    if unknown:
        raise ValueError(f"sparse names parameter(s) {unknown} that are not in params")
    tables, arrays = {}, {}
    for name in sparse:
        value = params[name]
        if isinstance(value, RowTable):
            tables[name] = value
        elif isinstance(value, np.ndarray) and value.ndim == 2 and value.dtype in TABLE_DTYPES:
            if not np.isfinite(value).all():
                raise ValueError(f"params[{name!r}] contains NaN or Inf")
            tables[name] = RowTable(value.shape[0], value.shape[1], str(value.dtype))
            arrays[name] = value
        else:
            raise TypeError(f"params[{name!r}] is sparse: give a RowTable or a 2-D float array (rows x dim), got "
                            f"{type(value).__name__} {getattr(value, 'shape', '')}")
    for name, value in params.items():
        if isinstance(value, RowTable) and name not in tables:
            raise ValueError(f"params[{name!r}] is a RowTable but not listed in sparse=[...]")
    dense = {name: value for name, value in params.items() if name not in tables}
    return dense, tables, arrays


def check_rows(name: str, table: RowTable, ids, grads=None) -> tuple[np.ndarray, np.ndarray | None]:
    """Client-side checks of a row push or pull, naming the table and the ids' problem."""
    if not isinstance(ids, np.ndarray):
        ids = np.asarray(ids)
    if ids.ndim != 1:
        raise ValueError(f"table {name!r}: ids must be a 1-D array, got shape {ids.shape}")
    if ids.dtype.kind not in "iu":
        raise TypeError(f"table {name!r}: ids must be integers, got dtype {ids.dtype}")
    if len(ids) and (ids.min() < 0 or ids.max() >= table.num_rows):
        bad = ids[(ids < 0) | (ids >= table.num_rows)][:5].tolist()
        raise ValueError(f"table {name!r}: row ids {bad} are outside [0, {table.num_rows})")
    ids = ids.astype(np.int64, copy=False)
    if grads is None:
        return ids, None
    if not isinstance(grads, np.ndarray) or grads.dtype.kind != "f":
        raise TypeError(f"table {name!r}: grads must be a float array, got {type(grads).__name__} "
                        f"{getattr(grads, 'dtype', '')}")
    if grads.shape != (len(ids), table.dim):
        raise ValueError(f"table {name!r}: grads have shape {grads.shape}, expected ({len(ids)}, {table.dim}) "
                         f"(one row per id)")
    return ids, grads


def route(ids: np.ndarray, num_shards: int) -> list[np.ndarray]:
    """Positions in ``ids`` owned by each shard."""
    owners = row_owner(ids, num_shards)
    return [np.flatnonzero(owners == shard) for shard in range(num_shards)]
