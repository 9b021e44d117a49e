"""A real S3-compatible server for the tests: moto's standalone server (``moto_server``) on 127.0.0.1.

It binds loopback only and lives as long as the test session that started it. Every request it gets comes from
this machine's test processes (the driver and the Ray workers), signed with the fixed test credentials that
conftest.py puts in the environment.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

BUCKET = "rayps-test"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class S3Server:
    def __init__(self, process: subprocess.Popen, port: int):
        self.process = process
        self.endpoint = f"127.0.0.1:{port}"

    def uri(self, prefix: str) -> str:
        return f"s3://{BUCKET}/{prefix}?endpoint_override={self.endpoint}&scheme=http"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def start_s3_server(attempts: int = 3) -> S3Server:
    """Start ``moto_server`` on a free loopback port (another port if that one was taken meanwhile), wait until
    it answers, and create the test bucket."""
    beside = os.path.join(os.path.dirname(sys.executable), "moto_server")  # the test interpreter's own moto
    command = beside if os.path.exists(beside) else shutil.which("moto_server")  # (PATH may name another one)
    for _ in range(attempts):
        port = _free_port()
        process = subprocess.Popen([command, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and process.poll() is None and not _answers(port):
            time.sleep(0.1)
        if process.poll() is None and _answers(port):
            server = S3Server(process, port)
            _create_bucket(server)
            return server
        server = S3Server(process, port)
        server.stop()
    raise RuntimeError(f"moto_server did not start on 127.0.0.1 after {attempts} attempts")


def _create_bucket(server: S3Server) -> None:
    import pyarrow.fs as pafs  # noqa: PLC0415

    filesystem = pafs.S3FileSystem(endpoint_override=server.endpoint, scheme="http", allow_bucket_creation=True)
    filesystem.create_dir(BUCKET)
