"""Checkpoint files without Ray: the format round trip, resharding by name, atomic writes, hostile files.

A checkpoint directory is made here exactly as the shards and ``ParameterServer.save`` make it
(``ShardState`` snapshots through ``checkpoint.write_shard`` plus the manifest), then read back with
``server_state.load`` — the function ``ParameterServer.restore`` uses.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import msgpack
import numpy as np
import pytest

from rayps.server import ParameterLayout, ShardState
from rayps.server.checkpoints import format as ckpt
from rayps.server.checkpoints import server_state
from rayps.server.checkpoints import shard as shard_checkpoint
from rayps.server.checkpoints.state_dict import server_args
from rayps.updaters import Adam, ParamGroup, Sgd
from rayps.updaters.groups import assign_groups


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {"W": rng.standard_normal((9, 3)).astype(np.float32), "b": rng.standard_normal(3).astype(np.float32),
            "V": rng.standard_normal((5, 2))}


GROUPS = (ParamGroup(Adam(learning_rate=0.01), names=("W", "V"), name="dense"), ParamGroup(Sgd(0.1), name="rest"))


def _shards(params, num_shards, steps=4, seed=1):
    """ShardStates that received ``steps`` full pushes, and the reference arrays the pushes should give."""
    shapes = {n: a.shape for n, a in params.items()}
    dtypes = {n: str(a.dtype) for n, a in params.items()}
    group_of = assign_groups(GROUPS, list(params))
    layout = ParameterLayout.build(shapes, dtypes, num_shards, group_of)
    shards = [ShardState(s, layout.shard_pieces[s], GROUPS, layout.pack(s, params)[0]) for s in range(num_shards)]
    rng = np.random.default_rng(seed)
    for seq in range(1, steps + 1):
        grads = {n: rng.standard_normal(a.shape).astype(a.dtype) for n, a in params.items()}
        for s, shard in enumerate(shards):
            payload, present = layout.pack(s, grads)
            assert shard.push("client", seq, 0, payload, present).errors == []
    return layout, shards


def _write(directory: Path, layout, shards, generation=1):
    pointers = [ckpt.write_shard(directory, s.shard_index, generation, ckpt.pack(shard_checkpoint.snapshot(s)))
                for s in shards]
    manifest = {"names": list(layout.names), "shapes": {n: list(s) for n, s in layout.shapes.items()},
                "dtypes": dict(layout.dtypes), "groups": [g.to_config() for g in GROUPS],
                "config": {"consistency": "async"}, "num_shards": layout.num_shards,
                "blobs": [{"shard": p["shard"], "file": p["file"], "sha256": p["sha256"]} for p in pointers]}
    ckpt.write_manifest(directory, manifest)
    return pointers


def _whole(layout, shards):
    out = {n: np.empty(layout.shapes[n], dtype=layout.dtypes[n]) for n in layout.names}
    for shard in shards:
        layout.unpack_into(shard.shard_index, shard.read(), out)
    return out


@pytest.fixture
def saved(tmp_path):
    layout, shards = _shards(_params(), 2)
    _write(tmp_path, layout, shards)
    return tmp_path, layout, shards


def test_round_trip_gives_identical_params_state_and_iterations(saved):
    path, layout, shards = saved
    loaded = server_state.load(path)
    expected = _whole(layout, shards)
    for name in layout.names:
        np.testing.assert_array_equal(loaded["params"][name], expected[name])
        assert loaded["updater_state"][name]["iteration"] == 4  # four pushes carried every key
    assert loaded["groups"] == [g.to_config() for g in GROUPS]


@pytest.mark.parametrize("new_shards", [1, 2, 3])
def test_reshard_then_continue_identically(saved, new_shards):
    """Restore into 1, 2, 3 shards: same params and updater state, and the next pushes give the same result."""
    path, layout, shards = saved
    loaded = server_state.load(path)
    group_of = assign_groups(GROUPS, list(loaded["params"]))
    new_layout = ParameterLayout.build(layout.shapes, layout.dtypes, new_shards, group_of)
    restored = []
    for s in range(new_shards):
        state = ShardState(s, new_layout.shard_pieces[s], GROUPS, new_layout.pack(s, loaded["params"])[0])
        named_state = server_args(loaded)["initial_state"].updater_state
        shard_checkpoint.load_pieces(state, [(None, slots, it) for slots, it in
                                             server_state.piece_states(new_layout, s, named_state)])
        restored.append(state)
    rng = np.random.default_rng(99)
    for seq in range(5, 9):
        grads = {n: rng.standard_normal(layout.shapes[n]).astype(layout.dtypes[n]) for n in layout.names}
        for old in shards:
            old.push("client", seq, 0, *layout.pack(old.shard_index, grads))
        for new in restored:
            new.push("client2", seq - 4, 0, *new_layout.pack(new.shard_index, grads))
    before, after = _whole(layout, shards), _whole(new_layout, restored)
    for name in layout.names:
        np.testing.assert_array_equal(before[name], after[name])


def test_crash_during_a_checkpoint_write_leaves_the_previous_one(saved, monkeypatch):
    path, layout, shards = saved
    expected = server_state.load(path)["params"]
    for seq in range(5, 8):  # move on, then crash while writing the next generation's blob
        for shard in shards:
            grads = {n: np.ones(layout.shapes[n], dtype=layout.dtypes[n]) for n in layout.names}
            shard.push("client", seq, 0, *layout.pack(shard.shard_index, grads))
    real_replace = os.replace

    def crash_on_blob(src, dst):
        if str(dst).endswith(".blob"):
            raise OSError("simulated crash: power lost before the rename")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", crash_on_blob)
    with pytest.raises(OSError, match="simulated crash"):
        _write(path, layout, shards, generation=2)
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    loaded = server_state.load(path)
    for name in layout.names:
        np.testing.assert_array_equal(loaded["params"][name], expected[name])


def test_crash_between_blob_and_pointer_leaves_the_previous_one(saved, monkeypatch):
    path, layout, shards = saved
    expected = server_state.load(path)["params"]
    real_replace = os.replace

    def crash_on_pointer(src, dst):
        if str(dst).endswith("shard-0.msgpack"):
            raise OSError("simulated crash after the blob")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", crash_on_pointer)
    with pytest.raises(OSError):
        ckpt.write_shard(path, 0, 7, ckpt.pack(shard_checkpoint.snapshot(shards[0])))
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    loaded = server_state.load(path)
    for name in layout.names:
        np.testing.assert_array_equal(loaded["params"][name], expected[name])


# -- hostile and broken checkpoints ------------------------------------------------------------------------
def _pointers_only(path: Path) -> None:
    """Make ``path`` look like a shards' ``checkpoint_dir``: the manifest lists no blobs, the pointers rule."""
    manifest = msgpack.unpackb((path / ckpt.MANIFEST_NAME).read_bytes(), raw=False)
    manifest.pop("blobs")
    ckpt.write_atomic(path / ckpt.MANIFEST_NAME, ckpt.pack(manifest))


def _blob_path(path: Path, shard=0) -> Path:
    return path / ckpt.read_pointer(path, shard)["file"]


def test_missing_path_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        server_state.load(tmp_path / "nope")


def test_truncated_blob_is_refused(saved):
    path = saved[0]
    blob = _blob_path(path)
    blob.write_bytes(blob.read_bytes()[:-10])
    with pytest.raises(ckpt.CheckpointError, match="truncated"):
        server_state.load(path)


def test_one_flipped_byte_is_refused(saved):
    path = saved[0]
    blob = _blob_path(path)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01
    blob.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="sha256"):
        server_state.load(path)


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch /tmp/rayps-pwned",))


def test_a_pickle_payload_is_never_unpickled(saved, tmp_path):
    path = saved[0]
    marker = Path("/tmp/rayps-pwned")
    marker.unlink(missing_ok=True)
    payload = pickle.dumps(_Boom())
    (path / ckpt.MANIFEST_NAME).write_bytes(payload)
    with pytest.raises(ckpt.CheckpointError, match="manifest"):
        server_state.load(path)
    # the same payload as a blob whose pointer records its true hash and size
    pointer = ckpt.read_pointer(path, 0)
    _blob_path(path).write_bytes(payload)
    pointer.update(sha256=hashlib.sha256(payload).hexdigest(), bytes=len(payload))
    ckpt.write_atomic(path / "shard-0.msgpack", ckpt.pack(pointer))
    with pytest.raises(ckpt.CheckpointError):
        ckpt.read_shard(path, pointer)
    assert not marker.exists()


def test_a_forged_huge_length_is_refused_before_allocation(saved):
    path = saved[0]
    pointer = ckpt.read_pointer(path, 0)
    # a msgpack bin32 header claiming 4 GiB, followed by almost nothing
    forged = b"\x81\xa6format\xc6\xff\xff\xff\xf0" + b"x" * 16
    _blob_path(path).write_bytes(forged)
    pointer.update(sha256=hashlib.sha256(forged).hexdigest(), bytes=len(forged))
    ckpt.write_atomic(path / "shard-0.msgpack", ckpt.pack(pointer))
    with pytest.raises(ckpt.CheckpointError, match="pointer does not match the manifest"):
        server_state.load(path)  # the manifest's hash list catches the swap first
    with pytest.raises(ckpt.CheckpointError, match="not a valid rayps msgpack"):
        ckpt.read_shard(path, pointer)  # and the msgpack length cap catches the forged length itself
    pointer.update(bytes=1 << 62)
    with pytest.raises(ckpt.CheckpointError, match="declared size"):
        ckpt.read_shard(path, pointer)


@pytest.mark.parametrize("name", ["../escape.blob", "/etc/passwd", "sub/dir.blob", "..", ".hidden"])
def test_a_pointer_naming_a_path_outside_the_directory_is_refused(saved, name):
    path = saved[0]
    _pointers_only(path)
    pointer = ckpt.read_pointer(path, 0)
    pointer["file"] = name
    ckpt.write_atomic(path / "shard-0.msgpack", ckpt.pack(pointer))
    with pytest.raises(ckpt.CheckpointError, match="plain file name|outside"):
        server_state.load(path)


def test_a_symlink_out_of_the_directory_is_refused(saved, tmp_path_factory):
    path = saved[0]
    _pointers_only(path)
    outside = tmp_path_factory.mktemp("outside") / "secret.blob"
    outside.write_bytes(b"secret")
    (path / "link.blob").symlink_to(outside)
    pointer = ckpt.read_pointer(path, 0)
    pointer["file"] = "link.blob"
    ckpt.write_atomic(path / "shard-0.msgpack", ckpt.pack(pointer))
    with pytest.raises(ckpt.CheckpointError, match="outside"):
        server_state.load(path)


def test_a_different_format_version_is_refused(saved):
    path = saved[0]
    manifest = msgpack.unpackb((path / ckpt.MANIFEST_NAME).read_bytes(), raw=False)
    manifest["version"] = 99
    ckpt.write_atomic(path / ckpt.MANIFEST_NAME, ckpt.pack(manifest))
    with pytest.raises(ckpt.CheckpointError, match="version 99 is not supported"):
        server_state.load(path)


@pytest.mark.parametrize("field,value,match", [
    ("shapes", {"W": [9, 3], "b": [3]}, "same parameters"),
    ("dtypes", {"W": "int64", "b": "float32", "V": "float64"}, "dtype of 'W'"),
    ("groups", [{"updater": {"type": "Pickle"}}], "updater/group config"),
    ("num_shards", 0, "num_shards"),
    ("names", "W", "names"),
])
def test_a_manifest_with_a_bad_field_names_it(saved, field, value, match):
    path = saved[0]
    manifest = msgpack.unpackb((path / ckpt.MANIFEST_NAME).read_bytes(), raw=False)
    manifest[field] = value
    ckpt.write_atomic(path / ckpt.MANIFEST_NAME, ckpt.pack(manifest))
    with pytest.raises(ckpt.CheckpointError, match=match):
        server_state.load(path)


def test_a_blob_whose_array_bytes_do_not_match_its_shape_is_refused(saved):
    path, layout, shards = saved
    _pointers_only(path)
    snap = shard_checkpoint.snapshot(shards[0])
    snap["pieces"][0]["params"]["shape"] = [1000, 1000]
    ckpt.write_shard(path, 0, 5, ckpt.pack(snap))
    with pytest.raises(ckpt.CheckpointError, match="do not hold shape"):
        server_state.load(path)


def test_a_blob_with_nan_parameters_is_refused(saved):
    path, layout, shards = saved
    _pointers_only(path)
    snap = shard_checkpoint.snapshot(shards[0])
    record = snap["pieces"][0]["params"]
    values = np.frombuffer(record["data"], dtype=record["dtype"]).copy()
    values[0] = np.nan
    record["data"] = values.tobytes()
    ckpt.write_shard(path, 0, 5, ckpt.pack(snap))
    with pytest.raises(ckpt.CheckpointError, match="NaN"):
        server_state.load(path)


def test_a_shard_restart_restore_checks_the_layout(saved):
    path, layout, shards = saved
    blob = ckpt.read_shard(path, ckpt.read_pointer(path, 1))
    with pytest.raises(ckpt.CheckpointError, match="shard 1, expected 0|is shard 1"):
        shard_checkpoint.restore(shards[0], blob, "shard 0 checkpoint")


def test_a_restart_restore_brings_back_clocks_and_exactly_once_counters(saved):
    path, layout, shards = saved
    shard = shards[0]
    fresh = ShardState(0, shard.pieces, GROUPS, {d: np.zeros_like(b) for d, b in shard.params.items()})
    shard_checkpoint.restore(fresh, ckpt.read_shard(path, ckpt.read_pointer(path, 0)), "shard 0")
    assert fresh.applied_seq == shard.applied_seq == {"client": 4}
    assert fresh.clocks == shard.clocks
    for dtype in shard.params:
        np.testing.assert_array_equal(fresh.params[dtype], shard.params[dtype])
    for key in shard.state:
        np.testing.assert_array_equal(fresh.state[key], shard.state[key])
    # a replayed push it already holds is dropped; the next one is applied
    grads = {n: np.ones(layout.shapes[n], dtype=layout.dtypes[n]) for n in layout.names}
    fresh.push("client", 4, 0, *layout.pack(0, grads))
    assert fresh.counters["duplicates_dropped"] == 1
    fresh.push("client", 5, 0, *layout.pack(0, grads))
    assert fresh.applied_seq["client"] == 5
