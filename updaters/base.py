"""The updater contract shared by every DL4J rule: validation, config, state, and kernel dispatch.

An updater turns a gradient into an *update* and subtracts it from the parameters, the way ND4J's
``GradientUpdater.applyUpdater`` followed by ``params.subi(update)`` does. Every rule is described by

* ``state_keys``: the named state slots (ND4J's "M", "V", ...), stored as ONE array of shape
  ``(len(state_keys), *params.shape)``, i.e. DL4J's ``[m | v]`` view over the block. Each slot is contiguous;
  on the CPU the slots sit ``SLOT_GAP_BYTES`` further apart than back to back (see ``Updater.init``);
* ``rule_scalars(iteration, epoch)``: the hyperparameters resolved for this step (schedules evaluated,
  bias corrections folded in), passed unchanged to every kernel path;
* ``reference_update(g, state, scalars)``: the plain NumPy formula (allocations allowed), which the fused
  CPU and CuPy kernels are tested against;
* ``fused``: optionally, the rule's one-pass kernels (a ``FusedKernels``), registered by the class itself and
  not inherited; a rule without them runs the reference path (docs/design.md, "Adding an update rule").

``apply`` runs one step: the gradient adjustments (normalization scale/clip, L1, L2), the rule, weight decay,
then ``params -= update`` (DL4J-UPDATERS.md, "Order of one step").
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, NamedTuple

import numpy as np

from . import schedules as _schedules
from .fused_kernels import FusedKernels, check_fused_kernels, fused_kernels_of

CONFIG_VERSION = 1
FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
KERNEL_CHOICES = ("auto", "reference", "fused")
SLOT_GAP_BYTES = 64  # between NumPy state slots: one cache line, so slots do not alias modulo 4 KiB
PAGE_BYTES = 4096


class StepAdjustments(NamedTuple):
    """Per-step scalars applied around the rule inside the same pass over memory.

    ``g' = clip(g * grad_scale, -clip_value, clip_value) + l1 * sign(w) + l2 * w`` before the rule
    (gradient normalization, then DL4J's L1/L2 regularization), and ``update += weight_decay * w`` after it
    (DL4J's ``WeightDecay``, already multiplied by the learning rate when ``applyLR`` is set).
    """

    grad_scale: float = 1.0
    clip_value: float = math.inf
    l1: float = 0.0
    l2: float = 0.0
    weight_decay: float = 0.0


NO_ADJUSTMENTS = StepAdjustments()


def state_dtype_for(param_dtype) -> np.dtype:
    """float16 parameters keep float32 state (and compute in float32); other floats keep their own dtype."""
    dtype = np.dtype(param_dtype)
    return np.dtype(np.float32) if dtype == np.float16 else dtype


def array_module(array):
    """NumPy or CuPy, chosen once from the array's own type."""
    module = type(array).__module__.split(".")[0]
    if module == "cupy":
        import cupy  # noqa: PLC0415 - optional GPU backend

        return cupy
    return np


def _is_array(value) -> bool:
    return isinstance(value, np.ndarray) or type(value).__module__.split(".")[0] == "cupy"


# ---------------------------------------------------------------------------------------------------------
# Hyperparameter validation: each check names the field and what was expected.
# ---------------------------------------------------------------------------------------------------------


def _check_number(owner: str, field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{owner}: {field} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{owner}: {field} must be finite, got {value}")
    return value


def check_non_negative(owner: str, field: str, value: Any, schedulable: bool = False):
    if schedulable and isinstance(value, _schedules.Schedule):
        return value
    value = _check_number(owner, field, value)
    if value < 0:
        raise ValueError(f"{owner}: {field} must be >= 0, got {value}")
    return value


def check_unit_interval(owner: str, field: str, value: Any) -> float:
    value = _check_number(owner, field, value)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{owner}: {field} must be in [0, 1), got {value}")
    return value


def resolve(value, iteration: int, epoch: int) -> float:
    """A hyperparameter's value at this step: a schedule is evaluated, a number is returned as is."""
    if isinstance(value, _schedules.Schedule):
        return float(value.value_at(iteration, epoch))
    return float(value)


def _config_value(value):
    return value.to_config() if isinstance(value, _schedules.Schedule) else value


# ---------------------------------------------------------------------------------------------------------
# The base class
# ---------------------------------------------------------------------------------------------------------

UPDATER_TYPES: dict[str, type[Updater]] = {}


class Updater:
    """Base class of the DL4J updaters; subclasses set the class attributes and the two math methods."""

    state_keys: ClassVar[tuple[str, ...]] = ()
    schedulable: ClassVar[tuple[str, ...]] = ()  # hyperparameters that may be a Schedule
    defaults: ClassVar[dict[str, Any]] = {}
    fused: ClassVar[FusedKernels | None] = None  # this class's kernels (see FusedKernels); not inherited

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        check_fused_kernels(cls)
        if not cls.__name__.startswith("_"):
            UPDATER_TYPES[cls.__name__] = cls

    # -- hyperparameters -------------------------------------------------------------------------------
    def _validate(self, name: str, value):
        """Validate one hyperparameter; subclasses list their fields in ``defaults``."""
        if name in ("beta1", "beta2", "rho", "rms_decay"):
            return check_unit_interval(type(self).__name__, name, value)
        return check_non_negative(type(self).__name__, name, value, schedulable=name in self.schedulable)

    def _set_hyperparameters(self, **values):
        for name, value in values.items():
            setattr(self, name, self._validate(name, value))

    @property
    def hyperparameters(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.defaults}

    def learning_rate_at(self, iteration: int, epoch: int = 0) -> float:
        """The learning rate of this step; 1.0 for rules without one (AdaDelta, NoOp), as WeightDecay uses."""
        if "learning_rate" not in self.defaults:
            return 1.0
        return resolve(self.learning_rate, iteration, epoch)

    # -- config ----------------------------------------------------------------------------------------
    def to_config(self) -> dict:
        """A plain dict (msgpack-able): ``{"type", "version", <hyperparameters>}``; schedules nest as dicts."""
        config = {"type": type(self).__name__, "version": CONFIG_VERSION}
        config.update({name: _config_value(value) for name, value in self.hyperparameters.items()})
        return config

    def __eq__(self, other):
        return type(other) is type(self) and other.to_config() == self.to_config()

    def __hash__(self):
        return hash(repr(self))

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters.items())
        return f"{type(self).__name__}({args})"

    # -- state -----------------------------------------------------------------------------------------
    def state_initial_values(self) -> tuple[float, ...]:
        """Initial value of each state slot (0 unless the rule says otherwise)."""
        return (0.0,) * len(self.state_keys)

    def init(self, params):
        """State for ``params`` (any shape): shape ``(len(state_keys), *params.shape)``, each slot contiguous.

        dtype: the params' dtype, except float16 params, whose state is float32.

        Layout (NumPy, slots of at least a page): the slots are not back to back. Slot ``k`` starts
        ``(k + 1) * SLOT_GAP_BYTES`` after the params' address modulo 4 KiB, and each slot ends a gap before the
        next. Back to back, with ``n`` a multiple of 1024 every stream (params, grads, every slot) starts at the
        same address modulo 4 KiB and they contend (measured by benchmarks/state_layout.py; figures in
        BENCHMARKS.md). So the state is not C-contiguous as a whole; ``state[k]`` is. CuPy state, and state
        smaller than a page, is one contiguous block.
        """
        _check_float_array("params", params)
        xp = array_module(params)
        dtype = state_dtype_for(params.dtype)
        slots, shape = len(self.state_keys), tuple(params.shape)
        size = int(np.prod(shape, dtype=np.int64))
        if xp is np and slots and size * dtype.itemsize >= PAGE_BYTES:
            state = _spaced_slots(slots, size, dtype, params.ctypes.data).reshape((slots,) + shape)
        else:
            state = xp.empty((slots,) + shape, dtype=dtype)
        for slot, value in enumerate(self.state_initial_values()):
            state[slot] = value
        return state

    def state_views(self, state) -> dict:
        """The state slots by ND4J name, as views."""
        return {key: state[slot] for slot, key in enumerate(self.state_keys)}

    # -- the step --------------------------------------------------------------------------------------
    def rule_scalars(self, iteration: int, epoch: int) -> tuple[float, ...]:
        raise NotImplementedError

    def reference_update(self, g, state, scalars):
        """The update for adjusted gradient ``g`` (compute dtype); updates ``state`` in place."""
        raise NotImplementedError

    def check_step(self, params, grads, state, iteration: int, epoch: int = 0) -> None:
        """Every check ``apply`` makes before it touches memory; raises TypeError/ValueError naming the field."""
        _check_float_array("params", params)
        if not _is_array(grads):
            raise TypeError(f"grads must be an array like params, got {type(grads).__name__}")
        if type(grads) is not type(params):
            raise TypeError(f"grads must be a {type(params).__name__} like params, got {type(grads).__name__}")
        if grads.shape != params.shape:
            raise ValueError(f"grads shape {tuple(grads.shape)} does not match params shape {tuple(params.shape)}")
        if grads.dtype != params.dtype:
            raise TypeError(f"grads dtype {grads.dtype} does not match params dtype {params.dtype}")
        if not _is_array(state) or type(state) is not type(params):
            raise TypeError(f"state must be a {type(params).__name__} from {type(self).__name__}.init, "
                            f"got {type(state).__name__}")
        expected_shape = (len(self.state_keys),) + tuple(params.shape)
        if tuple(state.shape) != expected_shape:
            raise ValueError(f"state shape {tuple(state.shape)} does not match the expected {expected_shape} "
                             f"({type(self).__name__} keeps {list(self.state_keys)} for params {tuple(params.shape)})")
        if state.dtype != state_dtype_for(params.dtype):
            raise TypeError(f"state dtype {state.dtype} does not match the expected {state_dtype_for(params.dtype)}")
        if getattr(params, "flags", None) is not None and not params.flags.writeable:
            raise ValueError("params must be writeable (the update is applied in place)")
        if state.size and not state.flags.writeable:
            raise ValueError("state must be writeable (the update is applied in place)")
        if isinstance(iteration, bool) or not isinstance(iteration, (int, np.integer)) or iteration < 0:
            raise ValueError(f"iteration must be an integer >= 0 (DL4J counts from 0), got {iteration!r}")
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch must be an integer >= 0, got {epoch!r}")

    def apply(self, params, grads, state, iteration: int, epoch: int = 0, *,
              adjustments: StepAdjustments = NO_ADJUSTMENTS, kernel: str = "auto") -> None:
        """One DL4J step, in place on ``params`` and ``state``; ``grads`` is never written.

        ``kernel``: "auto" (fused when the arrays allow it, else reference), "reference" or "fused".
        Nothing is modified when this raises.
        """
        self.check_step(params, grads, state, iteration, epoch)
        fused = self.select_kernel(params, grads, state, kernel)
        scalars = self.rule_scalars(int(iteration), int(epoch))
        if fused is None:
            reference_step(self, params, grads, state, scalars, adjustments)
        else:
            fused(params, grads, state, scalars, adjustments)

    def select_kernel(self, params, grads, state, kernel: str = "auto"):
        """The fused kernel for these arrays, or None for the reference path; raises ValueError (before any
        write) when ``kernel`` is unknown, or is "fused" and the arrays do not allow it."""
        if kernel not in KERNEL_CHOICES:
            raise ValueError(f"kernel must be one of {KERNEL_CHOICES}, got {kernel!r}")
        fused = None if kernel == "reference" else _fused_kernel_for(self, params, grads, state)
        if fused is None and kernel == "fused":
            name = type(self).__name__
            if fused_kernels_of(type(self)) is None:
                raise ValueError(f"kernel='fused' needs a rule that registers fused kernels; {name} registers "
                                 f"none (a FusedKernels as {name}.fused, docs/design.md 'Adding an update rule'); "
                                 "use kernel='auto' to fall back to the reference path")
            raise ValueError("kernel='fused' needs C-contiguous NumPy (or CuPy) params and grads, state slots "
                             "that are each C-contiguous (as init makes them), and numba; "
                             "use kernel='auto' to fall back to the reference path")
        return fused


def _spaced_slots(slots: int, size: int, dtype: np.dtype, params_address: int) -> np.ndarray:
    """A ``(slots, size)`` view whose slot ``k`` starts ``(k + 1) * SLOT_GAP_BYTES`` after ``params_address``
    modulo ``PAGE_BYTES`` (see ``Updater.init``)."""
    gap = SLOT_GAP_BYTES // dtype.itemsize
    stride = size + gap
    buffer = np.empty(slots * stride + (PAGE_BYTES + SLOT_GAP_BYTES) // dtype.itemsize, dtype=dtype)
    wanted = (params_address + SLOT_GAP_BYTES - buffer.ctypes.data) % PAGE_BYTES
    start = wanted // dtype.itemsize  # addresses are itemsize-aligned, so this is exact
    return buffer[start:start + slots * stride].reshape(slots, stride)[:, :size]


def reference_step(updater: Updater, params, grads, state, scalars, adjustments: StepAdjustments) -> None:
    """The readable path: DL4J's order of one step in plain array code (allocations allowed)."""
    xp = array_module(params)
    compute = state_dtype_for(params.dtype)
    w = params.astype(compute)
    g = grads.astype(compute)  # a copy: grads stay untouched
    if adjustments.grad_scale != 1.0:
        g *= adjustments.grad_scale
    if math.isfinite(adjustments.clip_value):
        xp.clip(g, -adjustments.clip_value, adjustments.clip_value, out=g)
    if adjustments.l1:
        g += adjustments.l1 * xp.sign(w)
    if adjustments.l2:
        g += adjustments.l2 * w
    update = updater.reference_update(g, state, scalars)
    if adjustments.weight_decay:
        update = update + adjustments.weight_decay * w
    w -= update
    params[...] = w.astype(params.dtype, copy=False)


def _check_float_array(field: str, value) -> None:
    if not _is_array(value):
        raise TypeError(f"{field} must be a NumPy or CuPy array, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{field} must have a float dtype (float16, float32 or float64), got {value.dtype}")


def slots_contiguous(state) -> bool:
    """Every state slot is C-contiguous (what the fused kernels need; the whole state need not be)."""
    return all(state[k].flags.c_contiguous for k in range(state.shape[0]))


def _fused_kernel_for(updater: Updater, params, grads, state):
    """The one-pass kernel for these arrays, or None when only the reference path applies."""
    if not (params.flags.c_contiguous and grads.flags.c_contiguous and slots_contiguous(state)):
        return None
    if array_module(params) is np:
        from . import fused_cpu  # noqa: PLC0415 - numba import is deferred until a step needs it

        return fused_cpu.kernel_for(updater, params.dtype)
    from . import fused_gpu  # noqa: PLC0415

    return fused_gpu.kernel_for(updater, params.dtype)


def from_config(config) -> Updater:
    """Rebuild an updater from ``to_config()``'s dict; unknown types or keys raise ValueError naming them."""
    if not isinstance(config, dict):
        raise TypeError(f"updater config must be a dict, got {type(config).__name__}")
    config = dict(config)
    type_name = config.pop("type", None)
    if type_name not in UPDATER_TYPES or type_name == "Updater":
        known = sorted(name for name in UPDATER_TYPES if name != "Updater")
        raise ValueError(f"updater config: unknown type {type_name!r}; expected one of {known}")
    version = config.pop("version", CONFIG_VERSION)
    if version != CONFIG_VERSION:
        raise ValueError(f"updater config: unsupported version {version!r}; expected {CONFIG_VERSION}")
    cls = UPDATER_TYPES[type_name]
    unknown = sorted(set(config) - set(cls.defaults))
    if unknown:
        raise ValueError(f"updater config for {type_name}: unknown hyperparameter(s) {unknown}; "
                         f"expected a subset of {sorted(cls.defaults)}")
    kwargs = {k: _schedules.from_config(v) if isinstance(v, dict) else v for k, v in config.items()}
    return cls(**kwargs)
