"""``rayps train`` against a real Ray head node: ``ray job submit`` with token authentication, and a bad address.

The head runs in the background (``ray start --head --block`` on 127.0.0.1, its own temp dir, ports and token,
in its own process group) and is stopped by killing that process group: never ``ray stop``, which would stop
every Ray on the machine, this test session's included. The token lives in a temporary HOME, so the user's
``~/.ray`` is not touched. The job runs on this machine with this interpreter (``sys.executable -m
rayps.deploy.cli``), so it needs no ``runtime_env``.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid

import pytest
from process_tools import processes_naming

RAY_CLI = os.path.join(os.path.dirname(sys.executable), "ray")
HEAD_START_SECONDS = 180
JOB_SECONDS = 240


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _run(argv, env, timeout=120):
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)


def _dashboard_answers(url, token):
    request = urllib.request.Request(f"{url}/api/version", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _tail(path, chars=3000):
    with open(path, encoding="utf-8", errors="replace") as handle:
        return handle.read()[-chars:]


def _token_environment(ray_cli, root):
    """An environment whose HOME is under ``root`` and holds a fresh token; token authentication on."""
    home = os.path.join(root, "home")
    os.makedirs(home)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=home, RAY_TMPDIR=root, PYTHONUNBUFFERED="1")  # nothing of this head goes to ~/.ray or /tmp/ray
    generated = _run([ray_cli, "get-auth-token", "--generate"], env)  # writes $HOME/.ray/auth_token
    assert generated.returncode == 0, generated.stderr
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=os.path.join(home, ".ray", "auth_token"))
    with open(env["RAY_AUTH_TOKEN_PATH"], encoding="utf-8") as handle:
        token = handle.read().strip()
    assert token
    return env, token


def _start_head(ray_cli, root, env, log):
    """``ray start --head --block`` on 127.0.0.1 with free ports, in its own process group; returns (process, url)."""
    gcs, dashboard, agent_http, agent_grpc, client, metrics, runtime_env = _free_ports(7)
    # on SIGTERM, stop at once instead of first draining the node for 30 s (Ray 2.60's default)
    head_env = dict(env, RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
    head = subprocess.Popen(
        [ray_cli, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--include-dashboard", "true",
         "--dashboard-agent-listen-port", str(agent_http), "--dashboard-agent-grpc-port", str(agent_grpc),
         "--ray-client-server-port", str(client), "--metrics-export-port", str(metrics),
         "--runtime-env-agent-port", str(runtime_env), "--num-cpus", "2", "--temp-dir", os.path.join(root, "ray"),
         "--disable-usage-stats"],
        env=head_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return head, f"http://127.0.0.1:{dashboard}"


@pytest.fixture(scope="module")
def ray_head():
    """A token-authenticated Ray head on 127.0.0.1; yields (dashboard url, environment for clients, ray CLI)."""
    ray_cli = RAY_CLI if os.path.exists(RAY_CLI) else shutil.which("ray")
    if ray_cli is None:
        pytest.skip("the `ray` command line is not installed (pip install 'ray[default]')")
    root = tempfile.mkdtemp(prefix="rpsjs-", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    try:
        env, token = _token_environment(ray_cli, root)
        log_path = os.path.join(root, "ray-start.log")
        with open(log_path, "w", encoding="utf-8") as log:
            head, url = _start_head(ray_cli, root, env, log)
        try:
            deadline = time.monotonic() + HEAD_START_SECONDS
            while not _dashboard_answers(url, token):
                if head.poll() is not None:
                    pytest.fail(f"ray start exited with {head.returncode}: {_tail(log_path)}")
                if time.monotonic() > deadline:
                    pytest.fail(f"the dashboard did not answer within {HEAD_START_SECONDS}s: {_tail(log_path)}")
                time.sleep(1)
            yield url, env, ray_cli
        finally:
            _stop_head(head, os.path.join(root, "ray"))
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _stop_head(head, marker):
    """Kill the head's process group (SIGTERM, then SIGKILL), then any process of its session left over."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(head.pid, sig)
        except ProcessLookupError:
            break
        try:
            head.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        left = processes_naming(marker)
        if not left:
            return
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)


ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


def _job_status(url, env, ray_cli, job_id):
    completed = _run([ray_cli, "job", "status", "--address", url, job_id], env)
    text = ANSI_ESCAPE.sub("", completed.stdout + completed.stderr)
    for pattern, status in ((r"Job '[^']+' succeeded", "SUCCEEDED"), (r"Job '[^']+' failed", "FAILED"),
                            (r"Job '[^']+' was stopped", "STOPPED")):  # how `ray job status` prints the ends
        if re.search(pattern, text):
            return status
    match = re.search(r"Status for job '[^']+': (?:JobStatus\.)?(\w+)", text)
    return match.group(1) if match else None


def test_rayps_train_submitted_as_a_ray_job_succeeds(ray_head):
    url, env, ray_cli = ray_head
    job_id = f"rayps-test-{uuid.uuid4().hex[:8]}"
    submit = [ray_cli, "job", "submit", "--address", url, "--submission-id", job_id, "--no-wait", "--",
              sys.executable, "-m", "rayps.deploy.cli", "train", "--epochs", "1", "--quiet"]
    for _ in range(5):  # the job agent may come up a little after the dashboard
        submitted = _run(submit, env)
        if submitted.returncode == 0:
            break
        time.sleep(3)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    deadline = time.monotonic() + JOB_SECONDS
    status = None
    while time.monotonic() < deadline:
        status = _job_status(url, env, ray_cli, job_id)
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(3)
    logs = ANSI_ESCAPE.sub("", _run([ray_cli, "job", "logs", "--address", url, job_id], env).stdout)
    assert status == "SUCCEEDED", f"job {job_id} ended {status}:\n{logs[-4000:]}"
    assert "test accuracy" in logs and "workers x shards" in logs, logs[-4000:]


def test_a_client_without_the_token_is_refused(ray_head):
    url, env, ray_cli = ray_head
    without = {k: v for k, v in env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    listed = _run([ray_cli, "job", "list", "--address", url], without)
    assert listed.returncode != 0
    assert "Authentication" in listed.stdout + listed.stderr or "Unauthorized" in listed.stdout + listed.stderr


def test_rayps_train_at_an_address_where_nothing_listens_exits_2_within_seconds():
    (port,) = _free_ports(1)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    started = time.monotonic()
    completed = subprocess.run([sys.executable, "-m", "rayps.deploy.cli", "train", "--address", f"127.0.0.1:{port}",
                                "--epochs", "1", "--quiet"], env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - started
    assert completed.returncode == 2, completed.stderr
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1, completed.stderr
    assert lines[0].startswith(f"rayps train: error: --address: no Ray cluster answers at 127.0.0.1:{port}")
    assert elapsed < 60, f"took {elapsed:.1f}s"  # seconds of imports and data loading; no connection retries
