"""What ``rayps train --checkpoint-dir`` records of a run (server/checkpoints/training_run.py), without Ray: the
progress record names the slot of the last finished epoch's save; saves alternate slots; bad records are
refused naming the field."""

from __future__ import annotations

import pytest

from rayps.server.checkpoints import format as ckpt
from rayps.server.checkpoints.training_run import PROGRESS_FORMAT, PROGRESS_NAME, load_progress, save_progress


class SavedServer:
    """Stands in for a ParameterServer: records where it was saved."""

    def __init__(self):
        self.saved = []

    def save(self, directory):
        self.saved.append(str(directory))


def test_saves_alternate_slots_and_the_record_names_the_last_one(tmp_path):
    assert load_progress(tmp_path) is None  # nothing finished: --resume starts afresh
    server = SavedServer()
    for epoch in range(3):
        save_progress(tmp_path, epoch, server)
        recorded_epoch, directory = load_progress(tmp_path)
        assert recorded_epoch == epoch and str(directory) == server.saved[-1]
    assert [s.rsplit("/", 1)[-1] for s in server.saved] == ["run-a", "run-b", "run-a"]


@pytest.mark.parametrize("record,match", [
    ({"epoch": -1}, "epoch -1 is not a finished-epoch count"),
    ({"epoch": 2, "run": "../elsewhere"}, "run '../elsewhere' is not one of"),
])
def test_a_bad_progress_record_is_refused_naming_the_field(tmp_path, record, match):
    ckpt.write_record(tmp_path, PROGRESS_NAME, {"format": PROGRESS_FORMAT, "version": ckpt.VERSION, **record})
    with pytest.raises(ckpt.CheckpointError, match=match):
        load_progress(tmp_path)
