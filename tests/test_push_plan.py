"""``PushPlan`` without Ray: the client's push path.

* a push's payload equals ``ParameterLayout.pack`` (the reference) for full, partial, strided, cast and 0-d
  gradients, 1..3 shards;
* it is a view of the caller's array exactly where a shard's part is one C-contiguous piece of the right
  dtype, and owns its data when the plan keeps payloads for replay;
* payload arrays travel as frames sent as they are and decode to views of the received frames;
* the finiteness pass: every NaN/Inf found, overflowing sums of finite values not mistaken for them, the error
  names the key, nan_policy "skip" becomes clock ticks, rows included.
"""

from __future__ import annotations

import numpy as np
import pytest

from rayps.server import ParameterLayout
from rayps.server.protocol import PushMessage, from_frames, to_frames
from rayps.server.push_plan import PushPlan
from rayps.server.validation import all_finite
from rayps.server.row_tables import RowTable
from rayps.updaters import Sgd
from rayps.updaters.groups import as_groups

SHAPES = {"W": (40, 5), "b": (5,), "h": (7,), "s": (), "m": (3, 2)}
DTYPES = {"W": "float32", "b": "float32", "h": "float64", "s": "float64", "m": "float32"}


def _plan(num_shards, own=False, nan_policy="reject", tables=None):
    layout = ParameterLayout.build(SHAPES, DTYPES, num_shards)
    return PushPlan(layout, as_groups(Sgd()), tables or {}, nan_policy, own_payloads=own), layout


def _grads(seed=0):
    rng = np.random.default_rng(seed)
    return {n: np.asarray(rng.standard_normal(s)).astype(DTYPES[n]) for n, s in SHAPES.items()}


def _assert_payload_is_pack(plan, layout, grads):
    messages = plan.messages(grads)
    assert [m[0] for m in messages] == list(range(layout.num_shards))
    for shard, payload, present, factors, rows in messages:
        expected, expected_present = layout.pack(shard, grads)
        assert present == expected_present and factors is None and rows is None
        assert set(payload) == set(expected)
        for dtype in expected:
            np.testing.assert_array_equal(payload[dtype], expected[dtype], strict=True)
    return messages


@pytest.mark.parametrize("num_shards", [1, 2, 3])
def test_full_push_payloads_equal_layout_pack_and_single_pieces_are_views(num_shards):
    plan, layout = _plan(num_shards)
    grads = _grads()
    for shard, payload, _, _, _ in _assert_payload_is_pack(plan, layout, grads):
        for dtype, array in payload.items():
            members = [p for p in layout.shard_pieces[shard] if p.dtype == dtype]
            shares = any(np.shares_memory(array, grads[p.name]) for p in members)
            assert shares is (len(members) == 1), (shard, dtype, [p.name for p in members])


@pytest.mark.parametrize("num_shards", [1, 2])
def test_payloads_own_their_data_when_kept_for_replay(num_shards):
    plan, layout = _plan(num_shards, own=True)
    grads = _grads()
    messages = _assert_payload_is_pack(plan, layout, grads)
    for _, payload, _, _, _ in messages:
        for array in payload.values():
            assert not any(np.shares_memory(array, g) for g in grads.values())


@pytest.mark.parametrize("num_shards", [1, 2])
def test_payloads_travel_as_frames_that_decode_to_the_packed_payload(num_shards):
    """Each payload array is one frame sent as it is (the same memory), and decodes to a read-only view of the
    received frame equal to ``ParameterLayout.pack``."""
    plan, layout = _plan(num_shards)
    grads = _grads()
    for shard, payload, present, _, _ in plan.messages(grads):
        expected, _ = layout.pack(shard, grads)
        frames = to_frames(PushMessage(1, "client", 1, 0, 0, payload, present))
        for array in payload.values():
            assert any(frame is array for frame in frames[1:])  # no pack copy
        received = [bytes(frame) if i == 0 else bytearray(frame) for i, frame in enumerate(frames)]
        decoded = from_frames(received).payload
        for dtype, part in decoded.items():
            np.testing.assert_array_equal(part, expected[dtype], strict=True)
            assert not part.flags.writeable and np.shares_memory(part, np.frombuffer(received[1 + list(
                decoded).index(dtype)], np.uint8))  # a view of the received frame: no unpack copy


@pytest.mark.parametrize("own", [False, True])
def test_pack_buffers_stay_their_push_s_while_it_is_alive(own):
    """A multi-piece part is packed into a buffer its message owns, with or without ``own`` (ZeroMQ sends a large
    frame after the call returns, and an unacknowledged push may be resent): a later push never writes into it."""
    plan, layout = _plan(1)
    first = plan.messages(_grads(1), own=own)[0][1]["float32"]
    second = plan.messages(_grads(2), own=own)[0][1]["float32"]
    assert not np.shares_memory(first, second)
    np.testing.assert_array_equal(first, layout.pack(0, _grads(1))[0]["float32"])
    np.testing.assert_array_equal(second, layout.pack(0, _grads(2))[0]["float32"])


@pytest.mark.parametrize("num_shards", [1, 2, 3])
def test_strided_fortran_and_wider_dtype_gradients_are_packed_like_layout_pack(num_shards):
    plan, layout = _plan(num_shards)
    rng = np.random.default_rng(3)
    grads = _grads()
    grads["W"] = np.asfortranarray(grads["W"])
    grads["h"] = rng.standard_normal(14)[::2]
    grads["b"] = rng.standard_normal(5)  # float64 for a float32 parameter: cast like pack does
    for shard, payload, _, _, _ in _assert_payload_is_pack(plan, layout, grads):
        for dtype, array in payload.items():
            assert array.dtype == np.dtype(dtype) and array.flags.c_contiguous


@pytest.mark.parametrize("num_shards", [1, 2, 3])
@pytest.mark.parametrize("names", [["W"], ["s", "m"], ["h", "b", "W"]])
def test_partial_push_payloads_equal_layout_pack(num_shards, names):
    plan, layout = _plan(num_shards)
    grads = {n: g for n, g in _grads().items() if n in names}
    _assert_payload_is_pack(plan, layout, grads)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                            "ignore:invalid value encountered:RuntimeWarning")
def test_all_finite_finds_every_non_finite_value_and_survives_overflowing_sums():
    big = np.full(1000, 3e38, np.float32)  # finite, but the float32 sum overflows
    assert all_finite(big) and all_finite(-big)
    assert all_finite(np.full(100, 60000.0, np.float16))  # a float16 sum would overflow at 65504
    assert all_finite(np.array(2.5)) and all_finite(np.ones((3, 4))[:, ::2])
    for dtype in (np.float16, np.float32, np.float64):
        for bad in (np.nan, np.inf, -np.inf):
            array = np.ones(257, dtype)
            array[200] = bad
            assert not all_finite(array), (dtype, bad)
            big_and_bad = np.full(257, np.finfo(dtype).max / 2, dtype)
            big_and_bad[3] = bad
            assert not all_finite(big_and_bad), (dtype, bad)
    mixed = np.array([np.inf, -np.inf])  # the sum is NaN
    assert not all_finite(mixed)


@pytest.mark.parametrize("num_shards", [1, 2])
def test_a_non_finite_push_raises_naming_the_key_or_becomes_ticks(num_shards):
    grads = _grads()
    grads["W"][37, 1] = np.inf  # in the last rows: the second piece of W when it is split
    plan, _ = _plan(num_shards)
    with pytest.raises(ValueError, match=r"grads\['W'\] contains NaN or Inf"):
        plan.messages(grads)
    skip, _ = _plan(num_shards, nan_policy="skip")
    assert skip.messages(grads) == [(shard, None, None, None, None) for shard in range(num_shards)]


def test_non_finite_row_gradients_are_named_after_their_table():
    tables = {"emb": RowTable(50, 3)}
    plan, _ = _plan(2, tables=tables)
    grads = np.ones((2, 3), np.float32)
    grads[1, 2] = np.nan
    with pytest.raises(ValueError, match=r"grads\['emb'\] contains NaN or Inf"):
        plan.messages({}, rows={"emb": (np.array([3, 7]), grads)})
    messages = plan.messages({}, rows={"emb": (np.array([3, 7, 3]), np.ones((3, 3), np.float32))})
    assert sum(len(rows["emb"][0]) for _, _, _, _, rows in messages) == 3
    assert all(payload == {} and present == [] for _, payload, present, _, _ in messages)
