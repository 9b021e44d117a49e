"""The eleven DL4J updaters (reference path) against an independent float64 reference written here.

The reference (``_REFERENCE`` below) is scalar Python float math, one element at a time, transcribed from the
table in shared/DL4J-UPDATERS.md (ND4J's code, not the seed page); it never calls rayps. Each case runs >= 20
steps with random gradients and compares parameters and every state slot (``u.state_views(state)``).
"""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest

from rayps.updaters import (ALL_UPDATERS, AdaBelief, AdaDelta, AdaGrad, AdaMax, Adam, AMSGrad, Nadam, Nesterovs,
                            NoOp, RmsProp, Sgd, from_config)
from rayps.updaters.base import PAGE_BYTES, SLOT_GAP_BYTES

try:  # the fused CPU kernels arrive separately; kernel="auto" imports them
    import rayps.updaters.fused_cpu  # noqa: F401

    HAVE_FUSED = True
except ImportError:
    HAVE_FUSED = False

KERNELS = [
    "reference",
    pytest.param("auto", marks=pytest.mark.skipif(
        not HAVE_FUSED, reason="updaters/fused_cpu.py not there yet: kernel='auto' raises ImportError")),
]

STEPS = 25
SHAPE = (3, 4)

# ---------------------------------------------------------------------------------------------------------
# The independent reference: DL4J-UPDATERS.md, one element at a time, Python floats (IEEE float64).
# Each rule takes (hyperparameters, state dict of this element, g, t = iteration + 1) and returns the update;
# it mutates the element's state. State names are ND4J's, in ND4J's slot order.
# ---------------------------------------------------------------------------------------------------------


def _alpha_t(lr, b1, b2, eps, t):
    """ND4J: alpha_t = lr * sqrt(1 - b2^t) / (1 - b1^t); epsilon when that is NaN, 0 or inf."""
    alpha = lr * math.sqrt(1.0 - b2 ** t) / (1.0 - b1 ** t)
    if math.isnan(alpha) or alpha == 0.0 or math.isinf(alpha):
        alpha = eps
    return alpha


def _sgd(hp, s, g, t):
    return hp["learning_rate"] * g


def _noop(hp, s, g, t):
    return 0.0


def _nesterovs(hp, s, g, t):
    lr, mu = hp["learning_rate"], hp["momentum"]
    v_prev = s["V"]
    s["V"] = mu * v_prev - lr * g
    return mu * v_prev - (1.0 + mu) * s["V"]


def _adagrad(hp, s, g, t):
    s["grad"] += g * g
    return hp["learning_rate"] * g / (math.sqrt(s["grad"]) + hp["epsilon"])


def _rmsprop(hp, s, g, t):
    d = hp["rms_decay"]
    s["G"] = d * s["G"] + (1.0 - d) * g * g
    return hp["learning_rate"] * g / (math.sqrt(s["G"]) + hp["epsilon"])


def _adadelta(hp, s, g, t):
    rho, eps = hp["rho"], hp["epsilon"]
    s["msg"] = rho * s["msg"] + (1.0 - rho) * g * g
    update = g * math.sqrt(s["msdx"] + eps) / math.sqrt(s["msg"] + eps)
    s["msdx"] = rho * s["msdx"] + (1.0 - rho) * update * update
    return update


def _moments(hp, s, g):
    b1, b2 = hp["beta1"], hp["beta2"]
    s["M"] = b1 * s["M"] + (1.0 - b1) * g
    s["V"] = b2 * s["V"] + (1.0 - b2) * g * g


def _adam(hp, s, g, t):
    _moments(hp, s, g)
    a = _alpha_t(hp["learning_rate"], hp["beta1"], hp["beta2"], hp["epsilon"], t)
    return a * s["M"] / (math.sqrt(s["V"]) + hp["epsilon"])


def _adamax(hp, s, g, t):
    b1, b2 = hp["beta1"], hp["beta2"]
    s["M"] = b1 * s["M"] + (1.0 - b1) * g
    s["V"] = max(b2 * s["V"], abs(g)) + 1e-32  # ND4J's U_STATE is named "V"
    a = hp["learning_rate"] / (1.0 - b1 ** t)
    if math.isnan(a) or a == 0.0 or math.isinf(a):
        a = hp["epsilon"]
    return a * s["M"] / s["V"]


def _nadam(hp, s, g, t):
    b1 = hp["beta1"]
    _moments(hp, s, g)
    corrected = (b1 * s["M"] + (1.0 - b1) * g) / (1.0 - b1 ** t)
    return hp["learning_rate"] * corrected / (math.sqrt(s["V"]) + hp["epsilon"])


def _amsgrad(hp, s, g, t):
    _moments(hp, s, g)
    s["V_HAT"] = max(s["V_HAT"], s["V"])
    a = _alpha_t(hp["learning_rate"], hp["beta1"], hp["beta2"], hp["epsilon"], t)
    return a * s["M"] / (math.sqrt(s["V_HAT"]) + hp["epsilon"])


def _adabelief(hp, s, g, t):
    b1, b2, eps = hp["beta1"], hp["beta2"], hp["epsilon"]
    s["M"] = b1 * s["M"] + (1.0 - b1) * g
    s["S"] = b2 * s["S"] + (1.0 - b2) * (g - s["M"]) ** 2 + eps
    a = _alpha_t(hp["learning_rate"], b1, b2, eps, t)
    return a * s["M"] / (math.sqrt(s["S"]) + eps)


def _zero(hp):
    return 0.0


def _eps(hp):
    return hp["epsilon"]


# rule, [(ND4J state name, initial value from hp)], DL4J's defaults (from DL4J-UPDATERS.md), non-default values
_ADAM_DEFAULTS = {"learning_rate": 1e-3, "beta1": 0.9, "beta2": 0.999, "epsilon": 1e-8}
_ADAM_OTHER = {"learning_rate": 0.02, "beta1": 0.8, "beta2": 0.95, "epsilon": 1e-4}
_REFERENCE = {
    Sgd: (_sgd, [], {"learning_rate": 1e-3}, {"learning_rate": 0.05}),
    Nesterovs: (_nesterovs, [("V", _zero)], {"learning_rate": 0.1, "momentum": 0.9},
                {"learning_rate": 0.03, "momentum": 0.7}),
    AdaGrad: (_adagrad, [("grad", _eps)], {"learning_rate": 0.1, "epsilon": 1e-6},
              {"learning_rate": 0.2, "epsilon": 1e-3}),
    RmsProp: (_rmsprop, [("G", _eps)], {"learning_rate": 0.1, "rms_decay": 0.95, "epsilon": 1e-8},
              {"learning_rate": 0.01, "rms_decay": 0.8, "epsilon": 1e-4}),
    AdaDelta: (_adadelta, [("msg", _zero), ("msdx", _zero)], {"rho": 0.95, "epsilon": 1e-6},
               {"rho": 0.7, "epsilon": 1e-3}),
    Adam: (_adam, [("M", _zero), ("V", _zero)], _ADAM_DEFAULTS, _ADAM_OTHER),
    AdaMax: (_adamax, [("M", _zero), ("V", _zero)], _ADAM_DEFAULTS, _ADAM_OTHER),
    Nadam: (_nadam, [("M", _zero), ("V", _zero)], _ADAM_DEFAULTS, _ADAM_OTHER),
    AMSGrad: (_amsgrad, [("M", _zero), ("V", _zero), ("V_HAT", _zero)], _ADAM_DEFAULTS, _ADAM_OTHER),
    AdaBelief: (_adabelief, [("M", _zero), ("S", _zero)], {**_ADAM_DEFAULTS, "epsilon": 1e-14},
                {**_ADAM_OTHER, "epsilon": 1e-6}),
    NoOp: (_noop, [], {}, None),
}


def reference_run(cls, hp, w0, grads, iterations, param_dtype):
    """Params and state after the steps, per the table. Params are stored in ``param_dtype`` after each step
    (what in-place storage into a float32/float16 array does); everything else is float64."""
    rule, slots, _, _ = _REFERENCE[cls]
    w = [float(x) for x in w0.ravel()]
    states = [{name: init(hp) for name, init in slots} for _ in w]
    for g_array, iteration in zip(grads, iterations):
        for i, g in enumerate(g_array.ravel()):
            w[i] = float(param_dtype.type(w[i] - rule(hp, states[i], float(g), iteration + 1)))
    state = [np.array([s[name] for s in states]).reshape(w0.shape) for name, _ in slots]
    return np.array(w).reshape(w0.shape), state


def random_gradients(rng, n, shape, dtype):
    """Gradients whose scale drops after a few steps (so AMSGrad's max and AdaMax's max take both branches),
    with an exact zero now and then."""
    out = []
    for k in range(n):
        g = rng.normal(size=shape) * (2.0 if k < 6 else 0.3)
        g[rng.random(shape) < 0.05] = 0.0
        out.append(g.astype(dtype))
    return out


# tolerances: (params rtol, params atol, state rtol, state atol)
TOLERANCES = {
    np.float64: (1e-12, 1e-13, 1e-12, 1e-15),
    np.float32: (1e-5, 2e-6, 2e-4, 1e-9),
}


def _cases():
    for cls in ALL_UPDATERS:
        _, _, defaults, other = _REFERENCE[cls]
        yield pytest.param(cls, None, id=f"{cls.__name__}-defaults")
        if other is not None:
            yield pytest.param(cls, other, id=f"{cls.__name__}-custom")


def _run_and_compare(cls, custom, dtype, kernel, start_iteration=0, seed=0):
    _, _, defaults, _ = _REFERENCE[cls]
    hp = defaults if custom is None else custom
    u = cls() if custom is None else cls(**custom)
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    w0 = rng.normal(size=SHAPE).astype(dtype)
    grads = random_gradients(rng, STEPS, SHAPE, dtype)
    iterations = list(range(start_iteration, start_iteration + STEPS))

    params = w0.copy()
    state = u.init(params)
    for g, iteration in zip(grads, iterations):
        g_before = g.copy()
        u.apply(params, g, state, iteration, kernel=kernel)
        np.testing.assert_array_equal(g, g_before)  # grads are never written
    ref_w, ref_state = reference_run(cls, hp, w0, grads, iterations, dtype)
    return u, params, state, ref_w, ref_state, w0


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("cls,custom", list(_cases()))
def test_matches_reference(cls, custom, dtype, kernel):
    u, params, state, ref_w, ref_state, w0 = _run_and_compare(cls, custom, dtype, kernel)
    p_rtol, p_atol, s_rtol, s_atol = TOLERANCES[dtype]
    assert params.dtype == dtype and state.dtype == dtype
    np.testing.assert_allclose(params, ref_w, rtol=p_rtol, atol=p_atol)
    views = u.state_views(state)
    assert len(views) == len(ref_state)
    for (key, view), expected in zip(views.items(), ref_state):
        np.testing.assert_allclose(view, expected, rtol=s_rtol, atol=s_atol, err_msg=f"state {key}")
    if cls is NoOp:
        np.testing.assert_array_equal(params, w0)
    else:  # the run did move every parameter
        assert np.all(params != w0)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("cls,custom", list(_cases()))
def test_float16_params_keep_float32_state(cls, custom, kernel):
    u, params, state, ref_w, ref_state, _ = _run_and_compare(cls, custom, np.float16, kernel)
    assert params.dtype == np.float16
    assert state.dtype == np.float32
    for (key, view), expected in zip(u.state_views(state).items(), ref_state):
        assert view.dtype == np.float32
        np.testing.assert_allclose(view, expected, rtol=2e-4, atol=1e-8, err_msg=f"state {key}")
    # the update is computed in float32, the reference in float64; both round to float16 on storage, so an
    # element may land one float16 step away now and then
    ulps = np.abs(params.astype(np.float64) - ref_w) / np.spacing(np.abs(ref_w).astype(np.float16)).astype(np.float64)
    assert ulps.max() <= 2.0, ulps.max()


@pytest.mark.parametrize("cls", [Adam, Nadam, AMSGrad, AdaMax, AdaBelief, Nesterovs])
def test_iteration_argument_is_used_not_counted(cls):
    """The step uses the iteration it is given (from 0), not an internal count: start at iteration 40."""
    u, params, state, ref_w, ref_state, _ = _run_and_compare(cls, _REFERENCE[cls][3], np.float64, "reference",
                                                          start_iteration=40, seed=3)
    np.testing.assert_allclose(params, ref_w, rtol=1e-12, atol=1e-13)
    for view, expected in zip(u.state_views(state).values(), ref_state):
        np.testing.assert_allclose(view, expected, rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------------------------------------------------
# Defaults, state init, named state, iteration from 0, Adam's alpha_t fallback, AdaMax's 1e-32
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", ALL_UPDATERS, ids=lambda c: c.__name__)
def test_defaults_are_dl4j(cls):
    expected = _REFERENCE[cls][2]
    assert cls().hyperparameters == expected
    assert cls.defaults == expected


@pytest.mark.parametrize("cls", ALL_UPDATERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_state_init(cls, dtype):
    custom = _REFERENCE[cls][3] or {}
    u = cls(**custom)
    params = np.zeros((2, 5), dtype=dtype)
    state = u.init(params)
    slots = _REFERENCE[cls][1]
    assert state.shape == (len(slots), 2, 5)
    assert state.dtype == (np.float32 if dtype == np.float16 else dtype)
    assert state.flags.c_contiguous  # below a page: one block
    for (name, init), view in zip(slots, u.state_views(state).values()):
        assert view.shape == params.shape
        assert np.shares_memory(view, state)  # a view, not a copy
        np.testing.assert_array_equal(view, np.full(params.shape, init(custom), dtype=state.dtype), err_msg=name)


@pytest.mark.parametrize("cls", [Nesterovs, Adam, AMSGrad])
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_state_slots_of_large_params_are_spaced_apart_and_each_contiguous(cls, dtype):
    """Slot k starts (k + 1) * SLOT_GAP_BYTES after the params modulo a page, one gap after the slot before."""
    params = np.zeros((64, 1024), dtype=dtype)
    state = cls().init(params)
    assert state.shape == (len(cls.state_keys),) + params.shape
    for k in range(state.shape[0]):
        assert state[k].flags.c_contiguous
        assert (state[k].ctypes.data - params.ctypes.data) % PAGE_BYTES == (k + 1) * SLOT_GAP_BYTES % PAGE_BYTES
        if k:
            assert state[k].ctypes.data - (state[k - 1].ctypes.data + state[k - 1].nbytes) == SLOT_GAP_BYTES
    reference_params = params.astype(np.float64) + 1.0
    params[...] = reference_params
    grads = np.full(params.shape, 0.5, dtype=dtype)
    contiguous = np.ascontiguousarray(cls().init(params))
    expected = params.copy()
    cls().apply(expected, grads, contiguous, 0, kernel="reference")
    cls().apply(params, grads, state, 0)
    np.testing.assert_array_equal(params, expected)
    np.testing.assert_array_equal(state, contiguous)


@pytest.mark.parametrize("cls", [AdaGrad, RmsProp])
def test_accumulator_starts_at_epsilon_not_zero(cls):
    u = cls(epsilon=0.25)
    state = u.init(np.zeros(3))
    np.testing.assert_array_equal(state, np.full((1, 3), 0.25))
    params = np.zeros(3)
    u.apply(params, np.array([1.0, 0.0, -2.0]), state, 0, kernel="reference")
    lr = u.learning_rate
    if cls is AdaGrad:  # h = 0.25 + g^2, update = lr*g/(sqrt(h) + 0.25)
        h = 0.25 + np.array([1.0, 0.0, 4.0])
    else:  # G = 0.95*0.25 + 0.05*g^2
        h = 0.95 * 0.25 + 0.05 * np.array([1.0, 0.0, 4.0])
    np.testing.assert_allclose(state[0], h, rtol=1e-15)
    np.testing.assert_allclose(params, -lr * np.array([1.0, 0.0, -2.0]) / (np.sqrt(h) + 0.25), rtol=1e-14)


_ND4J_STATE_NAMES = {
    Sgd: [], NoOp: [], Nesterovs: ["V"], AdaGrad: ["grad"], RmsProp: ["G"], AdaDelta: ["msg", "msdx"],
    Adam: ["M", "V"], AdaMax: ["M", "V"], Nadam: ["M", "V"], AMSGrad: ["M", "V", "V_HAT"], AdaBelief: ["M", "S"],
}


@pytest.mark.parametrize("cls", ALL_UPDATERS, ids=lambda c: c.__name__)
def test_state_keys_are_nd4j_names(cls):
    """ND4J's state-map keys (AdaGradUpdater.GRAD_STATE = "grad", AdaMaxUpdater.U_STATE = "V", ...)."""
    u = cls()
    assert list(u.state_views(u.init(np.zeros(2))).keys()) == _ND4J_STATE_NAMES[cls]


def test_iteration_counts_from_zero():
    """iteration 0 is t = 1: Adam's first step is alpha_1 * m / (sqrt(v) + eps) with alpha_1 = lr*sqrt(1-b2)/(1-b1)."""
    g = np.array([0.5, -2.0, 3.0])
    lr, b1, b2, eps = 0.01, 0.9, 0.999, 1e-8
    expected = lr * math.sqrt(1 - b2) / (1 - b1) * ((1 - b1) * g) / (np.sqrt((1 - b2) * g * g) + eps)
    for iteration, should_match in ((0, True), (1, False)):
        u = Adam(learning_rate=lr)
        params = np.zeros(3)
        u.apply(params, g, u.init(params), iteration, kernel="reference")
        assert np.allclose(-params, expected, rtol=1e-14, atol=0) is should_match
    # Nadam: the bias correction of iteration 0 is 1 - b1^1
    u = Nadam(learning_rate=lr)
    params = np.zeros(3)
    u.apply(params, g, u.init(params), 0, kernel="reference")
    m = (1 - b1) * g
    np.testing.assert_allclose(-params, lr * ((b1 * m + (1 - b1) * g) / (1 - b1)) / (np.sqrt((1 - b2) * g * g) + eps),
                               rtol=1e-14)


def _fallback_cases():
    for cls in (Adam, AMSGrad, AdaBelief, AdaMax):
        yield pytest.param(cls, 0.0, 0.9, id=f"{cls.__name__}-lr0")
        if cls is not AdaMax:  # AdaMax's alpha_t = lr/(1-b1^t) has no sqrt(1-b2^t) factor to underflow with
            yield pytest.param(cls, 5e-324, 0.9, id=f"{cls.__name__}-underflow")
        yield pytest.param(cls, 1e308, 0.99, id=f"{cls.__name__}-overflow")


@pytest.mark.parametrize("cls,learning_rate,beta1", list(_fallback_cases()))
def test_alpha_fallback_to_epsilon(cls, learning_rate, beta1):
    """ND4J replaces alpha_t by epsilon when it is NaN, 0 or inf: the step still moves the params."""
    eps = 1e-3
    g = np.array([0.5, -2.0, 3.0])
    u = cls(learning_rate=learning_rate, beta1=beta1, beta2=0.999, epsilon=eps)
    params = np.zeros(3)
    state = u.init(params)
    u.apply(params, g, state, 0, kernel="reference")
    m = (1 - beta1) * g
    if cls is AdaMax:
        expected = eps * m / (np.abs(g) + 1e-32)
    elif cls is AdaBelief:
        s = 0.001 * (g - m) ** 2 + eps
        expected = eps * m / (np.sqrt(s) + eps)
    else:
        expected = eps * m / (np.sqrt(0.001 * g * g) + eps)
    np.testing.assert_allclose(-params, expected, rtol=1e-12)
    assert np.all(params != 0)


def test_adam_alpha_no_fallback_when_finite():
    """A small but representable alpha_t is used as is (the fallback is only for NaN, 0 and inf)."""
    u = Adam(learning_rate=1e-300, epsilon=1e-3)
    params = np.zeros(2)
    u.apply(params, np.array([1.0, -1.0]), u.init(params), 0, kernel="reference")
    assert 0 < abs(params[0]) < 1e-290


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_adamax_adds_1e_32(dtype):
    """u = max(b2*u, |g|) + 1e-32: a zero gradient on fresh state gives u = 1e-32 and update 0 (not 0/0)."""
    u = AdaMax()
    params = np.array([1.0, 2.0], dtype=dtype)
    state = u.init(params)
    u.apply(params, np.array([0.0, 0.0], dtype=dtype), state, 0, kernel="reference")
    views = u.state_views(state)
    np.testing.assert_array_equal(views["V"], np.array([1e-32, 1e-32], dtype=dtype))
    np.testing.assert_array_equal(params, np.array([1.0, 2.0], dtype=dtype))
    u.apply(params, np.array([0.0, 0.0], dtype=dtype), state, 1, kernel="reference")
    np.testing.assert_allclose(views["V"], dtype(0.999 * 1e-32 + 1e-32), rtol=1e-6)
    assert np.all(np.isfinite(params))


@pytest.mark.parametrize("cls", ALL_UPDATERS, ids=lambda c: c.__name__)
def test_grads_untouched_and_noncontiguous_params(cls):
    """A strided view of params is updated in place (reference path), the gradient array stays as given."""
    rng = np.random.default_rng(5)
    base = rng.normal(size=(4, 6))
    base_before = base.copy()
    params = base[:, ::2]  # not contiguous
    w0 = params.copy()
    g = rng.normal(size=(4, 3))
    g_before = g.copy()
    u = cls(**(_REFERENCE[cls][3] or {}))
    state = u.init(params)
    u.apply(params, g, state, 0, kernel="reference")
    np.testing.assert_array_equal(g, g_before)
    ref_w, _ = reference_run(cls, _REFERENCE[cls][3] or {}, w0, [g], [0], np.dtype(np.float64))
    np.testing.assert_allclose(base[:, ::2], ref_w, rtol=1e-12, atol=1e-13)
    np.testing.assert_array_equal(base[:, 1::2], base_before[:, 1::2])  # the elements between are untouched


# ---------------------------------------------------------------------------------------------------------
# Bad hyperparameters
# ---------------------------------------------------------------------------------------------------------


def _fields(kind):
    for cls in ALL_UPDATERS:
        for name in _REFERENCE[cls][2]:
            unit = name in ("beta1", "beta2", "rho", "rms_decay")
            if (kind == "unit") == unit:
                yield pytest.param(cls, name, id=f"{cls.__name__}.{name}")


@pytest.mark.parametrize("value", [-1e-3, -1, float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("cls,name", list(_fields("non_negative")))
def test_bad_non_negative_hyperparameter(cls, name, value):
    with pytest.raises(ValueError, match=name):
        cls(**{name: value})


@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5, float("nan"), float("inf")])
@pytest.mark.parametrize("cls,name", list(_fields("unit")))
def test_bad_unit_interval_hyperparameter(cls, name, value):
    with pytest.raises(ValueError, match=name):
        cls(**{name: value})


@pytest.mark.parametrize("value", ["0.1", None, [0.1], True, 1 + 2j])
@pytest.mark.parametrize("cls,name", list(_fields("non_negative")) + list(_fields("unit")))
def test_non_numeric_hyperparameter(cls, name, value):
    with pytest.raises(TypeError, match=name):
        cls(**{name: value})


@pytest.mark.parametrize("cls,name,value", [
    (Adam, "beta1", 0.0), (Adam, "beta2", 0.0), (RmsProp, "rms_decay", 0.0), (AdaDelta, "rho", 0.0),
    (Sgd, "learning_rate", 0), (Nesterovs, "momentum", 0.0), (Adam, "epsilon", 0.0),
    (Nesterovs, "momentum", np.float32(0.5)), (Sgd, "learning_rate", np.int64(2)),
])
def test_edge_hyperparameters_accepted(cls, name, value):
    u = cls(**{name: value})
    assert getattr(u, name) == float(value) and type(getattr(u, name)) is float


@pytest.mark.parametrize("cls", ALL_UPDATERS, ids=lambda c: c.__name__)
def test_unknown_hyperparameter_name(cls):
    with pytest.raises(TypeError, match="learning_rat"):
        cls(learning_rat=0.1)
    if cls in (AdaDelta, NoOp):  # no learning rate in DL4J
        with pytest.raises(TypeError, match="learning_rate"):
            cls(learning_rate=0.1)


# ---------------------------------------------------------------------------------------------------------
# Config round trip and bad configs
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", ALL_UPDATERS, ids=lambda c: c.__name__)
def test_config_round_trip_through_msgpack(cls):
    u = cls(**(_REFERENCE[cls][3] or {}))
    config = u.to_config()
    assert config["type"] == cls.__name__
    assert isinstance(config["version"], int)
    back = from_config(msgpack.unpackb(msgpack.packb(config)))
    assert type(back) is cls
    assert back == u and back.hyperparameters == u.hyperparameters
    if cls is not NoOp:
        assert back != cls()  # non-default values survived
    # and it steps identically
    rng = np.random.default_rng(1)
    w = rng.normal(size=5)
    g = rng.normal(size=5)
    p1, p2 = w.copy(), w.copy()
    s1, s2 = u.init(p1), back.init(p2)
    for i in range(3):
        u.apply(p1, g, s1, i, kernel="reference")
        back.apply(p2, g, s2, i, kernel="reference")
    np.testing.assert_array_equal(p1, p2)
    np.testing.assert_array_equal(s1, s2)


def test_config_distinguishes_types():
    assert Adam() != AMSGrad()
    assert from_config(AMSGrad().to_config()) != Adam()


@pytest.mark.parametrize("config,exc,match", [
    ({"type": "Adamm", "version": 1}, ValueError, "Adamm"),
    ({"version": 1, "learning_rate": 0.1}, ValueError, "type"),
    ({"type": "Updater", "version": 1}, ValueError, "Updater"),
    ({"type": "_AdamFamily", "version": 1}, ValueError, "_AdamFamily"),
    ({"type": "Adam", "version": 1, "momentum": 0.9}, ValueError, "momentum"),
    ({"type": "AdaDelta", "version": 1, "learning_rate": 0.9}, ValueError, "learning_rate"),
    ({"type": "Adam", "version": 2}, ValueError, "version"),
    ({"type": "Adam", "version": "1"}, ValueError, "version"),
    ({"type": "Adam", "version": 1, "learning_rate": -1.0}, ValueError, "learning_rate"),
    ({"type": "Adam", "version": 1, "beta2": 1.0}, ValueError, "beta2"),
    ({"type": "Adam", "version": 1, "epsilon": "1e-8"}, TypeError, "epsilon"),
    (["Adam"], TypeError, "config"),
    ("Adam", TypeError, "config"),
    (None, TypeError, "config"),
])
def test_bad_config(config, exc, match):
    with pytest.raises(exc, match=match):
        from_config(config)


def test_from_config_does_not_mutate_its_argument():
    config = Adam(learning_rate=0.5).to_config()
    copy = dict(config)
    from_config(config)
    assert config == copy


# ---------------------------------------------------------------------------------------------------------
# Bad step inputs: each raises naming the field, and nothing is modified
# ---------------------------------------------------------------------------------------------------------


def _snapshot(*arrays):
    return [(a.dtype, a.shape, a.tobytes()) if isinstance(a, np.ndarray) else repr(a) for a in arrays]


def _good(cls, dtype=np.float64):
    rng = np.random.default_rng(2)
    u = cls(**(_REFERENCE[cls][3] or {}))
    params = rng.normal(size=(2, 3)).astype(dtype)
    state = u.init(params)
    # a few real steps first, so the state is not trivially its initial value
    for i in range(2):
        u.apply(params, rng.normal(size=(2, 3)).astype(dtype), state, i, kernel="reference")
    grads = rng.normal(size=(2, 3)).astype(dtype)
    return u, params, grads, state


def _bad_step_cases():
    # name, builder(u, params, grads, state) -> (params, grads, state, iteration, kwargs), exception, match
    def read_only(a):
        a = a.copy()
        a.flags.writeable = False
        return a

    return [
        ("grads shape", lambda u, p, g, s: (p, g[:, :2].copy(), s, 0, {}), ValueError, "grads"),
        ("grads transposed", lambda u, p, g, s: (p, g.T.copy(), s, 0, {}), ValueError, "grads"),
        ("grads dtype float32", lambda u, p, g, s: (p, g.astype(np.float32), s, 0, {}), TypeError, "grads"),
        ("grads int", lambda u, p, g, s: (p, g.astype(np.int64), s, 0, {}), TypeError, "grads"),
        ("grads complex", lambda u, p, g, s: (p, g.astype(np.complex128), s, 0, {}), TypeError, "grads"),
        ("grads list", lambda u, p, g, s: (p, g.tolist(), s, 0, {}), TypeError, "grads"),
        ("grads scalar", lambda u, p, g, s: (p, 1.0, s, 0, {}), TypeError, "grads"),
        ("grads None", lambda u, p, g, s: (p, None, s, 0, {}), TypeError, "grads"),
        ("state shape", lambda u, p, g, s: (p, g, np.zeros((len(u.state_keys) + 1,) + p.shape), 0, {}),
         ValueError, "state"),
        ("state of params shape", lambda u, p, g, s: (p, g, np.zeros((len(u.state_keys), 3, 2)), 0, {}),
         ValueError, "state"),
        ("state dtype", lambda u, p, g, s: (p, g, s.astype(np.float32), 0, {}), TypeError, "state"),
        ("state list", lambda u, p, g, s: (p, g, s.tolist(), 0, {}), TypeError, "state"),
        ("state read-only", lambda u, p, g, s: (p, g, read_only(s), 0, {}), ValueError, "state"),
        ("params read-only", lambda u, p, g, s: (read_only(p), g, s, 0, {}), ValueError, "params"),
        ("iteration -1", lambda u, p, g, s: (p, g, s, -1, {}), ValueError, "iteration"),
        ("iteration 1.5", lambda u, p, g, s: (p, g, s, 1.5, {}), ValueError, "iteration"),
        ("iteration 2.0", lambda u, p, g, s: (p, g, s, 2.0, {}), ValueError, "iteration"),
        ("iteration True", lambda u, p, g, s: (p, g, s, True, {}), ValueError, "iteration"),
        ("iteration np.bool_", lambda u, p, g, s: (p, g, s, np.bool_(True), {}), ValueError, "iteration"),
        ("iteration str", lambda u, p, g, s: (p, g, s, "3", {}), ValueError, "iteration"),
        ("iteration None", lambda u, p, g, s: (p, g, s, None, {}), ValueError, "iteration"),
        ("iteration np.int64(-2)", lambda u, p, g, s: (p, g, s, np.int64(-2), {}), ValueError, "iteration"),
        ("epoch -1", lambda u, p, g, s: (p, g, s, 0, {"epoch": -1}), ValueError, "epoch"),
        ("epoch 0.5", lambda u, p, g, s: (p, g, s, 0, {"epoch": 0.5}), ValueError, "epoch"),
        ("epoch False", lambda u, p, g, s: (p, g, s, 0, {"epoch": False}), ValueError, "epoch"),
        ("kernel", lambda u, p, g, s: (p, g, s, 0, {"kernel": "numba"}), ValueError, "kernel"),
        ("fused on strided", lambda u, p, g, s: (p, g[:, ::-1], s, 0, {"kernel": "fused"}), ValueError, "fused"),
    ]


def _bad_step_params():
    for cls in ALL_UPDATERS:
        for label, build, exc, match in _bad_step_cases():
            if label == "state read-only" and not cls.state_keys:
                continue  # an empty state is never written, read-only or not
            yield pytest.param(cls, build, exc, match, id=f"{cls.__name__}-{label}")


@pytest.mark.parametrize("cls,build,exc,match", list(_bad_step_params()))
def test_bad_step_raises_and_modifies_nothing(cls, build, exc, match):
    u, params, grads, state = _good(cls)
    p, g, s, iteration, kwargs = build(u, params, grads, state)
    before = _snapshot(p, g, s)
    kwargs.setdefault("kernel", "reference")
    with pytest.raises(exc, match=match):
        u.apply(p, g, s, iteration, **kwargs)
    assert _snapshot(p, g, s) == before


@pytest.mark.parametrize("cls", ALL_UPDATERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.complex64, np.complex128, np.bool_, object])
def test_non_float_params_rejected(cls, dtype):
    u = cls()
    params = np.ones((2, 3), dtype=dtype)
    grads = np.ones((2, 3), dtype=dtype)
    state = np.zeros((len(u.state_keys), 2, 3))
    before = _snapshot(params, grads, state)
    with pytest.raises(TypeError, match="params"):
        u.init(params)
    with pytest.raises(TypeError, match="params"):
        u.apply(params, grads, state, 0, kernel="reference")
    assert _snapshot(params, grads, state) == before


@pytest.mark.parametrize("cls", ALL_UPDATERS, ids=lambda c: c.__name__)
def test_params_not_an_array(cls):
    u = cls()
    with pytest.raises(TypeError, match="params"):
        u.init([1.0, 2.0])
    state = u.init(np.zeros(2))
    with pytest.raises(TypeError, match="params"):
        u.apply([1.0, 2.0], np.zeros(2), state, 0, kernel="reference")


@pytest.mark.parametrize("cls", [Adam, AMSGrad])
def test_state_of_another_updater_rejected(cls):
    other = AMSGrad if cls is Adam else Adam
    params = np.ones(4)
    u = cls()
    foreign = other().init(params)
    before = _snapshot(params, foreign)
    with pytest.raises(ValueError, match="state"):
        u.apply(params, np.ones(4), foreign, 0, kernel="reference")
    assert _snapshot(params, foreign) == before


def test_float16_params_with_float16_state_rejected():
    u = Adam()
    params = np.ones(4, dtype=np.float16)
    state = np.zeros((2, 4), dtype=np.float16)
    before = _snapshot(params, state)
    with pytest.raises(TypeError, match="state dtype"):
        u.apply(params, np.ones(4, dtype=np.float16), state, 0, kernel="reference")
    assert _snapshot(params, state) == before


def test_nan_gradient_is_not_an_error():
    """NaN/inf in a gradient is data, not a bad argument: it propagates to those elements only (as in DL4J)."""
    u = Sgd(learning_rate=0.5)
    params = np.ones(3)
    u.apply(params, np.array([np.nan, 1.0, np.inf]), u.init(params), 0, kernel="reference")
    assert np.isnan(params[0]) and params[1] == 0.5 and params[2] == -np.inf
