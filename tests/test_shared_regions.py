"""Shared memory between a client and a shard on one node (server/shared_regions.py), no Ray, regions in tmp_path.

Checked: ``SlotLayout`` places each dtype's buffer on a 64-byte boundary without overlap; a ``ShardRegions`` and
the ``LinkRegions`` made from its wire map the same bytes, its files are 0600 and gone once mapped;
``write_params`` writes a copy only for a valid slot, matching sizes and a request id above the slot's last;
down slots are busy while a view of their lease lives; ``sweep_orphans`` removes old region files only; frames
name arrays in a region by offset (checked against the region on decode); ``ShardService`` answers whole reads
through the client's down slot (a resend over the socket) and copies an early push out of the up slot;
``PushPlan`` packs large full pushes into the link's up slots.
"""

from __future__ import annotations

import os
import stat
import time

import msgpack
import numpy as np
import pytest

from rayps.server import ParameterLayout, ShardState
from rayps.server import shared_regions
from rayps.server.protocol import ProtocolError, PullRequest, PushMessage, from_frames, to_frames
from rayps.server.push_plan import POOL_FROM_BYTES, PushPlan
from rayps.server.shard_service import ShardService
from rayps.server.shared_regions import (ALIGN, DOWN_SLOTS, LinkRegions, ShardRegions, SlotLayout, region_dir,
                                         sweep_orphans)
from rayps.updaters import ParamGroup, Sgd
from rayps.updaters.groups import as_groups, assign_groups
from state_invariants import record_instances, validate_all

SIZES = {"float32": 1000, "float64": 3, "int8": 5}
LR = np.float32(0.1)  # Sgd(0.1) on float32: p - float32(0.1) * g per step, bit for bit (checked)


@pytest.fixture(autouse=True)
def _invariants_hold_after_each_test(monkeypatch):
    made = record_instances(monkeypatch, ShardState)
    yield
    validate_all(made)


def _address(array) -> int:
    return array.__array_interface__["data"][0]


def _pair(tmp_path, sizes=SIZES):
    shard = ShardRegions.create(str(tmp_path), sizes)
    return shard, LinkRegions(shard.to_wire())


# -- layout and mapping ------------------------------------------------------------------------------------------
def test_slot_layout_aligns_each_buffer_without_overlap_and_views_lie_at_slot_offsets():
    layout = SlotLayout.of(SIZES)
    spans = sorted((layout.offsets[d], layout.offsets[d] + n * np.dtype(d).itemsize) for d, n in SIZES.items())
    assert all(start % ALIGN == 0 for start, _ in spans)
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))
    assert spans[-1][1] <= layout.slot_bytes and layout.slot_bytes % ALIGN == 0
    region = np.zeros(3 * layout.slot_bytes, dtype=np.uint8)
    for slot in range(3):
        views = layout.views(region, slot)
        assert views.keys() == SIZES.keys()
        for dtype, view in views.items():
            assert view.dtype == np.dtype(dtype) and view.size == SIZES[dtype]
            assert _address(view) == _address(region) + slot * layout.slot_bytes + layout.offsets[dtype]
            assert np.shares_memory(view, region)
    first, second = layout.views(region, 0), layout.views(region, 1)
    assert not any(np.shares_memory(a, b) for a in first.values() for b in second.values())
    assert SlotLayout.of({}).slot_bytes == ALIGN and SlotLayout.from_wire(layout.to_wire()) == layout


def test_shard_and_link_map_the_same_private_files_which_are_unlinked_once_mapped(tmp_path):
    shard = ShardRegions.create(str(tmp_path), SIZES)
    files = sorted(os.listdir(tmp_path))
    assert len(files) == 2 and all(name.startswith("region-") for name in files)
    assert all(stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o600 for name in files)
    link = LinkRegions(shard.to_wire())
    assert os.listdir(tmp_path) == []
    rng = np.random.default_rng(0)
    expected = rng.standard_normal(SIZES["float32"]).astype(np.float32)
    shard.layout.views(shard.down.array, 1)["float32"][:] = expected
    np.testing.assert_array_equal(link.layout.views(link.down.array, 1)["float32"], expected)
    up = link.up_buffers(1)
    up["float64"][:] = [1.5, -2.0, 3.25]
    up["int8"][:] = [1, 2, 3, 4, -5]
    seen = shard.layout.views(shard.up.array, 1)
    np.testing.assert_array_equal(seen["float64"], [1.5, -2.0, 3.25])
    np.testing.assert_array_equal(seen["int8"], [1, 2, 3, 4, -5])
    assert not np.any(shard.layout.views(shard.up.array, 0)["float64"])  # the other slot is untouched


def test_a_region_file_of_another_size_is_refused(tmp_path):
    wire = ShardRegions.create(str(tmp_path), SIZES).to_wire()
    with pytest.raises(OSError, match="byte file"):
        LinkRegions({**wire, "up_slots": wire["up_slots"] + 1})


def test_a_full_dev_shm_fails_at_creation_and_leaves_no_file(tmp_path, monkeypatch):
    """The memory is reserved when the file is made: no space is an OSError then (the shard falls back to the
    socket), never a SIGBUS at a first write later."""
    import errno

    def no_space(descriptor, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with pytest.raises(OSError):
        ShardRegions.create(str(tmp_path), {"float32": 1000})
    assert os.listdir(tmp_path) == []


def test_region_dir_is_a_private_directory_or_none(tmp_path, monkeypatch):
    monkeypatch.setattr(shared_regions, "REGION_ROOT", str(tmp_path))
    monkeypatch.setenv("RAYPS_DATA_SHM", "0")
    assert region_dir() is None and os.listdir(tmp_path) == []
    monkeypatch.setenv("RAYPS_DATA_SHM", "1")
    directory = region_dir()
    assert directory == str(tmp_path / f"rayps-{os.getuid()}")
    assert stat.S_IMODE(os.lstat(directory).st_mode) == 0o700
    os.chmod(directory, 0o755)  # someone widened it: not trusted
    assert region_dir() is None


# -- write_params and down slots ---------------------------------------------------------------------------------
def test_write_params_copies_for_a_newer_request_and_refuses_old_ones_bad_slots_and_other_sizes(tmp_path):
    shard = ShardRegions.create(str(tmp_path), {"float32": 100, "float64": 7})
    rng = np.random.default_rng(1)
    params = {"float32": rng.standard_normal(100).astype(np.float32), "float64": rng.standard_normal(7)}
    views = shard.write_params(1, 5, params)
    for dtype, buffer in params.items():
        np.testing.assert_array_equal(views[dtype], buffer, strict=True)
        assert np.shares_memory(views[dtype], shard.down.array) and not np.shares_memory(views[dtype], buffer)
    assert shard.written == [0, 5]
    before = shard.down.array.copy()
    changed = {dtype: buffer + 1 for dtype, buffer in params.items()}
    assert shard.write_params(1, 5, changed) is None  # a resend
    assert shard.write_params(1, 4, changed) is None  # answered late
    for slot in (-1, DOWN_SLOTS, "0", None, True, 1.0):
        assert shard.write_params(slot, 9, changed) is None
    assert shard.write_params(0, 9, {"float32": changed["float32"]}) is None
    assert shard.write_params(0, 9, {**changed, "float64": np.zeros(8)}) is None
    assert shard.write_params(0, 9, {"float32": changed["float32"], "int32": np.zeros(7, np.int32)}) is None
    np.testing.assert_array_equal(shard.down.array, before)
    assert shard.written == [0, 5]
    assert shard.write_params(0, 6, changed) is not None and shard.written == [6, 5]


def test_a_down_slot_is_busy_while_any_view_of_its_lease_lives(tmp_path):
    _, link = _pair(tmp_path)
    assert link.free_down_slot(()) == 0
    assert link.free_down_slot({0}) == 1
    assert link.free_down_slot({0, 1}) is None
    whole = link.lease_down(0)
    assert np.shares_memory(whole, link.down.array)
    views = link.layout.views(whole, 0)
    del whole
    assert link.free_down_slot(()) == 1
    other = link.lease_down(1)
    assert link.free_down_slot(()) is None
    del other
    assert link.free_down_slot(()) == 1 and link.free_down_slot({1}) is None
    float32 = views.pop("float32")
    views.clear()
    assert link.free_down_slot({1}) is None  # one view still holds slot 0
    del float32
    assert link.free_down_slot({1}) == 0


def test_sweep_orphans_removes_only_old_region_files(tmp_path):
    now = time.time()
    for name, age in (("region-old", 120), ("region-young", 5), ("other-old", 120)):
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, (now - age, now - age))
    (tmp_path / "region-dir").mkdir()
    os.utime(tmp_path / "region-dir", (now - 120, now - 120))
    assert sweep_orphans(str(tmp_path), 60.0) == 1
    assert sorted(os.listdir(tmp_path)) == ["other-old", "region-dir", "region-young"]
    assert sweep_orphans(str(tmp_path), 1.0) == 1 and "region-young" not in os.listdir(tmp_path)


# -- frames ------------------------------------------------------------------------------------------------------
def _region_push(shard):
    view = shard.layout.views(shard.up.array, 1)["float32"]
    view[:] = np.arange(view.size, dtype=np.float32) / 7
    return view, PushMessage(3, "c", 1, 0, payload={"float32": view})


def test_an_array_in_the_region_travels_as_its_offset_and_decodes_in_place(tmp_path):
    shard = ShardRegions.create(str(tmp_path), SIZES)
    view, message = _region_push(shard)
    frames = to_frames(message, shard.up)
    header = msgpack.unpackb(frames[0], raw=False)
    assert len(frames) == 1 and header["rg"] == shard.token
    assert header["a"] == [["float32", [view.size], shard.layout.slot_bytes + shard.layout.offsets["float32"]]]
    decoded = from_frames(frames, region_of=lambda h: shard.up.array if h.get("rg") == shard.token else None)
    payload = decoded.payload["float32"]
    np.testing.assert_array_equal(payload, np.arange(view.size, dtype=np.float32) / 7, strict=True)
    assert np.shares_memory(payload, shard.up.array) and not payload.flags.writeable and decoded.shared
    with pytest.raises(ProtocolError) as error:
        from_frames(frames, region_of=lambda h: None)
    assert error.value.field == "rg"
    with pytest.raises(ProtocolError) as error:
        from_frames(frames)
    assert error.value.field == "rg"


@pytest.mark.parametrize("offset", [-4, 1, "end", "past"])
def test_an_offset_outside_the_region_or_misaligned_is_refused(tmp_path, offset):
    shard = ShardRegions.create(str(tmp_path), SIZES)
    view, message = _region_push(shard)
    header = msgpack.unpackb(to_frames(message, shard.up)[0], raw=False)
    nbytes = shard.up.nbytes
    header["a"][0][2] = {"end": nbytes - view.nbytes + 4, "past": nbytes}.get(offset, offset)
    with pytest.raises(ProtocolError) as error:
        from_frames([msgpack.packb(header, use_bin_type=True)], region_of=lambda h: shard.up.array)
    assert error.value.field == "a[0]"
    header["a"][0][2] = nbytes - view.nbytes  # the last place it fits is taken
    last = from_frames([msgpack.packb(header, use_bin_type=True)], region_of=lambda h: shard.up.array)
    assert _address(last.payload["float32"]) == shard.up.base + nbytes - view.nbytes


def test_arrays_outside_the_region_still_travel_as_frames(tmp_path):
    shard = ShardRegions.create(str(tmp_path), SIZES)
    view, message = _region_push(shard)
    plain = np.array([0.25, -1.0, 8.0])
    message.payload["float64"] = plain
    frames = to_frames(message, shard.up)
    header = msgpack.unpackb(frames[0], raw=False)
    assert len(frames) == 2 and [len(entry) for entry in header["a"]] == [3, 2]
    decoded = from_frames(frames, region_of=lambda h: shard.up.array)
    np.testing.assert_array_equal(decoded.payload["float64"], plain, strict=True)
    assert not np.shares_memory(decoded.payload["float64"], shard.up.array)
    np.testing.assert_array_equal(decoded.payload["float32"], view, strict=True)
    only_plain = to_frames(PushMessage(4, "c", 2, 0, payload={"float64": plain}), shard.up)
    assert len(only_plain) == 2 and "rg" not in msgpack.unpackb(only_plain[0], raw=False)
    assert not from_frames(only_plain).shared


# -- ShardService ------------------------------------------------------------------------------------------------
def _service(tmp_path, size=1000):
    groups = [ParamGroup(Sgd(0.1))]
    layout = ParameterLayout.build({"w": (size,)}, {"w": "float32"}, 1, assign_groups(groups, ["w"]))
    initial = np.random.default_rng(2).standard_normal(size).astype(np.float32)
    state = ShardState(0, layout.shard_pieces[0], groups, layout.pack(0, {"w": initial})[0])
    service = ShardService(state, "inc")
    service.regions["c"] = regions = ShardRegions.create(str(tmp_path), {"float32": size})
    return service, regions, initial


def _reply(service, message):
    [(peer, reply)] = service.handle(b"peer", message, 0.0)
    assert peer == b"peer"
    return reply


def _wire(message, region):
    """``message`` as the shard receives it: encoded with the client's region, decoded (tokens included)."""
    return from_frames(to_frames(message, region), region_of=lambda h: region.array)


def test_a_whole_read_is_written_into_the_down_slot_once_and_a_resend_goes_over_the_socket(tmp_path):
    service, regions, expected = _service(tmp_path)
    link = LinkRegions(regions.to_wire())
    slot0 = regions.layout.views(regions.down.array, 0)["float32"]
    request = _wire(PullRequest(5, "c", 0, slot=0), link.down)
    assert (request.slot, request.token) == (0, regions.token)
    first = _reply(service, request)
    assert first.region is regions.down and np.shares_memory(first.params["float32"], slot0)
    np.testing.assert_array_equal(first.params["float32"], expected, strict=True)
    frames = to_frames(first, first.region)
    assert len(frames) == 1  # the client reads the reply from its own mapping
    seen = from_frames(frames, region_of=lambda h: link.down.array if h.get("rg") == link.token else None)
    np.testing.assert_array_equal(seen.params["float32"], expected, strict=True)
    grad = np.random.default_rng(3).standard_normal(expected.size).astype(np.float32)
    assert _reply(service, PushMessage(1, "c", 1, 0, payload={"float32": grad})).ack.applied == 1
    moved = expected - LR * grad
    for rid in (5, 4):  # a resend; a request the client gave up on, answered late
        again = _reply(service, _wire(PullRequest(rid, "c", 0, slot=0), link.down))
        assert again.region is None and not np.shares_memory(again.params["float32"], regions.down.array)
        np.testing.assert_array_equal(again.params["float32"], moved, strict=True)
    np.testing.assert_array_equal(slot0, expected, strict=True)  # not written again
    newer = _reply(service, _wire(PullRequest(6, "c", 0, slot=0), link.down))
    assert newer.region is regions.down and np.shares_memory(newer.params["float32"], slot0)
    np.testing.assert_array_equal(slot0, moved, strict=True)
    for request in (PullRequest(7, "c", 0, pieces=[0], slot=1, token=regions.token),  # pieces
                    PullRequest(8, "c", 0, token=regions.token),  # no slot
                    PullRequest(9, "c", 0, slot=1),  # no token: meant for no registration
                    PullRequest(10, "c", 0, slot=1, token="0" * 16),  # an earlier registration's
                    PullRequest(11, "d", 0, slot=1, token=regions.token)):  # a client without regions
        reply = _reply(service, request)
        assert reply.region is None and not np.shares_memory(reply.params["float32"], regions.down.array)
        np.testing.assert_array_equal(reply.params["float32"], moved, strict=True)
    assert regions.written == [6, 0] and not np.any(regions.layout.views(regions.down.array, 1)["float32"])
    fused = _reply(service, _wire(PushMessage(12, "c", 2, 0, payload={"float32": grad}, pull=True, pull_worker=0,
                                              slot=1), link.down))
    assert fused.ack.applied == 2 and fused.region is regions.down
    slot1 = regions.layout.views(regions.down.array, 1)["float32"]
    assert np.shares_memory(fused.params["float32"], slot1)
    np.testing.assert_array_equal(slot1, moved - LR * grad, strict=True)


def test_an_early_push_from_the_up_slot_is_copied_before_the_client_reuses_the_slot(tmp_path):
    service, regions, initial = _service(tmp_path)
    rng = np.random.default_rng(4)
    grad1, grad2 = (rng.standard_normal(initial.size).astype(np.float32) for _ in range(2))
    slot = regions.layout.views(regions.up.array, 0)["float32"]
    slot[:] = grad2
    frames = to_frames(PushMessage(2, "c", 2, 0, payload={"float32": slot}), regions.up)
    early = from_frames(frames, region_of=lambda h: regions.up.array)
    assert early.shared and np.shares_memory(early.payload["float32"], regions.up.array)
    reply = _reply(service, early)
    assert reply.ack.seq == 2 and reply.ack.applied == 0  # held for seq 1
    slot[:] = 1e30  # acknowledged: the client packs its next push there
    assert _reply(service, PushMessage(1, "c", 1, 0, payload={"float32": grad1})).ack.applied == 2
    expected = (initial - LR * grad1) - LR * grad2  # SGD in float32, one step after the other
    np.testing.assert_array_equal(service.state.params["float32"], expected, strict=True)


# -- PushPlan ----------------------------------------------------------------------------------------------------
def test_large_full_pushes_are_packed_into_the_links_up_slots(tmp_path):
    shapes = {"W": (512, 512), "b": (512,)}
    dtypes = dict.fromkeys(shapes, "float32")
    layout = ParameterLayout.build(shapes, dtypes, 1)
    size = sum(int(np.prod(s)) for s in shapes.values())
    assert size * 4 >= POOL_FROM_BYTES and len(layout.shard_pieces[0]) == 2
    plan = PushPlan(layout, as_groups(Sgd()), {}, "reject", own_payloads=False)
    (tmp_path / "a").mkdir()
    shard, link = _pair(tmp_path / "a", {"float32": size})
    plan.shared_buffers = lambda index: link
    rng = np.random.default_rng(5)

    def push():
        grads = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
        [(_, payload, present, _, _)] = plan.messages(grads)
        assert present is None
        np.testing.assert_array_equal(payload["float32"], layout.pack(0, grads)[0]["float32"], strict=True)
        return payload["float32"]

    slot_bytes, offset = link.layout.slot_bytes, link.layout.offsets["float32"]
    first = push()
    assert link.up.offset_of(first) == offset
    np.testing.assert_array_equal(shard.layout.views(shard.up.array, 0)["float32"], first)  # where the shard reads
    second = push()
    assert link.up.offset_of(second) == slot_bytes + offset
    third = push()  # both slots in use: fresh memory
    assert link.up.offset_of(third) is None and not np.shares_memory(third, link.up.array)
    del first, second, third
    again = push()
    assert link.up.offset_of(again) == offset
    del again
    (tmp_path / "b").mkdir()
    _, restarted = _pair(tmp_path / "b", {"float32": size})
    plan.shared_buffers = lambda index: restarted
    fresh = push()
    assert restarted.up.offset_of(fresh) == offset and link.up.offset_of(fresh) is None


def test_regions_that_do_not_map_leave_the_link_on_its_socket(tmp_path, caplog):
    """``SharedMemoryLinks._map_regions``: a wire whose file is gone (or of another size) maps nothing; the
    link gets None (its socket) and a warning naming the shard."""
    from rayps.server.shared_memory_links import SharedMemoryLinks

    shard, _ = _pair(tmp_path)  # the client side unlinked both files already
    links = SharedMemoryLinks()
    links._ask_actor = lambda index, call: shard.to_wire()  # what the shard answered through Ray
    with caplog.at_level("WARNING"):
        assert links._map_regions(3) is None
    assert "shard 3's shared memory did not map" in caplog.text
