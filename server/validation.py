"""Checks on what users hand the parameter server: configs, initial parameters, pushed gradients.

Every error names the key or field and what was expected; nothing is sent or changed when one is raised.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping

import numpy as np

CONSISTENCY_MODES = ("async", "ssp", "sync")
NAN_POLICIES = ("reject", "skip")
PARAM_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_server_config(num_shards, consistency, staleness, num_workers, nan_policy) -> None:
    if not _is_int(num_shards) or num_shards < 1:
        raise ValueError(f"num_shards must be an integer >= 1, got {num_shards!r}")
    if consistency not in CONSISTENCY_MODES:
        raise ValueError(f"consistency must be one of {list(CONSISTENCY_MODES)}, got {consistency!r}")
    if not _is_int(staleness) or staleness < 0:
        raise ValueError(f"staleness must be an integer >= 0, got {staleness!r}")
    if not _is_int(num_workers) or num_workers < 1:
        raise ValueError(f"num_workers must be an integer >= 1, got {num_workers!r}")
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy must be one of {list(NAN_POLICIES)}, got {nan_policy!r}")


def check_initial_params(params) -> dict[str, np.ndarray]:
    """The initial parameters as a name -> float array dict (arrays are not copied here)."""
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a mapping of name -> float array, got {type(params).__name__}")
    if not params:
        raise ValueError("params must not be empty: give at least one named float array")
    checked = {}
    for name, value in params.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"params: every key must be a non-empty str, got {name!r}")
        if not isinstance(value, np.ndarray):
            raise TypeError(f"params[{name!r}] must be a NumPy array, got {type(value).__name__}")
        if value.dtype not in PARAM_DTYPES:
            raise TypeError(f"params[{name!r}] must have a float dtype (float16, float32, float64), got {value.dtype}")
        if value.size == 0:
            raise ValueError(f"params[{name!r}] is empty (shape {value.shape}); every parameter needs >= 1 element")
        if not np.isfinite(value).all():
            raise ValueError(f"params[{name!r}] contains NaN or Inf")
        checked[name] = value
    return checked


def check_gradients(grads, shapes: Mapping[str, tuple], dtypes: Mapping[str, str]) -> Mapping[str, np.ndarray]:
    """Structure checks of one push (keys, types, shapes, dtypes); returns ``grads`` itself (no copy). The
    client checks finiteness next, in one pass per array (``all_finite``), before anything is sent."""
    if not isinstance(grads, Mapping):
        raise TypeError(f"grads must be a mapping of parameter name -> array, got {type(grads).__name__}")
    if not grads:
        raise ValueError("grads is empty: push at least one parameter's gradient")
    for name, value in grads.items():
        shape = shapes.get(name)
        if shape is None:
            known = list(shapes)
            hint = known if len(known) <= 10 else known[:10] + ["..."]
            raise ValueError(f"grads: unknown parameter {name!r}; known parameters: {hint}")
        if not isinstance(value, np.ndarray):
            raise TypeError(f"grads[{name!r}] must be a NumPy array, got {type(value).__name__}")
        if value.dtype.kind != "f":
            raise TypeError(f"grads[{name!r}] must have a float dtype like its parameter ({dtypes[name]}), "
                            f"got {value.dtype}")
        if value.shape != shape and tuple(value.shape) != tuple(shape):
            raise ValueError(f"grads[{name!r}] has shape {tuple(value.shape)}, expected {tuple(shape)}")
    return grads


SUM_FROM = 1 << 14  # elements from which all_finite sums instead of testing each element
DOT_UP_TO = 1 << 13  # elements up to which a float32/float64 array is first tested by its dot product with itself
# x . x overflows only for a finite array whose answer is True anyway (then the elementwise test gives it): the
# warning of that overflow, raised in this module, says nothing to a user
warnings.filterwarnings("ignore", message="overflow encountered in dot", category=RuntimeWarning,
                        module=re.escape(__name__))


def all_finite(array: np.ndarray) -> bool:
    """True when no element is NaN or +-Inf. A small float32/float64 array is first tested by ``x . x``, one BLAS
    call (on one thread at this size, and cheaper than the elementwise test): each square is >= 0, so the sum is
    NaN or +Inf when an element is, and finite elements make it +Inf only by overflowing (|x| above ~1e19 in
    float32); a finite dot product answers True, anything else goes to the elementwise test. Other small arrays
    are tested element by element (cheapest at that size, and it sets no floating-point flag); a large one in
    one summing pass without a temporary (a NaN or Inf makes the sum non-finite), and only when the sum is not
    finite, the exact elementwise check (an overflowing sum of finite values). The sum's overflow/invalid flags
    are silenced here: a non-finite gradient is an answer, not a warning."""
    if array.size <= DOT_UP_TO and array.dtype.char in "fd":
        flat = array.reshape(-1)
        try:
            if math.isfinite(flat.dot(flat)):
                return True
        except (RuntimeWarning, FloatingPointError):  # the overflow made an error (``-W error``, ``np.seterr``)
            pass
        return bool(np.isfinite(array).all())
    if array.size < SUM_FROM:
        return bool(np.isfinite(array).all())
    with np.errstate(over="ignore", invalid="ignore"):
        if array.dtype == np.float16:  # float16 sums overflow at 65504: accumulate in float32 (buffered)
            total = np.add.reduce(array, axis=None, dtype=np.float32)
        else:
            total = np.add.reduce(array, axis=None)
    return math.isfinite(total) or bool(np.isfinite(array).all())
