"""One-pass CuPy kernels (one ``cupy.ElementwiseKernel`` per rule) for every rule whose ``FusedKernels`` has a
``cuda`` body (written next to the rule's class; this module owns the prologue, epilogue and dispatch).

The same math, in the same order, as ``fused_cpu.py`` and ``base.reference_step``: per element, in the state's
dtype ``compute_t`` (float32 for float16 params ``P``)::

    w = p
    g' = clip(g * grad_scale, -clip_value, clip_value) + l1 * sign(w) + l2 * w
    update = rule(g', state)                (state updated in place)
    p = w - (update + weight_decay * w)

Params, grads and each state slot are raveled to 1-D views; state slots are the kernel's in-out arguments.
Kernels are compiled with ``--fmad=false`` (no fused multiply-add contraction; CUDA's default sqrt and division
are IEEE-rounded), so they follow the reference's rounding. cupy is imported only when a kernel is first asked
for; without cupy ``kernel_for`` returns None.
"""

from __future__ import annotations

import numpy as np

from .fused_kernels import FusedKernels, fused_kernels_of

_PREAMBLE = r"""
__device__ __forceinline__ float rayps_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double rayps_sqrt(double x) { return sqrt(x); }
__device__ __forceinline__ float rayps_abs(float x) { return fabsf(x); }
__device__ __forceinline__ double rayps_abs(double x) { return fabs(x); }
template <typename T> __device__ __forceinline__ T rayps_sign(T w) {
    return w > T(0) ? T(1) : (w < T(0) ? T(-1) : w);
}
template <typename T> __device__ __forceinline__ T rayps_maximum(T a, T b) {  // np.maximum: NaN wins
    return (a >= b || a != a) ? a : b;
}
// clip(g * scale, -clip, clip) + l1 * sign(w) + l2 * w   (gradient normalization, then L1/L2 before the rule)
template <typename T> __device__ __forceinline__ T rayps_adjusted(T w, T g, T scale, T clip, T l1, T l2) {
    g = g * scale;
    if (g > clip) { g = clip; } else if (g < -clip) { g = -clip; }
    if (l1 != T(0)) { g = g + l1 * rayps_sign(w); }
    if (l2 != T(0)) { g = g + l2 * w; }
    return g;
}
// w - (update + wd * w)   (WeightDecay after the rule, then params -= update)
template <typename T> __device__ __forceinline__ T rayps_new_param(T w, T update, T wd) {
    if (wd != T(0)) { update = update + wd * w; }
    return w - update;
}
"""

_ADJUSTMENTS = ("scale", "clip", "l1", "l2", "wd")
_PROLOGUE = ("compute_t w = (compute_t)p;\n"
             "compute_t gi = rayps_adjusted<compute_t>(w, (compute_t)g, scale, clip, l1, l2);\n")
_EPILOGUE = "p = (P)rayps_new_param<compute_t>(w, update, wd);\n"

_KERNELS: dict = {}
_CTYPES = {np.dtype(np.float32): ("float32", "float"), np.dtype(np.float64): ("float64", "double")}


def _elementwise_kernel(cupy, rule_class, kernels: FusedKernels, compute):
    """The rule's ``ElementwiseKernel`` for compute dtype ``compute`` (built once; CuPy compiles it once per
    params dtype ``P``). The compute type ``compute_t`` is spelled out rather than left a placeholder: CuPy
    infers placeholders from arrays only, and Sgd/NoOp have no state array to infer it from."""
    key = (rule_class, np.dtype(compute))
    if key not in _KERNELS:
        numpy_name, c_name = _CTYPES[np.dtype(compute)]
        name = rule_class.__name__
        if kernels.zero_update:  # reached only with weight decay: p = w - (0 + wd * w)
            slots, scalars, body = (), ("zero",), "compute_t update = zero;"
            in_params = ", ".join(f"{numpy_name} {s}" for s in scalars + ("wd",))
            operation = "compute_t w = (compute_t)p;\n" + body + "\n" + _EPILOGUE
        else:
            slots, scalars = kernels.argument_names(len(rule_class.state_keys))
            in_params = ", ".join(["P g"] + [f"{numpy_name} {s}" for s in scalars + _ADJUSTMENTS])
            operation = _PROLOGUE + kernels.cuda + "\n" + _EPILOGUE
        out_params = ", ".join(["P p"] + [f"{numpy_name} {s}" for s in slots])
        _KERNELS[key] = cupy.ElementwiseKernel(
            in_params, out_params, operation, name=f"rayps_fused_{name.lower()}_{numpy_name}",
            preamble=f"typedef {c_name} compute_t;\n" + _PREAMBLE, options=("--fmad=false",), no_return=True)
    return _KERNELS[key]


def kernel_for(updater, param_dtype):
    """The fused CuPy kernel for ``updater`` on ``param_dtype`` params, or None (no cupy, a rule class that
    registers no ``FusedKernels`` or no ``cuda`` body, or not a float dtype)."""
    try:
        import cupy  # noqa: PLC0415 - optional GPU backend
    except ImportError:
        return None
    rule_class = type(updater)
    kernels = fused_kernels_of(rule_class)
    dtype = np.dtype(param_dtype)
    if dtype not in (np.float16, np.float32, np.float64) or kernels is None:
        return None
    if not kernels.zero_update and kernels.cuda is None:
        return None
    compute = np.float32 if dtype == np.float16 else dtype.type

    def fused_step(params, grads, state, scalars, adjustments):
        adjust = tuple(compute(x) for x in adjustments)
        p = params.reshape(-1)
        if kernels.zero_update:
            if adjustments.weight_decay:
                _elementwise_kernel(cupy, rule_class, kernels, compute)(compute(0.0), adjust[4], p)
            return
        slots = [state[k].reshape(-1) for k in range(state.shape[0])]  # each slot is C-contiguous (base.py checks)
        rule_scalars = tuple(compute(x) for x in kernels.kernel_scalars(scalars))
        _elementwise_kernel(cupy, rule_class, kernels, compute)(grads.reshape(-1), *rule_scalars, *adjust, p,
                                                                *slots)

    fused_step.__name__ = f"fused_gpu_{rule_class.__name__}_{dtype.name}"
    return fused_step
