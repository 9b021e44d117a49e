"""Incremental checkpoints of row tables: a base and the deltas after it, as files beside the shard blob.

A shard checkpoint (``checkpoint.write_shard``: ``shard-<i>-g<gen>.blob`` and its pointer) holds each row table
not inline but as a chain::

    "row_tables": {name: {"chain": {"files": [entry of the base, entry of delta 1, ...],
                                    "epoch", "table_version", "base_bytes", "delta_bytes"}}}
    rows-s<i>-<table key>-<full|delta>-<random>.blob     one record of server/checkpoints/row_records.py each

An entry is ``{"file", "sha256", "bytes"}`` (``checkpoint.write_blob``/``read_blob``). Each save asks the table
for the changes since the chain's ``(epoch, table_version)`` (``since_for``) and appends the delta; a full
record starts a new chain. Compaction: the next save writes a new base when the chain already has
``MAX_DELTAS`` deltas, when its deltas together are as large as its base, or when the table cannot tell a delta
(another epoch: restarted or restored; tombstones forgotten). Files are written under new names before the
shard blob that names them, and a shard's row files that its new chain does not name are deleted only after
the pointer is written: a crash anywhere leaves the previous checkpoint whole. Restore reads every file of the
chain (size and sha256 checked) and folds them in order (``row_records.fold``).
"""

from __future__ import annotations

import hashlib
import uuid

from . import format as ckpt
from . import storage
from .format import CheckpointError

MAX_DELTAS = 8


def _table_key(name: str) -> str:
    return name if ckpt.SAFE_FILE_NAME.match(name) and len(name) <= 64 and "-" not in name else \
        hashlib.sha256(name.encode()).hexdigest()[:16]


def since_for(chain) -> tuple[str, int] | None:
    """Where the next record of ``chain`` starts (None: a new base is due)."""
    if not chain or len(chain["files"]) - 1 >= MAX_DELTAS or chain["delta_bytes"] >= chain["base_bytes"]:
        return None
    return chain["epoch"], chain["table_version"]


def since_of(chains: dict) -> dict:
    """``since_for`` of every table (for ``ShardState`` snapshots)."""
    return {name: since_for(chain) for name, chain in (chains or {}).items()}


def write_tables(directory, shard: int, snapshot: dict, chains: dict) -> tuple[dict, dict]:
    """Write each table record of ``snapshot`` (a ``shard.snapshot``) to its own file; returns the
    snapshot naming the chains instead, and the new chains."""
    directory = storage.directory(directory)
    new_chains, refs = {}, {}
    for name, record in (snapshot.get("row_tables") or {}).items():
        kind = record.get("kind", "full")
        blob = ckpt.pack(record)
        entry = ckpt.write_blob(directory, f"rows-s{shard}-{_table_key(name)}-{kind}-{uuid.uuid4().hex[:10]}.blob",
                                blob)
        previous = (chains or {}).get(name)
        if kind == "delta" and previous and previous["epoch"] == record["epoch"] \
                and previous["table_version"] == record["since"]:
            chain = dict(previous, files=previous["files"] + [entry],
                         delta_bytes=previous["delta_bytes"] + entry["bytes"])
        elif kind == "full":
            chain = {"files": [entry], "base_bytes": entry["bytes"], "delta_bytes": 0}
        else:
            raise CheckpointError(f"table {name!r}: a delta record since {record.get('since')} does not continue "
                                  f"the chain it was asked for")
        chain.update(epoch=record["epoch"], table_version=record["table_version"])
        new_chains[name], refs[name] = chain, {"chain": chain}
    return dict(snapshot, row_tables=refs), new_chains


def write_shard(directory, shard: int, generation: int, snapshot: dict, chains: dict,
                before_publish=None) -> tuple[dict, dict]:
    """The shard checkpoint with its table chains: row files, then the blob and its pointer, then the row files
    no chain names any more are deleted. Returns ``(pointer, new chains)``. ``before_publish``: as in
    ``checkpoint.write_shard``."""
    directory = storage.directory(directory)
    snapshot, new_chains = write_tables(directory, shard, snapshot, chains)
    pointer = ckpt.write_shard(directory, shard, generation, ckpt.pack(snapshot), before_publish)
    keep = {entry["file"] for chain in new_chains.values() for entry in chain["files"]}
    for name in directory.names():
        if name.startswith(f"rows-s{shard}-") and name not in keep:
            try:
                directory.delete(name)
            except OSError:
                pass
    return pointer, new_chains


def read_tables(directory, blob: dict, what: str) -> tuple[dict, dict]:
    """A shard blob with each table's chain replaced by its records in order (an inline record, as older
    checkpoints hold, stays one record); and the chains it named."""
    directory = storage.directory(directory)
    tables = blob.get("row_tables") or {}
    if not isinstance(tables, dict):
        raise CheckpointError(f"{what}: row_tables must be a map")
    records, chains = {}, {}
    for name, value in tables.items():
        if isinstance(value, dict) and "chain" in value:
            chain = value["chain"]
            files = chain.get("files") if isinstance(chain, dict) else None
            if not isinstance(files, list) or not files:
                raise CheckpointError(f"{what} table {name!r}: the chain must list its files")
            records[name] = [ckpt.read_blob(directory, entry, f"{what} table {name!r}") for entry in files]
            chains[name] = chain
        else:
            records[name] = [value]
    return dict(blob, row_tables=records), chains


def existing_chains(directory, shard: int) -> dict:
    """The chains of the checkpoint of ``shard`` in ``directory`` (empty when there is none or it cannot be
    read: the next save then writes new bases)."""
    try:
        pointer = ckpt.read_pointer(directory, shard)
        if pointer is None:
            return {}
        blob = ckpt.read_shard(directory, pointer)
    except (OSError, CheckpointError):
        return {}
    chains = {}
    for name, value in (blob.get("row_tables") or {}).items():
        chain = value.get("chain") if isinstance(value, dict) else None
        if isinstance(chain, dict) and isinstance(chain.get("files"), list) and all(
                isinstance(chain.get(k), int) for k in ("table_version", "base_bytes", "delta_bytes")):
            chains[name] = chain
    return chains
