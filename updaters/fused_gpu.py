"""One-pass CuPy kernels (one ``cupy.ElementwiseKernel`` per rule) for the DL4J rules of ``rules.py``.

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

# rule -> (state slot names, rule scalar names, body computing `update` from `w`, `gi` and the slots)
_RULES = {
    "Sgd": ((), ("lr",), "compute_t update = lr * gi;"),
    "Nesterovs": (("v",), ("lr", "mu", "one_plus_mu"),
                  "compute_t v_prev = v; v = v_prev * mu - lr * gi;"
                  "compute_t update = mu * v_prev - one_plus_mu * v;"),
    "AdaGrad": (("h",), ("lr", "eps"),
                "h = h + gi * gi; compute_t update = lr * gi / (rayps_sqrt(h) + eps);"),
    "RmsProp": (("G",), ("lr", "decay", "one_minus_decay", "eps"),
                "G = G * decay + one_minus_decay * (gi * gi);"
                "compute_t update = lr * gi / (rayps_sqrt(G) + eps);"),
    "AdaDelta": (("msg", "msdx"), ("rho", "one_minus_rho", "eps"),
                 "msg = msg * rho + one_minus_rho * (gi * gi);"
                 "compute_t update = gi * rayps_sqrt(msdx + eps) / rayps_sqrt(msg + eps);"
                 "msdx = msdx * rho + one_minus_rho * (update * update);"),
    "Adam": (("m", "v"), ("alpha", "b1", "one_minus_b1", "b2", "one_minus_b2", "eps"),
             "m = m * b1 + one_minus_b1 * gi; v = v * b2 + one_minus_b2 * (gi * gi);"
             "compute_t update = alpha * m / (rayps_sqrt(v) + eps);"),
    "AdaMax": (("m", "u"), ("alpha", "b1", "one_minus_b1", "b2", "tiny"),
               "m = m * b1 + one_minus_b1 * gi; u = rayps_maximum<compute_t>(u * b2, rayps_abs(gi)) + tiny;"
               "compute_t update = alpha * m / u;"),
    "Nadam": (("m", "v"), ("lr", "b1", "one_minus_b1", "b2", "one_minus_b2", "eps", "one_minus_b1t"),
              "m = m * b1 + one_minus_b1 * gi; v = v * b2 + one_minus_b2 * (gi * gi);"
              "compute_t update = lr * ((b1 * m + one_minus_b1 * gi) / one_minus_b1t) / (rayps_sqrt(v) + eps);"),
    "AMSGrad": (("m", "v", "vhat"), ("alpha", "b1", "one_minus_b1", "b2", "one_minus_b2", "eps"),
                "m = m * b1 + one_minus_b1 * gi; v = v * b2 + one_minus_b2 * (gi * gi);"
                "vhat = rayps_maximum<compute_t>(vhat, v);"
                "compute_t update = alpha * m / (rayps_sqrt(vhat) + eps);"),
    "AdaBelief": (("m", "s"), ("alpha", "b1", "one_minus_b1", "b2", "one_minus_b2", "eps"),
                  "m = m * b1 + one_minus_b1 * gi; compute_t d = gi - m;"
                  "s = (s * b2 + one_minus_b2 * (d * d)) + eps;"
                  "compute_t update = alpha * m / (rayps_sqrt(s) + eps);"),
}


def _adam_like(s):
    return (s[0], s[1], 1.0 - s[1], s[2], 1.0 - s[2], s[3])


# rule -> rule_scalars() tuple -> the kernel's rule scalars, derived in float64 as the reference derives them
_KERNEL_SCALARS = {
    "Sgd": lambda s: (s[0],),
    "Nesterovs": lambda s: (s[0], s[1], 1.0 + s[1]),
    "AdaGrad": lambda s: (s[0], s[1]),
    "RmsProp": lambda s: (s[0], s[1], 1.0 - s[1], s[2]),
    "AdaDelta": lambda s: (s[0], 1.0 - s[0], s[1]),
    "Adam": _adam_like,
    "AdaMax": lambda s: (s[0], s[1], 1.0 - s[1], s[2], 1e-32),
    "Nadam": lambda s: _adam_like(s[:4]) + (s[4],),
    "AMSGrad": _adam_like,
    "AdaBelief": _adam_like,
}

_KERNELS: dict = {}
_CTYPES = {np.dtype(np.float32): ("float32", "float"), np.dtype(np.float64): ("float64", "double")}


def _elementwise_kernel(cupy, name: str, compute):
    """The rule's ``ElementwiseKernel`` for compute dtype ``compute`` (built once; CuPy compiles it once per
    params dtype ``P``). The compute type ``compute_t`` is spelled out rather than left a placeholder: CuPy
    infers placeholders from arrays only, and Sgd/NoOp have no state array to infer it from."""
    key = (name, np.dtype(compute))
    if key not in _KERNELS:
        numpy_name, c_name = _CTYPES[np.dtype(compute)]
        if name == "NoOp":  # reached only with weight decay: p = w - (0 + wd * w)
            slots, scalars, body = (), ("zero",), "compute_t update = zero;"
            in_params = ", ".join(f"{numpy_name} {s}" for s in scalars + ("wd",))
            operation = "compute_t w = (compute_t)p;\n" + body + "\n" + _EPILOGUE
        else:
            slots, scalars, body = _RULES[name]
            in_params = ", ".join(["P g"] + [f"{numpy_name} {s}" for s in scalars + _ADJUSTMENTS])
            operation = _PROLOGUE + body + "\n" + _EPILOGUE
        out_params = ", ".join(["P p"] + [f"{numpy_name} {s}" for s in slots])
        _KERNELS[key] = cupy.ElementwiseKernel(
            in_params, out_params, operation, name=f"rayps_fused_{name.lower()}_{numpy_name}",
            preamble=f"typedef {c_name} compute_t;\n" + _PREAMBLE, options=("--fmad=false",), no_return=True)
    return _KERNELS[key]


def kernel_for(updater, param_dtype):
    """The fused CuPy kernel for ``updater`` on ``param_dtype`` params, or None (no cupy, unknown rule/dtype)."""
    try:
        import cupy  # noqa: PLC0415 - optional GPU backend
    except ImportError:
        return None
    name = type(updater).__name__
    dtype = np.dtype(param_dtype)
    if dtype not in (np.float16, np.float32, np.float64) or (name not in _RULES and name != "NoOp"):
        return None
    compute = np.float32 if dtype == np.float16 else dtype.type

    def fused_step(params, grads, state, scalars, adjustments):
        adjust = tuple(compute(x) for x in adjustments)
        p = params.reshape(-1)
        if name == "NoOp":
            if adjustments.weight_decay:
                _elementwise_kernel(cupy, name, compute)(compute(0.0), adjust[4], p)
            return
        slots = [state[k].reshape(-1) for k in range(state.shape[0])]  # each slot is C-contiguous (base.py checks)
        rule_scalars = tuple(compute(x) for x in _KERNEL_SCALARS[name](scalars))
        _elementwise_kernel(cupy, name, compute)(grads.reshape(-1), *rule_scalars, *adjust, p,
                                                 *slots)

    fused_step.__name__ = f"fused_gpu_{name}_{dtype.name}"
    return fused_step
