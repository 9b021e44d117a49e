"""What a shard is built from (server/shard_spec.py), without Ray: ``build_state(ShardSpec, ShardOptions)`` gives
the state a ``ShardState`` built by hand has (buffers, options, row tables), with a restore's piece states and
table rows loaded; specs are frozen; ``InitialState.check`` names the field that does not fit the server."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from rayps.server import LRUEviction, ParameterLayout, ShardState
from rayps.server.checkpoints.server_state import piece_states
from rayps.server.row_index import row_owner
from rayps.server.shard_spec import InitialState, ShardOptions, ShardSpec, build_state
from rayps.updaters import Adam
from rayps.updaters.groups import as_groups

SHAPES = {"W": (6, 4), "b": (4,)}
GROUPS = tuple(as_groups(Adam(learning_rate=0.1)))
TABLE = {"name": "emb", "num_rows": 50, "dim": 2, "dtype": "float32", "group": 0, "initial": None,
         "num_shards": 2, "admission": None, "eviction": LRUEviction(40)}


def _params():
    rng = np.random.default_rng(1)
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}


def test_a_spec_builds_the_state_a_hand_built_shard_state_has():
    layout = ParameterLayout.build(SHAPES, {n: "float32" for n in SHAPES}, 2)
    params = _params()
    for shard in range(2):
        buffers = layout.pack(shard, params)[0]
        spec = ShardSpec(shard_index=shard, pieces=layout.shard_pieces[shard], buffers=buffers)
        options = ShardOptions(groups=GROUPS, consistency="ssp", staleness=2, num_workers=3, nan_policy="skip")
        built = build_state(spec, options)
        by_hand = ShardState(shard, layout.shard_pieces[shard], GROUPS, buffers, consistency="ssp", staleness=2,
                             num_workers=3, nan_policy="skip")
        for name in ("shard_index", "pieces", "consistency", "staleness", "num_workers", "nan_policy"):
            assert getattr(built, name) == getattr(by_hand, name), name
        for dtype in by_hand.params:
            np.testing.assert_array_equal(built.params[dtype], by_hand.params[dtype], strict=True)
        assert not built.iterations.any() and built.row_tables == {}
        built.validate()


def test_a_spec_loads_the_restored_piece_states_and_the_owned_table_rows():
    layout = ParameterLayout.build(SHAPES, {n: "float32" for n in SHAPES}, 2)
    params = _params()
    rng = np.random.default_rng(2)
    updater_state = {n: (rng.standard_normal((2,) + s).astype(np.float32), 7) for n, s in SHAPES.items()}
    ids = np.arange(0, 40, 3)
    rows = (ids, rng.standard_normal((len(ids), 2)).astype(np.float32), np.zeros((2, len(ids), 2), np.float32),
            np.full(len(ids), 4))
    options = ShardOptions(groups=GROUPS, row_tables=(TABLE,), row_states={"emb": rows})
    for shard in range(2):
        spec = ShardSpec(shard_index=shard, pieces=layout.shard_pieces[shard],
                         buffers=layout.pack(shard, params)[0],
                         piece_states=piece_states(layout, shard, updater_state))
        state = build_state(spec, options)
        state.validate()
        assert set(state.iterations.tolist()) == {7}
        for piece in state.pieces:
            r = state.ranges[(piece.dtype, piece.group)]
            slots = state.state[(piece.dtype, piece.group)][:, piece.offset - r.start:piece.offset - r.start + piece.size]
            want = updater_state[piece.name][0][:, piece.row_start:piece.row_stop].reshape(2, -1)
            np.testing.assert_array_equal(slots, want)
        owned = ids[row_owner(ids, 2) == shard]
        table = state.row_tables["emb"]
        assert table.shard_index == shard and table.cap == 20
        np.testing.assert_array_equal(np.sort(table.touched()[0]), owned)
        np.testing.assert_array_equal(table.row_iterations(owned), np.full(len(owned), 4))


def test_specs_are_frozen():
    spec = ShardSpec(shard_index=0, pieces=(), buffers={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.shard_index = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        ShardOptions(groups=GROUPS).consistency = "sync"


@pytest.mark.parametrize("initial, message", [
    (InitialState(updater_state={"W": (np.zeros((2, 6, 4)), 0)}), r"must name every dense parameter: missing \['b'\]"),
    (InitialState(updater_state={"W": (np.zeros((2, 6, 4)), 0), "b": (np.zeros((1, 4)), 0)}),
     r"updater_state\['b'\] has state shape \(1, 4\), expected \(2, 4\)"),
    (InitialState(updater_state={"W": (np.zeros((2, 6, 4)), -1), "b": (np.zeros((2, 4)), 0)}),
     r"updater_state\['W'\] iteration must be an integer >= 0, got -1"),
    (InitialState(updater_state={"W": np.zeros((2, 6, 4)), "b": (np.zeros((2, 4)), 0)}),
     r"updater_state\['W'\] must be \(state array, iteration\)"),
    (InitialState(table_rows={"emb": ()}), r"table_rows names \['emb'\], which are not row-sparse tables"),
])
def test_an_initial_state_that_does_not_fit_names_the_field(initial, message):
    with pytest.raises(ValueError, match=message):
        initial.check(SHAPES, {"W": 2, "b": 2}, tables={})
