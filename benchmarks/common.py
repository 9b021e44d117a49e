"""Shared pieces of the benchmark scripts: Ray start-up, timing, tables, JSON results and the PNG plots.

Every script measures its baseline in the same run, in the same process and the same Ray session, and
prints ratios; absolute times on a shared 2-core machine are noise, ratios of medians are the result.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from typing import Callable, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIGURE_DIR = os.path.join(REPO_ROOT, "docs", "benchmarks")
DEFAULT_NUM_CPUS = 2
OBJECT_STORE_BYTES = 2 * 1024 ** 3  # enough for 64 MB messages x shards x in-flight window; polite on a shared box


def start_ray(num_cpus: int = DEFAULT_NUM_CPUS, object_store_memory: int = OBJECT_STORE_BYTES) -> None:
    """One local Ray for the whole script (``ray.init(num_cpus=2)``, no dashboard)."""
    import ray  # noqa: PLC0415

    for attempt in range(3):  # on a loaded machine the raylet may time out starting once
        if ray.is_initialized():
            return
        try:
            ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level="WARNING",
                     object_store_memory=object_store_memory)
        except Exception:  # noqa: BLE001 - retried, then re-raised
            ray.shutdown()
            if attempt == 2:
                raise


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (``platform.processor()`` where there is none)."""
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    except OSError:
        pass
    return cpu


def machine() -> dict:
    """What ran the numbers (for the results file)."""
    import numpy as np  # noqa: PLC0415
    import ray  # noqa: PLC0415

    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": cpu_name(), "cores": os.cpu_count(),
            "python": platform.python_version(), "numpy": np.__version__, "ray": ray.__version__,
            "platform": platform.platform()}


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def repeat(fn: Callable[[], None], repeats: int, warmup: int = 1) -> list[float]:
    """Seconds of ``repeats`` calls of ``fn`` (after ``warmup`` untimed calls)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times


def human_bytes(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1024 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if nbytes == int(nbytes) else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes} GB"


def table(headers: Sequence[str], rows: Sequence[Sequence], title: str | None = None) -> str:
    """A GitHub-markdown table (also readable on a terminal)."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [] if title is None else [f"\n{title}\n"]
    lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths)) + " |")
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells[1:]:
        lines.append("| " + " | ".join(c.rjust(w) for c, w in zip(row, widths)) + " |")
    return "\n".join(lines)


def _cell(value) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}" if abs(value) >= 0.01 else f"{value:.2g}"
    return str(value)


def write_json(path: str, payload: dict) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=1)


def read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


# -- plots (matplotlib Agg; the scripts call these on their own JSON) ----------------------------------------
def _pyplot():
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def plot_transport(results: dict, path: str) -> None:
    """GB/s vs message size, one line per (system, shards), for the pipelined push+apply and the pull."""
    plt = _pyplot()
    rows = results["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=False)
    for ax, (metric, label) in zip(axes, (("push_pipelined_s", "push + apply, pipelined"),
                                          ("pull_s", "pull"))):
        for color, shards in zip(("C0", "C1", "C2", "C3"), sorted({r["shards"] for r in rows})):
            sel = sorted((r for r in rows if r["shards"] == shards), key=lambda r: r["bytes"])
            sizes = [r["bytes"] for r in sel]
            for system, style in (("rayps", "-o"), ("bare", "--x")):
                rates = [r["bytes"] / r[system][metric] / 1e9 for r in sel]
                ax.plot(sizes, rates, style, color=color, markersize=4,
                        label=f"{system}, {shards} shard{'s' if shards > 1 else ''}")
        ax.set_xscale("log", base=2)
        ticks = sorted({r["bytes"] for r in rows})
        ax.set_xticks(ticks)
        ax.set_xticklabels([human_bytes(t).replace(" ", "") for t in ticks], fontsize=7)
        ax.minorticks_off()
        ax.set_yscale("log")
        ax.set_xlabel("message size")
        ax.set_ylabel("GB/s (median)")
        ax.set_title(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"rayps vs bare Ray actor, same run ({results['machine']['cores']} cores, "
                 f"ray {results['machine']['ray']}, {results['machine']['date'][:10]})", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scaling(results: dict, path: str) -> None:
    """samples/s vs workers, one line per shard count."""
    plt = _pyplot()
    rows = results["rows"]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for shards in sorted({r["shards"] for r in rows}):
        sel = sorted((r for r in rows if r["shards"] == shards), key=lambda r: r["workers"])
        ax.plot([r["workers"] for r in sel], [r["samples_per_second"] for r in sel], "-o",
                label=f"rayps, {shards} shard{'s' if shards > 1 else ''}")
    textbook = results.get("textbook_async") or {}
    if textbook:
        workers = sorted(int(w) for w in textbook)
        ax.plot(workers, [textbook[str(w)] for w in workers], "--x", color="gray", label="textbook Ray PS (async)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({r["workers"] for r in rows}))
    ax.get_xaxis().set_major_formatter(_plain_formatter())
    ax.set_xlabel("workers")
    ax.set_ylabel("samples/s (median)")
    ax.set_title(f"rayps train, digits MLP {results['config']['hidden']}, {results['machine']['cores']} cores "
                 f"({results['machine']['date'][:10]})", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plain_formatter():
    from matplotlib.ticker import ScalarFormatter  # noqa: PLC0415

    formatter = ScalarFormatter()
    formatter.set_scientific(False)
    return formatter


# -- py-spy on the driver and every actor process of this driver ----------------------------------------------
def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as handle:
                ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def attach_pyspy(out_dir: str, seconds: int, start: threading.Event, expected: dict, idle: bool = False
                 ) -> threading.Thread:
    """Once ``start`` is set, record every actor process of this driver (and the driver) for ``seconds`` s
    (CPU samples only; with ``idle``, waiting threads too)."""
    names = tuple(expected)
    os.makedirs(out_dir, exist_ok=True)
    pyspy = os.path.join(os.path.dirname(sys.executable), "py-spy")

    def run():
        start.wait()
        deadline = time.time() + 60
        while True:  # actors start late on a busy machine: wait until every expected one has its title
            targets = {"driver": os.getpid()}
            counts: dict[str, int] = {}
            for pid in _descendants(os.getpid()):
                line = _cmdline(pid)
                for name in names:
                    if line.startswith(f"ray::{name}"):
                        counts[name] = counts.get(name, 0) + 1
                        targets[f"{name}{counts[name] - 1}"] = pid
            if all(counts.get(n, 0) >= expected.get(n, 1) for n in names) or time.time() > deadline:
                break
            time.sleep(0.5)
        procs = [subprocess.Popen([pyspy, "record", "-p", str(pid), "-d", str(seconds), "-r", "250", "-f", "raw",
                                   "--nonblocking", *(["--idle", "--threads"] if idle else []), "-o", os.path.join(out_dir, f"{label}.txt")],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for label, pid in targets.items()]
        for proc in procs:
            proc.wait()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread



# -- py-spy raw ("collapsed") stacks -> percentages ----------------------------------------------------------
def _frame_label(frame: str) -> str:
    name, _, location = frame.partition(" (")
    return f"{name} ({location.rstrip(')').split(':')[0].split('/')[-1]})"


def pyspy_summary(path: str, top: int = 15) -> str:
    """Inclusive and self percentages of the samples in a ``py-spy record -f raw`` file."""
    import collections  # noqa: PLC0415

    inclusive, own, total = collections.Counter(), collections.Counter(), 0
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            frames = [_frame_label(f) for f in stack.split(";")]
            total += int(count)
            for frame in set(frames):
                inclusive[frame] += int(count)
            own[frames[-1]] += int(count)
    if not total:
        return f"{path}: no samples"
    lines = [f"{os.path.basename(path)}: {total} samples", "  inclusive:"]
    lines += [f"    {100 * c / total:5.1f}%  {f}" for f, c in inclusive.most_common(top)]
    lines.append("  self:")
    lines += [f"    {100 * c / total:5.1f}%  {f}" for f, c in own.most_common(top)]
    return "\n".join(lines)


def pyspy_categories(path: str, categories: Sequence[tuple[str, str]], thread: str | None = None) -> dict:
    """Share of samples per category: a stack counts for the FIRST category (in order) whose substring occurs
    in one of its frames; ``thread`` keeps only stacks of that thread (files recorded with ``--threads``)."""
    counts = {label: 0 for label, _ in categories}
    counts["other"] = 0
    total = 0
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit() or (thread and thread not in stack.split(";", 1)[0]):
                continue
            total += int(count)
            label = next((label for label, key in categories if key in stack), "other")
            counts[label] += int(count)
    return {label: c / total for label, c in counts.items()} if total else {}
