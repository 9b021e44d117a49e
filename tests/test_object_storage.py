"""Checkpoints on object storage, against a real S3-compatible server on loopback (``s3_endpoint``: moto's
standalone server, tests/s3_server.py).

The hostile-input checks of test_checkpoint.py run here again, each against a local directory AND an S3
prefix, through the same tampering: what a local checkpoint refuses, an S3 one refuses with the same message.
Then the publish order (blob, then pointer; only what a pointer names is read), a shard killed mid-run that
restores from S3 (bit-identical to a run without the fault), and save/restore through a URI and through a
``(pyarrow.fs.FileSystem, path)`` pair.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import time
import uuid
from pathlib import Path

import msgpack
import numpy as np
import pytest

from rayps.server import ParameterLayout, ShardState
from rayps.server.checkpoints import format as ckpt
from rayps.server.checkpoints import server_state
from rayps.server.checkpoints import shard as shard_checkpoint
from rayps.server.checkpoints import storage
from rayps.updaters import Adam, ParamGroup, Sgd
from rayps.updaters.groups import assign_groups

GROUPS = (ParamGroup(Adam(learning_rate=0.01), names=("W", "V"), name="dense"), ParamGroup(Sgd(0.1), name="rest"))


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {"W": rng.standard_normal((9, 3)).astype(np.float32), "b": rng.standard_normal(3).astype(np.float32),
            "V": rng.standard_normal((5, 2))}


def _shards(params, num_shards=2, steps=4):
    """ShardStates after ``steps`` pushes of seeded gradients (an independent reference: test_checkpoint.py)."""
    shapes = {n: a.shape for n, a in params.items()}
    dtypes = {n: str(a.dtype) for n, a in params.items()}
    layout = ParameterLayout.build(shapes, dtypes, num_shards, assign_groups(GROUPS, list(params)))
    shards = [ShardState(s, layout.shard_pieces[s], GROUPS, layout.pack(s, params)[0]) for s in range(num_shards)]
    rng = np.random.default_rng(1)
    for seq in range(1, steps + 1):
        grads = {n: rng.standard_normal(a.shape).astype(a.dtype) for n, a in params.items()}
        for s, shard in enumerate(shards):
            assert shard.push("client", seq, 0, *layout.pack(s, grads)).errors == []
    return layout, shards


def _write(directory, layout, shards, generation=1, blobs=True):
    pointers = [ckpt.write_shard(directory, s.shard_index, generation, ckpt.pack(shard_checkpoint.snapshot(s)))
                for s in shards]
    manifest = {"names": list(layout.names), "shapes": {n: list(s) for n, s in layout.shapes.items()},
                "dtypes": dict(layout.dtypes), "groups": [g.to_config() for g in GROUPS],
                "config": {"consistency": "async"}, "num_shards": layout.num_shards}
    if blobs:
        manifest["blobs"] = [{"shard": p["shard"], "file": p["file"], "sha256": p["sha256"]} for p in pointers]
    ckpt.write_manifest(directory, manifest)


def _whole(layout, shards):
    out = {n: np.empty(layout.shapes[n], dtype=layout.dtypes[n]) for n in layout.names}
    for shard in shards:
        layout.unpack_into(shard.shard_index, shard.read(), out)
    return out


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    """A fresh checkpoint directory: a local path, or a new prefix of the test bucket as an s3:// URI."""
    if request.param == "local":
        return str(tmp_path / "ckpt")
    endpoint = request.getfixturevalue("s3_endpoint")
    return f"s3://rayps-test/{uuid.uuid4().hex}/ckpt?endpoint_override={endpoint}&scheme=http"


@pytest.fixture
def saved(store):
    layout, shards = _shards(_params())
    _write(store, layout, shards, blobs=False)  # as a shards' checkpoint_dir: the pointers rule
    return store, storage.directory(store), layout, shards


def _tamper_blob(directory, data: bytes, pointer_too: bool = False, shard: int = 0) -> dict:
    """Replace shard ``shard``'s blob with ``data`` (and, with ``pointer_too``, record its true size and hash)."""
    pointer = ckpt.read_pointer(directory, shard)
    directory.write(pointer["file"], data)
    if pointer_too:
        pointer.update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
        directory.write(f"shard-{shard}.msgpack", ckpt.pack(pointer))
    return pointer


def _blob(directory, shard=0) -> bytes:
    return directory.read(ckpt.read_pointer(directory, shard)["file"], ckpt.MAX_MANIFEST_BYTES)


# -- the storage layer ------------------------------------------------------------------------------------
def test_each_location_form_resolves_to_one_directory(tmp_path, s3_endpoint):
    import pyarrow.fs as pafs

    local = storage.directory(tmp_path / "a")
    assert local == storage.directory(str(tmp_path / "a")) == storage.directory(f"file://{tmp_path}/a") \
        == storage.directory((pafs.LocalFileSystem(), str(tmp_path / "a")))
    assert local.local and str(local.child("run")) == str(tmp_path / "a" / "run")
    remote = storage.directory(f"s3://rayps-test/x/y?endpoint_override={s3_endpoint}&scheme=http")
    assert not remote.local and str(remote) == "s3://rayps-test/x/y"  # the query never shows in messages
    child = remote.child("shards")
    assert str(child) == "s3://rayps-test/x/y/shards" and child.filesystem is remote.filesystem
    assert pickle.loads(pickle.dumps(child)) == child  # what a shard actor receives
    pair = storage.directory((pafs.S3FileSystem(endpoint_override=s3_endpoint, scheme="http"), "rayps-test/x/y"))
    assert str(pair) == "s3://rayps-test/x/y"


@pytest.mark.parametrize("location,match", [
    ((1, "p"), "must be a pyarrow.fs.FileSystem"),
    (("a", "b", "c"), r"expected \(pyarrow.fs.FileSystem, path\)"),
    (42, "expected a path, a URI"),
    ("", "empty"),
    ("nosuchscheme://bucket/x", "storage location 'nosuchscheme://bucket/x'"),
])
def test_a_bad_location_is_refused_naming_what_was_expected(location, match):
    with pytest.raises(ValueError, match=match):
        storage.directory(location)


def test_round_trip_through_s3_equals_the_local_one(tmp_path, s3_endpoint):
    layout, shards = _shards(_params())
    uri = f"s3://rayps-test/{uuid.uuid4().hex}?endpoint_override={s3_endpoint}&scheme=http"
    _write(uri, layout, shards)
    _write(tmp_path, layout, shards)
    remote, local, expected = server_state.load(uri), server_state.load(tmp_path), _whole(layout, shards)
    for name in layout.names:
        np.testing.assert_array_equal(remote["params"][name], expected[name])
        for key, slot in local["updater_state"][name]["state"].items():
            np.testing.assert_array_equal(remote["updater_state"][name]["state"][key], slot)
        assert remote["updater_state"][name]["iteration"] == 4
    names = storage.directory(uri).names()
    assert names == sorted(["manifest.msgpack", "shard-0.msgpack", "shard-1.msgpack", "shard-0-g1.blob",
                            "shard-1-g1.blob"])


# -- publish order: blob first, pointer last, read only what a pointer names ------------------------------
def test_a_crash_between_blob_and_pointer_leaves_the_previous_checkpoint(saved, monkeypatch):
    location, directory, layout, shards = saved
    expected = server_state.load(location)["params"]
    real_write = type(directory).write

    def crash_on_pointer(self, name, data):
        if name == "shard-0.msgpack":
            raise OSError("simulated crash after the blob")
        return real_write(self, name, data)

    for shard in shards:  # move on, so the next blob differs
        shard.push("client", 5, 0, *layout.pack(shard.shard_index, {n: np.ones(layout.shapes[n], layout.dtypes[n])
                                                                    for n in layout.names}))
    monkeypatch.setattr(type(directory), "write", crash_on_pointer)
    with pytest.raises(OSError, match="simulated crash"):
        ckpt.write_shard(location, 0, 2, ckpt.pack(shard_checkpoint.snapshot(shards[0])))
    monkeypatch.undo()
    assert "shard-0-g2.blob" in directory.names()  # the new blob is there, unpublished
    loaded = server_state.load(location)
    for name in layout.names:
        np.testing.assert_array_equal(loaded["params"][name], expected[name])


def test_only_the_blob_a_pointer_names_is_read(saved):
    """A newer-looking blob of garbage beside the published one changes nothing; publishing a new generation
    deletes the older blob only after its pointer is written."""
    location, directory, layout, shards = saved
    directory.write("shard-0-g99.blob", b"\xc1" * 64)  # never a valid msgpack byte
    loaded = server_state.load(location)
    for name, value in _whole(layout, shards).items():
        np.testing.assert_array_equal(loaded["params"][name], value)
    ckpt.write_shard(location, 0, 3, ckpt.pack(shard_checkpoint.snapshot(shards[0])))
    assert [n for n in directory.names() if n.startswith("shard-0-")] == ["shard-0-g3.blob"]


# -- hostile checkpoints: the same refusals, local and on S3 ----------------------------------------------
def test_a_missing_location_is_file_not_found(store):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        server_state.load(store.replace("ckpt", "absent"))


def test_a_truncated_blob_is_refused(saved):
    location, directory = saved[:2]
    _tamper_blob(directory, _blob(directory)[:-10])
    with pytest.raises(ckpt.CheckpointError, match="truncated"):
        server_state.load(location)


def test_one_flipped_byte_is_refused(saved):
    location, directory = saved[:2]
    data = bytearray(_blob(directory))
    data[len(data) // 2] ^= 0x01
    _tamper_blob(directory, bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="sha256"):
        server_state.load(location)


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch /tmp/rayps-pwned-s3",))


def test_a_pickle_payload_is_never_unpickled(saved):
    location, directory = saved[:2]
    marker = Path("/tmp/rayps-pwned-s3")
    marker.unlink(missing_ok=True)
    payload = pickle.dumps(_Boom())
    pointer = _tamper_blob(directory, payload, pointer_too=True)
    with pytest.raises(ckpt.CheckpointError, match="not a valid rayps msgpack|expected a msgpack map"):
        ckpt.read_shard(location, pointer)
    directory.write(ckpt.MANIFEST_NAME, payload)
    with pytest.raises(ckpt.CheckpointError, match="manifest"):
        server_state.load(location)
    assert not marker.exists()


def test_a_forged_huge_length_is_refused_before_allocation(saved):
    location, directory = saved[:2]
    pointer = _tamper_blob(directory, b"\x81\xa6format\xc6\xff\xff\xff\xf0" + b"x" * 16, pointer_too=True)
    with pytest.raises(ckpt.CheckpointError, match="not a valid rayps msgpack"):
        ckpt.read_shard(location, pointer)
    pointer.update(bytes=1 << 62)
    with pytest.raises(ckpt.CheckpointError, match="declared size"):
        ckpt.read_shard(location, pointer)


@pytest.mark.parametrize("name", ["../escape.blob", "/etc/passwd", "sub/dir.blob", "..", ".hidden"])
def test_a_pointer_naming_a_file_outside_the_directory_is_refused(saved, name):
    location, directory = saved[:2]
    pointer = ckpt.read_pointer(directory, 0)
    pointer["file"] = name
    directory.write("shard-0.msgpack", ckpt.pack(pointer))
    with pytest.raises(ckpt.CheckpointError, match="plain file name|outside"):
        server_state.load(location)


@pytest.mark.parametrize("field,value,match", [
    ("version", 99, "version 99 is not supported"),
    ("dtypes", {"W": "int64", "b": "float32", "V": "float64"}, "dtype of 'W'"),
    ("groups", [{"updater": {"type": "Pickle"}}], "updater/group config"),
    ("num_shards", 0, "num_shards"),
])
def test_a_manifest_with_a_bad_field_names_it(saved, field, value, match):
    location, directory = saved[:2]
    manifest = msgpack.unpackb(directory.read(ckpt.MANIFEST_NAME, 1 << 20), raw=False)
    manifest[field] = value
    directory.write(ckpt.MANIFEST_NAME, ckpt.pack(manifest))
    with pytest.raises(ckpt.CheckpointError, match=match):
        server_state.load(location)


def test_a_blob_with_nan_parameters_is_refused(saved):
    location, directory, layout, shards = saved
    snap = shard_checkpoint.snapshot(shards[0])
    record = snap["pieces"][0]["params"]
    values = np.frombuffer(record["data"], dtype=record["dtype"]).copy()
    values[0] = np.nan
    record["data"] = values.tobytes()
    ckpt.write_shard(location, 0, 5, ckpt.pack(snap))
    with pytest.raises(ckpt.CheckpointError, match="NaN"):
        server_state.load(location)


def test_an_oversized_pointer_is_refused_before_it_is_read(saved):
    location, directory = saved[:2]
    directory.write("shard-0.msgpack", b"\x00" * ((1 << 16) + 1))
    with pytest.raises(ckpt.CheckpointError, match="more than the 65536 allowed"):
        ckpt.read_pointer(location, 0)


# -- on Ray: shards that checkpoint to S3 ----------------------------------------------------------------
def _grads(params, count, seed=1):
    rng = np.random.default_rng(seed)
    return [{n: rng.standard_normal(a.shape).astype(a.dtype) for n, a in params.items()} for _ in range(count)]


def _trajectory(checkpoint_dir, kills: dict, pushes=40):
    import ray

    from rayps.server import ParameterServer

    params = _params()
    ps = ParameterServer(params, updater=Adam(learning_rate=0.01), num_shards=2, checkpoint_dir=checkpoint_dir,
                         checkpoint_every=8, recovery_timeout=300)
    try:
        for i, grads in enumerate(_grads(params, pushes), start=1):
            ps.push(grads)
            if i in kills:  # kill once the shard has every push so far, and go on once Ray has restarted it
                ps.flush()
                before = ps.stats()["restarts"]
                ray.kill(ps.shard_actors[kills[i]], no_restart=False)
                deadline = time.monotonic() + 120
                while ps.stats()["restarts"] == before and time.monotonic() < deadline:
                    time.sleep(0.1)
        return ps.pull(), ps.stats()
    finally:
        ps.shutdown()


def test_shards_killed_mid_run_restore_from_s3_exactly_once(ray_session, s3_endpoint, tmp_path):
    """40 pushes; shard 0 killed after push 19, shard 1 after push 31, both checkpointing to S3: the same final
    parameters as a clean run on a local directory, every push applied once."""
    prefix = uuid.uuid4().hex
    uri = f"s3://rayps-test/{prefix}/shards?endpoint_override={s3_endpoint}&scheme=http"
    expected, _ = _trajectory(tmp_path / "clean", {})
    got, stats = _trajectory(uri, {19: 0, 31: 1})
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])
    assert stats["restarts"] == 2 and stats["replayed"] > 0  # the pushes after each shard's last checkpoint
    assert stats["updates_applied"] == 40  # none lost, none doubled
    names = storage.directory(uri).names()  # what the shards restored from is on the server
    assert {"manifest.msgpack", "shard-0.msgpack", "shard-1.msgpack"} <= set(names)
    generations = [ckpt.read_pointer(uri, s)["generation"] for s in (0, 1)]
    assert all(g > 0 for g in generations), generations  # periodic checkpoints, not only the initial one


def test_save_to_a_filesystem_pair_and_restore_from_its_uri_into_one_shard(ray_session, s3_endpoint):
    import pyarrow.fs as pafs

    from rayps.server import ParameterServer

    params = _params()
    grads = _grads(params, 6)
    path = f"rayps-test/{uuid.uuid4().hex}/saved"
    filesystem = pafs.S3FileSystem(endpoint_override=s3_endpoint, scheme="http")
    ps = ParameterServer(params, updater=Adam(learning_rate=0.01), num_shards=2)
    try:
        for g in grads[:3]:
            ps.push(g)
        ps.save((filesystem, path))
        for g in grads[3:]:
            ps.push(g)
        expected = ps.pull()
    finally:
        ps.shutdown()
    restored = ParameterServer.restore(f"s3://{path}?endpoint_override={s3_endpoint}&scheme=http", num_shards=1)
    try:
        for g in grads[3:]:  # the Adam moments came back from S3 too
            restored.push(g)
        for name, value in restored.pull().items():
            np.testing.assert_array_equal(value, expected[name])
    finally:
        restored.shutdown()
