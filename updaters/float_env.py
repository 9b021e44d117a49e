"""Flush-to-zero for the thread that runs the update kernels (x86-64: the FTZ bit of MXCSR; no Ray here).

An arithmetic result below the smallest normal float (float32: 1.18e-38; float64: 2.2e-308) is a subnormal
number, and x86 CPUs compute one through a microcode assist, ~100x slower than a normal operation. Training
makes them: a parameter whose gradient is 0 for a while (a dead ReLU's weights, a pixel that is always 0) has
its state multiplied by a decay below 1 every step (Adam's ``beta1``, Nesterovs' momentum, RmsProp's
``rms_decay``), down into the subnormal range, where it stays for hundreds of steps. With FTZ set, such a result is 0 instead, computed at full speed:
TensorFlow's CPU kernels run this way by default, and ``torch.set_flush_denormal(True)`` does the same.

Only results are flushed (FTZ), not inputs (DAZ): a subnormal input still reads as itself, so the transport
codecs that build floats from bits (fp16 decoding in updaters/fused_cpu.py) stay exact.

The bit is per thread, and a thread inherits its creator's: the shard sets it on its data-plane thread before
the first kernel runs there, so numba's kernel pool, started by that thread, has it too
(server/shard_actor.py; ``ParameterServer(flush_denormals=False)`` keeps IEEE subnormals).

    flush_denormals(True)   # this thread: results below the normal range become 0; True where it could
    denormals_flushed()     # whether this thread has FTZ set
"""

from __future__ import annotations

import platform

import numpy as np

FTZ = 0x8000  # MXCSR bit 15: flush to zero
_ops = None  # (get, set) of MXCSR (updaters/mxcsr.py, imported on first use); False where there is none


def _mxcsr_ops():
    global _ops
    if _ops is None:
        _ops = False
        if platform.machine().lower() in ("x86_64", "amd64"):
            try:
                from . import mxcsr  # noqa: PLC0415 - numba, only where a shard asks

                mxcsr.get_mxcsr()  # compile (or load from the disk cache) now: a failure belongs here
                _ops = (mxcsr.get_mxcsr, mxcsr.set_mxcsr)
            except Exception:  # noqa: BLE001 - no numba/llvmlite, or a build that lacks the intrinsics
                _ops = False
    return _ops


def flush_denormals(enable: bool = True) -> bool:
    """Set (or clear) flush-to-zero on the calling thread; False where this machine has no such switch here
    (not x86-64, or no numba): results then stay IEEE subnormals."""
    ops = _mxcsr_ops()
    if not ops:
        return False
    get_mxcsr, set_mxcsr = ops
    current = int(get_mxcsr())
    wanted = current | FTZ if enable else current & ~FTZ
    if wanted != current:
        set_mxcsr(np.uint32(wanted))
    return True


def denormals_flushed() -> bool:
    ops = _mxcsr_ops()
    return bool(ops) and bool(int(ops[0]()) & FTZ)
