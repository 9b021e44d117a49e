"""Where ``rayps train --checkpoint-dir D`` keeps a run, and how ``--resume`` finds it.

    D/shards/    the shards' periodic checkpoints (restarted shards restore from here)
    D/run/       the whole server, saved after every finished epoch (ParameterServer.save)
    D/progress.msgpack   {"format": "rayps-train-progress", "version": 1, "epoch": last finished epoch}

``D`` is a local path or a URI (``s3://bucket/run?endpoint_override=...``, ``gs://bucket/run``; see
server/storage.py): the sub-directories go into the URI's path, its query options stay with it. The progress
record is written after the save it describes, so it never points past a checkpoint, on an object store too.
"""

from __future__ import annotations

from ..server import checkpoint as ckpt
from ..server import storage

PROGRESS_FORMAT = "rayps-train-progress"
PROGRESS_NAME = "progress.msgpack"


def shards_dir(checkpoint_dir):
    """The shards' ``checkpoint_dir`` of the run in ``checkpoint_dir``."""
    return storage.directory(checkpoint_dir).child("shards")


def resume_dir(checkpoint_dir):
    """Where the whole server is saved after every epoch (``ParameterServer.restore`` reads it)."""
    return storage.directory(checkpoint_dir).child("run")


def save_progress(checkpoint_dir, epoch: int, ps) -> None:
    """Save the server, then record the finished epoch (so the progress never points past the checkpoint)."""
    ps.save(resume_dir(checkpoint_dir))
    ckpt.write_record(checkpoint_dir, PROGRESS_NAME,
                      {"format": PROGRESS_FORMAT, "version": ckpt.VERSION, "epoch": int(epoch)})


def load_progress(checkpoint_dir) -> int:
    """The last finished epoch recorded in ``checkpoint_dir``."""
    directory = storage.directory(checkpoint_dir)
    path = directory.describe(PROGRESS_NAME)
    if directory.size(PROGRESS_NAME) is None:
        raise FileNotFoundError(f"--resume: {path} does not exist (no finished epoch was saved there)")
    record = ckpt.read_named_record(directory, PROGRESS_NAME, PROGRESS_FORMAT, 1 << 12)
    epoch = record.get("epoch")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ckpt.CheckpointError(f"{path}: epoch {epoch!r} is not a finished-epoch count")
    return epoch
