"""``PushPlan``'s recycled owned buffers (server/push_plan.py), no Ray.

A full push's payload buffer (an owned copy, or a pack of several pieces, owned or not) reuses a buffer of an
earlier push only once nothing made from that push is left:
not its payload array, a view or memoryview of it, nor the frames the message was encoded to; while any is
alive the earlier push's data stay as they were (a fresh buffer is used). Every payload equals
``ParameterLayout.pack`` of its own push; partial pushes and small ones are never recycled.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest

from rayps.server import ParameterLayout, push_plan
from rayps.server.protocol import PushMessage, from_frames, to_frames
from rayps.server.push_plan import PushPlan
from rayps.updaters import Sgd
from rayps.updaters.groups import as_groups

SHAPES = {"W": (300, 20), "b": (20,), "h": (50, 8)}
DTYPES = {"W": "float32", "b": "float32", "h": "float64"}


@pytest.fixture(autouse=True)
def small_pool(monkeypatch):
    monkeypatch.setattr(push_plan, "POOL_FROM_BYTES", 64)


def _grads(seed):
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s).astype(DTYPES[n]) for n, s in SHAPES.items()}


def _assert_is_pack(layout, messages, grads):
    for shard, payload, _, _, _ in messages:
        expected, _ = layout.pack(shard, grads)
        for dtype in expected:
            np.testing.assert_array_equal(payload[dtype], expected[dtype], strict=True)


def _memory(messages):
    return [(shard, dtype, array.__array_interface__["data"][0]) for shard, payload, _, _, _ in messages
            for dtype, array in payload.items()]


@pytest.mark.parametrize("num_shards", [1, 2])
def test_a_buffer_is_reused_only_once_nothing_of_its_push_is_left(num_shards):
    layout = ParameterLayout.build(SHAPES, DTYPES, num_shards)
    plan = PushPlan(layout, as_groups(Sgd()), {}, "reject", own_payloads=True)
    first_grads = _grads(1)
    first = plan.messages(first_grads)
    first_memory = _memory(first)
    kept = [first[0][1][layout.shard_pieces[0][0].dtype].reshape(-1)[2:], memoryview(next(iter(first[-1][1].values())))]
    second_grads = _grads(2)
    second = plan.messages(second_grads)  # the first push is alive: fresh buffers
    _assert_is_pack(layout, first, first_grads)
    _assert_is_pack(layout, second, second_grads)
    assert not set(_memory(second)) & set(first_memory)
    third = plan.messages(_grads(3))  # both alive, the pool is full (POOL_DEPTH 2): fresh again, not kept
    assert not set(_memory(third)) & (set(first_memory) | set(_memory(second)))
    _assert_is_pack(layout, first, first_grads)
    del third
    frames = [to_frames(PushMessage(0, "c", 1, 0, 0, payload, None, None, None)) for _, payload, _, _, _ in first]
    del first
    gc.collect()
    fourth_grads = _grads(4)
    fourth = plan.messages(fourth_grads)  # the frames, a view and a memoryview still hold the first push
    assert not set(_memory(fourth)) & set(first_memory)
    for shard, encoded in enumerate(frames):
        expected, _ = layout.pack(shard, first_grads)
        decoded = from_frames(encoded).payload
        for dtype in expected:
            np.testing.assert_array_equal(decoded[dtype], expected[dtype], strict=True)
    del frames, encoded, kept, fourth, decoded
    gc.collect()
    fifth_grads = _grads(5)
    fifth = plan.messages(fifth_grads)  # nothing of the first push is left: its buffers come back
    assert set(_memory(fifth)) == set(first_memory)
    _assert_is_pack(layout, fifth, fifth_grads)
    _assert_is_pack(layout, second, second_grads)


def test_partial_pushes_are_not_recycled_and_packs_of_unowned_pushes_are():
    layout = ParameterLayout.build(SHAPES, DTYPES, 2)
    plan = PushPlan(layout, as_groups(Sgd()), {}, "reject", own_payloads=False)
    grads = _grads(6)
    plan.messages({"W": grads["W"], "h": grads["h"]}, own=True)
    assert plan.recycled == {}
    for own in (False, True):
        memories = set()
        for seed in range(4):  # each push dropped before the next: the same buffers every time
            grads = _grads(seed)
            messages = plan.messages(grads, own=own)
            _assert_is_pack(layout, messages, grads)
            views = {key for key in _memory(messages) if any(
                np.shares_memory(messages[key[0]][1][key[1]], g) for g in grads.values())}
            assert bool(views) is (not own)  # unowned single pieces are views of the caller's arrays
            memories.add(tuple(sorted(set(_memory(messages)) - views)))
            del messages
        assert len(memories) == 1 and memories != {()}
