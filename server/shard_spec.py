"""What a shard is built from — plain values, no Ray:

* ``ShardSpec``: one shard's part (its index, its pieces of the layout, their initial values, the updater
  state and iteration counts of a restore, the size of its kernel thread pool);
* ``ShardOptions``: what every shard of one server shares (updater groups, consistency model, checkpointing,
  row tables and their restored rows, where the data plane listens);
* ``InitialState``: a server's starting updater state and row-table rows by name (``ParameterServer(...,
  initial_state=...)``; ``ParameterServer.restore`` makes one from a checkpoint).

``build_state(spec, options)`` makes the shard's ``ShardState`` (row tables, restored rows and pieces loaded).
``ParameterServer`` puts the options once and each spec in Ray's object store, keeps the refs (Ray re-runs a
shard's constructor when it restarts it) and starts ``ShardActor.remote(spec, options, credentials=...)``: the
run's credentials travel apart, never inside a value that may be printed or logged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from .checkpoints import shard as shard_checkpoint
from .shard_state import ShardState
from .sync_steps import HISTORY_BYTES
from .sparse_rows import RowTableShard


@dataclass(frozen=True, eq=False)
class ShardSpec:
    """One shard: ``pieces`` (``layout.shard_pieces[shard_index]``), ``buffers`` (dtype -> flat initial values,
    ``layout.pack``), ``piece_states`` (per piece ``(updater state, iteration)`` of a restore, else None) and
    ``kernel_threads`` (the numba pool of its data-plane thread: the shard's CPUs, at least 1)."""

    shard_index: int
    pieces: tuple
    buffers: Mapping[str, np.ndarray]
    piece_states: list | None = None
    kernel_threads: int = 1


@dataclass(frozen=True, eq=False)
class ShardOptions:
    """What every shard of one server shares (see ``ParameterServer`` for each one's meaning). ``row_tables``:
    one dict per table (name, num_rows, dim, dtype, group, initial, num_shards, admission, eviction);
    ``row_states``: table -> its restored rows ``(ids, values, state, iterations[, admission sketch])``, of
    any shard count (each shard keeps the rows it owns)."""

    groups: tuple
    consistency: str = "async"
    staleness: int = 0
    num_workers: int = 1
    nan_policy: str = "reject"
    sync_timeout: float | None = None
    checkpoint_dir: Any = None
    checkpoint_every: int = 0
    row_tables: tuple = ()
    row_states: Mapping | None = None
    data_host: str | None = None
    data_ports: tuple = (47000, 47999)
    history_bytes: int = HISTORY_BYTES
    flush_denormals: bool = True  # kernels' results below the normal range become 0 (updaters/float_env.py)


@dataclass(frozen=True, eq=False)
class InitialState:
    """A server's starting state other than fresh updater state. ``updater_state``: every dense parameter ->
    ``(state, iteration)``, ``state`` of shape ``(slots, *shape)`` (the rule's state slots) and ``iteration``
    the updates it has taken; ``table_rows``: row table -> its stored rows ``(ids, values, state (slots, k,
    dim), iterations[, admission sketch])``. ``checkpoints.server_state.load`` reads both from a checkpoint."""

    updater_state: Mapping[str, tuple] = field(default_factory=dict)
    table_rows: Mapping[str, tuple] = field(default_factory=dict)

    def check(self, shapes: Mapping[str, tuple], slots_of: Mapping[str, int], tables) -> None:
        """Names and shapes against the server's parameters (``slots_of``: state slots per parameter); errors
        name the field. The rows are checked by each shard when it loads them."""
        state = self.updater_state
        if state:
            missing, unknown = sorted(set(shapes) - set(state)), sorted(set(state) - set(shapes))
            if missing or unknown:
                raise ValueError(f"initial_state.updater_state must name every dense parameter: missing {missing}, "
                                 f"unknown {unknown}")
            for name, entry in state.items():
                expected = (slots_of[name],) + tuple(shapes[name])
                if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], np.ndarray)):
                    raise ValueError(f"initial_state.updater_state[{name!r}] must be (state array, iteration)")
                slots, iteration = entry
                if slots.shape != expected:
                    raise ValueError(f"initial_state.updater_state[{name!r}] has state shape {slots.shape}, "
                                     f"expected {expected}")
                if isinstance(iteration, bool) or not isinstance(iteration, (int, np.integer)) or iteration < 0:
                    raise ValueError(f"initial_state.updater_state[{name!r}] iteration must be an integer >= 0, "
                                     f"got {iteration!r}")
        unknown = sorted(set(self.table_rows) - set(tables))
        if unknown:
            raise ValueError(f"initial_state.table_rows names {unknown}, which are not row-sparse tables")


def build_state(spec: ShardSpec, options: ShardOptions) -> ShardState:
    """The shard's ``ShardState``: its row tables (restored rows loaded: the ones this shard owns), its
    buffers, and the restored updater state and iteration count of each piece."""
    tables = {table["name"]: RowTableShard(
        table["name"], num_rows=table["num_rows"], dim=table["dim"], dtype=table["dtype"],
        shard_index=spec.shard_index, num_shards=table["num_shards"], updater=options.groups[table["group"]],
        initial=table["initial"], admission=table.get("admission"), eviction=table.get("eviction"))
        for table in options.row_tables or ()}
    for name, rows in (options.row_states or {}).items():  # restored under another shard count: keep the owned
        ids, values, state, iterations, *sketch = rows  # the sketch: the old shards' admission counts, summed
        tables[name].load_rows(ids, values, state, iterations, what=f"table {name!r}",
                               sketch=sketch[0] if sketch else None)
    state = ShardState(spec.shard_index, spec.pieces, options.groups, spec.buffers,
                       consistency=options.consistency, staleness=options.staleness,
                       num_workers=options.num_workers, nan_policy=options.nan_policy, row_tables=tables)
    state.keep_for_recovery = bool(options.checkpoint_dir)  # a shard can restart: keep the steps it may need
    state.history_bytes = options.history_bytes
    if spec.piece_states is not None:
        shard_checkpoint.load_pieces(state, [(None, slots, iteration) for slots, iteration in spec.piece_states])
    return state
