"""The fused kernels (updaters/fused_cpu.py, updaters/fused_gpu.py) held to the reference path.

Every updater x dtype (float32, float64, float16), >= 20 steps, non-default hyperparameters, a constant and a
schedule-valued learning rate, with and without every step adjustment (grad_scale, clip_value, l1, l2,
weight_decay): ``apply(kernel="fused")`` and ``apply(kernel="reference")`` run on copies of the same arrays and
must agree on params AND every state slot; grads must come back untouched. Arrays that the fused path cannot
take (non-contiguous) must fall back under kernel="auto" and raise under kernel="fused". No timing here.
"""

from __future__ import annotations

import numpy as np
import pytest

from rayps.updaters import (AdaBelief, AdaDelta, AdaGrad, AdaMax, Adam, AMSGrad, Nadam, Nesterovs, NoOp, RmsProp,
                            Sgd, StepAdjustments, Updater, fused_cpu, fused_gpu, schedules)

try:
    import numba  # noqa: F401

    HAVE_NUMBA = True
except ImportError:
    HAVE_NUMBA = False

try:
    import cupy

    HAVE_CUPY = True
except ImportError:
    cupy = None
    HAVE_CUPY = False

needs_numba = pytest.mark.skipif(not HAVE_NUMBA, reason="numba not installed: no fused CPU path")
needs_cupy = pytest.mark.skipif(not HAVE_CUPY, reason="CuPy not installed")

STEPS = 24
SHAPE = (40, 25)  # 1000 elements, 2-D: the kernels ravel
DTYPES = [np.float32, np.float64, np.float16]
# float32/float64: one rounding apart at most (the kernels follow the reference's operation order, so in practice
# they agree bit for bit); float16 params: one float16 ulp (2^-10 relative); their state is float32.
RTOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12, np.dtype(np.float16): 2e-3}

ADJUSTMENTS = {
    "none": StepAdjustments(),
    "all": StepAdjustments(grad_scale=0.5, clip_value=0.8, l1=1e-3, l2=1e-2, weight_decay=2e-3),
}


def _learning_rate(kind: str, value: float):
    if kind == "constant":
        return value
    exponential = getattr(schedules, "ExponentialSchedule", None)
    if exponential is None:
        pytest.skip("rayps.updaters.schedules has no ExponentialSchedule yet: schedule-valued lr not testable")
    return exponential("iteration", value, 0.9)


# name -> factory(lr kind): non-default hyperparameters everywhere
UPDATERS = {
    "Sgd": lambda lr: Sgd(learning_rate=_learning_rate(lr, 0.05)),
    "Nesterovs": lambda lr: Nesterovs(learning_rate=_learning_rate(lr, 0.02), momentum=0.8),
    "AdaGrad": lambda lr: AdaGrad(learning_rate=_learning_rate(lr, 0.05), epsilon=1e-5),
    "RmsProp": lambda lr: RmsProp(learning_rate=_learning_rate(lr, 0.01), rms_decay=0.9, epsilon=1e-6),
    "AdaDelta": lambda lr: AdaDelta(rho=0.9, epsilon=1e-5),
    "Adam": lambda lr: Adam(learning_rate=_learning_rate(lr, 0.02), beta1=0.8, beta2=0.95, epsilon=1e-4),
    "AdaMax": lambda lr: AdaMax(learning_rate=_learning_rate(lr, 0.02), beta1=0.8, beta2=0.95, epsilon=1e-4),
    "Nadam": lambda lr: Nadam(learning_rate=_learning_rate(lr, 0.02), beta1=0.8, beta2=0.95, epsilon=1e-4),
    "AMSGrad": lambda lr: AMSGrad(learning_rate=_learning_rate(lr, 0.02), beta1=0.8, beta2=0.95, epsilon=1e-4),
    "AdaBelief": lambda lr: AdaBelief(learning_rate=_learning_rate(lr, 0.02), beta1=0.8, beta2=0.95,
                                      epsilon=1e-10),
    "NoOp": lambda lr: NoOp(),
}
HAS_LEARNING_RATE = {name for name in UPDATERS if name not in ("AdaDelta", "NoOp")}
CASES = [(name, lr) for name in UPDATERS for lr in ("constant", "schedule")
         if lr == "constant" or name in HAS_LEARNING_RATE]


def _problem(dtype, seed=0, xp=np):
    """params, and a gradient per step: some exact zeros (sign(0), zero gradients) and large values (clipping)."""
    rng = np.random.default_rng(seed)
    params = rng.standard_normal(SHAPE)
    params.flat[::97] = 0.0
    grads = [rng.standard_normal(SHAPE) * (1.0 + 0.1 * step) for step in range(STEPS)]
    for step, grad in enumerate(grads):
        grad.flat[step::89] = 0.0
        grad.flat[step::131] *= 20.0
    return xp.asarray(params.astype(dtype)), [xp.asarray(g.astype(dtype)) for g in grads]


def _run_pair(updater, dtype, adjustments, xp=np):
    """The same steps through kernel="fused" and kernel="reference"; grads checked untouched at every step."""
    params, grads = _problem(dtype, xp=xp)
    fused_params, reference_params = params.copy(), params.copy()
    fused_state, reference_state = updater.init(params), updater.init(params)
    for iteration, grad in enumerate(grads):
        before = grad.copy()
        updater.apply(fused_params, grad, fused_state, iteration, epoch=iteration // 10, adjustments=adjustments,
                      kernel="fused")
        assert xp.array_equal(grad, before), "the fused kernel wrote into grads"
        updater.apply(reference_params, grad, reference_state, iteration, epoch=iteration // 10,
                      adjustments=adjustments, kernel="reference")
    return (fused_params, fused_state), (reference_params, reference_state)


def _assert_close(actual, expected, dtype, what):
    """allclose with the atol scaled to the array's magnitude (values near 0 inherit the neighbours' rounding)."""
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    rtol = RTOL[np.dtype(dtype)]
    scale = float(np.max(np.abs(expected[np.isfinite(expected)]), initial=0.0))
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale, equal_nan=True, err_msg=what)


def _assert_same_step(updater, fused, reference, dtype):
    """``fused`` and ``reference``: (params, state) after the same steps."""
    (fused_params, fused_state), (reference_params, reference_state) = fused, reference
    _assert_close(fused_params, reference_params, dtype, f"{type(updater).__name__} params")
    state_dtype = np.float32 if np.dtype(dtype) == np.float16 else dtype
    for key in updater.state_keys:
        _assert_close(updater.state_views(fused_state)[key], updater.state_views(reference_state)[key],
                      state_dtype, f"{type(updater).__name__} state {key}")
    assert fused_params.dtype == reference_params.dtype and fused_state.dtype == reference_state.dtype


# ---------------------------------------------------------------------------------------------------------
# CPU: fused vs reference
# ---------------------------------------------------------------------------------------------------------


@needs_numba
@pytest.mark.parametrize("adjust", sorted(ADJUSTMENTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name,lr", CASES)
def test_fused_cpu_matches_reference(name, lr, dtype, adjust):
    updater = UPDATERS[name](lr)
    assert fused_cpu.kernel_for(updater, dtype) is not None
    fused, reference = _run_pair(updater, dtype, ADJUSTMENTS[adjust])
    _assert_same_step(updater, fused, reference, dtype)
    if name != "NoOp" or adjust == "all":  # the run moved the params (NoOp moves only under weight decay)
        params0, _ = _problem(dtype)
        assert not np.array_equal(fused[0], params0)


@needs_numba
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name", sorted(UPDATERS))
def test_fused_cpu_multithreaded_path_matches_reference(name, dtype, monkeypatch):
    """Small arrays run on one thread (SERIAL_BELOW); the prange split over all threads must agree too."""
    import numba  # noqa: PLC0415

    monkeypatch.setattr(fused_cpu, "SERIAL_BELOW", 0)
    threads = numba.get_num_threads()
    updater = UPDATERS[name]("schedule" if name in HAS_LEARNING_RATE else "constant")
    fused, reference = _run_pair(updater, dtype, ADJUSTMENTS["all"])
    _assert_same_step(updater, fused, reference, dtype)
    assert numba.get_num_threads() == threads


@needs_numba
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name,lr", CASES)
def test_fused_cpu_steps_of_a_batch_equal_the_kernel_called_once_per_step_bit_for_bit(name, lr, dtype):
    """``kernel.steps`` (a batch of pushes, server/push_batches.py) against the same kernel called once per step
    with each step's scalars (the schedule's learning rate, Adam's bias correction) and adjustments (weight decay
    every other step: NoOp's pass runs only then): params and state bit for bit, grads untouched."""
    updater = UPDATERS[name](lr)
    kernel = fused_cpu.kernel_for(updater, dtype)
    params, grads = _problem(dtype)
    stacked = np.stack(grads)
    settings = [(updater.rule_scalars(i, i // 10),
                 ADJUSTMENTS["all"] if i % 2 else ADJUSTMENTS["none"]) for i in range(STEPS)]
    one, batch = params.copy(), params.copy()
    one_state, batch_state = updater.init(params), updater.init(params)
    for grad, (scalars, adjustments) in zip(grads, settings):
        kernel(one, grad, one_state, scalars, adjustments)
    before = stacked.copy()
    kernel.steps(batch, stacked, batch_state, settings)
    assert np.array_equal(stacked, before), "the kernel wrote into grads"
    assert np.array_equal(batch.view(np.uint8), one.view(np.uint8))
    assert np.array_equal(batch_state.view(np.uint8), one_state.view(np.uint8))
    assert not np.array_equal(batch, params)  # the steps moved the params (NoOp: by its weight decay)


@needs_numba
def test_fused_cpu_kernel_takes_state_slots_that_are_contiguous_only_one_by_one():
    """The kernel itself needs each slot contiguous, not the whole state (slots padded apart stream faster)."""
    updater = Adam(learning_rate=0.01)
    params, grads = _problem(np.float32)
    padded = np.zeros((2, params.size + 16), np.float32)
    state = padded[:, :params.size].reshape((2,) + params.shape)
    assert not state.flags.c_contiguous
    expected_params, expected_state = params.copy(), updater.init(params)
    step = fused_cpu.kernel_for(updater, params.dtype)
    for iteration, grad in enumerate(grads):
        step(params, grad, state, updater.rule_scalars(iteration, 0), StepAdjustments())
        updater.apply(expected_params, grad, expected_state, iteration, kernel="reference")
    np.testing.assert_array_equal(params, expected_params)
    np.testing.assert_array_equal(state, expected_state)
    with pytest.raises(ValueError, match="state slot 0 must be C-contiguous"):
        step(params, grads[0], _strided(np.zeros((2,) + params.shape, np.float32)), updater.rule_scalars(0, 0),
             StepAdjustments())


@needs_numba
def test_fused_cpu_small_arrays_run_the_one_thread_twin_and_keep_the_thread_count():
    """Below SERIAL_BELOW the step calls the loop compiled without ``parallel`` (no parallel launch, no thread
    count switched); above it, the parallel loop. Both give the reference's bits (the tests above)."""
    import numba  # noqa: PLC0415

    threads = numba.get_num_threads()
    params, grads = _problem(np.float32)
    updater = Adam()
    updater.apply(params, grads[0], updater.init(params), 0, kernel="fused")
    assert params.size < fused_cpu.SERIAL_BELOW and numba.get_num_threads() == threads
    serial = fused_cpu._RULE_LOOPS[(Adam, False)]
    assert not serial.targetoptions.get("parallel")


@needs_numba
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name", sorted(UPDATERS))
def test_fused_cpu_non_finite_values_propagate_like_the_reference(name, dtype):
    """inf/NaN/-0/subnormal/huge params and grads: the same values (NaN where NaN) through both paths."""
    updater = UPDATERS[name]("constant")
    special = np.array([np.inf, -np.inf, np.nan, -0.0, 0.0, 1e-310, -1e-310, 6e-8, 3.0, -2.0, 6e4, 1e300])
    with np.errstate(over="ignore"):
        params, grads = np.tile(special, 12).astype(dtype), np.repeat(special, 12).astype(dtype)
    adjustments = StepAdjustments(grad_scale=0.5, clip_value=1e301, l1=1e-3, l2=1e-2, weight_decay=2e-3)
    results = []
    for kernel in ("fused", "reference"):
        p, state = params.copy(), updater.init(params)
        with np.errstate(all="ignore"):
            for iteration in range(3):
                updater.apply(p, grads, state, iteration, adjustments=adjustments, kernel=kernel)
        results.append((p, state))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])


@needs_numba
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_fused_cpu_empty_and_single_element(dtype):
    for size in (0, 1):
        updater = Adam()
        params, grads = np.full(size, 0.5, dtype=dtype), np.full(size, 0.25, dtype=dtype)
        fused_params, reference_params = params.copy(), params.copy()
        fused_state, reference_state = updater.init(params), updater.init(params)
        updater.apply(fused_params, grads, fused_state, 0, kernel="fused")
        updater.apply(reference_params, grads, reference_state, 0, kernel="reference")
        np.testing.assert_array_equal(fused_params, reference_params)
        np.testing.assert_array_equal(fused_state, reference_state)


@needs_numba
def test_float16_conversions_round_like_numpy():
    """The kernels' own float16 <-> float32 conversions: exact on all 65536 halves; round-to-nearest-even on
    every tie, the float32 neighbours of every tie, overflow and subnormals, and random float32 bit patterns."""
    halves = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    widened = _half_bits_to_float(halves)
    expected = halves.view(np.float16).astype(np.float32)
    finite = ~np.isnan(expected)
    np.testing.assert_array_equal(widened.view(np.uint32)[finite], expected.view(np.uint32)[finite])
    assert np.isnan(widened[~finite]).all()

    # midpoints between consecutive positive halves (exact in float32), one float32 ulp either side, and the
    # negatives of all of them; plus random bit patterns
    positive = np.arange(0, 0x7C00, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float64)
    ties = ((positive[:-1] + positive[1:]) / 2).astype(np.float32).view(np.uint32)
    rng = np.random.default_rng(3)
    bits = np.concatenate([ties, ties - 1, ties + 1, np.array([0x477FF000, 0x477FEFFF, 0x47800000, 0x7F800000,
                                                                0x33000000, 0x33000001, 0x32FFFFFF],
                                                               dtype=np.uint32),
                           rng.integers(0, 1 << 32, size=1 << 18, dtype=np.uint64).astype(np.uint32)])
    bits = np.concatenate([bits, bits | np.uint32(0x80000000)])
    values = bits.view(np.float32)
    narrowed = _float_bits_to_half(values)
    with np.errstate(over="ignore"):
        expected = values.astype(np.float16)
    finite = ~np.isnan(values)
    np.testing.assert_array_equal(narrowed[finite], expected.view(np.uint16)[finite])
    assert np.isnan(narrowed.view(np.float16)[~finite]).all()


def _half_bits_to_float(halves):
    import numba  # noqa: PLC0415

    @numba.njit
    def widen(bits, out):
        for i in range(bits.size):
            out[i] = fused_cpu._half_to_float(bits[i])

    out = np.empty(halves.size, dtype=np.float32)
    widen(halves, out)
    return out


def _float_bits_to_half(values):
    import numba  # noqa: PLC0415

    @numba.njit
    def narrow(values, out):
        for i in range(values.size):
            out[i] = fused_cpu._float_to_half(values[i])

    out = np.empty(values.size, dtype=np.uint16)
    narrow(values, out)
    return out


# ---------------------------------------------------------------------------------------------------------
# When the fused path cannot run
# ---------------------------------------------------------------------------------------------------------


def _strided(array):
    """The same values in a non-contiguous view."""
    wide = np.zeros(array.shape[:-1] + (2 * array.shape[-1],), dtype=array.dtype)
    view = wide[..., ::2]
    view[...] = array
    return view


@pytest.mark.parametrize("which", ["params", "grads", "state"])
def test_non_contiguous_arrays_fall_back_under_auto_and_raise_under_fused(which):
    updater = Adam(learning_rate=0.01)
    params, grads = _problem(np.float32)
    grad = grads[0]
    expected_params, expected_state = params.copy(), updater.init(params)
    updater.apply(expected_params, grad, expected_state, 0, kernel="reference")

    arrays = {"params": params.copy(), "grads": grad.copy(), "state": updater.init(params)}
    arrays[which] = _strided(arrays[which])
    assert not arrays[which].flags.c_contiguous
    untouched = {name: array.copy() for name, array in arrays.items()}
    with pytest.raises(ValueError, match="kernel='fused' needs C-contiguous"):
        updater.apply(arrays["params"], arrays["grads"], arrays["state"], 0, kernel="fused")
    for name, array in arrays.items():  # nothing was modified
        np.testing.assert_array_equal(array, untouched[name])
    updater.apply(arrays["params"], arrays["grads"], arrays["state"], 0, kernel="auto")
    np.testing.assert_array_equal(arrays["params"], expected_params)
    np.testing.assert_array_equal(arrays["state"], expected_state)


class _UnknownRule(Updater):
    """A rule no fused kernel knows (the leading underscore keeps it out of the updater registry)."""

    state_keys = ()
    defaults = {"learning_rate": 0.1}

    def __init__(self, learning_rate=0.1):
        self._set_hyperparameters(learning_rate=learning_rate)

    def rule_scalars(self, iteration, epoch):
        return (self.learning_rate_at(iteration, epoch),)

    def reference_update(self, g, state, scalars):
        return 2.0 * scalars[0] * g


def test_unknown_rule_has_no_fused_kernel():
    updater = _UnknownRule()
    assert fused_cpu.kernel_for(updater, np.float32) is None
    assert fused_gpu.kernel_for(updater, np.float32) is None
    params, grads = np.ones(5, np.float32), np.full(5, 0.5, np.float32)
    updater.apply(params, grads, updater.init(params), 0, kernel="auto")
    np.testing.assert_array_equal(params, np.full(5, 0.9, np.float32))
    with pytest.raises(ValueError, match="kernel='fused' needs"):
        updater.apply(params, grads, updater.init(params), 0, kernel="fused")


def test_without_numba_auto_falls_back_and_fused_raises(monkeypatch):
    monkeypatch.setattr(fused_cpu, "numba", None)
    updater = Adam(learning_rate=0.01)
    assert fused_cpu.kernel_for(updater, np.float32) is None
    params, grads = _problem(np.float32)
    expected = params.copy()
    updater.apply(expected, grads[0], updater.init(params), 0, kernel="reference")
    updater.apply(params, grads[0], updater.init(params), 0, kernel="auto")
    np.testing.assert_array_equal(params, expected)
    with pytest.raises(ValueError, match="kernel='fused' needs"):
        updater.apply(params, grads[0], updater.init(params), 0, kernel="fused")


def test_kernel_for_rejects_non_float_dtypes():
    assert fused_cpu.kernel_for(Adam(), np.int32) is None
    assert fused_gpu.kernel_for(Adam(), np.int32) is None


# ---------------------------------------------------------------------------------------------------------
# GPU (CuPy): fused vs reference on the device, and vs the NumPy reference
# ---------------------------------------------------------------------------------------------------------


def test_gpu_module_imports_without_cupy():
    if not HAVE_CUPY:
        assert fused_gpu.kernel_for(Adam(), np.float32) is None


@needs_cupy
@pytest.mark.parametrize("adjust", sorted(ADJUSTMENTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name,lr", CASES)
def test_fused_gpu_matches_reference(name, lr, dtype, adjust):
    updater = UPDATERS[name](lr)
    assert fused_gpu.kernel_for(updater, dtype) is not None
    fused, reference = _run_pair(updater, dtype, ADJUSTMENTS[adjust], xp=cupy)
    to_host = lambda pair: (cupy.asnumpy(pair[0]), cupy.asnumpy(pair[1]))  # noqa: E731
    _assert_same_step(updater, to_host(fused), to_host(reference), dtype)
    host, host_reference = _run_pair(updater, dtype, ADJUSTMENTS[adjust])  # NumPy reference, same steps
    _assert_same_step(updater, to_host(fused), host_reference, dtype)
