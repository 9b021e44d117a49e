"""A shard's state as a plain msgpack-able dict, and back: the content of a checkpoint blob.

Pieces are stored by name and rows (not by buffer offset), so a checkpoint restores into any shard count:
``ParameterServer.restore`` reassembles whole parameters and updater state per name and lays them out anew.
"""

from __future__ import annotations

import numpy as np

from .format import BLOB_FORMAT, VERSION, CheckpointError, decode_array, decode_ints, encode_array, encode_ints
from ..shard_state import ShardState
from ..sync_steps import SyncStep


def piece_views(state: ShardState, piece) -> tuple[np.ndarray, np.ndarray]:
    """(params, updater state) of one piece as views: shapes ``piece.shape`` and ``(slots, *piece.shape)``."""
    r = state.ranges[(piece.dtype, piece.group)]
    params = state.params[piece.dtype][piece.offset:piece.offset + piece.size].reshape(piece.shape)
    slots = state.state[(piece.dtype, piece.group)]
    lo = piece.offset - r.start
    return params, slots[:, lo:lo + piece.size].reshape((slots.shape[0],) + tuple(piece.shape))


def snapshot(state: ShardState, restarts: int = 0, since: dict | None = None) -> dict:
    """``since``: table -> ``(epoch, version)`` of the checkpoint a table's record may be a delta of
    (server/checkpoints/table_chains.py); a table without one is recorded whole."""
    pieces = []
    for piece in state.pieces:
        params, slots = piece_views(state, piece)
        pieces.append({"name": piece.name, "row_start": piece.row_start, "row_stop": piece.row_stop,
                       "params": encode_array(params), "state": encode_array(slots),
                       "iteration": int(state.iterations[piece.index])})
    sync_steps = [{"clock": clock, "workers": sorted(step.workers), "epoch": step.epoch,
                   "present": np.flatnonzero(step.present).tolist(),
                   "sums": {dtype: encode_array(a) for dtype, a in step.sums.items()},
                   "rows": {name: [{"ids": encode_ints(ids), "grads": encode_array(np.asarray(grads))}
                                   for ids, grads in parts] for name, parts in step.rows.items()}}
                  for clock, step in state.sync_steps.items()]
    return {"format": BLOB_FORMAT, "version": VERSION, "shard": state.shard_index, "pieces": pieces,
            "applied_seq": dict(state.applied_seq), "clocks": {str(w): c for w, c in state.clocks.items()},
            "sync_clock": state.sync_clock, "sync_steps": sync_steps, "model_version": state.version,
            "restarts": restarts, "counters": {k: v for k, v in state.counters.items()},
            "row_tables": {name: table.snapshot((since or {}).get(name))
                           for name, table in state.row_tables.items()}}


def _int(value, what: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise CheckpointError(f"{what}: expected an integer >= {minimum}, got {value!r}")
    return value


def check_pieces(state: ShardState, blob: dict, what: str) -> list:
    """The blob's pieces, checked against this shard's layout (names, rows, shapes, dtypes)."""
    records = blob.get("pieces")
    if not isinstance(records, list) or len(records) != len(state.pieces):
        raise CheckpointError(f"{what}: holds {len(records) if isinstance(records, list) else records!r} pieces, "
                              f"the layout of shard {state.shard_index} has {len(state.pieces)}")
    decoded = []
    for piece, record in zip(state.pieces, records):
        where = f"{what} piece {piece.name!r}"
        if not isinstance(record, dict) or record.get("name") != piece.name or \
                record.get("row_start") != piece.row_start or record.get("row_stop") != piece.row_stop:
            raise CheckpointError(f"{where}: does not match the layout (name/rows)")
        params = decode_array(record.get("params"), f"{where} params")
        slots = decode_array(record.get("state"), f"{where} state")
        expected_slots = (state.state[(piece.dtype, piece.group)].shape[0],) + tuple(piece.shape)
        if params.shape != tuple(piece.shape) or str(params.dtype) != piece.dtype:
            raise CheckpointError(f"{where}: params {params.dtype}{list(params.shape)}, expected "
                                  f"{piece.dtype}{list(piece.shape)}")
        if slots.shape != expected_slots or slots.dtype != state.state[(piece.dtype, piece.group)].dtype:
            raise CheckpointError(f"{where}: updater state {slots.dtype}{list(slots.shape)}, expected "
                                  f"{state.state[(piece.dtype, piece.group)].dtype}{list(expected_slots)}")
        if not (np.isfinite(params).all() and np.isfinite(slots).all()):
            raise CheckpointError(f"{where}: contains NaN or Inf")
        decoded.append((params, slots, _int(record.get("iteration"), f"{where} iteration")))
    return decoded


def load_pieces(state: ShardState, pieces: list) -> None:
    """Set each piece's params, updater state and iteration counter from ``(params, slots, iteration)``."""
    for piece, (params, slots, iteration) in zip(state.pieces, pieces):
        params_view, slots_view = piece_views(state, piece)
        if params is not None:
            params_view[...] = params
        slots_view[...] = slots
        state.iterations[piece.index] = iteration


def restore(state: ShardState, blob: dict, what: str) -> int:
    """Load a snapshot of THIS shard (same layout) after a restart; returns the restart count it recorded."""
    if blob.get("shard") != state.shard_index:
        raise CheckpointError(f"{what}: is shard {blob.get('shard')!r}, expected {state.shard_index}")
    pieces = check_pieces(state, blob, what)
    applied = blob.get("applied_seq")
    clocks = blob.get("clocks")
    if not isinstance(applied, dict) or not all(isinstance(k, str) for k in applied):
        raise CheckpointError(f"{what}: applied_seq must map client ids to integers")
    if not isinstance(clocks, dict):
        raise CheckpointError(f"{what}: clocks must map worker ids to integers")
    sync_steps = {}
    for record in blob.get("sync_steps") or []:
        sums = {dtype: decode_array(a, f"{what} sync sums") for dtype, a in (record.get("sums") or {}).items()}
        if set(sums) != set(state.params) or any(sums[d].shape != state.params[d].shape for d in sums):
            raise CheckpointError(f"{what}: sync step sums do not match the shard's buffers")
        present = np.zeros(len(state.pieces), dtype=bool)
        indices = [_int(i, f"{what} sync present") for i in record.get("present") or []]
        if any(i >= len(present) for i in indices):
            raise CheckpointError(f"{what}: sync step names a piece outside the layout")
        present[indices] = True
        rows = {}
        for name, parts in (record.get("rows") or {}).items():
            if name not in state.row_tables or not isinstance(parts, list):
                raise CheckpointError(f"{what}: sync step rows name unknown table {name!r}")
            rows[name] = [(decode_ints(p.get("ids"), f"{what} sync rows"), decode_array(p.get("grads"), f"{what} sync rows"))
                          for p in parts]
        sync_steps[_int(record.get("clock"), f"{what} sync clock")] = SyncStep(
            sums, present, {_int(w, f"{what} sync worker") for w in record.get("workers") or []},
            _int(record.get("epoch", 0), f"{what} sync epoch"), rows)
    tables = blob.get("row_tables") or {}
    if set(tables) != set(state.row_tables):
        raise CheckpointError(f"{what}: row tables {sorted(tables)} do not match {sorted(state.row_tables)}")
    for name, table in state.row_tables.items():  # each checks everything before it changes anything
        table.restore(tables[name], f"{what} table {name!r}")
    load_pieces(state, pieces)
    state.applied_seq = {k: _int(v, f"{what} applied_seq") for k, v in applied.items()}
    state.clocks = {}
    for key, value in clocks.items():
        if not (isinstance(key, str) and key.lstrip("-").isdigit()):
            raise CheckpointError(f"{what}: clock key {key!r} is not a worker id")
        state.clocks[int(key)] = _int(value, f"{what} clock")
    state.sync_clock = _int(blob.get("sync_clock", 0), f"{what} sync_clock")
    state.sync_steps = sync_steps
    state.version = _int(blob.get("model_version", 0), f"{what} model_version")
    for key, value in (blob.get("counters") or {}).items():
        if key in state.counters and isinstance(value, (int, float)) and not isinstance(value, bool):
            state.counters[key] = value
    state.pending = {}
    return _int(blob.get("restarts", 0), f"{what} restarts")
