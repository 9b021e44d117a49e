"""``ParameterServer.save`` / ``ParameterServer.restore``: whole-server checkpoints by parameter name.

Restoring reassembles each parameter, its updater state and its iteration counter from the shards' pieces,
so it works into any shard count (resharding), and checks everything it reads (see format.py).
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
from ..row_index import HashedUniformInit
from ..row_policies import policy_config, policy_from_config
from ..row_tables import RowTable


def manifest_for(ps) -> dict:
    tables = {name: {"num_rows": int(t.num_rows), "dim": int(t.dim), "dtype": str(np.dtype(t.dtype)),
                     "initial": t.initial.to_config() if isinstance(t.initial, HashedUniformInit) else None,
                     "admission": policy_config(t.admission), "eviction": policy_config(t.eviction)}
              for name, t in ps.tables.items()}
    return {"names": list(ps.layout.names), "shapes": {n: list(s) for n, s in ps.layout.shapes.items()},
            "dtypes": dict(ps.layout.dtypes), "groups": [g.to_config() for g in ps.groups],
            "config": dict(ps.config), "num_shards": ps.layout.num_shards, "row_tables": tables}


def save(ps, path):
    """Write every shard's snapshot, then the manifest (names, shapes, dtypes, groups, sha256 per blob): the
    manifest is written last, so on an object store too a reader sees the previous save or this one whole.
    ``path``: anything ``storage.directory`` takes (a local path, a URI, ``(pyarrow.fs.FileSystem, path)``)."""
    path = storage.directory(path)
    ps.flush()
    # row tables: only the changes since the chain this path holds (server/checkpoints/table_chains.py)
    chains = [table_chains.existing_chains(path, shard) for shard in range(ps.layout.num_shards)]
    snapshots = ps._ask_all("snapshot_record", [table_chains.since_of(c) for c in chains])
    generation = max(_existing_generation(path) + 1, 1)
    pointers = [table_chains.write_shard(path, shard, generation, snapshot, chains[shard])[0]
                for shard, snapshot in enumerate(snapshots)]
    manifest = manifest_for(ps)
    manifest["blobs"] = [{"shard": p["shard"], "file": p["file"], "sha256": p["sha256"]} for p in pointers]
    for name, spec in manifest["row_tables"].items():  # rows never pushed: keep their values unless reproducible
        if spec["initial"] is None and ps.tables[name].initial is not None or name in ps.table_arrays:
            blob = ckpt.pack(encode_array(ps.pull([name])[name]))
            spec["values_file"] = f"table-{name}-g{generation}.blob" if ckpt.SAFE_FILE_NAME.match(name) else \
                f"table-{hashlib.sha256(name.encode()).hexdigest()[:16]}-g{generation}.blob"
            path.write(spec["values_file"], blob)
            spec["values_sha256"], spec["values_bytes"] = hashlib.sha256(blob).hexdigest(), len(blob)
    ckpt.write_manifest(path, manifest)
    return path


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
    """Everything needed to rebuild the server: params, groups, config, and per-name (state, iteration)."""
    path = storage.directory(path)
    manifest = ckpt.read_manifest(path)
    what = path.describe(ckpt.MANIFEST_NAME)
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
    tables = _tables(path, manifest.get("row_tables") or {}, what)
    try:
        groups = tuple(ParamGroup.from_config(g) for g in _field(manifest, "groups", list, what))
        group_of = assign_groups(groups, names + list(tables))
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{what}: updater/group config is invalid: {error}") from None
    if not 1 <= num_shards <= 1 << 16:
        raise CheckpointError(f"{what}: num_shards {num_shards} is out of range")
    listed = {b.get("shard"): b for b in manifest.get("blobs") or [] if isinstance(b, dict)}

    params = {n: np.full(shapes[n], np.nan, dtype=dtypes[n]) for n in names}
    slots = {n: len(groups[group_of[n]].updater.state_keys) for n in names}
    state = {n: None for n in names}
    iterations: dict[str, int] = {}
    covered = {n: np.zeros(shapes[n][0] if shapes[n] else 1, dtype=np.int64) for n in names}
    table_parts = {name: [] for name in tables}
    for shard in range(num_shards):
        pointer = ckpt.read_pointer(path, shard)
        if pointer is None:
            raise CheckpointError(f"{path}: shard-{shard}.msgpack is missing")
        entry = listed.get(shard)
        if entry is not None and (entry.get("file") != pointer.get("file") or entry.get("sha256") != pointer.get("sha256")):
            raise CheckpointError(f"{path}: shard {shard}'s pointer does not match the manifest's blob list")
        blob = ckpt.read_shard(path, pointer)
        records = blob.get("pieces")
        if not isinstance(records, list):
            raise CheckpointError(f"{pointer['file']}: pieces must be a list")
        for record in records:
            _place(record, params=params, state=state, iterations=iterations, covered=covered, shapes=shapes,
                   slots=slots, what=f"{pointer['file']}")
        blob, _ = table_chains.read_tables(path, blob, pointer["file"])  # each table: a base and its deltas
        for name, chain in blob["row_tables"].items():
            if name not in tables:
                raise CheckpointError(f"{pointer['file']}: row table {name!r} is not in the manifest")
            where = f"{pointer['file']} table {name!r}"
            rows = row_records.fold([row_records.decode(record, where) for record in chain], where)
            table_parts[name].append((rows["ids"], rows["values"], rows["state"], rows["iterations"],
                                      rows.get("sketch")))
    for name in names:
        if not (covered[name] == 1).all():
            raise CheckpointError(f"{path}: the shards do not hold every row of {name!r} exactly once")
    named_state = {n: (state[n], iterations[n]) for n in names}
    table_rows = {}
    for name, parts in table_parts.items():
        if parts:
            slots = len(groups[group_of[name]].updater.state_keys)
            table_rows[name] = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                                np.concatenate([p[2] for p in parts], axis=1),  # (slots, k, dim) each
                                np.concatenate([p[3] for p in parts]))
            sketch = _summed_sketch(tables[name], [p[4] for p in parts], f"{path} table {name!r}")
            if sketch is not None:  # the sum of the old shards' admission counts: never below any id's count
                table_rows[name] += (sketch,)
    return {"params": params, "groups": groups, "config": config, "num_shards": num_shards,
            "named_state": named_state, "manifest": manifest, "tables": tables, "table_rows": table_rows}


def _tables(path, specs: dict, what: str) -> dict:
    """The row-sparse tables of a manifest: a ``RowTable`` spec, or the saved values array of the table."""
    if not isinstance(specs, dict):
        raise CheckpointError(f"{what}: row_tables must be a map")
    tables = {}
    for name, spec in specs.items():
        try:
            initial = spec.get("initial")
            initial = HashedUniformInit(**{k: v for k, v in initial.items() if k != "type"}) if initial else None
            table = RowTable(spec["num_rows"], spec["dim"], spec["dtype"], initial=initial,
                             admission=policy_from_config(spec.get("admission")),
                             eviction=policy_from_config(spec.get("eviction")))
        except (AttributeError, KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"{what}: row table {name!r} is malformed ({error})") from None
        if spec.get("values_file"):
            file_name = ckpt.checked_name(path, spec["values_file"])
            file = path.describe(file_name)
            declared = spec.get("values_bytes")
            if isinstance(declared, bool) or not isinstance(declared, int) or declared < 0:
                raise CheckpointError(f"{file}: declared size {declared!r} is not a valid byte count")
            data = ckpt.read_capped(path, file_name, declared, "table values")
            if len(data) != spec.get("values_bytes") or hashlib.sha256(data).hexdigest() != spec.get("values_sha256"):
                raise CheckpointError(f"{file}: size or sha256 does not match the manifest (corrupted or tampered)")
            values = decode_array(ckpt._unpack(data, str(file), len(data)), str(file))
            if values.shape != table.shape or str(values.dtype) != str(np.dtype(table.dtype)):
                raise CheckpointError(f"{file}: holds {values.dtype}{list(values.shape)}, expected {list(table.shape)}")
            tables[name] = values
        else:
            tables[name] = table
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
