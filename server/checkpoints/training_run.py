"""Where ``rayps train --checkpoint-dir D`` keeps a run, and how ``--resume`` finds it.

    D/shards/    the shards' periodic checkpoints (restarted shards restore from here)
    D/run-a/, D/run-b/   the whole server, saved after every finished epoch (ParameterServer.save), in turn
    D/progress.msgpack   {"format": "rayps-train-progress", "version": 1, "epoch": last finished epoch,
                          "run": the slot that holds it}

A save goes to the slot the progress record does NOT name, and the record is rewritten after it, so a driver
killed in the middle of a save leaves the last finished epoch's checkpoint whole (a run of an older rayps,
``D/run/`` and no ``run`` field, still resumes).

``D`` is a local path or a URI (``s3://bucket/run?endpoint_override=...``, ``gs://bucket/run``; see
server/checkpoints/storage.py): the sub-directories go into the URI's path, its query options stay with it. The progress
record is written after the save it describes, so it never points past a checkpoint, on an object store too.
"""

from __future__ import annotations

from . import format as ckpt
from . import storage

PROGRESS_FORMAT = "rayps-train-progress"
PROGRESS_NAME = "progress.msgpack"


def shards_dir(checkpoint_dir):
    """The shards' ``checkpoint_dir`` of the run in ``checkpoint_dir``."""
    return storage.directory(checkpoint_dir).child("shards")


SLOTS = ("run-a", "run-b")


def resume_dir(checkpoint_dir, slot: str = "run"):
    """Where a finished epoch's whole server is saved (``ParameterServer.restore`` reads it)."""
    return storage.directory(checkpoint_dir).child(slot)


def save_progress(checkpoint_dir, epoch: int, ps) -> None:
    """Save the server into the slot the progress record does not name, then record the finished epoch and
    that slot (so the progress never points at a checkpoint being written, nor past one)."""
    current = _record(checkpoint_dir)
    slot = SLOTS[1] if current is not None and current.get("run") == SLOTS[0] else SLOTS[0]
    ps.save(resume_dir(checkpoint_dir, slot))
    ckpt.write_record(checkpoint_dir, PROGRESS_NAME,
                      {"format": PROGRESS_FORMAT, "version": ckpt.VERSION, "epoch": int(epoch), "run": slot})


def _record(checkpoint_dir) -> dict | None:
    directory = storage.directory(checkpoint_dir)
    if directory.size(PROGRESS_NAME) is None:
        return None
    return ckpt.read_named_record(directory, PROGRESS_NAME, PROGRESS_FORMAT, 1 << 12)


def load_progress(checkpoint_dir) -> tuple[int, object] | None:
    """``(last finished epoch, the directory of its server checkpoint)`` recorded in ``checkpoint_dir``; None
    when no epoch finished there (``--resume`` then starts the run afresh)."""
    directory = storage.directory(checkpoint_dir)
    path = directory.describe(PROGRESS_NAME)
    record = _record(checkpoint_dir)
    if record is None:
        return None
    epoch, slot = record.get("epoch"), record.get("run", "run")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ckpt.CheckpointError(f"{path}: epoch {epoch!r} is not a finished-epoch count")
    if slot not in (*SLOTS, "run"):
        raise ckpt.CheckpointError(f"{path}: run {slot!r} is not one of {list(SLOTS)}")
    return epoch, resume_dir(checkpoint_dir, slot)
