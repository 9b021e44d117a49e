"""Finiteness of a gradient, alone or fused with its copy: one sweep over memory, through the bits.

* ``all_finite(array, threads=1)``: True when no element is NaN or +-Inf;
* ``copy_all_finite(source, out, threads=1)``: ``out[...] = source`` (bit for bit) and, in the same pass,
  whether every element of ``source`` is finite. ``out`` is written in full either way; the caller discards it
  on False.

A float is non-finite exactly when its exponent bits are all ones: ``bits & E == E`` with ``E`` = ``0x7C00``
(float16), ``0x7F800000`` (float32), ``0x7FF0000000000000`` (float64). The kernels read the array as unsigned
integers of its width and count such elements, so the test is exact (no rounding, no overflowing sum, no
floating-point flag) and the copy keeps every bit (NaN payloads, signed zeros), as ``np.copyto`` does.

Arrays of ``SWEEP_FROM`` elements and more (C-contiguous float16/32/64) go through numba kernels compiled
``nogil`` (numba is imported on the first such array, not with this module); with ``threads`` > 1 and at least
``SPLIT_FROM`` elements the array is cut into ``threads`` contiguous ranges (at most ``MAX_THREADS``, at most
the machine's cores), all but the first swept on a small pool of Python threads that block between calls (no
spinning OpenMP pool in the caller's process). Anything
else, or no numba: ``validation.all_finite`` and ``np.copyto`` (``casting="same_kind"``).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .validation import all_finite as _numpy_all_finite

SWEEP_FROM = 1 << 16  # elements: from here on the numba sweep (below: NumPy, no kernel call)
SPLIT_FROM = 1 << 20  # elements: from here on an array is cut over ``threads`` threads
MAX_THREADS = 4  # at most this many ranges per array (and never more than the machine's cores)
EXPONENT = {2: np.uint16(0x7C00), 4: np.uint32(0x7F800000), 8: np.uint64(0x7FF0000000000000)}
BITS = {2: np.uint16, 4: np.uint32, 8: np.uint64}
FLOATS = frozenset({np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)})

_kernels = None  # (count, copy_count) once compiled; False when numba is missing
_pool: tuple[int, ThreadPoolExecutor] | None = None  # (pid, pool): a forked child makes its own
_lock = threading.Lock()


def _count_nonfinite(bits, exponent):
    """The number of elements whose exponent bits are all ones."""
    count = 0
    for i in range(bits.size):
        count += np.int64((bits[i] & exponent) == exponent)
    return count


def _copy_count_nonfinite(bits, out, exponent):
    """``out[:] = bits`` and, in the same loop, ``_count_nonfinite(bits, exponent)``."""
    count = 0
    for i in range(bits.size):
        value = bits[i]
        out[i] = value
        count += np.int64((value & exponent) == exponent)
    return count


def kernels():
    """``(count, copy_count)``, the two loops above compiled by numba (nogil, cached on disk where numba finds
    a writable directory); None without numba."""
    global _kernels
    if _kernels is None:
        with _lock:
            if _kernels is None:
                from ..updaters import fused_cpu  # noqa: PLC0415 - deferred (numba): only large arrays need it

                _kernels = False if fused_cpu.numba is None else tuple(  # numba is a dependency; not required here
                    fused_cpu.jit_cached(fn, nogil=True, fastmath=False)
                    for fn in (_count_nonfinite, _copy_count_nonfinite))
    return _kernels or None


def _swept(array: np.ndarray) -> bool:
    return array.size >= SWEEP_FROM and array.dtype in FLOATS and array.flags.c_contiguous


def _ranges(size: int, threads: int) -> list[tuple[int, int]]:
    parts = max(1, min(threads, MAX_THREADS, os.cpu_count() or 1, size // (SPLIT_FROM // 2)))
    step = -(-size // parts)
    return [(start, min(start + step, size)) for start in range(0, size, step)]


def _run(ranges, sweep) -> int:
    """``sum(sweep(start, stop))`` over ``ranges``, the first on this thread, the rest on the pool."""
    if len(ranges) == 1:
        return sweep(*ranges[0])
    futures = [_executor().submit(sweep, start, stop) for start, stop in ranges[1:]]
    total = sweep(*ranges[0])
    return total + sum(f.result() for f in futures)


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None or _pool[0] != os.getpid():
            _pool = (os.getpid(), ThreadPoolExecutor(MAX_THREADS - 1, thread_name_prefix="rayps-finite"))
        return _pool[1]


def all_finite(array: np.ndarray, threads: int = 1) -> bool:
    """True when no element of ``array`` is NaN or +-Inf (see the module docstring)."""
    if array.size < SWEEP_FROM:  # the common small case first, in as few steps as possible
        return _numpy_all_finite(array)
    found = kernels() if _swept(array) else None
    if found is None:
        return _numpy_all_finite(array)
    count = found[0]
    width = array.dtype.itemsize
    bits, exponent = array.reshape(-1).view(BITS[width]), EXPONENT[width]
    return _run(_ranges(bits.size, threads), lambda start, stop: count(bits[start:stop], exponent)) == 0


def copy_all_finite(source: np.ndarray, out: np.ndarray, threads: int = 1) -> bool:
    """``np.copyto(out, source, casting="same_kind")`` and whether every element of ``source`` is finite: in one
    pass when both are C-contiguous arrays of the same float dtype (see the module docstring)."""
    if source.shape != out.shape:
        raise ValueError(f"copy_all_finite: source shape {source.shape} != out shape {out.shape}")
    if source.size < SWEEP_FROM:
        np.copyto(out, source, casting="same_kind")
        return _numpy_all_finite(source)
    found = kernels() if _swept(source) and out.dtype == source.dtype and out.flags.c_contiguous \
        and out.flags.writeable else None
    if found is None:
        np.copyto(out, source, casting="same_kind")
        return all_finite(source, threads)
    copy_count = found[1]
    width = source.dtype.itemsize
    bits, into, exponent = source.reshape(-1).view(BITS[width]), out.reshape(-1).view(BITS[width]), EXPONENT[width]
    return _run(_ranges(bits.size, threads),
                lambda start, stop: copy_count(bits[start:stop], into[start:stop], exponent)) == 0
