"""The whole server as one in-memory map by parameter name: ``ParameterServer.state_dict()`` returns it,
``ParameterServer.from_state_dict(state)`` builds a server from it (``restore`` reads one from a checkpoint
directory, server_state.py, and goes through the same call)::

    {"format": "rayps-server-state", "version": 1,
     "num_shards": int, "config": {"consistency", "staleness", "num_workers", "nan_policy", "compression",
                                   "flush_denormals", ...},
     "groups": [ParamGroup.to_config(), ...],                  the updater and its group of every parameter
     "params": {name: array},                                  every dense parameter, its shape and dtype
     "updater_state": {name: {"iteration": int,                 updates the parameter has taken
                              "state": {state key: array}}},    each of the rule's slots (``Updater.state_keys``,
                                                                e.g. Adam's "M", "V"), the parameter's shape
     "row_tables": {name: {"spec": {"num_rows", "dim", "dtype", "initial", "admission", "eviction"},
                           "values": array (num_rows, dim),     only where unpushed rows are not reproducible
                           "ids": int64 (k,), "rows": (k, dim), "state": {state key: (k, dim)},
                           "iterations": int64 (k,),            the k stored rows, sorted by shard
                           "sketch": int64 cells}}}             the admission counts (count admission only)

Arrays are NumPy arrays, everything else plain msgpack types; ``to_bytes``/``from_bytes`` turn it into one
msgpack message and back (arrays as raw bytes, never pickle; read with the caps of format.py). It holds what
``save`` writes reassembled by name, so it loads into any shard count; a shard's run bookkeeping (exactly-once
sequence numbers, worker clocks, pending sync steps) belongs to the running server and is not part of it, as
``restore`` never used it either. ``server_args`` checks every field (errors name it) before anything starts.
"""

from __future__ import annotations

import numpy as np

from ...updaters.groups import ParamGroup, assign_groups
from ..row_index import HashedUniformInit
from ..row_policies import policy_from_config
from ..row_tables import RowTable
from ..shard_spec import InitialState
from . import format as ckpt
from .format import CheckpointError, decode_array, decode_ints, encode_array, encode_ints

STATE_FORMAT = "rayps-server-state"
STATE_VERSION = 1
RESTORED_CONFIG = ("consistency", "staleness", "num_workers", "nan_policy", "compression", "flush_denormals")
MAX_STATE_BYTES = ckpt.MAX_BLOB_BYTES
_ARRAY = "__rayps_array__"


def table_from_spec(name: str, spec, what: str) -> RowTable:
    """The ``RowTable`` a table's saved spec describes (CheckpointError naming the table when malformed)."""
    try:
        initial = spec.get("initial")
        initial = HashedUniformInit(**{k: v for k, v in initial.items() if k != "type"}) if initial else None
        return RowTable(spec["num_rows"], spec["dim"], spec["dtype"], initial=initial,
                        admission=policy_from_config(spec.get("admission")),
                        eviction=policy_from_config(spec.get("eviction")))
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{what}: row table {name!r} is malformed ({error})") from None


def slots_by_key(slots: np.ndarray, keys) -> dict:
    """``(len(keys), *shape)`` slots as ``{key: slot}``."""
    return {key: slots[i] for i, key in enumerate(keys)}


def _stacked(state, keys, shape, what: str) -> np.ndarray:
    """``{key: array of shape}`` back into ``(len(keys), *shape)`` slots; the keys must be the rule's."""
    if not isinstance(state, dict) or sorted(state) != sorted(keys):
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{what}: state keys {got} are not the updater's {sorted(keys)}")
    for key in keys:
        value = state[key]
        if not isinstance(value, np.ndarray) or value.shape != tuple(shape):
            raise CheckpointError(f"{what}[{key!r}]: expected an array of shape {list(shape)}, got "
                                  f"{list(value.shape) if isinstance(value, np.ndarray) else type(value).__name__}")
    if not keys:
        return np.zeros((0,) + tuple(shape), dtype=np.float32)
    return np.ascontiguousarray(np.stack([state[key] for key in keys]))


def _field(state: dict, key: str, kind, what: str):
    value = state.get(key)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise CheckpointError(f"{what}: field {key!r} is missing or not a {getattr(kind, '__name__', kind)}")
    return value


def server_args(state, what: str = "state_dict") -> dict:
    """The ``ParameterServer`` constructor arguments of ``state`` (params with the tables' entries, updater,
    num_shards, sparse, the restored config, initial_state), every field checked."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{what}: expected a map, got {type(state).__name__}")
    if state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
        raise CheckpointError(f"{what}: format {state.get('format')!r} version {state.get('version')!r} is not "
                              f"{STATE_FORMAT!r} version {STATE_VERSION}")
    num_shards = _field(state, "num_shards", int, what)
    config = _field(state, "config", dict, what)
    params = _field(state, "params", dict, what)
    updater_state = _field(state, "updater_state", dict, what)
    specs = state.get("row_tables") or {}
    if not isinstance(specs, dict):
        raise CheckpointError(f"{what}: field 'row_tables' must be a map")
    for name, value in params.items():
        if not isinstance(value, np.ndarray):
            raise CheckpointError(f"{what}: params[{name!r}] is a {type(value).__name__}, expected an array")
    try:
        groups = tuple(ParamGroup.from_config(g) for g in _field(state, "groups", list, what))
        group_of = assign_groups(groups, list(params) + list(specs))
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{what}: field 'groups' is invalid: {error}") from None
    if set(updater_state) != set(params):
        raise CheckpointError(f"{what}: updater_state names {sorted(updater_state)}, params {sorted(params)}")
    named_state = {}
    for name, entry in updater_state.items():
        where = f"{what}: updater_state[{name!r}]"
        if not isinstance(entry, dict):
            raise CheckpointError(f"{where}: expected a map with 'iteration' and 'state'")
        keys = groups[group_of[name]].updater.state_keys
        named_state[name] = (_stacked(entry.get("state"), keys, params[name].shape, f"{where}['state']"),
                             _field(entry, "iteration", int, where))
    tables, table_rows = {}, {}
    for name, entry in specs.items():
        where = f"{what}: row_tables[{name!r}]"
        if not isinstance(entry, dict):
            raise CheckpointError(f"{where}: expected a map with 'spec'")
        table = table_from_spec(name, entry.get("spec"), what)
        values = entry.get("values")
        if values is not None and (not isinstance(values, np.ndarray) or values.shape != table.shape):
            raise CheckpointError(f"{where}['values']: expected an array of shape {list(table.shape)}")
        tables[name] = table if values is None else values
        if "ids" in entry:
            keys = groups[group_of[name]].updater.state_keys
            rows = [entry.get(k) for k in ("ids", "rows")]
            if not all(isinstance(a, np.ndarray) for a in rows):
                raise CheckpointError(f"{where}: 'ids' and 'rows' must be arrays")
            stored = (rows[0], rows[1], _stacked(entry.get("state"), keys, rows[1].shape, f"{where}['state']"),
                      entry.get("iterations"))
            table_rows[name] = stored + ((entry["sketch"],) if entry.get("sketch") is not None else ())
    overrides = {k: v for k, v in config.items() if k in RESTORED_CONFIG}
    return {"params": dict(params, **tables), "updater": list(groups), "num_shards": num_shards,
            "sparse": list(tables) or None, **overrides,
            "initial_state": InitialState(updater_state=named_state, table_rows=table_rows)}


# -- bytes -------------------------------------------------------------------------------------------------
def _encoded(value):
    if isinstance(value, np.ndarray):
        return {_ARRAY: encode_ints(value) if value.dtype.kind in "iu" else encode_array(value)}
    if isinstance(value, dict):
        return {key: _encoded(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encoded(item) for item in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _decoded(value, what: str):
    if isinstance(value, dict):
        if set(value) == {_ARRAY}:
            record = value[_ARRAY]
            if isinstance(record, dict) and record.get("dtype") == "int64":
                return decode_ints(record, what)
            return decode_array(record, what)
        return {key: _decoded(item, f"{what}[{key!r}]") for key, item in value.items()}
    if isinstance(value, list):
        return [_decoded(item, what) for item in value]
    return value


def to_bytes(state: dict) -> bytes:
    """``state`` as one msgpack message (arrays as raw bytes)."""
    return ckpt.pack(_encoded(state))


def from_bytes(data: bytes, what: str = "state_dict bytes") -> dict:
    """``to_bytes``' message back (msgpack limits while unpacking, every array checked; ``server_args`` checks
    the rest)."""
    return _decoded(ckpt.unpack(data, what, MAX_STATE_BYTES), what)
