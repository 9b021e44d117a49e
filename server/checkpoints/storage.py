"""Where checkpoints live: a local directory, or a directory on any pyarrow filesystem (S3, GCS, HDFS, ...).

    directory("/data/run")                                            # a local path (or "file:///data/run")
    directory("s3://bucket/run")                                      # credentials: the AWS chain (below)
    directory("s3://bucket/run?endpoint_override=host:9000&scheme=http")   # MinIO, Ceph, ...: pyarrow's URI options
    directory("gs://bucket/run")
    directory((pyarrow.fs.S3FileSystem(...), "bucket/run"))         # Ray Train's storage_filesystem + storage_path

Every checkpoint read and write goes through one small interface: ``write(name, data)``, ``read(name,
max_bytes)``, ``size(name)``, ``names()``, ``delete(name)``, ``child(name)``. Names are flat file names
(format.py checks them: no ``/``, no ``..``), so nothing a checkpoint file says can reach outside its
directory.

Publishing. A local write goes to a temporary file, is fsynced and renamed over the old one (atomic). Object
stores have no rename, but a single object's PUT is atomic: a reader sees the whole old object or the whole new
one, never a part. So a checkpoint writes its blobs under NEW names first (a blob a pointer names is never
overwritten), then the small pointer object last, and readers read only what a pointer names: a crash anywhere
before the pointer leaves the previous pointer naming the previous, still present, blob. Older blobs are deleted
only after the new pointer is written.

Credentials never go in a URI. pyarrow's own chain finds them in each process that reads or writes (the driver
and the node of every shard): for S3 ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` (``AWS_SESSION_TOKEN``),
``AWS_DEFAULT_REGION``, ``~/.aws/``, or the instance's role; for GCS ``GOOGLE_APPLICATION_CREDENTIALS``. URI
query options (pyarrow's ``FileSystem.from_uri``): ``endpoint_override``, ``scheme`` (``http`` for a plain
endpoint), ``region``, ``allow_bucket_creation``. A ``FileSystem`` object handed in is pickled to the shards as
pyarrow pickles it (keys given to it explicitly travel with it, through Ray; keys from the environment do not).

pyarrow is imported only for a URI or a filesystem object: local checkpoints need nothing beyond the standard
library.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

PYARROW_INSTALL_HINT = 'pip install "rayps[data]" (or pyarrow)'
URI_SCHEMES = ("s3://", "gs://", "gcs://", "hdfs://", "viewfs://", "abfs://", "abfss://")


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file, fsync, rename, and fsync the directory."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class LocalDirectory:
    """A directory on this machine's filesystem (or a mount every node shares: NFS, EFS, a volume)."""

    local = True

    def __init__(self, path):
        self.path = Path(os.path.abspath(os.fspath(path)))

    def __str__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"LocalDirectory({str(self.path)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, LocalDirectory) and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)

    def describe(self, name: str) -> str:
        """How messages name the file ``name`` of this directory."""
        return str(self.path / name)

    def child(self, name: str) -> "LocalDirectory":
        return LocalDirectory(self.path / name)

    def make(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

    def is_dir(self) -> bool:
        return self.path.is_dir()

    def write(self, name: str, data: bytes) -> None:
        write_atomic(self.path / name, data)

    def size(self, name: str) -> int | None:
        """Bytes in ``name``; None when it does not exist."""
        try:
            return (self.path / name).stat().st_size
        except FileNotFoundError:
            return None

    def read(self, name: str, max_bytes: int) -> bytes:
        """At most ``max_bytes + 1`` bytes of ``name`` (one more than allowed shows a file that grew)."""
        with open(self.path / name, "rb") as handle:
            return handle.read(max_bytes + 1)

    def names(self) -> list[str]:
        """The plain files in this directory (none when it does not exist)."""
        try:
            return sorted(entry.name for entry in os.scandir(self.path) if entry.is_file(follow_symlinks=False))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def delete(self, name: str) -> None:
        (self.path / name).unlink()

    def resolves_inside(self, name: str) -> bool:
        """Does ``name`` stay in this directory once symlinks are followed?"""
        return (self.path / name).resolve().parent == self.path.resolve()


class FilesystemDirectory:
    """A directory (a key prefix, on an object store) of a ``pyarrow.fs.FileSystem``."""

    local = False

    def __init__(self, filesystem, path: str, display: str | None = None):
        self.filesystem = filesystem
        self.path = str(path).rstrip("/")
        self.display = display or f"{filesystem.type_name}://{self.path}"

    def __str__(self) -> str:
        return self.display

    def __repr__(self) -> str:
        return f"FilesystemDirectory({self.display!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, FilesystemDirectory) and other.display == self.display and \
            other.filesystem.equals(self.filesystem)

    def __hash__(self) -> int:
        return hash(self.display)

    def _key(self, name: str) -> str:
        return f"{self.path}/{name}"

    def describe(self, name: str) -> str:
        return f"{self.display}/{name}"

    def child(self, name: str) -> "FilesystemDirectory":
        return FilesystemDirectory(self.filesystem, self._key(name), self.describe(name))

    def make(self) -> None:
        """Create the directory where the filesystem has directories (object stores need none: a key's
        prefix is there once an object is); asked once per handle."""
        if not getattr(self, "_made", False):
            if not self.is_dir():
                self.filesystem.create_dir(self.path, recursive=True)
            self._made = True

    def is_dir(self) -> bool:
        import pyarrow.fs as pafs  # noqa: PLC0415

        return self.filesystem.get_file_info(self.path).type == pafs.FileType.Directory

    def write(self, name: str, data: bytes) -> None:
        """One object PUT (a multipart upload completes at ``close``, all at once): atomic for readers."""
        with self.filesystem.open_output_stream(self._key(name)) as stream:
            stream.write(data)

    def size(self, name: str) -> int | None:
        import pyarrow.fs as pafs  # noqa: PLC0415

        info = self.filesystem.get_file_info(self._key(name))
        return info.size if info.type == pafs.FileType.File else None

    def read(self, name: str, max_bytes: int) -> bytes:
        with self.filesystem.open_input_file(self._key(name)) as handle:
            return handle.read(max_bytes + 1)

    def names(self) -> list[str]:
        import pyarrow.fs as pafs  # noqa: PLC0415

        infos = self.filesystem.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        return sorted(info.base_name for info in infos if info.type == pafs.FileType.File)

    def delete(self, name: str) -> None:
        self.filesystem.delete_file(self._key(name))

    def resolves_inside(self, name: str) -> bool:
        return True  # object keys have no links; flat names (checked by the caller) stay under the prefix


def _pyarrow_fs():
    try:
        import pyarrow.fs as pafs  # noqa: PLC0415 - optional: only URIs and filesystem objects need it
    except ImportError as exc:
        raise ImportError(f"checkpoints on a URI or a pyarrow filesystem need pyarrow; {PYARROW_INSTALL_HINT}") \
            from exc
    return pafs


def directory(location):
    """The storage directory of ``location``: a local path (``str``/``PathLike``, ``file://`` URI), a URI of
    a filesystem pyarrow knows (``s3://``, ``gs://``, ``hdfs://``, ...), a ``(pyarrow.fs.FileSystem, path)``
    pair, or an already resolved directory (returned as is)."""
    if isinstance(location, (LocalDirectory, FilesystemDirectory)):
        return location
    if isinstance(location, tuple):
        if len(location) != 2:
            raise ValueError(f"storage location: expected (pyarrow.fs.FileSystem, path), got {len(location)} items")
        filesystem, path = location
        pafs = _pyarrow_fs()
        if not isinstance(filesystem, pafs.FileSystem):
            raise ValueError(f"storage location: the first item must be a pyarrow.fs.FileSystem, got "
                             f"{type(filesystem).__name__}")
        if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
            raise ValueError(f"storage location: the path must be a non-empty string, got {path!r}")
        path = os.fspath(path)
        if isinstance(filesystem, pafs.LocalFileSystem):
            return LocalDirectory(path)
        return FilesystemDirectory(filesystem, path, f"{filesystem.type_name}://{path.rstrip('/')}")
    if not isinstance(location, (str, os.PathLike)):
        raise ValueError(f"storage location: expected a path, a URI or (pyarrow.fs.FileSystem, path), got "
                         f"{type(location).__name__}")
    text = os.fspath(location)
    if not text:
        raise ValueError("storage location: the path is empty")
    if text.startswith("file://"):
        return LocalDirectory(_pyarrow_fs().FileSystem.from_uri(text)[1])
    if "://" not in text:
        return LocalDirectory(text)
    pafs = _pyarrow_fs()
    try:
        filesystem, path = pafs.FileSystem.from_uri(text)
    except (ValueError, OSError) as error:  # pyarrow.lib.ArrowInvalid is a ValueError
        raise ValueError(f"storage location {text.split('?')[0]!r}: {error}") from None
    if isinstance(filesystem, pafs.LocalFileSystem):
        return LocalDirectory(path)
    scheme = text.split("://", 1)[0]
    return FilesystemDirectory(filesystem, path, f"{scheme}://{path.rstrip('/')}")  # the query stays out of messages
