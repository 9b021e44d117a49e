"""Read and write x86's MXCSR register (SSE control and status) from Python, through numba: for
updaters/float_env.py, which says why. x86-64 only; importing this module needs numba and llvmlite.

The two LLVM intrinsics (``llvm.x86.sse.stmxcsr`` / ``ldmxcsr``) are defined at module level so that numba can
cache the jitted functions on disk (a fresh shard process loads them in milliseconds).
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .fused_cpu import jit_cached

BYTE_POINTER = ir.PointerType(ir.IntType(8))


def _call(builder, name: str, slot) -> None:
    function = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [BYTE_POINTER]), name)
    builder.call(function, [builder.bitcast(slot, BYTE_POINTER)])


@intrinsic
def _stmxcsr(typingctx):
    def codegen(context, builder, signature, args):
        slot = cgutils.alloca_once(builder, ir.IntType(32))
        _call(builder, "llvm.x86.sse.stmxcsr", slot)
        return builder.load(slot)
    return types.uint32(), codegen


@intrinsic
def _ldmxcsr(typingctx, value):
    def codegen(context, builder, signature, args):
        _call(builder, "llvm.x86.sse.ldmxcsr", cgutils.alloca_once_value(builder, args[0]))
        return context.get_dummy_value()
    return types.void(types.uint32), codegen


@jit_cached
def get_mxcsr():
    """MXCSR of the calling thread (uint32)."""
    return _stmxcsr()


@jit_cached
def set_mxcsr(value):
    """Load ``value`` (a ``np.uint32``) into the calling thread's MXCSR."""
    _ldmxcsr(value)
