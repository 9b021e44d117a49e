"""Gradient normalization and regularization through ``ParameterUpdater`` with several groups, against an
independent float64 reference of DL4J's order of one step (shared/DL4J-UPDATERS.md):

    normalize over the group -> L1/L2 on the gradient -> the updater -> WeightDecay (lr from the updater)
    -> params -= update

The reference below is plain NumPy float64 written from the doc; it calls no rayps math.
"""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest

from rayps.updaters import (L1, L2, AdaDelta, AdaGrad, Adam, Nesterovs, ParameterUpdater, ParamGroup, Sgd,
                            WeightDecay, schedules)

try:
    import rayps.updaters.fused_cpu  # noqa: F401

    HAVE_FUSED = True
except ImportError:
    HAVE_FUSED = False

KERNELS = [
    "reference",
    pytest.param("auto", marks=pytest.mark.skipif(
        not HAVE_FUSED, reason="updaters/fused_cpu.py not there yet: kernel='auto' raises ImportError")),
]
HAVE_EXPONENTIAL = hasattr(schedules, "ExponentialSchedule")
needs_schedules = pytest.mark.skipif(not HAVE_EXPONENTIAL, reason="rayps.updaters.schedules has no ExponentialSchedule")

SHAPES = {"w1": (4, 3), "b1": (3,), "w2": (3, 2), "b2": (2,), "emb": (5, 2)}
NAMES = list(SHAPES)
STEPS = 20
MODES = ("None", "RenormalizeL2PerLayer", "RenormalizeL2PerParamType", "ClipElementWiseAbsoluteValue",
         "ClipL2PerLayer", "ClipL2PerParamType")

# ---------------------------------------------------------------------------------------------------------
# The independent reference. A hyperparameter or coefficient is a number or ("exp", v0, gamma): v0 * gamma^i.
# ---------------------------------------------------------------------------------------------------------


def value(x, iteration):
    if isinstance(x, tuple):
        _, v0, gamma = x
        return v0 * gamma ** iteration
    return x


def ref_init(rule, hp, shape):
    zeros = np.zeros(shape)
    return {
        "Sgd": lambda: {},
        "Nesterovs": lambda: {"V": zeros.copy()},
        "AdaGrad": lambda: {"h": np.full(shape, hp["epsilon"])},
        "AdaDelta": lambda: {"msg": zeros.copy(), "msdx": zeros.copy()},
        "Adam": lambda: {"M": zeros.copy(), "V": zeros.copy()},
    }[rule]()


def ref_learning_rate(rule, hp, iteration):
    return 1.0 if rule == "AdaDelta" else value(hp["learning_rate"], iteration)


def ref_update(rule, hp, s, g, iteration):
    t = iteration + 1
    if rule == "Sgd":
        return value(hp["learning_rate"], iteration) * g
    if rule == "Nesterovs":
        lr, mu = value(hp["learning_rate"], iteration), hp["momentum"]
        v_prev = s["V"]
        s["V"] = mu * v_prev - lr * g
        return mu * v_prev - (1 + mu) * s["V"]
    if rule == "AdaGrad":
        s["h"] = s["h"] + g * g
        return value(hp["learning_rate"], iteration) * g / (np.sqrt(s["h"]) + hp["epsilon"])
    if rule == "AdaDelta":
        rho, eps = hp["rho"], hp["epsilon"]
        s["msg"] = rho * s["msg"] + (1 - rho) * g * g
        update = g * np.sqrt(s["msdx"] + eps) / np.sqrt(s["msg"] + eps)
        s["msdx"] = rho * s["msdx"] + (1 - rho) * update * update
        return update
    if rule == "Adam":
        b1, b2, eps = hp["beta1"], hp["beta2"], hp["epsilon"]
        s["M"] = b1 * s["M"] + (1 - b1) * g
        s["V"] = b2 * s["V"] + (1 - b2) * g * g
        alpha = value(hp["learning_rate"], iteration) * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        return alpha * s["M"] / (np.sqrt(s["V"]) + eps)
    raise AssertionError(rule)


def ref_normalize(mode, threshold, grads):
    """DL4J GradientNormalization over one group's gradients (a dict), float64."""
    g = {n: a.astype(np.float64) for n, a in grads.items()}
    if mode == "None":
        return g
    if mode == "ClipElementWiseAbsoluteValue":
        return {n: np.minimum(np.maximum(a, -threshold), threshold) for n, a in g.items()}
    per_layer = mode.endswith("PerLayer")
    layer_norm = math.sqrt(sum(float(np.sum(a * a)) for a in g.values()))
    out = {}
    for n, a in g.items():
        norm = layer_norm if per_layer else math.sqrt(float(np.sum(a * a)))
        if mode.startswith("Renormalize"):
            out[n] = a / (norm if norm != 0.0 else 1e-5)
        else:
            out[n] = a * (threshold / norm) if norm > threshold else a
    return out


def reference_run(specs, params0, grads_seq, param_dtype=np.float64):
    """Run the specs (list of dicts: rule, hp, names, norm, threshold, reg) over the gradient sequence."""
    owner = {}
    for index, spec in enumerate(specs):
        for n in spec["names"] or ():
            owner[n] = index
    catch_all = [i for i, s in enumerate(specs) if s["names"] is None]
    for n in params0:
        owner.setdefault(n, catch_all[0] if catch_all else None)
    params = {n: p.astype(np.float64) for n, p in params0.items()}
    state = {n: ref_init(specs[owner[n]]["rule"], specs[owner[n]]["hp"], p.shape) for n, p in params0.items()}
    for iteration, grads in enumerate(grads_seq):
        for index, spec in enumerate(specs):
            members = {n: grads[n] for n in grads if owner[n] == index}
            if not members:
                continue
            normalized = ref_normalize(spec["norm"], spec["threshold"], members)
            lr = ref_learning_rate(spec["rule"], spec["hp"], iteration)
            for n, g in normalized.items():
                w = params[n]
                for term in spec["reg"]:
                    if term[0] == "L1":
                        g = g + value(term[1], iteration) * np.sign(w)
                    elif term[0] == "L2":
                        g = g + value(term[1], iteration) * w
                update = ref_update(spec["rule"], spec["hp"], state[n], g, iteration)
                for term in spec["reg"]:
                    if term[0] == "WeightDecay":
                        update = update + value(term[1], iteration) * (lr if term[2] else 1.0) * w
                params[n] = (w - update).astype(param_dtype).astype(np.float64)
    return params, state


# ---------------------------------------------------------------------------------------------------------
# Building the rayps side from the same specs
# ---------------------------------------------------------------------------------------------------------

RULES = {"Sgd": Sgd, "Nesterovs": Nesterovs, "AdaGrad": AdaGrad, "AdaDelta": AdaDelta, "Adam": Adam}
REF_STATE_ORDER = {"Sgd": [], "Nesterovs": ["V"], "AdaGrad": ["h"], "AdaDelta": ["msg", "msdx"], "Adam": ["M", "V"]}


def rayps_value(x):
    if isinstance(x, tuple):
        _, v0, gamma = x
        return schedules.ExponentialSchedule("iteration", v0, gamma)
    return x


def build_group(spec):
    terms = []
    for term in spec["reg"]:
        if term[0] == "L1":
            terms.append(L1(rayps_value(term[1])))
        elif term[0] == "L2":
            terms.append(L2(rayps_value(term[1])))
        else:
            terms.append(WeightDecay(rayps_value(term[1]), apply_lr=term[2]))
    updater = RULES[spec["rule"]](**{k: rayps_value(v) for k, v in spec["hp"].items()})
    return ParamGroup(updater=updater, names=spec["names"], gradient_normalization=spec["norm"],
                      gradient_normalization_threshold=spec["threshold"], regularization=tuple(terms),
                      name=spec["name"])


def make_data(seed, dtype=np.float64, zero_group_step=7):
    """Initial params and STEPS gradient dicts; scales sweep 0.05..4 so the clip thresholds are crossed both
    ways, some params start at exact 0 (sign(0) = 0 for L1), and at one step the 'out' group's gradient is 0."""
    rng = np.random.default_rng(seed)
    params = {n: rng.normal(size=s).astype(dtype) for n, s in SHAPES.items()}
    params["b1"][0] = 0.0
    grads_seq = []
    for k in range(STEPS):
        scale = (0.05, 0.3, 1.5, 4.0)[k % 4]
        grads = {n: (rng.normal(size=s) * scale).astype(dtype) for n, s in SHAPES.items()}
        if k == zero_group_step:
            grads["w2"][...] = 0.0
            grads["b2"][...] = 0.0
        grads_seq.append(grads)
    return params, grads_seq


def run_rayps(specs, params0, grads_seq, kernel="reference"):
    pu = ParameterUpdater([build_group(s) for s in specs], NAMES)
    params = {n: p.copy() for n, p in params0.items()}
    state = pu.init(params)
    for iteration, grads in enumerate(grads_seq):
        before = {n: g.copy() for n, g in grads.items()}
        pu.apply(params, grads, state, iteration, kernel=kernel)
        for n in grads:
            np.testing.assert_array_equal(grads[n], before[n])
    return pu, params, state


def assert_matches(specs, pu, params, state, ref_params, ref_state, rtol=1e-11, atol=1e-13):
    for n in NAMES:
        np.testing.assert_allclose(params[n], ref_params[n], rtol=rtol, atol=atol, err_msg=f"params {n}")
        rule = specs[pu.group_of[n]]["rule"]
        views = list(pu.groups[pu.group_of[n]].updater.state_views(state[n]).values())
        assert len(views) == len(REF_STATE_ORDER[rule])
        for key, view in zip(REF_STATE_ORDER[rule], views):
            np.testing.assert_allclose(view, ref_state[n][key], rtol=rtol, atol=atol, err_msg=f"state {n}.{key}")


def assert_differs(a, b):
    assert max(float(np.max(np.abs(a[n] - b[n]))) for n in a) > 1e-6


def three_groups(dense_mode="None", out_mode="None", dense_reg=(), out_reg=(), rest_reg=(), rest_mode="None",
                 dense_lr=0.01, out_lr=0.1):
    return [
        {"name": "dense", "rule": "Adam", "names": ("w1", "b1"), "norm": dense_mode, "threshold": 1.0,
         "hp": {"learning_rate": dense_lr, "beta1": 0.9, "beta2": 0.999, "epsilon": 1e-8}, "reg": list(dense_reg)},
        {"name": "out", "rule": "Nesterovs", "names": ["w2", "b2"], "norm": out_mode, "threshold": 0.5,
         "hp": {"learning_rate": out_lr, "momentum": 0.9}, "reg": list(out_reg)},
        {"name": "rest", "rule": "AdaDelta", "names": None, "norm": rest_mode, "threshold": 2.0,
         "hp": {"rho": 0.9, "epsilon": 1e-6}, "reg": list(rest_reg)},
    ]


# ---------------------------------------------------------------------------------------------------------
# Normalization
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("mode", MODES)
def test_gradient_normalization(mode, kernel):
    specs = three_groups(dense_mode=mode, out_mode=mode, rest_mode=mode)
    params0, grads_seq = make_data(seed=11)
    pu, params, state = run_rayps(specs, params0, grads_seq, kernel)
    ref_params, ref_state = reference_run(specs, params0, grads_seq)
    assert_matches(specs, pu, params, state, ref_params, ref_state)
    if mode != "None":  # the normalization changed the outcome, so a wrong one would be caught
        assert_differs(ref_params, reference_run(three_groups(), params0, grads_seq)[0])


@pytest.mark.parametrize("mode", ["ClipL2PerLayer", "RenormalizeL2PerLayer"])
def test_layer_norm_is_over_the_group_not_each_param(mode):
    """PerLayer and PerParamType differ, and the layer norm spans exactly the group's params."""
    params0, grads_seq = make_data(seed=12)
    per_layer = three_groups(dense_mode=mode, out_mode=mode)
    per_param = three_groups(dense_mode=mode.replace("PerLayer", "PerParamType"),
                             out_mode=mode.replace("PerLayer", "PerParamType"))
    _, params, _ = run_rayps(per_layer, params0, grads_seq)
    ref_layer, _ = reference_run(per_layer, params0, grads_seq)
    ref_param, _ = reference_run(per_param, params0, grads_seq)
    for n in NAMES:
        np.testing.assert_allclose(params[n], ref_layer[n], rtol=1e-11, atol=1e-13)
    assert_differs(ref_layer, ref_param)


def test_clip_l2_only_above_threshold():
    """ClipL2PerParamType leaves a gradient whose norm is below T as is and scales one above T to norm T."""
    group = ParamGroup(Sgd(learning_rate=1.0), names=("a", "b"), gradient_normalization="ClipL2PerParamType",
                       gradient_normalization_threshold=6.0)
    pu = ParameterUpdater(group, ["a", "b"])
    params = {"a": np.zeros(2), "b": np.zeros(2)}
    state = pu.init(params)
    pu.apply(params, {"a": np.array([3.0, 4.0]), "b": np.array([6.0, 8.0])}, state, 0, kernel="reference")
    np.testing.assert_array_equal(params["a"], [-3.0, -4.0])  # norm 5 < 6: unchanged
    np.testing.assert_allclose(params["b"], [-3.6, -4.8], rtol=1e-15)  # norm 10 > 6: scaled by 6/10


@pytest.mark.parametrize("mode", ["RenormalizeL2PerLayer", "RenormalizeL2PerParamType"])
def test_zero_norm_renormalization(mode):
    """A zero gradient divides by 1e-5 instead of 0: no NaN, and L2 (added after) still acts."""
    group = ParamGroup(Sgd(learning_rate=0.5), names=None, gradient_normalization=mode,
                       regularization=(L2(0.1),))
    ((scale, clip),) = group.normalization_factors({"a": np.zeros(3)}).values()
    assert scale == pytest.approx(1 / 1e-5, rel=1e-15) and clip == math.inf
    pu = ParameterUpdater(group, ["a", "b"])
    params = {"a": np.array([1.0, -2.0, 0.0]), "b": np.array([3.0, 4.0])}
    state = pu.init(params)
    grads = {"a": np.zeros(3), "b": np.array([0.0, 0.0] if mode.endswith("PerLayer") else [3.0, 4.0])}
    pu.apply(params, grads, state, 0, kernel="reference")
    np.testing.assert_allclose(params["a"], np.array([1.0, -2.0, 0.0]) * (1 - 0.5 * 0.1), rtol=1e-15)
    if mode.endswith("PerLayer"):
        np.testing.assert_allclose(params["b"], np.array([3.0, 4.0]) * (1 - 0.5 * 0.1), rtol=1e-15)
    else:  # b's own norm (5) normalizes it; a's zero norm does not touch b
        np.testing.assert_allclose(params["b"], np.array([3.0, 4.0]) * (1 - 0.05) - 0.5 * np.array([0.6, 0.8]),
                                   rtol=1e-15)


# ---------------------------------------------------------------------------------------------------------
# Regularization
# ---------------------------------------------------------------------------------------------------------

REG_CASES = {
    "L1": dict(dense_reg=[("L1", 0.01)], out_reg=[("L1", 0.02)], rest_reg=[("L1", 0.05)]),
    "L2": dict(dense_reg=[("L2", 0.05)], out_reg=[("L2", 0.1)], rest_reg=[("L2", 0.2)]),
    "WeightDecay-applyLR": dict(dense_reg=[("WeightDecay", 0.5, True)], out_reg=[("WeightDecay", 0.2, True)],
                                rest_reg=[("WeightDecay", 0.01, True)]),
    "WeightDecay-noLR": dict(dense_reg=[("WeightDecay", 0.01, False)], out_reg=[("WeightDecay", 0.02, False)],
                             rest_reg=[("WeightDecay", 0.01, False)]),
    "all-with-normalization": dict(
        dense_reg=[("L1", 0.01), ("L2", 0.05), ("WeightDecay", 0.5, True), ("WeightDecay", 0.01, False)],
        out_reg=[("L2", 0.1), ("L1", 0.02), ("WeightDecay", 0.03, False)],
        rest_reg=[("L2", 0.2), ("WeightDecay", 0.01, True)],
        dense_mode="RenormalizeL2PerLayer", out_mode="ClipL2PerParamType", rest_mode="ClipElementWiseAbsoluteValue"),
    "two-L2-terms-add": dict(dense_reg=[("L2", 0.05), ("L2", 0.02)]),
}


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("case", list(REG_CASES))
def test_regularization(case, kernel):
    specs = three_groups(**REG_CASES[case])
    params0, grads_seq = make_data(seed=13)
    pu, params, state = run_rayps(specs, params0, grads_seq, kernel)
    ref_params, ref_state = reference_run(specs, params0, grads_seq)
    assert_matches(specs, pu, params, state, ref_params, ref_state)
    without = {k: v for k, v in REG_CASES[case].items() if not k.endswith("_reg")}
    assert_differs(ref_params, reference_run(three_groups(**without), params0, grads_seq)[0])


def test_weight_decay_lr_is_the_updaters_learning_rate_not_adams_alpha():
    """Adam + WeightDecay(applyLR): the decay uses lr, not alpha_t = lr*sqrt(1-b2^t)/(1-b1^t); AdaDelta uses 1."""
    w = np.array([2.0, -1.0])
    for updater, lr in ((Adam(learning_rate=0.1), 0.1), (AdaDelta(), 1.0), (Sgd(learning_rate=0.3), 0.3)):
        pu = ParameterUpdater(ParamGroup(updater, regularization=(WeightDecay(0.5),)), ["w"])
        params = {"w": w.copy()}
        pu.apply(params, {"w": np.zeros(2)}, pu.init(params), 0, kernel="reference")
        # a zero gradient gives a zero update for all three, so only the decay moves w
        np.testing.assert_allclose(params["w"], w - 0.5 * lr * w, rtol=1e-15, err_msg=type(updater).__name__)


def test_l1_l2_act_before_the_updater():
    """With Adam, L2 before the updater is rescaled by Adam; WeightDecay after it is not: they differ."""
    params0, grads_seq = make_data(seed=14)
    l2 = three_groups(dense_reg=[("L2", 0.1)])
    wd = three_groups(dense_reg=[("WeightDecay", 0.1, False)])
    _, p_l2, _ = run_rayps(l2, params0, grads_seq)
    _, p_wd, _ = run_rayps(wd, params0, grads_seq)
    assert_differs({n: p_l2[n] for n in ("w1", "b1")}, {n: p_wd[n] for n in ("w1", "b1")})


@needs_schedules
@pytest.mark.parametrize("kernel", KERNELS)
def test_schedule_valued_coefficients_and_learning_rate(kernel):
    specs = three_groups(
        dense_reg=[("L2", ("exp", 0.05, 0.9)), ("WeightDecay", ("exp", 0.5, 0.8), True)],
        out_reg=[("L1", ("exp", 0.02, 0.95)), ("WeightDecay", ("exp", 0.1, 0.9), False)],
        rest_reg=[("WeightDecay", ("exp", 0.05, 0.7), True)],
        dense_lr=("exp", 0.02, 0.9), out_lr=("exp", 0.1, 0.97))
    params0, grads_seq = make_data(seed=15)
    pu, params, state = run_rayps(specs, params0, grads_seq, kernel)
    ref_params, ref_state = reference_run(specs, params0, grads_seq)
    assert_matches(specs, pu, params, state, ref_params, ref_state)
    # a constant coefficient (the schedule's first value) gives a different run: the schedule is evaluated
    constant = three_groups(
        dense_reg=[("L2", 0.05), ("WeightDecay", 0.5, True)], out_reg=[("L1", 0.02), ("WeightDecay", 0.1, False)],
        rest_reg=[("WeightDecay", 0.05, True)], dense_lr=0.02, out_lr=0.1)
    assert_differs(ref_params, reference_run(constant, params0, grads_seq)[0])


def test_float32_params_through_groups():
    specs = three_groups(**REG_CASES["all-with-normalization"])
    params0, grads_seq = make_data(seed=16, dtype=np.float32)
    pu, params, state = run_rayps(specs, params0, grads_seq)
    ref_params, ref_state = reference_run(specs, params0, grads_seq, param_dtype=np.float32)
    for n in NAMES:
        assert params[n].dtype == np.float32 and state[n].dtype == np.float32
    assert_matches(specs, pu, params, state, ref_params, ref_state, rtol=2e-4, atol=2e-5)


def test_params_without_gradient_are_untouched():
    specs = three_groups(dense_mode="RenormalizeL2PerLayer", dense_reg=[("WeightDecay", 0.1, False)])
    params0, grads_seq = make_data(seed=17)
    pu = ParameterUpdater([build_group(s) for s in specs], NAMES)
    params = {n: p.copy() for n, p in params0.items()}
    state = pu.init(params)
    state_before = {n: s.copy() for n, s in state.items()}
    partial = {n: grads_seq[0][n] for n in ("w1", "emb")}
    pu.apply(params, partial, state, 0, kernel="reference")
    for n in ("b1", "w2", "b2"):
        np.testing.assert_array_equal(params[n], params0[n])
        np.testing.assert_array_equal(state[n], state_before[n])
    assert np.all(params["w1"] != params0["w1"]) and np.all(params["emb"] != params0["emb"])


def test_group_assignment():
    pu = ParameterUpdater([build_group(s) for s in three_groups()], NAMES)
    assert pu.group_of == {"w1": 0, "b1": 0, "w2": 1, "b2": 1, "emb": 2}
    single = ParameterUpdater(Adam(), NAMES)
    assert set(single.group_of.values()) == {0} and single.groups[0].names is None


# ---------------------------------------------------------------------------------------------------------
# Config round trip
# ---------------------------------------------------------------------------------------------------------


def _groups_for_config():
    groups = [build_group(s) for s in three_groups(**REG_CASES["all-with-normalization"])]
    if HAVE_EXPONENTIAL:
        groups.append(build_group({"name": "sched", "rule": "Sgd", "names": ("x",), "norm": "ClipL2PerLayer",
                                   "threshold": 3, "hp": {"learning_rate": ("exp", 0.1, 0.5)},
                                   "reg": [("L1", ("exp", 0.01, 0.9)), ("WeightDecay", ("exp", 0.2, 0.8), False)]}))
    return groups


@pytest.mark.parametrize("index", range(4))
def test_param_group_config_round_trip_through_msgpack(index):
    groups = _groups_for_config()
    if index >= len(groups):
        pytest.skip("rayps.updaters.schedules has no ExponentialSchedule")
    group = groups[index]
    back = ParamGroup.from_config(msgpack.unpackb(msgpack.packb(group.to_config())))
    assert back == group
    assert back.to_config() == group.to_config()
    assert type(back.updater) is type(group.updater)
    assert back.regularization == group.regularization
    assert back.names == group.names and (back.names is None or isinstance(back.names, tuple))
    assert isinstance(back.gradient_normalization_threshold, float)


def test_round_tripped_groups_step_identically():
    specs = three_groups(**REG_CASES["all-with-normalization"])
    groups = [build_group(s) for s in specs]
    back = [ParamGroup.from_config(msgpack.unpackb(msgpack.packb(g.to_config()))) for g in groups]
    params0, grads_seq = make_data(seed=18)
    results = []
    for gs in (groups, back):
        pu = ParameterUpdater(gs, NAMES)
        params = {n: p.copy() for n, p in params0.items()}
        state = pu.init(params)
        for i, grads in enumerate(grads_seq[:5]):
            pu.apply(params, grads, state, i, kernel="reference")
        results.append((params, state))
    for n in NAMES:
        np.testing.assert_array_equal(results[0][0][n], results[1][0][n])
        np.testing.assert_array_equal(results[0][1][n], results[1][1][n])


@pytest.mark.parametrize("mutate,exc,match", [
    (lambda c: {**c, "version": 2}, ValueError, "version"),
    (lambda c: {**c, "momentum": 0.9}, ValueError, "momentum"),
    (lambda c: {k: v for k, v in c.items() if k != "updater"}, ValueError, "updater"),
    (lambda c: {**c, "updater": {"type": "Adamm"}}, ValueError, "Adamm"),
    (lambda c: {**c, "gradient_normalization": "ClipL2"}, ValueError, "gradient_normalization"),
    (lambda c: {**c, "gradient_normalization_threshold": 0.0}, ValueError, "gradient_normalization_threshold"),
    (lambda c: {**c, "regularization": [{"type": "L3", "coefficient": 0.1}]}, ValueError, "L3"),
    (lambda c: {**c, "regularization": [{"type": "L2", "coefficient": 0.1, "apply_lr": True}]}, ValueError,
     "apply_lr"),
    (lambda c: {**c, "regularization": [{"type": "L2", "coefficient": -0.1}]}, ValueError, "coefficient"),
    (lambda c: {**c, "regularization": ["L2"]}, TypeError, "regularization config"),
    (lambda c: [c], TypeError, "config"),
])
def test_bad_param_group_config(mutate, exc, match):
    config = build_group(three_groups()[0]).to_config()
    with pytest.raises(exc, match=match):
        ParamGroup.from_config(mutate(config))


# ---------------------------------------------------------------------------------------------------------
# Bad construction
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(updater="adam"), TypeError, "updater"),
    (dict(updater=Adam), TypeError, "updater"),
    (dict(updater=Adam(), gradient_normalization="ClipL2"), ValueError, "gradient_normalization"),
    (dict(updater=Adam(), gradient_normalization=None), ValueError, "gradient_normalization"),
    (dict(updater=Adam(), gradient_normalization_threshold=0), ValueError, "gradient_normalization_threshold"),
    (dict(updater=Adam(), gradient_normalization_threshold=-1.0), ValueError, "gradient_normalization_threshold"),
    (dict(updater=Adam(), gradient_normalization_threshold=float("nan")), ValueError,
     "gradient_normalization_threshold"),
    (dict(updater=Adam(), gradient_normalization_threshold=float("inf")), ValueError,
     "gradient_normalization_threshold"),
    (dict(updater=Adam(), gradient_normalization_threshold="1"), TypeError, "gradient_normalization_threshold"),
    (dict(updater=Adam(), gradient_normalization_threshold=True), TypeError, "gradient_normalization_threshold"),
    (dict(updater=Adam(), names="w1"), TypeError, "names"),
    (dict(updater=Adam(), names=("w1", 3)), TypeError, "names"),
    (dict(updater=Adam(), regularization=(0.1,)), TypeError, "regularization"),
    (dict(updater=Adam(), regularization=(Adam(),)), TypeError, "regularization"),
])
def test_bad_param_group(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ParamGroup(**kwargs)


@pytest.mark.parametrize("make,exc,match", [
    (lambda: L1(-0.1), ValueError, "coefficient"),
    (lambda: L2(float("nan")), ValueError, "coefficient"),
    (lambda: WeightDecay(float("inf")), ValueError, "coefficient"),
    (lambda: L2("0.1"), TypeError, "coefficient"),
    (lambda: WeightDecay(0.1, apply_lr=1), TypeError, "apply_lr"),
    (lambda: WeightDecay(0.1, apply_lr="yes"), TypeError, "apply_lr"),
])
def test_bad_regularization(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def _g(names, **kw):
    return ParamGroup(Sgd(), names=names, **kw)


@pytest.mark.parametrize("groups,names,exc,match", [
    ([_g(("a", "b")), _g(("b", "c"))], ["a", "b", "c"], ValueError, "'b'"),
    ([_g(("a", "a"))], ["a"], ValueError, "'a'"),
    ([_g(("a",))], ["a", "b"], ValueError, "'b'"),
    ([_g(("a", "zz"))], ["a"], ValueError, "'zz'"),
    ([_g(None), _g(None)], ["a"], ValueError, "names=None"),
    ([_g(("a",)), "not a group"], ["a"], TypeError, "str"),
    ([], ["a"], TypeError, "updater"),
    ("adam", ["a"], TypeError, "updater"),
    (None, ["a"], TypeError, "updater"),
])
def test_bad_parameter_updater(groups, names, exc, match):
    with pytest.raises(exc, match=match):
        ParameterUpdater(groups, names)


# ---------------------------------------------------------------------------------------------------------
# ParameterUpdater.apply leaves everything bit-identical on any raise
# ---------------------------------------------------------------------------------------------------------


def _setup():
    specs = three_groups(**REG_CASES["all-with-normalization"])
    params0, grads_seq = make_data(seed=19)
    pu = ParameterUpdater([build_group(s) for s in specs], NAMES)
    params = {n: p.copy() for n, p in params0.items()}
    state = pu.init(params)
    for i in range(2):
        pu.apply(params, grads_seq[i], state, i, kernel="reference")
    return pu, params, grads_seq[2], state


def _snapshot(*dicts):
    return [{n: (a.dtype, a.shape, a.tobytes()) if isinstance(a, np.ndarray) else repr(a) for n, a in d.items()}
            for d in dicts]


def _replace(d, key, value):
    out = dict(d)
    if value is _DELETE:
        del out[key]
    else:
        out[key] = value
    return out


_DELETE = object()

# the last param in the last group ('emb') is the bad one, so every earlier param would already be written if
# the checks came after the first write
APPLY_CASES = [
    ("grads unknown key", lambda p, g, s: (p, {**g, "zz": np.zeros(2)}, s, 2, {}), ValueError, "zz"),
    ("grads shape", lambda p, g, s: (p, _replace(g, "emb", np.zeros((2, 5))), s, 2, {}), ValueError, "grads shape"),
    ("grads dtype", lambda p, g, s: (p, _replace(g, "emb", g["emb"].astype(np.float32)), s, 2, {}), TypeError,
     "grads dtype"),
    ("grads list", lambda p, g, s: (p, _replace(g, "emb", g["emb"].tolist()), s, 2, {}), TypeError, "grads"),
    ("grads int", lambda p, g, s: (p, _replace(g, "emb", g["emb"].astype(np.int64)), s, 2, {}), TypeError,
     "grads"),
    ("params int", lambda p, g, s: (_replace(p, "emb", p["emb"].astype(np.int64)), g, s, 2, {}), TypeError,
     "params"),
    ("params complex", lambda p, g, s: (_replace(p, "emb", p["emb"].astype(complex)), g, s, 2, {}), TypeError,
     "params"),
    ("state shape", lambda p, g, s: (p, g, _replace(s, "emb", np.zeros((3, 5, 2))), 2, {}), ValueError,
     "state shape"),
    ("state dtype", lambda p, g, s: (p, g, _replace(s, "emb", s["emb"].astype(np.float32)), 2, {}), TypeError,
     "state dtype"),
    ("state of another group", lambda p, g, s: (p, g, _replace(s, "b2", s["w1"][:, 0, :2].copy()), 2, {}),
     ValueError, "state shape"),
    ("params missing key", lambda p, g, s: (_replace(p, "emb", _DELETE), g, s, 2, {}), KeyError, "emb"),
    ("state missing key", lambda p, g, s: (p, g, _replace(s, "emb", _DELETE), 2, {}), KeyError, "emb"),
    ("iteration -1", lambda p, g, s: (p, g, s, -1, {}), ValueError, "iteration"),
    ("iteration 1.5", lambda p, g, s: (p, g, s, 1.5, {}), ValueError, "iteration"),
    ("iteration True", lambda p, g, s: (p, g, s, True, {}), ValueError, "iteration"),
    ("epoch -3", lambda p, g, s: (p, g, s, 2, {"epoch": -3}), ValueError, "epoch"),
    ("kernel", lambda p, g, s: (p, g, s, 2, {"kernel": "numba"}), ValueError, "kernel"),
]


@pytest.mark.parametrize("build,exc,match", [pytest.param(*c[1:], id=c[0]) for c in APPLY_CASES])
def test_apply_raises_and_modifies_nothing(build, exc, match):
    pu, params, grads, state = _setup()
    p, g, s, iteration, kwargs = build(params, grads, state)
    kwargs.setdefault("kernel", "reference")
    before = _snapshot(p, g, s)
    with pytest.raises(exc, match=match):
        pu.apply(p, g, s, iteration, **kwargs)
    assert _snapshot(p, g, s) == before


@pytest.mark.skipif(not HAVE_FUSED, reason="updaters/fused_cpu.py not there yet")
def test_apply_fused_with_a_strided_param_modifies_nothing():
    pu = ParameterUpdater([_g(("a",), ), ParamGroup(Sgd(), names=("b",))], ["a", "b"])
    base = np.ones((4, 4))
    params = {"a": np.ones(4), "b": base[:, ::2]}
    grads = {"a": np.ones(4), "b": np.ones((4, 2))}
    state = pu.init(params)
    before = _snapshot(params, state)
    with pytest.raises(ValueError, match="fused"):
        pu.apply(params, grads, state, 0, kernel="fused")
    assert _snapshot(params, state) == before
