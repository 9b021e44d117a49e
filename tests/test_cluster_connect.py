"""``--address`` pointing at something that listens but is not Ray: one line, exit code 2, no hang."""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading


def test_an_address_where_a_non_ray_server_listens_is_a_one_line_error():
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        result = subprocess.run([sys.executable, "-m", "rayps.deploy.cli", "train", "--address",
                                 f"127.0.0.1:{port}", "--epochs", "1"], capture_output=True, text=True, timeout=120)
    finally:
        server.shutdown()
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "not as a Ray cluster" in lines[0] and "Traceback" not in result.stderr
