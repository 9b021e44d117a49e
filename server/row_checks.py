"""What a row-sparse table shard checks in a push or pull before it changes anything (``RowTableShard``):
ids 1-D, integer, in range and owned by the shard; gradients float, one row of ``dim`` per id, finite. Errors
name the table and the field."""

from __future__ import annotations

import numpy as np

from .row_index import row_owner


def check_row_ids(table, ids, what: str) -> np.ndarray:
    """``ids`` as int64 after every check (1-D, integer dtype, in range, owned by ``table``'s shard)."""
    where = f"table {table.name!r}: {what}"
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise ValueError(f"{where} must be a 1-D array of row ids, got shape {ids.shape}")
    if ids.size == 0:
        return np.zeros(0, dtype=np.int64)
    if ids.dtype.kind not in "iu":
        kind = "booleans are not row ids" if ids.dtype.kind == "b" else "row ids are integers"
        raise ValueError(f"{where} must have an integer dtype, got {ids.dtype} ({kind})")
    if ids.min() < 0:
        raise ValueError(f"{where}: negative row ids {ids[ids < 0][:5].tolist()}; rows are 0..{table.num_rows - 1}")
    if ids.max() >= table.num_rows:
        bad = ids[ids >= table.num_rows][:5].tolist()
        raise ValueError(f"{where}: row ids {bad} out of range; the table has {table.num_rows} rows "
                         f"(0..{table.num_rows - 1})")
    ids = ids.astype(np.int64, copy=False)
    owners = row_owner(ids, table.num_shards)
    foreign = owners != table.shard_index
    if foreign.any():
        raise ValueError(f"{where}: row ids {ids[foreign][:5].tolist()} belong to shard(s) "
                         f"{sorted(set(owners[foreign][:5].tolist()))}, not shard {table.shard_index} "
                         f"(route ids with row_owner(ids, {table.num_shards}))")
    return ids


def check_row_grads(table, grads, ids: np.ndarray) -> np.ndarray:
    """``grads`` for ``ids`` after every check (float, ``(len(ids), dim)``, finite)."""
    where = f"table {table.name!r}: grads"
    if not isinstance(grads, np.ndarray):
        raise ValueError(f"{where} must be a NumPy float array, got {type(grads).__name__}")
    if grads.dtype.kind != "f":
        raise ValueError(f"{where} must have a float dtype, got {grads.dtype}")
    if grads.ndim != 2 or grads.shape[1] != table.dim:
        raise ValueError(f"{where} has shape {grads.shape}, expected ({len(ids)}, {table.dim}): one row of "
                         f"dim {table.dim} per id")
    if grads.shape[0] != len(ids):
        raise ValueError(f"{where} has {grads.shape[0]} rows but {len(ids)} ids were given (one row per id)")
    finite = np.isfinite(grads).all(axis=1)
    if not finite.all():
        raise ValueError(f"{where}: non-finite value (NaN or Inf) in the rows of ids {ids[~finite][:5].tolist()}")
    return grads
