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
_ops = None  # (get, set) of MXCSR, compiled on first use; False where there is no x86-64 numba


def _mxcsr_ops():
    global _ops
    if _ops is None:
        _ops = False
        if platform.machine().lower() in ("x86_64", "amd64"):
            try:
                _ops = _compile()
            except Exception:  # noqa: BLE001 - no numba/llvmlite, or a build that lacks the intrinsics
                _ops = False
    return _ops


def _compile():
    from llvmlite import ir  # noqa: PLC0415
    from numba import njit, types  # noqa: PLC0415
    from numba.core import cgutils  # noqa: PLC0415
    from numba.extending import intrinsic  # noqa: PLC0415

    byte_pointer = ir.PointerType(ir.IntType(8))

    def call(builder, name: str, slot) -> None:
        function = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [byte_pointer]),
                                                  name)
        builder.call(function, [builder.bitcast(slot, byte_pointer)])

    @intrinsic
    def stmxcsr(typingctx):
        def codegen(context, builder, signature, args):
            slot = cgutils.alloca_once(builder, ir.IntType(32))
            call(builder, "llvm.x86.sse.stmxcsr", slot)
            return builder.load(slot)
        return types.uint32(), codegen

    @intrinsic
    def ldmxcsr(typingctx, value):
        def codegen(context, builder, signature, args):
            call(builder, "llvm.x86.sse.ldmxcsr", cgutils.alloca_once_value(builder, args[0]))
            return context.get_dummy_value()
        return types.void(types.uint32), codegen

    @njit(cache=False)
    def get_mxcsr():
        return stmxcsr()

    @njit(cache=False)
    def set_mxcsr(value):
        ldmxcsr(value)

    get_mxcsr()  # compile both now: a failure belongs to _mxcsr_ops
    return get_mxcsr, set_mxcsr


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
