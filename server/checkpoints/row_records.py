"""A row table shard's checkpoint records: a whole table (``kind: "full"``) or the changes since a version
(``kind: "delta"``), and how a base and its deltas fold back into a table — plain logic, no Ray, no files
(server/checkpoints/table_chains.py writes and reads them).

A record (msgpack map, arrays as ``checkpoint.encode_array``/``encode_ints``)::

    format "rayps-row-table", version 2, name, num_rows, dim, dtype, shard, num_shards, updater
    kind "full" | "delta", since (delta: the table version it starts from), epoch, table_version, ops
    ids, values (k, dim), state (slots, k, dim), iterations, changed, stamps, counts   (k rows, sorted by id)
    evicted      ids evicted after ``since`` and not stored at the snapshot (delta only)
    sketch       {"cells", "counts"}: the admission sketch's cells (full: the non-zero ones; delta: changed)
    counters

A delta holds the rows changed (pushed) after ``since``, so its size follows the rows touched, not the table.
Folding: start from the full record, then for each delta in order drop its evicted ids and the ids it carries,
add its rows, overwrite its sketch cells; each delta must start at the version the previous record ended at, in
the same epoch (the chain is checked). Rows only read since the base keep the access history of their last
write (a pull is not a change): after a restore the eviction order of such rows may differ from the live one.
Version-1 records (before policies) read as full records without bookkeeping.
"""

from __future__ import annotations

import numpy as np

from .. import row_policies as policies
from .format import CheckpointError, decode_array, decode_ints, encode_array, encode_ints
from ..row_index import row_owner

SNAPSHOT_FORMAT = "rayps-row-table"
SNAPSHOT_VERSION = 2
READABLE_VERSIONS = (1, 2)
INT_COLUMNS = ("iterations", "changed", "stamps", "counts")
_EMPTY_INTS = encode_ints(np.zeros(0, dtype=np.int64))


def snapshot(table, since=None) -> dict:
    """The record of ``table`` (a ``RowTableShard``): the changes since ``since = (epoch, version)`` when the
    table can tell them (same epoch, tombstones kept since then), else the whole table."""
    delta = since is not None
    if delta:
        try:
            table.check_since(*since)
        except (TypeError, ValueError):
            delta = False
    start = int(since[1]) if delta else None
    columns = table.columns(start)
    record = {"format": SNAPSHOT_FORMAT, "version": SNAPSHOT_VERSION, "name": table.name,
              "num_rows": table.num_rows, "dim": table.dim, "dtype": str(table.dtype), "shard": table.shard_index,
              "num_shards": table.num_shards, "updater": table.updater.to_config(),
              "kind": "delta" if delta else "full", "since": start, "epoch": table.epoch,
              "table_version": table.version, "ops": table.ops,
              "ids": encode_ints(columns["ids"]), "values": encode_array(columns["values"]),
              "state": encode_array(columns["state"]),
              "evicted": encode_ints(table.evicted_since(start)) if delta else _EMPTY_INTS,
              "counters": dict(table.counters)}
    record.update({name: encode_ints(columns[name]) for name in INT_COLUMNS})
    if table.sketch is not None:
        cells, counts = table.sketch.changed_since(start) if delta else table.sketch.nonzero()
        record["sketch"] = {"cells": encode_ints(cells), "counts": encode_ints(counts)}
    return record


def _meta_int(blob, key, what, minimum=0):
    value = blob.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise CheckpointError(f"{what}: {key} must be an integer >= {minimum}, got {value!r}")
    return value


def decode(blob, what: str) -> dict:
    """A record's fields and arrays, checked for consistency among themselves (not yet against a table)."""
    if not isinstance(blob, dict) or blob.get("format") != SNAPSHOT_FORMAT:
        raise CheckpointError(f"{what}: not a {SNAPSHOT_FORMAT!r} record")
    if blob.get("version") not in READABLE_VERSIONS:
        raise CheckpointError(f"{what}: version {blob.get('version')!r} is not supported "
                              f"(expected one of {list(READABLE_VERSIONS)})")
    kind = blob.get("kind", "full")
    if kind not in ("full", "delta"):
        raise CheckpointError(f"{what}: kind {kind!r} is not 'full' or 'delta'")
    out = {key: blob.get(key) for key in ("name", "num_rows", "dim", "dtype", "shard", "num_shards")}
    out.update(kind=kind, epoch=blob.get("epoch"), counters=blob.get("counters") or {},
               table_version=_meta_int(blob, "table_version", what) if "table_version" in blob else 0,
               ops=_meta_int(blob, "ops", what) if "ops" in blob else 0,
               since=_meta_int(blob, "since", what) if kind == "delta" else None)
    ids = decode_ints(blob.get("ids"), f"{what} ids")
    k = len(ids)
    values = decode_array(blob.get("values"), f"{what} values")
    state = decode_array(blob.get("state"), f"{what} state")
    out.update(ids=ids, values=values, state=state)
    for name in INT_COLUMNS:
        column = decode_ints(blob[name], f"{what} {name}") if name in blob else np.zeros(k, dtype=np.int64)
        if column.shape != (k,) or (k and column.min() < 0):
            raise CheckpointError(f"{what}: {name} must be {k} integers >= 0")
        out[name] = column
    out["evicted"] = decode_ints(blob.get("evicted", _EMPTY_INTS), f"{what} evicted")
    sketch = blob.get("sketch")
    if sketch is not None:
        if not isinstance(sketch, dict):
            raise CheckpointError(f"{what}: sketch must be a map of cells and counts")
        out["sketch"] = (decode_ints(sketch.get("cells"), f"{what} sketch cells"),
                         decode_ints(sketch.get("counts"), f"{what} sketch counts"))
    return out


def _check_fits(table, record: dict, what: str) -> None:
    expected = {"name": table.name, "num_rows": table.num_rows, "dim": table.dim, "dtype": str(table.dtype),
                "shard": table.shard_index, "num_shards": table.num_shards}
    for key, value in expected.items():
        if record.get(key) != value:
            raise CheckpointError(f"{what}: {key} is {record.get(key)!r}, this table shard has {value!r}")


def check_rows(table, ids, values, state, iterations, what: str) -> None:
    """Rows for ``table``: shapes, dtypes, finite values, ids in range and unique."""
    k = len(ids) if isinstance(ids, np.ndarray) and ids.ndim == 1 else -1
    if k < 0 or ids.dtype.kind not in "iu":
        raise CheckpointError(f"{what}: ids must be a 1-D integer array")
    checks = ((values, (k, table.dim), table.dtype, "values"),
              (state, (table.slots, k, table.dim), table.state_dtype, "updater state"))
    for array, shape, dtype, field in checks:
        if not isinstance(array, np.ndarray) or array.shape != shape or array.dtype != dtype:
            got = f"{array.dtype}{list(array.shape)}" if isinstance(array, np.ndarray) else type(array).__name__
            raise CheckpointError(f"{what}: {field} {got}, expected {dtype}{list(shape)}")
        if not np.isfinite(array).all():
            raise CheckpointError(f"{what}: {field} contain NaN or Inf")
    if not isinstance(iterations, np.ndarray) or iterations.shape != (k,) or iterations.dtype.kind not in "iu" \
            or (k and iterations.min() < 0):
        raise CheckpointError(f"{what}: iterations must be {k} integers >= 0")
    if k and (ids.min() < 0 or ids.max() >= table.num_rows):
        raise CheckpointError(f"{what}: row ids outside [0, {table.num_rows})")
    if len(np.unique(ids)) != k:
        raise CheckpointError(f"{what}: duplicate row ids")


def fold(records: list[dict], what: str) -> dict:
    """A base record and its deltas (decoded, in order) folded into one full record (see the docstring)."""
    if not records or records[0]["kind"] != "full":
        raise CheckpointError(f"{what}: a chain must start with a full record")
    current = dict(records[0])
    sketch = current.get("sketch")
    for i, delta in enumerate(records[1:], 1):
        if delta["kind"] != "delta" or delta["since"] != current["table_version"] or delta["epoch"] != current["epoch"]:
            raise CheckpointError(f"{what}: record {i} does not continue the chain (kind {delta['kind']!r}, since "
                                  f"{delta['since']!r}; the chain is at version {current['table_version']} of "
                                  f"epoch {current['epoch']!r})")
        keep = ~(np.isin(current["ids"], delta["evicted"]) | np.isin(current["ids"], delta["ids"]))
        merged = {name: np.concatenate([current[name][keep], delta[name]]) for name in ("ids",) + INT_COLUMNS}
        merged["values"] = np.concatenate([current["values"][keep], delta["values"]])
        merged["state"] = np.concatenate([current["state"][:, keep], delta["state"]], axis=1)
        order = np.argsort(merged["ids"], kind="stable")
        for name, array in merged.items():
            current[name] = array[:, order] if name == "state" else array[order]
        if delta.get("sketch") is not None:
            if sketch is None:
                sketch = delta["sketch"]
            else:  # the delta's cells overwrite the base's
                cells = np.concatenate([delta["sketch"][0], sketch[0]])
                counts = np.concatenate([delta["sketch"][1], sketch[1]])
                cells, first = np.unique(cells, return_index=True)
                sketch = (cells, counts[first])
        for key in ("table_version", "ops", "counters"):
            current[key] = delta[key]
    current["sketch"] = sketch
    return current


def restore(table, blobs, what: str) -> None:
    """Load ``blobs`` (one record, or a base then its deltas) into ``table``: every check first, then a new
    epoch (tokens and checkpoint chains of the state before the restore no longer apply)."""
    blobs = [blobs] if isinstance(blobs, dict) else list(blobs)
    records = [decode(blob, f"{what} record {i}" if len(blobs) > 1 else what) for i, blob in enumerate(blobs)]
    for record in records:
        _check_fits(table, record, what)
        check_rows(table, record["ids"], record["values"], record["state"], record["iterations"], what)
    full = fold(records, what)
    check_rows(table, full["ids"], full["values"], full["state"], full["iterations"], what)
    mine = row_owner(full["ids"], table.num_shards) == table.shard_index
    if not mine.all():
        raise CheckpointError(f"{what}: rows {full['ids'][~mine][:5].tolist()} do not belong to shard "
                              f"{table.shard_index}")
    if table.cap is not None and len(full["ids"]) > table.cap:
        raise CheckpointError(f"{what}: holds {len(full['ids'])} rows, more than this shard's cap of {table.cap}")
    cells, counts = _sketch_cells(table, full.get("sketch"), what)
    table.load_columns(full, cells, counts)
    table.version, table.ops = full["table_version"], full["ops"]
    table.new_epoch()
    for key, value in full["counters"].items():
        if key in table.counters and isinstance(value, int) and not isinstance(value, bool):
            table.counters[key] = value


def _sketch_cells(table, sketch, what):
    if table.sketch is None or sketch is None:
        return None, None
    cells, counts = sketch
    try:
        policies.check_sketch_cells(cells, counts, table.sketch.counts.size, what)
    except ValueError as error:
        raise CheckpointError(str(error)) from None
    return cells, counts


def load_rows(table, ids, values, state, iterations, what: str, strict: bool, sketch=None) -> None:
    """``RowTableShard.load_rows``: rows of any shard count (only the owned ones kept unless ``strict``); beyond
    the cap, the rows first in the eviction order with no access history (the smallest ids) are dropped."""
    check_rows(table, ids, values, state, iterations, what)
    if sketch is not None and (table.sketch is None or not isinstance(sketch, np.ndarray)
                               or sketch.shape != table.sketch.counts.shape or sketch.dtype.kind not in "iu"):
        raise CheckpointError(f"{what}: the admission sketch does not match this table's CountAdmission")
    mine = row_owner(ids, table.num_shards) == table.shard_index
    if strict and not mine.all():
        raise CheckpointError(f"{what}: rows {ids[~mine][:5].tolist()} do not belong to shard {table.shard_index}")
    ids, values, state, iterations = ids[mine].astype(np.int64), values[mine], state[:, mine], iterations[mine]
    order = np.argsort(ids, kind="stable")
    if table.cap is not None and len(order) > table.cap:
        order = order[len(order) - table.cap:]  # keep the largest ids: the smallest go first
    k = len(order)
    columns = {"ids": ids[order], "values": values[order], "state": state[:, order],
               "iterations": iterations[order].astype(np.int64), "changed": np.zeros(k, np.int64),
               "stamps": np.zeros(k, np.int64), "counts": np.zeros(k, np.int64)}
    cells = None if sketch is None else np.flatnonzero(sketch)
    table.load_columns(columns, cells, None if sketch is None else np.minimum(sketch[cells], np.iinfo(np.uint32).max))
    table.new_epoch()
