"""What a row table shard tells of its rows over time: the rows changed since a table version (serving deltas,
``export_since``), the ids evicted since, and its checkpoint records (server/checkpoints/row_records.py) —
``RowTableChanges``, a mixin of ``RowTableShard`` (server/sparse_rows.py), which owns the storage it reads.

Every push is one table version; a row remembers the version that last changed it, and evicted ids are logged
with theirs. A token ``(epoch, version)`` names where an export ended; ``epoch`` (new at construction and at
every restore) tells apart states a token could mix up, and ``horizon`` is the oldest version whose evictions
are still remembered.
"""

from __future__ import annotations

import numpy as np

from . import row_policies as policies
from .checkpoints import row_records

COLUMNS = ("ids", "iterations", "changed", "stamps", "counts")  # the int64 columns, beside values and state


class RowTableChanges:
    """Changes, deltas and snapshots of a ``RowTableShard`` (its storage: ``_ids``, ``_values``, ``_state``,
    ``_changed``, ``_columns()``, ``_evicted_log``, ``_reset_storage``, ``_append``)."""

    # -- changes: serving deltas and incremental checkpoints -----------------------------------------------
    def columns(self, since: int | None = None) -> dict:
        """Copies of the stored rows (changed after version ``since``; all for None), sorted by id:
        ``ids, values, state (slots, k, dim), iterations, changed, stamps, counts``."""
        n = self.n
        chosen = np.arange(n) if since is None else np.flatnonzero(self._changed[:n] > since)
        chosen = chosen[np.argsort(self._ids[chosen], kind="stable")]
        out = {name: column[chosen] for name, column in zip(COLUMNS, self._columns())}
        out["values"], out["state"] = self._values[chosen], self._state[:, chosen]
        return out

    def evicted_since(self, since: int) -> np.ndarray:
        """Ids evicted after version ``since`` and not stored now, sorted (``since >= horizon``)."""
        parts = [ids for version, ids in self._evicted_log if version > since]
        if not parts:
            return np.zeros(0, dtype=np.int64)
        ids = np.unique(np.concatenate(parts))
        return ids[self.index.lookup(ids) < 0]

    def check_since(self, epoch, version, what: str = "since") -> None:
        """Can a delta since ``(epoch, version)`` be told? Errors name ``since``."""
        where = f"table {self.name!r} shard {self.shard_index}"
        if epoch != self.epoch:
            raise ValueError(f"{what}: the token is from another incarnation of {where} (restarted, restored or "
                             f"another server); export again with since=None")
        if isinstance(version, bool) or not isinstance(version, (int, np.integer)) or version < 0:
            raise ValueError(f"{what}: the token's version for {where} must be an integer >= 0, got {version!r}")
        if version > self.version:
            raise ValueError(f"{what}: the token's version {version} is ahead of {where} (version {self.version}): "
                             f"a future token")
        if version < self.horizon:
            raise ValueError(f"{what}: the token's version {version} is older than the evictions {where} still "
                             f"remembers (since version {self.horizon}); export again with since=None")

    def export_since(self, since=None) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[str, int]]:
        """``(ids, values, evicted, (epoch, version))``: the current values of the rows changed since ``since``
        (``(epoch, version)``; None: every stored row), the ids evicted since, and where this export ends."""
        if since is None:
            columns, evicted = self.columns(), np.zeros(0, dtype=np.int64)
        else:
            self.check_since(*since)
            columns, evicted = self.columns(int(since[1])), self.evicted_since(int(since[1]))
        return columns["ids"], columns["values"], evicted, (self.epoch, self.version)

    def load_columns(self, columns: dict, sketch_cells=None, sketch_counts=None) -> None:
        """Replace the stored rows (checked already, owned, unique ids, at most the cap)."""
        self._reset_storage(len(columns["ids"]))
        if len(columns["ids"]):
            extra = tuple(columns[name] for name in COLUMNS[1:])
            self._append(columns["ids"], columns["values"], columns["state"], columns=extra)
        if self.sketch is not None:
            self.sketch = policies.CountMinSketch(self.admission)
            if sketch_cells is not None:
                self.sketch.set_cells(sketch_cells, sketch_counts)

    # -- snapshots (server/checkpoints/row_records.py) ----------------------------------------------------
    def snapshot(self, since=None) -> dict:
        """A msgpack-able record of the stored rows, or of the changes since ``since = (epoch, version)``
        when that delta can be told (else the whole table)."""
        return row_records.snapshot(self, since)

    def restore(self, blobs, what: str = "row table snapshot") -> None:
        """Load a snapshot of THIS table shard: one record, or a base and the deltas after it, in order."""
        row_records.restore(self, blobs, what)

    def load_rows(self, ids, values, state, iterations, what: str = "rows", strict: bool = False,
                  sketch=None) -> None:
        """Replace the stored rows by the given ones (every check first). ``strict=False`` keeps only the rows
        this shard owns (restoring under another shard count); ``strict=True`` refuses foreign rows. ``sketch``:
        the admission counts (``depth * width``, e.g. the sum of the old shards' sketches: still never low)."""
        row_records.load_rows(self, ids, values, state, iterations, what, strict, sketch)

