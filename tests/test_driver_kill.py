"""A driver killed (SIGKILL) at a seeded random moment, then ``rayps train --resume``: a BSP run ends bit-identical
to an uninterrupted run of the same seed (two uninterrupted runs are: 2 workers, so a step's sum is order-free);
the killed driver leaves no actor, raylet or GCS process behind; a driver killed before its first epoch
finished is started afresh by ``--resume`` (an orchestrator that always passes it, e.g. a retried RayJob).

The reference is the uninterrupted run's last saved server (``ParameterServer.save`` after every epoch, read back
by ``server_state.load``: plain arrays, no Ray)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

EPOCHS = 12  # the kill lands after a random one of the first half, so at least six epochs are left to kill in
COMMAND = ["train", "--consistency", "sync", "--workers", "2", "--shards", "2", "--epochs", str(EPOCHS), "--seed",
           "3", "--quiet"]
WAIT = 300  # seconds: a deadline, never an expectation of speed


def _cli(checkpoint_dir, *extra, consistency: str = "sync") -> list[str]:
    command = [consistency if part == "sync" else part for part in COMMAND]
    return [sys.executable, "-m", "rayps.deploy.cli", *command, "--checkpoint-dir", str(checkpoint_dir), *extra]


def _final_params(checkpoint_dir) -> dict:
    from rayps.server.checkpoints.training_run import load_progress
    from rayps.server.checkpoints import server_state

    epoch, run_dir = load_progress(checkpoint_dir)
    assert epoch == EPOCHS - 1  # the last epoch
    return server_state.load(run_dir)["params"]


def _descendants(pid: int) -> dict[int, str]:
    """pid -> command line of every process below ``pid`` (from /proc; Ray's workers retitle theirs, e.g.
    ``ray::ShardActor``)."""
    parents: dict[int, list[int]] = {}
    names: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as handle:
                stat = handle.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                name = handle.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        parents.setdefault(ppid, []).append(int(entry))
        names[int(entry)] = name
    out, todo = {}, [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out[child] = names[child]
            todo.append(child)
    return out


def _kill_in_the_run(driver, directory, rng: random.Random) -> dict[int, str]:
    """SIGKILL ``driver`` at a seeded random moment of its run: once the progress record says epoch ``k``
    finished (``k`` drawn from the first half of the run) and up to 20 ms more (in the next epoch, or still in
    epoch k's save), so that half the run is left whatever the machine's speed. The driver's processes just
    before the kill."""
    from rayps.server.checkpoints.training_run import load_progress

    after = rng.randint(0, EPOCHS // 2 - 1)
    deadline = time.monotonic() + WAIT
    while (load_progress(directory) or (-1,))[0] < after:
        assert driver.poll() is None, driver.stderr.read()[-3000:] if driver.stderr else "the run ended"
        assert time.monotonic() < deadline, f"epoch {after} did not finish"
        time.sleep(0.01)
    time.sleep(rng.uniform(0.0, 0.02))
    children = _descendants(driver.pid)
    assert driver.poll() is None, "the run ended before the kill"
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=WAIT)
    return children


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _run(args, **kwargs) -> subprocess.CompletedProcess:
    completed = subprocess.run(args, capture_output=True, text=True, timeout=WAIT, **kwargs)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    directory = tmp_path_factory.mktemp("clean")
    _run(_cli(directory))
    return _final_params(directory)


def _assert_same(got: dict, expected: dict) -> None:
    assert sorted(got) == sorted(expected)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def test_a_killed_bsp_driver_resumes_bit_identical_and_leaves_no_processes(uninterrupted, tmp_path):
    directory = tmp_path / "run"
    driver = subprocess.Popen(_cli(directory), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              start_new_session=True)
    deadline = time.monotonic() + WAIT
    children = _kill_in_the_run(driver, directory, random.Random(20261207))
    assert any(name.startswith("ray::ShardActor") for name in children.values()), children
    held = {pid: name for pid, name in children.items()
            if name.startswith(("ray::ShardActor", "ray::WorkerActor")) or "raylet" in name.split(" ")[0]
            or "gcs_server" in name.split(" ")[0]}
    assert len(held) >= 4, children  # 2 shards, 2 workers (and the raylet and GCS where they are below it)
    while any(_alive(pid) for pid in held):
        assert time.monotonic() < deadline, {pid: held[pid] for pid in held if _alive(pid)}
        time.sleep(0.2)
    resumed = _run(_cli(directory, "--resume"))
    assert "resuming from" in resumed.stderr
    _assert_same(_final_params(directory), uninterrupted)


def test_resume_before_the_first_finished_epoch_starts_the_run_afresh(uninterrupted, tmp_path):
    directory = tmp_path / "run"
    driver = subprocess.Popen(_cli(directory), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    time.sleep(1.0)  # starting Ray: no epoch can have finished
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=WAIT)
    resumed = _run(_cli(directory, "--resume"))
    assert "no finished epoch" in resumed.stderr and "starting the run afresh" in resumed.stderr
    _assert_same(_final_params(directory), uninterrupted)


def test_a_killed_async_driver_resumes_within_the_accuracy_noise(tmp_path):
    """Async: the interleaving differs from run to run, so the reference is the accuracy of an uninterrupted run
    (digits, 12 epochs: two uninterrupted runs land within a couple of points of each other)."""
    import json

    clean_json, resumed_json = tmp_path / "clean.json", tmp_path / "resumed.json"
    _run(_cli(tmp_path / "clean", "--json-out", str(clean_json), consistency="async"))
    directory = tmp_path / "run"
    driver = subprocess.Popen(_cli(directory, consistency="async"), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    _kill_in_the_run(driver, directory, random.Random(7))
    resumed = _run(_cli(directory, "--resume", "--json-out", str(resumed_json), consistency="async"))
    assert "resuming from" in resumed.stderr
    clean, after = json.loads(clean_json.read_text()), json.loads(resumed_json.read_text())
    assert after["first_epoch"] >= 1 and after["test_accuracy"] >= 0.85
    assert abs(after["test_accuracy"] - clean["test_accuracy"]) <= 0.05
