"""Checkpoint files: msgpack only (never pickle), versioned, checksummed, written atomically.

A checkpoint is a directory::

    manifest.msgpack          {"format": "rayps-checkpoint", "version", "names", "shapes", "dtypes",
                               "groups" (updater/group configs), "config", "num_shards"}
    shard-<i>.msgpack         per-shard pointer {"format": "rayps-shard-pointer", "version", "shard",
                               "file": "shard-<i>-g<gen>.blob", "sha256", "bytes", "generation"}
    shard-<i>-g<gen>.blob     the shard's snapshot, msgpack (see ``ShardState.snapshot``)

The directory is anything ``storage.directory`` takes: a local path, a URI (``s3://``, ``gs://``, ``file://``)
or a ``(pyarrow.fs.FileSystem, path)`` pair. A local file is written to a temporary name, fsynced, then renamed
over the old one; on an object store each file is one atomic PUT. Either way a blob is written under a new name
before the pointer that names it, and older blobs are deleted only afterwards, so a crash at any point leaves
the previous checkpoint whole. Loading treats every byte as hostile: size caps before reading, sha256 before
unpacking, msgpack limits while unpacking, file names confined to the directory, dtypes from an allow-list and
element counts checked against shapes.
"""

from __future__ import annotations

import hashlib
import os  # noqa: F401 - tests simulate crashes through checkpoint.os.replace
import re
from pathlib import Path

import msgpack
import numpy as np

from . import storage

FORMAT = "rayps-checkpoint"
POINTER_FORMAT = "rayps-shard-pointer"
BLOB_FORMAT = "rayps-shard"
VERSION = 1
MANIFEST_NAME = "manifest.msgpack"
MAX_MANIFEST_BYTES = 64 << 20
MAX_BLOB_BYTES = 64 << 30
SAFE_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")
ALLOWED_DTYPES = {"float16", "float32", "float64"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted or read; the message names the file and the problem."""


# -- writing ----------------------------------------------------------------------------------------------
def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to the local file ``path`` via a temporary file, fsync, rename, and fsync the directory."""
    storage.write_atomic(path, data)


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def write_manifest(directory, manifest: dict) -> None:
    directory = storage.directory(directory)
    directory.make()
    directory.write(MANIFEST_NAME, pack({"format": FORMAT, "version": VERSION, **manifest}))


def write_shard(directory, shard: int, generation: int, blob: bytes, before_publish=None) -> dict:
    """Write one shard's snapshot and then its pointer; delete that shard's older blobs. Returns the pointer.
    ``before_publish()`` runs between the two (tests: a death there, server/faults.py)."""
    directory = storage.directory(directory)
    directory.make()
    name = f"shard-{shard}-g{generation}.blob"
    directory.write(name, blob)
    if before_publish is not None:
        before_publish()
    pointer = {"format": POINTER_FORMAT, "version": VERSION, "shard": shard, "file": name,
               "sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob), "generation": generation}
    directory.write(f"shard-{shard}.msgpack", pack(pointer))  # published: the pointer is written last
    older = re.compile(rf"^shard-{shard}-g\d+\.blob$")
    for old in directory.names():
        if old != name and older.match(old):
            try:
                directory.delete(old)
            except OSError:
                pass
    return pointer


def write_record(directory, name: str, record: dict) -> None:
    """A small msgpack map (already carrying its ``format`` and ``version``) as the file ``name``."""
    directory = storage.directory(directory)
    directory.make()
    directory.write(name, pack(record))


# -- reading ----------------------------------------------------------------------------------------------
def unpack(data: bytes, what: str, max_bytes: int):
    """``data`` as msgpack, within limits (``max_bytes`` per binary, bounded strings, arrays and maps, no
    extension types); anything else is a ``CheckpointError`` naming ``what``."""
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False, max_bin_len=max_bytes, max_str_len=1 << 20,
                               max_array_len=1 << 24, max_map_len=1 << 24, max_ext_len=0)
    except (msgpack.exceptions.ExtraData, msgpack.exceptions.FormatError, msgpack.exceptions.StackError,
            ValueError, TypeError) as error:
        raise CheckpointError(f"{what}: not a valid rayps msgpack file ({type(error).__name__}: {error})") from None


def read_capped(directory, name: str, max_bytes: int, what: str) -> bytes:
    """The file ``name`` of ``directory`` (a ``storage`` directory), refused before reading when it is larger
    than ``max_bytes``; at most ``max_bytes + 1`` bytes are ever read (a file that grew shows as too long)."""
    size = directory.size(name)
    if size is None:
        raise FileNotFoundError(f"{what}: {directory.describe(name)} does not exist")
    if size > max_bytes:
        raise CheckpointError(f"{what}: {directory.describe(name)} is {size} bytes, more than the {max_bytes} allowed")
    return directory.read(name, max_bytes)


def _expect_dict(obj, what: str, fmt: str) -> dict:
    if not isinstance(obj, dict):
        raise CheckpointError(f"{what}: expected a msgpack map, got {type(obj).__name__}")
    if obj.get("format") != fmt:
        raise CheckpointError(f"{what}: format {obj.get('format')!r} is not {fmt!r}")
    if obj.get("version") != VERSION:
        raise CheckpointError(f"{what}: format version {obj.get('version')!r} is not supported (expected {VERSION})")
    return obj


def checked_name(directory, name) -> str:
    """``name`` if it is a plain file name inside ``directory`` (a ``storage`` directory; a local one: also
    after following symlinks); anything else (``../x``, ``/etc/x``, ``a/b``, a link out) is refused."""
    if not isinstance(name, str) or not SAFE_FILE_NAME.match(name) or ".." in name:
        raise CheckpointError(f"checkpoint names file {name!r}, which is not a plain file name inside {directory}")
    if not directory.resolves_inside(name):
        raise CheckpointError(f"checkpoint names file {name!r}, which resolves outside {directory}")
    return name


def confined(directory: Path, name) -> Path:
    """``directory / name`` for a plain file name of a local directory (see ``checked_name``)."""
    local = storage.LocalDirectory(directory)
    return (local.path / checked_name(local, name)).resolve()


def read_record(path: Path, fmt: str, max_bytes: int = 1 << 16) -> dict:
    """A small msgpack map of format ``fmt`` and this version, read with the same caps as everything else."""
    path = Path(path)
    return read_named_record(storage.LocalDirectory(path.parent), path.name, fmt, max_bytes)


def read_named_record(directory, name: str, fmt: str, max_bytes: int = 1 << 16) -> dict:
    """``read_record`` of the file ``name`` in ``directory`` (anything ``storage.directory`` takes)."""
    directory = storage.directory(directory)
    what = directory.describe(name)
    return _expect_dict(unpack(read_capped(directory, name, max_bytes, fmt), what, max_bytes), what, fmt)


def read_manifest(directory) -> dict:
    directory = storage.directory(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    what = directory.describe(MANIFEST_NAME)
    return _expect_dict(unpack(read_capped(directory, MANIFEST_NAME, MAX_MANIFEST_BYTES, "manifest"), what,
                                MAX_MANIFEST_BYTES), what, FORMAT)


def read_pointer(directory, shard: int) -> dict | None:
    directory = storage.directory(directory)
    name = f"shard-{shard}.msgpack"
    if directory.size(name) is None:
        return None
    what = directory.describe(name)
    pointer = _expect_dict(unpack(read_capped(directory, name, 1 << 16, "shard pointer"), what, 1 << 16), what,
                           POINTER_FORMAT)
    if pointer.get("shard") != shard:
        raise CheckpointError(f"{what}: names shard {pointer.get('shard')!r}, expected {shard}")
    return pointer


def read_shard(directory, pointer: dict) -> dict:
    """The shard snapshot a pointer names (and only that file), after its size and sha256 are checked."""
    directory = storage.directory(directory)
    name = checked_name(directory, pointer.get("file"))
    path = directory.describe(name)
    declared = pointer.get("bytes")
    if not isinstance(declared, int) or isinstance(declared, bool) or not 0 <= declared <= MAX_BLOB_BYTES:
        raise CheckpointError(f"{path}: declared size {declared!r} is not a valid byte count")
    data = read_capped(directory, name, declared, "shard blob")
    if len(data) != declared:
        raise CheckpointError(f"{path}: {len(data)} bytes stored, the pointer declares {declared} (truncated?)")
    digest = hashlib.sha256(data).hexdigest()
    if digest != pointer.get("sha256"):
        raise CheckpointError(f"{path}: sha256 {digest} does not match the recorded {pointer.get('sha256')!r} "
                              f"(corrupted or tampered)")
    return _expect_dict(unpack(data, path, declared), path, BLOB_FORMAT)


def write_blob(directory, name: str, blob: bytes) -> dict:
    """Write ``blob`` as the file ``name`` (a NEW name: published by whatever record names it next); returns the
    entry ``{"file", "sha256", "bytes"}`` that ``read_blob`` checks."""
    directory = storage.directory(directory)
    directory.make()
    directory.write(checked_name(directory, name), blob)
    return {"file": name, "sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob)}


def read_blob(directory, entry, what: str):
    """The msgpack content of the file an entry of ``write_blob`` names, after its size and sha256 are checked
    (the caller checks its format)."""
    directory = storage.directory(directory)
    if not isinstance(entry, dict):
        raise CheckpointError(f"{what}: expected a file entry, got {type(entry).__name__}")
    name = checked_name(directory, entry.get("file"))
    path = directory.describe(name)
    declared = entry.get("bytes")
    if not isinstance(declared, int) or isinstance(declared, bool) or not 0 <= declared <= MAX_BLOB_BYTES:
        raise CheckpointError(f"{path}: declared size {declared!r} is not a valid byte count")
    data = read_capped(directory, name, declared, what)
    if len(data) != declared or hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        raise CheckpointError(f"{path}: size or sha256 does not match its entry (corrupted or tampered)")
    return unpack(data, path, declared)


# -- arrays -----------------------------------------------------------------------------------------------
def encode_array(array: np.ndarray) -> dict:
    array = np.ascontiguousarray(array)
    return {"dtype": str(array.dtype), "shape": list(array.shape), "data": array.tobytes()}


def decode_array(record, what: str) -> np.ndarray:
    """A writable array from ``encode_array``'s record, every field checked."""
    if not isinstance(record, dict):
        raise CheckpointError(f"{what}: expected an array record, got {type(record).__name__}")
    dtype, shape, data = record.get("dtype"), record.get("shape"), record.get("data")
    if dtype not in ALLOWED_DTYPES:
        raise CheckpointError(f"{what}: dtype {dtype!r} is not one of {sorted(ALLOWED_DTYPES)}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and 0 <= d < 1 << 40 for d in shape):
        raise CheckpointError(f"{what}: shape {shape!r} is not a list of non-negative integers")
    if not isinstance(data, bytes):
        raise CheckpointError(f"{what}: data is {type(data).__name__}, expected bytes")
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if count * np.dtype(dtype).itemsize != len(data):
        raise CheckpointError(f"{what}: {len(data)} bytes do not hold shape {shape} of {dtype}")
    return np.frombuffer(data, dtype=dtype).reshape(shape).copy()


def encode_ints(array: np.ndarray) -> dict:
    """An int64 vector as a msgpack-able record (``encode_array`` is for float data only)."""
    return {"dtype": "int64", "shape": [int(len(array))], "data": np.asarray(array, dtype="<i8").tobytes()}


def decode_ints(record, what: str) -> np.ndarray:
    """``encode_ints``' record back, every field checked."""
    if not isinstance(record, dict) or record.get("dtype") != "int64":
        raise CheckpointError(f"{what}: expected an int64 vector record")
    shape, data = record.get("shape"), record.get("data")
    if not (isinstance(shape, list) and len(shape) == 1 and isinstance(shape[0], int) and shape[0] >= 0):
        raise CheckpointError(f"{what}: shape {shape!r} is not [length]")
    if not isinstance(data, bytes) or len(data) != 8 * shape[0]:
        raise CheckpointError(f"{what}: data does not hold {shape[0]} int64 values")
    return np.frombuffer(data, dtype="<i8").astype(np.int64)
