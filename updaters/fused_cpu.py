"""One-pass CPU kernels (numba, ``parallel=True``) for every rule that registers ``FusedKernels``.

A rule's math is its ``FusedKernels.element`` (next to the rule's class); this module owns what every rule
shares: the loop around the element, float16 through its bits, the step adjustments and weight decay.
``kernel_for(updater, param_dtype)`` returns ``fn(params, grads, state, scalars, adjustments)``, which does in ONE
pass over memory, with no temporary of the params' size, what ``base.reference_step`` + ``reference_update`` do::

    w = p                                   (compute dtype = state dtype; float32 for float16 params)
    g' = clip(g * grad_scale, -clip_value, clip_value) + l1 * sign(w) + l2 * w
    update = rule(g', state)                (state updated in place)
    update += weight_decay * w
    p = w - update

Exactness: each kernel performs the reference's operations in the reference's order, every scalar is cast to
the compute dtype first (as NumPy does with a Python float against a float32 array), ``fastmath`` is off (no
FMA contraction, IEEE sqrt and division), so float32 runs in float32 end to end and float64 in float64.

float16 params: numba has no float16 type on the CPU, so the kernels read and write the float16 params and grads
as their ``uint16`` bit patterns and convert in registers (``_half_to_float`` is exact; ``_float_to_half``
rounds to nearest even, like ``ndarray.astype(np.float16)``); state and arithmetic are float32.

numba is imported here only, and this module only when a step first asks for a fused kernel; without numba
``kernel_for`` returns None and ``Updater.apply`` falls back to the reference path. Compiled kernels are cached
on disk (``cache=True``): numba writes next to this file, else to ``$NUMBA_CACHE_DIR`` or the user cache
directory; if none is writable the kernels are compiled in memory only.
"""

from __future__ import annotations

import hashlib
import inspect
import types

import numpy as np

from .fused_kernels import FusedKernels, fused_kernels_of

try:
    import numba
    from numba import prange
except ImportError:  # pragma: no cover - numba is a dependency, but the reference path must not need it
    numba = None

_CACHE = True


def _parallel(fn):
    """``@njit(parallel=True, fastmath=False)``, cached on disk where numba finds a writable directory."""
    return _compiled(fn, parallel=True)


def _compiled(fn, parallel: bool):
    """``fn`` compiled by numba (``parallel``: ``prange`` spreads over numba's threads; else it is a plain
    ``range`` and the call is one thread with no parallel launch at all), cached on disk where possible."""
    return jit_cached(fn, parallel=parallel, fastmath=False)


def jit_cached(fn, **options):
    """``numba.njit(**options)(fn)``, cached on disk where numba finds a writable directory (next to the source,
    else ``$NUMBA_CACHE_DIR`` or the user cache); where it finds none (a read-only install), compiled in memory,
    and no later call tries the disk again. Every numba function of rayps is built here."""
    global _CACHE
    if _CACHE:
        try:
            return numba.njit(cache=True, **options)(fn)
        except RuntimeError:  # "cannot cache function ...: no locator available"
            _CACHE = False
    return numba.njit(**options)(fn)


def _inline(fn):
    return numba.njit(inline="always", fastmath=False)(fn)


if numba is not None:

    # -- float16 through its bits ---------------------------------------------------------------------------

    @numba.extending.intrinsic
    def _as_float32(typingctx, bits):
        """Reinterpret uint32 bits as a float32 (an LLVM bitcast)."""
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], context.get_value_type(numba.types.float32))
        return numba.types.float32(numba.types.uint32), codegen

    @numba.extending.intrinsic
    def _as_uint32(typingctx, value):
        """Reinterpret a float32 as its uint32 bits (an LLVM bitcast)."""
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], context.get_value_type(numba.types.uint32))
        return numba.types.uint32(numba.types.float32), codegen

    @numba.njit(fastmath=False)
    def _half_to_float(bits):
        """IEEE binary16 bits -> float32, exact (subnormals, inf and NaN included)."""
        h = np.uint32(bits)
        sign = np.uint32((h & 0x8000) << 16)
        exponent = h & 0x7C00
        magnitude = np.uint32((h & 0x7FFF) << 13)
        if exponent == 0x7C00:  # inf / NaN: all exponent bits, payload kept
            out = np.uint32(magnitude | 0x7F800000)
        elif exponent == 0:  # zero / subnormal: the bits read as a float32 are 2^-112 of the value (exact)
            out = _as_uint32(_as_float32(magnitude) * np.float32(5.192296858534828e33))
        else:  # normal: rebias the exponent by 127 - 15
            out = np.uint32(magnitude + 0x38000000)
        return _as_float32(np.uint32(out | sign))

    @numba.njit(fastmath=False)
    def _float_to_half(value):
        """float32 -> IEEE binary16 bits, rounding to nearest even (as ``astype(np.float16)``)."""
        f = _as_uint32(value)
        sign = np.uint32((f >> 16) & 0x8000)
        f = np.uint32(f & 0x7FFFFFFF)
        if f >= 0x47800000:  # >= 65536: inf, or NaN (quieted, payload kept)
            if f > 0x7F800000:
                out = np.uint32(0x7E00 | (f >> 13))
            else:
                out = np.uint32(0x7C00)
        elif f < 0x38800000:  # below the smallest normal half: adding 0.5 makes the FPU round at 2^-24
            out = np.uint32(_as_uint32(_as_float32(f) + np.float32(0.5)) - 0x3F000000)
        else:  # normal: rebias, round to nearest even on the 13 dropped bits (may carry into inf)
            out = np.uint32((f - 0x38000000 + 0xFFF + ((f >> 13) & 1)) >> 13)
        return np.uint16(out | sign)

    def _load(array, i):
        """``array[i]`` in the compute dtype (float16 bits -> float32)."""

    def _store(array, i, value):
        """``array[i] = value`` converted to the array's dtype (float32 -> float16 bits)."""

    @numba.extending.overload(_load)
    def _load_overload(array, i):
        if array.dtype == numba.types.uint16:
            return lambda array, i: _half_to_float(array[i])
        return lambda array, i: array[i]

    @numba.extending.overload(_store)
    def _store_overload(array, i, value):
        if array.dtype == numba.types.uint16:
            def store_half(array, i, value):
                array[i] = _float_to_half(value)
            return store_half

        def store(array, i, value):
            array[i] = value
        return store

    # -- the shared prologue and epilogue ---------------------------------------------------------------------

    @_inline
    def _adjusted_gradient(w, g, grad_scale, clip_value, l1, l2):
        """``clip(g * grad_scale, -clip_value, clip_value) + l1 * sign(w) + l2 * w`` (NaN stays NaN)."""
        g = g * grad_scale
        if g > clip_value:
            g = clip_value
        elif g < -clip_value:
            g = -clip_value
        if l1 != 0:
            g = g + l1 * np.sign(w)
        if l2 != 0:
            g = g + l2 * w
        return g

    @_inline
    def _new_param(w, update, weight_decay):
        """``w - (update + weight_decay * w)``: DL4J's WeightDecay after the rule, then ``params -= update``."""
        if weight_decay != 0:
            update = update + weight_decay * w
        return w - update

    @_parallel
    def _weight_decay_only(p, zero, wd):
        """A rule whose update is always 0 (``FusedKernels.zero_update``, NoOp): only weight decay moves the
        params (not run when it is 0)."""
        for i in prange(p.size):
            w = _load(p, i)
            _store(p, i, _new_param(w, zero, wd))


# -- the loops around a rule's element (``FusedKernels.element``), one per number of state slots --------------
# Plain functions: ``_rule_loop`` gives each rule its own copy whose global ``element`` is the rule's compiled
# element, then compiles it with ``_parallel``. ``rule`` is the tuple of kernel scalars in the compute dtype.


def _loop_0_slots(p, g, rule, scale, clip, l1, l2, wd):
    for i in prange(p.size):
        w = _load(p, i)
        gi = _adjusted_gradient(w, _load(g, i), scale, clip, l1, l2)
        (update,) = element(gi, rule)  # noqa: F821 - bound per rule by _rule_loop
        _store(p, i, _new_param(w, update, wd))


def _loop_1_slot(p, g, s0, rule, scale, clip, l1, l2, wd):
    for i in prange(p.size):
        w = _load(p, i)
        gi = _adjusted_gradient(w, _load(g, i), scale, clip, l1, l2)
        update, n0 = element(gi, s0[i], rule)  # noqa: F821
        s0[i] = n0
        _store(p, i, _new_param(w, update, wd))


def _loop_2_slots(p, g, s0, s1, rule, scale, clip, l1, l2, wd):
    for i in prange(p.size):
        w = _load(p, i)
        gi = _adjusted_gradient(w, _load(g, i), scale, clip, l1, l2)
        update, n0, n1 = element(gi, s0[i], s1[i], rule)  # noqa: F821
        s0[i] = n0
        s1[i] = n1
        _store(p, i, _new_param(w, update, wd))


def _loop_3_slots(p, g, s0, s1, s2, rule, scale, clip, l1, l2, wd):
    for i in prange(p.size):
        w = _load(p, i)
        gi = _adjusted_gradient(w, _load(g, i), scale, clip, l1, l2)
        update, n0, n1, n2 = element(gi, s0[i], s1[i], s2[i], rule)  # noqa: F821
        s0[i] = n0
        s1[i] = n1
        s2[i] = n2
        _store(p, i, _new_param(w, update, wd))


_LOOPS = (_loop_0_slots, _loop_1_slot, _loop_2_slots, _loop_3_slots)


def _inlined_call(kernels: FusedKernels, slots: int):
    """``element(gi, *slots, *rule)`` as a function numba inlines (``inline="always"``): it spells the scalars
    out (``rule[0], rule[1], ...``), since numba inlines no call with ``*args``; left a call, the element is
    not inlined and the loop does not vectorize."""
    slot_names, scalar_names = kernels.argument_names(slots)
    arguments = ", ".join(("gi",) + tuple(f"s{k}" for k in range(slots)))
    spelled = ", ".join(("gi",) + tuple(f"s{k}" for k in range(slots))
                        + tuple(f"rule[{k}]" for k in range(len(scalar_names))))
    source = f"def call({arguments}, rule):\n    return element({spelled})\n"
    namespace = {"element": numba.njit(inline="always", fastmath=False)(kernels.element)}
    exec(compile(source, f"<fused call of {kernels.element.__qualname__}>", "exec"), namespace)  # noqa: S102
    return numba.njit(inline="always", fastmath=False)(namespace["call"])
_RULE_LOOPS: dict = {}  # (rule class, parallel) -> its compiled loop


def _rule_loop(rule_class, kernels: FusedKernels, parallel: bool = True):
    """The rule's loop, compiled: ``_LOOPS[slots]`` with ``element`` bound to the rule's compiled element;
    ``parallel`` or the one-thread twin of the same loop (the same arithmetic per element, so the same bits).

    Its qualified name carries a digest of the element's source (and ``serial`` for the twin), so numba's disk
    cache (keyed by this file and the loop's name) never serves a loop built from an older element or the other
    variant; an element without source is compiled in memory only."""
    key = (rule_class, parallel)
    if key not in _RULE_LOOPS:
        template = _LOOPS[len(rule_class.state_keys)]
        namespace = dict(globals(), element=_inlined_call(kernels, len(rule_class.state_keys)))
        loop = types.FunctionType(template.__code__, namespace, f"fused_{rule_class.__name__}")
        try:
            source = inspect.getsource(kernels.element)
        except (OSError, TypeError):
            source = None
        if source is None:
            _RULE_LOOPS[key] = numba.njit(parallel=parallel, fastmath=False)(loop)
        else:
            variant = "" if parallel else "_serial"
            loop.__qualname__ = f"{loop.__name__}_{hashlib.sha256(source.encode()).hexdigest()[:16]}{variant}"
            _RULE_LOOPS[key] = _compiled(loop, parallel)
    return _RULE_LOOPS[key]


_COMPUTE = {np.dtype(np.float16): (np.float32, np.uint16), np.dtype(np.float32): (np.float32, None),
            np.dtype(np.float64): (np.float64, None)}

# Below this many elements the one-thread twin of the loop does the whole pass (no parallel launch): waking a
# second thread costs more than it saves (figures in BENCHMARKS.md, "Figures that were in code comments").
SERIAL_BELOW = 1 << 15

_STEPS: dict = {}


def _slot_view(state, k: int):
    """State slot ``k`` as a 1-D view. Only each slot must be contiguous: ``Updater.init`` allocates the slots
    64 B apart (see its docstring)."""
    slot = state[k]
    if not slot.flags.c_contiguous:
        raise ValueError(f"state slot {k} must be C-contiguous for the fused kernel")
    return slot.reshape(-1)


def kernel_for(updater, param_dtype):
    """The fused kernel for ``updater`` on ``param_dtype`` params, or None (no numba, a rule class that registers
    no ``FusedKernels`` or no element, more state slots than the loops take, or not a float dtype)."""
    if numba is None:
        return None
    rule_class = type(updater)
    kernels = fused_kernels_of(rule_class)
    dtype = np.dtype(param_dtype)
    if kernels is None or dtype not in _COMPUTE:
        return None
    if not kernels.zero_update and (kernels.element is None or len(rule_class.state_keys) >= len(_LOOPS)):
        return None
    if (rule_class, dtype) not in _STEPS:
        _STEPS[rule_class, dtype] = _fused_step(rule_class, kernels, dtype)
    return _STEPS[rule_class, dtype]


def _fused_step(rule_class, kernels: FusedKernels, dtype: np.dtype):
    compute, bits = _COMPUTE[dtype]
    zero_update = kernels.zero_update
    if zero_update:
        loops = {True: _weight_decay_only, False: _weight_decay_only}
    else:  # the one-thread twin is compiled the first time a small array asks for it
        loops = {True: None, False: None}

    def loop(parallel: bool):
        if loops[parallel] is None:
            loops[parallel] = _rule_loop(rule_class, kernels, parallel)
        return loops[parallel]

    def fused_step(params, grads, state, scalars, adjustments):
        if zero_update and not adjustments.weight_decay:
            return  # update = 0 and no weight decay: params and (empty) state are unchanged
        p = params.reshape(-1)
        g = grads.reshape(-1)
        if bits is not None:
            p, g = p.view(bits), g.view(bits)
        adjust = tuple(map(compute, adjustments))
        if zero_update:
            args = (p, compute(0.0), adjust[4])
        else:
            slots = tuple(_slot_view(state, k) for k in range(state.shape[0]))
            rule = tuple(map(compute, kernels.kernel_scalars(scalars)))
            args = (p, g, *slots, rule) + adjust
        loop(p.size >= SERIAL_BELOW)(*args)

    def fused_steps(params, steps, state, settings):
        """``fused_step(params, grads, state, scalars, adjustments)`` for each gradient of ``steps`` with its
        ``(scalars, adjustments)`` of ``settings``, in order: the same loop calls on the same views, built once
        (a batch of small pushes, where building them costs as much as the loop)."""
        p = params.reshape(-1)
        if bits is not None:
            p = p.view(bits)
        slots = () if zero_update else tuple(_slot_view(state, k) for k in range(state.shape[0]))
        run = loop(p.size >= SERIAL_BELOW)
        for grads, (scalars, adjustments) in zip(steps, settings):
            if zero_update:
                if adjustments.weight_decay:
                    run(p, compute(0.0), compute(adjustments.weight_decay))
                continue
            g = grads.reshape(-1)
            run(p, g if bits is None else g.view(bits), *slots, tuple(map(compute, kernels.kernel_scalars(scalars))),
                *map(compute, adjustments))

    fused_step.__name__ = f"fused_cpu_{rule_class.__name__}_{dtype.name}"
    fused_step.steps = fused_steps
    return fused_step
