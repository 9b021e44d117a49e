"""One-pass CPU kernels (numba, ``parallel=True``) for the DL4J rules of ``rules.py``.

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

import numpy as np

try:
    import numba
    from numba import prange
except ImportError:  # pragma: no cover - numba is a dependency, but the reference path must not need it
    numba = None

_CACHE = True


def _parallel(fn):
    """``@njit(parallel=True, fastmath=False)``, cached on disk where numba finds a writable directory."""
    global _CACHE
    if _CACHE:
        try:
            return numba.njit(parallel=True, fastmath=False, cache=True)(fn)
        except RuntimeError:  # "cannot cache function ...: no locator available"
            _CACHE = False
    return numba.njit(parallel=True, fastmath=False)(fn)


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

    @_inline
    def _maximum(a, b):
        """``np.maximum``: NaN if either is NaN."""
        return a if (a >= b or a != a) else b

    # -- the rules (scalars after ``p, g, state...``: the rule's, then the five adjustments) -----------------------

    @_parallel
    def _sgd(p, g, lr, scale, clip, l1, l2, wd):
        """Sgd (``SgdUpdater``): ``update = lr * g``."""
        for i in prange(p.size):
            w = _load(p, i)
            gi = _adjusted_gradient(w, _load(g, i), scale, clip, l1, l2)
            _store(p, i, _new_param(w, lr * gi, wd))

    @_parallel
    def _noop(p, zero, wd):
        """NoOp (``NoOpUpdater``): ``update = 0``; only weight decay moves the params (not run when it is 0)."""
        for i in prange(p.size):
            w = _load(p, i)
            _store(p, i, _new_param(w, zero, wd))

    @_parallel
    def _nesterovs(p, g, v, lr, mu, one_plus_mu, scale, clip, l1, l2, wd):
        """Nesterovs (``NesterovsUpdater``): ``v' = mu*v - lr*g; update = mu*v - (1+mu)*v'``."""
        for i in prange(p.size):
            w = _load(p, i)
            gi = _adjusted_gradient(w, _load(g, i), scale, clip, l1, l2)
            v_prev = v[i]
            vi = v_prev * mu - lr * gi
            v[i] = vi
            _store(p, i, _new_param(w, mu * v_prev - one_plus_mu * vi, wd))

    @_parallel
    def _adagrad(p, g, h, lr, eps, scale, clip, l1, l2, wd):
        """AdaGrad (``AdaGradUpdater``): ``h += g*g; update = lr*g / (sqrt(h) + eps)``."""
        for i in prange(p.size):
            w = _load(p, i)
            gi = _adjusted_gradient(w, _load(g, i), scale, clip, l1, l2)
            hi = h[i] + gi * gi
            h[i] = hi
            _store(p, i, _new_param(w, lr * gi / (np.sqrt(hi) + eps), wd))

    @_parallel
    def _rmsprop(p, g, G, lr, decay, one_minus_decay, eps, scale, clip, l1, l2, wd):
        """RmsProp (``RmsPropUpdater``): ``G = d*G + (1-d)*g*g; update = lr*g / (sqrt(G) + eps)``."""
        for i in prange(p.size):
            w = _load(p, i)
            gi = _adjusted_gradient(w, _load(g, i), scale, clip, l1, l2)
            Gi = G[i] * decay + one_minus_decay * (gi * gi)
            G[i] = Gi
            _store(p, i, _new_param(w, lr * gi / (np.sqrt(Gi) + eps), wd))

    @_parallel
    def _adadelta(p, g, msg, msdx, rho, one_minus_rho, eps, scale, clip, l1, l2, wd):
        """AdaDelta (``AdaDeltaUpdater``): ``msg = rho*msg + (1-rho)*g*g;
        update = g*sqrt(msdx+eps) / sqrt(msg+eps); msdx = rho*msdx + (1-rho)*update^2``."""
        for i in prange(p.size):
            w = _load(p, i)
            gi = _adjusted_gradient(w, _load(g, i), scale, clip, l1, l2)
            msg_i = msg[i] * rho + one_minus_rho * (gi * gi)
            msg[i] = msg_i
            msdx_i = msdx[i]
            update = gi * np.sqrt(msdx_i + eps) / np.sqrt(msg_i + eps)
            msdx[i] = msdx_i * rho + one_minus_rho * (update * update)
            _store(p, i, _new_param(w, update, wd))

    @_parallel
    def _adam(p, g, m, v, alpha, b1, one_minus_b1, b2, one_minus_b2, eps, scale, clip, l1, l2, wd):
        """Adam (``AdamUpdater``): ``m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g*g;
        update = alpha_t*m / (sqrt(v) + eps)``."""
        for i in prange(p.size):
            w = _load(p, i)
            gi = _adjusted_gradient(w, _load(g, i), scale, clip, l1, l2)
            mi = m[i] * b1 + one_minus_b1 * gi
            vi = v[i] * b2 + one_minus_b2 * (gi * gi)
            m[i] = mi
            v[i] = vi
            _store(p, i, _new_param(w, alpha * mi / (np.sqrt(vi) + eps), wd))

    @_parallel
    def _adamax(p, g, m, u, alpha, b1, one_minus_b1, b2, tiny, scale, clip, l1, l2, wd):
        """AdaMax (``AdaMaxUpdater``): ``m = b1*m + (1-b1)*g; u = max(b2*u, |g|) + 1e-32;
        update = alpha_t*m / u``."""
        for i in prange(p.size):
            w = _load(p, i)
            gi = _adjusted_gradient(w, _load(g, i), scale, clip, l1, l2)
            mi = m[i] * b1 + one_minus_b1 * gi
            ui = _maximum(u[i] * b2, abs(gi)) + tiny
            m[i] = mi
            u[i] = ui
            _store(p, i, _new_param(w, alpha * mi / ui, wd))

    @_parallel
    def _nadam(p, g, m, v, lr, b1, one_minus_b1, b2, one_minus_b2, eps, one_minus_b1t, scale, clip, l1, l2, wd):
        """Nadam (``NadamUpdater``): m, v as Adam;
        ``update = lr*((b1*m + (1-b1)*g) / (1-b1^t)) / (sqrt(v) + eps)``."""
        for i in prange(p.size):
            w = _load(p, i)
            gi = _adjusted_gradient(w, _load(g, i), scale, clip, l1, l2)
            mi = m[i] * b1 + one_minus_b1 * gi
            vi = v[i] * b2 + one_minus_b2 * (gi * gi)
            m[i] = mi
            v[i] = vi
            update = lr * ((b1 * mi + one_minus_b1 * gi) / one_minus_b1t) / (np.sqrt(vi) + eps)
            _store(p, i, _new_param(w, update, wd))

    @_parallel
    def _amsgrad(p, g, m, v, vhat, alpha, b1, one_minus_b1, b2, one_minus_b2, eps, scale, clip, l1, l2, wd):
        """AMSGrad (``AMSGradUpdater``): m, v as Adam; ``vhat = max(vhat, v);
        update = alpha_t*m / (sqrt(vhat) + eps)``."""
        for i in prange(p.size):
            w = _load(p, i)
            gi = _adjusted_gradient(w, _load(g, i), scale, clip, l1, l2)
            mi = m[i] * b1 + one_minus_b1 * gi
            vi = v[i] * b2 + one_minus_b2 * (gi * gi)
            vhat_i = _maximum(vhat[i], vi)
            m[i] = mi
            v[i] = vi
            vhat[i] = vhat_i
            _store(p, i, _new_param(w, alpha * mi / (np.sqrt(vhat_i) + eps), wd))

    @_parallel
    def _adabelief(p, g, m, s, alpha, b1, one_minus_b1, b2, one_minus_b2, eps, scale, clip, l1, l2, wd):
        """AdaBelief (``AdaBeliefUpdater``): ``m = b1*m + (1-b1)*g; s = b2*s + (1-b2)*(g-m)^2 + eps;
        update = alpha_t*m / (sqrt(s) + eps)``."""
        for i in prange(p.size):
            w = _load(p, i)
            gi = _adjusted_gradient(w, _load(g, i), scale, clip, l1, l2)
            mi = m[i] * b1 + one_minus_b1 * gi
            d = gi - mi
            si = (s[i] * b2 + one_minus_b2 * (d * d)) + eps
            m[i] = mi
            s[i] = si
            _store(p, i, _new_param(w, alpha * mi / (np.sqrt(si) + eps), wd))


# -- dispatch ------------------------------------------------------------------------------------------------
# Each entry: (kernel name, scalars -> the rule's kernel scalars as Python floats, derived in float64 exactly as
# the reference derives them before NumPy casts them to the compute dtype).


def _adam_like(scalars):
    alpha, b1, b2, eps = scalars
    return (alpha, b1, 1.0 - b1, b2, 1.0 - b2, eps)


_RULES = {
    "Sgd": ("_sgd", lambda s: (s[0],)),
    "NoOp": ("_noop", lambda s: (0.0,)),
    "Nesterovs": ("_nesterovs", lambda s: (s[0], s[1], 1.0 + s[1])),
    "AdaGrad": ("_adagrad", lambda s: (s[0], s[1])),
    "RmsProp": ("_rmsprop", lambda s: (s[0], s[1], 1.0 - s[1], s[2])),
    "AdaDelta": ("_adadelta", lambda s: (s[0], 1.0 - s[0], s[1])),
    "Adam": ("_adam", _adam_like),
    "AdaMax": ("_adamax", lambda s: (s[0], s[1], 1.0 - s[1], s[2], 1e-32)),
    "Nadam": ("_nadam", lambda s: _adam_like(s[:4]) + (s[4],)),
    "AMSGrad": ("_amsgrad", _adam_like),
    "AdaBelief": ("_adabelief", _adam_like),
}

_COMPUTE = {np.dtype(np.float16): (np.float32, np.uint16), np.dtype(np.float32): (np.float32, None),
            np.dtype(np.float64): (np.float64, None)}

# Below this many elements one thread does the whole pass: waking the second costs more than it saves
# (measured on 2 cores: ~11 us either way at 1e3 elements, 2 threads ahead from ~1e5).
SERIAL_BELOW = 1 << 15

_STEPS: dict = {}


def _slot_view(state, k: int):
    """State slot ``k`` as a 1-D view. Only each slot must be contiguous: ``Updater.init`` allocates the slots
    64 B apart, which streams faster than back to back (BENCHMARKS.md)."""
    slot = state[k]
    if not slot.flags.c_contiguous:
        raise ValueError(f"state slot {k} must be C-contiguous for the fused kernel")
    return slot.reshape(-1)


def kernel_for(updater, param_dtype):
    """The fused kernel for ``updater`` on ``param_dtype`` params, or None (no numba, unknown rule or dtype)."""
    if numba is None:
        return None
    name = type(updater).__name__
    dtype = np.dtype(param_dtype)
    if name not in _RULES or dtype not in _COMPUTE:
        return None
    if (name, dtype) not in _STEPS:
        _STEPS[name, dtype] = _fused_step(name, dtype)
    return _STEPS[name, dtype]


def _fused_step(name: str, dtype: np.dtype):
    kernel_name, kernel_scalars = _RULES[name]
    kernel = globals()[kernel_name]
    compute, bits = _COMPUTE[dtype]
    noop = name == "NoOp"

    def fused_step(params, grads, state, scalars, adjustments):
        if noop and not adjustments.weight_decay:
            return  # update = 0 and no weight decay: params and (empty) state are unchanged
        p = params.reshape(-1)
        g = grads.reshape(-1)
        if bits is not None:
            p, g = p.view(bits), g.view(bits)
        slots = tuple(_slot_view(state, k) for k in range(state.shape[0]))
        rule = tuple(compute(x) for x in kernel_scalars(scalars))
        adjust = tuple(compute(x) for x in adjustments)
        args = (p,) + rule + adjust[4:] if noop else (p, g, *slots) + rule + adjust
        if p.size >= SERIAL_BELOW:
            kernel(*args)
            return
        threads = numba.get_num_threads()  # per calling thread in numba: safe under concurrent callers
        if threads == 1:  # e.g. a shard whose thread was set to one numba thread: nothing to switch
            kernel(*args)
            return
        numba.set_num_threads(1)
        try:
            kernel(*args)
        finally:
            numba.set_num_threads(threads)

    fused_step.__name__ = f"fused_cpu_{name}_{dtype.name}"
    return fused_step
