"""``ParameterServer.state_dict()`` / ``from_state_dict``: the server as one in-memory map by name (modelled on
torch.optim's state_dict test: take the state, load it into a fresh server, step both the same way, compare).

The reference for what the map holds is Adam's moments as a plain float64 formula over the pushed gradients
(m = b1 m + (1 - b1) g, v = b2 v + (1 - b2) g^2, both from 0), and for the rows a dict of the rows pushed.
"""

from __future__ import annotations

import numpy as np
import pytest

from rayps.server.checkpoints.format import CheckpointError
from rayps.server.checkpoints.state_dict import from_bytes, server_args, to_bytes
from rayps.updaters import Adam

pytestmark = pytest.mark.usefixtures("ray_session")

B1, B2 = 0.9, 0.999
ROWS, DIM = 60, 4


def _server(num_shards=2):
    from rayps.server import ParameterServer
    from rayps.server.row_index import HashedUniformInit
    from rayps.server.row_tables import RowTable

    params = {"w": np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3), "b": np.zeros(5, np.float64),
              "emb": RowTable(ROWS, DIM, initial=HashedUniformInit(DIM, 0.1, seed=3))}
    return ParameterServer(params, sparse=["emb"], updater=Adam(learning_rate=0.05), num_shards=num_shards)


def _grads(rng):
    return {"w": rng.standard_normal((4, 3)).astype(np.float32), "b": rng.standard_normal(5)}


def _rows(rng):
    return rng.integers(0, ROWS, size=9), rng.standard_normal((9, DIM)).astype(np.float32)


def _step(ps, grads, rows):
    ps.push(grads, rows={"emb": rows})


def test_state_dict_round_trip_then_the_same_pushes_give_the_same_server():
    from rayps.server import ParameterServer

    rng = np.random.default_rng(0)
    original = _server(num_shards=2)
    restored = through_bytes = None
    try:
        pushed = [(_grads(rng), _rows(rng)) for _ in range(3)]
        for grads, rows in pushed:
            _step(original, grads, rows)
        state = original.state_dict()

        # what it holds, against the independent reference
        pulled = original.pull()
        for name in ("w", "b"):
            np.testing.assert_array_equal(state["params"][name], pulled[name])
            m = v = np.zeros(pulled[name].shape)
            for grads, _ in pushed:
                g = grads[name].astype(np.float64)
                m, v = B1 * m + (1 - B1) * g, B2 * v + (1 - B2) * g * g
            entry = state["updater_state"][name]
            assert entry["iteration"] == 3 and sorted(entry["state"]) == ["M", "V"]
            np.testing.assert_allclose(entry["state"]["M"], m, rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(entry["state"]["V"], v, rtol=1e-5, atol=1e-9)
        table = state["row_tables"]["emb"]
        touched = sorted({int(i) for _, (ids, _) in pushed for i in ids})
        assert sorted(table["ids"].tolist()) == touched
        np.testing.assert_array_equal(table["rows"], original.pull_rows("emb", table["ids"]))
        assert state["groups"][0]["updater"]["type"] == "Adam" and state["num_shards"] == 2

        # into a fresh server of another shard count, and through msgpack bytes
        restored = ParameterServer.from_state_dict(state, num_shards=3)
        through_bytes = ParameterServer.from_state_dict(from_bytes(to_bytes(state)))
        again = restored.state_dict()
        for name in ("w", "b"):
            np.testing.assert_array_equal(again["params"][name], state["params"][name])
            for key in ("M", "V"):
                np.testing.assert_array_equal(again["updater_state"][name]["state"][key],
                                              state["updater_state"][name]["state"][key])
        order, again_order = np.argsort(table["ids"]), np.argsort(again["row_tables"]["emb"]["ids"])
        np.testing.assert_array_equal(again["row_tables"]["emb"]["rows"][again_order], table["rows"][order])

        for _ in range(3):  # the same pushes to all three: the same parameters, bit for bit
            grads, rows = _grads(rng), _rows(rng)
            for ps in (original, restored, through_bytes):
                _step(ps, grads, rows)
        probe = np.arange(ROWS)
        expected, expected_rows = original.pull(), original.pull_rows("emb", probe)
        for ps in (restored, through_bytes):
            got = ps.pull()
            for name in ("w", "b"):
                np.testing.assert_array_equal(got[name], expected[name])
            np.testing.assert_array_equal(ps.pull_rows("emb", probe), expected_rows)
    finally:
        for ps in (original, restored, through_bytes):
            if ps is not None:
                ps.shutdown()


def test_a_state_dict_with_a_wrong_field_is_refused_naming_it():
    ps = _server(num_shards=1)
    try:
        state = ps.state_dict()
    finally:
        ps.shutdown()
    server_args(state)  # the unchanged one is accepted
    bad = dict(state, updater_state=dict(state["updater_state"], w={"iteration": 0, "state": {"M": np.zeros((4, 3))}}))
    with pytest.raises(CheckpointError, match=r"updater_state\['w'\]\['state'\]: state keys \['M'\] are not the "
                                              r"updater's \['M', 'V'\]"):
        server_args(bad)
    bad = dict(state, params=dict(state["params"], b=[0.0] * 5))
    with pytest.raises(CheckpointError, match=r"params\['b'\] is a list, expected an array"):
        server_args(bad)
    with pytest.raises(CheckpointError, match="format 'other'"):
        server_args(dict(state, format="other"))


def test_the_subnormal_choice_survives_state_dict_and_an_older_map_keeps_the_default():
    """``flush_denormals=False`` is recorded and restored: a restored server's kernel keeps a subnormal result
    (reference: the float32 difference in NumPy, which keeps IEEE subnormals), while a map without the key (saved
    before it was recorded) restores the default, flush-to-zero, which gives 0."""
    from rayps.server import ParameterServer
    from rayps.updaters import Sgd

    start, grad = np.full(4, 2.0e-38, np.float32), np.full(4, 1.5e-38, np.float32)  # both normal, the result not
    ieee = start - grad
    assert 0 < ieee[0] < np.finfo(np.float32).tiny
    kept = ParameterServer({"w": start}, updater=Sgd(learning_rate=1.0), flush_denormals=False)
    try:
        state = kept.state_dict()
    finally:
        kept.shutdown()
    assert state["config"]["flush_denormals"] is False and server_args(state)["flush_denormals"] is False
    older = dict(state, config={k: v for k, v in state["config"].items() if k != "flush_denormals"})
    assert "flush_denormals" not in server_args(older)
    for source, expected in ((state, ieee), (older, np.zeros(4, np.float32))):
        ps = ParameterServer.from_state_dict(source)
        try:
            ps.push({"w": grad})
            np.testing.assert_array_equal(ps.pull()["w"], expected)
        finally:
            ps.shutdown()
