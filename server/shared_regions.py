"""Shared memory between a client and a shard on one node: a link's large arrays travel through it instead of
through the socket, as BytePS moves tensors within a machine (no Ray, no sockets here).

Per (client, shard) on one node, two files that the shard creates in ``/dev/shm/rayps-<uid>`` (a directory of
mode 0700; files of mode 0600 with random names) when the client asks through Ray (``ShardActor.shared_regions``),
and that both processes map; the client then unlinks them (the mappings stay, the names go):

* ``up`` (client -> shard): ``UP_SLOTS`` slots, each one full push of the shard (every dtype's buffer at its
  ``SlotLayout`` offset). The client's ``PushPlan`` packs a large full push straight into a free slot (its
  recycled buffers live there, server/push_plan.py) and the message names the slot's offsets instead of
  carrying the bytes; the shard's kernel reads the gradient where it lies.
* ``down`` (shard -> client): ``DOWN_SLOTS`` slots, each the shard's parameters. A whole-parameter read names a
  free slot; the shard copies its live parameters there and the reply names their offsets; the client's arrays
  are views of the slot.

Who writes a slot when (nobody changes bytes someone still reads):

* up: the client packs into a slot only when nothing made from the last message packed there is alive (a
  ``Lease``, as ``PushPlan`` recycles any large buffer); a push stays alive until acknowledged, and the shard
  acknowledges after applying it. A push that must wait for an earlier one is copied out of the slot first
  (``ShardService``).
* down: the client names a slot only when no read it is waiting for names it and nothing made from the last
  reply read from it is alive (``LinkRegions``); the shard writes slot ``k`` for request ``rid`` only if
  ``rid`` is above every request it wrote slot ``k`` for (``ShardRegions.write_params``): a resent request,
  or one the client gave up and the shard answers late, is answered over the socket instead.

Every registration has a random ``token`` that a message using it carries (header ``rg``): a message meant for
another registration (an earlier shard process, an earlier connection) fails the check instead of reading the
wrong bytes. Only processes of this user can open the files (the directory's mode): the trust of the
``ipc://`` socket beside them, and such a process could attach a debugger to either end anyway.
"""

from __future__ import annotations

import mmap
import os
import secrets
import stat
import time
import weakref
from dataclasses import dataclass, field

import numpy as np

SHARED_FROM_BYTES = 1 << 20  # a shard's parameters this large (all dtypes) use shared memory on its node
UP_SLOTS = 2  # full pushes in flight through shared memory per link (``push_plan.POOL_DEPTH``)
DOWN_SLOTS = 2  # whole-parameter replies per link: the one being used and the next
ALIGN = 64  # bytes: every array in a region starts on a cache line
REGION_ROOT = "/dev/shm"  # memory, not disk: a file here never writes back
MAX_REGION_CLIENTS = 64  # clients a shard keeps regions for (the oldest's are dropped)
ORPHAN_SECONDS = 60.0  # a region file still named this long after it was made was never mapped: removed


class Lease:
    """Holds a buffer for the arrays made from it (``np.asarray(lease)``): while any such array, a view of one,
    or a frame made from one is alive, so is the lease; a weak reference tells when none is left."""

    def __init__(self, owner: np.ndarray):
        self.owner = owner
        self.__array_interface__ = owner.__array_interface__


def region_dir() -> str | None:
    """``/dev/shm/rayps-<uid>``, created 0700; None (sockets only) without ``/dev/shm``, when the directory is
    not a private one of this user, or when ``RAYPS_DATA_SHM=0``."""
    if os.environ.get("RAYPS_DATA_SHM", "1") == "0" or not os.path.isdir(REGION_ROOT):
        return None
    return private_directory(os.path.join(REGION_ROOT, f"rayps-{os.getuid()}"))


def private_directory(directory: str) -> str | None:
    """``directory``, created with mode 0700 if missing, when it is a directory of this user with that mode
    (only this user may open what is in it); else None. The same-node socket (server/data_server.py) and the
    regions both live in one."""
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        info = os.lstat(directory)
    except OSError:
        return None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) != 0o700:
        return None
    return directory


def sweep_orphans(directory: str, older_than: float = ORPHAN_SECONDS) -> int:
    """Remove region files in ``directory`` made more than ``older_than`` seconds ago: a client unlinks its files
    as soon as it mapped them, so these belong to clients that died first. How many were removed."""
    removed = 0
    now = time.time()
    with os.scandir(directory) as entries:
        for entry in entries:
            try:
                if (entry.name.startswith("region-") and entry.is_file(follow_symlinks=False)
                        and now - entry.stat(follow_symlinks=False).st_mtime > older_than):
                    os.unlink(entry.path)
                    removed += 1
            except OSError:  # gone meanwhile
                continue
    return removed


@dataclass(frozen=True)
class SlotLayout:
    """Where each dtype's flat buffer lies in one slot (``offsets``: dtype -> byte offset, ``sizes``: dtype ->
    elements), and a slot's bytes."""

    offsets: dict
    sizes: dict
    slot_bytes: int

    @classmethod
    def of(cls, sizes: dict) -> "SlotLayout":
        """Buffers of ``sizes`` (dtype -> elements) one after the other, each on an ``ALIGN`` boundary."""
        offsets, cursor = {}, 0
        for dtype in sorted(sizes):
            offsets[dtype] = cursor
            cursor += -(-int(sizes[dtype]) * np.dtype(dtype).itemsize // ALIGN) * ALIGN
        return cls(offsets, {d: int(n) for d, n in sizes.items()}, max(cursor, ALIGN))

    def to_wire(self) -> dict:
        return {"offsets": dict(self.offsets), "sizes": dict(self.sizes), "slot_bytes": self.slot_bytes}

    @classmethod
    def from_wire(cls, value: dict) -> "SlotLayout":
        return cls(dict(value["offsets"]), dict(value["sizes"]), int(value["slot_bytes"]))

    def views(self, region: np.ndarray, slot: int) -> dict:
        """dtype -> the flat array of slot ``slot`` in ``region`` (a uint8 array over the whole region)."""
        start = slot * self.slot_bytes
        return {dtype: region[start + offset:start + offset + self.sizes[dtype] * np.dtype(dtype).itemsize]
                .view(dtype) for dtype, offset in self.offsets.items()}


class SharedRegion:
    """One mapped file: ``array`` (uint8 over all of it), ``token`` (of its registration) and ``offset_of``."""

    def __init__(self, path: str, mapping: mmap.mmap, token: str):
        self.path = path
        self.mapping = mapping
        self.token = token
        self.array = np.frombuffer(mapping, dtype=np.uint8)
        self.nbytes = self.array.nbytes
        self.base = self.array.__array_interface__["data"][0]

    @classmethod
    def create(cls, directory: str, nbytes: int, token: str) -> "SharedRegion":
        """A new file of ``nbytes`` in ``directory`` (mode 0600, a name nobody else has), mapped. Its memory is
        reserved now (``posix_fallocate``): a full ``/dev/shm`` fails here, with ``OSError``, and not later with a
        SIGBUS when a page is first written."""
        path = os.path.join(directory, f"region-{secrets.token_hex(12)}")
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.ftruncate(descriptor, nbytes)
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(descriptor, 0, nbytes)
            mapping = mmap.mmap(descriptor, nbytes)
        except OSError:
            os.unlink(path)
            raise
        finally:
            os.close(descriptor)
        return cls(path, mapping, token)

    @classmethod
    def open(cls, path: str, nbytes: int, token: str) -> "SharedRegion":
        """Map the file a shard created (its path came through Ray): a regular file of this user of ``nbytes``."""
        descriptor = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        try:
            info = os.fstat(descriptor)
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or info.st_size != nbytes:
                raise OSError(f"{path} is not a {nbytes}-byte file of this user")
            mapping = mmap.mmap(descriptor, nbytes)
        finally:
            os.close(descriptor)
        return cls(path, mapping, token)

    def unlink(self) -> None:
        """Remove the file's name (both mappings stay); nothing if it is gone already."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def offset_of(self, array: np.ndarray) -> int | None:
        """Where ``array`` (C-contiguous) lies in this region, or None when it does not lie in it."""
        address = array.__array_interface__["data"][0]
        offset = address - self.base
        return offset if 0 <= offset and offset + array.nbytes <= self.nbytes else None


@dataclass
class ShardRegions:
    """A shard's side of one client's regions: ``up`` (read), ``down`` (written), their ``layout``, and per down
    slot the highest request id written there."""

    token: str
    up: SharedRegion
    down: SharedRegion
    layout: SlotLayout
    written: list = field(default_factory=lambda: [0] * DOWN_SLOTS)

    @classmethod
    def create(cls, directory: str, sizes: dict) -> "ShardRegions":
        layout = SlotLayout.of(sizes)
        token = secrets.token_hex(8)
        up = SharedRegion.create(directory, UP_SLOTS * layout.slot_bytes, token)
        try:
            down = SharedRegion.create(directory, DOWN_SLOTS * layout.slot_bytes, token)
        except OSError:
            up.unlink()
            raise
        return cls(token, up, down, layout)

    def to_wire(self) -> dict:
        """What the client needs to map them (sent through Ray)."""
        return {"token": self.token, "up": self.up.path, "down": self.down.path, "up_slots": UP_SLOTS,
                "down_slots": DOWN_SLOTS, "layout": self.layout.to_wire()}

    def write_params(self, slot, rid: int, params: dict) -> dict | None:
        """Copy ``params`` (dtype -> the live flat buffer) into down slot ``slot`` for request ``rid``: the
        views that hold them, or None when the slot may not be written (no such slot, an old request, other
        sizes): the reply then goes over the socket."""
        if type(slot) is not int or not 0 <= slot < DOWN_SLOTS or rid <= self.written[slot]:
            return None
        views = self.layout.views(self.down.array, slot)
        if views.keys() != params.keys() or any(views[d].size != params[d].size for d in params):
            return None
        for dtype, buffer in params.items():
            np.copyto(views[dtype], buffer)
        self.written[slot] = rid
        return views

    def unlink(self) -> None:
        self.up.unlink()
        self.down.unlink()


class LinkRegions:
    """A client's side of its regions with one shard: the up slots' buffers (for ``PushPlan``) and which down
    slots are free (see the module docstring)."""

    def __init__(self, wire: dict):
        self.token = wire["token"]
        self.layout = SlotLayout.from_wire(wire["layout"])
        self.up = SharedRegion.open(wire["up"], wire["up_slots"] * self.layout.slot_bytes, self.token)
        self.down = SharedRegion.open(wire["down"], wire["down_slots"] * self.layout.slot_bytes, self.token)
        self.up.unlink()
        self.down.unlink()
        self.up_slots = int(wire["up_slots"])
        self.leases: list = [None] * int(wire["down_slots"])  # per down slot: a weak reference to its last lease

    def up_buffers(self, slot: int) -> dict:
        """dtype -> up slot ``slot``'s flat buffer."""
        return self.layout.views(self.up.array, slot)

    def free_down_slot(self, waiting) -> int | None:
        """A down slot that no read in ``waiting`` (slot numbers) names and no live reply uses, or None."""
        for slot, lease in enumerate(self.leases):
            if slot not in waiting and (lease is None or lease() is None):
                return slot
        return None

    def lease_down(self, slot: int) -> np.ndarray:
        """The whole down region as a uint8 array whose views keep slot ``slot`` in use while they live."""
        lease = Lease(self.down.array)
        self.leases[slot] = weakref.ref(lease)
        return np.asarray(lease)
