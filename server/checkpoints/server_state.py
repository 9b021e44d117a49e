"""What the whole server saves: ``ParameterServer.save`` / ``restore`` (a checkpoint directory) and
``ParameterServer.state_dict`` (the same, in memory; its map: state_dict.py).

``save`` writes every shard's snapshot (shard.py; row tables as base + delta chains, table_chains.py) and then
the manifest (``manifest_for``). ``load`` reads a directory back and ``state_dict`` asks the live shards; both
reassemble each parameter, its updater state and its iteration counter from the shards' pieces by name and
rows (``assemble``), so the result goes into any shard count (resharding). Everything read is checked (see
format.py).
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

from ...updaters.groups import ParamGroup, assign_groups
from . import format as ckpt
from . import storage
from .format import CheckpointError, decode_array, encode_array
from . import row_records, table_chains
from .state_dict import STATE_FORMAT, STATE_VERSION, slots_by_key, table_from_spec
from ..row_index import HashedUniformInit
from ..row_policies import policy_config


def manifest_for(ps) -> dict:
    tables = {name: {"num_rows": int(t.num_rows), "dim": int(t.dim), "dtype": str(np.dtype(t.dtype)),
                     "initial": t.initial.to_config() if isinstance(t.initial, HashedUniformInit) else None,
                     "admission": policy_config(t.admission), "eviction": policy_config(t.eviction)}
              for name, t in ps.tables.items()}
    return {"names": list(ps.layout.names), "shapes": {n: list(s) for n, s in ps.layout.shapes.items()},
            "dtypes": dict(ps.layout.dtypes), "groups": [g.to_config() for g in ps.groups],
            "config": dict(ps.config), "num_shards": ps.layout.num_shards, "row_tables": tables}


def _keeps_values(ps, name: str, spec: dict) -> bool:
    """Are table ``name``'s unpushed rows saved as a values array (not reproducible from its spec)?"""
    return spec["initial"] is None and ps.tables[name].initial is not None or name in ps.table_arrays


def save(ps, path):
    """Write every shard's snapshot, then the manifest (names, shapes, dtypes, groups, sha256 per blob): the
    manifest is written last, so on an object store too a reader sees the previous save or this one whole.
    ``path``: anything ``storage.directory`` takes (a local path, a URI, ``(pyarrow.fs.FileSystem, path)``)."""
    path = storage.directory(path)
    ps.flush()
    # row tables: only the changes since the chain this path holds (server/checkpoints/table_chains.py)
    chains = [table_chains.existing_chains(path, shard) for shard in range(ps.layout.num_shards)]
    snapshots = ps.shard_snapshots(since_by_shard=[table_chains.since_of(c) for c in chains])
    generation = max(_existing_generation(path) + 1, 1)
    pointers = [table_chains.write_shard(path, shard, generation, snapshot, chains[shard])[0]
                for shard, snapshot in enumerate(snapshots)]
    manifest = manifest_for(ps)
    manifest["blobs"] = [{"shard": p["shard"], "file": p["file"], "sha256": p["sha256"]} for p in pointers]
    for name, spec in manifest["row_tables"].items():  # rows never pushed: keep their values unless reproducible
        if _keeps_values(ps, name, spec):
            blob = ckpt.pack(encode_array(ps.pull([name])[name]))
            spec["values_file"] = f"table-{name}-g{generation}.blob" if ckpt.SAFE_FILE_NAME.match(name) else \
                f"table-{hashlib.sha256(name.encode()).hexdigest()[:16]}-g{generation}.blob"
            path.write(spec["values_file"], blob)
            spec["values_sha256"], spec["values_bytes"] = hashlib.sha256(blob).hexdigest(), len(blob)
    ckpt.write_manifest(path, manifest)
    return path


def state_dict(ps) -> dict:
    """What ``save`` writes, in memory and by name (the map of state_dict.py): every shard's snapshot (whole
    tables, not deltas) and the manifest, reassembled as ``load`` reassembles the files."""
    ps.flush()
    manifest = manifest_for(ps)
    snapshots = ps.shard_snapshots()
    values = {name: ps.pull([name])[name] for name, spec in manifest["row_tables"].items()
              if _keeps_values(ps, name, spec)}

    def shard_blob(shard):
        blob = snapshots[shard]
        return f"shard {shard}", dict(blob, row_tables={n: [r] for n, r in (blob.get("row_tables") or {}).items()})

    return assemble(manifest, shard_blob, lambda name, spec: values.get(name), "state_dict", "state_dict")


def _existing_generation(path) -> int:
    generation = 0
    for name in path.names():
        match = re.fullmatch(r"shard-(\d+)\.msgpack", name)
        if match is None:
            continue
        try:
            pointer = ckpt.read_pointer(path, int(match.group(1)))
        except (ValueError, OSError, CheckpointError):
            continue
        if pointer and isinstance(pointer.get("generation"), int):
            generation = max(generation, pointer["generation"])
    return generation


def _field(manifest: dict, key: str, kind, what: str):
    value = manifest.get(key)
    if not isinstance(value, kind):
        raise CheckpointError(f"{what}: field {key!r} is missing or not a {getattr(kind, '__name__', kind)}")
    return value


def load(path) -> dict:
    """The server state a checkpoint directory holds, as ``state_dict`` returns it (state_dict.py); every file
    checked (size, sha256, format, shapes) before it is used."""
    path = storage.directory(path)
    manifest = ckpt.read_manifest(path)
    what = path.describe(ckpt.MANIFEST_NAME)
    listed = {b.get("shard"): b for b in manifest.get("blobs") or [] if isinstance(b, dict)}

    def shard_blob(shard):
        pointer = ckpt.read_pointer(path, shard)
        if pointer is None:
            raise CheckpointError(f"{path}: shard-{shard}.msgpack is missing")
        entry = listed.get(shard)
        if entry is not None and (entry.get("file") != pointer.get("file") or
                                  entry.get("sha256") != pointer.get("sha256")):
            raise CheckpointError(f"{path}: shard {shard}'s pointer does not match the manifest's blob list")
        blob = ckpt.read_shard(path, pointer)
        return pointer["file"], table_chains.read_tables(path, blob, pointer["file"])[0]  # tables: base + deltas

    return assemble(manifest, shard_blob, lambda name, spec: _saved_values(path, spec), what, str(path))


def _saved_values(path, spec: dict):
    """A table's saved values array (None when its spec names no values file)."""
    if not spec.get("values_file"):
        return None
    file_name = ckpt.checked_name(path, spec["values_file"])
    file = path.describe(file_name)
    declared = spec.get("values_bytes")
    if isinstance(declared, bool) or not isinstance(declared, int) or declared < 0:
        raise CheckpointError(f"{file}: declared size {declared!r} is not a valid byte count")
    data = ckpt.read_capped(path, file_name, declared, "table values")
    if len(data) != spec.get("values_bytes") or hashlib.sha256(data).hexdigest() != spec.get("values_sha256"):
        raise CheckpointError(f"{file}: size or sha256 does not match the manifest (corrupted or tampered)")
    return decode_array(ckpt.unpack(data, str(file), len(data)), str(file))


def assemble(manifest: dict, shard_blob, table_values, what: str, where: str) -> dict:
    """The state dict (state_dict.py) of a manifest and its shards' blobs: ``shard_blob(shard) -> (name, blob)``
    with each table's records in order; ``table_values(name, spec)``: a table's saved values or None. Every
    piece is checked and placed by name and rows, so the shards may be any number."""
    names = _field(manifest, "names", list, what)
    shapes = _field(manifest, "shapes", dict, what)
    dtypes = _field(manifest, "dtypes", dict, what)
    num_shards = _field(manifest, "num_shards", int, what)
    config = _field(manifest, "config", dict, what)
    if not names or not all(isinstance(n, str) for n in names) or set(names) != set(shapes) or set(names) != set(dtypes):
        raise CheckpointError(f"{what}: names, shapes and dtypes do not list the same parameters")
    for name in names:
        shape = shapes[name]
        if not isinstance(shape, list) or not all(isinstance(d, int) and 0 < d < 1 << 40 for d in shape):
            raise CheckpointError(f"{what}: shape of {name!r} is {shape!r}, expected positive integers")
        if dtypes[name] not in ckpt.ALLOWED_DTYPES:
            raise CheckpointError(f"{what}: dtype of {name!r} is {dtypes[name]!r}")
    tables = _tables(manifest.get("row_tables") or {}, table_values, what)
    try:
        groups = tuple(ParamGroup.from_config(g) for g in _field(manifest, "groups", list, what))
        group_of = assign_groups(groups, names + list(tables))
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{what}: updater/group config is invalid: {error}") from None
    if not 1 <= num_shards <= 1 << 16:
        raise CheckpointError(f"{what}: num_shards {num_shards} is out of range")

    params = {n: np.full(shapes[n], np.nan, dtype=dtypes[n]) for n in names}
    keys = {n: groups[group_of[n]].updater.state_keys for n in list(names) + list(tables)}
    slots = {n: len(keys[n]) for n in names}
    state = {n: None for n in names}
    iterations: dict[str, int] = {}
    covered = {n: np.zeros(shapes[n][0] if shapes[n] else 1, dtype=np.int64) for n in names}
    table_parts = {name: [] for name in tables}
    for shard in range(num_shards):
        file, blob = shard_blob(shard)
        records = blob.get("pieces")
        if not isinstance(records, list):
            raise CheckpointError(f"{file}: pieces must be a list")
        for record in records:
            _place(record, params=params, state=state, iterations=iterations, covered=covered, shapes=shapes,
                   slots=slots, what=file)
        for name, chain in blob["row_tables"].items():
            if name not in tables:
                raise CheckpointError(f"{file}: row table {name!r} is not in the manifest")
            rows = row_records.fold([row_records.decode(record, f"{file} table {name!r}") for record in chain],
                                    f"{file} table {name!r}")
            table_parts[name].append(rows)
    for name in names:
        if not (covered[name] == 1).all():
            raise CheckpointError(f"{where}: the shards do not hold every row of {name!r} exactly once")
    row_tables = {}
    for name, (spec, values) in tables.items():
        entry = row_tables[name] = {"spec": spec} if values is None else {"spec": spec, "values": values}
        parts = table_parts[name]
        if parts:
            entry.update(ids=np.concatenate([p["ids"] for p in parts]),
                         rows=np.concatenate([p["values"] for p in parts]),
                         state=slots_by_key(np.concatenate([p["state"] for p in parts], axis=1),
                                                       keys[name]),  # (slots, k, dim) each
                         iterations=np.concatenate([p["iterations"] for p in parts]))
            sketch = _summed_sketch(table_from_spec(name, spec, what), [p.get("sketch") for p in parts],
                                    f"{where} table {name!r}")
            if sketch is not None:  # the sum of the old shards' admission counts: never below any id's count
                entry["sketch"] = sketch
    return {"format": STATE_FORMAT, "version": STATE_VERSION, "num_shards": num_shards,
            "config": config, "groups": [g.to_config() for g in groups], "params": params,
            "updater_state": {n: {"iteration": iterations[n], "state": slots_by_key(state[n], keys[n])}
                              for n in names},
            "row_tables": row_tables}


def _tables(specs: dict, table_values, what: str) -> dict:
    """Table name -> (its spec: the fields of a ``RowTable``, its saved values array or None), each checked."""
    if not isinstance(specs, dict):
        raise CheckpointError(f"{what}: row_tables must be a map")
    tables = {}
    for name, spec in specs.items():
        table = table_from_spec(name, spec, what)
        values = table_values(name, spec)
        if values is not None and (values.shape != table.shape or str(values.dtype) != str(np.dtype(table.dtype))):
            raise CheckpointError(f"{what}: values of table {name!r} are {values.dtype}{list(values.shape)}, "
                                  f"expected {list(table.shape)}")
        tables[name] = ({k: spec.get(k) for k in ("num_rows", "dim", "dtype", "initial", "admission", "eviction")},
                        values)
    return tables


def _summed_sketch(table, sketches, what):
    """The cell-wise sum of the shards' admission sketches (None when the table counts none)."""
    admission = getattr(table, "admission", None)
    if admission is None or not hasattr(admission, "width") or all(s is None for s in sketches):
        return None
    dense = np.zeros(admission.width * admission.depth, dtype=np.int64)
    for sketch in sketches:
        if sketch is None:
            continue
        cells, counts = sketch
        if len(cells) != len(counts) or (len(cells) and (cells.min() < 0 or cells.max() >= dense.size)):
            raise CheckpointError(f"{what}: admission sketch cells do not fit CountAdmission(width="
                                  f"{admission.width}, depth={admission.depth})")
        np.add.at(dense, cells, counts)
    return dense


def _place(record, params, state, iterations, covered, shapes, slots, what) -> None:
    if not isinstance(record, dict) or record.get("name") not in params:
        raise CheckpointError(f"{what}: a piece names an unknown parameter {record.get('name') if isinstance(record, dict) else record!r}")
    name = record["name"]
    shape = tuple(shapes[name])
    start, stop = record.get("row_start"), record.get("row_stop")
    rows = shape[0] if shape else 1
    if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start < stop <= rows):
        raise CheckpointError(f"{what}: piece of {name!r} has rows [{start!r}, {stop!r}) outside [0, {rows})")
    piece_shape = ((stop - start),) + shape[1:] if shape else ()
    values = decode_array(record.get("params"), f"{what} {name!r} params")
    slot_values = decode_array(record.get("state"), f"{what} {name!r} state")
    if values.shape != piece_shape or str(values.dtype) != str(params[name].dtype):
        raise CheckpointError(f"{what}: piece of {name!r} is {values.dtype}{list(values.shape)}, expected "
                              f"{params[name].dtype}{list(piece_shape)}")
    if slot_values.shape != (slots[name],) + piece_shape:
        raise CheckpointError(f"{what}: updater state of {name!r} has shape {list(slot_values.shape)}, expected "
                              f"{[slots[name], *piece_shape]}")
    if not (np.isfinite(values).all() and np.isfinite(slot_values).all()):
        raise CheckpointError(f"{what}: piece of {name!r} contains NaN or Inf")
    iteration = record.get("iteration")
    if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
        raise CheckpointError(f"{what}: iteration of {name!r} is {iteration!r}")
    if state[name] is None:
        state[name] = np.zeros((slots[name],) + shape, dtype=slot_values.dtype)
    if shape:
        params[name][start:stop] = values
        state[name][:, start:stop] = slot_values
    else:
        params[name][...] = values
        state[name][...] = slot_values
    covered[name][start:stop] += 1
    if iterations.setdefault(name, iteration) != iteration:
        raise CheckpointError(f"{what}: pieces of {name!r} disagree on the iteration count")


def piece_states(layout, shard: int, named_state) -> list:
    """Per piece of ``shard``: (updater state slice, iteration) from whole-parameter state."""
    out = []
    for piece in layout.shard_pieces[shard]:
        slots, iteration = named_state[piece.name]
        part = slots[:, piece.row_start:piece.row_stop] if slots.ndim > 1 else slots
        out.append((np.ascontiguousarray(part), iteration))
    return out
