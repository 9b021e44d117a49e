"""The serving delta stream of a row table: ``TableDelta``, its token, and the client-side assembly of the
shards' parts (``ParameterServer.export_deltas``) — plain logic, no Ray.

A token is the string ``"<table>@<epoch>:<version>,<epoch>:<version>,..."``: for each shard, in order, the epoch
of its table (random; new whenever the shard's table is restored or restarted) and the table version (pushes
applied) the export reached. ``since`` must be a token of this table, for this shard count, no newer than the
shards (a future token) and in their current epochs; each shard then sends the current values of the rows
changed after its version and the ids it evicted since (server/sparse_rows.py: ``export_since``). Errors name
``since``; an export changes nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

_PART = re.compile(r"^([0-9a-f]{1,32}):(\d{1,19})$")
STAT_KEYS = ("rows", "admitted", "evicted", "dropped_gradients", "bytes", "pushes", "rows_pushed",
             "unique_rows_pushed", "rows_pulled")


@dataclass(frozen=True, eq=False)
class TableDelta:
    """``ids`` (sorted) and their current ``values``; ``evicted``: tombstone ids (sorted; they read as their
    initial value again); ``token``: pass it as ``since`` next time."""

    ids: np.ndarray
    values: np.ndarray
    evicted: np.ndarray
    token: str


def make_token(name: str, positions) -> str:
    return f"{name}@" + ",".join(f"{epoch}:{int(version)}" for epoch, version in positions)


def parse(since, name: str, num_shards: int):
    """``[(epoch, version)]`` per shard of a token of table ``name`` (None for None)."""
    if since is None:
        return None
    if not isinstance(since, str) or "@" not in since:
        raise ValueError(f"since: expected None or a token returned by export_deltas, got {since!r}"[:200])
    table, _, body = since.rpartition("@")
    if table != name:
        raise ValueError(f"since: the token is for table {table!r}, not {name!r}")
    parts = body.split(",")
    if len(parts) != num_shards:
        raise ValueError(f"since: the token covers {len(parts)} shard(s), this server has {num_shards}")
    positions = []
    for part in parts:
        match = _PART.match(part)
        if match is None:
            raise ValueError(f"since: {part!r} is not an epoch:version pair")
        positions.append((match.group(1), int(match.group(2))))
    return positions


def combine(name: str, parts: list, table) -> TableDelta:
    """One ``TableDelta`` from each shard's ``(ids, values, evicted, (epoch, version))``, sorted by id."""
    ids = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
    values = np.concatenate([p[1] for p in parts]) if parts else np.zeros((0, table.dim), table.dtype)
    evicted = np.sort(np.concatenate([p[2] for p in parts])) if parts else np.zeros(0, np.int64)
    order = np.argsort(ids, kind="stable")
    return TableDelta(ids[order], values[order], evicted, make_token(name, [p[3] for p in parts]))


def sum_stats(shards: list[dict]) -> dict:
    """The figures of ``STAT_KEYS`` summed over the shards, and the shards' own."""
    out = {key: int(sum(s.get(key, 0) for s in shards)) for key in STAT_KEYS}
    caps = [s.get("cap") for s in shards]
    out["cap"] = None if any(c is None for c in caps) else int(sum(caps))
    out["shards"] = shards
    return out
