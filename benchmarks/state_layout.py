"""Updater state layout: the fused Adam kernel on 16M float32 with its state slots at different offsets from the
params (modulo a 4 KiB page), against ``torch.optim.Adam(fused=True)``, interleaved in one run.

* ``slot0 on params``: one C-contiguous ``(2, n)`` state whose first slot starts at the params' offset modulo a
  page (what large NumPy allocations tend to give, and ``Updater.init``'s layout before the slots were spaced);
* ``slot0 +64 B`` / ``+128 B``: slots spaced as ``Updater.init`` spaces them (64 B) and twice that;
* ``apply()``: ``Adam.apply`` on ``Adam.init``'s state, the public path.

    python benchmarks/state_layout.py [--rounds 25] [--size 16777216]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

from rayps.updaters import Adam, fused_cpu  # noqa: E402
from rayps.updaters.base import NO_ADJUSTMENTS, PAGE_BYTES  # noqa: E402


def state_at(size: int, params: np.ndarray, first_offset: int, gap: int) -> np.ndarray:
    """A (2, size) float32 state whose slot 0 starts ``first_offset`` bytes after ``params`` modulo a page and
    whose slot 1 starts ``gap`` bytes after slot 0 ends."""
    stride = size + gap // 4
    buffer = np.zeros(2 * stride + 2 * PAGE_BYTES // 4, np.float32)
    start = ((params.ctypes.data + first_offset - buffer.ctypes.data) % PAGE_BYTES) // 4
    return buffer[start:start + 2 * stride].reshape(2, stride)[:, :size]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--size", type=int, default=16 * 1024 * 1024)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    import numba  # noqa: PLC0415
    import torch  # noqa: PLC0415

    numba.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    params = rng.standard_normal(args.size, dtype=np.float32)
    grads = rng.standard_normal(args.size, dtype=np.float32) * np.float32(1e-3)
    updater = Adam(learning_rate=1e-3)
    kernel = fused_cpu.kernel_for(updater, np.float32)
    states = {"slot0 on params": state_at(args.size, params, 0, 0), "slot0 +64 B": state_at(args.size, params, 64, 64),
              "slot0 +128 B": state_at(args.size, params, 128, 64)}
    steps = {name: 0 for name in states}

    def direct(name):
        def run():
            kernel(params, grads, states[name], updater.rule_scalars(steps[name], 0), NO_ADJUSTMENTS)
            steps[name] += 1
        return run

    functions = {name: direct(name) for name in states}
    public_state = updater.init(params)
    functions["apply()"] = lambda: updater.apply(params, grads, public_state, 0)
    tensor = torch.nn.Parameter(torch.from_numpy(params.copy()))
    tensor.grad = torch.from_numpy(grads.copy())
    optimizer = torch.optim.Adam([tensor], lr=1e-3, fused=True)
    functions["torch Adam fused"] = optimizer.step
    for function in functions.values():
        function()
        function()
    times = {name: [] for name in functions}
    for _ in range(args.rounds):
        for name, function in functions.items():
            started = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - started)
    baseline = times["torch Adam fused"]
    print(f"Adam on {args.size:,} float32, {args.threads} threads, {args.rounds} interleaved rounds "
          f"(ratio: median of per-round ratios to torch fused)")
    for name, values in times.items():
        ratio = statistics.median(v / b for v, b in zip(values, baseline))
        print(f"  {name:18s} {statistics.median(values) * 1e3:7.2f} ms   {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
