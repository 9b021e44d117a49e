"""Helpers shared by the tests that start their own Ray processes (test_job_submit.py, test_multinode.py)."""

from __future__ import annotations

import os


def processes_naming(marker: str) -> list[int]:
    """Process ids whose command line contains ``marker`` (e.g. a head's temp dir): what killing its process
    group missed."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                if marker.encode() in handle.read():
                    found.append(int(entry))
        except OSError:
            continue
    return found
