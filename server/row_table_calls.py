"""``RowTableCalls``: a ``ParameterServer`` handle's calls on its row-sparse tables (push and pull rows, a
whole table, the serving delta stream, table statistics) — a part of the handle (server/client.py), split out by
concept. The tables' storage and policies are the shards' (server/sparse_rows.py, server/row_policies.py).
"""

from __future__ import annotations

import numpy as np

from . import delta_tokens
from .delta_tokens import TableDelta
from .protocol import RowsRequest
from .remote_errors import unwrap
from .row_tables import check_rows, route


class RowTableCalls:
    """The row-table part of ``ParameterServer`` (see the module docstring)."""

    def push_rows(self, name: str, ids, grads, worker_id: int = 0, epoch: int = 0) -> None:
        """Push gradients for rows ``ids`` of table ``name`` (duplicate ids are summed before the update)."""
        self.push({}, worker_id=worker_id, epoch=epoch, rows={name: (ids, grads)})

    def pull_rows(self, name: str, ids) -> np.ndarray:
        """Rows ``ids`` of table ``name``, in the order asked; sees this handle's earlier pushes. The shards
        are asked together."""
        if name not in self.tables:
            kind = "dense: use pull()" if name in self.layout.shapes else "not a parameter"
            raise ValueError(f"pull_rows: {name!r} is {kind}")
        ids, _ = check_rows(name, self.tables[name], ids)
        table = self.tables[name]
        out = np.empty((len(ids), table.dim), dtype=table.dtype)
        parts = {shard: positions for shard, positions in enumerate(route(ids, self.layout.num_shards))
                 if len(positions)}
        rids = {shard: self._links.request(shard, RowsRequest(0, self.client_id, self.seq, name, ids[positions],
                                                               timeout=self.pull_timeout))
                for shard, positions in parts.items()}
        replies = self._links.wait(list(rids.values()))
        for shard, rid in rids.items():
            out[parts[shard]] = replies[rid].rows
        self.bytes_pulled += int(out.nbytes)
        self.flush()
        return out

    def _whole_table(self, name: str) -> np.ndarray:
        table = self.tables[name]
        out = np.empty(table.shape, dtype=table.dtype)
        rids = [self._links.request(shard, RowsRequest(0, self.client_id, self.seq, name, None,
                                                       timeout=self.pull_timeout))
                for shard in range(self.layout.num_shards)]
        for reply in self._links.wait(rids).values():
            out[reply.ids] = reply.rows
        self.bytes_pulled += int(out.nbytes)
        return out

    def export_deltas(self, name: str, since=None) -> TableDelta:
        """The rows of table ``name`` changed since the token ``since`` (None: every stored row), the ids evicted
        since (tombstones: they read as their initial value again), and the token to pass next time. Values
        only, never updater state. A replica that applies each delta in turn (drop ``evicted``, then set
        ``values`` at ``ids``; a missing row reads as the table's ``initial``) equals the server's table."""
        if name not in self.tables:
            raise ValueError(f"export_deltas: {name!r} is not a row-sparse table")
        self.flush()
        positions = delta_tokens.parse(since, name, self.layout.num_shards)
        try:
            parts = self._links.ask_all("export_deltas", name, positions)
        except Exception as error:  # noqa: BLE001 - a shard's refusal of the token, as the user's exception
            raise unwrap(error) from None
        return delta_tokens.combine(name, parts, self.tables[name])

    def table_stats(self, name: str) -> dict:
        """Row-table figures summed over the shards (``rows``, ``admitted``, ``evicted``, ``dropped_gradients``,
        ``bytes``, pushes and pulls) and each shard's own under ``"shards"``."""
        if name not in self.tables:
            raise ValueError(f"table_stats: {name!r} is not a row-sparse table")
        self.flush()
        return delta_tokens.sum_stats(self._links.ask_all("table_stats", name))
