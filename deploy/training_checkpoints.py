"""Where ``rayps train --checkpoint-dir D`` keeps a run, and how ``--resume`` finds it.

    D/shards/    the shards' periodic checkpoints (restarted shards restore from here)
    D/run/       the whole server, saved after every finished epoch (ParameterServer.save)
    D/progress.msgpack   {"format": "rayps-train-progress", "version": 1, "epoch": last finished epoch}
"""

from __future__ import annotations

import os
from pathlib import Path

from ..server import checkpoint as ckpt

PROGRESS_FORMAT = "rayps-train-progress"


def resume_dir(checkpoint_dir) -> str:
    return os.path.join(checkpoint_dir, "run")


def save_progress(checkpoint_dir, epoch: int, ps) -> None:
    """Save the server, then record the finished epoch (so the progress never points past the checkpoint)."""
    ps.save(resume_dir(checkpoint_dir))
    ckpt.write_atomic(Path(checkpoint_dir) / "progress.msgpack",
                      ckpt.pack({"format": PROGRESS_FORMAT, "version": ckpt.VERSION, "epoch": int(epoch)}))


def load_progress(checkpoint_dir) -> int:
    """The last finished epoch recorded in ``checkpoint_dir``."""
    path = Path(checkpoint_dir) / "progress.msgpack"
    if not path.exists():
        raise FileNotFoundError(f"--resume: {path} does not exist (no finished epoch was saved there)")
    record = ckpt.read_record(path, PROGRESS_FORMAT, 1 << 12)
    epoch = record.get("epoch")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ckpt.CheckpointError(f"{path}: epoch {epoch!r} is not a finished-epoch count")
    return epoch
